//! One pre-training step as a unit (for the training loop and `crossclr bench`): forward, loss,
//! backward, SGD step, EMA, enqueue.
use crate::data::layout::Layout;
use crate::data::views::View;
use crate::error::{Error, Result};
use crate::ssl::model::{to_device, SslModel, SslSpec};
use crate::train::config::PretrainConfig;
use crate::train::sgd::Sgd;
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
}

/// A non-finite loss: the step was not applied.
pub const NON_FINITE: &str = "non-finite loss";

/// The model and its optimizer (SGD on the query side only; keys and queues are not trained).
pub struct Pretrainer {
    pub model: SslModel,
    pub opt: Sgd,
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
        Ok(Pretrainer { model, opt })
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
    /// enqueue-before-backward, which reads a clone of the queues). A NaN/infinite loss returns an
    /// error starting with [`NON_FINITE`] before the SGD step and the enqueue (the forward's EMA and
    /// BN running statistics are already applied: stop the run, the checkpoints on disk are intact).
    pub fn train_step(&mut self, x_q: &Tensor, x_k: &Tensor, epoch: usize) -> Result<StepStats> {
        let device = self.model.vs_q.device();
        let x_q = to_device(x_q, device);
        let x_k = to_device(x_k, device);
        let out = self.model.forward(&x_q, &x_k, epoch);
        let loss = out.loss.double_value(&[]);
        let view_losses: Vec<(View, f64)> = self
            .model
            .branches
            .iter()
            .zip(&out.view_losses)
            .map(|(b, l)| (b.view, l.double_value(&[])))
            .collect();
        if !loss.is_finite() {
            let per: Vec<String> = view_losses
                .iter()
                .map(|(v, l)| format!("{v} {l}"))
                .collect();
            return Err(Error::Other(format!(
                "{NON_FINITE} {loss} (per view: {})",
                per.join(", ")
            )));
        }
        self.opt.zero_grad();
        out.loss.backward();
        self.opt.step();
        self.model.enqueue(&out.keys)?;
        Ok(StepStats {
            loss,
            view_losses,
            phase: out.phase,
            batch: x_q.size()[0] as usize,
        })
    }
}
