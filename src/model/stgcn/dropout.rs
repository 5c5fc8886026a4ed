//! Dropout with a fast CPU mask.
//!
//! libtorch's CPU dropout draws its mask with `bernoulli_`, which costs about 30 ns per element
//! (the largest single cost of an ST-GCN training step after the convolutions). Here the CPU mask
//! `{0, 1/(1-p)}` is drawn in parallel from SplitMix64 streams seeded by libtorch's generator (so
//! `tch::manual_seed` still makes runs reproducible). The semantics are those of `nn.Dropout`:
//! every element is kept with probability `1 - p` and scaled by `1 / (1 - p)`. On CUDA the libtorch
//! fused kernel is used.
use rayon::prelude::*;
use tch::{Device, Kind, Tensor};

/// Elements per independent random stream (one rayon task).
const CHUNK: usize = 1 << 14;

/// SplitMix64 step (Steele, Lea, Flood 2014).
#[inline]
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fills `mask` with `scale` (probability `keep`) or 0, from streams derived from `seed`.
pub fn fill_mask(mask: &mut [f32], keep: f64, scale: f32, seed: u64) {
    // Compare 32-bit uniforms with keep * 2^32 (keep = 1 keeps everything).
    let threshold = (keep * 4_294_967_296.0).min(4_294_967_296.0) as u64;
    mask.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(ci, chunk)| {
            let mut state = seed ^ (ci as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
            let mut pairs = chunk.chunks_exact_mut(2);
            for pair in &mut pairs {
                let r = splitmix64(&mut state);
                pair[0] = if (r & 0xFFFF_FFFF) < threshold {
                    scale
                } else {
                    0.0
                };
                pair[1] = if (r >> 32) < threshold { scale } else { 0.0 };
            }
            for m in pairs.into_remainder() {
                let r = splitmix64(&mut state);
                *m = if (r & 0xFFFF_FFFF) < threshold {
                    scale
                } else {
                    0.0
                };
            }
        });
}

/// `nn.Dropout(p)` in train mode: `x * mask`, mask elements `1/(1-p)` with probability `1-p`.
/// Identity when `!train` or `p == 0`. Works for any shape and floating kind.
pub fn dropout(x: &Tensor, p: f64, train: bool) -> Tensor {
    if !train || p <= 0.0 {
        return x.shallow_clone();
    }
    if p >= 1.0 {
        return x.zeros_like();
    }
    if x.device() != Device::Cpu {
        return x.dropout(p, true);
    }
    let keep = 1.0 - p;
    let seed = Tensor::randint(i64::MAX, [1], (Kind::Int64, Device::Cpu)).int64_value(&[0]) as u64;
    let n = x.numel();
    let mask = Tensor::empty(x.size(), (Kind::Float, Device::Cpu));
    // SAFETY: `mask` is a freshly allocated contiguous float32 CPU tensor of `n` elements that
    // nothing else references while this slice lives.
    let data = unsafe { std::slice::from_raw_parts_mut(mask.data_ptr() as *mut f32, n) };
    fill_mask(data, keep, (1.0 / keep) as f32, seed);
    let mask = if x.kind() == Kind::Float {
        mask
    } else {
        mask.to_kind(x.kind())
    };
    x * mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_has_the_right_rate_and_scale() {
        let mut m = vec![0f32; 100_001];
        fill_mask(&mut m, 0.5, 2.0, 7);
        let kept = m.iter().filter(|&&v| v == 2.0).count();
        assert!(m.iter().all(|&v| v == 0.0 || v == 2.0));
        let rate = kept as f64 / m.len() as f64;
        assert!((rate - 0.5).abs() < 0.01, "keep rate {rate}");
        let mut m2 = vec![0f32; 100_001];
        fill_mask(&mut m2, 0.5, 2.0, 8);
        assert_ne!(m, m2, "different seeds give different masks");
    }

    #[test]
    fn dropout_is_identity_in_eval_and_scales_in_train() {
        let x = Tensor::ones([64, 1000], (Kind::Float, Device::Cpu));
        assert_eq!(
            dropout(&x, 0.5, false).sum(Kind::Float).double_value(&[]),
            64000.0
        );
        let y = dropout(&x, 0.25, true);
        let mean = y.mean(Kind::Float).double_value(&[]);
        assert!((mean - 1.0).abs() < 0.02, "mean {mean}");
        let kept = y
            .ne(0.0)
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[]);
        assert!((kept - 0.75).abs() < 0.01, "kept {kept}");
    }
}
