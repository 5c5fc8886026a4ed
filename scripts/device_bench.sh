#!/usr/bin/env bash
# One device call (<= 8 minutes, about 5-6 on an H100): our `crossclr bench` against the PyTorch
# baseline (scripts/pytorch_baseline.py) for SkeletonCLR, CrosSCLR-3 phase 1 and CrosSCLR-3 phase 2
# at batch 128, plus the CUDA parity check of the encoder against the official fixture.
#
# Usage (from the repository root on the device machine):
#   BIN=.devbin/crossclr bash scripts/device_bench.sh
# BIN is the release binary built on the CPU machine (`cargo build --release`, copied into a
# carried folder). Results: $OUT/bench.jsonl (one JSON object per run), $OUT/device_bench.log, and a
# final table on stdout. TUNED=0 skips the tuned PyTorch rows, UNFUSED=0 the rows without the fused kernels;
# TEST_BIN runs a carried test binary first; CONFIGS (default "skeletonclr-1 crossclr3-1 crossclr3-2") picks
# the model-phase pairs; ROWS=graph keeps our graph row, the "before" row (the four levers measured on 2026-11-27 off) and
# per-view streams (no eager fast / unpacked / one-stream / one-lever-off rows). EXTRA=1 adds graph runs with libtorch's default TF32 flags and with TF32 off; FULL=1 adds
# the reference and plain fast steps; PROFILE=0 skips the per-kernel profiles (PROFILE=ours: only ours, fused); BUDGET (seconds,
# default 420) skips the optional stages when time runs short. Every stage runs under `timeout`,
# so one hang cannot eat the budget.
set -u -o pipefail
BIN=${BIN:-.devbin/crossclr}
OUT=${OUT:-/tmp/device_bench_out}
PY=${PY:-python3}
ITERS=${ITERS:-20}
WARMUP=${WARMUP:-3}
STAGE_TIMEOUT=${STAGE_TIMEOUT:-60}
mkdir -p "$OUT"
JSONL="$OUT/bench.jsonl"
LOG="$OUT/device_bench.log"
: >"$JSONL"
: >"$LOG"
export PYTHONUNBUFFERED=1
T_START=$(date +%s)

say() { echo "[$(($(date +%s) - T_START))s] $*" | tee -a "$LOG"; }
# BUDGET: seconds this script may take (default 420); optional stages (profile, parity) are
# skipped when fewer than the seconds they need are left.
BUDGET=${BUDGET:-420}
have_time() { [ $(($(date +%s) - T_START + $1)) -le "$BUDGET" ]; }

# Runs one benchmark command under a timeout; its last stdout line (the JSON object) goes to $JSONL.
run_json() {
    local label=$1
    shift
    local tmp status=1
    tmp=$(mktemp)
    if timeout "$STAGE_TIMEOUT" "$@" >"$tmp" 2>>"$LOG"; then
        local line
        line=$(grep '^{' "$tmp" | tail -n 1)
        if [ -n "$line" ]; then
            echo "$line" >>"$JSONL"
            say "ok   $label"
            status=0
        else
            say "FAIL $label: no JSON output"
        fi
    else
        say "FAIL $label (exit $?; see $LOG)"
        tail -n 5 "$tmp" | tee -a "$LOG"
    fi
    rm -f "$tmp"
    # Non-zero when no row was written, so that a caller's `&& sed` never relabels the row before.
    return $status
}

# One row of our graph step (TF32, cuDNN autotuning) with a lever set by environment assignments,
# labelled "-TAG" in the JSON mode: lever_row TAG kernels.KEY=VALUE... (uses $model, $phase,
# $COMMON; the keys of a config's `kernels:` block, src/model/kernels.rs).
lever_row() {
    local tag=$1
    shift
    run_json "ours graph+tf32+cudnn $tag $model p$phase" "$BIN" bench --model "$model" --phase "$phase" \
        $COMMON --step fast --tf32 on --cudnn-benchmark on --graph on "$@" \
        && sed -i "\$ s/\"mode\":\"\\([a-z+_]*\\)\"/\"mode\":\"\\1-$tag\"/" "$JSONL"
}

say "== device"
nvidia-smi -L 2>&1 | tee -a "$LOG"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"
TORCH_DIR=$($PY -c 'import torch, os; print(os.path.dirname(torch.__file__))' 2>>"$LOG")
if [ -z "$TORCH_DIR" ]; then
    say "FATAL: $PY cannot import torch"
    exit 1
fi
export LD_LIBRARY_PATH="$TORCH_DIR/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
$PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name(0))' 2>&1 | tee -a "$LOG"

HAVE_BIN=1
if [ ! -x "$BIN" ]; then
    say "FATAL: binary $BIN missing or not executable (carry the release build)"
    HAVE_BIN=0
else
    say "== smoke test: $BIN bench on cuda (tiny)"
    if ! timeout 60 "$BIN" bench --model crossclr3 --phase 2 --batch 8 --queue-size 64 --frames 20 \
        --warmup 1 --iters 2 --device cuda --graph off --json 2>&1 | tee -a "$LOG"; then
        say "FAIL: our binary does not run on CUDA here (missing libs? ldd follows)"
        ldd "$BIN" | grep -E "not found|torch|c10" | tee -a "$LOG"
        HAVE_BIN=0
    fi
    if [ $HAVE_BIN = 1 ]; then
        say "== smoke test: CUDA graph capture (tiny)"
        timeout 60 "$BIN" bench --model crossclr3 --phase 2 --batch 8 --queue-size 64 --frames 20 \
            --warmup 1 --iters 2 --device cuda --graph on --json 2>&1 | tee -a "$LOG" ||
            say "FAIL: graph capture (the graph rows below will fail too)"
    fi
fi

# TEST_BIN: a carried test binary (e.g. tests/gpu_step.rs's) whose CUDA tests run here first.
if [ -n "${TEST_BIN:-}" ] && [ -x "$TEST_BIN" ]; then
    say "== CUDA tests: $TEST_BIN"
    timeout 120 "$TEST_BIN" --test-threads=1 --nocapture 2>&1 | tail -n 20 | tee -a "$LOG" || say "FAIL: CUDA tests"
fi

COMMON="--batch 128 --warmup $WARMUP --iters $ITERS --device cuda --json"
for cfg in ${CONFIGS:-skeletonclr-1 crossclr3-1 crossclr3-2}; do
    model=${cfg%-*}
    phase=${cfg##*-}
    say "== $model phase $phase"
    run_json "pytorch eager $model p$phase" $PY scripts/pytorch_baseline.py --model "$model" --phase "$phase" --mode eager \
        --batch 128 --warmup "$WARMUP" --iters "$ITERS" --device cuda --json
    if [ "${TUNED:-1}" = 1 ]; then
        run_json "pytorch tuned $model p$phase" $PY scripts/pytorch_baseline.py --model "$model" --phase "$phase" --mode tuned \
            --batch 128 --warmup "$WARMUP" --iters "$ITERS" --device cuda --json
    fi
    # The official code itself, unchanged (scripts/bench_official.py), where a checkout was carried:
    # OFFICIAL_DIR (default .official, git-ignored) holds LinguoLi/CrosSCLR's net/ folder.
    if [ -d "${OFFICIAL_DIR:-.official}/net" ]; then
        run_json "official eager $model p$phase" $PY scripts/bench_official.py --official-dir "${OFFICIAL_DIR:-.official}" \
            --model "$model" --phase "$phase" --mode eager --batch 128 --warmup "$WARMUP" --iters "$ITERS" --device cuda --json
    fi
    if [ $HAVE_BIN = 1 ]; then
        # Rows measured in earlier runs (docs/results/h200_bench.jsonl); FULL=1 repeats them.
        if [ "${FULL:-0}" = 1 ]; then
            run_json "ours reference $model p$phase" "$BIN" bench --model "$model" --phase "$phase" $COMMON --step reference \
                --tf32 default --cudnn-benchmark off
            run_json "ours fast $model p$phase" "$BIN" bench --model "$model" --phase "$phase" $COMMON --step fast \
                --graph off --tf32 default --cudnn-benchmark off
        fi
        [ "${ROWS:-all}" = all ] && run_json "ours fast+tf32+cudnn $model p$phase" "$BIN" bench --model "$model" --phase "$phase" $COMMON --step fast \
            --tf32 on --cudnn-benchmark on --graph off
        run_json "ours graph+tf32+cudnn $model p$phase" "$BIN" bench --model "$model" --phase "$phase" $COMMON --step fast \
            --tf32 on --cudnn-benchmark on --graph on
        # The same with the graph products on unpacked 25-joint rows (kernels.agg_pack=off: cuBLAS
        # align1 kernels), to measure what the row packing brings.
        [ "${ROWS:-all}" = all ] && lever_row unpacked kernels.agg_pack=off
        # Unfolded conv biases (kernels.fold_bias=off; default on CUDA since 2026-11-27). The other
        # levers of that call (four-wide kernels, graph-timed choice, GCN bias in the product) won
        # and are no longer switches (removed 2026-12-07, src/model/kernels.rs).
        [ "${ROWS:-all}" = all ] && lever_row unfolded kernels.fold_bias=off
        # The same without side streams (kernels.view_streams=off: every query / key pass on one
        # stream), to measure what running the views' encoders concurrently brings.
        [ "${ROWS:-all}" = all ] && lever_row one-stream kernels.view_streams=off
        # One side stream per pass instead of the default one per view (kernels.view_streams=passes:
        # ~2 % faster on an H100 on 2026-11-27, ~10 % more reserved memory, above PyTorch's).
        [ "$model" != skeletonclr ] && lever_row per-pass-streams kernels.view_streams=passes
        # Without the earlier levers (kernels.fused_cuda=off: batch norm, ReLU, dropout, residual
        # add as separate libtorch kernels; kernels.agg_op=off: the graph product + permuting copy),
        # i.e. the step measured on 2026-11-26, to measure what they bring together.
        [ "${UNFUSED:-1}" = 1 ] && lever_row unfused kernels.fused_cuda=off kernels.agg_op=off
        if [ "${EXTRA:-0}" = 1 ]; then
            run_json "ours graph (libtorch defaults) $model p$phase" "$BIN" bench --model "$model" --phase "$phase" $COMMON \
                --step fast --graph on --tf32 default --cudnn-benchmark off
            # TF32 off: cuDNN's fp32 kernels may work on NCHW directly, without the NCHW<->NHWC
            # transposes its TF32 kernels need (9 % of the step in the 2026-11-27 profile).
            run_json "ours graph tf32=off $model p$phase" "$BIN" bench --model "$model" --phase "$phase" $COMMON \
                --step fast --tf32 off --cudnn-benchmark on --graph on
        fi
    fi
done

# Per-kernel breakdown (libtorch's Kineto profiler; eager fast step, since per-kernel times inside
# CUDA graphs are not reliable before CUDA 13.1): ours with and without the fused CUDA kernels,
# and the PyTorch baseline. Traces stay in /tmp (large); tables (.txt) and rows (.jsonl) go to $OUT.
# PROFILE=ours: only our step with the fused kernels (the table goes into the log), about 10 s per
# configuration instead of ~30.
PROFILE=${PROFILE:-1}
if [ "$PROFILE" != 0 ] && ! have_time 120; then
    say "skip profile: budget ($BUDGET s) nearly spent"
elif [ "$PROFILE" != 0 ]; then
    PROF=/tmp/crossclr_prof
    mkdir -p "$PROF" "$OUT/profile"
    for cfg in "skeletonclr 1" "crossclr3 2"; do
        set -- $cfg
        say "== profile $1 phase $2"
        if [ $HAVE_BIN = 1 ]; then
            fused_modes="on off"
            [ "$PROFILE" = ours ] && fused_modes=on
            for fused in $fused_modes; do
                tag="ours_${1}_p$2_fused-$fused"
                timeout "$STAGE_TIMEOUT" "$BIN" bench \
                    --model "$1" --phase "$2" --batch 128 --warmup "$WARMUP" --iters 3 --device cuda --step fast \
                    --graph off --tf32 on --cudnn-benchmark on --profile "$PROF/$tag.json" --profile-steps 3 --json \
                    "kernels.fused_cuda=$([ $fused = on ] && echo timed || echo off)" "kernels.agg_op=$fused" \
                    >>"$LOG" 2>&1 || say "FAIL profile $tag"
                cp "$PROF/$tag.txt" "$PROF/$tag.jsonl" "$OUT/profile/" 2>/dev/null
            done
        fi
        tag="pytorch_${1}_p$2_tuned"
        [ "$PROFILE" = ours ] || timeout "$STAGE_TIMEOUT" $PY scripts/pytorch_baseline.py --model "$1" --phase "$2" --mode tuned --batch 128 \
            --warmup "$WARMUP" --iters 3 --device cuda --json --profile "$PROF/$tag.json" --profile-steps 3 \
            >>"$LOG" 2>&1 || say "FAIL profile $tag"
        cp "$PROF/$tag.json.txt" "$OUT/profile/$tag.txt" 2>/dev/null
        head -n 45 "$OUT/profile/ours_${1}_p$2_fused-on.txt" 2>/dev/null | cut -c1-160 | tee -a "$LOG"
    done
    if [ "$PROFILE" != ours ] && [ -f scripts/profile_summary.py ]; then
        $PY scripts/profile_summary.py "$PROF/ours_skeletonclr_p1_fused-on.json" "$PROF/pytorch_skeletonclr_p1_tuned.json" --steps 3 3 \
            >"$OUT/profile/skeletonclr_side_by_side.txt" 2>&1 || true
    fi
fi

if [ $HAVE_BIN = 1 ] && [ -d tests/fixtures/official ] && ! have_time 30; then
    say "skip parity: budget ($BUDGET s) nearly spent"
elif [ $HAVE_BIN = 1 ] && [ -d tests/fixtures/official ]; then
    say "== parity: encoder on CUDA vs the official fixture"
    for tf in off default on; do
        timeout 60 "$BIN" bench --parity-fixture tests/fixtures/official --device cuda --tf32 "$tf" --json \
            2>>"$LOG" | grep '^{' | tee -a "$JSONL" || say "FAIL parity (tf32 $tf)"
    done
fi

say "== table"
$PY - "$JSONL" <<'EOF' | tee -a "$LOG"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
bench = [r for r in rows if 'ms_median' in r]
for r in rows:
    if 'parity' in r:
        print(f"parity {r.get('device_name','?')}: tf32 {r.get('tf32')} {r.get('tf32_state')}: "
              f"train vs fixture rel {r.get('train_rel_diff'):.3g}, eval vs CPU rel {r.get('eval_rel_diff'):.3g} "
              f"(max abs {r.get('max_abs_diff'):.3g}; eval vs fixture rel {r.get('eval_fixture_rel_diff'):.3g}) "
              f"tol {r.get('tolerance'):g} -> {'PASS' if r.get('pass') else 'FAIL'}")
keys = sorted({(r['model'], r['phase']) for r in bench}, key=lambda k: (k[0] != 'skeletonclr', k))
def label(r):
    if r['impl'] in ('pytorch', 'official'):
        return r['impl'] + ' ' + r['mode']
    m = r['mode'] + ('' if r['tf32'] == 'default' else ' tf32=' + r['tf32'])
    return 'ours ' + m + (' cudnn-bench' if r['cudnn_benchmark'] else '')
print(f"{'model':<12}{'ph':>3}  {'run':<40}{'ms med':>9}{'ms min':>9}{'pipel.':>9}{'peak MiB':>10}{'resv MiB':>10}{'eager/x':>9}{'tuned/x':>9}")
for key in keys:
    rs = [r for r in bench if (r['model'], r['phase']) == key]
    eager = next((r['ms_median'] for r in rs if r['impl'] == 'pytorch' and r['mode'] == 'eager'), None)
    tuned = next((r['ms_median'] for r in rs if r['impl'] == 'pytorch' and r['mode'] == 'tuned'), None)
    for r in rs:
        ms = r['ms_median']
        pip = r.get('ms_pipelined')
        peak = (r.get('peak_bytes') or 0) / 2**20
        resv = (r.get('peak_reserved_bytes') or 0) / 2**20
        e = f"{eager / ms:.2f}" if eager else '-'
        t = f"{tuned / ms:.2f}" if tuned else '-'
        print(f"{key[0]:<12}{key[1]:>3}  {label(r):<40}{ms:9.2f}{r['ms_min']:9.2f}"
              f"{(f'{pip:9.2f}' if pip else '        -')}{peak:10.1f}{resv:10.1f}{e:>9}{t:>9}")
print("eager/x, tuned/x: PyTorch eager / tuned median ms over this row's median ms (> 1 = faster than PyTorch)")
seen = set()
for r in bench:
    ops = r.get('fused_cuda_ops') or []
    timing = ops[0].get('timing', 'wall') if ops else 'wall'
    if not ops or (r['model'], timing) in seen:
        continue
    seen.add((r['model'], timing))
    what = 'device ms per captured fwd+bwd' if timing == 'graph' else 'fwd+bwd ms per eager call'
    print(f"fused CUDA kernels vs tch ops, {what} ({r['model']} p{r['phase']}, {r['mode']}):")
    for o in ops:
        print(f"  {o['op']:<24}{str(o['shape']):<26}fused {o['fused_ms']:8.3f}  tch {o['native_ms']:8.3f}  -> {'fused' if o['fused'] else 'tch'}")
print("peak MiB: max allocated in the timed region; resv MiB: max reserved (compare graph rows on this one)")
EOF
say "done in $(($(date +%s) - T_START)) s; JSON in $JSONL"
