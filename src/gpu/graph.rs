//! CUDA graphs: [`CudaGraph`] (a thin owner of libtorch's `at::cuda::CUDAGraph`, its private memory
//! pool and a side stream) and [`CapturedStep`], which warms a step closure up on the side stream,
//! captures it once and then replays it after copying each new batch into static input tensors.
//! The capture-safety rules for the step are in the [`crate::gpu`] module documentation.
use super::ffi;
use crate::error::{Error, Result};
use tch::{Device, Tensor};

/// How strictly CUDA forbids unsafe API calls during a capture (`cudaStreamCaptureMode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CaptureMode {
    /// Any thread's unsafe call (e.g. a synchronous copy) invalidates the capture: PyTorch's default.
    #[default]
    Global,
    /// Only this thread's unsafe calls invalidate it.
    ThreadLocal,
    /// Nothing is checked.
    Relaxed,
}

impl CaptureMode {
    fn code(self) -> i32 {
        match self {
            CaptureMode::Global => 0,
            CaptureMode::ThreadLocal => 1,
            CaptureMode::Relaxed => 2,
        }
    }
}

/// One CUDA graph on one device, with its own side stream and private memory pool.
///
/// Usage: [`CudaGraph::on_side_stream`] for warm-up steps, then [`CudaGraph::capture`], then
/// [`CudaGraph::replay`] (on the caller's current stream) as often as needed. Tensors allocated
/// during the capture live in the graph's pool until the graph is dropped; they are overwritten
/// by every replay.
pub struct CudaGraph {
    #[cfg_attr(crossclr_no_shim, allow(dead_code))]
    raw: *mut ffi::RawGraph,
    device: Device,
    captured: bool,
}

impl CudaGraph {
    /// A new, empty graph on `device` (must be `Device::Cuda(_)`).
    pub fn new(device: Device) -> Result<Self> {
        let Device::Cuda(index) = device else {
            return Err(Error::config(format!(
                "CUDA graphs need a CUDA device, got {device:?} (use --graph off on CPU)"
            )));
        };
        #[cfg(not(crossclr_no_shim))]
        {
            let mut raw: *mut ffi::RawGraph = std::ptr::null_mut();
            // SAFETY: `raw` is a valid out-pointer; the shim allocates the graph.
            ffi::call("CudaGraph::new", |err| unsafe {
                ffi::crossclr_graph_new(index as i32, &mut raw, err)
            })?;
            Ok(CudaGraph {
                raw,
                device,
                captured: false,
            })
        }
        #[cfg(crossclr_no_shim)]
        {
            let _ = index;
            Err(ffi::no_shim("CudaGraph::new"))
        }
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// True once a capture succeeded.
    pub fn is_captured(&self) -> bool {
        self.captured
    }

    /// Runs `f` with the graph's side stream as the current stream of its device (the side stream
    /// first waits for the current stream; afterwards the current stream waits for it). Warm-up
    /// iterations must run here, so that cuBLAS workspaces, cuDNN autotuning and autograd's lazy
    /// state are set up for this stream before the capture.
    pub fn on_side_stream<T>(&mut self, f: impl FnOnce() -> T) -> Result<T> {
        self.stream_enter()?;
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let exit = self.stream_exit();
        match out {
            Ok(v) => exit.map(|_| v),
            Err(panic) => Err(Error::Other(format!(
                "step panicked on the side stream: {}",
                panic_message(&panic)
            ))),
        }
    }

    /// Captures the CUDA work that `f` queues into this graph (on the side stream, with a private
    /// memory pool). If `f` fails or panics, the capture is ended and the error returned.
    pub fn capture<T>(&mut self, mode: CaptureMode, f: impl FnOnce() -> Result<T>) -> Result<T> {
        if self.captured {
            return Err(Error::Other(
                "CudaGraph::capture: this graph already holds a capture".into(),
            ));
        }
        self.capture_begin(mode)?;
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let end = self.capture_end();
        let value = match out {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => return Err(Error::Other(format!("step failed during CUDA graph capture: {e}{}", end_note(&end)))),
            Err(panic) => {
                return Err(Error::Other(format!(
                    "step panicked during CUDA graph capture (a host sync such as .item() / .to(Cpu) / \
                     a CPU->GPU copy inside the step?): {}{}",
                    panic_message(&panic),
                    end_note(&end)
                )))
            }
        };
        end?;
        self.captured = true;
        Ok(value)
    }

    /// Replays the captured work on the current stream.
    pub fn replay(&self) -> Result<()> {
        if !self.captured {
            return Err(Error::Other(
                "CudaGraph::replay: nothing captured yet".into(),
            ));
        }
        #[cfg(not(crossclr_no_shim))]
        {
            // SAFETY: self.raw is a live graph.
            ffi::call("CudaGraph::replay", |err| unsafe {
                ffi::crossclr_graph_replay(self.raw, err)
            })
        }
        #[cfg(crossclr_no_shim)]
        {
            Err(ffi::no_shim("CudaGraph::replay"))
        }
    }

    fn stream_enter(&mut self) -> Result<()> {
        #[cfg(not(crossclr_no_shim))]
        {
            // SAFETY: self.raw is a live graph.
            ffi::call("CudaGraph: enter side stream", |err| unsafe {
                ffi::crossclr_graph_stream_enter(self.raw, err)
            })
        }
        #[cfg(crossclr_no_shim)]
        {
            Err(ffi::no_shim("CudaGraph"))
        }
    }

    fn stream_exit(&mut self) -> Result<()> {
        #[cfg(not(crossclr_no_shim))]
        {
            // SAFETY: self.raw is a live graph.
            ffi::call("CudaGraph: leave side stream", |err| unsafe {
                ffi::crossclr_graph_stream_exit(self.raw, err)
            })
        }
        #[cfg(crossclr_no_shim)]
        {
            Err(ffi::no_shim("CudaGraph"))
        }
    }

    fn capture_begin(&mut self, mode: CaptureMode) -> Result<()> {
        #[cfg(not(crossclr_no_shim))]
        {
            // SAFETY: self.raw is a live graph.
            ffi::call("CudaGraph: capture_begin", |err| unsafe {
                ffi::crossclr_graph_capture_begin(self.raw, mode.code(), err)
            })
        }
        #[cfg(crossclr_no_shim)]
        {
            let _ = mode.code();
            Err(ffi::no_shim("CudaGraph"))
        }
    }

    fn capture_end(&mut self) -> Result<()> {
        #[cfg(not(crossclr_no_shim))]
        {
            // SAFETY: self.raw is a live graph.
            ffi::call("CudaGraph: capture_end", |err| unsafe {
                ffi::crossclr_graph_capture_end(self.raw, err)
            })
        }
        #[cfg(crossclr_no_shim)]
        {
            Err(ffi::no_shim("CudaGraph"))
        }
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        #[cfg(not(crossclr_no_shim))]
        if !self.raw.is_null() {
            // SAFETY: self.raw came from crossclr_graph_new and is freed exactly once.
            unsafe { ffi::crossclr_graph_free(self.raw) };
            self.raw = std::ptr::null_mut();
        }
    }
}

fn end_note(end: &Result<()>) -> String {
    match end {
        Ok(()) => String::new(),
        Err(e) => format!(" (then {e})"),
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else if let Some(s) = panic.downcast_ref::<&str>() {
        s.to_string()
    } else {
        "non-string panic payload".to_string()
    }
}

/// A training step captured into a CUDA graph, with static input and output tensors.
///
/// ```text
/// let mut step = CapturedStep::capture(device, &[&xq, &xk], 3, CaptureMode::Global, |inp| {
///     let loss = model.train_step(&inp[0], &inp[1])?;   // capture-safe step (see gpu docs)
///     Ok(vec![loss.detach()])
/// })?;
/// for batch in loader { let out = step.run(&[&batch_q, &batch_k])?; /* out[0]: loss */ }
/// ```
pub struct CapturedStep {
    graph: CudaGraph,
    inputs: Vec<Tensor>,
    outputs: Vec<Tensor>,
}

impl CapturedStep {
    /// Copies `example_inputs` into fresh static device buffers, runs `step` on them `warmup` times
    /// on the graph's side stream (each run is a real step: parameters change), synchronises, then
    /// captures one more call. `step` receives the static inputs and returns the tensors to read
    /// after each replay (e.g. the detached loss).
    pub fn capture<F>(
        device: Device,
        example_inputs: &[&Tensor],
        warmup: usize,
        mode: CaptureMode,
        mut step: F,
    ) -> Result<Self>
    where
        F: FnMut(&[Tensor]) -> Result<Vec<Tensor>>,
    {
        let mut graph = CudaGraph::new(device)?;
        let inputs: Vec<Tensor> = example_inputs
            .iter()
            .map(|x| x.to_device(device).copy())
            .collect();
        for i in 0..warmup {
            graph
                .on_side_stream(|| step(&inputs))?
                .map_err(|e| Error::Other(format!("warm-up step {i} failed: {e}")))?;
        }
        if let Device::Cuda(index) = device {
            tch::Cuda::synchronize(index as i64);
        }
        let outputs = graph.capture(mode, || step(&inputs))?;
        // The warm-up steps' intermediates sit in the regular pool's cache; replays use only the
        // graph's private pool, so give that cache back (peak reserved memory otherwise holds a
        // step's activations twice; docs/gpu.md has the H200 figures). Failure here only costs
        // memory.
        if let Device::Cuda(index) = device {
            tch::Cuda::synchronize(index as i64);
            let _ = super::memory::empty_cache();
        }
        Ok(CapturedStep {
            graph,
            inputs,
            outputs,
        })
    }

    /// Copies a new batch into the static inputs and replays the graph. Shapes must match the
    /// capture's. The returned outputs are overwritten by the next call.
    pub fn run(&mut self, inputs: &[&Tensor]) -> Result<&[Tensor]> {
        if inputs.len() != self.inputs.len() {
            return Err(Error::Other(format!(
                "CapturedStep::run: {} inputs given, {} captured",
                inputs.len(),
                self.inputs.len()
            )));
        }
        for (i, (dst, src)) in self.inputs.iter_mut().zip(inputs).enumerate() {
            if dst.size() != src.size() {
                return Err(Error::Other(format!(
                    "CapturedStep::run: input {i} has shape {:?}, captured with {:?} (recapture for a new shape)",
                    src.size(),
                    dst.size()
                )));
            }
            dst.f_copy_(src)?;
        }
        self.graph.replay()?;
        Ok(&self.outputs)
    }

    /// Replays without new inputs (the static inputs keep their content).
    pub fn replay(&self) -> Result<&[Tensor]> {
        self.graph.replay()?;
        Ok(&self.outputs)
    }

    /// The static input tensors (write into them in place, or use [`CapturedStep::run`]).
    pub fn inputs(&self) -> &[Tensor] {
        &self.inputs
    }

    /// The static outputs of the last replay.
    pub fn outputs(&self) -> &[Tensor] {
        &self.outputs
    }
}
