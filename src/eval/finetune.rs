//! Fine-tuning (reference §7.4): the whole encoder plus per-stream `Linear(D, classes)` heads
//! (logits averaged over streams) trained with labels by SGD. Used by `crossclr finetune` (all
//! labels; `--weights none` = supervised from scratch, the ceiling baseline) and `crossclr semi`
//! (a class-balanced 1% / 10% labelled subset). Neither protocol is in the CrosSCLR repository; the
//! defaults follow the AimCLR lineage: lr 0.1, momentum 0.9, weight decay 1e-4, step x0.1.
//!
//! Batch norm: by default the encoder trains in train mode (batch statistics, dropout), the usual
//! supervised practice. `BnMode::Eval` is AimCLR's `finetune_evaluation.py` variant: the model stays
//! in `eval()` mode while all weights train (frozen running statistics, no dropout).
use crate::data::augment::AugmentConfig;
use crate::data::dataset::SkeletonDataset;
use crate::data::loader::{batches_per_epoch, try_epoch_batches, LoaderConfig};
use crate::error::{Error, Result};
use crate::eval::args::Splits;
use crate::eval::encoder::StreamEncoder;
use crate::eval::features::{extract, progress, FeatureSet};
use crate::eval::linear::{is_eval_epoch, select, step_lr, EpochRecord, LinearHeads, Sgd};
use crate::eval::metrics;
use crate::eval::protocol::{
    EncoderSetup, OutputOptions, Reported, TrainSummary, TEST_SELECTION, VAL_SELECTION,
};
use crate::eval::{report, split};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// Batch-norm behaviour while fine-tuning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BnMode {
    /// Batch statistics (running statistics updated) and dropout: standard supervised training.
    #[default]
    Train,
    /// AimCLR variant: `model.eval()` during training (running statistics frozen, no dropout).
    Eval,
}

/// Fine-tuning recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinetuneConfig {
    pub epochs: usize,
    pub lr: f64,
    /// 0-based epochs where the lr is multiplied by `gamma`.
    pub steps: Vec<usize>,
    pub gamma: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub batch_size: usize,
    pub eval_interval: usize,
    pub seed: u64,
    pub bn: BnMode,
    /// Dropout of encoder blocks 2-10 in train mode (official ST-GCN: 0.5).
    pub dropout: f64,
    /// Augment the labelled samples (official crop + shear); off = raw data as in AimCLR.
    pub augment: bool,
    /// Clip the global gradient norm (SkeleMixCLR's semi 10% recipe uses 5).
    pub grad_clip: Option<f64>,
    /// Loader threads.
    pub workers: usize,
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        FinetuneConfig {
            epochs: 100,
            lr: 0.1,
            steps: vec![80],
            gamma: 0.1,
            momentum: 0.9,
            weight_decay: 1e-4,
            batch_size: 128,
            eval_interval: 5,
            seed: 0,
            bn: BnMode::Train,
            dropout: 0.5,
            augment: false,
            grad_clip: None,
            workers: 2,
        }
    }
}

/// Result of a fine-tuning run.
pub struct FinetuneOutcome {
    pub history: Vec<EpochRecord>,
    /// Test scores `(N_test, classes)` after the last epoch (CPU).
    pub test_scores: Tensor,
    /// Eval-mode test features of the final encoders (for the t-SNE plot).
    pub test_features: FeatureSet,
    pub seconds: f64,
}

/// Eval-mode scores of `dataset`, and its features.
fn score(
    dataset: &SkeletonDataset,
    encoders: &[StreamEncoder],
    heads: &LinearHeads,
    batch: usize,
) -> Result<(Tensor, FeatureSet)> {
    let device = encoders[0].vs.device();
    let feats = extract(dataset, encoders, batch)?.to_device(device);
    Ok((heads.scores(&feats), feats.to_device(Device::Cpu)))
}

/// Fine-tunes `encoders` and new heads on `train`; evaluates on `test` (and `val`).
pub fn train_finetune(
    train: Arc<SkeletonDataset>,
    val: Option<&SkeletonDataset>,
    test: &SkeletonDataset,
    encoders: &[StreamEncoder],
    cfg: &FinetuneConfig,
    feature_batch: usize,
) -> Result<FinetuneOutcome> {
    if encoders.is_empty() || cfg.epochs == 0 || train.is_empty() {
        return Err(Error::config(
            "finetune: need streams, epochs > 0 and training samples",
        ));
    }
    let device = encoders[0].vs.device();
    let classes = train.num_classes.max(test.num_classes) as i64;
    let dims: Vec<i64> = encoders.iter().map(|e| e.out_dim()).collect();
    let mut heads = LinearHeads::new(&dims, classes, cfg.seed, device)?;
    for t in heads.weights.iter_mut().chain(heads.biases.iter_mut()) {
        *t = t.set_requires_grad(true);
    }
    let mut params: Vec<Tensor> = encoders
        .iter()
        .flat_map(|e| e.vs.trainable_variables())
        .collect();
    params.extend(
        heads
            .weights
            .iter()
            .chain(&heads.biases)
            .map(|t| t.shallow_clone()),
    );
    let mut sgd = Sgd::new(cfg.momentum, cfg.weight_decay);
    let loader = LoaderConfig {
        batch_size: cfg.batch_size.min(train.len()),
        shuffle: true,
        drop_last: true,
        num_views: 1,
        augment: cfg.augment.then(AugmentConfig::default),
        seed: cfg.seed,
        workers: cfg.workers,
        prefetch: 2 * cfg.workers.max(1),
    };
    loader.validate(&train)?;
    let train_mode = cfg.bn == BnMode::Train;
    let layout = train.layout.clone();
    let steps_per_epoch = batches_per_epoch(train.len(), &loader);
    let start = std::time::Instant::now();
    let bar = progress((cfg.epochs * steps_per_epoch) as u64, "finetune");
    let mut history = Vec::new();
    let mut last = None;
    for epoch in 0..cfg.epochs {
        let lr = step_lr(cfg.lr, &cfg.steps, cfg.gamma, epoch);
        let (mut loss_sum, mut correct, mut seen, mut batches) = (0.0, 0i64, 0usize, 0usize);
        for batch in try_epoch_batches(Arc::clone(&train), &loader, epoch)? {
            let x = batch.views[0].to_device(device);
            let y = batch.labels.to_device(device);
            for p in params.iter_mut() {
                p.zero_grad();
            }
            let feats: Vec<Tensor> = encoders
                .iter()
                .map(|e| e.forward(&x, &layout, train_mode))
                .collect();
            let logits = heads.forward(&feats);
            let loss = logits.cross_entropy_for_logits(&y);
            loss.backward();
            let mut grads: Vec<Tensor> = params
                .iter()
                .map(|p| {
                    let g = p.grad();
                    if g.defined() {
                        g.detach()
                    } else {
                        p.zeros_like()
                    }
                })
                .collect();
            if let Some(max) = cfg.grad_clip {
                clip_norm(&mut grads, max);
            }
            sgd.apply(params.iter_mut(), grads, lr);
            let l = loss.double_value(&[]);
            if !l.is_finite() {
                return Err(Error::Other(format!(
                    "finetune: the loss became {l} at epoch {} (lr {lr} too high?)",
                    epoch + 1
                )));
            }
            loss_sum += l;
            correct += logits
                .argmax(1, false)
                .eq_tensor(&y)
                .sum(Kind::Int64)
                .int64_value(&[]);
            seen += batch.indices.len();
            batches += 1;
            bar.inc(1);
        }
        let e1 = epoch + 1;
        let (mut val_m, mut test_m) = (None, None);
        if is_eval_epoch(e1, cfg.eval_interval, cfg.epochs) {
            let (scores, feats) = score(test, encoders, &heads, feature_batch)?;
            test_m = Some(metrics::evaluate(&scores, &test.labels)?);
            if let Some(v) = val {
                let (vs, _) = score(v, encoders, &heads, feature_batch)?;
                val_m = Some(metrics::evaluate(&vs, &v.labels)?);
            }
            last = Some((scores, feats));
        }
        bar.set_message(format!(
            "finetune epoch {e1} loss {:.4}",
            loss_sum / batches.max(1) as f64
        ));
        history.push(EpochRecord {
            epoch: e1,
            lr,
            loss: loss_sum / batches.max(1) as f64,
            train_top1: 100.0 * correct as f64 / seen.max(1) as f64,
            val: val_m,
            test: test_m,
        });
    }
    bar.finish_and_clear();
    let (test_scores, test_features) =
        last.ok_or_else(|| Error::Other("finetune: no evaluation happened".into()))?;
    Ok(FinetuneOutcome {
        history,
        test_scores,
        test_features,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Scales `grads` so that their global L2 norm is at most `max`.
fn clip_norm(grads: &mut [Tensor], max: f64) {
    let total: f64 = grads
        .iter()
        .map(|g| g.square().sum(Kind::Double).double_value(&[]))
        .sum::<f64>()
        .sqrt();
    if total > max {
        let scale = max / (total + 1e-6);
        for g in grads.iter_mut() {
            *g = &*g * scale;
        }
    }
}

/// The labelled subset chosen by `semi`: indices into the training set and their names.
#[derive(Debug, Clone, Serialize)]
pub struct LabelledSubset {
    pub fraction: f64,
    pub seed: u64,
    pub indices: Vec<usize>,
}

/// `crossclr finetune` / `crossclr semi`: optionally reduce the training set to a class-balanced
/// labelled `fraction` (semi), optionally hold out `val_split` of it for validation, fine-tune,
/// test on the full val split and write the work_dir (for semi also `labelled_indices.npy` and
/// `labelled_indices.txt` with `index<TAB>name` lines).
pub fn run(
    splits: Splits,
    setup: &EncoderSetup,
    cfg: &FinetuneConfig,
    labelled_fraction: Option<f64>,
    val_split: f64,
    device: Device,
    opts: &OutputOptions,
) -> Result<TrainSummary> {
    let Splits {
        train,
        val: test,
        class_names,
    } = splits;
    let protocol = if labelled_fraction.is_some() {
        "semi"
    } else {
        "finetune"
    };
    let mut extra = serde_json::json!({"val_split": val_split});
    let train = match labelled_fraction {
        Some(f) => {
            let idx = split::balanced_subset(&train.labels, train.num_classes, f, cfg.seed)?;
            if let Some(dir) = &opts.work_dir {
                report::ensure_dir(dir)?;
                let as_i64: Vec<i64> = idx.iter().map(|&i| i as i64).collect();
                crate::data::npy::write_i64(
                    &dir.join("labelled_indices.npy"),
                    &[idx.len()],
                    &as_i64,
                )?;
                let lines: Vec<String> = idx
                    .iter()
                    .map(|&i| format!("{i}\t{}", train.names[i]))
                    .collect();
                report::write_lines(&dir.join("labelled_indices.txt"), &lines)?;
            }
            extra["labelled"] = serde_json::json!({"fraction": f, "seed": cfg.seed, "count": idx.len(), "of": train.len()});
            train.subset(&idx)
        }
        None => train,
    };
    let (train, holdout) = if val_split > 0.0 {
        let (tr, va) =
            split::stratified_split(&train.labels, train.num_classes, val_split, cfg.seed)?;
        if va.is_empty() {
            return Err(Error::config(format!(
                "--val-split {val_split}: no class has enough samples to hold out"
            )));
        }
        (train.subset(&tr), Some(train.subset(&va)))
    } else {
        (train, None)
    };
    let in_channels = train.shape[1] as i64;
    let encoders = setup.build(&train.layout, in_channels, cfg.dropout, device)?;
    let train = Arc::new(train);
    let out = train_finetune(
        Arc::clone(&train),
        holdout.as_ref(),
        &test,
        &encoders,
        cfg,
        opts.feature_batch,
    )?;
    let (best, by_val) = select(&out.history);
    let best = best.ok_or_else(|| Error::Other("finetune: no evaluation happened".into()))?;
    let last_rec = out.history.last().expect("epochs > 0");
    let summary = TrainSummary {
        protocol: protocol.into(),
        weights: setup.weights.as_ref().map_or(
            "none (random initialisation: supervised from scratch)".into(),
            |p| p.display().to_string(),
        ),
        streams: setup.streams.clone(),
        train_samples: train.len(),
        validation_samples: holdout.as_ref().map_or(0, |v| v.len()),
        test_samples: test.len(),
        num_classes: test.num_classes,
        last: Reported {
            epoch: last_rec.epoch,
            test: last_rec.test.expect("the last epoch is evaluated"),
            val: last_rec.val,
            rule: "last epoch".into(),
        },
        best_test: Reported {
            epoch: best.epoch,
            test: best.test,
            val: best.val,
            rule: TEST_SELECTION.into(),
        },
        val_selected: by_val.map(|s| Reported {
            epoch: s.epoch,
            test: s.test,
            val: s.val,
            rule: VAL_SELECTION.into(),
        }),
        feature_seconds: 0.0,
        train_seconds: out.seconds,
        config: serde_json::to_value(cfg).unwrap_or_default(),
        history: out.history.clone(),
        extra,
    };
    if let Some(dir) = &opts.work_dir {
        report::ensure_dir(dir)?;
        report::write_scores(
            dir,
            "",
            &out.test_scores,
            &test.labels,
            &test.names,
            &class_names,
            protocol,
        )?;
        report::write_curves(dir, &summary.history, protocol)?;
        if opts.tsne && out.test_features.len() >= 3 {
            let x = report::joined_features(&out.test_features.features);
            report::write_tsne(
                &dir.join("tsne.png"),
                &x,
                &test.labels,
                &class_names,
                &format!("t-SNE of fine-tuned {protocol} test features"),
                &crate::eval::tsne::TsneConfig::default(),
            )?;
        }
        report::write_json(&dir.join("metrics.json"), &summary)?;
    }
    Ok(summary)
}
