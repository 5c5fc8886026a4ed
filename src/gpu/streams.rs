//! Fork / join over CUDA side streams, for the independent parts of a training step: per view, the
//! query pass and the key pass. Each task runs with its own stream current, forked from (waiting
//! for) the caller's current stream and joined back into it afterwards, so the kernels of
//! independent encoders can run concurrently on the card. The backward pass follows by itself:
//! libtorch's autograd runs each node's backward on the stream its forward ran on and inserts the
//! waits between streams. The waits are event record / wait pairs, which a CUDA-graph capture turns
//! into edges of the graph (branches that run in parallel on replay).
//!
//! Host issue order is unchanged (task 0, 1, ... in order), so random draws (dropout) are the same
//! as on one stream. How many streams a step uses is the lever `kernels.view_streams`
//! (`crate::model::kernels::ViewStreams`: one per view by default, one per pass, or none).
use super::ffi;
use crate::error::Result;
use tch::{Device, Tensor};

/// One CUDA stream (an owned handle to a `c10::cuda::CUDAStream`).
pub struct Stream {
    #[cfg_attr(crossclr_no_shim, allow(dead_code))]
    raw: *mut ffi::RawStream,
}

#[cfg(not(crossclr_no_shim))]
impl Stream {
    fn from_pool(index: usize) -> Result<Self> {
        // SAFETY: `out` is a valid out-pointer; the shim allocates the handle.
        Self::made_by("Stream::from_pool", |out, err| unsafe {
            ffi::crossclr_stream_from_pool(index as i32, out, err)
        })
    }

    fn current(index: usize) -> Result<Self> {
        // SAFETY: as above.
        Self::made_by("Stream::current", |out, err| unsafe {
            ffi::crossclr_stream_current(index as i32, out, err)
        })
    }

    /// A handle from a shim constructor `make(out, err) -> status`.
    fn made_by(
        what: &str,
        make: impl FnOnce(*mut *mut ffi::RawStream, *mut *mut std::ffi::c_char) -> std::ffi::c_int,
    ) -> Result<Self> {
        let mut raw = std::ptr::null_mut();
        ffi::call(what, |err| make(&mut raw, err))?;
        Ok(Stream { raw })
    }

    fn set_current(&self) -> Result<()> {
        // SAFETY: self.raw is a live handle.
        ffi::call("Stream::set_current", |err| unsafe {
            ffi::crossclr_stream_set_current(self.raw, err)
        })
    }

    /// `self` waits (on the device) for the work queued so far on `done`.
    fn wait(&self, done: &Stream) -> Result<()> {
        // SAFETY: both handles are live.
        ffi::call("Stream::wait", |err| unsafe {
            ffi::crossclr_stream_wait(self.raw, done.raw, err)
        })
    }

    fn same(&self, other: &Stream) -> bool {
        // SAFETY: both handles are live.
        unsafe { ffi::crossclr_stream_same(self.raw, other.raw) != 0 }
    }

    /// Marks `t`'s memory as used on this stream (the caching allocator's `record_stream`).
    fn record(&self, t: &Tensor) -> Result<()> {
        // SAFETY: the tensor and the handle outlive the call; the shim only reads them.
        ffi::call("Stream::record", |err| unsafe {
            ffi::crossclr_record_stream(t.as_ptr() as ffi::TensorPtr, self.raw, err)
        })
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        #[cfg(not(crossclr_no_shim))]
        if !self.raw.is_null() {
            // SAFETY: the handle came from the shim and is freed exactly once.
            unsafe { ffi::crossclr_stream_free(self.raw) };
            self.raw = std::ptr::null_mut();
        }
    }
}

/// A fixed set of side streams on one CUDA device. See the module docs.
pub struct SideStreams {
    #[cfg_attr(crossclr_no_shim, allow(dead_code))]
    index: usize,
    #[cfg_attr(crossclr_no_shim, allow(dead_code))]
    streams: Vec<Stream>,
}

impl SideStreams {
    /// `n` streams from libtorch's pool on `device`; `None` on the CPU, for `n < 2` (the lever
    /// `kernels.view_streams=off` asks for 0), or when the shim has no CUDA half.
    pub fn new(device: Device, n: usize) -> Result<Option<Self>> {
        let Device::Cuda(index) = device else {
            return Ok(None);
        };
        if n < 2 || super::shim_status() != super::ShimStatus::Cuda {
            return Ok(None);
        }
        #[cfg(not(crossclr_no_shim))]
        {
            let streams = (0..n)
                .map(|_| Stream::from_pool(index))
                .collect::<Result<Vec<_>>>()?;
            // Parameters used by passes on several streams (CrosSCLR's shared head) get gradients
            // from several streams; autograd synchronises them correctly but warns once per
            // process that their AccumulateGrad node's stream differs. Expected here: silence it.
            // SAFETY: plain value call.
            let _ = unsafe { ffi::crossclr_set_warn_on_accumulate_grad_stream_mismatch(0) };
            Ok(Some(SideStreams { index, streams }))
        }
        #[cfg(crossclr_no_shim)]
        {
            let _ = index;
            Ok(None)
        }
    }

    /// Number of side streams.
    pub fn len(&self) -> usize {
        self.streams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    /// Makes the caller's current stream wait for everything queued so far on every side stream
    /// (e.g. after a backward pass whose nodes ran on the side streams, before the optimiser step;
    /// inside a capture this joins every side stream back into the captured stream).
    pub fn join_all(&self) -> Result<()> {
        #[cfg(not(crossclr_no_shim))]
        {
            let main = Stream::current(self.index)?;
            for s in &self.streams {
                main.wait(s)?;
            }
        }
        Ok(())
    }

    /// Runs `task(i)` for `i in 0..n` in order, task `i` with side stream `i % len()` current.
    /// The side streams first wait for the caller's current stream; the caller's stream waits for
    /// all of them at the end, also when a task fails (the caller's stream is current again either
    /// way). `inputs` (tensors of the caller's stream that tasks read) are recorded as used on the
    /// side streams, and the returned tensors as used on the caller's stream, so that the caching
    /// allocator never recycles a block while another stream may still use it.
    pub fn fork_join(
        &self,
        n: usize,
        inputs: &[&Tensor],
        mut task: impl FnMut(usize) -> Result<Tensor>,
    ) -> Result<Vec<Tensor>> {
        #[cfg(not(crossclr_no_shim))]
        {
            let main = Stream::current(self.index)?;
            let used = &self.streams[..n.min(self.streams.len())];
            for s in used {
                s.wait(&main)?;
                if !s.same(&main) {
                    for t in inputs {
                        s.record(t)?;
                    }
                }
            }
            let mut outputs = Vec::with_capacity(n);
            let mut failure = None;
            for i in 0..n {
                let stream = &self.streams[i % self.streams.len()];
                let result = stream.set_current().and_then(|_| task(i));
                match result {
                    Ok(t) => outputs.push(t),
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
            main.set_current()?;
            for s in used {
                main.wait(s)?;
            }
            if let Some(e) = failure {
                return Err(e);
            }
            for t in &outputs {
                main.record(t)?;
            }
            Ok(outputs)
        }
        #[cfg(crossclr_no_shim)]
        {
            let _ = (n, inputs, &mut task);
            Err(ffi::no_shim("SideStreams::fork_join"))
        }
    }
}
