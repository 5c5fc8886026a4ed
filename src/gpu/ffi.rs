//! Raw bindings of the C++ shim (csrc/shim.h) and the one helper that turns its status + message
//! convention into [`crate::Error`]. Everything here is private to [`crate::gpu`].
#![cfg_attr(crossclr_no_shim, allow(unused_imports, dead_code))]
use crate::error::{Error, Result};
use std::ffi::{c_char, c_int};

/// A tch tensor as the shim sees it (`at::Tensor*`).
pub(crate) type TensorPtr = *mut std::ffi::c_void;

/// Opaque `CrossclrGraph` of the shim.
#[repr(C)]
pub(crate) struct RawGraph {
    _private: [u8; 0],
}

/// Opaque `CrossclrStream` of the shim (one `c10::cuda::CUDAStream`).
#[repr(C)]
pub(crate) struct RawStream {
    _private: [u8; 0],
}

#[cfg(not(crossclr_no_shim))]
#[allow(dead_code)]
extern "C" {
    pub(crate) fn crossclr_shim_free(s: *mut c_char);
    pub(crate) fn crossclr_shim_has_cuda() -> c_int;
    pub(crate) fn crossclr_ema_(
        keys: *const TensorPtr,
        queries: *const TensorPtr,
        n: usize,
        m: f64,
        err: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn crossclr_fused_sgd_(
        params: *const TensorPtr,
        grads: *const TensorPtr,
        bufs: *const TensorPtr,
        n: usize,
        weight_decay: f64,
        momentum: f64,
        lr: f64,
        lr_tensor: TensorPtr,
        err: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn crossclr_zero_grad_(
        params: *const TensorPtr,
        n: usize,
        set_to_none: c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn crossclr_set_tf32(on: c_int, err: *mut *mut c_char) -> c_int;
    pub(crate) fn crossclr_set_warn_on_accumulate_grad_stream_mismatch(on: c_int) -> c_int;
    pub(crate) fn crossclr_get_tf32(
        cublas: *mut c_int,
        cudnn: *mut c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn crossclr_cuda_device_name(
        device: c_int,
        buf: *mut c_char,
        len: usize,
        err: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn crossclr_cuda_memory_stats(
        device: c_int,
        peak_allocated: *mut i64,
        current_allocated: *mut i64,
        peak_reserved: *mut i64,
        err: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn crossclr_cuda_reset_peak(device: c_int, err: *mut *mut c_char) -> c_int;
    pub(crate) fn crossclr_cuda_empty_cache(err: *mut *mut c_char) -> c_int;
    pub(crate) fn crossclr_graph_new(
        device: c_int,
        out: *mut *mut RawGraph,
        err: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn crossclr_graph_stream_enter(g: *mut RawGraph, err: *mut *mut c_char) -> c_int;
    pub(crate) fn crossclr_graph_stream_exit(g: *mut RawGraph, err: *mut *mut c_char) -> c_int;
    pub(crate) fn crossclr_graph_capture_begin(
        g: *mut RawGraph,
        mode: c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn crossclr_graph_capture_end(g: *mut RawGraph, err: *mut *mut c_char) -> c_int;
    pub(crate) fn crossclr_graph_replay(g: *mut RawGraph, err: *mut *mut c_char) -> c_int;
    pub(crate) fn crossclr_graph_free(g: *mut RawGraph);
    pub(crate) fn crossclr_stream_from_pool(
        device: c_int,
        out: *mut *mut RawStream,
        err: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn crossclr_stream_current(
        device: c_int,
        out: *mut *mut RawStream,
        err: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn crossclr_stream_set_current(s: *const RawStream, err: *mut *mut c_char) -> c_int;
    pub(crate) fn crossclr_stream_wait(
        waiter: *const RawStream,
        done: *const RawStream,
        err: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn crossclr_stream_same(a: *const RawStream, b: *const RawStream) -> c_int;
    pub(crate) fn crossclr_record_stream(
        t: TensorPtr,
        s: *const RawStream,
        err: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn crossclr_stream_free(s: *mut RawStream);
}

/// The error every shim call returns when the crate was built without the shim.
#[cfg_attr(not(crossclr_no_shim), allow(dead_code))]
pub(crate) fn no_shim(what: &str) -> Error {
    Error::Other(format!(
        "{what}: crossclr was built without the CUDA shim (csrc/shim.cpp did not compile or libtorch \
         headers were missing; see the build warnings)"
    ))
}

/// True when the shim is linked in.
pub(crate) const SHIM_BUILT: bool = cfg!(not(crossclr_no_shim));

/// Calls a shim function `f(err_out) -> status` and converts a failure into an error naming `what`.
#[cfg(not(crossclr_no_shim))]
pub(crate) fn call(what: &str, f: impl FnOnce(*mut *mut c_char) -> c_int) -> Result<()> {
    let mut err: *mut c_char = std::ptr::null_mut();
    let status = f(&mut err);
    if status == 0 {
        return Ok(());
    }
    Err(Error::Other(format!(
        "{what}: {}",
        take_message(err, "unknown error (no message)")
    )))
}

/// The message a failed shim call left in `err` (freed here), or `none` when it left none.
#[cfg(not(crossclr_no_shim))]
pub(crate) fn take_message(err: *mut c_char, none: &str) -> String {
    if err.is_null() {
        return none.to_string();
    }
    // SAFETY: the shim returns a malloc'd NUL-terminated string that we own and free once.
    let s = unsafe { std::ffi::CStr::from_ptr(err) }
        .to_string_lossy()
        .into_owned();
    unsafe { crossclr_shim_free(err) };
    s
}

/// Raw pointers of a tensor slice, for the shim's `at::Tensor**` arguments. The shim only reads
/// through them (in-place ops mutate tensor data, never the tch handles).
pub(crate) fn ptrs<T: std::borrow::Borrow<tch::Tensor>>(tensors: &[T]) -> Vec<TensorPtr> {
    tensors
        .iter()
        .map(|t| t.borrow().as_ptr() as TensorPtr)
        .collect()
}
