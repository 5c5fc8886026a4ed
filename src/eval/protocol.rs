//! End-to-end evaluation protocols behind the `linear`, `knn`, `semi` and `finetune` commands:
//! build the stream encoders, compute what is needed, train, and write the work_dir
//! (scores + names, confusion matrix CSV/PNG, t-SNE PNG, curves, `metrics.json`).
use crate::data::dataset::SkeletonDataset;
use crate::error::{Error, Result};
use crate::eval::args::Splits;
use crate::eval::encoder::{build_encoders, StreamEncoder, StreamSpec, WeightsSource};
use crate::eval::features::{extract, FeatureSet};
use crate::eval::knn::{self, KnnConfig};
use crate::eval::linear::{self, EpochRecord, LinearConfig, Selection, Standardize};
use crate::eval::metrics::Metrics;
use crate::eval::report;
use crate::eval::split;
use crate::eval::tsne::TsneConfig;
use crate::model::stgcn::StGcnConfig;
use serde::Serialize;
use std::path::{Path, PathBuf};
use tch::Device;

/// Which encoders to evaluate.
#[derive(Debug, Clone)]
pub struct EncoderSetup {
    /// Checkpoint, or `None` for random initialisation with `random`.
    pub weights: Option<PathBuf>,
    pub streams: Vec<StreamSpec>,
    /// Config of a random encoder (`in_channels` is taken from the data).
    pub random: StGcnConfig,
    /// Seeds the torch generator before a random encoder is built.
    pub seed: u64,
    /// Recompute the batch-norm running statistics on the training split before extracting
    /// features ([`crate::eval::features::recalibrate_bn`]); `false` = official.
    pub recalibrate_bn: bool,
}

impl EncoderSetup {
    /// Builds the encoders for data with `in_channels` coordinates on `device`.
    pub fn build(
        &self,
        layout: &crate::data::Layout,
        in_channels: i64,
        dropout: f64,
        device: Device,
    ) -> Result<Vec<StreamEncoder>> {
        let source = match &self.weights {
            Some(p) => WeightsSource::File(p),
            None => {
                tch::manual_seed(self.seed as i64);
                WeightsSource::Random(&self.random)
            }
        };
        build_encoders(source, &self.streams, layout, in_channels, dropout, device)
    }

    /// The weights as printed and written to `metrics.json`.
    pub fn describe(&self) -> String {
        self.weights
            .as_ref()
            .map_or("none (random initialisation)".into(), |p| {
                p.display().to_string()
            })
    }
}

/// The random-encoder baseline of `setup`: the same streams, random-encoder config and seed, with
/// no weights, i.e. exactly the encoder `--weights none` builds (`in_channels` from the data, the
/// torch generator seeded with `setup.seed`).
pub fn random_baseline(setup: &EncoderSetup) -> EncoderSetup {
    EncoderSetup {
        weights: None,
        ..setup.clone()
    }
}

/// Whether the linear probe standardises the features of the encoder of `setup` under
/// `standardize` (`auto`: on for a random encoder, off for trained weights).
pub fn resolve_standardize(standardize: Standardize, setup: &EncoderSetup) -> bool {
    standardize.resolve(setup.weights.is_none())
}

/// Sub-folder of the work_dir (and of the feature cache) where the random-encoder baseline of
/// `--baseline random` is written.
pub const BASELINE_DIR: &str = "baseline_random";

/// The line naming where a run with `--baseline random` wrote its outputs.
pub fn baseline_outputs_line(work_dir: &std::path::Path) -> String {
    format!(
        "outputs in {} (random-encoder baseline in {})",
        work_dir.display(),
        work_dir.join(BASELINE_DIR).display()
    )
}

/// `opts` for the random-encoder baseline: work_dir and feature cache moved into [`BASELINE_DIR`].
pub fn baseline_options(opts: &OutputOptions) -> OutputOptions {
    OutputOptions {
        work_dir: opts.work_dir.as_ref().map(|d| d.join(BASELINE_DIR)),
        feature_cache: opts.feature_cache.as_ref().map(|d| d.join(BASELINE_DIR)),
        ..opts.clone()
    }
}

/// Training samples whose statistics `recalibrate_bn` uses (the first ones, in dataset order).
pub const RECALIBRATION_SAMPLES: usize = 1024;

/// Output options common to all protocols.
#[derive(Debug, Clone)]
pub struct OutputOptions {
    /// Where everything is written; `None` = print only.
    pub work_dir: Option<PathBuf>,
    /// Draw the t-SNE plot (exact t-SNE of up to 1000 points: some seconds).
    pub tsne: bool,
    /// Also write the cached features as `.npy`.
    pub save_features: bool,
    /// Samples per encoder forward pass when computing features.
    pub feature_batch: usize,
    /// Folder where frozen features are cached between runs (`linear`, `knn`), keyed by the
    /// weights file, streams and data.
    pub feature_cache: Option<PathBuf>,
}

impl Default for OutputOptions {
    fn default() -> Self {
        OutputOptions {
            work_dir: None,
            tsne: true,
            save_features: false,
            feature_batch: 256,
            feature_cache: None,
        }
    }
}

/// A selected model as written to `metrics.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Reported {
    pub epoch: usize,
    pub test: Metrics,
    pub val: Option<Metrics>,
    pub rule: String,
}

fn reported(s: &Selection, rule: &str) -> Reported {
    Reported {
        epoch: s.epoch,
        test: s.test,
        val: s.val,
        rule: rule.to_string(),
    }
}

/// Rule text of the optimistic selection the official code prints as "Best".
pub const TEST_SELECTION: &str = "best test top-1 over the test evaluations: test-set selection, as the official code (optimistic)";
/// Rule text of the honest selection.
pub const VAL_SELECTION: &str = "test accuracy at the epoch of the best validation top-1 (validation held out of the training set)";

/// Summary of a training protocol (`linear`, `semi`, `finetune`), written as `metrics.json`.
#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    pub protocol: String,
    pub weights: String,
    pub streams: Vec<StreamSpec>,
    pub train_samples: usize,
    pub validation_samples: usize,
    pub test_samples: usize,
    pub num_classes: usize,
    /// Metrics after the last epoch.
    pub last: Reported,
    pub best_test: Reported,
    pub val_selected: Option<Reported>,
    pub feature_seconds: f64,
    pub train_seconds: f64,
    pub config: serde_json::Value,
    pub history: Vec<EpochRecord>,
    /// Extra protocol data (e.g. the labelled subset of `semi`).
    pub extra: serde_json::Value,
}

impl TrainSummary {
    /// Human-readable result lines.
    pub fn lines(&self) -> Vec<String> {
        let f = |m: &Metrics| {
            format!(
                "top-1 {:6.2}%  top-5 {:6.2}%  mean-class {:6.2}%",
                m.top1, m.top5, m.mean_class
            )
        };
        let standardized = if self.config["standardize"].as_bool() == Some(true) {
            " [features standardised: BatchNorm without affine before the heads]"
        } else {
            ""
        };
        let mut out = vec![
            format!(
                "{} ({}; streams {}): {} train / {} validation / {} test samples, {} classes{standardized}",
                self.protocol,
                self.weights,
                self.streams
                    .iter()
                    .map(|s| format!("{}<-{}", s.name(), s.prefix))
                    .collect::<Vec<_>>()
                    .join(","),
                self.train_samples,
                self.validation_samples,
                self.test_samples,
                self.num_classes
            ),
            format!(
                "  last epoch ({:>3}):                         {}",
                self.last.epoch,
                f(&self.last.test)
            ),
        ];
        if let Some(v) = &self.val_selected {
            out.push(format!(
                "  best validation epoch ({:>3}), test:        {}",
                v.epoch,
                f(&v.test)
            ));
        }
        out.push(format!(
            "  best test epoch ({:>3}) [test-set selection, as the official code]: {}",
            self.best_test.epoch,
            f(&self.best_test.test)
        ));
        out.push(format!(
            "  time: features {:.1} s, training {:.1} s",
            self.feature_seconds, self.train_seconds
        ));
        out
    }
}

fn write_training_outputs(
    dir: &Path,
    summary: &TrainSummary,
    test_scores: &tch::Tensor,
    test: &FeatureSet,
    class_names: &[String],
    opts: &OutputOptions,
) -> Result<()> {
    report::write_scores(
        dir,
        "",
        test_scores,
        &test.labels,
        &test.names,
        class_names,
        &summary.protocol,
    )?;
    report::write_curves(dir, &summary.history, &summary.protocol)?;
    if opts.tsne {
        tsne_plot(dir, test, class_names, &summary.protocol)?;
    }
    report::write_json(&dir.join("metrics.json"), summary)
}

fn tsne_plot(dir: &Path, set: &FeatureSet, class_names: &[String], what: &str) -> Result<()> {
    if set.len() < 3 {
        return Ok(());
    }
    let x = report::joined_features(&set.features);
    report::write_tsne(
        &dir.join("tsne.png"),
        &x,
        &set.labels,
        class_names,
        &format!("t-SNE of {what} test features ({})", set.streams.join("+")),
        &TsneConfig::default(),
    )
}

/// Splits off a class-stratified validation part of `train` when `fraction > 0`.
fn holdout(
    train: &FeatureSet,
    fraction: f64,
    seed: u64,
) -> Result<(FeatureSet, Option<FeatureSet>)> {
    if fraction <= 0.0 {
        return Ok((train.subset(&(0..train.len()).collect::<Vec<_>>()), None));
    }
    let (tr, va) = split::stratified_split(&train.labels, train.num_classes, fraction, seed)?;
    if va.is_empty() {
        return Err(Error::config(format!(
            "--val-split {fraction}: no class has enough samples to hold out"
        )));
    }
    Ok((train.subset(&tr), Some(train.subset(&va))))
}

/// What the cached features were computed from: weights file (path, size, modification time) or
/// the random-encoder config and seed, the streams, and both splits' sources and sizes. A cache
/// whose key differs is recomputed, never reused.
fn cache_key(splits: &Splits, setup: &EncoderSetup) -> serde_json::Value {
    let weights = match &setup.weights {
        Some(p) => {
            let meta = std::fs::metadata(p).ok();
            let modified = meta
                .as_ref()
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_secs());
            serde_json::json!({"path": p, "bytes": meta.map(|m| m.len()), "modified": modified})
        }
        None => serde_json::json!({"random": setup.random, "seed": setup.seed}),
    };
    let weights = serde_json::json!({"encoder": weights, "recalibrate_bn": setup.recalibrate_bn});
    serde_json::json!({
        "weights": weights,
        "streams": setup.streams,
        "train": {"source": splits.train.source, "shape": splits.train.shape},
        "val": {"source": splits.val.source, "shape": splits.val.shape},
    })
}

/// Whether every file listed in the cache's `files` (name -> checksum) is there with that checksum.
fn cache_files_intact(dir: &Path, files: Option<&serde_json::Value>) -> bool {
    let Some(serde_json::Value::Object(files)) = files else {
        return false;
    };
    !files.is_empty()
        && files.iter().all(|(name, sum)| {
            crate::train::atomic::checksum_file(&dir.join(name))
                .is_ok_and(|got| Some(got.as_str()) == sum.as_str())
        })
}

/// Features of one split from `dir` (`features_<split>_<stream>.npy`, `names_<split>.txt`), or
/// `None` when a file is missing or does not match the dataset (sample count, names).
fn load_cached(
    dir: &Path,
    split_name: &str,
    ds: &SkeletonDataset,
    streams: &[StreamSpec],
) -> Option<FeatureSet> {
    let names = std::fs::read_to_string(dir.join(format!("names_{split_name}.txt"))).ok()?;
    if names.lines().count() != ds.len() || names.lines().zip(&ds.names).any(|(a, b)| a != b) {
        return None;
    }
    let mut features = Vec::new();
    for s in streams {
        let path = dir.join(format!("features_{split_name}_{}.npy", s.name()));
        let (shape, data) = crate::data::npy::read_f32(&path).ok()?;
        if shape.len() != 2 || shape[0] != ds.len() {
            return None;
        }
        features.push(tch::Tensor::from_slice(&data).view([shape[0] as i64, shape[1] as i64]));
    }
    let stream_names = streams.iter().map(|s| s.name().to_string()).collect();
    FeatureSet::new(
        stream_names,
        features,
        ds.labels.clone(),
        ds.names.clone(),
        ds.num_classes,
    )
    .ok()
}

/// Frozen features of both splits (eval-mode encoders, no augmentation). With
/// `opts.feature_cache`, features computed earlier from the same weights, streams and data are
/// read back from there instead (and fresh ones are written there); with `opts.save_features`
/// they are also written to the work_dir.
pub fn features_of(
    splits: &Splits,
    setup: &EncoderSetup,
    device: Device,
    opts: &OutputOptions,
) -> Result<(FeatureSet, FeatureSet, f64)> {
    let start = std::time::Instant::now();
    let key = cache_key(splits, setup);
    if let Some(dir) = &opts.feature_cache {
        let stored: Option<serde_json::Value> =
            std::fs::read_to_string(dir.join("features_key.json"))
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok());
        if stored.as_ref().map(|s| &s["key"]) == Some(&key) {
            if !cache_files_intact(dir, stored.as_ref().map(|s| &s["files"])) {
                eprintln!(
                    "features: the cache in {} does not match its checksums (torn or mixed): recomputing",
                    dir.display()
                );
            } else if let (Some(train), Some(test)) = (
                load_cached(dir, "train", &splits.train, &setup.streams),
                load_cached(dir, "val", &splits.val, &setup.streams),
            ) {
                eprintln!("features: reusing the cache in {}", dir.display());
                return Ok((train, test, start.elapsed().as_secs_f64()));
            }
        }
    }
    let in_channels = splits.train.shape[1] as i64;
    let encoders = setup.build(&splits.train.layout, in_channels, 0.0, device)?;
    if setup.recalibrate_bn {
        crate::eval::features::recalibrate_bn(&splits.train, &encoders, RECALIBRATION_SAMPLES)?;
    }
    let train = extract(&splits.train, &encoders, opts.feature_batch)?;
    let test = extract(&splits.val, &encoders, opts.feature_batch)?;
    if let (Some(dir), true) = (&opts.work_dir, opts.save_features) {
        train.save(dir, "train")?;
        test.save(dir, "val")?;
    }
    if let Some(dir) = &opts.feature_cache {
        // issue 18: the key goes first (a kill while the files are rewritten leaves no key, so
        // nothing is reused), and comes back last with the checksum of every file it covers.
        let key_path = dir.join("features_key.json");
        match std::fs::remove_file(&key_path) {
            Ok(()) => crate::train::atomic::sync_dir_of(&key_path)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&key_path, e)),
        }
        train.save(dir, "train")?;
        test.save(dir, "val")?;
        let mut files = serde_json::Map::new();
        for split in ["train", "val"] {
            let mut names: Vec<String> = setup
                .streams
                .iter()
                .map(|s| format!("features_{split}_{}.npy", s.name()))
                .collect();
            names.push(format!("names_{split}.txt"));
            for n in names {
                let sum = crate::train::atomic::checksum_file(&dir.join(&n))?;
                files.insert(n, serde_json::Value::String(sum));
            }
        }
        let stored = serde_json::json!({"key": key, "files": files});
        report::write_json(&key_path, &stored)?;
        crate::train::atomic::sync_dir_of(&key_path)?;
    }
    Ok((train, test, start.elapsed().as_secs_f64()))
}

/// Linear evaluation: cached frozen features, per-stream heads on averaged logits; with
/// `val_split > 0` a stratified part of the training set is held out for model selection.
pub fn run_linear(
    splits: &Splits,
    setup: &EncoderSetup,
    cfg: &LinearConfig,
    val_split: f64,
    device: Device,
    opts: &OutputOptions,
) -> Result<TrainSummary> {
    let (train_all, test, feature_seconds) = features_of(splits, setup, device, opts)?;
    let (train, val) = holdout(&train_all, val_split, cfg.seed)?;
    let (train_d, test_d) = (train.to_device(device), test.to_device(device));
    let val_d = val.as_ref().map(|v| v.to_device(device));
    let out = linear::train_linear(&train_d, val_d.as_ref(), &test_d, cfg)?;
    let last_epoch = out.history.last().map_or(0, |r| r.epoch);
    let summary = TrainSummary {
        protocol: "linear".into(),
        weights: setup.describe(),
        streams: setup.streams.clone(),
        train_samples: train.len(),
        validation_samples: val.as_ref().map_or(0, |v| v.len()),
        test_samples: test.len(),
        num_classes: test.num_classes,
        last: Reported {
            epoch: last_epoch,
            test: out.last,
            val: out.history.last().and_then(|r| r.val),
            rule: "last epoch".into(),
        },
        best_test: reported(&out.best_test, TEST_SELECTION),
        val_selected: out
            .val_selected
            .as_ref()
            .map(|s| reported(s, VAL_SELECTION)),
        feature_seconds,
        train_seconds: out.seconds,
        config: serde_json::to_value(cfg).unwrap_or_default(),
        history: out.history.clone(),
        extra: serde_json::json!({
            "val_split": val_split,
            "standardize": standardize_record(cfg, &train.streams, &out.feature_norms),
        }),
    };
    if let Some(dir) = &opts.work_dir {
        report::ensure_dir(dir)?;
        write_training_outputs(
            dir,
            &summary,
            &out.test_scores,
            &test,
            &splits.class_names,
            opts,
        )?;
    }
    Ok(summary)
}

/// What the linear probe's standardisation did, for `metrics.json`.
fn standardize_record(
    cfg: &LinearConfig,
    streams: &[String],
    norms: &[linear::FeatureNorm],
) -> serde_json::Value {
    if !cfg.standardize {
        return serde_json::json!({"on": false});
    }
    serde_json::json!({
        "on": true,
        "method": "BatchNorm1d(affine=False) before each stream's head: batch statistics (biased variance) in training, running statistics (momentum 0.1, unbiased variance) at evaluation",
        "eps": cfg.standardize_eps,
        "momentum": linear::NORM_MOMENTUM,
        "prescale": cfg.standardize_prescale,
        "streams": streams
            .iter()
            .zip(norms)
            .map(|(s, n)| serde_json::json!({
                "stream": s,
                "prescale": n.prescale,
                "batches_tracked": n.num_batches_tracked,
            }))
            .collect::<Vec<_>>(),
    })
}

/// The figures of a random-encoder baseline stored in the trained run's `metrics.json`.
fn baseline_json(summary: &impl Serialize, dir: Option<&Path>) -> serde_json::Value {
    let mut v = serde_json::to_value(summary).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.remove("history");
        o.insert(
            "work_dir".into(),
            serde_json::json!(dir.map(|d| d.display().to_string())),
        );
    }
    v
}

/// A trained encoder's linear evaluation next to its random-encoder baseline.
#[derive(Debug, Clone, Serialize)]
pub struct LinearComparison {
    pub trained: TrainSummary,
    pub random: TrainSummary,
}

fn metric_cells(m: &Metrics, epoch: usize) -> String {
    format!(
        "{:>7.2}{:>8.2}{:>12.2}{:>7}",
        m.top1, m.top5, m.mean_class, epoch
    )
}

impl LinearComparison {
    /// The two runs side by side: top-1 / top-5 / mean-class (percent) and epoch of the last
    /// epoch, the best validation epoch (when a validation set exists) and the best test epoch.
    pub fn lines(&self) -> Vec<String> {
        let std_of = |s: &TrainSummary| {
            if s.config["standardize"].as_bool() == Some(true) {
                "standardised"
            } else {
                "raw features"
            }
        };
        let head = format!(
            "{:>7}{:>8}{:>12}{:>7}",
            "top-1", "top-5", "mean-class", "epoch"
        );
        let mut out = vec![
            format!(
                "linear: trained encoder vs random-encoder baseline (same streams, data and recipe; chance {:.2}%)",
                100.0 / self.trained.num_classes.max(1) as f64
            ),
            format!(
                "  {:<36}{:<34} | {}",
                "",
                format!("trained ({})", std_of(&self.trained)),
                format!("random encoder ({})", std_of(&self.random))
            ),
            format!("  {:<36}{head} | {head}", ""),
            format!(
                "  {:<36}{} | {}",
                "last epoch",
                metric_cells(&self.trained.last.test, self.trained.last.epoch),
                metric_cells(&self.random.last.test, self.random.last.epoch)
            ),
        ];
        if let (Some(t), Some(r)) = (&self.trained.val_selected, &self.random.val_selected) {
            out.push(format!(
                "  {:<36}{} | {}",
                "best validation epoch, test",
                metric_cells(&t.test, t.epoch),
                metric_cells(&r.test, r.epoch)
            ));
        }
        out.push(format!(
            "  {:<36}{} | {}",
            "best test epoch [test-set selection]",
            metric_cells(&self.trained.best_test.test, self.trained.best_test.epoch),
            metric_cells(&self.random.best_test.test, self.random.best_test.epoch)
        ));
        out
    }
}

/// Linear evaluation of `setup` and of its random-encoder baseline ([`random_baseline`]) with the
/// same streams, data, holdout and recipe; `cfg.standardize` is replaced, for each encoder, by
/// `standardize` resolved for it ([`resolve_standardize`]: under `auto` the random encoder is
/// standardised and a trained one is not). The trained run writes into `opts.work_dir`, the baseline
/// into its [`BASELINE_DIR`] sub-folder, and the trained run's `metrics.json` gets the baseline's
/// figures under `extra.baseline_random`.
pub fn run_linear_with_baseline(
    splits: &Splits,
    setup: &EncoderSetup,
    cfg: &LinearConfig,
    standardize: Standardize,
    val_split: f64,
    device: Device,
    opts: &OutputOptions,
) -> Result<LinearComparison> {
    let trained_cfg = LinearConfig {
        standardize: resolve_standardize(standardize, setup),
        ..cfg.clone()
    };
    let mut trained = run_linear(splits, setup, &trained_cfg, val_split, device, opts)?;
    let random_setup = random_baseline(setup);
    let random_cfg = LinearConfig {
        standardize: resolve_standardize(standardize, &random_setup),
        ..cfg.clone()
    };
    let random_opts = baseline_options(opts);
    let random = run_linear(
        splits,
        &random_setup,
        &random_cfg,
        val_split,
        device,
        &random_opts,
    )?;
    if let Some(o) = trained.extra.as_object_mut() {
        o.insert("standardize_request".into(), serde_json::json!(standardize));
        o.insert(
            "baseline_random".into(),
            baseline_json(&random, random_opts.work_dir.as_deref()),
        );
    }
    if let Some(dir) = &opts.work_dir {
        report::write_json(&dir.join("metrics.json"), &trained)?;
    }
    Ok(LinearComparison { trained, random })
}

/// Summary of a k-NN evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct KnnSummary {
    pub protocol: String,
    pub weights: String,
    pub streams: Vec<StreamSpec>,
    pub bank_samples: usize,
    pub test_samples: usize,
    /// One entry per setting: label (`k1`, `k20_t0.07`) and metrics.
    pub results: Vec<(String, Metrics)>,
    pub feature_seconds: f64,
    /// The random-encoder baseline's figures (`--baseline random`), when it was evaluated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline_random: Option<serde_json::Value>,
}

/// A trained encoder's k-NN evaluation next to its random-encoder baseline.
#[derive(Debug, Clone, Serialize)]
pub struct KnnComparison {
    pub trained: KnnSummary,
    pub random: KnnSummary,
}

impl KnnComparison {
    /// The two runs side by side: top-1 / top-5 / mean-class (percent) of every k-NN setting.
    pub fn lines(&self) -> Vec<String> {
        let head = format!("{:>7}{:>8}{:>12}", "top-1", "top-5", "mean-class");
        let cells = |m: &Metrics| format!("{:>7.2}{:>8.2}{:>12.2}", m.top1, m.top5, m.mean_class);
        let mut out = vec![
            "knn: trained encoder vs random-encoder baseline (same streams and data; cosine, no standardisation)".to_string(),
            format!("  {:<12}{:<27} | random encoder", "", "trained"),
            format!("  {:<12}{head} | {head}", ""),
        ];
        for ((label, t), (_, r)) in self.trained.results.iter().zip(&self.random.results) {
            out.push(format!("  {label:<12}{} | {}", cells(t), cells(r)));
        }
        out
    }
}

/// k-NN evaluation of `setup` and of its random-encoder baseline ([`random_baseline`]) with the
/// same streams, data and settings. The trained run writes into `opts.work_dir`, the baseline into
/// its [`BASELINE_DIR`] sub-folder, and the trained run's `metrics.json` gets the baseline's figures
/// under `baseline_random`.
pub fn run_knn_with_baseline(
    splits: &Splits,
    setup: &EncoderSetup,
    configs: &[KnnConfig],
    device: Device,
    opts: &OutputOptions,
) -> Result<KnnComparison> {
    let mut trained = run_knn(splits, setup, configs, device, opts)?;
    let random_opts = baseline_options(opts);
    let random = run_knn(
        splits,
        &random_baseline(setup),
        configs,
        device,
        &random_opts,
    )?;
    trained.baseline_random = Some(baseline_json(&random, random_opts.work_dir.as_deref()));
    if let Some(dir) = &opts.work_dir {
        report::write_json(&dir.join("metrics.json"), &trained)?;
    }
    Ok(KnnComparison { trained, random })
}

/// k-NN evaluation (k = 1 and weighted k = 20, t = 0.07 by default) with the training features as
/// the bank; several streams are fused by averaging their cosine similarities.
pub fn run_knn(
    splits: &Splits,
    setup: &EncoderSetup,
    configs: &[KnnConfig],
    device: Device,
    opts: &OutputOptions,
) -> Result<KnnSummary> {
    let (bank, test, feature_seconds) = features_of(splits, setup, device, opts)?;
    let (bank_d, test_d) = (bank.to_device(device), test.to_device(device));
    let outcomes = knn::evaluate(
        &bank_d.features,
        &bank.labels,
        &test_d.features,
        &test.labels,
        test.num_classes,
        configs,
    )?;
    let results: Vec<(String, Metrics)> = outcomes
        .iter()
        .map(|o| (o.config.label(), o.metrics))
        .collect();
    let summary = KnnSummary {
        protocol: "knn".into(),
        weights: setup.describe(),
        streams: setup.streams.clone(),
        bank_samples: bank.len(),
        test_samples: test.len(),
        results,
        feature_seconds,
        baseline_random: None,
    };
    if let Some(dir) = &opts.work_dir {
        for o in &outcomes {
            let suffix = format!("_{}", o.config.label());
            report::write_scores(
                dir,
                &suffix,
                &o.scores,
                &test.labels,
                &test.names,
                &splits.class_names,
                &format!("knn {}", o.config.label()),
            )?;
        }
        if opts.tsne {
            tsne_plot(dir, &test, &splits.class_names, "knn")?;
        }
        report::write_json(&dir.join("metrics.json"), &summary)?;
    }
    Ok(summary)
}

/// The samples of `dataset` at `indices` as a new dataset (class count kept).
pub fn labelled_subset(dataset: &SkeletonDataset, indices: &[usize]) -> SkeletonDataset {
    dataset.subset(indices)
}
