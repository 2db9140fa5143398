#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 60) with cargo-fuzz on
# nightly; exits non-zero as soon as a target finds a crash (its input is in
# fuzz/artifacts/<target>/). New corpus entries go to fuzz/corpus/<target>/
# (not committed); fuzz/seeds/<target>/ holds a small committed seed corpus.
set -euo pipefail
secs="${1:-60}"
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
targets=(spiffe_id config csr canonical detect)
if [[ -n "${FUZZ_TARGETS:-}" ]]; then
    read -r -a targets <<<"$FUZZ_TARGETS"
fi
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    corpora=("corpus/$t")
    [[ -d "seeds/$t" ]] && corpora+=("seeds/$t")
    echo "== fuzz $t for ${secs}s"
    if ! cargo +nightly fuzz run "$t" "${corpora[@]}" -- -max_total_time="$secs" -print_final_stats=1; then
        echo "fuzz target $t FAILED: see fuzz/artifacts/$t/" >&2
        exit 1
    fi
done
echo "all fuzz targets ran ${secs}s without a crash"
