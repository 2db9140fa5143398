# Sourced by benches/callgrind.sh and benches/hot-text.sh: starts
# `weft-pair` (control plane, sidecars web, api, bulk and their apps) with
# every sidecar under `valgrind --tool=callgrind $CALLGRIND_ARGS`, and waits
# until it has printed its addresses. Sets: dir (dumps go to $dir/cg.<pid>.*),
# pair (its PID), out (web's outbound listener), web api bulk (sidecar PIDs),
# admins (the three admin listeners), and holds the pair up on fd 3 (close
# it, `exec 3>&-`, to stop the pair).
#
# In: PROFILE (release), PROXY (another build of the sidecar), TCP_BYTES
# (passed to weft-pair --tcp-bytes, default 0), CALLGRIND_ARGS,
# WEFT_TEST_READY_TIMEOUT (seconds a sidecar may take to be ready, 120).
target=${CARGO_TARGET_DIR:-$(dirname "${BASH_SOURCE[0]}")/../target}
bin=$target/${PROFILE:-release}
proxy=$(realpath "${PROXY:-$bin/weft-proxy}")   # PROXY=path: another build of the sidecar
dir=$(mktemp -d "${TMPDIR:-/tmp}/weft-callgrind.XXXXXX")
# testkit looks for the binaries next to the running one: a directory where
# weft-proxy is valgrind around the real one.
ln "$bin/weft-pair" "$dir/weft-pair" 2>/dev/null || cp "$bin/weft-pair" "$dir/weft-pair"
ln -s "$(realpath "$bin/weft-control-plane")" "$dir/weft-control-plane"
# The CLI (join tokens) is not measured: any build of it.
for b in "$bin/weft" "$target/debug/weft"; do [ -x "$b" ] && { ln -s "$(realpath "$b")" "$dir/weft"; break; }; done
cat > "$dir/weft-proxy" <<WRAP
#!/bin/sh
exec valgrind --tool=callgrind ${CALLGRIND_ARGS:-} --callgrind-out-file="$dir/cg.%p" "$proxy" "\$@"
WRAP
chmod +x "$dir/weft-proxy"
# A sidecar under valgrind starts ~50 times slower: more than testkit's
# default 20 s to answer /ready on a busy machine.
export WEFT_TEST_READY_TIMEOUT=${WEFT_TEST_READY_TIMEOUT:-120}
mkfifo "$dir/hold"
"$dir/weft-pair" --tcp-bytes "${TCP_BYTES:-0}" < "$dir/hold" > "$dir/pair.out" 2> "$dir/pair.err" &
pair=$!
exec 3> "$dir/hold"
for _ in $(seq 1 600); do
  grep -q '^pids=' "$dir/pair.out" 2>/dev/null && break
  kill -0 $pair 2>/dev/null || { cat "$dir/pair.err"; exit 1; }
  sleep 0.5
done
grep -q '^pids=' "$dir/pair.out" || { echo "weft-pair printed no pids= within 300 s; its log: $dir/pair.err" >&2; exit 1; }
out=$(sed -n 's/^outbound=//p' "$dir/pair.out")
read -r web api bulk < <(sed -n 's/^pids=//p' "$dir/pair.out")
read -r -a admins < <(sed -n 's/^admins=//p' "$dir/pair.out") || true
