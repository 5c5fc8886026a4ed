//! SGD with momentum and weight decay, numerically the same as `torch.optim.SGD` (dampening 0, no
//! Nesterov): `d = g + wd * p`; `buf = d` on the first step, else `buf = mu * buf + d`;
//! `p -= lr * buf`. Written here (rather than `tch::nn::Sgd`) because resuming exactly needs the
//! momentum buffers, which libtorch's optimizer does not expose through tch.
use crate::error::{Error, Result};
use tch::Tensor;

/// The optimizer over a list of named trainable tensors (e.g. the query-side VarStore).
pub struct Sgd {
    /// `(name, parameter)` in a fixed (sorted by name) order.
    params: Vec<(String, Tensor)>,
    /// Momentum buffer per parameter, created on its first update.
    buffers: Vec<Option<Tensor>>,
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
}

impl Sgd {
    /// `params`: the trainable tensors with their names; sorted by name for a stable order.
    pub fn new(
        mut params: Vec<(String, Tensor)>,
        lr: f64,
        momentum: f64,
        weight_decay: f64,
    ) -> Self {
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let buffers = params.iter().map(|_| None).collect();
        Sgd {
            params,
            buffers,
            lr,
            momentum,
            weight_decay,
        }
    }

    /// Parameters in optimizer order.
    pub fn params(&self) -> &[(String, Tensor)] {
        &self.params
    }

    /// Zeroes the gradients (PyTorch 1.4 semantics: zero, not None).
    pub fn zero_grad(&mut self) {
        for (_, p) in &mut self.params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.detach_();
                let _ = g.zero_();
            }
        }
    }

    /// One update of every parameter that has a gradient.
    pub fn step(&mut self) {
        tch::no_grad(|| {
            for ((_, p), buf) in self.params.iter_mut().zip(self.buffers.iter_mut()) {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let mut d = if self.weight_decay != 0.0 {
                    &g + &*p * self.weight_decay
                } else {
                    g.copy()
                };
                if self.momentum != 0.0 {
                    match buf {
                        Some(b) => {
                            let _ = b.g_mul_scalar_(self.momentum);
                            let _ = b.g_add_(&d);
                        }
                        None => *buf = Some(d.copy()),
                    }
                    d = buf.as_ref().map(|b| b.shallow_clone()).unwrap_or(d);
                }
                let _ = p.g_sub_(&(d * self.lr));
            }
        });
    }

    /// The momentum buffers as `(parameter name, buffer)` for checkpoints.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .zip(&self.buffers)
            .filter_map(|((n, _), b)| b.as_ref().map(|b| (n.clone(), b.shallow_clone())))
            .collect()
    }

    /// Restores momentum buffers by parameter name (missing names keep no buffer; unknown names
    /// or shape mismatches are errors).
    pub fn load_state(&mut self, state: &[(String, Tensor)]) -> Result<()> {
        for b in &mut self.buffers {
            *b = None;
        }
        for (name, t) in state {
            let i = self
                .params
                .iter()
                .position(|(n, _)| n == name)
                .ok_or_else(|| {
                    Error::Other(format!("optimizer state: unknown parameter '{name}'"))
                })?;
            let p = &self.params[i].1;
            if p.size() != t.size() {
                return Err(Error::Other(format!(
                    "optimizer state: '{name}' has shape {:?}, parameter has {:?}",
                    t.size(),
                    p.size()
                )));
            }
            self.buffers[i] = Some(t.to_device(p.device()).to_kind(p.kind()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// Two steps by hand: p=1, g=2 (loss 2p), wd 0.5, mu 0.9, lr 0.1.
    #[test]
    fn matches_torch_sgd_formula() {
        let p = Tensor::ones([1], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let mut opt = Sgd::new(vec![("p".into(), p.shallow_clone())], 0.1, 0.9, 0.5);
        let mut want_p = 1.0f64;
        let mut buf = 0.0f64;
        for step in 0..2 {
            opt.zero_grad();
            (&p * 2.0).sum(Kind::Float).backward();
            opt.step();
            let d = 2.0 + 0.5 * want_p;
            buf = if step == 0 { d } else { 0.9 * buf + d };
            want_p -= 0.1 * buf;
            assert!((p.double_value(&[0]) - want_p).abs() < 1e-6);
        }
        let st = opt.state();
        assert!((st[0].1.double_value(&[0]) - buf).abs() < 1e-6);
    }
}
