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
. "$(dirname "$0")/callgrind-pair.sh"
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
