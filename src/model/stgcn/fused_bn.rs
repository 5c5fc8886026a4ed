//! Fused training-mode batch norm (+ optional ReLU) on the CPU (csrc/fused_bn.cpp, built with the
//! shim), as a custom autograd function.
//!
//! Why: in a single-thread profile of a SkeletonCLR step (batch 128) libtorch's CPU batch norm
//! takes ~15% (statistics pass 9%, backward 3%, apply 2.5%) and the separate ReLU ~3% more. The
//! fused op reads each channel once for sum and sum of squares (double accumulators, AVX-512 when
//! the CPU has it), normalises while the channel is still in L2, applies the ReLU in the same store,
//! and in backward masks the gradient, reduces and applies in two passes (no separate ReLU backward).
//!
//! Semantics are `torch.nn.functional.batch_norm(training=True)` followed by `relu` when asked:
//! biased variance normalises, the unbiased one enters `running_var`, the running statistics move
//! with momentum [`super::layers::BN_MOMENTUM`] and `num_batches_tracked` grows by one.
//!
//! The fused op takes contiguous float32 CPU inputs `(N, C, ...)`; anything else (CUDA, float64,
//! non-contiguous, a build without the shim, or `CROSSCLR_FUSED_BN=off` in the environment, read
//! once per process) goes through the tch path (`Tensor::batch_norm` + `relu_`).
use super::layers::BatchNorm;
use crate::error::{Error, Result};
use std::sync::OnceLock;
use tch::{Device, Kind, Tensor};

/// Environment variable: `off` (or `0`, `false`) disables the fused op.
pub const ENV_SWITCH: &str = "CROSSCLR_FUSED_BN";

#[cfg(not(crossclr_no_shim))]
extern "C" {
    fn crossclr_fused_bn_train(
        x: *mut std::ffi::c_void,
        w: *mut std::ffi::c_void,
        b: *mut std::ffi::c_void,
        running_mean: *mut std::ffi::c_void,
        running_var: *mut std::ffi::c_void,
        momentum: f64,
        eps: f64,
        relu: std::ffi::c_int,
        out: *mut *mut std::ffi::c_void,
        err: *mut *mut std::ffi::c_char,
    ) -> std::ffi::c_int;
    fn crossclr_shim_free(s: *mut std::ffi::c_char);
}

/// Whether the fused op may be used: built with the shim and not switched off by [`ENV_SWITCH`].
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        let off = std::env::var(ENV_SWITCH)
            .map(|v| {
                matches!(
                    v.trim().to_ascii_lowercase().as_str(),
                    "off" | "0" | "false"
                )
            })
            .unwrap_or(false);
        cfg!(not(crossclr_no_shim)) && !off
    })
}

/// A contiguous float32 CPU tensor (the only layout the fused kernels read).
fn is_plain_cpu_f32(t: &Tensor) -> bool {
    t.device() == Device::Cpu && t.kind() == Kind::Float && t.is_contiguous()
}

/// Whether `x` and the parameters of `bn` fit the fused op.
fn fits(x: &Tensor, bn: &BatchNorm) -> bool {
    x.dim() >= 2
        && is_plain_cpu_f32(x)
        && [&bn.weight, &bn.bias, &bn.running_mean, &bn.running_var]
            .iter()
            .all(|t| is_plain_cpu_f32(t))
}

/// Training-mode batch norm over channel dim 1 of `x` `(N, C, ...)`, then ReLU when `relu`; updates
/// the running statistics and `num_batches_tracked` of `bn`. Returns a tensor of `x`'s shape.
/// Uses the fused op when it applies (see the module docs), else the tch path.
pub fn bn_train(x: &Tensor, bn: &BatchNorm, relu: bool) -> Result<Tensor> {
    if enabled() && fits(x, bn) {
        fused(x, bn, relu)
    } else {
        Ok(native(x, bn, relu))
    }
}

/// The tch path: `Tensor::batch_norm` (training) + in-place ReLU.
pub(crate) fn native(x: &Tensor, bn: &BatchNorm, relu: bool) -> Tensor {
    let mut y = bn.forward_native(x, true);
    if relu {
        let _ = y.relu_(); // batch-norm backward does not need its output
    }
    y
}

/// The fused op; `x` and the parameters must be contiguous float32 CPU tensors (else an error).
pub(crate) fn fused(x: &Tensor, bn: &BatchNorm, relu: bool) -> Result<Tensor> {
    #[cfg(not(crossclr_no_shim))]
    {
        let ptr = |t: &Tensor| t.as_ptr() as *mut std::ffi::c_void;
        let mut out: *mut std::ffi::c_void = std::ptr::null_mut();
        let mut err: *mut std::ffi::c_char = std::ptr::null_mut();
        // SAFETY: every pointer is a live tch tensor borrowed for the call; the C side checks them
        // (null, undefined, device, dtype, layout, shape) and never lets an exception escape.
        let status = unsafe {
            crossclr_fused_bn_train(
                ptr(x),
                ptr(&bn.weight),
                ptr(&bn.bias),
                ptr(&bn.running_mean),
                ptr(&bn.running_var),
                super::layers::BN_MOMENTUM,
                super::layers::BN_EPS,
                std::ffi::c_int::from(relu),
                &mut out,
                &mut err,
            )
        };
        if status != 0 || out.is_null() {
            let msg = if err.is_null() {
                "no output tensor".to_string()
            } else {
                // SAFETY: a NUL-terminated malloc'd string from the shim, freed right after.
                let s = unsafe { std::ffi::CStr::from_ptr(err) }
                    .to_string_lossy()
                    .into_owned();
                unsafe { crossclr_shim_free(err) };
                s
            };
            return Err(Error::Other(format!("fused batch norm: {msg}")));
        }
        tch::no_grad(|| {
            let _ = bn.num_batches_tracked.shallow_clone().g_add_scalar_(1);
        });
        // SAFETY: `out` is a fresh `at::Tensor*` owned by us; tch's drop deletes it.
        Ok(unsafe { Tensor::from_ptr(out as *mut _) })
    }
    #[cfg(crossclr_no_shim)]
    {
        let _ = (x, bn, relu);
        Err(Error::Other(
            "fused batch norm: built without the C++ shim".into(),
        ))
    }
}

#[cfg(all(test, not(crossclr_no_shim)))]
mod tests {
    use super::*;
    use crate::model::stgcn::layers::BN_EPS;
    use tch::nn::VarStore;

    /// A batch norm with random weight and bias (so that the ReLU cuts at varied places) and
    /// random running statistics.
    fn random_bn(vs: &VarStore, c: i64) -> BatchNorm {
        let bn = BatchNorm::new(&vs.root(), c);
        tch::no_grad(|| {
            let opts = (Kind::Float, Device::Cpu);
            bn.weight
                .shallow_clone()
                .copy_(&(Tensor::randn([c], opts) * 0.5 + 1.0));
            bn.bias
                .shallow_clone()
                .copy_(&(Tensor::randn([c], opts) * 0.5));
            bn.running_mean
                .shallow_clone()
                .copy_(&Tensor::randn([c], opts));
            bn.running_var
                .shallow_clone()
                .copy_(&(Tensor::rand([c], opts) + 0.5));
        });
        bn
    }

    /// A second batch norm with the same values as `bn`.
    fn copy_bn(vs: &VarStore, bn: &BatchNorm) -> BatchNorm {
        let out = BatchNorm::new(&vs.root(), bn.weight.size()[0]);
        tch::no_grad(|| {
            for (dst, src) in [
                (&out.weight, &bn.weight),
                (&out.bias, &bn.bias),
                (&out.running_mean, &bn.running_mean),
                (&out.running_var, &bn.running_var),
                (&out.num_batches_tracked, &bn.num_batches_tracked),
            ] {
                dst.shallow_clone().copy_(src);
            }
        });
        out
    }

    fn max_abs(t: &Tensor) -> f64 {
        t.abs().max().double_value(&[])
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        max_abs(&(a - b))
    }

    /// `max |a - b| / max |b|` (0 when both are 0).
    fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
        let scale = max_abs(b);
        let d = max_abs_diff(a, b);
        if scale == 0.0 {
            d
        } else {
            d / scale
        }
    }

    /// Runs the fused op and the tch path on the same random input and upstream gradient; checks
    /// outputs (1e-5 abs), running statistics, the batch counter and the gradients of x, weight
    /// and bias (1e-4 relative).
    fn check_against_native(shape: &[i64], relu: bool, offset: f64) {
        tch::manual_seed(7);
        let c = shape[1];
        let (vs_f, vs_n) = (VarStore::new(Device::Cpu), VarStore::new(Device::Cpu));
        let bn_f = random_bn(&vs_f, c);
        let bn_n = copy_bn(&vs_n, &bn_f);
        let opts = (Kind::Float, Device::Cpu);
        let x0 = Tensor::randn(shape, opts) * 2.0 + offset;
        let up = Tensor::randn(shape, opts);
        let xf = x0.copy().set_requires_grad(true);
        let xn = x0.copy().set_requires_grad(true);

        let yf = fused(&xf, &bn_f, relu).expect("fused batch norm");
        let yn = native(&xn, &bn_n, relu);
        assert_eq!(yf.size(), shape);
        let what = format!("shape {shape:?} relu {relu} offset {offset}");
        let d = max_abs_diff(&yf, &yn);
        assert!(d < 1e-5, "{what}: outputs differ by {d}");
        if relu {
            assert!(
                yf.min().double_value(&[]) >= 0.0,
                "{what}: negative ReLU output"
            );
        }
        for (name, a, b) in [
            ("running_mean", &bn_f.running_mean, &bn_n.running_mean),
            ("running_var", &bn_f.running_var, &bn_n.running_var),
        ] {
            let d = max_abs_diff(a, b);
            assert!(d < 1e-5, "{what}: {name} differs by {d}");
        }
        assert_eq!(
            bn_f.num_batches_tracked.int64_value(&[]),
            bn_n.num_batches_tracked.int64_value(&[])
        );

        (&yf * &up).sum(Kind::Float).backward();
        (&yn * &up).sum(Kind::Float).backward();
        for (name, a, b) in [
            ("x", &xf, &xn),
            ("weight", &bn_f.weight, &bn_n.weight),
            ("bias", &bn_f.bias, &bn_n.bias),
        ] {
            let r = rel_diff(&a.grad(), &b.grad());
            assert!(
                r < 1e-4,
                "{what}: gradient of {name} differs (relative {r})"
            );
        }
    }

    #[test]
    fn fused_matches_native_channel_major_shape() {
        check_against_native(&[1, 5, 3, 7, 4], false, 0.0);
        check_against_native(&[1, 5, 3, 7, 4], true, 0.0);
    }

    #[test]
    fn fused_matches_native_batched_shape() {
        check_against_native(&[4, 6, 33], false, 0.0);
        check_against_native(&[4, 6, 33], true, 0.0);
    }

    #[test]
    fn fused_matches_native_when_channels_run_in_parallel() {
        // 40k elements per channel: one channel per parallel task (libtorch's thread pool).
        check_against_native(&[1, 8, 40_000], true, 0.5);
    }

    #[test]
    fn fused_single_pass_variance_survives_a_large_mean() {
        // mean 100, std 2: sum of squares minus the squared mean loses ~4 digits of 16 in double.
        check_against_native(&[2, 3, 500], true, 100.0);
    }

    #[test]
    fn fused_updates_running_stats_like_pytorch() {
        // One channel, values 0..4: mean 2, biased var 2, unbiased var 2.5.
        let vs = VarStore::new(Device::Cpu);
        let bn = BatchNorm::new(&vs.root(), 1);
        let x = Tensor::from_slice(&[0f32, 1., 2., 3., 4.]).view([1, 1, 5]);
        let y = fused(&x, &bn, false).unwrap();
        let m = bn.running_mean.double_value(&[0]);
        let v = bn.running_var.double_value(&[0]);
        assert!((m - 0.1 * 2.0).abs() < 1e-7, "running_mean {m}");
        assert!((v - (0.9 + 0.1 * 2.5)).abs() < 1e-6, "running_var {v}");
        assert_eq!(bn.num_batches_tracked.int64_value(&[]), 1);
        // y = (x - 2) / sqrt(2 + eps) * w + b
        let w = bn.weight.double_value(&[0]);
        let expect = (4.0 - 2.0) / (2.0 + BN_EPS).sqrt() * w;
        let got = y.double_value(&[0, 0, 4]);
        assert!((got - expect).abs() < 1e-5, "y {got} vs {expect}");
    }

    #[test]
    fn fused_rejects_one_value_per_channel() {
        let vs = VarStore::new(Device::Cpu);
        let bn = BatchNorm::new(&vs.root(), 3);
        let x = Tensor::ones([1, 3, 1], (Kind::Float, Device::Cpu));
        let err = fused(&x, &bn, true).unwrap_err().to_string();
        assert!(err.contains("more than 1 value per channel"), "{err}");
        assert_eq!(bn.num_batches_tracked.int64_value(&[]), 0);
        assert_eq!(bn.running_mean.double_value(&[0]), 0.0);
    }

    #[test]
    fn bn_train_falls_back_for_other_layouts_and_dtypes() {
        tch::manual_seed(3);
        let vs = VarStore::new(Device::Cpu);
        let bn = random_bn(&vs, 4);
        // Non-contiguous float32 (a transposed view) and float64 must give the tch results.
        let x = Tensor::randn([6, 5, 4], (Kind::Float, Device::Cpu)).transpose(1, 2);
        assert!(!x.is_contiguous());
        let vs2 = VarStore::new(Device::Cpu);
        let bn2 = copy_bn(&vs2, &bn);
        let a = bn_train(&x, &bn, true).unwrap();
        let b = native(&x, &bn2, true);
        assert_eq!(max_abs_diff(&a, &b), 0.0);
        let x64 = x.to_kind(Kind::Double).contiguous();
        let mut vs64 = VarStore::new(Device::Cpu);
        let bn64 = random_bn(&vs64, 4);
        vs64.double();
        let y64 = bn_train(&x64, &bn64, false).unwrap();
        assert_eq!(y64.kind(), Kind::Double);
        assert_eq!(bn64.num_batches_tracked.int64_value(&[]), 1);
    }
}
