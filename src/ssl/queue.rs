//! MoCo key queue: a `feature_dim x K` tensor of L2-normalised keys (one per column) and a write
//! pointer. The pointer lives on the host; the write is a device-side `narrow(..).copy_()`.
use crate::error::{Error, Result};
use tch::{Device, Kind, Tensor};

/// A MoCo queue of `K` keys of size `dim`, stored as a `(dim, K)` tensor.
pub struct Queue {
    /// `(dim, K)` f32, columns L2-normalised. Registered as a non-trainable variable by the model.
    pub keys: Tensor,
    /// Next column to write, `0..K`, always a multiple of the batch size.
    pub ptr: usize,
}

impl Queue {
    /// Official init: `randn(dim, K)` then L2-normalised per column (eps 1e-12), pointer 0.
    pub fn new(dim: i64, size: i64, device: Device) -> Self {
        let keys = normalize_rows_or_cols(&Tensor::randn([dim, size], (Kind::Float, device)), 0);
        Queue { keys, ptr: 0 }
    }

    /// Wraps an existing `(dim, K)` tensor (e.g. a VarStore variable) with pointer `ptr`.
    pub fn from_tensor(keys: Tensor, ptr: usize) -> Self {
        Queue { keys, ptr }
    }

    /// Queue length K.
    pub fn len(&self) -> usize {
        self.keys.size()[1] as usize
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn dim(&self) -> i64 {
        self.keys.size()[0]
    }

    /// Writes a `(B, dim)` key batch into columns `ptr..ptr+B` and advances `ptr = (ptr+B) mod K`.
    /// `K` must be divisible by `B` (checked at config time; an error here otherwise).
    pub fn enqueue(&mut self, keys: &Tensor) -> Result<()> {
        let b = keys.size()[0] as usize;
        let k = self.len();
        if b == 0 || !k.is_multiple_of(b) || self.ptr + b > k {
            return Err(Error::Other(format!(
                "queue: batch {b} does not tile queue size {k} at pointer {}",
                self.ptr
            )));
        }
        tch::no_grad(|| {
            self.keys
                .narrow(1, self.ptr as i64, b as i64)
                .copy_(&keys.detach().transpose(0, 1).to_kind(self.keys.kind()));
        });
        self.ptr = (self.ptr + b) % k;
        Ok(())
    }
}

/// `F.normalize(x, dim)`: `x / max(||x||_2, 1e-12)` along `dim`.
pub fn normalize_rows_or_cols(x: &Tensor, dim: i64) -> Tensor {
    /// PyTorch's default `F.normalize` epsilon.
    const EPS: f64 = 1e-12;
    let norm = x.norm_scalaropt_dim(2, [dim], true).clamp_min(EPS);
    x / norm.expand_as(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn init_normalised_and_enqueue_wraps() {
        tch::manual_seed(0);
        let mut q = Queue::new(4, 6, Device::Cpu);
        let norms = q.keys.norm_scalaropt_dim(2, [0], false);
        assert!(norms.allclose(
            &Tensor::ones([6], (Kind::Float, Device::Cpu)),
            1e-5,
            1e-6,
            false
        ));
        let k1 = Tensor::arange(8, (Kind::Float, Device::Cpu)).view([2, 4]);
        q.enqueue(&k1).unwrap();
        assert_eq!(q.ptr, 2);
        assert!(q.keys.narrow(1, 0, 2).equal(&k1.transpose(0, 1)));
        q.enqueue(&k1).unwrap();
        q.enqueue(&(&k1 * 2.0)).unwrap();
        assert_eq!(q.ptr, 0);
        assert!(q.keys.narrow(1, 4, 2).equal(&(k1.transpose(0, 1) * 2.0)));
        let bad = Tensor::zeros([4, 4], (Kind::Float, Device::Cpu));
        assert!(q.enqueue(&bad).is_err());
    }
}
