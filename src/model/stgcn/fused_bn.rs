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
//! non-contiguous, a build without the shim, or `kernels.fused_bn=off`) goes through the tch path
//! (`Tensor::batch_norm` + `relu_`).
//!
//! [`bn_dropout_add_relu`] fuses the whole tail of an ST-GCN block, `relu(dropout_p(bn2(y)) + r)`,
//! into one op of the same kind (switch: `kernels.fused_tail=off`): the dropout mask is a
//! counter-based hash of (seed, element index), recomputed in backward instead of stored, and the
//! batch-norm output, the dropout output and the sum are never materialised. Single-thread
//! SkeletonCLR step at batch 128 on the 2-core Xeon (AVX-512): 5.29-5.41 s vs 5.50-5.68 s unfused,
//! user+sys 27.4-27.8 s vs 30.7-37.0 s per bench run, peak RSS 3204 vs 3637 MiB.
use super::fused_cuda::FusedOp;
use super::fused_entry::{
    crossclr_fused_bn_tail_train, crossclr_fused_bn_train, native, run_bn, run_tail,
};
use super::layers::BatchNorm;
use crate::error::{Error, Result};
use crate::model::kernels::{FusedCuda, Kernels};
use tch::{Device, Kind, Tensor};

/// Whether the fused CPU ops exist in this build (the C++ shim was compiled).
pub fn available() -> bool {
    cfg!(not(crossclr_no_shim))
}

/// The forwards of [`BatchNorm`] (its parameters and the tch path are in `layers.rs`; the
/// dispatch to the fused ops lives here, above both kinds of fused ops).
impl BatchNorm {
    /// Normalises channel dim 1 of `x` (any rank >= 2); same shape out. Train mode uses batch
    /// statistics and updates the running statistics (momentum 0.1, unbiased variance) and the
    /// batch counter, through the fused CPU op where it applies (see `stgcn/fused_bn.rs`).
    /// `kernels` says whether the fused ops may be used.
    pub fn forward(&self, x: &Tensor, train: bool, kernels: &Kernels) -> Tensor {
        self.forward_act(x, train, false, kernels)
    }

    /// [`BatchNorm::forward`] followed by ReLU (fused into the batch norm in train mode on the CPU).
    pub fn forward_relu(&self, x: &Tensor, train: bool, kernels: &Kernels) -> Tensor {
        self.forward_act(x, train, true, kernels)
    }

    fn forward_act(&self, x: &Tensor, train: bool, relu: bool, kernels: &Kernels) -> Tensor {
        if let (true, Some(group)) = (train, &self.sync) {
            let mut y = self.forward_sync(x, group);
            if relu {
                let _ = y.relu_(); // the SyncBatchNorm backward does not need its output
            }
            return y;
        }
        if train {
            match bn_train(x, self, relu, kernels) {
                Ok(y) => return y,
                // Only a broken invariant gets here (the fused op checks before it writes
                // anything): the tch path gives the same result, or libtorch's own error.
                Err(e) => warn_fused_failed(&e),
            }
        }
        let mut y = self.forward_native(x, train);
        if relu {
            let _ = y.relu_(); // batch-norm backward does not need its output
        }
        y
    }
}

/// Reports (once per process) that the fused batch norm failed and the tch path is used instead.
fn warn_fused_failed(e: &crate::error::Error) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| eprintln!("crossclr: fused batch norm failed ({e}); using the tch path"));
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
pub fn bn_train(x: &Tensor, bn: &BatchNorm, relu: bool, kernels: &Kernels) -> Result<Tensor> {
    if x.device().is_cuda() {
        if kernels.fused_cuda != FusedCuda::Off
            && super::fused_cuda::fits(x, bn)
            && super::fused_cuda::usable(x.device())
            && (kernels.fused_cuda == FusedCuda::On
                || super::fused_cuda::prefer_fused(FusedOp::BatchNorm { relu }, x, bn, None))
        {
            return super::fused_cuda::bn_train(x, bn, relu);
        }
        return Ok(native(x, bn, relu));
    }
    if available() && kernels.fused_bn_on() && fits(x, bn) {
        fused(x, bn, relu)
    } else {
        Ok(native(x, bn, relu))
    }
}

/// The fused op; `x` and the parameters must be contiguous float32 CPU tensors (else an error).
pub(crate) fn fused(x: &Tensor, bn: &BatchNorm, relu: bool) -> Result<Tensor> {
    run_bn(crossclr_fused_bn_train, "fused batch norm", x, bn, relu)
}

/// The tail of an ST-GCN block in training or eval mode: `relu(dropout_p(bn(y)) + r)`.
///
/// `y` `(N, C, ...)` (the temporal-convolution output, `(1, C, N·M, T', V)` in the channel-major
/// formulation), `r` the residual of `y`'s shape or `None` (no residual), `p` the dropout
/// probability (0: no dropout). Returns a tensor of `y`'s shape; in train mode the running
/// statistics and `num_batches_tracked` of `bn` are updated.
///
/// In train mode with contiguous float32 CPU tensors and `0 <= p < 1` this is one fused op
/// (csrc/fused_bn.cpp `FusedBnTail`): one statistics pass, then one pass writing the output with
/// the dropout mask computed on the fly from a counter-based hash of (seed, element index), so no
/// mask tensor and no intermediate batch-norm / dropout / sum tensors are stored; backward
/// regenerates the mask. The mask is exactly Bernoulli(1 - p) per element when `(1 - p) · 2^16` is
/// whole (p = 0.5) and reproducible: its seed is drawn from libtorch's CPU generator (only when
/// `p > 0`, like [`super::dropout`]), so `tch::manual_seed` fixes it. Otherwise (eval, CUDA, other
/// dtypes or layouts, no shim, `kernels.fused_tail=off`) the unfused sequence runs:
/// `bn.forward` -> [`super::dropout`] -> `+ r` -> ReLU.
///
/// `rows` (data parallelism): on the CPU, the unfused path draws this rank's rows of the global
/// mask ([`super::dropout_rows`], rows along dim 2 of `(1, C, N·M, T, V)`) and the fused tail
/// mixes the rank into its seed, so ranks never share a mask; on CUDA each rank's generator is
/// seeded apart by the training loop.
#[allow(clippy::too_many_arguments)]
pub fn bn_dropout_add_relu(
    y: &Tensor,
    bn: &BatchNorm,
    p: f64,
    r: Option<&Tensor>,
    train: bool,
    kernels: &Kernels,
    rows: Option<super::RankRows>,
) -> Tensor {
    if train && bn.sync.is_some() {
        // SyncBatchNorm: the unfused sequence, its batch norm over every rank's batch.
        return tail_native(y, bn, p, r, train, kernels, rows);
    }
    if train && y.device().is_cuda() {
        let r_fits = r.is_none_or(|r| {
            r.device() == y.device()
                && r.kind() == Kind::Float
                && r.is_contiguous()
                && r.size() == y.size()
        });
        if kernels.fused_cuda != FusedCuda::Off
            && (0.0..1.0).contains(&p)
            && r_fits
            && super::fused_cuda::fits(y, bn)
            && super::fused_cuda::usable(y.device())
            && (kernels.fused_cuda == FusedCuda::On
                || super::fused_cuda::prefer_fused(
                    FusedOp::Tail {
                        p_bits: p.to_bits(),
                        residual: r.is_some(),
                    },
                    y,
                    bn,
                    r,
                ))
        {
            match super::fused_cuda::tail(y, bn, p, r, 0) {
                Ok(out) => return out,
                Err(e) => warn_tail_failed(&e),
            }
        }
        return tail_native(y, bn, p, r, train, kernels, None);
    }
    let r_fits = match r {
        None => true,
        Some(r) => is_plain_cpu_f32(r) && r.size() == y.size(),
    };
    if train
        && available()
        && kernels.fused_tail_on()
        && (0.0..1.0).contains(&p)
        && r_fits
        && fits(y, bn)
    {
        let seed = match (p > 0.0, rows) {
            (false, _) => 0,
            (true, None) => draw_seed(),
            // Every rank draws the same seed (same generator state): mix the rank in.
            (true, Some(rows)) => {
                draw_seed() ^ (rows.rank as i64).wrapping_mul(0x5851_F42D_4C95_7F2D)
            }
        };
        match fused_tail(y, bn, p, r, seed) {
            Ok(out) => return out,
            // Only a broken invariant gets here (the op checks before it writes anything).
            Err(e) => warn_tail_failed(&e),
        }
    }
    tail_native(y, bn, p, r, train, kernels, rows)
}

/// A dropout seed from libtorch's CPU generator (as [`super::dropout`] draws its own).
fn draw_seed() -> i64 {
    Tensor::randint(i64::MAX, [1], (Kind::Int64, Device::Cpu)).int64_value(&[0])
}

/// Reports (once per process) that the fused tail failed and the unfused sequence is used.
fn warn_tail_failed(e: &Error) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| eprintln!("crossclr: fused block tail failed ({e}); using the tch path"));
}

/// The unfused tail: `bn.forward` -> dropout -> in-place `+ r` -> in-place ReLU.
pub(crate) fn tail_native(
    y: &Tensor,
    bn: &BatchNorm,
    p: f64,
    r: Option<&Tensor>,
    train: bool,
    kernels: &Kernels,
    rows: Option<super::RankRows>,
) -> Tensor {
    // Rows of the (1, C, N·M, T, V) layout are dim 2.
    let mut z = super::dropout_rows(&bn.forward(y, train, kernels), p, train, rows, 2);
    if let Some(r) = r {
        let _ = z.g_add_(r); // no backward pass needs the overwritten values
    }
    let _ = z.relu_();
    z
}

/// The fused tail op with an explicit mask `seed`; `y`, `r` and the parameters must be contiguous
/// float32 CPU tensors and `0 <= p < 1` (else an error, with nothing updated).
pub(crate) fn fused_tail(
    y: &Tensor,
    bn: &BatchNorm,
    p: f64,
    r: Option<&Tensor>,
    seed: i64,
) -> Result<Tensor> {
    run_tail(
        crossclr_fused_bn_tail_train,
        "fused block tail",
        y,
        bn,
        p,
        r,
        seed,
    )
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
        let a = bn_train(&x, &bn, true, &Kernels::default()).unwrap();
        let b = native(&x, &bn2, true);
        assert_eq!(max_abs_diff(&a, &b), 0.0);
        let x64 = x.to_kind(Kind::Double).contiguous();
        let mut vs64 = VarStore::new(Device::Cpu);
        let bn64 = random_bn(&vs64, 4);
        vs64.double();
        let y64 = bn_train(&x64, &bn64, false, &Kernels::default()).unwrap();
        assert_eq!(y64.kind(), Kind::Double);
        assert_eq!(bn64.num_batches_tracked.int64_value(&[]), 1);
    }

    // ---- fused block tail: relu(dropout_p(bn(y)) + r) ----

    /// Fused tail vs native pieces on the same data: the two batch norms, `y` and `r` (requiring
    /// gradients) for each side, and the upstream gradient.
    struct TailCase {
        bn_f: BatchNorm,
        bn_n: BatchNorm,
        yf: Tensor,
        yn: Tensor,
        rf: Tensor,
        rn: Tensor,
        up: Tensor,
        _vs: (VarStore, VarStore),
    }

    fn tail_case(shape: &[i64], seed: i64) -> TailCase {
        tch::manual_seed(seed);
        let (vs_f, vs_n) = (VarStore::new(Device::Cpu), VarStore::new(Device::Cpu));
        let bn_f = random_bn(&vs_f, shape[1]);
        let bn_n = copy_bn(&vs_n, &bn_f);
        let opts = (Kind::Float, Device::Cpu);
        let y0 = Tensor::randn(shape, opts) * 1.5 + 0.3;
        let r0 = Tensor::randn(shape, opts);
        let up = Tensor::randn(shape, opts);
        TailCase {
            bn_f,
            bn_n,
            yf: y0.copy().set_requires_grad(true),
            yn: y0.copy().set_requires_grad(true),
            rf: r0.copy().set_requires_grad(true),
            rn: r0.copy().set_requires_grad(true),
            up,
            _vs: (vs_f, vs_n),
        }
    }

    /// Backpropagates `up` through both outputs and checks the gradients of y, r (when used),
    /// weight and bias (1e-4 relative), and the running statistics (1e-5).
    fn check_tail_grads(case: &TailCase, out_f: &Tensor, out_n: &Tensor, with_r: bool, what: &str) {
        (out_f * &case.up).sum(Kind::Float).backward();
        (out_n * &case.up).sum(Kind::Float).backward();
        let mut pairs = vec![
            ("y", &case.yf, &case.yn),
            ("weight", &case.bn_f.weight, &case.bn_n.weight),
            ("bias", &case.bn_f.bias, &case.bn_n.bias),
        ];
        if with_r {
            pairs.push(("r", &case.rf, &case.rn));
        }
        for (name, a, b) in pairs {
            let r = rel_diff(&a.grad(), &b.grad());
            assert!(
                r < 1e-4,
                "{what}: gradient of {name} differs (relative {r})"
            );
        }
        for (name, a, b) in [
            (
                "running_mean",
                &case.bn_f.running_mean,
                &case.bn_n.running_mean,
            ),
            (
                "running_var",
                &case.bn_f.running_var,
                &case.bn_n.running_var,
            ),
        ] {
            let d = max_abs_diff(a, b);
            assert!(d < 1e-5, "{what}: {name} differs by {d}");
        }
        assert_eq!(
            case.bn_f.num_batches_tracked.int64_value(&[]),
            case.bn_n.num_batches_tracked.int64_value(&[])
        );
    }

    fn check_tail_without_dropout(shape: &[i64], with_r: bool) {
        let case = tail_case(shape, 21);
        let what = format!("shape {shape:?} residual {with_r} p 0");
        let out_f = fused_tail(&case.yf, &case.bn_f, 0.0, with_r.then_some(&case.rf), 0)
            .expect("fused tail");
        let bn = case.bn_n.forward_native(&case.yn, true);
        let out_n = if with_r { bn + &case.rn } else { bn }.relu();
        assert_eq!(out_f.size(), shape);
        let d = max_abs_diff(&out_f, &out_n);
        assert!(d < 1e-5, "{what}: outputs differ by {d}");
        check_tail_grads(&case, &out_f, &out_n, with_r, &what);
    }

    #[test]
    fn tail_without_dropout_matches_native() {
        check_tail_without_dropout(&[1, 6, 3, 7, 5], true);
        check_tail_without_dropout(&[1, 6, 3, 7, 5], false);
        check_tail_without_dropout(&[3, 4, 50], true);
    }

    /// The dropout mask (0 or 1/keep) that explains `out` = relu((bn * m) + r) element-wise, with
    /// `bn` the native batch-norm output; asserts every element is one of the two candidates.
    /// Also returns which elements are decided (the candidates differ), for rate counting.
    fn inferred_mask(
        out: &Tensor,
        bn: &Tensor,
        r: &Tensor,
        keep: f64,
        what: &str,
    ) -> (Tensor, Tensor) {
        let kept = (bn / keep + r).relu();
        let dropped = r.relu();
        let dk = (out - &kept).abs();
        let dd = (out - &dropped).abs();
        let worst = dk.minimum(&dd).max().double_value(&[]);
        assert!(
            worst < 1e-5,
            "{what}: an output is neither kept nor dropped ({worst})"
        );
        let is_kept = dk.lt_tensor(&dd);
        let decided = (&kept - &dropped).abs().gt(1e-4);
        let mask = is_kept.to_kind(Kind::Float) / keep;
        (mask, decided)
    }

    fn check_tail_with_dropout(shape: &[i64], p: f64) {
        let case = tail_case(shape, 22);
        let what = format!("shape {shape:?} p {p}");
        let keep = 1.0 - p;
        let out_f = fused_tail(&case.yf, &case.bn_f, p, Some(&case.rf), 1234).expect("fused tail");
        let bn = case.bn_n.forward_native(&case.yn, true);
        let (mask, _) = tch::no_grad(|| inferred_mask(&out_f, &bn, &case.rn, keep, &what));
        let out_n = (bn * &mask + &case.rn).relu();
        let d = max_abs_diff(&out_f, &out_n);
        assert!(d < 1e-5, "{what}: outputs differ by {d}");
        check_tail_grads(&case, &out_f, &out_n, true, &what);
    }

    #[test]
    fn tail_with_dropout_matches_native_with_the_inferred_mask() {
        check_tail_with_dropout(&[1, 6, 3, 7, 5], 0.5);
        // Channels of 1111 elements: mask chunks and 4-lane draws straddle channel boundaries.
        check_tail_with_dropout(&[1, 3, 1111], 0.5);
        check_tail_with_dropout(&[2, 3, 1111], 0.3);
    }

    /// Kept fraction on a large tensor, counted over elements whose two candidates differ (which
    /// depends on y and r only, not on the mask).
    fn kept_fraction(p: f64, seed: i64) -> f64 {
        tch::manual_seed(5);
        let vs = VarStore::new(Device::Cpu);
        let bn = random_bn(&vs, 4);
        let vs2 = VarStore::new(Device::Cpu);
        let bn2 = copy_bn(&vs2, &bn);
        let opts = (Kind::Float, Device::Cpu);
        let shape = [1i64, 4, 64, 50, 25];
        let y = Tensor::randn(shape, opts);
        let r = Tensor::randn(shape, opts);
        tch::no_grad(|| {
            let out = fused_tail(&y, &bn, p, Some(&r), seed).expect("fused tail");
            let native_bn = bn2.forward_native(&y, true);
            let (mask, decided) = inferred_mask(&out, &native_bn, &r, 1.0 - p, &format!("p {p}"));
            let kept = mask.gt(0.0).logical_and(&decided);
            kept.to_kind(Kind::Double)
                .sum(Kind::Double)
                .double_value(&[])
                / decided
                    .to_kind(Kind::Double)
                    .sum(Kind::Double)
                    .double_value(&[])
        })
    }

    #[test]
    fn tail_dropout_keeps_the_right_fraction() {
        let f = kept_fraction(0.5, 99);
        assert!((f - 0.5).abs() < 0.01, "p 0.5: kept fraction {f}");
        let f = kept_fraction(0.3, 100);
        assert!((f - 0.7).abs() < 0.01, "p 0.3: kept fraction {f}");
    }

    /// SplitMix64 output `i` of the stream starting at `base` (the documented mask hash).
    fn splitmix64_at(base: u64, i: u64) -> u64 {
        let mut z = base.wrapping_add(i.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    #[test]
    fn tail_mask_follows_the_counter_based_scheme() {
        // p = 0.5: element i is kept iff 16-bit lane i % 4 of draw i / 4 is below 2^15. A
        // residual of 10 keeps every output positive, so the mask shows in every element. Channels
        // of 1111 elements start at every alignment (scalar head, vector body, scalar tail).
        tch::manual_seed(6);
        let vs = VarStore::new(Device::Cpu);
        let bn = random_bn(&vs, 3);
        let vs2 = VarStore::new(Device::Cpu);
        let bn2 = copy_bn(&vs2, &bn);
        let shape = [1i64, 3, 1111];
        let y = Tensor::randn(shape, (Kind::Float, Device::Cpu));
        let r = Tensor::full(shape, 10.0, (Kind::Float, Device::Cpu));
        let seed: i64 = 0x1234_5678_9ABC;
        let out = fused_tail(&y, &bn, 0.5, Some(&r), seed).unwrap();
        let native_bn = bn2.forward_native(&y, true);
        let (mask, _) = inferred_mask(&out, &native_bn, &r, 0.5, "scheme");
        let got: Vec<f32> = Vec::<f32>::try_from(mask.flatten(0, -1)).unwrap();
        for (i, m) in got.iter().enumerate() {
            let draw = splitmix64_at(seed as u64, i as u64 / 4);
            let kept = (draw >> (16 * (i % 4))) & 0xFFFF < 1 << 15;
            assert_eq!(*m == 2.0, kept, "element {i}");
        }
    }

    /// The explicit-seed op gives the same mask for the same seed. (That the training tail is
    /// reproducible from `tch::manual_seed` is tested in tests/seeded_training.rs, a process of
    /// its own: tests running in parallel here share libtorch's global generator.)
    #[test]
    fn tail_is_reproducible_from_the_seed() {
        let opts = (Kind::Float, Device::Cpu);
        tch::manual_seed(8);
        let y = Tensor::randn([1, 6, 3, 7, 5], opts);
        let r = Tensor::randn([1, 6, 3, 7, 5], opts);
        let vs = VarStore::new(Device::Cpu);
        let bn = BatchNorm::new(&vs.root(), 6);
        let a = fused_tail(&y, &bn, 0.5, Some(&r), 77).unwrap();
        let b = fused_tail(&y, &bn, 0.5, Some(&r), 77).unwrap();
        let c = fused_tail(&y, &bn, 0.5, Some(&r), 78).unwrap();
        assert_eq!(max_abs_diff(&a, &b), 0.0, "same seed, different outputs");
        assert!(max_abs_diff(&a, &c) > 0.0, "different seeds, same output");
    }

    #[test]
    fn tail_falls_back_and_rejects_bad_input() {
        tch::manual_seed(4);
        let vs = VarStore::new(Device::Cpu);
        let bn = random_bn(&vs, 4);
        let opts = (Kind::Float, Device::Cpu);
        let y = Tensor::randn([1, 4, 6, 5], opts);
        // A residual of another shape is an error from the op, and nothing is updated.
        let bad = Tensor::randn([1, 4, 6, 4], opts);
        let err = fused_tail(&y, &bn, 0.5, Some(&bad), 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("residual"), "{err}");
        let err = fused_tail(&y, &bn, 1.0, None, 1).unwrap_err().to_string();
        assert!(err.contains("dropout probability"), "{err}");
        assert_eq!(bn.num_batches_tracked.int64_value(&[]), 0);
        // Eval mode and float64 take the unfused sequence.
        let r = Tensor::randn([1, 4, 6, 5], opts);
        let vs2 = VarStore::new(Device::Cpu);
        let bn2 = copy_bn(&vs2, &bn);
        let a = bn_dropout_add_relu(&y, &bn, 0.5, Some(&r), false, &Kernels::default(), None);
        let b = (bn2.forward_native(&y, false) + &r).relu();
        assert_eq!(max_abs_diff(&a, &b), 0.0);
        let mut vs64 = VarStore::new(Device::Cpu);
        let bn64 = random_bn(&vs64, 4);
        vs64.double();
        let y64 = y.to_kind(Kind::Double);
        let out = bn_dropout_add_relu(&y64, &bn64, 0.5, None, true, &Kernels::default(), None);
        assert_eq!(out.kind(), Kind::Double);
        assert_eq!(bn64.num_batches_tracked.int64_value(&[]), 1);
    }

    /// With the same seed, the emulated CUDA tail and the CPU fused tail draw the same dropout
    /// mask: same outputs and gradients.
    #[test]
    fn emulated_tail_draws_the_cpu_mask() {
        use super::super::fused_cuda;
        let shape = [1i64, 3, 4, 50, 25];
        let y = fused_cuda::test_tensor(&shape, 41, 2.0, 0.2, Device::Cpu);
        let r = fused_cuda::test_tensor(&shape, 42, 1.0, 0.0, Device::Cpu);
        let run = |emulated: bool| {
            let vs = tch::nn::VarStore::new(Device::Cpu);
            let bn = fused_cuda::test_bn(&vs, 3, 43);
            let yv = y.detach().set_requires_grad(true);
            let out = if emulated {
                fused_cuda::emulated_tail(&yv, &bn, 0.5, Some(&r), 12345).unwrap()
            } else {
                fused_tail(&yv, &bn, 0.5, Some(&r), 12345).unwrap()
            };
            out.sum(Kind::Float).backward();
            (out.detach(), yv.grad())
        };
        let (out_e, grad_e) = run(true);
        let (out_c, grad_c) = run(false);
        assert!(
            fused_cuda::rel_diff(&out_e, &out_c) < 1e-6,
            "{}",
            fused_cuda::rel_diff(&out_e, &out_c)
        );
        assert!(
            fused_cuda::rel_diff(&grad_e, &grad_c) < 1e-4,
            "{}",
            fused_cuda::rel_diff(&grad_e, &grad_c)
        );
        // p = 0.5 really drops: some kept, some dropped elements.
        let zero_frac = out_e
            .eq(0.0)
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[]);
        assert!(zero_frac > 0.2 && zero_frac < 0.9, "{zero_frac}");
    }
}
