//! The C entry points of the fused batch-norm ops (CPU: csrc/fused_bn.cpp; CUDA kernels:
//! csrc/cuda_kernels.cpp), the wrappers that call them on live tensors, and the tch path they are
//! checked against. The shared bottom of `fused_bn` (CPU ops, dispatch) and `fused_cuda` (CUDA
//! kernels): both call down into this module, never into each other's internals.
use super::layers::BatchNorm;
#[cfg(not(crossclr_no_shim))]
use crate::error::Error;
use crate::error::Result;
#[cfg(not(crossclr_no_shim))]
use crate::gpu::ffi::take_message;
use tch::Tensor;

/// Declares a family of C entry points of one signature, and `$alias`, the type of a pointer to
/// any of them (so that one Rust wrapper serves them all).
macro_rules! fused_entries {
    ($(#[$doc:meta])* $alias:ident = fn $params:tt; $($name:ident),+ $(,)?) => {
        $(#[$doc])*
        #[cfg(not(crossclr_no_shim))]
        pub(crate) type $alias = unsafe extern "C" fn $params -> std::ffi::c_int;
        #[cfg(crossclr_no_shim)]
        pub(crate) type $alias = ();
        #[cfg(not(crossclr_no_shim))]
        extern "C" {
            $(pub(crate) fn $name $params -> std::ffi::c_int;)+
        }
        // Without the shim: placeholders, so that the wrappers compile unchanged (and fail).
        $(#[cfg(crossclr_no_shim)]
        #[allow(non_upper_case_globals)]
        pub(crate) const $name: $alias = ();)+
    };
}

fused_entries!(
    /// Fused training batch norm (+ ReLU): `crossclr_fused_bn_train` (CPU, csrc/fused_bn.cpp) and
    /// `crossclr_fk_bn_train` (CUDA kernels, csrc/cuda_kernels.cpp). Tensors are `at::Tensor*`;
    /// returns 0 and a new tensor in `out`, or 1 and a message in `err`.
    BnEntry = fn(
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
    );
    crossclr_fused_bn_train,
    crossclr_fk_bn_train,
);

fused_entries!(
    /// Fused block tail `relu(dropout_p(bn(y)) + r)` (`r` null: no residual):
    /// `crossclr_fused_bn_tail_train` (CPU) and `crossclr_fk_tail_train` (CUDA kernels).
    TailEntry = fn(
        y: *mut std::ffi::c_void,
        r: *mut std::ffi::c_void,
        w: *mut std::ffi::c_void,
        b: *mut std::ffi::c_void,
        running_mean: *mut std::ffi::c_void,
        running_var: *mut std::ffi::c_void,
        momentum: f64,
        eps: f64,
        p: f64,
        seed: i64,
        out: *mut *mut std::ffi::c_void,
        err: *mut *mut std::ffi::c_char,
    );
    crossclr_fused_bn_tail_train,
    crossclr_fk_tail_train,
);

/// The tch path: `Tensor::batch_norm` (training) + in-place ReLU.
pub(crate) fn native(x: &Tensor, bn: &BatchNorm, relu: bool) -> Tensor {
    let mut y = bn.forward_native(x, true);
    if relu {
        let _ = y.relu_(); // batch-norm backward does not need its output
    }
    y
}

/// A live tch tensor as the shim's `at::Tensor*`.
#[cfg(not(crossclr_no_shim))]
fn ptr(t: &Tensor) -> *mut std::ffi::c_void {
    t.as_ptr() as *mut std::ffi::c_void
}

/// Runs the fused batch-norm entry point `entry` (CPU op, or CUDA kernels) on live tensors and
/// takes ownership of the tensor it returns; on success counts one batch in
/// `bn.num_batches_tracked` (the C side updates the running statistics, not the counter). `what`
/// names the op in the error.
#[cfg(not(crossclr_no_shim))]
pub(crate) fn run_bn(
    entry: BnEntry,
    what: &str,
    x: &Tensor,
    bn: &BatchNorm,
    relu: bool,
) -> Result<Tensor> {
    // SAFETY: every pointer is a live tch tensor borrowed for the call; the C side checks them
    // (null, undefined, device, dtype, layout, shape) and never lets an exception escape.
    call_fused(what, bn, |out, err| unsafe {
        entry(
            ptr(x),
            ptr(&bn.weight),
            ptr(&bn.bias),
            ptr(&bn.running_mean),
            ptr(&bn.running_var),
            super::layers::BN_MOMENTUM,
            super::layers::BN_EPS,
            std::ffi::c_int::from(relu),
            out,
            err,
        )
    })
}

/// [`run_bn`] for the block-tail entry points (`r` `None`: a null residual).
#[cfg(not(crossclr_no_shim))]
pub(crate) fn run_tail(
    entry: TailEntry,
    what: &str,
    y: &Tensor,
    bn: &BatchNorm,
    p: f64,
    r: Option<&Tensor>,
    seed: i64,
) -> Result<Tensor> {
    // SAFETY: as in `run_bn`; a null residual means none.
    call_fused(what, bn, |out, err| unsafe {
        entry(
            ptr(y),
            r.map_or(std::ptr::null_mut(), ptr),
            ptr(&bn.weight),
            ptr(&bn.bias),
            ptr(&bn.running_mean),
            ptr(&bn.running_var),
            super::layers::BN_MOMENTUM,
            super::layers::BN_EPS,
            p,
            seed,
            out,
            err,
        )
    })
}

/// Runs a fused-op entry point `f(out, err) -> status` and takes ownership of the tensor it
/// returns; on success counts one batch in `bn.num_batches_tracked`.
#[cfg(not(crossclr_no_shim))]
fn call_fused(
    what: &str,
    bn: &BatchNorm,
    f: impl FnOnce(*mut *mut std::ffi::c_void, *mut *mut std::ffi::c_char) -> std::ffi::c_int,
) -> Result<Tensor> {
    let mut out: *mut std::ffi::c_void = std::ptr::null_mut();
    let mut err: *mut std::ffi::c_char = std::ptr::null_mut();
    let status = f(&mut out, &mut err);
    if status != 0 || out.is_null() {
        return Err(Error::Other(format!(
            "{what}: {}",
            take_message(err, "no output tensor")
        )));
    }
    tch::no_grad(|| {
        let _ = bn.num_batches_tracked.shallow_clone().g_add_scalar_(1);
    });
    // SAFETY: `out` is a fresh `at::Tensor*` owned by us; tch's drop deletes it.
    Ok(unsafe { Tensor::from_ptr(out as *mut _) })
}

/// [`run_bn`] and [`run_tail`] without the shim: the error.
#[cfg(crossclr_no_shim)]
pub(crate) fn run_bn(_: BnEntry, what: &str, _: &Tensor, _: &BatchNorm, _: bool) -> Result<Tensor> {
    Err(Error::Other(format!("{what}: built without the C++ shim")))
}

#[cfg(crossclr_no_shim)]
pub(crate) fn run_tail(
    _: TailEntry,
    what: &str,
    _: &Tensor,
    _: &BatchNorm,
    _: f64,
    _: Option<&Tensor>,
    _: i64,
) -> Result<Tensor> {
    Err(Error::Other(format!("{what}: built without the C++ shim")))
}
