#!/usr/bin/env bash
# CPU step benchmark, side by side on this machine, one configuration after the other:
#   ours      = target/release/crossclr bench (build it first: cargo build --release)
#   pytorch   = scripts/pytorch_baseline.py (faithful re-implementation of the official step)
#   official  = scripts/bench_official.py on the official code itself, when a checkout of
#               LinguoLi/CrosSCLR (its net/ folder) is at $OFFICIAL_DIR (default .official)
# for SkeletonCLR and CrosSCLR-3 phase 1 / phase 2 at $BATCH (default 128).
# Each run also records the process's user+sys CPU seconds (GNU time), which is less sensitive to
# other load on the machine than wall-clock time. Results: $OUT/cpu_bench.jsonl and a table.
#
# Usage: scripts/cpu_bench.sh            (env: BATCH, WARMUP, ITERS, MODELS, OUT, OFFICIAL_DIR)
set -u -o pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/crossclr}
PY=${PY:-.venv/bin/python}
BATCH=${BATCH:-128}
WARMUP=${WARMUP:-1}
ITERS=${ITERS:-3}
MODELS=${MODELS:-"skeletonclr:1 crossclr3:1 crossclr3:2"}
OUT=${OUT:-work_dirs/cpu_bench}
OFFICIAL_DIR=${OFFICIAL_DIR:-.official}
mkdir -p "$OUT"
JSONL="$OUT/cpu_bench.jsonl"
: >"$JSONL"

# run <label> <command...>: appends the command's JSON line plus cpu_seconds to $JSONL.
run() {
    local label=$1
    shift
    local tmp times
    tmp=$(mktemp)
    times=$(mktemp)
    echo "== $label" >&2
    if /usr/bin/time -f "%U %S" -o "$times" "$@" >"$tmp"; then
        local line cpu
        line=$(grep '^{' "$tmp" | tail -n 1)
        cpu=$(awk '{print $1 + $2}' "$times")
        if [ -n "$line" ]; then
            echo "$line" | "$PY" -c 'import json,sys; r=json.loads(sys.stdin.read()); r["label"]=sys.argv[1]; r["cpu_seconds_total"]=float(sys.argv[2]); print(json.dumps(r))' "$label" "$cpu" >>"$JSONL"
        fi
    else
        echo "FAILED: $label" >&2
    fi
    rm -f "$tmp" "$times"
}

for spec in $MODELS; do
    model=${spec%%:*}
    phase=${spec##*:}
    common=(--model "$model" --phase "$phase" --batch "$BATCH" --warmup "$WARMUP" --iters "$ITERS" --json)
    run "ours $model p$phase" "$BIN" bench "${common[@]}" --device cpu
    run "pytorch $model p$phase" "$PY" scripts/pytorch_baseline.py "${common[@]}" --device cpu --mode eager
    if [ -d "$OFFICIAL_DIR/net" ]; then
        run "official $model p$phase" "$PY" scripts/bench_official.py --official-dir "$OFFICIAL_DIR" "${common[@]}" --device cpu
    fi
done

"$PY" - "$JSONL" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(f"{'run':<26}{'batch':>6}{'ms median':>11}{'ms min':>10}{'CPU s (all)':>13}{'peak MiB':>10}{'pytorch/x':>11}{'official/x':>12}")
for r in rows:
    key = (r['model'], r['phase'])
    ref = {x['impl']: x['ms_median'] for x in rows if (x['model'], x['phase']) == key}
    ms = r['ms_median']
    ratio = lambda impl: f"{ref[impl] / ms:.2f}" if impl in ref else '-'
    print(f"{r['label']:<26}{r['batch']:>6}{ms:11.0f}{r['ms_min']:10.0f}{r['cpu_seconds_total']:13.1f}"
          f"{(r.get('peak_bytes') or 0) / 2**20:10.0f}{ratio('pytorch'):>11}{ratio('official'):>12}")
print("pytorch/x, official/x: that implementation's median ms over this row's (> 1 = this row is faster)")
EOF
