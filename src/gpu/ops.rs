//! Multi-tensor ("foreach" / fused) parameter updates and numeric-mode switches, through the shim.
//!
//! These replace per-parameter loops (hundreds of tiny kernels per step for the 6-encoder CrosSCLR
//! model) with a handful of multi-tensor kernels. They run on CPU too (foreach ops fall back to
//! per-tensor loops there), so the same code path is tested without a GPU.
use super::ffi;
use crate::error::{Error, Result};
use tch::Tensor;

/// Momentum (EMA) update of key parameters from query parameters, in place, without autograd:
/// `keys[i] = m * keys[i] + (1 - m) * queries[i]` (the official MoCo update, `m` = 0.999).
///
/// Pairs must match in shape, dtype and device. A storage listed twice among `keys` is an error:
/// foreach kernels update the list in parallel, so a key module shared by several encoders (the
/// CrosSCLR shared head) must be updated by separate calls, one per owner, in the official order.
pub fn ema_(keys: &[Tensor], queries: &[Tensor], m: f64) -> Result<()> {
    if keys.len() != queries.len() {
        return Err(Error::Other(format!(
            "ema_: {} key tensors but {} query tensors",
            keys.len(),
            queries.len()
        )));
    }
    if !(0.0..=1.0).contains(&m) {
        return Err(Error::config(format!(
            "ema_: momentum {m} is outside [0, 1]"
        )));
    }
    #[cfg(not(crossclr_no_shim))]
    {
        let k = ffi::ptrs(keys);
        let q = ffi::ptrs(queries);
        // SAFETY: k and q hold `len` valid tensor pointers that outlive the call.
        ffi::call("ema_", |err| unsafe {
            ffi::crossclr_ema_(k.as_ptr(), q.as_ptr(), k.len(), m, err)
        })
    }
    #[cfg(crossclr_no_shim)]
    {
        Err(ffi::no_shim("ema_"))
    }
}

/// The learning rate of [`fused_sgd_`]: a plain value (baked into a CUDA graph at capture time) or
/// a one-element tensor on the parameters' device (read by the kernel: change it with `fill_`
/// between graph replays, no recapture needed).
#[derive(Clone, Copy)]
pub enum Lr<'a> {
    Value(f64),
    Tensor(&'a Tensor),
}

/// SGD hyper-parameters of the official pre-training: momentum 0.9, dampening 0, no Nesterov,
/// weight decay 1e-4 folded into the gradient (`g + wd * p`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdConfig {
    pub momentum: f64,
    pub weight_decay: f64,
}

impl Default for SgdConfig {
    fn default() -> Self {
        SgdConfig {
            momentum: 0.9,
            weight_decay: 1e-4,
        }
    }
}

/// One fused SGD step over parameter lists (PyTorch's `_fused_sgd_`), in place:
/// `g = grad + wd * p; buf = momentum * buf + g; p -= lr * buf`.
///
/// `bufs` are the momentum buffers, created as zeros (`p.zeros_like()`): with dampening 0 the
/// first step then gives `buf = g`, exactly PyTorch's first-step `buf = clone(g)`, so the same
/// kernel runs on every step. Every parameter must have a gradient (pass only those that do).
pub fn fused_sgd_(
    params: &[Tensor],
    grads: &[Tensor],
    bufs: &[Tensor],
    cfg: &SgdConfig,
    lr: Lr,
) -> Result<()> {
    if params.len() != grads.len() || params.len() != bufs.len() {
        return Err(Error::Other(format!(
            "fused_sgd_: {} params, {} grads, {} momentum buffers",
            params.len(),
            grads.len(),
            bufs.len()
        )));
    }
    #[cfg(not(crossclr_no_shim))]
    {
        let p = ffi::ptrs(params);
        let g = ffi::ptrs(grads);
        let b = ffi::ptrs(bufs);
        let (lr_value, lr_tensor) = match lr {
            Lr::Value(v) => (v, std::ptr::null_mut()),
            Lr::Tensor(t) => (f64::NAN, t.as_ptr() as ffi::TensorPtr),
        };
        // SAFETY: the pointer vectors (and the lr tensor) outlive the call.
        ffi::call("fused_sgd_", |err| unsafe {
            ffi::crossclr_fused_sgd_(
                p.as_ptr(),
                g.as_ptr(),
                b.as_ptr(),
                p.len(),
                cfg.weight_decay,
                cfg.momentum,
                lr_value,
                lr_tensor,
                err,
            )
        })
    }
    #[cfg(crossclr_no_shim)]
    {
        let _ = (cfg, lr);
        Err(ffi::no_shim("fused_sgd_"))
    }
}

/// Clears the gradients of `params`: `set_to_none` drops them (the next backward allocates new
/// ones; PyTorch's default), otherwise defined gradients are zeroed in place by one foreach kernel.
pub fn zero_grad_(params: &[Tensor], set_to_none: bool) -> Result<()> {
    #[cfg(not(crossclr_no_shim))]
    {
        let p = ffi::ptrs(params);
        // SAFETY: p outlives the call.
        ffi::call("zero_grad_", |err| unsafe {
            ffi::crossclr_zero_grad_(p.as_ptr(), p.len(), i32::from(set_to_none), err)
        })
    }
    #[cfg(crossclr_no_shim)]
    {
        let _ = (params, set_to_none);
        Err(ffi::no_shim("zero_grad_"))
    }
}

/// A fused SGD optimiser over a fixed parameter list: owns zero-initialised momentum buffers and a
/// device-resident learning rate, so a step is graph-capturable and lr changes need no recapture.
pub struct FusedSgd {
    params: Vec<Tensor>,
    bufs: Vec<Tensor>,
    lr: Tensor,
    cfg: SgdConfig,
}

impl FusedSgd {
    /// `params`: the trainable tensors (shallow clones are kept; they share storage).
    pub fn new(params: &[Tensor], lr: f64, cfg: SgdConfig) -> Result<Self> {
        let first = params
            .first()
            .ok_or_else(|| Error::config("FusedSgd: empty parameter list"))?;
        let bufs = tch::no_grad(|| params.iter().map(|p| p.zeros_like()).collect());
        let lr = Tensor::from_slice(&[lr])
            .to_kind(first.kind())
            .to_device(first.device());
        Ok(FusedSgd {
            params: params.iter().map(|p| p.shallow_clone()).collect(),
            bufs,
            lr,
            cfg,
        })
    }

    /// Sets the learning rate in place on the device (safe between graph replays).
    pub fn set_lr(&mut self, lr: f64) {
        let _ = self.lr.fill_(lr);
    }

    /// The momentum buffers, in parameter order (for checkpoints).
    pub fn momentum_buffers(&self) -> &[Tensor] {
        &self.bufs
    }

    /// Overwrites the momentum buffers in place (their addresses stay valid for a captured graph),
    /// in parameter order: `Some(t)` copies `t` (any device, cast to the buffer's dtype), `None`
    /// zeroes the buffer. A zero buffer is exactly `torch.optim.SGD`'s "no buffer yet" state (the
    /// next step gives `buf = 0.9 * 0 + g = g` bit for bit), so a state exported by
    /// `train::sgd::Sgd::state` (buffers only for parameters already stepped) loads exactly.
    pub fn load_momentum(&mut self, bufs: &[Option<&Tensor>]) -> Result<()> {
        if bufs.len() != self.bufs.len() {
            return Err(Error::Other(format!(
                "FusedSgd::load_momentum: {} buffers given, {} parameters",
                bufs.len(),
                self.bufs.len()
            )));
        }
        for (i, (dst, src)) in self.bufs.iter_mut().zip(bufs).enumerate() {
            match src {
                Some(src) => {
                    if src.size() != dst.size() {
                        return Err(Error::Other(format!(
                            "FusedSgd::load_momentum: buffer {i} has shape {:?}, parameter has {:?}",
                            src.size(),
                            dst.size()
                        )));
                    }
                    tch::no_grad(|| dst.f_copy_(src))?;
                }
                None => {
                    let _ = tch::no_grad(|| dst.f_zero_())?;
                }
            }
        }
        Ok(())
    }

    /// Clears the gradients (see [`zero_grad_`]).
    pub fn zero_grad(&self, set_to_none: bool) -> Result<()> {
        zero_grad_(&self.params, set_to_none)
    }

    /// One step. Every parameter must have a gradient after backward.
    pub fn step(&mut self) -> Result<()> {
        let grads: Vec<Tensor> = self.params.iter().map(|p| p.grad()).collect();
        if let Some(i) = grads.iter().position(|g| !g.defined()) {
            return Err(Error::Other(format!(
                "FusedSgd::step: parameter {i} has no gradient"
            )));
        }
        fused_sgd_(
            &self.params,
            &grads,
            &self.bufs,
            &self.cfg,
            Lr::Tensor(&self.lr),
        )
    }
}

/// TF32 for float32 matmuls (cuBLAS) and convolutions (cuDNN), like PyTorch's
/// `torch.backends.cuda.matmul.allow_tf32` / `torch.backends.cudnn.allow_tf32`. Both libraries'
/// defaults (matmul off, cuDNN on) are left alone unless this is called.
pub fn set_tf32(on: bool) -> Result<()> {
    #[cfg(not(crossclr_no_shim))]
    {
        // SAFETY: plain flag setters.
        ffi::call("set_tf32", |err| unsafe {
            ffi::crossclr_set_tf32(i32::from(on), err)
        })
    }
    #[cfg(crossclr_no_shim)]
    {
        let _ = on;
        Err(ffi::no_shim("set_tf32"))
    }
}

/// Current TF32 switches: `(cublas_matmul, cudnn_conv)`.
pub fn tf32_state() -> Result<(bool, bool)> {
    #[cfg(not(crossclr_no_shim))]
    {
        let (mut cublas, mut cudnn) = (0, 0);
        // SAFETY: the out-pointers are valid for the call.
        ffi::call("tf32_state", |err| unsafe {
            ffi::crossclr_get_tf32(&mut cublas, &mut cudnn, err)
        })?;
        Ok((cublas != 0, cudnn != 0))
    }
    #[cfg(crossclr_no_shim)]
    {
        Err(ffi::no_shim("tf32_state"))
    }
}

/// cuDNN autotuning (`torch.backends.cudnn.benchmark`).
pub fn set_cudnn_benchmark(on: bool) {
    tch::Cuda::cudnn_set_benchmark(on);
}
