#!/usr/bin/env bash
# The official recipe at small scale, official code beside ours (issue 14 item 7): SkeletonCLR
# (joint) on MSR Action3D cross-subject (284 train / 273 test, layout msr20), the same scaled
# recipe, data and seeds for both implementations:
#   official: scripts/official_small_scale.py (the LinguoLi/CrosSCLR classes, runtime patches only)
#   ours:     crossclr pretrain --config configs/msr/skeletonclr_joint.yaml + overrides below
# Recipe: hidden_channels 16, hidden_dim 256, feature_dim 128, mlp, dropout 0.5, queue 128, key
# momentum 0.995, T 0.07, edge importance; SGD lr 0.03 (momentum 0.9, wd 1e-4, no nesterov, no lr
# step); batch 16, drop_last, shuffled; temporal crop (padding ratio 6) + shear 0.5; official
# weights_init; key encoder starting as a copy of the query encoder; $EPOCHS epochs; seeds $SEEDS.
# Both encoders are then evaluated by the same commands of our evaluator: k-NN (k=1, weighted
# k=20), linear probe with standardised features (--standardize on) and the official probe
# (--standardize off), batch 32, last-epoch top-1; plus a random encoder (--weights none) per seed.
#
#   scripts/official_small_scale.sh            # writes docs/results/official_small_scale_msr.tsv
# Env: OFFICIAL_DIR (/tmp/official: a LinguoLi/CrosSCLR checkout), DATA (/work/exp/msr), EPOCHS (20),
#      SEEDS ("0 1 2"), OUT (work_dirs/official_small_scale), TSV (docs/results/official_small_scale_msr.tsv),
#      PY (.venv/bin/python), BIN (target/release/crossclr), NICE (10).
# Everything runs single-threaded (OMP_NUM_THREADS=1, torch.set_num_threads(1), --threads 1) under
# nice. Columns: impl, seed, knn1, knn20, linear_std_last, linear_official_last (top-1 %, last
# epoch), final_loss (mean loss of the last epoch), seconds (wall-clock of the pre-training process,
# start-up included); then rows `mean` and `sd` (sample standard deviation over the seeds) per impl.
set -u -o pipefail
cd "$(dirname "$0")/.."
OFFICIAL_DIR=${OFFICIAL_DIR:-/tmp/official}
DATA=${DATA:-/work/exp/msr}
EPOCHS=${EPOCHS:-20}
SEEDS=${SEEDS:-0 1 2}
OUT=${OUT:-work_dirs/official_small_scale}
TSV=${TSV:-docs/results/official_small_scale_msr.tsv}
PY=${PY:-.venv/bin/python}
BIN=${BIN:-target/release/crossclr}
NICE=${NICE:-10}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
N="nice -n $NICE"
TR=$DATA/train_position.npy TL=$DATA/train_label.pkl VA=$DATA/val_position.npy VL=$DATA/val_label.pkl
EVAL=(--train-data "$TR" --train-label "$TL" --val-data "$VA" --val-label "$VL" --layout msr20
      --streams joint --threads 1 --no-tsne)
mkdir -p "$OUT" "$(dirname "$TSV")"
rows=$OUT/rows.tsv
printf 'impl\tseed\tknn1\tknn20\tlinear_std_last\tlinear_official_last\tfinal_loss\tseconds\n' >"$rows"

now() { date +%s.%N; }
json() { "$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); print($2)" "$1"; }

# evaluate <run dir> <weights> <prefix args...>: knn, linear on, linear off -> "knn1 knn20 std off"
evaluate() {
  local run=$1 w=$2 seed=$3
  shift 3
  $N "$BIN" knn "${EVAL[@]}" --weights "$w" "$@" --seed "$seed" --work-dir "$run/knn" \
    --feature-cache "$run/features" >"$run/knn.log" 2>&1 || { echo "knn failed: $run" >&2; exit 1; }
  for s in on off; do
    $N "$BIN" linear "${EVAL[@]}" --weights "$w" "$@" --seed "$seed" --batch 32 --standardize $s \
      --work-dir "$run/linear_$s" --feature-cache "$run/features" >"$run/linear_$s.log" 2>&1 ||
      { echo "linear failed: $run" >&2; exit 1; }
  done
  printf '%.2f\t%.2f\t%.2f\t%.2f' \
    "$(json "$run/knn/metrics.json" "dict(d['results'])['k1']['top1']")" \
    "$(json "$run/knn/metrics.json" "[r for n, r in d['results'] if n.startswith('k20')][0]['top1']")" \
    "$(json "$run/linear_on/metrics.json" "d['last']['test']['top1']")" \
    "$(json "$run/linear_off/metrics.json" "d['last']['test']['top1']")"
}

for seed in $SEEDS; do
  # official
  run=$OUT/official_s$seed
  rm -rf "$run"; mkdir -p "$run"
  t0=$(now)
  $N "$PY" scripts/official_small_scale.py --official-dir "$OFFICIAL_DIR" --seed "$seed" --epochs "$EPOCHS" \
    --data "$TR" --label "$TL" --out "$run/train" --threads 1 >"$run/train.log" 2>&1 ||
    { echo "official training failed: $run/train.log" >&2; exit 1; }
  sec=$("$PY" -c "print(f'{$(now) - $t0:.1f}')")
  loss=$(json "$run/train/summary.json" "f\"{d['final_loss']:.4f}\"")
  printf 'official\t%s\t%s\t%s\t%s\n' "$seed" "$(evaluate "$run" "$run/train/model.pt" "$seed" --prefix encoder_q.)" \
    "$loss" "$sec" >>"$rows"
  tail -1 "$rows"

  # ours
  run=$OUT/ours_s$seed
  rm -rf "$run"; mkdir -p "$run"
  t0=$(now)
  $N "$BIN" pretrain --config configs/msr/skeletonclr_joint.yaml --quiet work_dir="$run/train" seed="$seed" \
    num_epoch="$EPOCHS" step=[] batch_size=16 model_args.queue_size=128 model_args.momentum=0.995 \
    model_args.Temperature=0.07 model_args.feature_dim=128 model_args.hidden_channels=16 \
    model_args.hidden_dim=256 model_args.dropout=0.5 model_args.mlp=true \
    model_args.edge_importance_weighting=true base_lr=0.03 weight_decay=1.0e-4 sgd_momentum=0.9 \
    nesterov=false shared_head=true independent_key_init=false init=official lr_schedule=step \
    warmup_epochs=0 train_feeder_args.shear_amplitude=0.5 train_feeder_args.temperal_padding_ratio=6 \
    diagnostics.interval=0 eval_interval=-1 save_interval="$EPOCHS" dataset.data="$TR" \
    dataset.label="$TL" dataset.layout=msr20 device=cpu workers=1 >"$run/train.log" 2>&1 ||
    { echo "our training failed: $run/train.log" >&2; exit 1; }
  sec=$("$PY" -c "print(f'{$(now) - $t0:.1f}')")
  loss=$("$PY" -c "import csv,sys; print(f\"{float(list(csv.DictReader(open(sys.argv[1])))[-1]['loss']):.4f}\")" \
    "$run/train/metrics.csv")
  printf 'ours\t%s\t%s\t%s\t%s\n' "$seed" "$(evaluate "$run" "$run/train/last.safetensors" "$seed")" \
    "$loss" "$sec" >>"$rows"
  tail -1 "$rows"

  # random encoder
  run=$OUT/random_s$seed
  rm -rf "$run"; mkdir -p "$run"
  printf 'random\t%s\t%s\t-\t-\n' "$seed" "$(evaluate "$run" none "$seed")" >>"$rows"
  tail -1 "$rows"
done

# mean and sample sd per impl
"$PY" - "$rows" "$TSV" <<'EOF'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter='\t'))
cols = ['knn1', 'knn20', 'linear_std_last', 'linear_official_last', 'final_loss', 'seconds']
out = [rows[0].keys()] if rows else []
with open(sys.argv[2], 'w') as f:
    f.write('\t'.join(['impl', 'seed'] + cols) + '\n')
    for r in rows:
        f.write('\t'.join(r[c] for c in ['impl', 'seed'] + cols) + '\n')
    for impl in dict.fromkeys(r['impl'] for r in rows):
        sel = [r for r in rows if r['impl'] == impl]
        for stat in ['mean', 'sd']:
            vals = []
            for c in cols:
                xs = [float(r[c]) for r in sel if r[c] != '-']
                if not xs or (stat == 'sd' and len(xs) < 2):
                    vals.append('-')
                    continue
                v = statistics.mean(xs) if stat == 'mean' else statistics.stdev(xs)
                vals.append(f'{v:.4f}' if c == 'final_loss' else f'{v:.2f}')
            f.write('\t'.join([impl, stat] + vals) + '\n')
print(open(sys.argv[2]).read())
EOF
