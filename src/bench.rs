//! `crossclr bench`: times one pre-training step of SkeletonCLR / CrosSCLR (2 or 3 views, phase 1
//! or 2) on synthetic NTU-shaped batches (random normal, never zeros), on CPU or CUDA.
//!
//! Steps (`--step`): `reference` = the project's training step (`ssl::trainer::Pretrainer`),
//! `fast` = [`crate::gpu::FastStep`] (capture-safe: device queue pointer, foreach EMA, fused SGD,
//! no host syncs), optionally captured into a CUDA graph (`--graph on`) and replayed after copying
//! each batch into static inputs. Timing: warm-up steps, then `iters` steps each bracketed by a
//! device synchronisation (median and min), plus the mean over the same number of back-to-back steps
//! with one synchronisation at the end (`ms_pipelined`). Memory: CUDA caching-allocator peak
//! allocated bytes (reset after warm-up, like `torch.cuda.reset_peak_memory_stats`), or the
//! process's peak RSS on CPU.
//!
//! [`loader`] (`crossclr bench --loader`) times the host side instead: the pre-training data
//! pipeline (dataset -> augmented copies -> batch tensors [-> device]).
use crate::data::layout::Layout;
use crate::error::{Error, Result};
use crate::gpu;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

pub mod loader;
pub mod parity;
mod ssl_steps;

/// Which model to time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BenchModel {
    /// Single-view MoCo on joints.
    Skeletonclr,
    /// CrosSCLR joint + motion.
    Crossclr2,
    /// CrosSCLR joint + motion + bone.
    Crossclr3,
}

impl BenchModel {
    /// Number of views (branches) of the model.
    pub fn views(self) -> usize {
        match self {
            BenchModel::Skeletonclr => 1,
            BenchModel::Crossclr2 => 2,
            BenchModel::Crossclr3 => 3,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            BenchModel::Skeletonclr => "skeletonclr",
            BenchModel::Crossclr2 => "crossclr2",
            BenchModel::Crossclr3 => "crossclr3",
        }
    }
}

/// Which implementation of the step to time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StepKind {
    /// `ssl::trainer::Pretrainer::train_step` (the training loop's step, as is).
    Reference,
    /// `gpu::FastStep` (capture-safe, multi-tensor updates, no host syncs).
    Fast,
}

/// TF32 switch: leave libtorch's defaults (cuBLAS matmul off, cuDNN conv on), or force both.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Tf32 {
    Default,
    On,
    Off,
}

/// Everything a benchmark run needs.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    pub model: BenchModel,
    /// 1 = MoCo phase, 2 = CVC-KM phase (CrosSCLR only).
    pub phase: u8,
    pub batch: i64,
    pub frames: i64,
    pub joints: i64,
    pub bodies: i64,
    pub queue_size: i64,
    pub device: Device,
    pub warmup: usize,
    pub iters: usize,
    pub step: StepKind,
    pub graph: bool,
    pub tf32: Tf32,
    pub cudnn_benchmark: bool,
    /// Distinct random batch pairs rotated through (so caches do not flatter the numbers).
    pub inputs: usize,
    pub seed: i64,
    /// After the timed region: profile `profile_steps` more steps, Chrome trace to this path
    /// (rows `.jsonl` and table `.txt` beside it); see [`profile_steps`].
    pub profile: Option<PathBuf>,
    pub profile_steps: usize,
    /// Which kernels the encoders and the step use (`auto` resolved for `device`); the same keys
    /// as a config's `kernels:` block (`crossclr bench kernels.fold_bias=off ...`).
    pub kernels: crate::model::kernels::Kernels,
}

impl BenchConfig {
    /// The official sizes: batch 128, 50 frames, 25 joints, 2 bodies, K = 32768.
    pub fn official(model: BenchModel, phase: u8, device: Device) -> Self {
        BenchConfig {
            model,
            phase,
            batch: 128,
            frames: 50,
            joints: 25,
            bodies: 2,
            queue_size: 32768,
            device,
            warmup: 3,
            iters: 20,
            step: StepKind::Fast,
            graph: false,
            tf32: Tf32::Default,
            cudnn_benchmark: false,
            inputs: 4,
            seed: 0,
            profile: None,
            profile_steps: 5,
            kernels: Default::default(),
        }
    }

    fn validate(&self) -> Result<()> {
        if self.phase != 1 && self.phase != 2 {
            return Err(Error::config(format!(
                "--phase must be 1 or 2, got {}",
                self.phase
            )));
        }
        if self.phase == 2 && self.model == BenchModel::Skeletonclr {
            return Err(Error::config(
                "SkeletonCLR has no phase 2 (use crossclr2 / crossclr3)",
            ));
        }
        for (name, v) in [
            ("batch", self.batch),
            ("frames", self.frames),
            ("bodies", self.bodies),
        ] {
            if v <= 0 {
                return Err(Error::config(format!("--{name} must be positive, got {v}")));
            }
        }
        if self.queue_size <= 0 || self.queue_size % self.batch != 0 {
            return Err(Error::config(format!(
                "--queue-size {} must be a positive multiple of --batch {}",
                self.queue_size, self.batch
            )));
        }
        if self.iters == 0 || self.inputs == 0 {
            return Err(Error::config(
                "--iters and the number of input sets must be at least 1",
            ));
        }
        if self.graph && self.step != StepKind::Fast {
            return Err(Error::config(
                "--graph on needs --step fast (the reference step syncs with the host)",
            ));
        }
        if self.graph && !self.device.is_cuda() {
            return Err(Error::config(
                "--graph on needs a CUDA device (CUDA graphs do not exist on CPU)",
            ));
        }
        Ok(())
    }

    /// The skeleton layout for `joints` (25 = NTU RGB+D, 20 = Kinect v1).
    pub fn layout(&self) -> Result<Layout> {
        match self.joints {
            25 => Ok(Layout::ntu25()),
            20 => Ok(Layout::kinect20()),
            j => Err(Error::config(format!(
                "--joints {j}: only 25 (NTU) and 20 (Kinect v1) are built in"
            ))),
        }
    }
}

/// One benchmark result (one JSON object; the field names match scripts/pytorch_baseline.py).
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// Always "crossclr" (the baseline script writes "pytorch").
    pub r#impl: &'static str,
    pub torch: String,
    pub model: BenchModel,
    pub phase: u8,
    pub batch: i64,
    pub frames: i64,
    pub queue_size: i64,
    pub device: String,
    pub device_name: String,
    pub step: StepKind,
    pub mode: String,
    pub graph: bool,
    pub tf32: Tf32,
    /// (cuBLAS matmul, cuDNN conv) TF32 flags in effect, if the shim could read them.
    pub tf32_state: Option<(bool, bool)>,
    pub cudnn_benchmark: bool,
    pub warmup: usize,
    pub iters: usize,
    /// Per step, each bracketed by device synchronisations.
    pub ms_median: f64,
    pub ms_min: f64,
    pub ms_mean: f64,
    /// Mean over `iters` back-to-back steps with one synchronisation at the end.
    pub ms_pipelined: f64,
    /// `batch / ms_median` in samples per second.
    pub samples_per_s: f64,
    pub peak_bytes: Option<i64>,
    /// CUDA only: peak bytes reserved by the caching allocator over the timed region (includes
    /// a CUDA graph's private pool, whose intermediates do not count as allocated between replays:
    /// compare graph rows on this figure).
    pub peak_reserved_bytes: Option<i64>,
    /// "cuda_max_memory_allocated" or "process_peak_rss".
    pub peak_kind: &'static str,
    /// The kernel choices the step ran with, resolved for the device (`crate::model::kernels`).
    pub kernels: crate::model::kernels::Kernels,
    /// CUDA: whether the fused CUDA kernels were usable (built, and their self-check passed);
    /// with `kernels.fused_cuda` not `off` the batch norms may then run on them.
    pub fused_cuda: bool,
    /// CUDA: per op and shape, the fused kernels' and the tch ops' forward + backward times and
    /// which one was chosen (`model::stgcn::fused_cuda::choices`).
    pub fused_cuda_ops: Vec<crate::model::stgcn::fused_cuda::FusedChoice>,
    /// CUDA, fast step: how many side streams the passes ran on (`kernels.view_streams`), 0
    /// without.
    pub side_streams: usize,
    /// Rows of the joints packed into one for the graph products on this device
    /// (`model::stgcn::aggregate::packing`; 1 = unpacked).
    pub agg_pack: i64,
    /// CUDA: whether the fused kernels' four-wide variants were enabled
    /// (`model::stgcn::fused_cuda::vec4`).
    pub fused_vec4: bool,
    /// `PYTORCH_CUDA_ALLOC_CONF` (or `PYTORCH_ALLOC_CONF`) as this process saw it; the CLI sets
    /// `gpu::DEFAULT_CUDA_ALLOC_CONF` when the user set neither.
    pub cuda_alloc_conf: Option<String>,
    /// The Chrome trace written by `--profile`, if any.
    pub profile: Option<String>,
    pub loss_first: f64,
    pub loss_last: f64,
}

/// A step under test: runs one training step on the `i`-th input pair, returning its loss tensor
/// (not read inside the timed region).
pub(crate) trait StepRunner {
    fn run(&mut self, x_q: &Tensor, x_k: &Tensor) -> Result<Tensor>;
}

fn synchronize(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

/// Applies the numeric-mode switches (TF32, cuDNN autotuning) on a CUDA device; no-op on CPU.
pub fn apply_modes(device: Device, tf32: Tf32, cudnn_benchmark: bool) -> Result<()> {
    if device.is_cuda() {
        match tf32 {
            Tf32::Default => {}
            Tf32::On => gpu::set_tf32(true)?,
            Tf32::Off => gpu::set_tf32(false)?,
        }
        gpu::set_cudnn_benchmark(cudnn_benchmark);
    }
    Ok(())
}

/// Runs the benchmark described by `cfg`.
pub fn run(cfg: &BenchConfig) -> Result<BenchReport> {
    cfg.validate()?;
    let layout = cfg.layout()?;
    let device = cfg.device;
    apply_modes(device, cfg.tf32, cfg.cudnn_benchmark)?;
    tch::manual_seed(cfg.seed);
    let shape = [cfg.batch, 3, cfg.frames, cfg.joints, cfg.bodies];
    let inputs: Vec<(Tensor, Tensor)> = (0..cfg.inputs)
        .map(|_| {
            (
                Tensor::randn(shape, (Kind::Float, device)),
                Tensor::randn(shape, (Kind::Float, device)),
            )
        })
        .collect();
    let mut runner = ssl_steps::build(cfg, &layout, &inputs[0])?;
    let mut losses = Vec::with_capacity(cfg.warmup + 2 * cfg.iters);
    let pair = |i: usize| &inputs[i % inputs.len()];
    for i in 0..cfg.warmup {
        let (q, k) = pair(i);
        losses.push(runner.run(q, k)?);
    }
    synchronize(device);
    if device.is_cuda() {
        gpu::reset_peak(device)?;
    }
    let mut times = Vec::with_capacity(cfg.iters);
    for i in 0..cfg.iters {
        let (q, k) = pair(cfg.warmup + i);
        synchronize(device);
        let t0 = Instant::now();
        losses.push(runner.run(q, k)?);
        synchronize(device);
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let t0 = Instant::now();
    for i in 0..cfg.iters {
        let (q, k) = pair(cfg.warmup + cfg.iters + i);
        losses.push(runner.run(q, k)?);
    }
    synchronize(device);
    let ms_pipelined = t0.elapsed().as_secs_f64() * 1e3 / cfg.iters as f64;
    let (peak_bytes, peak_reserved_bytes, peak_kind) = if device.is_cuda() {
        let m = gpu::cuda_memory(device)?;
        (
            Some(m.peak_allocated),
            Some(m.peak_reserved),
            "cuda_max_memory_allocated",
        )
    } else {
        (gpu::peak_rss_bytes(), None, "process_peak_rss")
    };
    if let Some(path) = &cfg.profile {
        let first = cfg.warmup + 2 * cfg.iters;
        profile_steps(device, path, cfg.profile_steps, |i| {
            let (q, k) = pair(first + i);
            losses.push(runner.run(q, k)?);
            Ok(())
        })?;
    }
    let loss_of = |t: Option<&Tensor>| t.map(|t| t.double_value(&[])).unwrap_or(f64::NAN);
    let loss_first = loss_of(losses.first());
    let loss_last = loss_of(losses.last());
    if !loss_last.is_finite() {
        return Err(Error::Other(format!(
            "bench: the loss became non-finite ({loss_last})"
        )));
    }
    let ms_mean = times.iter().sum::<f64>() / times.len() as f64;
    times.sort_by(|a, b| a.total_cmp(b));
    let ms_median = median(&times);
    let kernels = cfg.kernels.resolved(device);
    let mode = match (cfg.step, cfg.graph) {
        (StepKind::Reference, _) => "reference",
        (StepKind::Fast, false) => "fast",
        (StepKind::Fast, true) => "fast+graph",
    };
    Ok(BenchReport {
        r#impl: "crossclr",
        torch: format!("libtorch (tch {})", "0.24.0"),
        model: cfg.model,
        phase: cfg.phase,
        batch: cfg.batch,
        frames: cfg.frames,
        queue_size: cfg.queue_size,
        device: match device {
            Device::Cuda(i) => format!("cuda:{i}"),
            _ => "cpu".into(),
        },
        device_name: gpu::device_name(device).unwrap_or_else(|e| format!("unknown ({e})")),
        step: cfg.step,
        mode: mode.into(),
        graph: cfg.graph,
        tf32: cfg.tf32,
        tf32_state: gpu::tf32_state().ok(),
        cudnn_benchmark: cfg.cudnn_benchmark,
        warmup: cfg.warmup,
        iters: cfg.iters,
        ms_median,
        ms_min: times[0],
        ms_mean,
        ms_pipelined,
        samples_per_s: cfg.batch as f64 * 1e3 / ms_median,
        peak_bytes,
        peak_reserved_bytes,
        peak_kind,
        kernels,
        fused_cuda: crate::model::stgcn::fused_cuda::usable(device),
        fused_cuda_ops: crate::model::stgcn::fused_cuda::choices(),
        side_streams: if matches!(device, Device::Cuda(_))
            && cfg.step == StepKind::Fast
            && gpu::shim_status() == gpu::ShimStatus::Cuda
        {
            kernels.view_streams.count(cfg.model.views())
        } else {
            0
        },
        agg_pack: crate::model::stgcn::aggregate::packing(cfg.joints, kernels.agg_pack_on(device)),
        fused_vec4: matches!(device, Device::Cuda(_)) && crate::model::stgcn::fused_cuda::vec4(),
        cuda_alloc_conf: std::env::var("PYTORCH_CUDA_ALLOC_CONF")
            .or_else(|_| std::env::var("PYTORCH_ALLOC_CONF"))
            .ok(),
        profile: cfg.profile.as_ref().map(|p| p.display().to_string()),
        loss_first,
        loss_last,
    })
}

/// Profiles `steps` calls of `step(i)` with libtorch's profiler (CUDA activities on a CUDA
/// device): Chrome trace to `trace`, per-kernel / per-op rows to `trace` with extension `.jsonl`,
/// and the table (top 30 rows, per step) to `.txt` and stderr.
pub fn profile_steps(
    device: Device,
    trace: &Path,
    steps: usize,
    mut step: impl FnMut(usize) -> Result<()>,
) -> Result<()> {
    if steps == 0 {
        return Err(Error::config("--profile-steps must be at least 1"));
    }
    let profiler = gpu::profiler::Profiler::start(device.is_cuda())?;
    for i in 0..steps {
        step(i)?;
    }
    let summary = profiler.stop(Some(trace))?;
    summary.write_jsonl(&trace.with_extension("jsonl"))?;
    let table = summary.table(30, steps);
    crate::train::atomic::write_atomic(&trace.with_extension("txt"), table.as_bytes())?;
    eprint!("{table}");
    Ok(())
}

impl BenchReport {
    /// One human-readable line.
    pub fn summary(&self) -> String {
        let peak = self
            .peak_bytes
            .map(|b| format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64))
            .unwrap_or("?".into());
        format!(
            "crossclr {} phase {} batch {} on {} ({}, tf32 {:?}, cudnn-benchmark {}): {:.2} ms/step median, \
             {:.2} min, {:.2} pipelined, {:.1} samples/s, peak {peak} ({}); loss {:.4} -> {:.4}",
            self.model.name(),
            self.phase,
            self.batch,
            self.device_name,
            self.mode,
            self.tf32,
            self.cudnn_benchmark,
            self.ms_median,
            self.ms_min,
            self.ms_pipelined,
            self.samples_per_s,
            self.peak_kind,
            self.loss_first,
            self.loss_last
        )
    }
}
