//! The step implementations the pre-training loop can run (config key `step_impl`), and the
//! numeric-mode switches (`tf32`, `cudnn_benchmark`).
//!
//! * `reference`: the loop calls `Pretrainer::train_step` itself (not handled here).
//! * `fast`: [`FastEngine`] without a graph: `gpu::FastStep` eagerly, losses kept on the device as
//!   one `(1 + V,)` row per step (total, then the views) and read in one transfer by
//!   [`FastEngine::take_losses`] (the loop does it every `log_interval` steps and at epoch end).
//! * `graph`: [`FastEngine`] with a CUDA graph per phase. The first [`GRAPH_WARMUP_STEPS`] batches
//!   of a phase are buffered on the device; when the last of them arrives they are trained, one
//!   real step each and in loader order, as the warm-up steps of `CapturedStep::capture` on the
//!   graph's side stream, then the step is captured (the capture itself runs nothing). Every later
//!   batch of the phase is one replay. No batch is skipped or trained twice. Batches still
//!   buffered at the end of an epoch (an epoch with fewer steps than the warm-up) are trained
//!   eagerly by [`FastEngine::finish_epoch`]; the next epoch starts buffering again. A phase change
//!   drops the old graph (freeing its pool) before anything else.
//!
//! For tests, [`FastEngine::new`] can emulate the graph (`emulate_graph`): the same buffering,
//! per-phase capture, warm-up and replay bookkeeping, with an eager stand-in for the CUDA graph
//! (warm-up calls run, the capture call runs nothing, a "replay" is one eager step), so the
//! bookkeeping is checked on CPU against the plain fast step, bit for bit.
//!
//! Momentum buffers and the queue pointer live in the `FastStep` while it runs: [`FastEngine::new`]
//! loads them from the `Pretrainer` (after a resume) and [`FastEngine::sync_to`] writes them back
//! before each checkpoint, so checkpoints are the same files as with the reference step.
use crate::data::views::View;
use crate::error::{Error, Result};
use crate::gpu::step::StepLosses;
use crate::gpu::{self, CaptureMode, CapturedStep, FastStep, SgdConfig, ShimStatus};
use crate::ssl::model::SslModel;
use crate::ssl::trainer::{Pretrainer, NON_FINITE};
use crate::train::config::{CudnnBenchmark, PretrainConfig, StepImpl, Tf32Mode};
use crate::train::logger::RunLogger;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// Real steps run on the graph's side stream before each capture (PyTorch's recipe uses 3; they
/// set up cuBLAS workspaces, cuDNN autotuning and autograd state for that stream).
pub const GRAPH_WARMUP_STEPS: usize = 3;

/// Resolves `step_impl` for `device` and the shim this binary carries. Returns the implementation
/// to run (`Reference`, `Fast` or `Graph`, never `Auto`) and why, for the log. Errors (before
/// anything is written): `graph` off CUDA or without the shim's CUDA graphs (unless
/// `emulate_graph`, for tests), `fast` / `graph` without the shim.
pub fn resolve(
    requested: StepImpl,
    device: Device,
    emulate_graph: bool,
) -> Result<(StepImpl, String)> {
    let shim = gpu::shim_status();
    let no_shim = "this binary was built without the C++ shim (see docs/gpu.md)";
    match requested {
        StepImpl::Reference => Ok((StepImpl::Reference, "as configured".into())),
        StepImpl::Fast => {
            if shim == ShimStatus::Missing {
                return Err(Error::config(format!(
                    "step_impl: fast needs gpu::FastStep, but {no_shim}; use step_impl=reference"
                )));
            }
            Ok((StepImpl::Fast, "as configured".into()))
        }
        StepImpl::Graph if emulate_graph => {
            if shim == ShimStatus::Missing {
                return Err(Error::config(format!(
                    "step_impl: graph (emulated) needs gpu::FastStep, but {no_shim}"
                )));
            }
            Ok((
                StepImpl::Graph,
                "emulated: an eager stand-in replaces the CUDA graph (tests)".into(),
            ))
        }
        StepImpl::Graph => {
            if !device.is_cuda() {
                return Err(Error::config(format!(
                    "step_impl: graph needs a CUDA device (CUDA graphs do not exist on {device:?}); \
                     use step_impl=fast or step_impl=auto"
                )));
            }
            if shim != ShimStatus::Cuda {
                return Err(Error::config(format!(
                    "step_impl: graph needs the shim's CUDA graphs, but the shim is {shim:?} ({}); \
                     use step_impl=fast",
                    if shim == ShimStatus::Missing {
                        no_shim
                    } else {
                        "built without CUDA headers"
                    }
                )));
            }
            Ok((StepImpl::Graph, "as configured".into()))
        }
        StepImpl::Auto => Ok(match (device.is_cuda(), shim) {
            (false, _) => (
                StepImpl::Reference,
                "auto on CPU: the fast step is not faster there (the cost is in the encoder)"
                    .into(),
            ),
            (true, ShimStatus::Cuda) => (StepImpl::Graph, "auto on CUDA".into()),
            (true, ShimStatus::CpuOnly) => (
                StepImpl::Fast,
                "auto on CUDA, but the shim was built without CUDA graphs".into(),
            ),
            (true, ShimStatus::Missing) => {
                (StepImpl::Reference, format!("auto on CUDA, but {no_shim}"))
            }
        }),
    }
}

/// Applies `tf32` and `cudnn_benchmark` on a CUDA device (process-wide switches); on CPU they are
/// ignored. Returns a description for the log.
pub fn apply_numeric_modes(cfg: &PretrainConfig, device: Device) -> Result<String> {
    if !device.is_cuda() {
        let ignored = !matches!(cfg.tf32, Tf32Mode::Auto | Tf32Mode::Default)
            || cfg.cudnn_benchmark != CudnnBenchmark::Auto;
        return Ok(format!(
            "tf32 {}, cudnn_benchmark {}{}",
            cfg.tf32.name(),
            cfg.cudnn_benchmark.name(),
            if ignored {
                " (CUDA only: ignored on CPU)"
            } else {
                ""
            }
        ));
    }
    let tf32 = cfg.tf32.on_cuda();
    match tf32 {
        Tf32Mode::Auto | Tf32Mode::Default => {}
        Tf32Mode::On => gpu::set_tf32(true)?,
        Tf32Mode::Off => gpu::set_tf32(false)?,
    }
    let benchmark = cfg.cudnn_benchmark.on_cuda();
    gpu::set_cudnn_benchmark(benchmark);
    let state = match gpu::tf32_state() {
        Ok((cublas, cudnn)) => format!(" (cuBLAS matmul {cublas}, cuDNN conv {cudnn})"),
        Err(_) => String::new(),
    };
    let resolved = |set: &str, got: &str| {
        if set == got {
            got.to_string()
        } else {
            format!("{set} -> {got}")
        }
    };
    use crate::model::stgcn::fused_cuda;
    Ok(format!(
        "tf32 {}{state}, cudnn_benchmark {}; fused CUDA kernels usable {} (four-wide {})",
        resolved(cfg.tf32.name(), tf32.name()),
        resolved(cfg.cudnn_benchmark.name(), &benchmark.to_string()),
        fused_cuda::usable(device),
        fused_cuda::vec4(),
    ))
}

/// One step's losses, read back on the host (f32 values widened to f64, as the reference step's
/// `double_value` does).
#[derive(Debug, Clone, PartialEq)]
pub struct HostLosses {
    pub total: f64,
    /// Per view, in view order.
    pub views: Vec<f64>,
}

impl HostLosses {
    /// The reference step's error text for a non-finite loss
    /// (`non-finite loss NaN (per view: ...)`).
    pub fn non_finite_text(&self, views: &[View]) -> String {
        let per: Vec<String> = views
            .iter()
            .zip(&self.views)
            .map(|(v, l)| format!("{v} {l}"))
            .collect();
        format!("{NON_FINITE} {} (per view: {})", self.total, per.join(", "))
    }
}

/// A captured step: a CUDA graph, or the eager stand-in of the emulation.
enum Captured {
    Cuda(CapturedStep),
    Emulated,
}

/// The graph side of a [`FastEngine`]. Field order: the capture is dropped first.
struct GraphState {
    /// `(cross, step)`: the captured step of the current phase.
    captured: Option<(bool, Captured)>,
    /// Eager stand-in for the CUDA graph (tests).
    emulate: bool,
    /// Device batches `(x_q, x_k)` waiting to be the warm-up steps of the next capture.
    warm: Vec<(Tensor, Tensor)>,
    /// On a capture failure (after the warm-up steps ran), go on eagerly instead of failing
    /// (`step_impl: auto`).
    fallback: bool,
    /// A capture failed and `fallback` is set: run eagerly from now on.
    disabled: bool,
}

/// `gpu::FastStep` for the training loop, optionally graph-captured. See the module docs.
/// Field order: the graph (whose kernels address the step's tensors) is dropped first.
pub struct FastEngine {
    graph: Option<GraphState>,
    step: FastStep,
    device: Device,
    /// (1 + V,) f32 device rows (total, then per view) of steps run but not read yet.
    pending: Vec<Tensor>,
}

impl FastEngine {
    /// Builds the step for `trainer`'s model (queue pointer from the model, momentum buffers from
    /// `trainer.opt`, exact after a resume) with batches of `batch`; a CUDA graph per phase when
    /// `graph` is given.
    pub fn new(
        trainer: &Pretrainer,
        cfg: &PretrainConfig,
        batch: i64,
        graph: Option<GraphOptions>,
    ) -> Result<Self> {
        let sgd = SgdConfig {
            momentum: cfg.sgd_momentum,
            weight_decay: cfg.weight_decay,
        };
        let mut step = FastStep::new(&trainer.model, batch, trainer.opt.lr, sgd)?;
        step.load_momentum_state(&trainer.opt.state())?;
        if let Some(group) = &trainer.group {
            if graph.is_some() {
                return Err(Error::config(
                    "step_impl: graph under data parallelism: the collectives are not captured in \
                     the CUDA graph (Gloo stages through the host; NCCL capture is not built yet); \
                     use step_impl=fast",
                ));
            }
            step.join_group(
                &trainer.model,
                Arc::clone(group),
                trainer.sync_bn,
                trainer.dist_shuffle_bn,
                trainer.bucket_cap_mb,
            )?;
        }
        Ok(FastEngine {
            graph: graph.map(|o| GraphState {
                captured: None,
                emulate: o.emulate,
                warm: Vec::new(),
                fallback: o.fallback,
                disabled: false,
            }),
            step,
            device: trainer.model.vs_q.device(),
            pending: Vec::new(),
        })
    }

    /// Sets the learning rate (a device tensor: valid for the captured graph, no recapture).
    pub fn set_lr(&mut self, lr: f64) {
        self.step.set_lr(lr);
    }

    /// Steps run whose losses have not been read yet.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Trains on one loader batch (`x_q`, `x_k`: (B, C, T, V, M) on any device; CPU batches are
    /// copied with `non_blocking`, so no host sync), in phase 2 when `cross`. Returns how many
    /// steps ran now: 1 eagerly or replayed; with a graph, 0 while a warm-up batch is buffered and
    /// [`GRAPH_WARMUP_STEPS`] when the buffered batches are trained and the step captured.
    pub fn step(
        &mut self,
        model: &SslModel,
        x_q: &Tensor,
        x_k: &Tensor,
        cross: bool,
        log: &mut RunLogger,
    ) -> Result<usize> {
        let x_q = to_device_async(x_q, self.device)?;
        let x_k = to_device_async(x_k, self.device)?;
        let Some(g) = self.graph.as_mut().filter(|g| !g.disabled) else {
            let l = self.step.step_with_views(model, &x_q, &x_k, cross)?;
            self.pending.push(row(&l.total, &l.views)?);
            return Ok(1);
        };
        if g.captured.as_ref().is_some_and(|(c, _)| *c != cross) {
            // Free the old phase's graph and pool before anything else.
            g.captured = None;
        }
        match g.captured.as_mut() {
            Some((_, Captured::Cuda(captured))) => {
                let out = captured.run(&[&x_q, &x_k])?;
                self.pending.push(row(&out[0], &out[1])?);
                return Ok(1);
            }
            Some((_, Captured::Emulated)) => {
                let l = self.step.step_with_views(model, &x_q, &x_k, cross)?;
                self.pending.push(row(&l.total, &l.views)?);
                return Ok(1);
            }
            None => {}
        }
        g.warm.push((x_q, x_k));
        if g.warm.len() < GRAPH_WARMUP_STEPS {
            return Ok(0);
        }
        let warm = std::mem::take(&mut g.warm);
        let (captured, rows) = capture(&mut self.step, model, self.device, &warm, cross, g.emulate);
        let ran = rows.len();
        self.pending.extend(rows);
        let phase = if cross { 2 } else { 1 };
        match captured {
            Ok(c) => {
                g.captured = Some((cross, c));
                log.line(&format!(
                    "captured the phase-{phase} step into a CUDA graph after {ran} warm-up steps \
                     (real steps on the phase's first {ran} batches)"
                ));
                Ok(ran)
            }
            Err(e) if g.fallback && ran == warm.len() => {
                g.disabled = true;
                log.line(&format!(
                    "CUDA graph capture of the phase-{phase} step failed ({e}); step_impl auto goes \
                     on with the eager fast step"
                ));
                Ok(ran)
            }
            Err(e) => Err(Error::Other(format!(
                "CUDA graph capture of the phase-{phase} step failed after {ran} of {} warm-up \
                 steps: {e}; set step_impl=fast to train without CUDA graphs",
                warm.len()
            ))),
        }
    }

    /// End of an epoch: trains the batches still buffered for a capture, eagerly (in order).
    /// Returns how many steps that ran.
    pub fn finish_epoch(&mut self, model: &SslModel, cross: bool) -> Result<usize> {
        let Some(g) = self.graph.as_mut() else {
            return Ok(0);
        };
        let warm = std::mem::take(&mut g.warm);
        for (x_q, x_k) in &warm {
            let l = self.step.step_with_views(model, x_q, x_k, cross)?;
            self.pending.push(row(&l.total, &l.views)?);
        }
        Ok(warm.len())
    }

    /// Reads the pending steps' losses to the host, oldest first, in one transfer (one host sync).
    pub fn take_losses(&mut self) -> Result<Vec<HostLosses>> {
        if self.pending.is_empty() {
            return Ok(Vec::new());
        }
        let mut rows = Tensor::f_stack(&self.pending, 0)?.f_to_device(Device::Cpu)?;
        self.pending.clear();
        if let Some(group) = self.step.group() {
            // Every rank reads the mean over the ranks (what the reference step reports), so
            // all see the same losses and stop together on a non-finite one.
            rows = rows.f_to_kind(Kind::Double)?;
            group.all_reduce_mean_(std::slice::from_ref(&rows))?;
        }
        let width = rows.size()[1] as usize;
        let values = Vec::<f64>::try_from(rows.f_flatten(0, -1)?.f_to_kind(Kind::Double)?)?;
        Ok(values
            .chunks(width)
            .map(|r| HostLosses {
                total: r[0],
                views: r[1..].to_vec(),
            })
            .collect())
    }

    /// Writes the step's state into `trainer` for a checkpoint: the device queue pointer into the
    /// model's queues and the momentum buffers into `trainer.opt` (a host sync).
    pub fn sync_to(&self, trainer: &mut Pretrainer) -> Result<()> {
        self.step.write_back_ptr(&mut trainer.model);
        trainer.opt.load_state(&self.step.momentum_state())
    }

    /// The underlying step (tests, diagnostics).
    pub fn fast_step(&self) -> &FastStep {
        &self.step
    }
}

/// `x` as f32 on `device`; a CPU -> CUDA copy is `non_blocking` (from pageable memory the driver
/// stages the data and returns without a device sync).
fn to_device_async(x: &Tensor, device: Device) -> Result<Tensor> {
    if x.device() == device {
        return Ok(x.f_to_kind(Kind::Float)?);
    }
    Ok(x.f_to_device_(device, Kind::Float, true, false)?)
}

/// `[total, views...]`, (1 + V,) f32, a fresh tensor (graph outputs are overwritten by replays).
fn row(total: &Tensor, views: &Tensor) -> Result<Tensor> {
    Ok(Tensor::f_cat(
        &[total.f_reshape([1])?, views.shallow_clone()],
        0,
    )?)
}

/// Runs `warm.len()` warm-up steps (batch i for call i, real steps) on the graph's side stream,
/// then captures one more call on the static inputs (which runs nothing). Returns the capture
/// result and the warm-up steps' loss rows (as many as ran). `emulate`: the warm-up calls run
/// eagerly on the current stream and the capture call is skipped (tests).
fn capture(
    step: &mut FastStep,
    model: &SslModel,
    device: Device,
    warm: &[(Tensor, Tensor)],
    cross: bool,
    emulate: bool,
) -> (Result<Captured>, Vec<Tensor>) {
    let mut rows = Vec::with_capacity(warm.len());
    let mut call = 0usize;
    let mut step_call = |statics: &[Tensor]| -> Result<Vec<Tensor>> {
        let i = call;
        call += 1;
        // Warm-up call i trains batch i (call 0: the static inputs hold a copy of batch 0);
        // the captured call reads the static inputs, which `run` refills per batch.
        let (x_q, x_k) = match warm.get(i) {
            Some(b) if i > 0 => (&b.0, &b.1),
            _ => (&statics[0], &statics[1]),
        };
        let l: StepLosses = step.step_with_views(model, x_q, x_k, cross)?;
        if i < warm.len() {
            rows.push(row(&l.total, &l.views)?);
        }
        Ok(vec![l.total, l.views])
    };
    let captured = if emulate {
        // CapturedStep::capture's semantics without a GPU: static inputs = a copy of batch 0,
        // `warm.len()` executed warm-up calls, then a capture that executes nothing.
        let statics = [warm[0].0.copy(), warm[0].1.copy()];
        (0..warm.len())
            .try_for_each(|_| step_call(&statics).map(drop))
            .map(|()| Captured::Emulated)
    } else {
        CapturedStep::capture(
            device,
            &[&warm[0].0, &warm[0].1],
            warm.len(),
            CaptureMode::Global,
            &mut step_call,
        )
        .map(Captured::Cuda)
    };
    (captured, rows)
}

/// How a [`FastEngine`] runs its CUDA graph.
#[derive(Clone, Copy, Debug, Default)]
pub struct GraphOptions {
    /// On a capture failure (after the warm-up steps ran), go on eagerly instead of failing.
    pub fallback: bool,
    /// Replace the CUDA graph by an eager stand-in (tests; any device).
    pub emulate: bool,
}
