//! The small building blocks of the ST-GCN with the official variable names: batch norm with
//! running statistics as non-trainable buffers, convolution weights in the official shapes. The
//! batch norm's dispatching forwards (fused ops or tch) are in `fused_bn.rs`, one level up: this
//! module depends on nothing of the model.
use crate::dist::ProcessGroup;
use std::sync::Arc;
use tch::nn::{Init, Path};
use tch::{Kind, Tensor};

/// PyTorch BatchNorm defaults (eps, momentum).
pub const BN_EPS: f64 = 1e-5;
pub const BN_MOMENTUM: f64 = 0.1;
/// Official `weights_init`: conv/linear weights N(0, 0.02), BN weights N(1, 0.02).
pub const INIT_STD: f64 = 0.02;

/// `BatchNorm1d/2d(c)`: `weight`, `bias` (trainable), `running_mean`, `running_var`,
/// `num_batches_tracked` (buffers, saved and loaded but not trained).
#[derive(Debug)]
pub struct BatchNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub running_mean: Tensor,
    pub running_var: Tensor,
    pub num_batches_tracked: Tensor,
    /// SyncBatchNorm: with a group, train mode uses the statistics of every rank's batch
    /// ([`ProcessGroup::sync_batch_norm`]); `None` (the default): this process's batch.
    pub sync: Option<Arc<ProcessGroup>>,
}

impl BatchNorm {
    /// Official init: weight ~ N(1, 0.02), bias 0, running mean 0, running var 1.
    pub fn new(p: &Path, channels: i64) -> Self {
        let weight = p.var(
            "weight",
            &[channels],
            Init::Randn {
                mean: 1.0,
                stdev: INIT_STD,
            },
        );
        let bias = p.var("bias", &[channels], Init::Const(0.0));
        let running_mean = p.zeros_no_train("running_mean", &[channels]);
        let running_var = p.ones_no_train("running_var", &[channels]);
        let num_batches_tracked = p.add(
            "num_batches_tracked",
            Tensor::zeros([], (Kind::Int64, p.device())),
            false,
        );
        BatchNorm {
            weight,
            bias,
            running_mean,
            running_var,
            num_batches_tracked,
            sync: None,
        }
    }

    /// The tch path (`Tensor::batch_norm`), batch counter included.
    pub(crate) fn forward_native(&self, x: &Tensor, train: bool) -> Tensor {
        if train {
            tch::no_grad(|| {
                let _ = self.num_batches_tracked.shallow_clone().g_add_scalar_(1);
            });
        }
        x.batch_norm(
            Some(&self.weight),
            Some(&self.bias),
            Some(&self.running_mean),
            Some(&self.running_var),
            train,
            BN_MOMENTUM,
            BN_EPS,
            true,
        )
    }

    /// Training-mode SyncBatchNorm over `group` (batch counter included). A failed collective
    /// (a rank died, or the timeout) panics with the error, which names the silent ranks: a
    /// forward has no error path, and the step cannot go on without the other ranks.
    pub(crate) fn forward_sync(&self, x: &Tensor, group: &ProcessGroup) -> Tensor {
        tch::no_grad(|| {
            let _ = self.num_batches_tracked.shallow_clone().g_add_scalar_(1);
        });
        group
            .sync_batch_norm(
                x,
                &self.weight,
                &self.bias,
                &self.running_mean,
                &self.running_var,
                BN_MOMENTUM,
                BN_EPS,
            )
            .unwrap_or_else(|e| panic!("{e}"))
    }
}

impl BatchNorm {
    /// This batch norm with the bias `b` `(C,)` of the convolution that feeds it folded in, for
    /// exactly one train-mode forward of `conv(x)` computed **without** `b`: the output of a batch
    /// norm with batch statistics is the same for `y` and `y + b` (the batch mean moves by `b`,
    /// the variance does not), so the bias add over the whole activation and, in backward, the
    /// reduction of the whole output gradient into `b`'s gradient (analytically zero: the gradient
    /// of a train-mode batch norm's input sums to zero per channel) are both skipped.
    ///
    /// What stays as in the official code: the running mean (shifted here by
    /// `momentum / (1 - momentum) · b`, so that the forward's own update
    /// `(1 - m) · rm + m · mean(y)` lands on `(1 - m) · rm + m · mean(y + b)`; shifting before the
    /// forward keeps the tensor version that autograd saved), the running variance, and `b`'s
    /// place in the optimiser: when `b` requires grad, the returned batch norm's bias is
    /// `lerp(β, b, 0)` = `β`, so `b` gets an exact zero gradient (PyTorch computes float noise
    /// around zero there) and still gets its weight decay and momentum. The returned struct shares
    /// storage with `self`.
    pub(crate) fn folding(&self, b: &Tensor) -> BatchNorm {
        tch::no_grad(|| {
            let _ = self
                .running_mean
                .shallow_clone()
                .g_add_(&(b.detach() * (BN_MOMENTUM / (1.0 - BN_MOMENTUM))));
        });
        BatchNorm {
            weight: self.weight.shallow_clone(),
            bias: if b.requires_grad() {
                self.bias.lerp(b, 0.0)
            } else {
                self.bias.shallow_clone()
            },
            running_mean: self.running_mean.shallow_clone(),
            running_var: self.running_var.shallow_clone(),
            num_batches_tracked: self.num_batches_tracked.shallow_clone(),
            sync: self.sync.clone(),
        }
    }
}

/// A convolution with the official weight shape `(c_out, c_in, kt, 1)` and a bias `(c_out,)`.
#[derive(Debug)]
pub struct Conv {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl Conv {
    /// Official init: weight ~ N(0, 0.02), bias 0.
    pub fn new(p: &Path, c_in: i64, c_out: i64, kt: i64) -> Self {
        let weight = p.var(
            "weight",
            &[c_out, c_in, kt, 1],
            Init::Randn {
                mean: 0.0,
                stdev: INIT_STD,
            },
        );
        let bias = p.var("bias", &[c_out], Init::Const(0.0));
        Conv { weight, bias }
    }

    /// Output channels.
    pub fn c_out(&self) -> i64 {
        self.weight.size()[0]
    }

    /// The 1x1 weight as a matrix `(c_out, c_in)` (a view).
    pub fn matrix(&self) -> Tensor {
        let s = self.weight.size();
        self.weight.view([s[0], s[1]])
    }
}
