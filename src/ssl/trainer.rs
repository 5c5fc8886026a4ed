//! One pre-training step as a unit (for the training loop and `crossclr bench`): forward, loss,
//! backward, SGD step, EMA, enqueue.
use crate::data::layout::Layout;
use crate::data::views::View;
use crate::dist::{GradBuckets, ProcessGroup};
use crate::error::{Error, Result};
use crate::ssl::model::{to_device, SslModel, SslSpec, StepOutput};
use crate::train::config::{NonFinitePolicy, NumericsArgs, PretrainConfig};
use crate::train::numerics::{self, StepSnapshot, NON_FINITE_GRAD};
use crate::train::sgd::Sgd;
use std::sync::Arc;
use tch::{Device, Tensor};

/// What one step reports.
#[derive(Debug, Clone, PartialEq)]
pub struct StepStats {
    /// Total loss (sum over views).
    pub loss: f64,
    /// Per-view loss, in view order.
    pub view_losses: Vec<(View, f64)>,
    /// 1 = MoCo, 2 = CVC-KM.
    pub phase: u8,
    /// Samples in the batch.
    pub batch: usize,
    /// With `numerics.non_finite: skip`: why this step was skipped (nothing of it was applied);
    /// `loss` and `view_losses` are then the non-finite values.
    pub skipped: Option<String>,
}

/// A non-finite loss: the step was not applied.
pub const NON_FINITE: &str = crate::train::numerics::NON_FINITE_LOSS;

/// The model and its optimizer (SGD on the query side only; keys and queues are not trained).
pub struct Pretrainer {
    pub model: SslModel,
    pub opt: Sgd,
    /// The data-parallel group this trainer is a rank of ([`Pretrainer::join_group`]).
    pub group: Option<Arc<ProcessGroup>>,
    /// The non-finite guards (`numerics`: stop or skip, gradient check).
    pub numerics: NumericsArgs,
    /// Fault injection for tests (`--inject-nan grad:<n>`): the next `train_step` overwrites its
    /// first gradient with NaN after the backward pass (and clears this flag).
    pub poison_next_grad: bool,
    /// SyncBatchNorm once a group is joined (the config's `sync_bn`; set before
    /// [`Pretrainer::join_group`]).
    pub sync_bn: bool,
    /// Shuffle BN across the ranks once a group is joined (the config's `dist_shuffle_bn`).
    pub dist_shuffle_bn: bool,
    /// The batch-norm running statistics averaged over the ranks after every step (taken once
    /// when the group is joined; empty without a group or with `sync_bn`).
    averaged_statistics: Vec<Tensor>,
    /// Gradient buckets of about this many MiB, all-reduced during backward once a group is
    /// joined (the config's `bucket_cap_mb`; 0 = one all-reduce after backward).
    pub bucket_cap_mb: f64,
    /// The bucketer, made by the first step after joining a group with `bucket_cap_mb` > 0
    /// (`Some(None)`: the group cannot bucket these parameters; a fast step makes its own).
    buckets: Option<Option<GradBuckets>>,
}

impl Pretrainer {
    /// Builds model + optimizer from a config on `device` (seed torch first for reproducibility).
    /// The encoders compute with the config's `kernels`, resolved for `device`.
    pub fn from_config(cfg: &PretrainConfig, layout: &Layout, device: Device) -> Result<Self> {
        let spec = SslSpec::from_config(cfg)?;
        let mut trainer = Self::new(
            &spec,
            layout,
            device,
            cfg.base_lr,
            cfg.sgd_momentum,
            cfg.weight_decay,
        )?;
        trainer.model.set_kernels(cfg.kernels.resolved(device));
        trainer.numerics = cfg.numerics.clone();
        trainer.sync_bn = cfg.sync_bn;
        trainer.dist_shuffle_bn = cfg.dist_shuffle_bn;
        trainer.bucket_cap_mb = cfg.bucket_cap_mb;
        Ok(trainer)
    }

    /// Builds from a spec with SGD (`lr`, `momentum`, `weight_decay`).
    pub fn new(
        spec: &SslSpec,
        layout: &Layout,
        device: Device,
        lr: f64,
        momentum: f64,
        weight_decay: f64,
    ) -> Result<Self> {
        let model = SslModel::new(spec, layout, device)?;
        let opt = Sgd::new(model.trainable(), lr, momentum, weight_decay);
        Ok(Pretrainer {
            model,
            opt,
            group: None,
            numerics: NumericsArgs::default(),
            poison_next_grad: false,
            sync_bn: false,
            dist_shuffle_bn: false,
            averaged_statistics: Vec::new(),
            bucket_cap_mb: 0.0,
            buckets: None,
        })
    }

    /// Makes this trainer one rank of a data-parallel job (`crate::dist`): its variables
    /// (parameters, batch-norm statistics, queues) become rank 0's, and from then on every step
    /// averages the loss, the gradients and the batch-norm running statistics over the ranks and
    /// enqueues every rank's keys, in rank order (the queues advance by `B · world` and stay identical on every rank, so CVC-KM mines
    /// the same neighbours everywhere). The queue pointers must already agree (a fresh model, or
    /// the same checkpoint on every rank). With [`Pretrainer::sync_bn`] every batch norm becomes
    /// a SyncBatchNorm over the group (the running statistics then stay identical without the
    /// averaging).
    pub fn join_group(&mut self, group: Arc<ProcessGroup>) -> Result<()> {
        group.broadcast_vars(&self.model.vs_q)?;
        group.broadcast_vars(&self.model.vs_k)?;
        self.model
            .set_rank_rows(Some(crate::model::stgcn::RankRows {
                rank: group.rank(),
                world: group.world_size(),
            }));
        if self.sync_bn {
            self.model.set_sync_bn(Some(Arc::clone(&group)));
        } else {
            self.averaged_statistics = self.model.running_statistics();
        }
        if self.dist_shuffle_bn {
            self.model.set_shuffle_group(Some(Arc::clone(&group)));
        }
        self.buckets = None;
        self.group = Some(group);
        Ok(())
    }

    /// How many gradient buckets the steps all-reduce during backward (0: one all-reduce after
    /// backward, or no group; known after the first step).
    pub fn gradient_buckets(&self) -> usize {
        self.buckets
            .as_ref()
            .and_then(Option::as_ref)
            .map_or(0, GradBuckets::len)
    }

    /// The model's forward; with SyncBatchNorm or shuffle BN across ranks a failed collective inside it (which panics, a
    /// forward having no error path) becomes an error that names the failure.
    fn forward(&self, x_q: &Tensor, x_k: &Tensor, epoch: usize) -> Result<StepOutput> {
        if self.group.is_none() || !(self.sync_bn || self.dist_shuffle_bn) {
            return Ok(self.model.forward(x_q, x_k, epoch));
        }
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.model.forward(x_q, x_k, epoch)
        }))
        .map_err(|p| {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic without a message".into());
            Error::Other(format!("forward: {msg}"))
        })
    }

    pub fn set_lr(&mut self, lr: f64) {
        self.opt.lr = lr;
    }

    /// A 1-based epoch in the given phase (1 or 2), for benchmarks.
    pub fn epoch_for_phase(&self, phase: u8) -> usize {
        match (&self.model.spec.cross, phase) {
            (Some(c), 2) => c.cross_epoch + 1,
            _ => 1,
        }
    }

    /// One training step on augmented joint batches `x_q`, `x_k` (B, C, T, V, M) (any device; moved
    /// to the model's). Order as the official code: queries, EMA, keys, logits with the current
    /// queues, loss, backward, SGD step; the keys are enqueued after (equivalent to the official
    /// enqueue-before-backward, which reads a clone of the queues).
    ///
    /// A NaN/infinite loss, or (with `numerics.check_grads`) gradient, is found before the SGD
    /// step and the enqueue. With `numerics.non_finite: stop` it returns an error starting with
    /// [`NON_FINITE`] or [`NON_FINITE_GRAD`] that names the first non-finite tensor (the forward's
    /// EMA and BN running statistics are already applied: stop the run, the checkpoints on disk
    /// are intact). With `skip` the step is undone (key encoders and statistics restored from a
    /// snapshot taken before the forward) and `Ok` reports it in [`StepStats::skipped`].
    pub fn train_step(&mut self, x_q: &Tensor, x_k: &Tensor, epoch: usize) -> Result<StepStats> {
        let skip = self.numerics.non_finite == NonFinitePolicy::Skip;
        let device = self.model.vs_q.device();
        // The model's floating dtype (float32, or float64 after `vs_q.double()`).
        let kind = self.opt.params().first().map(|(_, p)| p.kind());
        let (x_q, x_k) = match kind {
            Some(tch::Kind::Double) => (
                x_q.to_kind(tch::Kind::Double).to_device(device),
                x_k.to_kind(tch::Kind::Double).to_device(device),
            ),
            _ => (to_device(x_q, device), to_device(x_k, device)),
        };
        let snapshot = skip.then(|| StepSnapshot::take(&self.model));
        let out = self.forward(&x_q, &x_k, epoch)?;
        let mut host = vec![out.loss.double_value(&[])];
        host.extend(out.view_losses.iter().map(|l| l.double_value(&[])));
        if let Some(g) = &self.group {
            // Every rank sees the mean, so all stop together on a non-finite one.
            let t = Tensor::from_slice(&host);
            g.all_reduce_mean_(std::slice::from_ref(&t))?;
            host = Vec::<f64>::try_from(&t)?;
        }
        let loss = host[0];
        let view_losses: Vec<(View, f64)> = self
            .model
            .branches
            .iter()
            .zip(&host[1..])
            .map(|(b, l)| (b.view, *l))
            .collect();
        let batch = x_q.size()[0] as usize;
        let stats = |skipped: Option<String>| StepStats {
            loss,
            view_losses: view_losses.clone(),
            phase: out.phase,
            batch,
            skipped,
        };
        if !loss.is_finite() {
            let per: Vec<String> = view_losses
                .iter()
                .map(|(v, l)| format!("{v} {l}"))
                .collect();
            let culprit = numerics::locate(&self.model, &[("x_q", &x_q), ("x_k", &x_k)], &out.keys)
                .unwrap_or_else(|| {
                    "none of the inputs, variables or keys: the loss computation overflowed".into()
                });
            let what = format!(
                "{NON_FINITE} {loss} (per view: {}); first non-finite tensor: {culprit}",
                per.join(", ")
            );
            return match snapshot {
                Some(s) => {
                    s.restore();
                    Ok(stats(Some(what)))
                }
                None => Err(Error::Other(what)),
            };
        }
        self.opt.zero_grad();
        // Gradient buckets all-reduce during backward (not when a gradient is to be poisoned:
        // that test hook needs the gradients before the all-reduce).
        if let (None, Some(g), true) = (&self.buckets, &self.group, self.bucket_cap_mb > 0.0) {
            let params: Vec<Tensor> = self
                .opt
                .params()
                .iter()
                .map(|(_, p)| p.shallow_clone())
                .collect();
            let cap = (self.bucket_cap_mb * 1024.0 * 1024.0) as usize;
            self.buckets = Some(GradBuckets::new(g, &params, cap)?);
        }
        let buckets = self
            .buckets
            .as_ref()
            .and_then(Option::as_ref)
            .filter(|_| !self.poison_next_grad);
        if let Some(b) = buckets {
            b.arm()?;
        }
        // SyncBatchNorm's backward runs collectives: a dead rank is an error here, not a panic.
        out.loss
            .f_backward()
            .map_err(|e| Error::Other(format!("backward: {e}")))?;
        if let Some(b) = buckets {
            b.finish()?;
        }
        // (parameter index in optimizer order, its gradient), for the parameters that have one.
        let named_grads: Vec<(usize, Tensor)> = self
            .opt
            .params()
            .iter()
            .map(|(_, p)| p.grad())
            .enumerate()
            .filter(|(_, g)| g.defined())
            .collect();
        if std::mem::take(&mut self.poison_next_grad) {
            if let Some((_, g)) = named_grads.first() {
                let _guard = tch::no_grad_guard();
                let _ = g.shallow_clone().fill_(f64::NAN);
            }
        }
        let grads: Vec<Tensor> = named_grads.iter().map(|(_, g)| g.shallow_clone()).collect();
        if let (Some(g), None) = (&self.group, buckets) {
            g.all_reduce_mean_(&grads)?;
        }
        // After the all-reduce: every rank decides on the same (averaged) gradients.
        if self.numerics.check_grads && !numerics::all_finite(&grads) {
            let culprit = numerics::first_non_finite(
                named_grads
                    .iter()
                    .map(|(i, g)| (format!("the gradient of {}", self.opt.params()[*i].0), g)),
            )
            .unwrap_or_else(|| "the gradient sums overflow".into());
            let what = format!(
                "{NON_FINITE_GRAD} (loss {loss:.4} was finite): first non-finite tensor: {culprit}"
            );
            self.opt.zero_grad();
            return match snapshot {
                Some(s) => {
                    s.restore();
                    Ok(stats(Some(what)))
                }
                None => Err(Error::Other(what)),
            };
        }
        let keys = match &self.group {
            None => out.keys.iter().map(Tensor::shallow_clone).collect(),
            Some(g) => out
                .keys
                .iter()
                .map(|k| g.all_gather(k))
                .collect::<Result<Vec<_>>>()?,
        };
        self.opt.step();
        if let Some(g) = &self.group {
            // Without sync_bn each rank's batch norms saw only its share of the batch: their
            // running statistics are averaged, so that every rank keeps the same model (PyTorch's
            // DDP keeps rank 0's).
            g.all_reduce_mean_(&self.averaged_statistics)?;
        }
        self.model.enqueue(&keys)?;
        Ok(stats(None))
    }
}
