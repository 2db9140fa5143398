#!/usr/bin/env bash
# The sidecar's code layout (issue 10, docs/performance.md "Sixth session:
# code layout"): writes proxy/hot-text.ld, a linker script that gathers the
# functions a running sidecar executes, hottest first, into one output
# section (`.text.hot`) ahead of the rest of `.text`; proxy/build.rs hands
# it to the linker. The kernel maps a binary's code into a process 64 KiB
# at a time around each page touched (fault-around), so executed code
# scattered over the 6.5 MB `.text` made nearly all of it resident in every
# sidecar.
#
# The profile: weft-pair with every sidecar (web, api, bulk) under
# `valgrind --tool=callgrind --demangle=no`: start-up, config from the
# control plane, HTTP/1.1 keep-alive and new-connection GETs, h2c GETs,
# POSTs with a body, a TCP transfer through an `--upstream` tunnel, and a
# `/metrics` scrape of each admin listener. Then weft-load's weft pair, under
# callgrind the same way, with a short run of its load (`--no-peers`): 64
# connections at once, the fixed-rate run, the mTLS handshake storm, a gRPC
# stream and a tunnel, so what concurrency, connection churn and gRPC
# execute (h2 flow control and resets, connection teardown, error paths)
# is gathered too: left in `.text`, each such function made its 64 KiB
# resident (under weft-load, 0.56-0.87 MiB of code per sidecar outside
# `.text.hot` without this part of the profile, 0.24-0.52 with it).
#
# The script matches input sections (`.text.<symbol>`, one per function;
# `.text.unlikely.<symbol>` for those marked cold), first by exact symbol,
# then by the name up to its hash. Exact symbols alone do not last: a
# symbol's hash (`17h<16 hex>E`) changes with the toolchain and with the
# features cargo unifies for the packages built together, and fat LTO
# numbers the local copies of inline functions (`.1428`) anew whenever any
# code changes. The patterns find the hot code in any such build, every
# instance of a hot generic function coming along (after the exact names,
# in the section's cold tail). Functions it misses keep their place in
# `.text`: a stale file costs memory, never correctness. `--check` says
# how many names and patterns still match.
#
#   cargo build --profile dist -p weft -p weft-control-plane -p weft-proxy -p weft-benches --bins   # as the README
#   benches/hot-text.sh            # rewrite proxy/hot-text.ld
#   benches/hot-text.sh --check    # how much of it matches target/dist/weft-proxy; exit 1 if stale
#
# Regenerate after the last change to the sidecar's code or dependencies:
# any such change renames many functions (hashes, LTO suffixes).
set -euo pipefail
root=$(realpath "$(dirname "$0")/..")
script=$root/proxy/hot-text.ld
export PROFILE=${PROFILE:-dist}
proxy_bin=$(realpath "${PROXY:-${CARGO_TARGET_DIR:-$root/target}/$PROFILE/weft-proxy}")
# The functions `nm` lists in .text (t/T/w/W): the names lld can order.
text_symbols() { nm "$1" | awk '$2 ~ /^[tTwW]$/ {print $3}' | sort -u; }
# Built alone, weft-proxy gets other symbol hashes than in the README's build
# (cargo unifies features over the packages built together).
[ -f "$proxy_bin" ] || { echo "no $proxy_bin: build it (cargo build --profile $PROFILE -p weft -p weft-control-plane -p weft-proxy -p weft-benches --bins), or set PROXY=path" >&2; exit 1; }

if [ "${1:-}" = "--check" ]; then
  python3 - "$script" <(text_symbols "$proxy_bin") <<'PY'
import bisect, sys
pats = [l.split()[0][len("*(.text."):-1] for l in open(sys.argv[1]) if l.strip().startswith("*(.text.") and l.strip().endswith("*)")]
names = sorted(l.strip() for l in open(sys.argv[2]))
def hit(p):
    i = bisect.bisect_left(names, p)
    return i < len(names) and names[i].startswith(p)
found = sum(map(hit, pats))
exact = [l.split()[0][len("*(.text."):] for l in open(sys.argv[1]) if l.strip().startswith("*(.text.") and not l.strip().endswith("*)")]
have = set(names)
matched = sum(n in have for n in exact)
print(f"{matched} of {len(exact)} exact names ({100 * matched // max(len(exact), 1)} %) and {found} of {len(pats)} patterns in proxy/hot-text.ld match functions of the binary")
# The exact names are what keep the hot code together; the patterns match
# almost any build but bring every instance of a generic along (a layout
# with 58 % of its names left had the pair's peak ~2 MiB higher under
# weft-load than a fresh one).
if not pats or found * 10 < len(pats) * 9 or matched * 10 < len(exact) * 9:
    print("stale: regenerate with benches/hot-text.sh (after the README's dist build)")
    sys.exit(1)
PY
  exit $?
fi

load_bin=${CARGO_TARGET_DIR:-$root/target}/$PROFILE/weft-load
[ -x "$load_bin" ] || { echo "no $load_bin: build the benches too (the README's command: cargo build --profile $PROFILE -p weft -p weft-control-plane -p weft-proxy -p weft-benches --bins)" >&2; exit 1; }

export CALLGRIND_ARGS="--demangle=no" TCP_BYTES=4000000
. "$root/benches/callgrind-pair.sh"
for _ in $(seq 1 600); do grep -q '^tcp_tunnel_cpu_ms_bulk=' "$dir/pair.out" && break; sleep 0.5; done
curl -s -o /dev/null -H 'Host: api' "http://$out/bench?[1-300]"
for i in $(seq 1 20); do
  curl -s -o /dev/null -H 'Host: api' "http://$out/new-connection?$i"
  curl -s -o /dev/null --http2-prior-knowledge -H 'Host: api' "http://$out/h2c?$i"
  curl -s -o /dev/null -H 'Host: api' --data-binary @"$root/Cargo.lock" "http://$out/post?$i"
done
for a in "${admins[@]}"; do curl -s -o /dev/null "http://$a/metrics"; done
for p in $web $api $bulk; do callgrind_control -d "$p" >/dev/null 2>&1; done
sleep 1
exec 3>&-
wait $pair || true

# weft-load kills each sidecar with SIGKILL, which a process under valgrind
# does not survive to dump its profile: the wrapper runs valgrind in the
# background, so valgrind outlives the wrapper weft-load kills, and is
# dumped (`callgrind_control -d`) and killed once weft-load is done.
# Its binaries go in a directory of their own, $load/bin: testkit looks for
# weft-proxy in the parent of weft-load's directory first ($load, where
# there is none), then beside it.
load=$dir-load
mkdir -p "$load/bin"
ln "$load_bin" "$load/bin/weft-load" 2>/dev/null || cp "$load_bin" "$load/bin/weft-load"
for b in weft-control-plane weft; do ln -s "$(readlink -f "$dir/$b")" "$load/bin/$b"; done
cat > "$load/bin/weft-proxy" <<WRAP
#!/bin/sh
valgrind --tool=callgrind --demangle=no --callgrind-out-file="$load/cg.%p" "$proxy" "\$@" &
echo \$! >> "$load/valgrind.pids"
wait
WRAP
chmod +x "$load/bin/weft-proxy"
# Run twice (here and on exit): a process already gone is no error.
stop_load_sidecars() {
  if [ -f "$load/valgrind.pids" ]; then xargs -r kill -9 < "$load/valgrind.pids" 2>/dev/null || true; fi
}
trap stop_load_sidecars EXIT
"$load/bin/weft-load" --no-peers --weft-threads 0 --duration 2 --warmup 1 --rate 100 --rate-duration 2 \
  --grpc-duration 1 --handshake-duration 1 --tcp-bytes 4000000 > "$load/load.out" 2>&1 \
  || { echo "weft-load under callgrind failed; its output: $load/load.out" >&2; exit 1; }
while read -r p; do callgrind_control -d "$p" >/dev/null 2>&1 || true; done < "$load/valgrind.pids"
sleep 1
stop_load_sidecars

# Self cost per function over the sidecars' dumps (name compression:
# `fn=(id) name` once, `fn=(id)` after; the cost line after `calls=` is the
# call's inclusive cost, not the caller's own). Ordered by who runs it, then
# hottest first: what both the caller's sidecar (`web`) and the callees'
# run, then what only the callees run (the inbound side, the app client),
# then what only the caller runs (the outbound side, the HTTP/2 client).
# Each sidecar then touches one stretch of `.text.hot`, not code of the
# other side interleaved with its own by hotness (with one order by cost,
# 0.3-0.4 MiB more code was resident per sidecar once the raw HTTP/2
# client's code joined the profile).
python3 - "$dir"/cg.*.[0-9]* "$load"/cg.*.[0-9]* > "$dir/executed.txt" <<'PY'
import collections, re, sys
cost = collections.Counter()
roles = collections.defaultdict(set)
for path in sys.argv[1:]:
    names, cur, skip = {}, None, False
    role = "callee"
    for line in open(path, errors="replace"):
        if line.startswith("cmd:"):
            # The sidecar's service is its token file's name: `web-<n>.token` calls.
            m = re.search(r"--token-file \S*/([a-z]+)[^/\s]*", line)
            role = "caller" if m and m.group(1) == "web" else "callee"
            continue
        m = re.match(r"^(c?fn)=\((\d+)\)(?: (.*))?$", line.rstrip("\n"))
        if m:
            kind, i, name = m.groups()
            if name is not None:
                # `'2`: callgrind's name for a recursion level
                names[i] = name = re.sub(r"'\d+$", "", name)
                cost.setdefault(name, 0)
            if kind == "fn":
                cur = names.get(i)
        elif line.startswith("calls="):
            skip = True
        elif line[:1].isdigit() or line[:1] in "+-*":
            parts = line.split()
            if skip:
                skip = False
            elif cur and len(parts) >= 2:
                cost[cur] += int(parts[1])
                roles[cur].add(role)
group = lambda name: {2: 0, 1: 1 if "callee" in roles[name] else 2}.get(len(roles[name]), 3)
for name, c in sorted(cost.items(), key=lambda kv: (group(kv[0]), -kv[1])):
    print(name)
PY
# Only this binary's functions; each name cut at its hash or LTO suffix.
# Written in the profile's directory and copied over the script only when
# complete: every build of weft-proxy links it, and a cut-off one fails.
python3 - "$dir/executed.txt" <(text_symbols "$proxy_bin") > "$dir/hot-text.ld" \
  "$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)" "$(rustc -V)" <<'PY'
import re, sys
executed, symbols, commit, rustc = sys.argv[1:5]
have = set(l.strip() for l in open(symbols))
hot = [name for name in (l.strip() for l in open(executed)) if name in have]
if not hot:
    sys.exit(f"none of the {sum(1 for _ in open(executed))} functions in the profile ({executed}) is a function of the binary: "
             "was the profile taken with --demangle=no, of this weft-proxy? proxy/hot-text.ld left as it was")
print(f"/* Generated by benches/hot-text.sh from {commit} ({rustc}); read by proxy/build.rs. */")
print("SECTIONS {\n  .text.hot : {")
# First each executed function by its exact name, hottest first: in the
# build the profile ran on (the same toolchain, packages and code) only
# these, 2.7 of the 6.5 MB, are touched. Then the patterns, so another
# build still finds its hot code, at the cost of the other instances of a
# generic function coming along (the section's cold tail).
for name in hot:
    print(f"    *(.text.{name} .text.unlikely.{name})")
seen = set()
for name in hot:
    stem = re.sub(r"(\.llvm)?\.\d+$", "", name)
    stem = re.sub(r"17h[0-9a-f]{16}E$", "17h", stem)
    if stem not in seen:
        seen.add(stem)
        # LLVM puts functions marked cold (`RawVec::grow_one`) in
        # `.text.unlikely.<symbol>`: executed all the same.
        print(f"    *(.text.{stem}* .text.unlikely.{stem}*)")
print("  }\n} INSERT BEFORE .text;")
PY
cp "$dir/hot-text.ld" "$script"
echo "$(grep -c '^    \*(.*\*)$' "$script") patterns and $(grep -c '^    \*(.*[^*])$' "$script") exact names written to proxy/hot-text.ld (profile: $dir)"
