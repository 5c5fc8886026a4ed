#!/usr/bin/env bash
# Real-data result on MSR Action3D (cross-subject): pre-train SkeletonCLR (joint) and 3s-CrosSCLR on
# the training subjects without labels, then linear evaluation of a random frozen encoder, of
# SkeletonCLR and of CrosSCLR (3 streams), and supervised training from scratch as the ceiling.
#
#   crossclr prepare msr --raw ../shared/data/msr-action3d/real_world_coordinates --out data/msr
#   DEVICE=cuda EPOCHS=200 bash scripts/msr_experiment.sh
#
# Env: BIN (default target/release/crossclr), DATA (data/msr), OUT (work_dirs/msr), DEVICE (cpu),
# EPOCHS (pre-training epochs, CVC-KM after half), FT_EPOCHS (supervised epochs), LIN_EPOCHS.
set -u -o pipefail
BIN=${BIN:-target/release/crossclr}
DATA=${DATA:-data/msr}
OUT=${OUT:-work_dirs/msr}
DEVICE=${DEVICE:-cpu}
EPOCHS=${EPOCHS:-200}
FT_EPOCHS=${FT_EPOCHS:-100}
LIN_EPOCHS=${LIN_EPOCHS:-100}
mkdir -p "$OUT"
T0=$(date +%s)
say() { echo "[$(($(date +%s) - T0))s] $*" | tee -a "$OUT/summary.txt"; }
DS="dataset.data=$DATA/train_position.npy dataset.label=$DATA/train_label.pkl"
EVAL="--train-data $DATA/train_position.npy --train-label $DATA/train_label.pkl --val-data $DATA/val_position.npy --val-label $DATA/val_label.pkl --layout msr20 --device $DEVICE --no-tsne"
LIN="--epochs $LIN_EPOCHS --batch 32"
step=$((EPOCHS * 4 / 5))

say "pretrain SkeletonCLR (joint), $EPOCHS epochs on $DEVICE"
"$BIN" pretrain --config configs/msr/skeletonclr_joint.yaml --device "$DEVICE" --quiet work_dir="$OUT/pre_skeletonclr" \
    num_epoch=$EPOCHS step=[$step] $DS >"$OUT/pre_skeletonclr.log" 2>&1 || say "FAILED (see pre_skeletonclr.log)"
grep "(phase" "$OUT/pre_skeletonclr.log" | sed -n '1p;$p' | tee -a "$OUT/summary.txt"
say "pretrain 3s-CrosSCLR, $EPOCHS epochs (CVC-KM after $((EPOCHS / 2))) on $DEVICE"
"$BIN" pretrain --config configs/msr/crossclr3.yaml --device "$DEVICE" --quiet work_dir="$OUT/pre_crossclr3" \
    num_epoch=$EPOCHS cross_epoch=$((EPOCHS / 2)) step=[$step] $DS >"$OUT/pre_crossclr3.log" 2>&1 || say "FAILED (see pre_crossclr3.log)"
grep "(phase" "$OUT/pre_crossclr3.log" | sed -n '1p;$p' | tee -a "$OUT/summary.txt"

say "linear: random frozen encoder (joint)"
"$BIN" linear $EVAL $LIN --weights none --streams joint --work-dir "$OUT/lin_random" 2>&1 | tail -4 | tee -a "$OUT/summary.txt"
say "linear: SkeletonCLR (joint)"
"$BIN" linear $EVAL $LIN --weights "$OUT/pre_skeletonclr/last.safetensors" --streams joint --work-dir "$OUT/lin_skeletonclr" 2>&1 | tail -4 | tee -a "$OUT/summary.txt"
say "linear: 3s-CrosSCLR (joint+motion+bone, averaged logits)"
"$BIN" linear $EVAL $LIN --weights "$OUT/pre_crossclr3/last.safetensors" --streams joint,motion,bone --work-dir "$OUT/lin_crossclr3" 2>&1 | tail -4 | tee -a "$OUT/summary.txt"
say "linear: 3s-CrosSCLR joint stream only"
"$BIN" linear $EVAL $LIN --weights "$OUT/pre_crossclr3/last.safetensors" --streams joint --work-dir "$OUT/lin_crossclr3_joint" 2>&1 | tail -4 | tee -a "$OUT/summary.txt"
say "kNN: random / SkeletonCLR / 3s-CrosSCLR"
for w in none "$OUT/pre_skeletonclr/last.safetensors" "$OUT/pre_crossclr3/last.safetensors"; do
    s=joint; case $w in *crossclr3*) s=joint,motion,bone;; esac
    "$BIN" knn $EVAL --weights "$w" --streams $s 2>&1 | tail -3 | tee -a "$OUT/summary.txt"
done
say "supervised from scratch (ceiling), $FT_EPOCHS epochs"
"$BIN" finetune $EVAL --weights none --streams joint --epochs $FT_EPOCHS --batch 32 --step $((FT_EPOCHS * 4 / 5)) \
    --work-dir "$OUT/supervised" 2>&1 | tail -4 | tee -a "$OUT/summary.txt"
say "done"
