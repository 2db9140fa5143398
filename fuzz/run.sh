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
# The workspace forbids unsafe code, so AddressSanitizer finds little that
# the fuzzer's own panics do not; without it (and unoptimized) the build takes
# minutes less. FUZZ_FLAGS="" gives the cargo-fuzz defaults (ASan, release).
read -r -a flags <<<"${FUZZ_FLAGS---sanitizer none --dev}"
if [[ -n "${FUZZ_TARGETS:-}" ]]; then
    read -r -a targets <<<"$FUZZ_TARGETS"
fi
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    corpora=("corpus/$t")
    [[ -d "seeds/$t" ]] && corpora+=("seeds/$t")
    echo "== fuzz $t for ${secs}s"
    if ! cargo +nightly fuzz run "${flags[@]}" "$t" "${corpora[@]}" -- -max_total_time="$secs" -print_final_stats=1; then
        echo "fuzz target $t FAILED: see fuzz/artifacts/$t/" >&2
        exit 1
    fi
done
echo "all fuzz targets ran ${secs}s without a crash"
