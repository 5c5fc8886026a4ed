#!/usr/bin/env bash
# The whole GPU check in one device call: scripts/device_bench.sh (our step vs the PyTorch
# baseline, parity on CUDA), then the throughput of a real `pretrain` loop (CrosSCLR-3, batch 128,
# NTU-shaped synthetic data, loader workers on the host) to compare with the step benchmark.
# Usage on the GPU machine: BIN=.devbin/crossclr bash scripts/device_run.sh
# (LOADER=0 skips the loader bench; PROFILE=0, FULL=1, EXTRA=1 pass on to device_bench.sh)
set -u -o pipefail
BIN=${BIN:-.devbin/crossclr}
OUT=${OUT:-/tmp/device_run_out}
export OUT
mkdir -p "$OUT"
# device_bench.sh gets all but ~130 s of the run's budget (RUN_BUDGET, default 520 s, for a
# 540 s device call); the loop and the loader stages below need about that much.
RUN_BUDGET=${RUN_BUDGET:-520}
T_RUN=$(date +%s)
BUDGET=$((RUN_BUDGET - 130)) bash scripts/device_bench.sh
TORCH_DIR=$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))')
export LD_LIBRARY_PATH="$TORCH_DIR/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "== whole-loop throughput: crossclr pretrain, CrosSCLR-3, batch 128, 4,104 NTU-shaped sequences (32 steps/epoch)"
timeout 90 "$BIN" synth --out /tmp/ntu_synth --classes 12 --train-per-class 342 --val-per-class 1 \
    --frames 50 --bodies 2 >/dev/null || echo "synth failed"
# Same numeric modes as the bench's graph+tf32+cudnn rows, so that loop and step compare directly.
LOOP_ARGS=(--config configs/crossclr/3s_ntu60_xview.yaml --device cuda --quiet workers=8 save_interval=100
    tf32=on cudnn_benchmark=true
    dataset.format=npy dataset.data=/tmp/ntu_synth/train_data.npy dataset.label=/tmp/ntu_synth/train_label.pkl
    dataset.layout=ntu25 dataset.mmap=false)
for phase in 1 2; do
    cross=$([ $phase = 1 ] && echo 10 || echo 0)
    if ! timeout 75 "$BIN" pretrain "${LOOP_ARGS[@]}" work_dir=/tmp/loop$phase num_epoch=3 cross_epoch=$cross \
        >"$OUT/loop$phase.log" 2>&1; then
        echo "loop phase $phase failed (see loop$phase.log); again with kernels.view_streams=off"
        tail -n 4 "$OUT/loop$phase.log"
        rm -rf /tmp/loop$phase
        timeout 75 "$BIN" pretrain "${LOOP_ARGS[@]}" work_dir=/tmp/loop$phase num_epoch=3 \
            cross_epoch=$cross kernels.view_streams=off >"$OUT/loop${phase}_one_stream.log" 2>&1 || echo "loop phase $phase failed again"
    fi
    cp /tmp/loop$phase/metrics.csv "$OUT/loop_phase$phase.csv" 2>/dev/null
    cp /tmp/loop$phase/log.txt "$OUT/loop_phase${phase}_log.txt" 2>/dev/null
    grep -h "(phase\|fused CUDA\|graph\|captur" /tmp/loop$phase/log.txt "$OUT/loop$phase.log" 2>/dev/null | tail -12
done
# Resume with the graph step: phase 1 run extended by one epoch from its last checkpoint.
if [ $(($(date +%s) - T_RUN + 60)) -le "$RUN_BUDGET" ]; then
    timeout 50 "$BIN" pretrain "${LOOP_ARGS[@]}" work_dir=/tmp/loop1 num_epoch=4 cross_epoch=10 --resume \
        >"$OUT/loop1_resume.log" 2>&1 || echo "loop resume failed (see loop1_resume.log)"
    cp /tmp/loop1/metrics.csv "$OUT/loop_phase1_resumed.csv" 2>/dev/null
    tail -n 2 "$OUT/loop_phase1_resumed.csv" 2>/dev/null
fi
if [ "${LOADER:-1}" != 1 ]; then
    exit 0
fi
if [ $(($(date +%s) - T_RUN + 40)) -gt "$RUN_BUDGET" ]; then
    echo "skip loader bench: run budget ($RUN_BUDGET s) spent"
    exit 0
fi
echo "== data pipeline alone: crossclr bench --loader (samples/s per worker count, pinned vs pageable copy)"
timeout 90 "$BIN" bench --loader --config configs/crossclr/3s_ntu60_xview.yaml --synthetic-samples 4096 \
    --device cuda --workers 1,4,16 --warmup 16 --batches 100 --repeats 2 --json \
    >"$OUT/loader.jsonl" 2>"$OUT/loader.log" || echo "loader bench failed (see loader.log)"
grep '^{' "$OUT/loader.jsonl" | python3 -c '
import json, sys
for l in sys.stdin:
    r = json.loads(l)
    print({k: r.get(k) for k in ("workers", "host_memory", "pin", "samples_per_s", "ms_per_batch", "pinned_checked") if k in r})
' 2>/dev/null | head -12
