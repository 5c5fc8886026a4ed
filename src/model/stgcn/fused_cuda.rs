//! Fused CUDA kernels for the element-wise chains of an ST-GCN block (csrc/fused_kernels.cuh,
//! compiled at run time with NVRTC by csrc/cuda_kernels.cpp): training batch norm + ReLU, and the
//! block tail `relu(dropout_p(bn2(y)) + r)`, each a custom autograd op.
//!
//! Why: on the GPU a training step is a few hundred small, memory-bound kernels (1/4-width
//! encoder: 16 to 64 channels). Unfused, the tail alone is batch norm (statistics + apply),
//! dropout (mask + multiply), add and ReLU forward, and as many passes back; fused it is one
//! statistics pass and one element-wise pass each way, with the dropout mask recomputed from a
//! counter-based hash instead of stored. The statistics are reduced with many blocks per channel
//! (libtorch's channel-first batch-norm kernels use one block per channel: 16 blocks for a
//! 16-channel layer).
//!
//! Semantics: those of the CPU ops in `super::fused_bn` (biased variance normalises, unbiased
//! variance enters `running_var`, momentum 0.1; the tail's mask is exactly Bernoulli(1 - p) for
//! p = 0.5). The mask seed comes from libtorch's CUDA generator (philox seed and offset, resolved
//! on the device), so `tch::manual_seed` fixes it and every CUDA-graph replay draws a new mask.
//! Reductions are deterministic (fixed order).
//!
//! Safety net: before the first use on a device, [`usable`] runs a self-check against the tch
//! ops on small inputs (forward, running statistics, gradients; the tail with and without
//! dropout); if the kernels fail to compile or disagree, a warning is printed once and the tch
//! path is used for the rest of the process. Never validated inside a CUDA-graph capture: a
//! capture that starts before any eager use runs the tch ops. Then, per op and shape, the faster
//! of the fused kernels and the tch ops is chosen by timing both once (module `choice`), so the fused
//! kernels never slow a step down. Lever: `kernels.fused_cuda` = `timed` (the default), `on`
//! (always, no timing) or `off` (never); see `crate::model::kernels`.
//!
//! On the CPU the same kernel bodies run under a host emulation of the launch grid
//! ([`emulated_bn_train`], [`emulated_tail`]): the tests check the kernels' indexing and arithmetic
//! there, and that the NVRTC compile succeeds ([`nvrtc_compile`]), without a GPU.
mod choice;

pub use choice::{choices, graph_timed_bn, FusedChoice};
pub(crate) use choice::{prefer_fused, FusedOp};

use super::layers::BatchNorm;
use crate::error::{Error, Result};
use std::sync::{Mutex, OnceLock};
use tch::{Device, Kind, Tensor};

#[cfg(not(crossclr_no_shim))]
extern "C" {
    fn crossclr_fk_nvrtc_compile(
        arch: *const std::ffi::c_char,
        cubin_bytes: *mut usize,
        nvrtc_version: *mut std::ffi::c_int,
        err: *mut *mut std::ffi::c_char,
    ) -> std::ffi::c_int;
    fn crossclr_fk_capturing(
        device: std::ffi::c_int,
        capturing: *mut std::ffi::c_int,
        err: *mut *mut std::ffi::c_char,
    ) -> std::ffi::c_int;
    fn crossclr_fk_set_vec4(on: std::ffi::c_int);
    fn crossclr_fk_vec4() -> std::ffi::c_int;
}

/// Whether the four-wide kernel variants are enabled (16-byte loads and stores, used where a
/// channel's length is a multiple of 4 and the buffers are 16-byte aligned;
/// csrc/fused_kernels.cuh). Always on except while a test compares them with the scalar bodies
/// ([`set_vec4`]): measured on an H100 (2026-11-27, same call, CUDA-graph step at batch 128),
/// SkeletonCLR 17.23 / 17.37 ms vs 18.19 / 18.01 ms without, CrosSCLR-3 phase 1 44.66 vs 47.74
/// ms, phase 2 47.37 vs 49.78 ms, so the switch that turned them off was removed.
pub fn vec4() -> bool {
    #[cfg(not(crossclr_no_shim))]
    {
        // SAFETY: reads a flag.
        unsafe { crossclr_fk_vec4() != 0 }
    }
    #[cfg(crossclr_no_shim)]
    false
}

/// Turns the four-wide kernel variants on or off for the rest of the process; takes effect for
/// ops started afterwards. For tests that compare them with the scalar bodies.
pub fn set_vec4(on: bool) {
    #[cfg(not(crossclr_no_shim))]
    // SAFETY: sets a flag.
    unsafe {
        crossclr_fk_set_vec4(i32::from(on))
    };
    #[cfg(crossclr_no_shim)]
    let _ = on;
}

#[cfg(not(crossclr_no_shim))]
use crate::gpu::ffi::take_message;

/// Error of a build without the shim.
#[cfg(crossclr_no_shim)]
fn no_shim<T>(what: &str) -> Result<T> {
    Err(Error::Other(format!("{what}: built without the C++ shim")))
}

/// Whether the fused CUDA kernels exist in this build: the shim has its CUDA half.
pub fn enabled() -> bool {
    crate::gpu::shim_status() == crate::gpu::ShimStatus::Cuda
}

/// Compiles the kernels with NVRTC for `arch` (e.g. `sm_90`); needs libnvrtc, not a GPU.
/// Returns (CUBIN bytes, NVRTC version as major * 1000 + minor * 10).
pub fn nvrtc_compile(arch: &str) -> Result<(usize, i32)> {
    #[cfg(not(crossclr_no_shim))]
    {
        let arch_c = std::ffi::CString::new(arch)
            .map_err(|_| Error::Other(format!("NVRTC: bad architecture name {arch:?}")))?;
        let mut bytes = 0usize;
        let mut version: std::ffi::c_int = 0;
        let mut err: *mut std::ffi::c_char = std::ptr::null_mut();
        // SAFETY: valid C string and output pointers for the duration of the call.
        let status = unsafe {
            crossclr_fk_nvrtc_compile(arch_c.as_ptr(), &mut bytes, &mut version, &mut err)
        };
        if status != 0 {
            return Err(Error::Other(take_message(err, "NVRTC compile failed")));
        }
        Ok((bytes, version))
    }
    #[cfg(crossclr_no_shim)]
    {
        let _ = arch;
        no_shim("NVRTC")
    }
}

/// Whether the current stream of CUDA device `index` is capturing a CUDA graph.
fn capturing(index: usize) -> Result<bool> {
    #[cfg(not(crossclr_no_shim))]
    {
        let mut flag: std::ffi::c_int = 0;
        let mut err: *mut std::ffi::c_char = std::ptr::null_mut();
        // SAFETY: valid output pointers for the duration of the call.
        let status =
            unsafe { crossclr_fk_capturing(index as std::ffi::c_int, &mut flag, &mut err) };
        if status != 0 {
            return Err(Error::Other(take_message(err, "capture status unknown")));
        }
        Ok(flag != 0)
    }
    #[cfg(crossclr_no_shim)]
    {
        let _ = index;
        no_shim("capture status")
    }
}

/// Per-device result of the self-check.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Check {
    Unknown,
    /// Running now (the check itself and other threads meanwhile use the tch ops).
    Running,
    Passed,
    Failed,
}

const MAX_DEVICES: usize = 64;

fn checks() -> &'static Mutex<[Check; MAX_DEVICES]> {
    static STATE: OnceLock<Mutex<[Check; MAX_DEVICES]>> = OnceLock::new();
    STATE.get_or_init(|| Mutex::new([Check::Unknown; MAX_DEVICES]))
}

/// Whether the fused kernels are used for tensors on `device`: CUDA, [`enabled`], and the
/// self-check passed (run here on first use, outside any graph capture).
pub fn usable(device: Device) -> bool {
    let Device::Cuda(index) = device else {
        return false;
    };
    if !enabled() || index >= MAX_DEVICES {
        return false;
    }
    let mut state = checks().lock().unwrap_or_else(|e| e.into_inner());
    match state[index] {
        Check::Passed => return true,
        Check::Failed | Check::Running => return false,
        Check::Unknown => {}
    }
    match capturing(index) {
        Ok(false) => {}
        // Inside a capture the check's own kernels would be recorded: decide later.
        Ok(true) => return false,
        Err(e) => {
            eprintln!("crossclr: fused CUDA kernels disabled on cuda:{index}: {e}");
            state[index] = Check::Failed;
            return false;
        }
    }
    state[index] = Check::Running;
    drop(state);
    let result = match tch::with_grad(|| self_check(device)) {
        Ok(()) => Check::Passed,
        Err(e) => {
            eprintln!(
                "crossclr: fused CUDA kernels disabled on cuda:{index} (self-check: {e}); using the tch ops"
            );
            Check::Failed
        }
    };
    checks().lock().unwrap_or_else(|e| e.into_inner())[index] = result;
    result == Check::Passed
}

/// A contiguous float32 tensor on `device`.
fn plain_f32_on(t: &Tensor, device: Device) -> bool {
    t.device() == device && t.kind() == Kind::Float && t.is_contiguous()
}

/// Whether `x` and `bn` fit the fused kernels (32-bit indices, at most 65535 channels).
pub(crate) fn fits(x: &Tensor, bn: &BatchNorm) -> bool {
    let device = x.device();
    x.dim() >= 2
        && plain_f32_on(x, device)
        && x.numel() < (1usize << 31)
        && (1..=65_535).contains(&x.size()[1])
        && [&bn.weight, &bn.bias, &bn.running_mean, &bn.running_var]
            .iter()
            .all(|t| plain_f32_on(t, device))
}

/// Training batch norm (+ ReLU) of `x` `(N, C, ...)` with the fused kernels: CUDA kernels for
/// CUDA tensors, the host emulation for CPU tensors. Updates the running statistics and
/// `num_batches_tracked` of `bn`. Errors (nothing updated) when the inputs do not fit.
pub(crate) fn bn_train(x: &Tensor, bn: &BatchNorm, relu: bool) -> Result<Tensor> {
    super::fused_entry::run_bn(
        super::fused_entry::crossclr_fk_bn_train,
        "fused CUDA batch norm",
        x,
        bn,
        relu,
    )
}

/// The block tail `relu(dropout_p(bn(y)) + r)` with the fused kernels (`r` `None`: no residual).
/// `seed` is the mask seed of the host emulation; CUDA draws it from libtorch's CUDA generator.
pub(crate) fn tail(
    y: &Tensor,
    bn: &BatchNorm,
    p: f64,
    r: Option<&Tensor>,
    seed: i64,
) -> Result<Tensor> {
    super::fused_entry::run_tail(
        super::fused_entry::crossclr_fk_tail_train,
        "fused CUDA block tail",
        y,
        bn,
        p,
        r,
        seed,
    )
}

/// `bn_train` on CPU tensors: the CUDA kernels' bodies under the host emulation (tests).
pub fn emulated_bn_train(x: &Tensor, bn: &BatchNorm, relu: bool) -> Result<Tensor> {
    if x.device() != Device::Cpu {
        return Err(Error::Other(
            "emulated fused batch norm: CPU tensors only".into(),
        ));
    }
    bn_train(x, bn, relu)
}

/// `tail` on CPU tensors with an explicit mask `seed` (the CPU fused tail with the same seed
/// draws the same mask).
pub fn emulated_tail(
    y: &Tensor,
    bn: &BatchNorm,
    p: f64,
    r: Option<&Tensor>,
    seed: i64,
) -> Result<Tensor> {
    if y.device() != Device::Cpu {
        return Err(Error::Other(
            "emulated fused block tail: CPU tensors only".into(),
        ));
    }
    tail(y, bn, p, r, seed)
}

// ---------------------------------------------------------------------------------------------
// Self-check.

/// Deterministic test values (SplitMix64 -> uniform in [-1, 1) scaled and shifted), so that the
/// check does not move libtorch's generators.
pub(super) fn test_tensor(
    shape: &[i64],
    salt: u64,
    scale: f32,
    offset: f32,
    device: Device,
) -> Tensor {
    let n: i64 = shape.iter().product();
    let values: Vec<f32> = (0..n as u64)
        .map(|i| {
            let r = super::dropout::splitmix64_at(salt, i);
            let u = (r >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
            offset + scale * (2.0 * u - 1.0)
        })
        .collect();
    Tensor::from_slice(&values).view(shape).to_device(device)
}

/// A batch norm on `device` with varied parameters (so that the ReLU cuts at varied places).
pub(super) fn test_bn(vs: &tch::nn::VarStore, c: i64, salt: u64) -> BatchNorm {
    let bn = BatchNorm::new(&vs.root(), c);
    let device = vs.device();
    tch::no_grad(|| {
        bn.weight
            .shallow_clone()
            .copy_(&test_tensor(&[c], salt, 0.5, 1.0, device));
        bn.bias
            .shallow_clone()
            .copy_(&test_tensor(&[c], salt + 1, 0.5, 0.0, device));
        bn.running_mean
            .shallow_clone()
            .copy_(&test_tensor(&[c], salt + 2, 1.0, 0.0, device));
        bn.running_var
            .shallow_clone()
            .copy_(&test_tensor(&[c], salt + 3, 0.4, 1.0, device));
    });
    bn
}

/// Relative L2 difference `|a - b| / |b|` (absolute when `b` is zero).
pub(super) fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_device(Device::Cpu).to_kind(Kind::Double);
    let b = b.to_device(Device::Cpu).to_kind(Kind::Double);
    let num = (&a - &b).norm().double_value(&[]);
    let den = b.norm().double_value(&[]);
    if den > 0.0 {
        num / den
    } else {
        num
    }
}

fn expect_close(what: &str, a: &Tensor, b: &Tensor, tol: f64) -> Result<()> {
    let d = rel_diff(a, b);
    if d.is_finite() && d <= tol {
        Ok(())
    } else {
        Err(Error::Other(format!(
            "{what}: relative difference {d:.3e} > {tol:.0e}"
        )))
    }
}

/// Compares one fused op (`fused`) with its tch counterpart (`native`) on input `x` and
/// residual `r`: output, running statistics, and the gradients of x, r, weight and bias for
/// the loss `sum(out * g)`.
fn compare_op(
    what: &str,
    x: &Tensor,
    r: Option<&Tensor>,
    c: i64,
    fused: impl Fn(&Tensor, Option<&Tensor>, &BatchNorm) -> Result<Tensor>,
    native: impl Fn(&Tensor, Option<&Tensor>, &BatchNorm) -> Tensor,
) -> Result<()> {
    let device = x.device();
    let run = |use_fused: bool| -> Result<Vec<Tensor>> {
        let vs = tch::nn::VarStore::new(device);
        let bn = test_bn(&vs, c, 11);
        let xv = x.detach().set_requires_grad(true);
        let rv = r.map(|r| r.detach().set_requires_grad(true));
        let out = if use_fused {
            fused(&xv, rv.as_ref(), &bn)?
        } else {
            native(&xv, rv.as_ref(), &bn)
        };
        let g = test_tensor(&out.size(), 97, 1.0, 0.0, device);
        (&out * &g).sum(Kind::Float).backward();
        let mut all = vec![
            out.detach(),
            bn.running_mean.detach().copy(),
            bn.running_var.detach().copy(),
            xv.grad(),
            bn.weight.grad(),
            bn.bias.grad(),
        ];
        if let Some(rv) = rv {
            all.push(rv.grad());
        }
        Ok(all)
    };
    let got = run(true)?;
    let want = run(false)?;
    let names = [
        "output",
        "running_mean",
        "running_var",
        "dx",
        "dweight",
        "dbias",
        "dresidual",
    ];
    for ((name, a), b) in names.iter().zip(&got).zip(&want) {
        let tol = if name.starts_with('d') { 1e-3 } else { 1e-4 };
        expect_close(&format!("{what} {name}"), a, b, tol)?;
    }
    Ok(())
}

/// Checks the fused ops against the tch ops on `device` (see the module docs).
pub fn self_check(device: Device) -> Result<()> {
    // (N, C, ...) shapes: the channel-major layout (N = 1) and a multi-run one (N = 3), with an
    // element count that is not a multiple of the block size.
    for (shape, c) in [(vec![1i64, 8, 6, 50, 25], 8i64), (vec![3, 5, 7, 11], 5)] {
        let x = test_tensor(&shape, 5, 2.0, 0.3, device);
        let r = test_tensor(&shape, 6, 1.0, 0.0, device);
        for relu in [false, true] {
            compare_op(
                &format!("batch norm (relu {relu}, shape {shape:?})"),
                &x,
                None,
                c,
                |x, _, bn| bn_train(x, bn, relu),
                |x, _, bn| super::fused_entry::native(x, bn, relu),
            )?;
        }
        for res in [None, Some(&r)] {
            compare_op(
                &format!(
                    "block tail (p 0, residual {}, shape {shape:?})",
                    res.is_some()
                ),
                &x,
                res,
                c,
                |x, r, bn| tail(x, bn, 0.0, r, 0),
                |x, r, bn| native_tail(x, bn, 0.0, r),
            )?;
        }
    }
    check_dropout(device)
}

/// The unfused tail `relu(dropout_p(bn(y)) + r)` on the tch ops (the batch norm not through
/// [`BatchNorm::forward`], which would come back here).
fn native_tail(y: &Tensor, bn: &BatchNorm, p: f64, r: Option<&Tensor>) -> Tensor {
    let z = super::dropout(&bn.forward_native(y, true), p, true);
    match r {
        Some(r) => (z + r).relu(),
        None => z.relu(),
    }
}

/// The tail with p = 0.5: every output element is either the kept value relu(2 bn(y) + r) or
/// the dropped one relu(r), about half of them kept, and the mask differs between two calls.
fn check_dropout(device: Device) -> Result<()> {
    let shape = [1i64, 4, 32, 50, 25];
    let y = test_tensor(&shape, 21, 2.0, 0.5, device);
    let r = test_tensor(&shape, 22, 1.0, 0.0, device);
    let (vs, vs_ref) = (
        tch::nn::VarStore::new(device),
        tch::nn::VarStore::new(device),
    );
    let bn = test_bn(&vs, 4, 31);
    let bn_ref = test_bn(&vs_ref, 4, 31);
    let z = tch::no_grad(|| bn_ref.forward_native(&y, true));
    let kept = (&z * 2.0 + &r).relu();
    let dropped = r.relu();
    // The seeds serve the host emulation; on CUDA the generator advances between the calls.
    let first = tch::no_grad(|| tail(&y, &bn, 0.5, Some(&r), 1))?;
    let second = tch::no_grad(|| tail(&y, &bn, 0.5, Some(&r), 2))?;
    let tol = 1e-4;
    let is_kept = (&first - &kept).abs().le(tol);
    let is_dropped = (&first - &dropped).abs().le(tol);
    let explained = is_kept.logical_or(&is_dropped).all().int64_value(&[]) != 0;
    if !explained {
        return Err(Error::Other(
            "block tail (p 0.5): outputs that are neither kept nor dropped values".into(),
        ));
    }
    // Where kept and dropped values coincide the element says nothing about the mask.
    let informative = (&kept - &dropped).abs().gt(tol);
    let n_inf = informative.sum(Kind::Int64).int64_value(&[]) as f64;
    let n_kept = is_kept
        .logical_and(&informative)
        .sum(Kind::Int64)
        .int64_value(&[]) as f64;
    let fraction = n_kept / n_inf.max(1.0);
    if !(0.45..=0.55).contains(&fraction) {
        return Err(Error::Other(format!(
            "block tail (p 0.5): kept fraction {fraction:.3} of {n_inf} elements"
        )));
    }
    if first.equal(&second) {
        return Err(Error::Other(
            "block tail (p 0.5): two calls drew the same mask".into(),
        ));
    }
    Ok(())
}

#[cfg(all(test, not(crossclr_no_shim)))]
mod tests {
    use super::*;

    /// The whole self-check (batch norm with and without ReLU, the tail with and without
    /// residual and dropout, forward, running statistics and gradients against the tch ops) on
    /// the host emulation of the CUDA kernels.
    #[test]
    fn emulated_kernels_pass_the_self_check() {
        self_check(Device::Cpu).unwrap();
    }

    /// The four-wide kernel bodies (host emulation): the self-check passes with them, and they
    /// give the scalar kernels' outputs and gradients (batch norm + ReLU, and the tail with
    /// residual and p = 0.5, the same dropout mask) on a shape whose channels are multiples of 4
    /// long. (Other tests may run meanwhile with either setting; both paths are correct.)
    #[test]
    fn emulated_four_wide_kernels_match_the_scalar_ones() {
        let shape = [1i64, 3, 4, 50, 24];
        let x = test_tensor(&shape, 61, 2.0, 0.3, Device::Cpu);
        let r = test_tensor(&shape, 62, 1.0, 0.0, Device::Cpu);
        let run = |four_wide: bool| {
            set_vec4(four_wide);
            let vs = tch::nn::VarStore::new(Device::Cpu);
            let bn = test_bn(&vs, 3, 63);
            let xv = x.detach().set_requires_grad(true);
            let y = emulated_bn_train(&xv, &bn, true).unwrap();
            let yv = y.detach().set_requires_grad(true);
            let out = emulated_tail(&yv, &bn, 0.5, Some(&r), 777).unwrap();
            (&y.sum(Kind::Float) + &out.sum(Kind::Float)).backward();
            let result = [y.detach(), out.detach(), xv.grad(), yv.grad()];
            if four_wide {
                self_check(Device::Cpu).unwrap();
            }
            set_vec4(false);
            result
        };
        let four = run(true);
        let scalar = run(false);
        for (name, a, b) in [
            ("bn+relu out", &four[0], &scalar[0]),
            ("tail out", &four[1], &scalar[1]),
            ("bn+relu dx", &four[2], &scalar[2]),
            ("tail dy", &four[3], &scalar[3]),
        ] {
            let d = rel_diff(a, b);
            assert!(d < 1e-5, "{name}: {d}");
        }
    }

    /// Bad inputs are refused before anything is updated.
    #[test]
    fn mismatched_parameters_are_refused() {
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let bn = test_bn(&vs, 4, 51);
        let before = bn.running_mean.copy();
        let x = test_tensor(&[1, 5, 10, 25], 52, 1.0, 0.0, Device::Cpu);
        let err = emulated_bn_train(&x, &bn, true).unwrap_err().to_string();
        assert!(err.contains("weight") && err.contains("shape"), "{err}");
        assert!(bn.running_mean.equal(&before));
        assert_eq!(bn.num_batches_tracked.int64_value(&[]), 0);
        let x = test_tensor(&[1, 4, 10, 25], 53, 1.0, 0.0, Device::Cpu);
        let err = emulated_tail(&x, &bn, 1.0, None, 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("probability"), "{err}");
        let x64 = x.to_kind(Kind::Double);
        assert!(emulated_bn_train(&x64, &bn, false).is_err());
        assert!(bn.running_mean.equal(&before));
    }

    /// The kernels' division by a run-time constant (multiply-high and shift) is exact.
    #[test]
    fn constant_division_is_exact() {
        extern "C" {
            fn crossclr_fk_div_mismatches(min_d: u32, max_d: u32) -> i64;
        }
        // Small divisors (channels, frames x joints) and large ones (a channel-major run: batch
        // 128 x 2 bodies x 50 frames x 25 joints = 320,000), powers of two included.
        for (lo, hi) in [
            (1, 3000),
            (319_000, 321_000),
            (65_530, 65_540),
            (1 << 20, (1 << 20) + 8),
        ] {
            // SAFETY: a pure function of its arguments.
            assert_eq!(
                unsafe { crossclr_fk_div_mismatches(lo, hi) },
                0,
                "{lo}..={hi}"
            );
        }
    }

    /// The kernel source compiles with NVRTC for Ampere and Hopper (needs libnvrtc from the
    /// torch wheel, not a GPU; skipped with a message where libnvrtc is absent).
    #[test]
    fn kernels_compile_with_nvrtc() {
        if crate::gpu::shim_status() != crate::gpu::ShimStatus::Cuda {
            eprintln!("skipped: the shim was built without CUDA headers");
            return;
        }
        for arch in ["sm_80", "sm_90"] {
            match nvrtc_compile(arch) {
                Ok((bytes, version)) => {
                    assert!(bytes > 1000, "{arch}: CUBIN of {bytes} bytes");
                    assert!(version >= 11000, "NVRTC version {version}");
                }
                Err(e) if e.to_string().contains("libnvrtc not found") => {
                    eprintln!("skipped: {e}");
                    return;
                }
                Err(e) => panic!("{arch}: {e}"),
            }
        }
    }
}
