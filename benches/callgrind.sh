#!/usr/bin/env bash
# Instructions per request through a weft sidecar pair (issue 10,
# docs/performance.md): the `web` and `api` sidecars run under
# `valgrind --tool=callgrind`; after WARMUP keep-alive GETs through web's
# outbound listener the counters are zeroed, N more GETs are sent, and the
# counters dumped. Prints Ir/request per sidecar and the dump files, for
# callgrind_annotate.
#
#   cargo build --release -p weft-proxy -p weft-control-plane -p weft-benches --bins
#   benches/callgrind.sh [N] [WARMUP]       # PROFILE=dist for target/dist
set -euo pipefail
n=${1:-2000}
warmup=${2:-200}
target=${CARGO_TARGET_DIR:-$(dirname "$0")/../target}
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
exec valgrind --tool=callgrind --callgrind-out-file=$dir/cg.%p "$proxy" "\$@"
WRAP
chmod +x "$dir/weft-proxy"
mkfifo "$dir/hold"
"$dir/weft-pair" < "$dir/hold" > "$dir/pair.out" 2> "$dir/pair.err" &
pair=$!
exec 3> "$dir/hold"
for _ in $(seq 1 600); do
  grep -q '^pids=' "$dir/pair.out" 2>/dev/null && break
  kill -0 $pair 2>/dev/null || { cat "$dir/pair.err"; exit 1; }
  sleep 0.5
done
out=$(sed -n 's/^outbound=//p' "$dir/pair.out")
read -r web api _bulk < <(sed -n 's/^pids=//p' "$dir/pair.out")
get() { curl -s -o /dev/null -w '%{http_code}\n' -H 'Host: api' "http://$out/bench?[1-$1]" | sort | uniq -c; }
get "$warmup" >/dev/null
callgrind_control -z "$web" >/dev/null
callgrind_control -z "$api" >/dev/null
get "$n"
callgrind_control -d "$web" >/dev/null
callgrind_control -d "$api" >/dev/null
sleep 1
for who in web:$web api:$api; do
  pid=${who#*:}
  ir=$(cat "$dir"/cg."$pid".[0-9]* | awk '/^totals:/ {t += $2} /^summary:/ {s += $2} END {print (t ? t : s)}')
  echo "${who%%:*} Ir/request $((ir / n))  dumps: $(ls "$dir"/cg."$pid".[0-9]* | tr '\n' ' ')"
done
exec 3>&-
wait $pair || true
