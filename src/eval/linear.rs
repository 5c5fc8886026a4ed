//! Linear evaluation on cached frozen features (reference §7.2). Because the official protocol uses
//! eval-mode encoders and no augmentation, training Linear heads on features computed once is exact
//! and turns 100 epochs into seconds. With several streams each has its own `Linear(D, classes)` and
//! the heads are trained jointly on the mean of their logits (the official `view: all` mode).
//!
//! Reported: the last epoch; the best test evaluation (test-set selection, as the official code
//! prints it: optimistic); and, with a validation set held out of the training set, the test accuracy
//! at the epoch with the best validation accuracy (honest model selection).
//!
//! Optionally ([`LinearConfig::standardize`]) each stream's features pass a BatchNorm without affine
//! parameters before its head, as the MAE-family linear probes do ([`FeatureNorm`]), so that an
//! encoder whose features are tiny (a random encoder under the official N(0, 0.02) init: pooled
//! features of norm ~1e-5) is not held at chance by the feature scale alone.
use crate::error::{Error, Result};
use crate::eval::features::FeatureSet;
use crate::eval::metrics::{self, Metrics};
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Standard deviation of the official head initialisation (`weights_init`: N(0, 0.02), bias 0).
pub const HEAD_INIT_STD: f64 = 0.02;
/// Rows per forward pass when scoring a whole split.
const SCORE_CHUNK: i64 = 16384;
/// Momentum of the standardisation's running statistics (PyTorch's BatchNorm default).
pub const NORM_MOMENTUM: f64 = 0.1;
/// Default epsilon of the standardisation (PyTorch's BatchNorm default).
pub const NORM_EPS: f64 = 1e-5;

fn default_norm_eps() -> f64 {
    NORM_EPS
}

fn default_true() -> bool {
    true
}

/// The `--standardize` choice: `auto` standardises the features of a random encoder only (whose
/// features are tiny), keeping the official recipe (no standardisation) for trained encoders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Standardize {
    /// On for a random encoder (`--weights none`), off for trained weights.
    #[default]
    Auto,
    On,
    Off,
}

impl Standardize {
    /// Whether features are standardised, for a random encoder (`random_encoder`, i.e.
    /// `--weights none`) or a trained one.
    pub fn resolve(self, random_encoder: bool) -> bool {
        match self {
            Standardize::Auto => random_encoder,
            Standardize::On => true,
            Standardize::Off => false,
        }
    }
}

impl std::fmt::Display for Standardize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Standardize::Auto => "auto",
            Standardize::On => "on",
            Standardize::Off => "off",
        })
    }
}

/// Optimisation recipe; `Default` is the official linear-evaluation recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinearConfig {
    pub epochs: usize,
    pub lr: f64,
    /// 0-based epochs at which the lr is multiplied by `gamma` (official `step: [80]`).
    pub steps: Vec<usize>,
    pub gamma: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub batch_size: usize,
    /// Evaluate every this many epochs and at the last one (official: 5).
    pub eval_interval: usize,
    /// Seeds the head initialisation and the per-epoch shuffles.
    pub seed: u64,
    /// libtorch intra-op threads during the training loop on the CPU (0 = leave the current
    /// setting). Default 1: the 128 x 256 batch matmuls are too small for threading to pay, and
    /// on a busy 2-core machine 2 threads measured 11x slower than 1.
    #[serde(default)]
    pub cpu_threads: i32,
    /// Standardise each stream's features before its head with a BatchNorm without affine
    /// parameters ([`FeatureNorm`]: batch statistics in training, running statistics with
    /// momentum 0.1 at evaluation). Off in the official recipe.
    #[serde(default)]
    pub standardize: bool,
    /// The BatchNorm's epsilon (1e-5, PyTorch's default).
    #[serde(default = "default_norm_eps")]
    pub standardize_eps: f64,
    /// Divide each stream's features by one scalar first, the root of the mean per-feature
    /// variance of its training features, so that the BatchNorm's epsilon and the start of its
    /// running variance (1) are relative to the features' scale; the transform is then invariant
    /// to the feature scale. `false` = a bare `BatchNorm1d(affine=False)`, whose epsilon swamps
    /// the variance (~5e-15) of a random encoder's features and leaves them tiny.
    #[serde(default = "default_true")]
    pub standardize_prescale: bool,
}

impl Default for LinearConfig {
    fn default() -> Self {
        LinearConfig {
            epochs: 100,
            lr: 3.0,
            steps: vec![80],
            gamma: 0.1,
            momentum: 0.9,
            weight_decay: 0.0,
            batch_size: 128,
            eval_interval: 5,
            seed: 0,
            cpu_threads: 1,
            standardize: false,
            standardize_eps: NORM_EPS,
            standardize_prescale: true,
        }
    }
}

/// The learning rate of 0-based `epoch` under a step schedule (official `adjust_lr`:
/// `base * gamma^(number of steps <= epoch)`).
pub fn step_lr(base: f64, steps: &[usize], gamma: f64, epoch: usize) -> f64 {
    base * gamma.powi(steps.iter().filter(|&&s| epoch >= s).count() as i32)
}

/// Whether 1-based `epoch` is evaluated: every `interval` epochs and the last one (as official).
pub fn is_eval_epoch(epoch: usize, interval: usize, epochs: usize) -> bool {
    epoch == epochs || (interval > 0 && epoch.is_multiple_of(interval))
}

/// One epoch of the log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 1-based.
    pub epoch: usize,
    pub lr: f64,
    /// Mean training cross-entropy over the epoch's batches.
    pub loss: f64,
    /// Training-batch top-1, percent.
    pub train_top1: f64,
    /// Validation metrics (when a validation set exists and the epoch is evaluated).
    pub val: Option<Metrics>,
    /// Test metrics (when the epoch is evaluated).
    pub test: Option<Metrics>,
}

/// The model chosen by some rule, and its test metrics.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Selection {
    /// 1-based epoch.
    pub epoch: usize,
    pub test: Metrics,
    pub val: Option<Metrics>,
}

/// Everything a linear evaluation produced.
pub struct LinearOutcome {
    /// Test metrics after the last epoch.
    pub last: Metrics,
    /// Best test top-1 over the test evaluations (test-set selection, as the official code).
    pub best_test: Selection,
    /// Test metrics at the best validation top-1 (first such epoch), when validation exists.
    pub val_selected: Option<Selection>,
    pub history: Vec<EpochRecord>,
    /// Mean logits `(N_test, classes)` of the last epoch, CPU f32, test-set order.
    pub test_scores: Tensor,
    /// Per-stream head weights `(classes, D)` and biases `(classes,)` after the last epoch.
    pub heads: Vec<(Tensor, Tensor)>,
    /// Wall-clock seconds of the training loop (evaluations included).
    pub seconds: f64,
    /// Per-stream standardisation after the last epoch (empty when `standardize` is off); the
    /// heads act on its output.
    pub feature_norms: Vec<FeatureNorm>,
}

/// `BatchNorm1d(D, affine=False)` on frozen features, exactly as PyTorch's: in training each batch
/// is normalised with its own mean and biased variance, `(x - mean) / sqrt(var + eps)`, and the
/// running statistics are updated with `running = (1 - momentum) * running + momentum * batch`
/// (the batch's unbiased variance for the running variance); evaluation uses the running
/// statistics. Running mean starts at 0, running variance at 1, as in PyTorch.
///
/// With a `prescale` `s` the input is first divided by `s` (one scalar per stream, computed once
/// from the training features by [`FeatureNorm::prescaled`]): this is a plain BatchNorm of `x / s`,
/// equivalently a BatchNorm of `x` with epsilon `eps * s^2` and running variance starting at `s^2`.
/// There are no parameters, so the linear head's gradient is that of a head on the normalised
/// features.
#[derive(Debug)]
pub struct FeatureNorm {
    /// `(D,)`, in units of the prescaled input.
    pub running_mean: Tensor,
    /// `(D,)`, unbiased, in units of the prescaled input.
    pub running_var: Tensor,
    /// The input is divided by this first (1 = none).
    pub prescale: f64,
    pub eps: f64,
    pub momentum: f64,
    /// Training batches seen.
    pub num_batches_tracked: i64,
}

impl FeatureNorm {
    /// A fresh BatchNorm over `dim` features on `device` (running mean 0, variance 1, prescale 1).
    pub fn new(dim: i64, eps: f64, momentum: f64, device: tch::Device) -> Self {
        FeatureNorm {
            running_mean: Tensor::zeros([dim], (Kind::Float, device)),
            running_var: Tensor::ones([dim], (Kind::Float, device)),
            prescale: 1.0,
            eps,
            momentum,
            num_batches_tracked: 0,
        }
    }

    /// The root of the mean (over features) biased variance (over rows) of `x` `(N, D)`, or 1 when
    /// that is not a positive finite number (constant features).
    pub fn scale_of(x: &Tensor) -> f64 {
        let v = tch::no_grad(|| {
            x.to_kind(Kind::Double)
                .var_dim([0i64].as_slice(), false, false)
                .mean(Kind::Double)
                .double_value(&[])
        });
        let s = v.sqrt();
        if s.is_finite() && s > 0.0 {
            s
        } else {
            1.0
        }
    }

    /// This norm with its prescale set from the training features `x` (`(N, D)`, see
    /// [`FeatureNorm::scale_of`]).
    pub fn prescaled(mut self, x: &Tensor) -> Self {
        self.prescale = Self::scale_of(x);
        self
    }

    fn input(&self, x: &Tensor) -> Tensor {
        if self.prescale == 1.0 {
            x.to_kind(Kind::Float)
        } else {
            x.to_kind(Kind::Float) / self.prescale
        }
    }

    /// Training mode on a batch `(B, D)`, `B >= 2`: normalises with the batch statistics and
    /// updates the running ones.
    pub fn train_forward(&mut self, x: &Tensor) -> Tensor {
        tch::no_grad(|| {
            let x = self.input(x);
            let rows = x.size()[0];
            let mean = x.mean_dim([0i64].as_slice(), false, Kind::Float);
            let centred = &x - &mean;
            let var = centred
                .square()
                .mean_dim([0i64].as_slice(), false, Kind::Float);
            let out = &centred / (&var + self.eps).sqrt();
            let m = self.momentum;
            let unbiased = &var * (rows as f64 / (rows - 1).max(1) as f64);
            self.running_mean = &self.running_mean * (1.0 - m) + &mean * m;
            self.running_var = &self.running_var * (1.0 - m) + unbiased * m;
            self.num_batches_tracked += 1;
            out
        })
    }

    /// Evaluation mode on `(N, D)`: normalises with the running statistics.
    pub fn eval_forward(&self, x: &Tensor) -> Tensor {
        tch::no_grad(|| {
            (self.input(x) - &self.running_mean) / (&self.running_var + self.eps).sqrt()
        })
    }
}

/// Per-stream linear heads whose logits are averaged.
pub struct LinearHeads {
    pub weights: Vec<Tensor>,
    pub biases: Vec<Tensor>,
}

impl LinearHeads {
    /// Heads `Linear(dims[s], classes)` with weights N(0, 0.02) drawn from a seeded ChaCha8 stream
    /// (reproducible whatever else uses the torch generator) and zero biases, on `device`.
    pub fn new(dims: &[i64], classes: i64, seed: u64, device: tch::Device) -> Result<Self> {
        let normal =
            Normal::new(0.0f32, HEAD_INIT_STD as f32).map_err(|e| Error::Other(e.to_string()))?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut weights = Vec::new();
        let mut biases = Vec::new();
        for &d in dims {
            let w: Vec<f32> = (0..classes * d).map(|_| normal.sample(&mut rng)).collect();
            weights.push(Tensor::from_slice(&w).view([classes, d]).to_device(device));
            biases.push(Tensor::zeros([classes], (Kind::Float, device)));
        }
        Ok(LinearHeads { weights, biases })
    }

    /// Mean over streams of `x_s W_s^T + b_s`: `(B, classes)`. `xs[s]` is `(B, D_s)`.
    pub fn forward(&self, xs: &[Tensor]) -> Tensor {
        let mut sum: Option<Tensor> = None;
        for ((x, w), b) in xs.iter().zip(&self.weights).zip(&self.biases) {
            // b + x W^T in one fused op.
            let l = b.addmm(x, &w.tr());
            sum = Some(match sum {
                None => l,
                Some(s) => s + l,
            });
        }
        let sum = sum.expect("at least one stream");
        if xs.len() == 1 {
            sum
        } else {
            sum / xs.len() as f64
        }
    }

    /// Mean logits of a whole feature set, CPU `(N, classes)`, computed in chunks without grad.
    pub fn scores(&self, set: &FeatureSet) -> Tensor {
        self.scores_normalized(set, &[])
    }

    /// [`LinearHeads::scores`] with each stream's features first passed through its
    /// [`FeatureNorm`] in evaluation mode (`norms` empty: none).
    pub fn scores_normalized(&self, set: &FeatureSet, norms: &[FeatureNorm]) -> Tensor {
        tch::no_grad(|| {
            let n = set.len() as i64;
            let mut parts = Vec::new();
            let mut start = 0;
            while start < n {
                let len = SCORE_CHUNK.min(n - start);
                let xs: Vec<Tensor> = set
                    .features
                    .iter()
                    .enumerate()
                    .map(|(s, f)| {
                        let x = f.narrow(0, start, len);
                        match norms.get(s) {
                            Some(n) => n.eval_forward(&x),
                            None => x,
                        }
                    })
                    .collect();
                parts.push(self.forward(&xs).to_device(tch::Device::Cpu));
                start += len;
            }
            if parts.is_empty() {
                Tensor::zeros(
                    [0, self.weights[0].size()[0]],
                    (Kind::Float, tch::Device::Cpu),
                )
            } else {
                Tensor::cat(&parts, 0)
            }
        })
    }

    /// One SGD step on a batch (`xs[s]` `(B, D_s)`, labels `y` `(B,)`) with the cross-entropy
    /// gradient written out (no autograd graph: about half the tensor operations, which is what
    /// bounds the speed of these tiny matmuls): with `p = softmax(z)`, `z = mean_s(x_s W_s^T + b_s)`,
    /// `dL/dz = (p - onehot(y)) / B`, `dL/dW_s = (dL/dz)^T x_s / S`, `dL/db_s = sum_rows(dL/dz) / S`.
    /// Returns the batch's summed loss and number of correct top-1 predictions (0-d tensors, not
    /// synchronised).
    fn sgd_step(&mut self, xs: &[Tensor], y: &Tensor, sgd: &mut Sgd, lr: f64) -> (Tensor, Tensor) {
        tch::no_grad(|| {
            let z = self.forward(xs);
            let log_p = z.log_softmax(1, Kind::Float);
            let picked = log_p.gather(1, &y.unsqueeze(1), false);
            let loss = -picked.mean(Kind::Float);
            let hits = z.argmax(1, false).eq_tensor(y).sum(Kind::Int64);
            let rows = xs[0].size()[0] as f64;
            let streams = xs.len() as f64;
            let mut dz = log_p.exp();
            let minus_one = Tensor::full_like(&picked, -1.0);
            let _ = dz.scatter_add_(1, &y.unsqueeze(1), &minus_one);
            let dz = dz / (rows * streams);
            let db = dz.sum_dim_intlist([0i64].as_slice(), false, Kind::Float);
            let grads: Vec<Tensor> = xs
                .iter()
                .map(|x| dz.tr().mm(x))
                .chain((0..xs.len()).map(|_| db.shallow_clone()))
                .collect();
            sgd.apply(
                self.weights.iter_mut().chain(self.biases.iter_mut()),
                grads,
                lr,
            );
            (loss, hits)
        })
    }
}

/// SGD with momentum and weight decay with PyTorch's semantics (dampening 0, no Nesterov): the
/// buffer starts as the first gradient, `buf = m * buf + (g + wd * p)`, `p -= lr * buf`.
pub struct Sgd {
    momentum: f64,
    weight_decay: f64,
    buffers: Vec<Option<Tensor>>,
}

impl Sgd {
    pub fn new(momentum: f64, weight_decay: f64) -> Self {
        Sgd {
            momentum,
            weight_decay,
            buffers: Vec::new(),
        }
    }

    /// Updates `params` in place with their `grads` (same order, same parameters every call).
    pub fn apply<'a>(
        &mut self,
        params: impl Iterator<Item = &'a mut Tensor>,
        grads: Vec<Tensor>,
        lr: f64,
    ) {
        tch::no_grad(|| self.apply_inner(params, grads, lr))
    }

    fn apply_inner<'a>(
        &mut self,
        params: impl Iterator<Item = &'a mut Tensor>,
        grads: Vec<Tensor>,
        lr: f64,
    ) {
        for (i, (p, grad)) in params.zip(grads).enumerate() {
            if self.buffers.len() <= i {
                self.buffers.push(None);
            }
            let d_p = if self.weight_decay != 0.0 {
                grad + &*p * self.weight_decay
            } else {
                grad
            };
            let buf = match self.buffers[i].take() {
                Some(mut b) if self.momentum != 0.0 => {
                    let _ = b.f_mul_scalar_(self.momentum).and_then(|_| b.f_add_(&d_p));
                    b
                }
                // A fresh buffer (the gradient may be shared between streams' biases).
                _ => d_p.copy(),
            };
            let _ = p.f_sub_(&(&buf * lr));
            self.buffers[i] = Some(buf);
        }
    }
}

fn check_compatible(train: &FeatureSet, other: &FeatureSet, what: &str) -> Result<()> {
    if train.streams != other.streams || train.dims() != other.dims() {
        return Err(Error::config(format!(
            "{what} features have streams {:?} dims {:?}, training has {:?} {:?}",
            other.streams,
            other.dims(),
            train.streams,
            train.dims()
        )));
    }
    if train.num_classes != other.num_classes {
        return Err(Error::config(format!(
            "{what} set has {} classes, training set {}",
            other.num_classes, train.num_classes
        )));
    }
    Ok(())
}

/// Trains per-stream linear heads on `train` features (averaged logits, cross-entropy) and
/// evaluates on `test` (and `val`, when given, for validation-based selection). All sets must be on
/// the same device and have the same streams, dims and number of classes. The loop runs entirely on
/// tensors: per epoch one seeded permutation, `index_select` batches, `drop_last` as official.
pub fn train_linear(
    train: &FeatureSet,
    val: Option<&FeatureSet>,
    test: &FeatureSet,
    cfg: &LinearConfig,
) -> Result<LinearOutcome> {
    check_compatible(train, test, "test")?;
    if let Some(v) = val {
        check_compatible(train, v, "validation")?;
    }
    if cfg.epochs == 0 || cfg.batch_size == 0 {
        return Err(Error::config(
            "linear: epochs and batch size must be positive",
        ));
    }
    let n = train.len();
    let batch = cfg.batch_size.min(n);
    if batch == 0 {
        return Err(Error::config("linear: the training set is empty"));
    }
    let device = train.device();
    let classes = train.num_classes as i64;
    if cfg.standardize && batch < 2 {
        return Err(Error::config(
            "linear: standardisation (BatchNorm) needs batches of at least 2 samples",
        ));
    }
    let mut heads = LinearHeads::new(&train.dims(), classes, cfg.seed, device)?;
    let mut norms: Vec<FeatureNorm> = if cfg.standardize {
        train
            .features
            .iter()
            .map(|f| {
                let n = FeatureNorm::new(f.size()[1], cfg.standardize_eps, NORM_MOMENTUM, device);
                if cfg.standardize_prescale {
                    n.prescaled(f)
                } else {
                    n
                }
            })
            .collect()
    } else {
        Vec::new()
    };
    let mut sgd = Sgd::new(cfg.momentum, cfg.weight_decay);
    let labels = Tensor::from_slice(&train.labels).to_device(device);
    let mut order: Vec<i64> = (0..n as i64).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_add(1));
    let batches = n / batch;
    let _threads = ThreadLimit::new(device, cfg.cpu_threads);
    let start = std::time::Instant::now();
    let bar = ProgressBar::new(cfg.epochs as u64);
    if let Ok(style) = ProgressStyle::with_template("linear {bar:30} {pos}/{len} epochs {msg}") {
        bar.set_style(style);
    }
    let mut history = Vec::with_capacity(cfg.epochs);
    let mut last_scores = None;
    for epoch in 0..cfg.epochs {
        let lr = step_lr(cfg.lr, &cfg.steps, cfg.gamma, epoch);
        order.shuffle(&mut rng);
        let perm = Tensor::from_slice(&order).to_device(device);
        let mut loss_sum = Tensor::zeros([], (Kind::Float, device));
        let mut correct = Tensor::zeros([], (Kind::Int64, device));
        for b in 0..batches {
            let idx = perm.narrow(0, (b * batch) as i64, batch as i64);
            let xs: Vec<Tensor> = train
                .features
                .iter()
                .enumerate()
                .map(|(s, f)| {
                    let x = f.index_select(0, &idx);
                    match norms.get_mut(s) {
                        Some(n) => n.train_forward(&x),
                        None => x,
                    }
                })
                .collect();
            let y = labels.index_select(0, &idx);
            let (loss, hits) = heads.sgd_step(&xs, &y, &mut sgd, lr);
            loss_sum += loss;
            correct += hits;
        }
        let loss = loss_sum.double_value(&[]) / batches as f64;
        let train_top1 = 100.0 * correct.int64_value(&[]) as f64 / (batches * batch) as f64;
        if !loss.is_finite() {
            return Err(Error::Other(format!(
                "linear: the training loss became {loss} at epoch {} (lr {lr} too high?)",
                epoch + 1
            )));
        }
        let e1 = epoch + 1;
        let (mut val_m, mut test_m) = (None, None);
        if is_eval_epoch(e1, cfg.eval_interval, cfg.epochs) {
            let scores = heads.scores_normalized(test, &norms);
            test_m = Some(metrics::evaluate(&scores, &test.labels)?);
            if let Some(v) = val {
                val_m = Some(metrics::evaluate(
                    &heads.scores_normalized(v, &norms),
                    &v.labels,
                )?);
            }
            last_scores = Some(scores);
        }
        bar.set_message(format!(
            "loss {loss:.4} train {train_top1:.1}%{}",
            test_m
                .map(|m| format!(" test {:.2}%", m.top1))
                .unwrap_or_default()
        ));
        bar.inc(1);
        history.push(EpochRecord {
            epoch: e1,
            lr,
            loss,
            train_top1,
            val: val_m,
            test: test_m,
        });
    }
    bar.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    let (best_test, val_selected) = select(&history);
    let best_test =
        best_test.ok_or_else(|| Error::Other("linear: no evaluation happened".into()))?;
    let test_scores =
        last_scores.ok_or_else(|| Error::Other("linear: no evaluation happened".into()))?;
    let last = history
        .last()
        .and_then(|r| r.test)
        .expect("the last epoch is always evaluated");
    let LinearHeads { weights, biases } = heads;
    Ok(LinearOutcome {
        last,
        best_test,
        val_selected,
        history,
        test_scores,
        heads: weights
            .into_iter()
            .map(|w| w.detach())
            .zip(biases.into_iter().map(|b| b.detach()))
            .collect(),
        seconds,
        feature_norms: norms,
    })
}

/// Sets libtorch's intra-op thread count for CPU work until dropped, then restores it.
struct ThreadLimit(Option<i32>);

impl ThreadLimit {
    fn new(device: tch::Device, threads: i32) -> Self {
        if device != tch::Device::Cpu || threads <= 0 {
            return ThreadLimit(None);
        }
        let previous = tch::get_num_threads();
        tch::set_num_threads(threads);
        ThreadLimit(Some(previous))
    }
}

impl Drop for ThreadLimit {
    fn drop(&mut self) {
        if let Some(n) = self.0 {
            tch::set_num_threads(n);
        }
    }
}

/// From an epoch log: (the best test top-1 evaluation, the test at the best validation top-1).
/// Ties go to the earliest epoch.
pub fn select(history: &[EpochRecord]) -> (Option<Selection>, Option<Selection>) {
    let mut best_test: Option<Selection> = None;
    let mut by_val: Option<Selection> = None;
    for r in history {
        if let Some(t) = r.test {
            if best_test.as_ref().is_none_or(|b| t.top1 > b.test.top1) {
                best_test = Some(Selection {
                    epoch: r.epoch,
                    test: t,
                    val: r.val,
                });
            }
            if let Some(v) = r.val {
                if by_val
                    .as_ref()
                    .is_none_or(|b| v.top1 > b.val.map_or(f64::NEG_INFINITY, |m| m.top1))
                {
                    by_val = Some(Selection {
                        epoch: r.epoch,
                        test: t,
                        val: Some(v),
                    });
                }
            }
        }
    }
    (best_test, by_val)
}
