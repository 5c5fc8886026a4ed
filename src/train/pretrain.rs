//! The pre-training loop: per epoch set the lr (step schedule) and the torch seed from
//! (seed, epoch), run the loader's batches (a pure function of (seed, epoch)) through the training
//! step, then write metrics, the loss curve and checkpoints (`last` every epoch, `epoch<N>` every
//! `save_interval`). `--resume` continues from `last` exactly.
//!
//! The step is chosen by `step_impl` (see [`step_engine`]): `reference` =
//! [`Pretrainer::train_step`] (losses read and checked every step); `fast` = `gpu::FastStep`
//! (losses stay on the device and are read every `log_interval` steps and at epoch end, where
//! a non-finite loss stops the run before any checkpoint is written); `graph` = `fast` replayed
//! from a CUDA graph per phase; `auto` = `graph` on CUDA, `reference` on CPU.
//!
//! After each epoch's steps (before the checkpoints), the collapse diagnostics and the k-NN
//! monitor run when due ([`crate::train::diagnostics`]); they change no weight, buffer or random
//! stream of the run.
//!
//! work_dir contents: `config.yaml` (resolved), `log.txt`, `metrics.jsonl`, `metrics.csv`,
//! `steps.csv`, `loss.png`, `diagnostics.png` (when diagnostics ran),
//! `last.{safetensors,state.safetensors,json}`, `epoch<N>.*`.
use crate::data::loader::{
    shard_batches_per_epoch, try_epoch_shard_in, HostMemory, LoaderConfig, Shard,
};
use crate::data::views::View;
use crate::data::SkeletonDataset;
use crate::dist::ProcessGroup;
use crate::error::{Error, Result};
use crate::ssl::trainer::Pretrainer;
use crate::train::checkpoint::{self, CheckpointMeta};
use crate::train::config::{DivergencePolicy, NonFinitePolicy, PretrainConfig, StepImpl};
use crate::train::diagnostics::Diagnostics;
use crate::train::logger::{read_records, EpochRecord, MetricColumns, RunLogger};
use crate::train::numerics;
use crate::train::schedule::{epoch_lr, scaled_to_data};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Tensor};

pub mod step_engine;

use step_engine::{FastEngine, GraphOptions, HostLosses};

/// Name of the rolling checkpoint written after every epoch.
pub const LAST: &str = "last";

/// How to run (beyond the config).
#[derive(Clone, Default)]
pub struct RunOptions {
    /// Continue from `work_dir/last.*`.
    pub resume: bool,
    /// Overrides `cfg.device` (`cpu | cuda | cuda:N`).
    pub device: Option<String>,
    /// Show a progress bar (hidden anyway when stderr is not a terminal).
    pub progress: bool,
    /// Echo log lines to stdout.
    pub echo: bool,
    /// Use this dataset instead of opening `cfg.dataset_spec()` (tests, demo).
    pub dataset: Option<Arc<SkeletonDataset>>,
    /// Fault injection for tests: make the inputs NaN from this 1-based epoch on.
    pub inject_nan_from_epoch: Option<usize>,
    /// Fault injection for tests (the binary's hidden `--inject-nan <input|grad>:<n>`): NaN in
    /// the query batch, or the first gradient, of the n-th step of the run (1-based global step).
    pub inject_nan: Option<NanInjection>,
    /// Tests: run `step_impl: graph` with an eager stand-in for the CUDA graph (any device), to
    /// check its warm-up / capture / replay bookkeeping without a GPU (see [`step_engine`]).
    pub emulate_graph: bool,
    /// Data parallelism: this process is one rank of the group (`crate::dist`). Each rank trains
    /// on its share of every batch (`batch_size / world` samples); only rank 0 writes the
    /// work_dir (the other ranks log to a temporary folder).
    pub group: Option<Arc<ProcessGroup>>,
}

/// Where [`RunOptions::inject_nan`] puts its NaN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NanTarget {
    /// The step's query batch (as bad data would).
    Input,
    /// The step's first gradient, after the backward pass (reference step only).
    Grad,
}

/// A NaN planted at one step ([`RunOptions::inject_nan`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NanInjection {
    pub target: NanTarget,
    /// 1-based global step.
    pub step: u64,
}

impl std::str::FromStr for NanInjection {
    type Err = Error;

    /// `input:<n>` or `grad:<n>`.
    fn from_str(spec: &str) -> Result<Self> {
        let bad = || {
            Error::config(format!(
                "--inject-nan {spec:?}: expected input:<n> or grad:<n>"
            ))
        };
        let (what, n) = spec.split_once(':').ok_or_else(bad)?;
        let target = match what {
            "input" => NanTarget::Input,
            "grad" => NanTarget::Grad,
            _ => return Err(bad()),
        };
        let step = n.parse::<u64>().ok().filter(|&n| n > 0).ok_or_else(bad)?;
        Ok(NanInjection { target, step })
    }
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct Summary {
    pub work_dir: PathBuf,
    /// First and last epoch run by this invocation (1-based, inclusive); equal+1 if none ran.
    pub first_epoch: usize,
    pub last_epoch: usize,
    /// All epoch records of the run (including those before a resume).
    pub records: Vec<EpochRecord>,
    /// The `last` checkpoint's weights file.
    pub last_checkpoint: PathBuf,
    pub device: Device,
    pub steps_per_epoch: usize,
    /// The step implementation that ran (`step_impl` resolved: never `Auto`).
    pub step_impl: StepImpl,
}

/// The torch seed of 1-based `epoch` (SplitMix64 of the run seed and the epoch), so dropout is
/// reproducible and resumable.
pub fn epoch_seed(seed: u64, epoch: usize) -> i64 {
    let mut z = seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 1) as i64
}

/// The loader of a pre-training run (the official `Feeder_dual`): `batch_size`, shuffled,
/// drop_last, two independently augmented copies (query, key) of every sample with the config's
/// shear and temporal padding, `workers` threads, two batches prefetched per worker. The views
/// (motion, bone) are computed from these joint batches on the device, inside the step.
pub fn loader_config(cfg: &PretrainConfig) -> LoaderConfig {
    LoaderConfig {
        batch_size: cfg.batch_size,
        shuffle: true,
        drop_last: true,
        num_views: 2,
        augment: Some(cfg.train_feeder_args.augment()),
        seed: cfg.seed,
        workers: cfg.workers,
        prefetch: 2 * cfg.workers.max(1),
    }
}

/// Runs pre-training as the config says (no resume, device from the config).
pub fn run(cfg: &PretrainConfig) -> Result<Summary> {
    run_with(
        cfg,
        &RunOptions {
            progress: true,
            echo: true,
            ..Default::default()
        },
    )
}

/// Runs pre-training with options: prepare the run, build the model (or resume it), then epoch
/// after epoch the steps, the epoch's record and the checkpoints.
pub fn run_with(cfg: &PretrainConfig, opts: &RunOptions) -> Result<Summary> {
    let mut run = Run::prepare(cfg, opts)?;
    let mut state = run.build_or_resume(opts)?;
    for epoch in state.start_epoch..=run.cfg.num_epoch {
        let record = run.one_epoch(&mut state, epoch, opts)?;
        let lr = record.lr;
        let diverged = run.check_divergence(&record);
        run.record(&mut state, record)?;
        if let Some(msg) = diverged {
            return Err(run.stop(msg));
        }
        run.checkpoint(&mut state, epoch, lr)?;
    }
    Ok(run.finish(state))
}

/// What is fixed for the whole run, resolved before the first step.
struct Run {
    /// The config with its `kernels` resolved for the device (as written to config.yaml).
    cfg: PretrainConfig,
    device: Device,
    device_name: String,
    dir: PathBuf,
    dataset: Arc<SkeletonDataset>,
    loader_cfg: LoaderConfig,
    host_memory: HostMemory,
    /// Steps per epoch.
    steps: usize,
    step_impl: StepImpl,
    /// The log line saying which step, numeric modes and kernels run.
    step_line: String,
    log: RunLogger,
    bar: Option<ProgressBar>,
    /// The collapse diagnostics and k-NN monitor, when the config asks for them.
    diagnostics: Option<Diagnostics>,
    /// The bound on an epoch's mean loss above which the run is diverging, and its origin
    /// (`numerics.max_loss`; `None` = off).
    divergence: Option<(f64, String)>,
    /// This process's share of every batch (`Shard::WHOLE` without data parallelism).
    shard: Shard,
    /// Whether this process writes the work_dir (rank 0); the others log to `_scratch`.
    writes: bool,
    _scratch: Option<tempfile::TempDir>,
    /// The work_dir's writer lock, held for the whole run by the writing process.
    _lock: Option<crate::train::lock::WorkDirLock>,
}

/// What changes as the run goes.
struct RunState {
    trainer: Pretrainer,
    /// The fast step (`step_impl: fast | graph`); `None`: the reference step.
    engine: Option<FastEngine>,
    start_epoch: usize,
    global_step: u64,
    records: Vec<EpochRecord>,
    /// The `last` checkpoint's weights file.
    last_weights: PathBuf,
    /// The model's views, in branch order.
    views: Vec<View>,
    /// Steps skipped (`numerics.non_finite: skip`) by this invocation.
    skipped_total: usize,
}

/// One epoch's running counts.
struct EpochProgress {
    epoch: usize,
    lr: f64,
    cross: bool,
    tally: EpochTally,
    /// Steps run this epoch (with the fast step, some may not be read back yet).
    n_steps: usize,
    samples: usize,
    phase: u8,
    /// Steps skipped this epoch (`numerics.non_finite: skip`).
    skipped: usize,
}

impl Run {
    /// Validates the config, resolves the device, the step and the kernels, claims the work_dir
    /// (writing config.yaml and opening the log) and opens the dataset.
    fn prepare(cfg: &PretrainConfig, opts: &RunOptions) -> Result<Run> {
        cfg.validate()?;
        let device_name = match &opts.device {
            Some(d) => d.clone(),
            None => cfg.device.as_device_string()?,
        };
        let device = crate::device::parse_device(&device_name)?;
        let mut cfg = cfg.clone();
        cfg.kernels = cfg.kernels.resolved(device);
        let shard = data_parallel_shard(&mut cfg, opts, device)?;
        let (step_impl, step_why) = if cfg.numerics.non_finite == NonFinitePolicy::Skip
            && cfg.step_impl == StepImpl::Auto
        {
            (
                StepImpl::Reference,
                "auto with numerics.non_finite=skip: skipping needs the reference step".into(),
            )
        } else {
            step_engine::resolve(cfg.step_impl, device, opts.emulate_graph)?
        };
        let modes = step_engine::apply_numeric_modes(&cfg, device)?;
        let (dataset, loader_cfg, steps) = open_dataset(&cfg, opts, shard)?;
        let scaled = cfg.scale_to_data.then(|| {
            let before = (cfg.model_args.queue_size, cfg.model_args.momentum);
            let (queue, momentum) =
                scaled_to_data(dataset.len(), cfg.batch_size, steps * cfg.num_epoch);
            cfg.model_args.queue_size = queue as i64;
            cfg.model_args.momentum = momentum;
            format!(
                "scale_to_data: {} training sequences, {} steps -> queue_size {queue} (config \
                 {}), momentum {momentum:.4} (config {})",
                dataset.len(),
                steps * cfg.num_epoch,
                before.0,
                before.1
            )
        });
        if scaled.is_some() {
            cfg.validate()?;
        }
        let dir = cfg.work_dir.clone();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        // One writer per work_dir (released when the run ends or the process dies).
        let writes = shard.rank == 0;
        let lock = if writes {
            Some(crate::train::lock::WorkDirLock::acquire(&dir)?)
        } else {
            None
        };
        if checkpoint::read_meta(&dir, LAST)?.is_some() && !opts.resume {
            return Err(Error::config(format!(
                "{} already holds a run (last.json); pass --resume to continue it or choose another work_dir",
                dir.display()
            )));
        }
        if opts.resume {
            // Refuse a resume whose config changes the model, views, queue, seed, ...
            crate::train::lock::check_resume_config(&dir, &cfg)?;
        }
        let scratch = if writes {
            None
        } else {
            Some(tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?)
        };
        let log_dir = scratch.as_ref().map_or(dir.as_path(), |t| t.path());
        let mut log = RunLogger::open(log_dir, opts.echo && writes)?;
        if writes {
            checkpoint::write_atomic(&dir.join("config.yaml"), cfg.to_yaml()?.as_bytes())?;
        }
        if let Some(line) = &scaled {
            log.line(line);
        }
        let step_line = format!(
            "step {} (step_impl {}: {step_why}), {modes}; kernels: {}",
            step_impl.name(),
            cfg.step_impl.name(),
            cfg.kernels.summary()
        );
        let diagnostics = Diagnostics::new(&cfg, &dataset)?;
        let divergence = numerics::divergence_bound(
            cfg.numerics.max_loss,
            cfg.negatives,
            cfg.model_args.queue_size,
            cfg.batch_size,
            cfg.reverse_negatives,
            cfg.views()?.len(),
        );
        Ok(Run {
            divergence,
            device,
            device_name,
            dir,
            host_memory: HostMemory::for_target(device),
            dataset,
            loader_cfg,
            steps,
            step_impl,
            step_line,
            log,
            bar: None,
            diagnostics,
            shard,
            writes,
            _scratch: scratch,
            _lock: lock,
            cfg,
        })
    }

    /// Builds the model (seeded from the run seed) and, with `--resume`, loads the `last`
    /// checkpoint; opens steps.csv, describes the run, sets up the progress bar and the step.
    fn build_or_resume(&mut self, opts: &RunOptions) -> Result<RunState> {
        let cfg = &self.cfg;
        tch::manual_seed(epoch_seed(cfg.seed, 0));
        let mut trainer = Pretrainer::from_config(cfg, &self.dataset.layout, self.device)?;
        let (mut start_epoch, mut global_step, mut records) = (1, 0, Vec::new());
        if opts.resume {
            let meta = checkpoint::load(&self.dir, LAST, &mut trainer)?;
            if meta.model != cfg.model.name() || meta.seed != cfg.seed {
                return Err(Error::config(format!(
                    "resume: checkpoint is model {} seed {}, config says {} seed {}",
                    meta.model,
                    meta.seed,
                    cfg.model.name(),
                    cfg.seed
                )));
            }
            start_epoch = meta.epoch + 1;
            global_step = meta.global_step;
            records = read_records(&self.dir, meta.epoch)?;
            self.log.open_steps(meta.epoch)?;
            self.log.line(&format!(
                "resumed from {} at epoch {}",
                self.dir.join("last.json").display(),
                meta.epoch
            ));
        } else {
            self.log.open_steps(0)?;
        }
        let views: Vec<View> = trainer.model.branches.iter().map(|b| b.view).collect();
        self.log.line(&format!(
            "model {} views [{}] on {}: {} trainable parameters; {} samples, {} steps/epoch, epochs {start_epoch}..={}",
            cfg.model.name(),
            views.iter().map(|v| v.name()).collect::<Vec<_>>().join(", "),
            self.device_name,
            trainer.model.num_trainable(),
            self.dataset.len(),
            self.steps,
            cfg.num_epoch
        ));
        if let Some(group) = &opts.group {
            trainer.join_group(Arc::clone(group))?;
            self.log.line(&format!(
                "data parallel: rank {} of {} ({}), {} samples per rank and step; parameters, \
                 statistics and queues broadcast from rank 0",
                group.rank(),
                group.world_size(),
                group.backend().name(),
                self.loader_cfg.batch_size
            ));
            if cfg.bucket_cap_mb > 0.0 {
                self.log.line(&format!(
                    "gradients: all-reduced in buckets of about {} MiB while backward runs                      (bucket_cap_mb)",
                    cfg.bucket_cap_mb
                ));
            }
        }
        self.describe_diagnostics(&views);
        let n = self.cfg.numerics.clone();
        self.log.line(&format!(
            "numerics: non-finite loss{} -> {}{}; divergence bound {}",
            if n.check_grads { " or gradient" } else { "" },
            match n.non_finite {
                NonFinitePolicy::Stop => "stop",
                NonFinitePolicy::Skip => "skip",
            },
            if n.non_finite == NonFinitePolicy::Skip {
                format!(" (at most {} steps)", n.max_skipped_steps)
            } else {
                String::new()
            },
            match &self.divergence {
                Some((b, why)) => format!(
                    "{b:.3} ({why}) -> {}",
                    match n.on_divergence {
                        DivergencePolicy::Warn => "warn",
                        DivergencePolicy::Stop => "stop",
                    }
                ),
                None => "off".into(),
            }
        ));
        self.start_progress_bar(start_epoch, opts.progress && self.writes);
        self.log.line(&self.step_line.clone());
        let engine = self.fast_engine(&trainer, opts)?;
        Ok(RunState {
            trainer,
            engine,
            start_epoch,
            global_step,
            records,
            last_weights: checkpoint::paths(&self.dir, LAST).0,
            views,
            skipped_total: 0,
        })
    }

    /// Logs what the diagnostics will measure and adds their metric columns.
    fn describe_diagnostics(&mut self, views: &[View]) {
        let Some(d) = &self.diagnostics else {
            return;
        };
        self.log.line(&d.describe());
        self.log.set_columns(MetricColumns {
            diag_views: if d.samples() > 0 {
                views.iter().map(|v| v.name().to_string()).collect()
            } else {
                Vec::new()
            },
            knn: d.knn_due(self.cfg.num_epoch),
        });
    }

    /// The progress bar over the steps still to run (none when not asked for or nothing to run).
    fn start_progress_bar(&mut self, start_epoch: usize, progress: bool) {
        let total = (self.cfg.num_epoch + 1).saturating_sub(start_epoch) * self.steps;
        self.bar = (progress && total > 0).then(|| {
            let b = ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
            if let Ok(style) = ProgressStyle::with_template(
                "{bar:30} {pos}/{len} steps  epoch {msg}  [{elapsed_precise} < {eta_precise}]",
            ) {
                b.set_style(style);
            }
            b
        });
        self.log.set_bar(self.bar.clone());
    }

    /// The fast step for `step_impl: fast | graph` (`None` for the reference step).
    fn fast_engine(&self, trainer: &Pretrainer, opts: &RunOptions) -> Result<Option<FastEngine>> {
        // This rank's share of the global batch (all of it without data parallelism).
        let batch = (self.cfg.batch_size / self.shard.world) as i64;
        Ok(match self.step_impl {
            StepImpl::Fast => Some(FastEngine::new(trainer, &self.cfg, batch, None)?),
            StepImpl::Graph => {
                let graph = GraphOptions {
                    fallback: self.cfg.step_impl == StepImpl::Auto,
                    emulate: opts.emulate_graph,
                };
                Some(FastEngine::new(trainer, &self.cfg, batch, Some(graph))?)
            }
            _ => None,
        })
    }

    /// One epoch: lr and torch seed, the loader's batches through the step, the losses read
    /// back; returns the epoch's record (diagnostics not measured yet).
    fn one_epoch(
        &mut self,
        st: &mut RunState,
        epoch: usize,
        opts: &RunOptions,
    ) -> Result<EpochRecord> {
        let cfg = &self.cfg;
        let lr = epoch_lr(
            cfg.lr_schedule,
            cfg.base_lr,
            &cfg.step,
            cfg.warmup_epochs,
            cfg.num_epoch,
            epoch,
        );
        st.trainer.set_lr(lr);
        if let Some(f) = st.engine.as_mut() {
            f.set_lr(lr);
        }
        tch::manual_seed(epoch_seed(cfg.seed, epoch));
        if self.shard.world > 1 && st.trainer.model.vs_q.device().is_cuda() {
            // Every rank's generators are in the same state (the CPU one must be: the ranks draw
            // the same dropout seeds and take their rows of one global mask); the CUDA one draws
            // libtorch's dropout masks per rank, so it is seeded apart.
            let rank = self.shard.rank as u64;
            tch::Cuda::manual_seed_all(
                (epoch_seed(cfg.seed, epoch) as u64).wrapping_add(rank.wrapping_mul(0x9E37_79B9)),
            );
        }
        let cross = st.trainer.model.is_cross_epoch(epoch);
        let started = Instant::now();
        let loader = try_epoch_shard_in(
            Arc::clone(&self.dataset),
            &self.loader_cfg,
            epoch,
            self.shard,
            self.host_memory,
        )?;
        let mut ep = EpochProgress {
            epoch,
            lr,
            cross,
            tally: EpochTally::new(st.views.len(), st.global_step),
            n_steps: 0,
            samples: 0,
            phase: if cross { 2 } else { 1 },
            skipped: 0,
        };
        for batch in loader {
            let (mut x_q, x_k) = (
                batch.views[0].shallow_clone(),
                batch.views[1].shallow_clone(),
            );
            if opts.inject_nan_from_epoch.is_some_and(|e| epoch >= e) {
                x_q *= f64::NAN;
            }
            match opts.inject_nan {
                Some(i) if i.step == st.global_step + 1 => match i.target {
                    NanTarget::Input => x_q *= f64::NAN,
                    NanTarget::Grad => st.trainer.poison_next_grad = true,
                },
                _ => {}
            }
            if st.engine.is_some() {
                self.fast_step(st, &mut ep, &x_q, &x_k)?;
            } else {
                self.reference_step(st, &mut ep, &x_q, &x_k, &batch.indices)?;
            }
        }
        if st.engine.is_some() {
            self.finish_fast_epoch(st, &mut ep)?;
        }
        Ok(self.epoch_record(st, &ep, started.elapsed().as_secs_f64()))
    }

    /// One step of the reference implementation (losses read and checked at once).
    fn reference_step(
        &mut self,
        st: &mut RunState,
        ep: &mut EpochProgress,
        x_q: &Tensor,
        x_k: &Tensor,
        indices: &[usize],
    ) -> Result<()> {
        let stats = match st.trainer.train_step(x_q, x_k, ep.epoch) {
            Ok(s) => s,
            Err(e) if numerics::is_non_finite(&e) => {
                let e = format!("{e}{}", self.bad_samples(x_q, x_k, indices));
                let msg = self.stop_message(st, &e, ep, ep.n_steps + 1);
                return Err(self.stop(msg));
            }
            Err(e) => return Err(e),
        };
        st.global_step += 1;
        ep.n_steps += 1;
        ep.samples += stats.batch * self.shard.world;
        ep.phase = stats.phase;
        if let Some(why) = &stats.skipped {
            let why = &format!("{why}{}", self.bad_samples(x_q, x_k, indices));
            ep.skipped += 1;
            st.skipped_total += 1;
            let limit = self.cfg.numerics.max_skipped_steps;
            let line = format!(
                "skipped epoch {}, step {} of {} (global step {}): {why} ({} skipped by this run, \
                 numerics.max_skipped_steps {limit})",
                ep.epoch, ep.n_steps, self.steps, st.global_step, st.skipped_total
            );
            self.log.line(&line);
            if st.skipped_total > limit {
                let msg = self.stop_message(
                    st,
                    &format!("{} steps skipped, more than numerics.max_skipped_steps {limit}; the last: {why}", st.skipped_total),
                    ep,
                    ep.n_steps,
                );
                return Err(self.stop(msg));
            }
            return Ok(());
        }
        let losses = HostLosses {
            total: stats.loss,
            views: stats.view_losses.iter().map(|(_, l)| *l).collect(),
        };
        let (steps, interval) = (self.steps, self.cfg.log_interval);
        ep.tally
            .record(&mut self.log, &losses, ep.epoch, steps, ep.lr, interval);
        if let Some(b) = &self.bar {
            b.set_message(format!(
                "{}/{} loss {:.3}",
                ep.epoch, self.cfg.num_epoch, stats.loss
            ));
            b.inc(1);
        }
        Ok(())
    }

    /// One step of the fast implementation; its losses are read back when a log line is due (at
    /// most once per `log_interval` steps).
    fn fast_step(
        &mut self,
        st: &mut RunState,
        ep: &mut EpochProgress,
        x_q: &Tensor,
        x_k: &Tensor,
    ) -> Result<()> {
        let Some(fast) = st.engine.as_mut() else {
            return Err(Error::Other(
                "internal: fast step without its engine".into(),
            ));
        };
        let ran = fast.step(&st.trainer.model, x_q, x_k, ep.cross, &mut self.log)?;
        let before = st.global_step;
        self.count_fast_steps(st, ep, ran);
        let interval = self.cfg.log_interval as u64;
        if interval > 0 && st.global_step / interval > before / interval {
            self.read_fast(st, ep)?;
            if let Some(b) = &self.bar {
                b.set_message(format!(
                    "{}/{} loss {:.3}",
                    ep.epoch, self.cfg.num_epoch, ep.tally.last_loss
                ));
            }
        }
        Ok(())
    }

    /// Runs the fast step's pending work, reads every loss back and hands the queue pointer and
    /// momentum buffers to the trainer (the checkpoints read them there).
    fn finish_fast_epoch(&mut self, st: &mut RunState, ep: &mut EpochProgress) -> Result<()> {
        let Some(fast) = st.engine.as_mut() else {
            return Ok(());
        };
        let ran = fast.finish_epoch(&st.trainer.model, ep.cross)?;
        self.count_fast_steps(st, ep, ran);
        self.read_fast(st, ep)?;
        if ep.tally.recorded != ep.n_steps {
            return Err(Error::Other(format!(
                "internal: epoch {} ran {} steps but read {} losses",
                ep.epoch, ep.n_steps, ep.tally.recorded
            )));
        }
        if let Some(fast) = st.engine.as_mut() {
            fast.sync_to(&mut st.trainer)?;
        }
        Ok(())
    }

    fn count_fast_steps(&self, st: &mut RunState, ep: &mut EpochProgress, ran: usize) {
        st.global_step += ran as u64;
        ep.n_steps += ran;
        ep.samples += ran * self.cfg.batch_size;
        if let Some(b) = &self.bar {
            b.inc(ran as u64);
        }
    }

    /// Reads the fast step's pending losses into the epoch tally (log lines included); a
    /// non-finite one becomes the run's stop error.
    fn read_fast(&mut self, st: &mut RunState, ep: &mut EpochProgress) -> Result<()> {
        let Some(fast) = st.engine.as_mut() else {
            return Ok(());
        };
        let (steps, interval) = (self.steps, self.cfg.log_interval);
        let read = ep.tally.read(
            fast,
            &mut self.log,
            ep.epoch,
            steps,
            ep.lr,
            interval,
            &st.views,
        )?;
        match read {
            Some((e, step)) => {
                // The batch is gone; the model's variables may still name the culprit.
                let culprit = numerics::locate(&st.trainer.model, &[], &[]).map_or_else(
                    || "; the model's variables are finite now".to_string(),
                    |c| format!("; first non-finite tensor now: {c}"),
                );
                let e = format!("{e}{culprit}");
                let msg = fast_stop(&self.stop_message(st, &e, ep, step), ep.n_steps);
                Err(self.stop(msg))
            }
            None => Ok(()),
        }
    }

    /// `"; dataset samples [i (name), ...] of <file> hold NaN or Inf"` for the samples of the batch whose
    /// (augmented) views hold non-finite values (`indices`: the batch's dataset indices), or "".
    fn bad_samples(&self, x_q: &Tensor, x_k: &Tensor, indices: &[usize]) -> String {
        let (q, k) = (
            numerics::non_finite_rows(x_q),
            numerics::non_finite_rows(x_k),
        );
        let found: Vec<usize> = q
            .iter()
            .zip(&k)
            .zip(indices)
            .filter(|((bq, bk), _)| **bq || **bk)
            .map(|(_, i)| *i)
            .collect();
        if found.is_empty() {
            return String::new();
        }
        let shown: Vec<String> = found
            .iter()
            .take(8)
            .map(
                |&i| match self.dataset.names.get(i).filter(|n| !n.is_empty()) {
                    Some(name) => format!("{i} ({name})"),
                    None => i.to_string(),
                },
            )
            .collect();
        format!(
            "; dataset samples [{}{}] of {} hold NaN or Inf",
            shown.join(", "),
            if found.len() > 8 { ", ..." } else { "" },
            self.dataset.source.display()
        )
    }

    /// The message of a non-finite-loss stop (same format for every step implementation).
    fn stop_message(&self, st: &RunState, e: &str, ep: &EpochProgress, step: usize) -> String {
        let good = if checkpoint::paths(&self.dir, LAST).2.exists() {
            format!("the last good checkpoint is {}", st.last_weights.display())
        } else {
            "no checkpoint was written yet".to_string()
        };
        format!(
            "stopping: {e} at epoch {}, step {step} of {} (lr {}); {good}",
            ep.epoch, self.steps, ep.lr
        )
    }

    /// Logs a warning when the epoch's mean loss is above the divergence bound (or not finite,
    /// which only skipped steps can leave); returns the stop message with `on_divergence: stop`.
    fn check_divergence(&mut self, record: &EpochRecord) -> Option<String> {
        let (bound, why) = self.divergence.clone()?;
        if record.loss <= bound {
            return None;
        }
        let text = format!(
            "epoch {} mean loss {:.4} is above the divergence bound {bound:.3} ({why}): the run is \
             diverging (lower base_lr, or check the data)",
            record.epoch, record.loss
        );
        match self.cfg.numerics.on_divergence {
            DivergencePolicy::Warn => {
                self.log.line(&format!("WARNING: {text}"));
                None
            }
            DivergencePolicy::Stop => {
                let last = checkpoint::paths(&self.dir, LAST).0;
                let good = if last.exists() {
                    format!("the last good checkpoint is {}", last.display())
                } else {
                    "no checkpoint was written yet".to_string()
                };
                Some(format!(
                    "stopping: {text}; numerics.on_divergence=stop: this epoch's checkpoint was \
                     not written, {good}"
                ))
            }
        }
    }

    /// Logs `msg`, abandons the progress bar and returns the run's error.
    fn stop(&mut self, msg: String) -> Error {
        self.log.line(&msg);
        if let Some(b) = &self.bar {
            b.abandon();
        }
        Error::Other(msg)
    }

    /// The epoch's record from its tally, logged (with the fused CUDA choices after the first).
    fn epoch_record(&mut self, st: &RunState, ep: &EpochProgress, seconds: f64) -> EpochRecord {
        // Skipped steps have no loss: the means are over the recorded ones.
        let n = ep.tally.recorded.max(1) as f64;
        let record = EpochRecord {
            epoch: ep.epoch,
            phase: ep.phase,
            lr: ep.lr,
            loss: ep.tally.sum / n,
            view_losses: st
                .views
                .iter()
                .zip(&ep.tally.view_sums)
                .map(|(v, s)| (v.name().to_string(), s / n))
                .collect(),
            steps: ep.n_steps,
            seconds,
            samples_per_second: ep.samples as f64 / seconds.max(1e-9),
            diagnostics: None,
            knn1: None,
            knn20: None,
            diag_seconds: None,
            skipped_steps: (self.cfg.numerics.non_finite == NonFinitePolicy::Skip)
                .then_some(ep.skipped),
        };
        let views: Vec<String> = record
            .view_losses
            .iter()
            .map(|(v, l)| format!("{v} {l:.4}"))
            .collect();
        self.log.line(&format!(
            "epoch {} (phase {}, lr {}): loss {:.4} [{}], {seconds:.1} s, {:.1} samples/s",
            ep.epoch,
            ep.phase,
            ep.lr,
            record.loss,
            views.join(", "),
            record.samples_per_second
        ));
        if ep.epoch == st.start_epoch && self.device.is_cuda() {
            // Which batch norms run on the fused CUDA kernels (timed per shape on first use).
            for c in crate::model::stgcn::fused_cuda::choices() {
                self.log.line(&format!(
                    "fused CUDA {} {:?}: fused {:.3} ms, tch {:.3} ms -> {}",
                    c.op,
                    c.shape,
                    c.fused_ms,
                    c.native_ms,
                    if c.fused { "fused" } else { "tch" }
                ));
            }
        }
        record
    }

    /// Measures the diagnostics when due, appends the record and rewrites the metrics files.
    fn record(&mut self, st: &mut RunState, mut record: EpochRecord) -> Result<()> {
        if let Some(d) = self.diagnostics.as_ref().filter(|d| d.due(record.epoch)) {
            let r = d.measure(&st.trainer.model, record.epoch)?;
            for line in d.log_lines(&r) {
                self.log.line(&line);
            }
            record.set_diagnostics(&r);
        }
        st.records.push(record);
        self.log.write_metrics(&st.records)
    }

    /// `epoch<N>` every `save_interval` epochs (and at the last), `last` every epoch.
    fn checkpoint(&mut self, st: &mut RunState, epoch: usize, lr: f64) -> Result<()> {
        if !self.writes {
            return Ok(());
        }
        let cfg = &self.cfg;
        let meta = CheckpointMeta {
            format: String::new(),
            epoch,
            global_step: st.global_step,
            queue_ptr: 0,
            model: cfg.model.name().into(),
            seed: cfg.seed,
            rng: "loader order/augmentation and tch::manual_seed derived from (seed, epoch) at each epoch start".into(),
            lr,
            weights_file: String::new(),
            weights_bytes: 0,
            state_file: String::new(),
            state_bytes: 0,
        };
        if cfg.save_interval > 0
            && (epoch.is_multiple_of(cfg.save_interval as usize) || epoch == cfg.num_epoch)
        {
            let name = format!("epoch{epoch}");
            let p = checkpoint::save(&self.dir, &name, &st.trainer, meta.clone())?;
            self.log.line(&format!("saved {}", p.display()));
        }
        st.last_weights = checkpoint::save(&self.dir, LAST, &st.trainer, meta)?;
        Ok(())
    }

    /// Ends the run: the progress bar, the last log line, the summary.
    fn finish(mut self, st: RunState) -> Summary {
        if let Some(b) = &self.bar {
            b.finish();
        }
        self.log.line("done");
        Summary {
            work_dir: self.dir,
            first_epoch: st.start_epoch,
            last_epoch: self.cfg.num_epoch,
            records: st.records,
            last_checkpoint: st.last_weights,
            device: self.device,
            steps_per_epoch: self.steps,
            step_impl: self.step_impl,
        }
    }
}

/// The run's dataset (opened from the config unless the options bring one), its loader config
/// (validated against it) and the number of steps per epoch; refuses a batch larger than the
/// dataset and a channel count that differs from `model_args.in_channels`.
fn open_dataset(
    cfg: &PretrainConfig,
    opts: &RunOptions,
    shard: Shard,
) -> Result<(Arc<SkeletonDataset>, LoaderConfig, usize)> {
    let dataset = match &opts.dataset {
        Some(d) => Arc::clone(d),
        None => Arc::new(crate::data::formats::open(&cfg.dataset_spec())?),
    };
    let mut loader_cfg = loader_config(cfg);
    loader_cfg.batch_size = cfg.batch_size / shard.world;
    loader_cfg.validate(&dataset)?;
    let steps = shard_batches_per_epoch(dataset.len(), &loader_cfg, shard);
    if steps == 0 {
        return Err(Error::config(format!(
            "batch_size {} exceeds the {} training samples of {} (drop_last leaves no batch)",
            cfg.batch_size,
            dataset.len(),
            dataset.source.display()
        )));
    }
    let in_channels = dataset.shape[1] as i64;
    if in_channels != cfg.model_args.in_channels {
        return Err(Error::config(format!(
            "model_args.in_channels {} but {} has {in_channels} channels",
            cfg.model_args.in_channels,
            dataset.source.display()
        )));
    }
    Ok((dataset, loader_cfg, steps))
}

/// This process's share of every batch under data parallelism (`Shard::WHOLE` without): the
/// global `batch_size` must split evenly over the ranks. The step is the reference one or the
/// eager fast step (`gpu::FastStep::join_group`); the CUDA graph does not hold the
/// collectives, so `auto` resolves to `fast` on CUDA (with the shim) and to `reference` on CPU,
/// and an explicit `graph` is refused.
fn data_parallel_shard(
    cfg: &mut PretrainConfig,
    opts: &RunOptions,
    device: tch::Device,
) -> Result<Shard> {
    let Some(group) = &opts.group else {
        return Ok(Shard::WHOLE);
    };
    let world = group.world_size();
    if !cfg.batch_size.is_multiple_of(world) {
        return Err(Error::config(format!(
            "batch_size {} does not split over {world} ranks",
            cfg.batch_size
        )));
    }
    match cfg.step_impl {
        StepImpl::Auto => {
            let fast =
                device.is_cuda() && crate::gpu::shim_status() != crate::gpu::ShimStatus::Missing;
            cfg.step_impl = if fast {
                StepImpl::Fast
            } else {
                StepImpl::Reference
            };
        }
        StepImpl::Reference | StepImpl::Fast => {}
        StepImpl::Graph => {
            return Err(Error::config(
                "step_impl graph: data-parallel runs do not capture the step in a CUDA graph (the \
                 collectives run outside it: Gloo stages through the host, NCCL capture is not \
                 built yet); use step_impl=fast, reference or auto",
            ))
        }
    }
    Ok(Shard {
        rank: group.rank(),
        world,
    })
}

/// The fast-step suffix of a stop message: when the losses were read, and what that implies.
fn fast_stop(msg: &str, read_at: usize) -> String {
    format!(
        "{msg} (the fast step reads its losses every log_interval steps and at epoch end: this was \
         found at step {read_at} of the epoch; the steps in between were applied in memory, no \
         checkpoint was written after the non-finite loss)"
    )
}

/// Host-side sums of an epoch's losses, fed in step order.
struct EpochTally {
    /// Sum of the total loss over the steps read so far.
    sum: f64,
    /// Per-view sums, in view order.
    view_sums: Vec<f64>,
    /// Steps read so far this epoch.
    recorded: usize,
    /// Global step count before the epoch.
    global_start: u64,
    last_loss: f64,
}

impl EpochTally {
    fn new(num_views: usize, global_start: u64) -> Self {
        EpochTally {
            sum: 0.0,
            view_sums: vec![0.0; num_views],
            recorded: 0,
            global_start,
            last_loss: f64::NAN,
        }
    }

    /// Adds one step: its `steps.csv` row, the sums, and the step log line every `log_interval`
    /// global steps.
    fn record(
        &mut self,
        log: &mut RunLogger,
        l: &HostLosses,
        epoch: usize,
        steps: usize,
        lr: f64,
        log_interval: usize,
    ) {
        self.recorded += 1;
        let n = self.recorded;
        self.sum += l.total;
        self.last_loss = l.total;
        for (s, v) in self.view_sums.iter_mut().zip(&l.views) {
            *s += v;
        }
        log.step((epoch - 1) as f64 + n as f64 / steps as f64, l.total);
        let global = self.global_start + n as u64;
        if log_interval > 0 && global.is_multiple_of(log_interval as u64) {
            log.line(&format!(
                "epoch {epoch} step {n}/{steps}: loss {:.4} lr {lr}",
                l.total
            ));
        }
    }

    /// Reads the fast step's pending losses (one host sync) and records them in order. The first
    /// non-finite one ends the reading with `Some((reference error text, its 1-based step in the
    /// epoch))`, recording nothing from it on.
    #[allow(clippy::too_many_arguments)]
    fn read(
        &mut self,
        fast: &mut FastEngine,
        log: &mut RunLogger,
        epoch: usize,
        steps: usize,
        lr: f64,
        log_interval: usize,
        views: &[View],
    ) -> Result<Option<(String, usize)>> {
        for l in &fast.take_losses()? {
            if !l.total.is_finite() {
                return Ok(Some((l.non_finite_text(views), self.recorded + 1)));
            }
            self.record(log, l, epoch, steps, lr, log_interval);
        }
        Ok(None)
    }
}
