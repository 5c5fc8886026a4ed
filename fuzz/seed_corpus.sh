#!/usr/bin/env bash
# Writes the seed corpora of the cargo-fuzz targets into fuzz/corpus/<target>/ from the built-in
# seeds (crossclr::fuzz::seeds, via the fuzz_readers test with CROSSCLR_FUZZ_SEEDS_OUT), the
# test fixtures and the kept findings. Run from the repository root.
set -euo pipefail
out=fuzz/corpus
mkdir -p "$out"
CROSSCLR_FUZZ_SEEDS_OUT="$PWD/$out" cargo test --test fuzz_readers write_seed_corpus -- --ignored
for f in tests/fixtures/ntu/*.skeleton; do cp "$f" "$out/skeleton/"; done
cp tests/fixtures/official/stgcn_official_seed0_input.npy "$out/npy/"
cp tests/fixtures/step_parity/skeletonclr.npz "$out/npz/"
mkdir -p "$out/pyskl" && cp tests/fixtures/generic/*.pkl "$out/pyskl/"
for d in tests/fixtures/fuzz/*/; do t=$(basename "$d"); mkdir -p "$out/$t"; cp "$d"* "$out/$t/" 2>/dev/null || true; done
