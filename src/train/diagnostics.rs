//! Collapse diagnostics during pre-training (config `diagnostics`, `eval_interval`, `monitor`).
//!
//! At the end of every `diagnostics.interval`-th epoch (and the last one), on a fixed subset of
//! `diagnostics.samples` training samples (drawn once from the run seed; the same samples every
//! time, also after `--resume`), for every view (branch) of the model:
//!
//! * `feat_rank`, `feat_cos`: effective rank ([`effective_rank`]) and mean pairwise cosine
//!   ([`mean_pairwise_cosine`]) of the pooled `hidden_dim` features of the query encoder in eval
//!   mode (BN running statistics, no dropout: the features linear / k-NN evaluation uses) on the
//!   un-augmented samples;
//! * `proj_rank`, `proj_cos`: the same for the L2-normalised projections (query head on those
//!   features; a head with batch norm, `head_bn`, uses the statistics of the whole subset, the only
//!   mode it has);
//! * `align` = E ||z1 - z2||^2 ([`alignment`]) and `uniform` = log E exp(-2 ||zi - zj||^2)
//!   ([`uniformity`], the mean of the two copies' values), Wang & Isola 2020, on the normalised
//!   query projections z1, z2 of two augmented copies of every sample (the run's
//!   `train_feeder_args` augmentation, drawn once from a fixed seeded rng);
//! * `margin` = mean over samples of `q.k - max_j q.queue_j` ([`positive_margin`], in cosine
//!   units, not divided by the temperature): q the query projection of copy 1, k the key
//!   projection of copy 2 (key encoder in eval mode + key head), against the branch's queue.
//!
//! With `eval_interval > 0` and a `monitor` split, every `eval_interval` epochs (and the last) a
//! k-NN monitor runs: eval-mode pooled features of the first (joint) query encoder for the whole
//! training set, un-augmented (the bank, no cap), and for the monitor split (the queries); cosine
//! k-NN k = 1 and weighted k = 20 (T 0.07) top-1 from [`crate::eval::knn`].
//!
//! Everything runs under `no_grad`, draws nothing from torch's generator (eval-mode encoders: no
//! dropout) and leaves every batch-norm running statistic as it was (the head batch norm's are
//! saved before and restored after), so a run with diagnostics gives bit-identical weights to
//! one without.
use crate::data::augment::augment;
use crate::data::dataset::SkeletonDataset;
use crate::data::layout::Layout;
use crate::error::{Error, Result};
use crate::eval::features::batch_tensor;
use crate::eval::knn::{self, KnnConfig};
use crate::model::stgcn::StGcn;
use crate::ssl::branch::{Branch, Head};
use crate::ssl::model::SslModel;
use crate::ssl::queue::normalize_rows_or_cols;
use crate::train::config::PretrainConfig;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Deserializer, Serialize};
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Mixed into the run seed for the subset and its augmentations (independent of the loader's
/// streams, which are keyed by (seed, epoch, position)).
const DIAG_DOMAIN: u64 = 0xD1A6_0057_1C5E_ED00;

/// The diagnostics of one view at one epoch (see the module docs for the definitions).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ViewDiag {
    /// View name (`joint`, `motion`, `bone`, ...).
    pub view: String,
    /// Effective rank of the eval-mode pooled features (1 ..= min(S, hidden_dim)).
    #[serde(deserialize_with = "f64_or_nan")]
    pub feat_rank: f64,
    /// Mean pairwise cosine of the pooled features.
    #[serde(deserialize_with = "f64_or_nan")]
    pub feat_cos: f64,
    /// Effective rank of the normalised projections.
    #[serde(deserialize_with = "f64_or_nan")]
    pub proj_rank: f64,
    /// Mean pairwise cosine of the normalised projections.
    #[serde(deserialize_with = "f64_or_nan")]
    pub proj_cos: f64,
    /// E ||z1 - z2||^2 over the two augmented copies (0 ..= 4).
    #[serde(deserialize_with = "f64_or_nan")]
    pub align: f64,
    /// log E exp(-2 ||zi - zj||^2) over pairs (-4 ..= 0; lower = more uniform).
    #[serde(deserialize_with = "f64_or_nan")]
    pub uniform: f64,
    /// Mean of q.k - max_j q.queue_j (cosine units).
    #[serde(deserialize_with = "f64_or_nan")]
    pub margin: f64,
}

/// `serde_json` writes a non-finite f64 as `null`; read it back as NaN.
fn f64_or_nan<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// The k-NN monitor's result at one epoch (top-1, percent).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KnnRecord {
    /// k = 1 top-1, percent.
    pub k1: f64,
    /// Weighted k = 20 (T 0.07) top-1, percent.
    pub k20: f64,
    /// Bank (training) and query (monitor) sizes.
    pub bank: usize,
    pub queries: usize,
    /// Wall time of the monitor (features of both sets + k-NN).
    pub seconds: f64,
}

/// What [`Diagnostics::measure`] computed at one epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct DiagRecord {
    pub epoch: usize,
    /// One entry per view, in view order; empty when the view diagnostics were not due.
    pub views: Vec<ViewDiag>,
    /// The k-NN monitor, when it was due.
    pub knn: Option<KnnRecord>,
    /// Wall time of the view diagnostics.
    pub seconds: f64,
}

/// The k-NN monitor's data: the training set as the bank and the labelled monitor split.
struct Monitor {
    interval: usize,
    bank: Arc<SkeletonDataset>,
    queries: SkeletonDataset,
    num_classes: usize,
}

/// The diagnostics of a run: the fixed subset and the monitor data, built once at the start.
pub struct Diagnostics {
    /// `diagnostics.interval` (0 = view diagnostics off).
    interval: usize,
    num_epoch: usize,
    rank_warning: f64,
    /// Samples per encoder forward (`test_batch_size`).
    batch: usize,
    layout: Layout,
    /// `(S, C, T, V, M)` f32 CPU: the un-augmented joints of the subset.
    plain: Tensor,
    /// `(S, C, T, V, M)` f32 CPU: two augmented copies of the subset.
    copy1: Tensor,
    copy2: Tensor,
    monitor: Option<Monitor>,
}

impl Diagnostics {
    /// Builds the subset (`min(diagnostics.samples, N)` samples of `dataset`, seeded by the run
    /// seed) and opens the monitor split. `None` when both the diagnostics and the monitor are
    /// off (`diagnostics.interval: 0`, and `eval_interval <= 0` or no `monitor`).
    pub fn new(cfg: &PretrainConfig, dataset: &Arc<SkeletonDataset>) -> Result<Option<Self>> {
        let d = &cfg.diagnostics;
        let monitor = match (&cfg.monitor, cfg.eval_interval) {
            (Some(spec), i) if i > 0 => {
                let queries = crate::data::formats::open(spec)?;
                let (a, b) = (dataset.sample_shape(), queries.sample_shape());
                if (a[0], a[2], a[3]) != (b[0], b[2], b[3]) {
                    return Err(Error::config(format!(
                        "monitor: {} has samples of shape (C, T, V, M) {b:?}, the training data {a:?} (C, V and M must match)",
                        queries.source.display()
                    )));
                }
                if queries.is_empty() {
                    return Err(Error::config(format!(
                        "monitor: {} holds no sample",
                        queries.source.display()
                    )));
                }
                Some(Monitor {
                    interval: i as usize,
                    bank: Arc::clone(dataset),
                    num_classes: dataset.num_classes.max(queries.num_classes),
                    queries,
                })
            }
            _ => None,
        };
        if d.interval == 0 && monitor.is_none() {
            return Ok(None);
        }
        let n = dataset.len();
        let s = d.samples.min(n);
        if d.interval > 0 && s < 2 {
            return Err(Error::config(format!(
                "diagnostics.samples: {} of {n} training samples; the diagnostics need at least 2 (or diagnostics.interval: 0)",
                d.samples
            )));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ DIAG_DOMAIN);
        let mut idx = rand::seq::index::sample(&mut rng, n, s).into_vec();
        idx.sort_unstable();
        let aug = cfg.train_feeder_args.augment();
        let shape = dataset.sample_shape();
        let (mut plain, mut c1, mut c2) = (Vec::new(), Vec::new(), Vec::new());
        for &i in &idx {
            let x = dataset.sample(i);
            plain.extend_from_slice(x);
            c1.extend(augment(x, shape, &aug, &mut rng));
            c2.extend(augment(x, shape, &aug, &mut rng));
        }
        let dims = [
            s as i64,
            shape[0] as i64,
            shape[1] as i64,
            shape[2] as i64,
            shape[3] as i64,
        ];
        let t = |v: &[f32]| Tensor::from_slice(v).view(dims);
        Ok(Some(Diagnostics {
            interval: d.interval,
            num_epoch: cfg.num_epoch,
            rank_warning: d.rank_warning,
            batch: cfg.test_batch_size.max(1),
            layout: dataset.layout.clone(),
            plain: t(&plain),
            copy1: t(&c1),
            copy2: t(&c2),
            monitor,
        }))
    }

    /// Number of subset samples (0 when only the monitor runs).
    pub fn samples(&self) -> usize {
        if self.interval == 0 {
            0
        } else {
            self.plain.size()[0] as usize
        }
    }

    /// Whether the view diagnostics run after 1-based `epoch`.
    pub fn views_due(&self, epoch: usize) -> bool {
        self.interval > 0 && (epoch.is_multiple_of(self.interval) || epoch == self.num_epoch)
    }

    /// Whether the k-NN monitor runs after 1-based `epoch`.
    pub fn knn_due(&self, epoch: usize) -> bool {
        self.monitor
            .as_ref()
            .is_some_and(|m| epoch.is_multiple_of(m.interval) || epoch == self.num_epoch)
    }

    /// Whether anything runs after `epoch`.
    pub fn due(&self, epoch: usize) -> bool {
        self.views_due(epoch) || self.knn_due(epoch)
    }

    /// A one-line description for the run log.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.interval > 0 {
            parts.push(format!(
                "collapse diagnostics every {} epoch(s) on {} fixed training samples (rank warning below {})",
                self.interval,
                self.samples(),
                self.rank_warning
            ));
        }
        if let Some(m) = &self.monitor {
            parts.push(format!(
                "k-NN monitor every {} epoch(s): bank {} training samples, queries {} of {}",
                m.interval,
                m.bank.len(),
                m.queries.len(),
                m.queries.source.display()
            ));
        }
        parts.join("; ")
    }

    /// Computes what is due after `epoch` on `model` (see the module docs). Leaves the model as it
    /// was: no gradients, no torch random draws, BN running statistics restored.
    pub fn measure(&self, model: &SslModel, epoch: usize) -> Result<DiagRecord> {
        let started = Instant::now();
        let views = if self.views_due(epoch) {
            let saved = BnBuffers::save(model);
            let out = tch::no_grad(|| {
                model
                    .branches
                    .iter()
                    .map(|b| self.view_diag(model, b))
                    .collect::<Result<Vec<_>>>()
            });
            saved.restore();
            out?
        } else {
            Vec::new()
        };
        let seconds = started.elapsed().as_secs_f64();
        let knn = match &self.monitor {
            Some(m) if self.knn_due(epoch) => Some(tch::no_grad(|| self.knn(model, m))?),
            _ => None,
        };
        Ok(DiagRecord {
            epoch,
            views,
            knn,
            seconds,
        })
    }

    /// The diagnostics of one branch on the subset.
    fn view_diag(&self, model: &SslModel, b: &Branch) -> Result<ViewDiag> {
        let device = model.vs_q.device();
        let primary_q = &model.branches[0].head_q;
        let primary_k = &model.branches[0].head_k;
        let feat = |enc: &StGcn, x: &Tensor| pooled(enc, b, &self.layout, x, self.batch, device);
        let proj = |head: &Head, primary: &Head, f: &Tensor| {
            normalize_rows_or_cols(&head.forward(f, Some(primary)), 1)
        };
        // (S, hidden_dim) features, (S, feature_dim) normalised projections.
        let f0 = feat(&b.encoder_q, &self.plain);
        let z0 = proj(&b.head_q, primary_q, &f0);
        let z1 = proj(&b.head_q, primary_q, &feat(&b.encoder_q, &self.copy1));
        let z2 = proj(&b.head_q, primary_q, &feat(&b.encoder_q, &self.copy2));
        let k2 = proj(&b.head_k, primary_k, &feat(&b.encoder_k, &self.copy2));
        let margin = positive_margin(&z1, &k2, &b.queue.keys);
        Ok(ViewDiag {
            view: b.view.name().to_string(),
            feat_rank: effective_rank(&f0),
            feat_cos: mean_pairwise_cosine(&f0),
            proj_rank: effective_rank(&z0),
            proj_cos: mean_pairwise_cosine(&z0),
            align: alignment(&z1, &z2),
            uniform: 0.5 * (uniformity(&z1) + uniformity(&z2)),
            margin,
        })
    }

    /// The k-NN monitor: joint (first) query encoder, eval mode, whole training set as the bank.
    fn knn(&self, model: &SslModel, m: &Monitor) -> Result<KnnRecord> {
        let started = Instant::now();
        let device = model.vs_q.device();
        let b = &model.branches[0];
        let features = |ds: &SkeletonDataset| -> Tensor {
            let n = ds.len();
            let mut parts = Vec::new();
            let mut start = 0;
            while start < n {
                let len = self.batch.min(n - start);
                let x = batch_tensor(ds, start, len).to_device(device);
                parts.push(b.encoder_q.forward(&b.input(&x, &self.layout), false));
                start += len;
            }
            Tensor::cat(&parts, 0)
        };
        let bank = features(&m.bank);
        let queries = features(&m.queries);
        let out = knn::evaluate(
            &[bank],
            &m.bank.labels,
            &[queries],
            &m.queries.labels,
            m.num_classes,
            &[KnnConfig::nearest(), KnnConfig::weighted20()],
        )?;
        Ok(KnnRecord {
            k1: out[0].metrics.top1,
            k20: out[1].metrics.top1,
            bank: m.bank.len(),
            queries: m.queries.len(),
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// The log lines of `r`: one summary line, then a collapse warning per view whose feature
    /// effective rank is below `rank_warning` (or not finite).
    pub fn log_lines(&self, r: &DiagRecord) -> Vec<String> {
        let mut parts: Vec<String> = r
            .views
            .iter()
            .map(|v| {
                format!(
                    "{} feat rank {:.1} cos {:.3} | proj rank {:.1} cos {:.3} align {:.3} unif {:.3} margin {:.3}",
                    v.view, v.feat_rank, v.feat_cos, v.proj_rank, v.proj_cos, v.align, v.uniform, v.margin
                )
            })
            .collect();
        let mut timing = Vec::new();
        if !r.views.is_empty() {
            timing.push(format!("{:.2} s on {} samples", r.seconds, self.samples()));
        }
        if let Some(k) = &r.knn {
            parts.push(format!("kNN k1 {:.1}% k20 {:.1}%", k.k1, k.k20));
            timing.push(format!(
                "kNN {:.2} s, bank {} / queries {}",
                k.seconds, k.bank, k.queries
            ));
        }
        let mut lines = vec![format!(
            "diagnostics epoch {}: {} ({})",
            r.epoch,
            parts.join("; "),
            timing.join(", ")
        )];
        for v in &r.views {
            if v.feat_rank.is_nan() || v.feat_rank < self.rank_warning {
                lines.push(format!(
                    "WARNING: collapse? {} feature effective rank {:.1} < rank_warning {}",
                    v.view, v.feat_rank, self.rank_warning
                ));
            }
        }
        lines
    }
}

/// Eval-mode pooled features `(S, hidden_dim)` of `enc` on the view of `b` of joints `x`
/// `(S, C, T, V, M)` (CPU), `batch` samples per forward on `device`.
fn pooled(
    enc: &StGcn,
    b: &Branch,
    layout: &Layout,
    x: &Tensor,
    batch: usize,
    device: Device,
) -> Tensor {
    let parts: Vec<Tensor> = x
        .split(batch as i64, 0)
        .iter()
        .map(|c| enc.forward(&b.input(&c.to_device(device), layout), false))
        .collect();
    Tensor::cat(&parts, 0)
}

/// Batch-norm running statistics of both stores (`*.running_mean`, `*.running_var`,
/// `*.num_batches_tracked`), copied so that forwards which update them can be undone.
struct BnBuffers(Vec<(Tensor, Tensor)>);

impl BnBuffers {
    fn save(model: &SslModel) -> Self {
        let mut v = Vec::new();
        for vs in [&model.vs_q, &model.vs_k] {
            for (name, t) in vs.variables() {
                if name.ends_with("running_mean")
                    || name.ends_with("running_var")
                    || name.ends_with("num_batches_tracked")
                {
                    let copy = tch::no_grad(|| t.copy());
                    v.push((t, copy));
                }
            }
        }
        BnBuffers(v)
    }

    fn restore(self) {
        tch::no_grad(|| {
            for (mut t, saved) in self.0 {
                t.copy_(&saved);
            }
        });
    }
}

/// `x` `(N, D)` as f64 on the CPU (the statistics below are cheap; this keeps them exact and
/// device-independent).
fn host(x: &Tensor) -> Tensor {
    x.detach().to_device(Device::Cpu).to_kind(Kind::Double)
}

/// Rows of `x` `(N, D)` L2-normalised (zero rows stay zero).
fn unit_rows(x: &Tensor) -> Tensor {
    normalize_rows_or_cols(x, 1)
}

/// Effective rank (Roy & Vetterli 2007) of `x` `(N, D)`: `exp(H(p))` with `p = s / sum(s)` the
/// normalised singular values of the row-centred matrix and `H` the Shannon entropy (nats).
/// Between 1 and `min(N - 1, D)`; about `D` for isotropic data, 1 for rank-1 data; 0 for a matrix
/// whose rows are all equal (complete collapse); NaN if `x` is not finite.
pub fn effective_rank(x: &Tensor) -> f64 {
    let x = host(x);
    let centred = &x - x.mean_dim([0i64].as_slice(), true, Kind::Double);
    let (_, s, _) = centred.svd(true, false);
    let total = s.sum(Kind::Double).double_value(&[]);
    if total.is_nan() {
        return f64::NAN;
    }
    let max = s.max().double_value(&[]);
    // Values at rounding level of the largest are zero (p log p -> 0).
    if total <= 0.0 || max <= 0.0 {
        return 0.0;
    }
    let s = s.where_self(&s.gt(max * 1e-12), &s.zeros_like());
    let p = &s / s.sum(Kind::Double);
    let plogp = &p * p.clamp_min(1e-300).log();
    (-plogp.sum(Kind::Double).double_value(&[])).exp()
}

/// Mean cosine similarity over ordered pairs of distinct rows of `x` `(N, D)` (the off-diagonal
/// mean of the cosine matrix); NaN for N < 2.
pub fn mean_pairwise_cosine(x: &Tensor) -> f64 {
    let z = unit_rows(&host(x));
    let n = z.size()[0];
    if n < 2 {
        return f64::NAN;
    }
    let g = z.matmul(&z.tr());
    let off = g.sum(Kind::Double).double_value(&[]) - g.trace().double_value(&[]);
    off / (n * (n - 1)) as f64
}

/// Alignment (Wang & Isola 2020): mean over rows of `||z1_i - z2_i||^2`, for normalised `z1`,
/// `z2` `(N, D)` of two augmentations of the same samples.
pub fn alignment(z1: &Tensor, z2: &Tensor) -> f64 {
    let d = host(z1) - host(z2);
    d.square()
        .sum_dim_intlist([1i64].as_slice(), false, Kind::Double)
        .mean(Kind::Double)
        .double_value(&[])
}

/// Uniformity (Wang & Isola 2020, t = 2): `log` of the mean over pairs `i != j` of
/// `exp(-2 ||z_i - z_j||^2)`, for normalised `z` `(N, D)`; NaN for N < 2.
pub fn uniformity(z: &Tensor) -> f64 {
    if z.size()[0] < 2 {
        return f64::NAN;
    }
    crate::ssl::loss::uniformity(&host(z)).double_value(&[])
}

/// Positive-logit margin: mean over rows of `q_i . k_i - max_j q_i . queue_j` for normalised
/// queries `q` and keys `k` `(N, D)` and the queue `(D, K)` (any device; cosine units).
pub fn positive_margin(q: &Tensor, k: &Tensor, queue: &Tensor) -> f64 {
    let pos = (q * k).sum_dim_intlist([1i64].as_slice(), false, Kind::Float);
    let neg = q.matmul(queue).amax([1i64].as_slice(), false);
    (pos - neg).mean(Kind::Double).double_value(&[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_rank_isotropic_and_rank_one() {
        tch::manual_seed(3);
        let d = 16;
        let iso = Tensor::randn([4000, d], (Kind::Float, Device::Cpu));
        let r = effective_rank(&iso);
        assert!(
            r > 0.97 * d as f64 && r <= d as f64 + 1e-9,
            "isotropic: {r}"
        );
        // Rank 1: every row a multiple of one direction (plus a common offset, removed by the
        // centring).
        let u = Tensor::randn([1, 32], (Kind::Float, Device::Cpu));
        let a = Tensor::randn([500, 1], (Kind::Float, Device::Cpu));
        let r1 = effective_rank(&(a.matmul(&u) + 3.0));
        assert!((r1 - 1.0).abs() < 1e-3, "rank 1: {r1}");
        // Rank 3 with equal spread: about 3.
        let b = Tensor::randn([3000, 3], (Kind::Float, Device::Cpu));
        let (q, _) = Tensor::linalg_qr(
            &Tensor::randn([32, 3], (Kind::Double, Device::Cpu)),
            "reduced",
        );
        let r3 = effective_rank(&b.to_kind(Kind::Double).matmul(&q.tr()));
        assert!((r3 - 3.0).abs() < 0.1, "rank 3: {r3}");
        // All rows equal: complete collapse.
        assert_eq!(
            effective_rank(&Tensor::ones([10, 4], (Kind::Float, Device::Cpu))),
            0.0
        );
    }

    #[test]
    fn cosine_alignment_uniformity_margin() {
        let same = Tensor::from_slice(&[1.0f32, 0.0, 2.0, 0.0, 0.5, 0.0]).view([3, 2]);
        assert!((mean_pairwise_cosine(&same) - 1.0).abs() < 1e-12);
        let opposite = Tensor::from_slice(&[1.0f32, 0.0, -1.0, 0.0]).view([2, 2]);
        assert!((mean_pairwise_cosine(&opposite) + 1.0).abs() < 1e-12);
        assert!(alignment(&same, &same).abs() < 1e-12);
        // Two antipodal points: ||zi - zj||^2 = 4, uniformity = -8.
        let z = Tensor::from_slice(&[1.0f32, 0.0, -1.0, 0.0]).view([2, 2]);
        assert!((uniformity(&z) + 8.0).abs() < 1e-9);
        assert!((alignment(&z, &z.flip([0i64])) - 4.0).abs() < 1e-9);
        // Collapsed: uniformity 0.
        let c = Tensor::from_slice(&[0.0f32, 1.0, 0.0, 1.0, 0.0, 1.0]).view([3, 2]);
        assert!(uniformity(&c).abs() < 1e-9);
        // Margin: q = k = e0, queue columns e1 and (cos 0.5) -> 1 - 0.5.
        let q = Tensor::from_slice(&[1.0f32, 0.0]).view([1, 2]);
        let queue = Tensor::from_slice(&[0.0f32, 0.5, 1.0, 0.866_025_4]).view([2, 2]);
        assert!((positive_margin(&q, &q, &queue) - 0.5).abs() < 1e-6);
    }
}
