//! The temporal `(kt, 1)` convolution of a channel-major ST-GCN block, with an optional deferred
//! weight gradient.
//!
//! Why: in a Kineto profile of a SkeletonCLR step on an H200 (fast step, one stream) the temporal
//! convolutions' weight-gradient kernels took 2.1 of 17.5 ms (12 %): each is a reduction over every
//! position (N·M·T·V, up to 320,000) into a tiny `(C_out, C_in·kt)` matrix, so cuDNN runs it on a
//! handful of thread blocks for ~175 µs while the rest of the card waits, and the next kernels of
//! the backward pass (which need only the input gradient) queue behind it. Nothing downstream needs
//! the weight gradient until the optimiser step.
//!
//! Measured (H200, 2026-11-27, graph step + TF32 + cuDNN autotuning + side streams, same call):
//! SkeletonCLR 16.72 ms deferred vs 16.80 inline, CrosSCLR-3 phase 1 44.91 vs 44.40, phase 2
//! 47.09 vs 46.14, and reserved memory +2 %: no gain once the views' passes already overlap on side
//! streams, so the training step does not defer by default (`CROSSCLR_WGRAD_STREAM=on` does).
//!
//! So, inside a [`WgradScope`], [`conv`] runs the convolution as a custom autograd op
//! (csrc/temporal_conv.cpp) whose backward computes the input and bias gradients as usual and the
//! weight gradient on a separate CUDA stream, parks it, and [`WgradScope::join`] (after backward,
//! before the optimiser) adds the parked gradients to the parameters' `.grad` once the caller's
//! stream has waited for that stream. In a CUDA-graph capture the weight-gradient stream becomes a
//! parallel branch of the graph. Outside a scope, without the shim, or with
//! `CROSSCLR_WGRAD_STREAM=off`, [`conv`] is the plain `conv3d`. The values are the same either way
//! (the same cuDNN / CPU convolution calls, only split and reordered): tested on the CPU, where the
//! op parks the gradient without a stream.
use super::fused_bn::switched_off;
use crate::error::{Error, Result};
use std::cell::Cell;
use std::sync::OnceLock;
use tch::Tensor;

/// Environment variable: `on` (or `1`, `true`) makes [`crate::gpu::FastStep`] defer the weight
/// gradients on CUDA; `off` disables the op everywhere. Default: not deferred, because it did not
/// pay (module docs).
pub const ENV_SWITCH: &str = "CROSSCLR_WGRAD_STREAM";

#[cfg(not(crossclr_no_shim))]
extern "C" {
    fn crossclr_wgrad_batch_new(id: *mut i64, err: *mut *mut std::ffi::c_char) -> std::ffi::c_int;
    fn crossclr_wgrad_batch_free(id: i64);
    fn crossclr_wgrad_batch_parked(id: i64) -> i64;
    fn crossclr_wgrad_join(id: i64, err: *mut *mut std::ffi::c_char) -> std::ffi::c_int;
    fn crossclr_temporal_conv(
        x: *mut std::ffi::c_void,
        w: *mut std::ffi::c_void,
        b: *mut std::ffi::c_void,
        stride: i64,
        pad: i64,
        batch_id: i64,
        out: *mut *mut std::ffi::c_void,
        err: *mut *mut std::ffi::c_char,
    ) -> std::ffi::c_int;
}

thread_local! {
    /// The batch of the innermost live scope on this thread.
    static ACTIVE: Cell<Option<i64>> = const { Cell::new(None) };
}

/// Whether deferred weight gradients are available (built with the shim, not switched off).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| cfg!(not(crossclr_no_shim)) && !switched_off(ENV_SWITCH))
}

/// Whether the CUDA training step defers them by default (`CROSSCLR_WGRAD_STREAM=on`).
pub fn on_by_default() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        enabled()
            && matches!(
                std::env::var(ENV_SWITCH).as_deref().map(str::trim),
                Ok("on") | Ok("1") | Ok("true")
            )
    })
}

/// While a scope lives, temporal convolutions forwarded on this thread park their weight
/// gradients in the scope's batch; [`WgradScope::join`] hands them to the parameters. Dropping a
/// scope without joining discards what it parked (and a backward that runs after the drop returns
/// the weight gradient to autograd as usual).
pub struct WgradScope {
    #[cfg_attr(crossclr_no_shim, allow(dead_code))]
    id: i64,
    previous: Option<i64>,
}

impl WgradScope {
    /// A new scope, active on this thread until dropped; `None` when [`enabled`] says no.
    pub fn enter() -> Result<Option<Self>> {
        if !enabled() {
            return Ok(None);
        }
        #[cfg(not(crossclr_no_shim))]
        {
            let mut id = 0i64;
            // SAFETY: `id` is a valid out-pointer.
            crate::gpu::ffi::call("wgrad batch", |err| unsafe {
                crossclr_wgrad_batch_new(&mut id, err)
            })?;
            let previous = ACTIVE.with(|a| a.replace(Some(id)));
            Ok(Some(WgradScope { id, previous }))
        }
        #[cfg(crossclr_no_shim)]
        Ok(None)
    }

    /// Number of weight gradients parked and not joined yet.
    pub fn parked(&self) -> usize {
        #[cfg(not(crossclr_no_shim))]
        {
            // SAFETY: plain value call; an unknown id gives 0.
            unsafe { crossclr_wgrad_batch_parked(self.id) as usize }
        }
        #[cfg(crossclr_no_shim)]
        0
    }

    /// Adds the parked weight gradients to their parameters' `.grad` (setting undefined ones) and
    /// empties the batch; on CUDA the current stream first waits for the weight-gradient stream.
    /// Call after backward, before anything reads the gradients.
    pub fn join(&self) -> Result<()> {
        #[cfg(not(crossclr_no_shim))]
        {
            // SAFETY: plain value call; the shim checks the id.
            crate::gpu::ffi::call("wgrad join", |err| unsafe {
                crossclr_wgrad_join(self.id, err)
            })
        }
        #[cfg(crossclr_no_shim)]
        Ok(())
    }
}

impl Drop for WgradScope {
    fn drop(&mut self) {
        ACTIVE.with(|a| a.set(self.previous));
        #[cfg(not(crossclr_no_shim))]
        // SAFETY: plain value call; freeing an id twice is a no-op.
        unsafe {
            crossclr_wgrad_batch_free(self.id)
        };
    }
}

/// `y = conv3d(x, w.unsqueeze(2), b)` with stride `(1, stride, 1)` and padding `(0, pad, 0)`:
/// `x` `(1, C_in, R, T, V)`, `w` `(C_out, C_in, kt, 1)`, `b` `(C_out,)` or none (a bias folded
/// into the following batch norm, `layers::BatchNorm::folding`) -> `(1, C_out, R, T', V)`.
/// Inside a [`WgradScope`] (and when `w` requires grad) the weight gradient is deferred (module
/// docs).
pub fn conv(x: &Tensor, w: &Tensor, b: Option<&Tensor>, stride: i64, pad: i64) -> Tensor {
    if let Some(id) = ACTIVE.with(Cell::get) {
        if w.requires_grad() {
            match deferred(x, w, b, stride, pad, id) {
                Ok(y) => return y,
                Err(e) => warn_once(&e.to_string()),
            }
        }
    }
    plain(x, w, b, stride, pad)
}

/// The plain convolution (autograd computes all three gradients in one node).
pub fn plain(x: &Tensor, w: &Tensor, b: Option<&Tensor>, stride: i64, pad: i64) -> Tensor {
    x.conv3d(
        &w.unsqueeze(2),
        b,
        [1, stride, 1],
        [0, pad, 0],
        [1, 1, 1],
        1,
    )
}

/// The custom op (csrc/temporal_conv.cpp).
fn deferred(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    stride: i64,
    pad: i64,
    id: i64,
) -> Result<Tensor> {
    #[cfg(not(crossclr_no_shim))]
    {
        let mut out: *mut std::ffi::c_void = std::ptr::null_mut();
        // SAFETY: live tch tensors borrowed for the call; the C side checks them and never lets an
        // exception escape; on success `out` is a fresh `at::Tensor*` that we own.
        crate::gpu::ffi::call("temporal convolution", |err| unsafe {
            crossclr_temporal_conv(
                x.as_ptr() as *mut _,
                w.as_ptr() as *mut _,
                b.map_or(std::ptr::null_mut(), |b| b.as_ptr() as *mut _),
                stride,
                pad,
                id,
                &mut out,
                err,
            )
        })?;
        if out.is_null() {
            return Err(Error::Other(
                "temporal convolution: no output tensor".into(),
            ));
        }
        // SAFETY: a fresh at::Tensor* from the shim, owned from here on.
        Ok(unsafe { Tensor::from_ptr(out as *mut _) })
    }
    #[cfg(crossclr_no_shim)]
    {
        let _ = (x, w, b, stride, pad, id);
        Err(Error::Other("built without the C++ shim".into()))
    }
}

fn warn_once(msg: &str) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        eprintln!("crossclr: deferred temporal-convolution op failed ({msg}); using the plain one")
    });
}

#[cfg(all(test, not(crossclr_no_shim)))]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    struct Case {
        x: Tensor,
        w: Tensor,
        b: Tensor,
        dy: Tensor,
    }

    fn case(stride: i64) -> Case {
        tch::manual_seed(11);
        let opts = (Kind::Double, Device::Cpu);
        let t_out = (12 + 2 * 4 - 9) / stride + 1;
        Case {
            x: Tensor::randn([1, 5, 3, 12, 4], opts),
            w: Tensor::randn([6, 5, 9, 1], opts),
            b: Tensor::randn([6], opts),
            dy: Tensor::randn([1, 6, 3, t_out, 4], opts),
        }
    }

    /// Runs forward + backward with fresh leaves; returns (y, dx, dw, db) and the leaves.
    fn run(c: &Case, stride: i64, f: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Tensor) -> [Tensor; 5] {
        let x = c.x.detach().set_requires_grad(true);
        let w = c.w.detach().set_requires_grad(true);
        let b = c.b.detach().set_requires_grad(true);
        let y = f(&x, &w, &b);
        assert_eq!(y.size(), c.dy.size(), "stride {stride}");
        (&y * &c.dy).sum(Kind::Double).backward();
        [y.detach(), x.grad(), w.grad(), b.grad(), w]
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    /// Same output and gradients as the plain convolution; the weight gradient arrives only at
    /// the join, and a second backward before the join accumulates like autograd does.
    #[test]
    fn deferred_matches_plain_and_parks_until_join() {
        for stride in [1, 2] {
            let c = case(stride);
            let want = run(&c, stride, &|x, w, b| plain(x, w, Some(b), stride, 4));
            let scope = WgradScope::enter().unwrap().expect("enabled in tests");
            let x = c.x.detach().set_requires_grad(true);
            let w = c.w.detach().set_requires_grad(true);
            let b = c.b.detach().set_requires_grad(true);
            let y = conv(&x, &w, Some(&b), stride, 4);
            (&y * &c.dy).sum(Kind::Double).backward();
            assert!(
                !w.grad().defined(),
                "weight gradient must wait for the join"
            );
            assert_eq!(scope.parked(), 1);
            scope.join().unwrap();
            assert_eq!(scope.parked(), 0);
            for (name, got, want) in [
                ("y", &y.detach(), &want[0]),
                ("dx", &x.grad(), &want[1]),
                ("dw", &w.grad(), &want[2]),
                ("db", &b.grad(), &want[3]),
            ] {
                let d = max_diff(got, want);
                assert!(d < 1e-10, "stride {stride} {name}: {d}");
            }
            // Accumulation: a second pass adds to the existing gradient.
            let y2 = conv(&x, &w, Some(&b), stride, 4);
            (&y2 * &c.dy).sum(Kind::Double).backward();
            scope.join().unwrap();
            let d = max_diff(&w.grad(), &(&want[2] * 2.0));
            assert!(d < 1e-10, "stride {stride} accumulated dw: {d}");
        }
    }

    /// Outside a scope the op is the plain one; after a scope is dropped unjoined, a backward
    /// still delivers the weight gradient through autograd.
    #[test]
    fn no_scope_or_dropped_scope_falls_back_to_autograd() {
        let c = case(1);
        let want = run(&c, 1, &|x, w, b| plain(x, w, Some(b), 1, 4));
        let got = run(&c, 1, &|x, w, b| conv(x, w, Some(b), 1, 4));
        assert!(max_diff(&got[2], &want[2]) < 1e-10);
        let x = c.x.detach().set_requires_grad(true);
        let w = c.w.detach().set_requires_grad(true);
        let b = c.b.detach().set_requires_grad(true);
        let y = {
            let _scope = WgradScope::enter().unwrap().expect("enabled in tests");
            conv(&x, &w, Some(&b), 1, 4)
        };
        (&y * &c.dy).sum(Kind::Double).backward();
        assert!(max_diff(&w.grad(), &want[2]) < 1e-10);
    }

    /// Without a bias (folded into the next batch norm) the op matches the plain convolution.
    #[test]
    fn deferred_without_bias_matches_plain() {
        let c = case(2);
        let fwd_bwd = |deferred: bool| {
            let scope = WgradScope::enter().unwrap().expect("enabled in tests");
            let x = c.x.detach().set_requires_grad(true);
            let w = c.w.detach().set_requires_grad(true);
            let y = if deferred {
                conv(&x, &w, None, 2, 4)
            } else {
                plain(&x, &w, None, 2, 4)
            };
            (&y * &c.dy).sum(Kind::Double).backward();
            scope.join().unwrap();
            [y.detach(), x.grad(), w.grad()]
        };
        let (got, want) = (fwd_bwd(true), fwd_bwd(false));
        for (g, w) in got.iter().zip(&want) {
            assert!(max_diff(g, w) < 1e-10);
        }
    }

    /// Bad shapes are a clear error from the op.
    #[test]
    fn bad_shapes_are_refused() {
        let scope = WgradScope::enter().unwrap().expect("enabled in tests");
        let x = Tensor::zeros([1, 5, 3, 12, 4], (Kind::Float, Device::Cpu));
        let w = Tensor::zeros([6, 4, 9, 1], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let b = Tensor::zeros([6], (Kind::Float, Device::Cpu));
        let e = deferred(&x, &w, Some(&b), 1, 4, scope.id).expect_err("mismatched weight");
        assert!(
            e.to_string()
                .contains("the weight must be (C_out, 5, kt, 1)"),
            "{e}"
        );
    }
}
