#!/usr/bin/env bash
# The data-parallel GPU checks of docs/distributed.md in one device call (one GPU):
#   1. the NCCL test of tests/dist.rs (a 1-rank NCCL group on cuda:0: all-reduce, broadcast,
#      all-gather of CUDA and host tensors);
#   2. `crossclr pretrain` as a world-size-1 NCCL job (dist_backend=nccl, step_impl fast; and the
#      reference step with gradient buckets all-reduced during backward, bucket_cap_mb=1);
#   3. `crossclr launch --nproc 2` with Gloo on CUDA, both ranks on cuda:0 (NCCL refuses two
#      ranks on one GPU), step_impl fast and reference;
#   4. the single-process run of the same config, for the samples/s and the loss curve.
# Usage on the GPU machine (binaries built here, carried in .devbin):
#   here:  cargo build --release && mkdir -p .devbin && cp target/release/crossclr .devbin/ &&
#          cp "$(cargo test --release --test dist --no-run --message-format=json 2>/dev/null |
#                python3 -c 'import json,sys; print([json.loads(l).get("executable") for l in sys.stdin
#                if "\"dist\"" in l and json.loads(l).get("executable")][-1])')" .devbin/dist-test
#   there: BIN=.devbin/crossclr DIST_TEST=.devbin/dist-test bash scripts/device_dist.sh
# Writes logs, metrics and a summary under $OUT.
set -u -o pipefail
BIN=${BIN:-.devbin/crossclr}
DIST_TEST=${DIST_TEST:-}
OUT=${OUT:-/tmp/device_dist_out}
mkdir -p "$OUT"
TORCH_DIR=$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))')
export LD_LIBRARY_PATH="$TORCH_DIR/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
if [ -n "$DIST_TEST" ]; then
    echo "== 1. NCCL group on one GPU (tests/dist.rs)"
    timeout 120 "$DIST_TEST" nccl_group --nocapture 2>&1 | tail -n 5 | tee "$OUT/nccl_test.log"
fi
timeout 60 "$BIN" synth --out /tmp/dist_synth --classes 12 --train-per-class 171 --val-per-class 1 \
    --frames 50 --bodies 2 >/dev/null || echo "synth failed"
ARGS=(--config configs/crossclr/3s_ntu60_xview.yaml --quiet num_epoch=3 cross_epoch=2 workers=4
    save_interval=-1 log_interval=8 dataset.format=npy dataset.data=/tmp/dist_synth/train_data.npy
    dataset.label=/tmp/dist_synth/train_label.pkl dataset.layout=ntu25 dataset.mmap=false)
run() { # name, timeout, command...
    local name=$1 limit=$2
    shift 2
    local t0=$(date +%s)
    if timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; then
        echo "$name: ok in $(($(date +%s) - t0)) s"
    else
        echo "$name: FAILED (exit $?) after $(($(date +%s) - t0)) s"
        tail -n 6 "$OUT/$name.log"
    fi
    cp "/tmp/$name/metrics.csv" "$OUT/$name.csv" 2>/dev/null
    grep -h "data parallel\|step \|epoch .* loss" "/tmp/$name/log.txt" 2>/dev/null | tail -n 5
}
echo "== 2. world-size-1 NCCL job"
RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29511 \
    run nccl1 150 "$BIN" pretrain "${ARGS[@]}" --device cuda work_dir=/tmp/nccl1 dist_backend=nccl step_impl=fast
RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29512 \
    run nccl1_buckets 120 "$BIN" pretrain "${ARGS[@]}" --device cuda work_dir=/tmp/nccl1_buckets dist_backend=nccl \
    step_impl=reference bucket_cap_mb=1
echo "== 3. 2 ranks, Gloo on CUDA (both on cuda:0)"
run gloo2_fast 200 "$BIN" launch --nproc 2 --dist-timeout 120 -- pretrain "${ARGS[@]}" --device cuda:0 \
    work_dir=/tmp/gloo2_fast dist_backend=gloo step_impl=fast
run gloo2_reference 200 "$BIN" launch --nproc 2 --dist-timeout 120 -- pretrain "${ARGS[@]}" --device cuda:0 \
    work_dir=/tmp/gloo2_reference dist_backend=gloo step_impl=reference
echo "== 4. one process, same config (graph step, the single-GPU default)"
run single 150 "$BIN" pretrain "${ARGS[@]}" --device cuda work_dir=/tmp/single
for n in nccl1 nccl1_buckets gloo2_fast gloo2_reference single; do
    [ -f "$OUT/$n.csv" ] && { echo "-- $n"; cat "$OUT/$n.csv"; }
done | tee "$OUT/summary.txt"
