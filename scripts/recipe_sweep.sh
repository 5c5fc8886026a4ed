#!/usr/bin/env bash
# One recipe, several seeds: pre-train, then k-NN (k=1, weighted k=20) and linear evaluation of the
# pre-trained encoder, appending one row per seed to $OUT/results.tsv. A tag `random` (or `random_*`) skips
# pre-training and evaluates a randomly initialised encoder (seeded by the seed) instead.
#
#   scripts/recipe_sweep.sh <synth|msr> <tag> <config.yaml> "<seeds>" [key=value overrides...]
#   e.g. scripts/recipe_sweep.sh msr small configs/small/skeletonclr_msr.yaml "0 1 2"
#
# Columns: k-NN top-1 (k=1, weighted k=20), linear top-1 with the official probe (last epoch, best
# over test) under `--standardize auto` (on for a random encoder only), and linear top-1 (last
# epoch) with `--standardize on`.
# Env: BIN (target/release/crossclr), OUT (work_dirs/sweep), DATA_SYNTH (data/synth: made with
# `crossclr synth`, see docs/small-data.md), DATA_MSR (data/msr: `crossclr prepare msr`), STREAMS
# (joint; `joint,motion,bone` for 3s-CrosSCLR), PREFIX (extra `--prefix` for knn/linear, e.g.
# `motion=encoder_q.` for a SkeletonCLR trained on the motion view), LIN (extra `crossclr linear`
# flags), DEVICE (cpu), STD_ONLY=1 (skip the official-probe linear run: its columns read `-`).
set -u -o pipefail
BIN=${BIN:-target/release/crossclr}
OUT=${OUT:-work_dirs/sweep}
DEVICE=${DEVICE:-cpu}
STREAMS=${STREAMS:-joint}
LIN=${LIN:-}
PREFIX=${PREFIX:-}
STD_ONLY=${STD_ONLY:-0}
PFX=()
[ -n "$PREFIX" ] && PFX=(--prefix "$PREFIX")
ds=$1 tag=$2 config=$3 seeds=$4
shift 4
case $ds in
  synth) D=${DATA_SYNTH:-data/synth}; TR=$D/train_data.npy; TL=$D/train_label.pkl; VA=$D/val_data.npy; VL=$D/val_label.pkl; LAYOUT=ntu25 ;;
  msr) D=${DATA_MSR:-data/msr}; TR=$D/train_position.npy; TL=$D/train_label.pkl; VA=$D/val_position.npy; VL=$D/val_label.pkl; LAYOUT=msr20 ;;
  *) echo "dataset must be synth or msr" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
[ -f "$OUT/results.tsv" ] || printf 'dataset\ttag\tseed\tstreams\tknn1\tknn20\tlinear_last\tlinear_best\tlinear_std_last\tfinal_loss\tseconds\toverrides\n' >"$OUT/results.tsv"
EVAL="--train-data $TR --train-label $TL --val-data $VA --val-label $VL --layout $LAYOUT --device $DEVICE"
for seed in $seeds; do
  run=$OUT/${ds}_${tag}_s$seed
  rm -rf "$run"
  t0=$(date +%s)
  loss=-
  if [ "${tag%%_*}" = random ]; then
    W=none
  else
    "$BIN" pretrain --config "$config" --device "$DEVICE" --quiet work_dir="$run" seed="$seed" \
      dataset.data="$TR" dataset.label="$TL" dataset.layout=$LAYOUT "$@" >"$run.pretrain.log" 2>&1 \
      || { echo "pretrain failed: $run.pretrain.log" >&2; tail -3 "$run.pretrain.log" >&2; continue; }
    W=$run/last.safetensors
    loss=$(grep -o 'loss [0-9.]*' "$run/log.txt" | tail -1 | cut -d' ' -f2)
  fi
  knn=$("$BIN" knn $EVAL --weights "$W" --streams "$STREAMS" "${PFX[@]}" --seed "$seed" 2>&1)
  k1=$(echo "$knn" | grep ' k1:' | grep -o 'top-1 *[0-9.]*' | grep -o '[0-9.]*$')
  k20=$(echo "$knn" | grep 'k20' | grep -o 'top-1 *[0-9.]*' | grep -o '[0-9.]*$')
  last=- best=-
  if [ "$STD_ONLY" != 1 ]; then
    lin=$("$BIN" linear $EVAL --weights "$W" --streams "$STREAMS" "${PFX[@]}" --seed "$seed" --batch 32 --no-tsne $LIN --work-dir "$run.linear" 2>&1)
    echo "$lin" >"$run.linear.log"
    last=$(echo "$lin" | grep -i 'last' | grep -o 'top-1 *[0-9.]*' | head -1 | grep -o '[0-9.]*$')
    best=$(echo "$lin" | grep -i 'best' | grep -o 'top-1 *[0-9.]*' | head -1 | grep -o '[0-9.]*$')
  fi
  # The same probe with standardised features (BatchNorm without affine; what a random encoder
  # gets by default, `--standardize auto`), for a like-for-like comparison.
  std=$("$BIN" linear $EVAL --weights "$W" --streams "$STREAMS" "${PFX[@]}" --seed "$seed" --batch 32 --no-tsne --standardize on $LIN 2>&1 \
    | grep -i 'last' | grep -o 'top-1 *[0-9.]*' | head -1 | grep -o '[0-9.]*$')
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$ds" "$tag" "$seed" "$STREAMS" "${k1:-?}" "${k20:-?}" "${last:-?}" "${best:-?}" "${std:-?}" "$loss" $(( $(date +%s) - t0 )) "$*" | tee -a "$OUT/results.tsv"
done
