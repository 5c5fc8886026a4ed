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
use crate::data::loader::{batches_per_epoch, try_epoch_batches_in, HostMemory, LoaderConfig};
use crate::data::SkeletonDataset;
use crate::error::{Error, Result};
use crate::ssl::trainer::{Pretrainer, NON_FINITE};
use crate::train::checkpoint::{self, CheckpointMeta};
use crate::train::config::{PretrainConfig, StepImpl};
use crate::train::diagnostics::Diagnostics;
use crate::train::logger::{read_records, EpochRecord, MetricColumns, RunLogger};
use crate::train::schedule::epoch_lr;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use tch::Device;

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
    /// Tests: run `step_impl: graph` with an eager stand-in for the CUDA graph (any device), to
    /// check its warm-up / capture / replay bookkeeping without a GPU (see [`step_engine`]).
    pub emulate_graph: bool,
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

/// Runs pre-training with options.
pub fn run_with(cfg: &PretrainConfig, opts: &RunOptions) -> Result<Summary> {
    cfg.validate()?;
    let device_name = match &opts.device {
        Some(d) => d.clone(),
        None => cfg.device.as_device_string()?,
    };
    let device = crate::device::parse_device(&device_name)?;
    let (step_impl, step_why) = step_engine::resolve(cfg.step_impl, device, opts.emulate_graph)?;
    let modes = step_engine::apply_numeric_modes(cfg, device)?;
    let dir = cfg.work_dir.clone();
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    // issue 18: one writer per work_dir (held until this returns or the process dies).
    let _lock = crate::train::lock::WorkDirLock::acquire(&dir)?;
    let existing = checkpoint::read_meta(&dir, LAST)?;
    if existing.is_some() && !opts.resume {
        return Err(Error::config(format!(
            "{} already holds a run (last.json); pass --resume to continue it or choose another work_dir",
            dir.display()
        )));
    }
    if opts.resume {
        // issue 18: refuse a resume whose config changes the model, views, queue, seed, ...
        crate::train::lock::check_resume_config(&dir, cfg)?;
    }
    let mut log = RunLogger::open(&dir, opts.echo)?;
    checkpoint::write_atomic(&dir.join("config.yaml"), cfg.to_yaml()?.as_bytes())?;

    let dataset = match &opts.dataset {
        Some(d) => Arc::clone(d),
        None => Arc::new(crate::data::formats::open(&cfg.dataset_spec())?),
    };
    let loader_cfg = loader_config(cfg);
    loader_cfg.validate(&dataset)?;
    // Batches for a CUDA device come in pinned memory, so the step's `non_blocking` copies are
    // truly asynchronous; on CPU they stay in ordinary memory.
    let host_memory = HostMemory::for_target(device);
    let steps = batches_per_epoch(dataset.len(), &loader_cfg);
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

    tch::manual_seed(epoch_seed(cfg.seed, 0));
    let mut trainer = Pretrainer::from_config(cfg, &dataset.layout, device)?;
    let mut start_epoch = 1;
    let mut global_step: u64 = 0;
    let mut records = Vec::new();
    if opts.resume {
        let meta = checkpoint::load(&dir, LAST, &mut trainer)?;
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
        records = read_records(&dir, meta.epoch)?;
        log.open_steps(meta.epoch)?;
        log.line(&format!(
            "resumed from {} at epoch {}",
            dir.join("last.json").display(),
            meta.epoch
        ));
    }
    if !opts.resume {
        log.open_steps(0)?;
    }
    log.line(&format!(
        "model {} views [{}] on {device_name}: {} trainable parameters; {} samples, {steps} steps/epoch, epochs {start_epoch}..={}",
        cfg.model.name(),
        trainer.model.branches.iter().map(|b| b.view.name()).collect::<Vec<_>>().join(", "),
        trainer.model.num_trainable(),
        dataset.len(),
        cfg.num_epoch
    ));

    // The fixed diagnostics subset and the k-NN monitor split (no torch random draws).
    let diagnostics = Diagnostics::new(cfg, &dataset)?;
    if let Some(d) = &diagnostics {
        log.line(&d.describe());
        log.set_columns(MetricColumns {
            diag_views: if d.samples() > 0 {
                trainer
                    .model
                    .branches
                    .iter()
                    .map(|b| b.view.name().to_string())
                    .collect()
            } else {
                Vec::new()
            },
            knn: d.knn_due(cfg.num_epoch),
        });
    }

    let total = (cfg.num_epoch + 1).saturating_sub(start_epoch) * steps;
    let bar = if opts.progress && total > 0 {
        let b = ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps  epoch {msg}  [{elapsed_precise} < {eta_precise}]",
        ) {
            b.set_style(style);
        }
        Some(b)
    } else {
        None
    };
    log.set_bar(bar.clone());
    log.line(&format!(
        "step {} (step_impl {}: {step_why}), {modes}",
        step_impl.name(),
        cfg.step_impl.name()
    ));
    let mut engine = match step_impl {
        StepImpl::Fast => Some(FastEngine::new(&trainer, cfg, cfg.batch_size as i64, None)?),
        StepImpl::Graph => {
            let graph = GraphOptions {
                fallback: cfg.step_impl == StepImpl::Auto,
                emulate: opts.emulate_graph,
            };
            Some(FastEngine::new(
                &trainer,
                cfg,
                cfg.batch_size as i64,
                Some(graph),
            )?)
        }
        _ => None,
    };
    let (_, _, last_json) = checkpoint::paths(&dir, LAST);
    let mut last_weights = checkpoint::paths(&dir, LAST).0;
    let view_kinds: Vec<crate::data::views::View> =
        trainer.model.branches.iter().map(|b| b.view).collect();
    // The message of a non-finite-loss stop (same format for every step implementation).
    let stop_message = |e: &str, epoch: usize, step: usize, lr: f64, last_weights: &PathBuf| {
        let good = if last_json.exists() {
            format!("the last good checkpoint is {}", last_weights.display())
        } else {
            "no checkpoint was written yet".to_string()
        };
        format!("stopping: {e} at epoch {epoch}, step {step} of {steps} (lr {lr}); {good}")
    };

    for epoch in start_epoch..=cfg.num_epoch {
        let lr = epoch_lr(
            cfg.lr_schedule,
            cfg.base_lr,
            &cfg.step,
            cfg.warmup_epochs,
            cfg.num_epoch,
            epoch,
        );
        trainer.set_lr(lr);
        if let Some(f) = engine.as_mut() {
            f.set_lr(lr);
        }
        tch::manual_seed(epoch_seed(cfg.seed, epoch));
        let cross = trainer.model.is_cross_epoch(epoch);
        let started = Instant::now();
        let loader =
            try_epoch_batches_in(Arc::clone(&dataset), &loader_cfg, epoch, 0, host_memory)?;
        let mut tally = EpochTally::new(view_kinds.len(), global_step);
        // Steps run this epoch (with the fast step, some may not be read back yet).
        let mut n_steps = 0usize;
        let mut samples = 0usize;
        let mut phase = if cross { 2 } else { 1 };
        let stop = |log: &mut RunLogger, msg: String| {
            log.line(&msg);
            if let Some(b) = &bar {
                b.abandon();
            }
            Error::Other(msg)
        };
        // Reads the fast step's pending losses into the epoch tally (log lines included); a
        // non-finite one becomes the run's stop error.
        let read_fast = |tally: &mut EpochTally,
                         fast: &mut FastEngine,
                         log: &mut RunLogger,
                         n_steps: usize,
                         last_weights: &PathBuf|
         -> Result<()> {
            let read = tally.read(fast, log, epoch, steps, lr, cfg.log_interval, &view_kinds)?;
            match read {
                Some((e, step)) => {
                    let msg = fast_stop(&stop_message(&e, epoch, step, lr, last_weights), n_steps);
                    Err(stop(log, msg))
                }
                None => Ok(()),
            }
        };
        for batch in loader {
            let (mut x_q, x_k) = (
                batch.views[0].shallow_clone(),
                batch.views[1].shallow_clone(),
            );
            if opts.inject_nan_from_epoch.is_some_and(|e| epoch >= e) {
                x_q *= f64::NAN;
            }
            let Some(fast) = engine.as_mut() else {
                let stats = match trainer.train_step(&x_q, &x_k, epoch) {
                    Ok(s) => s,
                    Err(e) if e.to_string().starts_with(NON_FINITE) => {
                        let msg =
                            stop_message(&e.to_string(), epoch, n_steps + 1, lr, &last_weights);
                        return Err(stop(&mut log, msg));
                    }
                    Err(e) => return Err(e),
                };
                global_step += 1;
                n_steps += 1;
                samples += stats.batch;
                phase = stats.phase;
                let losses = HostLosses {
                    total: stats.loss,
                    views: stats.view_losses.iter().map(|(_, l)| *l).collect(),
                };
                tally.record(&mut log, &losses, epoch, steps, lr, cfg.log_interval);
                if let Some(b) = &bar {
                    b.set_message(format!("{epoch}/{} loss {:.3}", cfg.num_epoch, stats.loss));
                    b.inc(1);
                }
                continue;
            };
            let ran = fast.step(&trainer.model, &x_q, &x_k, cross, &mut log)?;
            let before = global_step;
            global_step += ran as u64;
            n_steps += ran;
            samples += ran * cfg.batch_size;
            if let Some(b) = &bar {
                b.inc(ran as u64);
            }
            // Read the losses back when a log line is due (at most once per log_interval steps).
            let interval = cfg.log_interval as u64;
            if interval > 0 && global_step / interval > before / interval {
                read_fast(&mut tally, fast, &mut log, n_steps, &last_weights)?;
                if let Some(b) = &bar {
                    b.set_message(format!(
                        "{epoch}/{} loss {:.3}",
                        cfg.num_epoch, tally.last_loss
                    ));
                }
            }
        }
        if let Some(fast) = engine.as_mut() {
            let ran = fast.finish_epoch(&trainer.model, cross)?;
            global_step += ran as u64;
            n_steps += ran;
            samples += ran * cfg.batch_size;
            if let Some(b) = &bar {
                b.inc(ran as u64);
            }
            read_fast(&mut tally, fast, &mut log, n_steps, &last_weights)?;
            if tally.recorded != n_steps {
                return Err(Error::Other(format!(
                    "internal: epoch {epoch} ran {n_steps} steps but read {} losses",
                    tally.recorded
                )));
            }
            // Checkpoints below read the pointer and momentum buffers from the trainer.
            fast.sync_to(&mut trainer)?;
        }
        let (sum, view_sums) = (tally.sum, tally.view_sums.clone());
        let seconds = started.elapsed().as_secs_f64();
        let mut record = EpochRecord {
            epoch,
            phase,
            lr,
            loss: sum / n_steps as f64,
            view_losses: trainer
                .model
                .branches
                .iter()
                .zip(&view_sums)
                .map(|(b, s)| (b.view.name().to_string(), s / n_steps as f64))
                .collect(),
            steps: n_steps,
            seconds,
            samples_per_second: samples as f64 / seconds.max(1e-9),
            diagnostics: None,
            knn1: None,
            knn20: None,
            diag_seconds: None,
        };
        let views: Vec<String> = record
            .view_losses
            .iter()
            .map(|(v, l)| format!("{v} {l:.4}"))
            .collect();
        log.line(&format!(
            "epoch {epoch} (phase {phase}, lr {lr}): loss {:.4} [{}], {seconds:.1} s, {:.1} samples/s",
            record.loss,
            views.join(", "),
            record.samples_per_second
        ));
        if epoch == start_epoch && device.is_cuda() {
            // Which batch norms run on the fused CUDA kernels (timed per shape on first use).
            for c in crate::model::stgcn::fused_cuda::choices() {
                log.line(&format!(
                    "fused CUDA {} {:?}: fused {:.3} ms, tch {:.3} ms -> {}",
                    c.op,
                    c.shape,
                    c.fused_ms,
                    c.native_ms,
                    if c.fused { "fused" } else { "tch" }
                ));
            }
        }
        if let Some(d) = diagnostics.as_ref().filter(|d| d.due(epoch)) {
            let r = d.measure(&trainer.model, epoch)?;
            for line in d.log_lines(&r) {
                log.line(&line);
            }
            r.apply_to(&mut record);
        }
        records.push(record);
        log.write_metrics(&records)?;
        let meta = CheckpointMeta {
            format: String::new(),
            epoch,
            global_step,
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
            && (epoch % cfg.save_interval as usize == 0 || epoch == cfg.num_epoch)
        {
            let p = checkpoint::save(&dir, &format!("epoch{epoch}"), &trainer, meta.clone())?;
            log.line(&format!("saved {}", p.display()));
        }
        last_weights = checkpoint::save(&dir, LAST, &trainer, meta)?;
    }
    if let Some(b) = &bar {
        b.finish();
    }
    log.line("done");
    Ok(Summary {
        work_dir: dir,
        first_epoch: start_epoch,
        last_epoch: cfg.num_epoch,
        records,
        last_checkpoint: last_weights,
        device,
        steps_per_epoch: steps,
        step_impl,
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
        views: &[crate::data::views::View],
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
