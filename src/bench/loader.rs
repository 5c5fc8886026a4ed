//! `crossclr bench --loader`: throughput of the pre-training data pipeline, the host side of the
//! training loop (the step itself is timed by [`crate::bench::run`]).
//!
//! It builds exactly the loader `crossclr pretrain` builds ([`crate::train::pretrain::loader_config`]
//! from a [`PretrainConfig`]: batch, shuffle, drop_last, two augmented copies of every sample,
//! seed, prefetch), over the config's dataset, a `crossclr synth` folder, or procedural NTU-shaped
//! samples (`3 x 50 x 25 x 2`, officially preprocessed) generated in memory. For every worker
//! count (and, on CUDA, for pinned and pageable host memory) it pulls `warmup` batches, then times
//! `batches` batches, `repeats` times (each repeat a fresh loader on a new epoch), and reports the
//! median samples/s, batches/s and ms per batch, with the process CPU time per sample.
//!
//! The loader is the same for every model: SkeletonCLR and CrosSCLR-2/3 all train on two
//! augmented copies of the joint data; the motion and bone views are computed from them on the
//! device inside the step. With `--device cuda` each batch is also copied to the device as the
//! training step does (`non_blocking`), and the timed region ends with a device synchronisation.
//!
//! [`profile_stages`] splits one thread's per-sample time into the augmentation draws (ChaCha
//! stream + crop start + shear matrix), the crop + shear pass into a warm buffer, and the rest of
//! a real batch build (fresh batch tensors and their first touch, labels, bookkeeping), next to
//! the floor of a plain copy of the sample data.
use crate::data::augment::{apply_draw, AugmentConfig, AugmentDraw};
use crate::data::dataset::SkeletonDataset;
use crate::data::formats::{self, DatasetFormat, DatasetSpec};
use crate::data::loader::{
    batches_per_epoch, epoch_order, sample_rng, try_epoch_batches_in, Batch, HostMemory, Loader,
    LoaderConfig,
};
use crate::data::synth::{self, SynthConfig};
use crate::error::{Error, Result};
use crate::gpu;
use crate::train::config::PretrainConfig;
use crate::train::pretrain::loader_config;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Kind};

/// Where the samples come from.
#[derive(Clone, Debug, PartialEq)]
pub enum DataSource {
    /// The config's training set (`dataset:` or `train_feeder_args`), opened as `pretrain` does.
    Config,
    /// A `crossclr synth` folder: `train_data.npy` (memory-mapped, like the real data) and
    /// `train_label.pkl`; the layout comes from its `dataset.toml` (default ntu25).
    SynthFolder(PathBuf),
    /// At least `samples` procedural samples (ntu25, 50 frames, 2 bodies) generated in memory.
    Synthetic { samples: usize },
}

/// Host memory of the batches to time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PinChoice {
    /// CUDA: both pinned and pageable rows; CPU: pageable.
    Auto,
    /// Pinned only (CUDA only).
    On,
    /// Pageable only.
    Off,
}

impl PinChoice {
    /// The memories to time for `device`; pinned memory without CUDA is an error.
    pub fn memories(self, device: Device) -> Result<Vec<HostMemory>> {
        match (self, device.is_cuda()) {
            (PinChoice::Auto, true) => Ok(vec![HostMemory::Pinned(device), HostMemory::Pageable]),
            (PinChoice::Auto, false) | (PinChoice::Off, _) => Ok(vec![HostMemory::Pageable]),
            (PinChoice::On, true) => Ok(vec![HostMemory::Pinned(device)]),
            (PinChoice::On, false) => Err(Error::config(
                "--pin on needs --device cuda (pinned host memory only helps copies to a GPU)",
            )),
        }
    }
}

/// Everything a loader benchmark needs.
#[derive(Clone, Debug)]
pub struct LoaderBenchConfig {
    /// The pre-training config whose loader is timed (its `workers` is replaced by each entry of
    /// `workers`).
    pub pretrain: PretrainConfig,
    pub source: DataSource,
    /// Worker thread counts to time (0 = batches built on the consuming thread).
    pub workers: Vec<usize>,
    /// Batches pulled before the timed ones (thread start, first allocations, pinned pool).
    pub warmup: usize,
    /// Timed batches per repeat.
    pub batches: usize,
    /// Timed runs per row; the row reports their median.
    pub repeats: usize,
    /// `Cpu`: the loader alone. `Cuda`: plus the host -> device copy of every batch.
    pub device: Device,
    pub pin: PinChoice,
    /// Also split one thread's per-sample time into stages ([`profile_stages`]).
    pub stages: bool,
}

impl LoaderBenchConfig {
    fn validate(&self) -> Result<()> {
        if self.workers.is_empty() {
            return Err(Error::config("--workers needs at least one count"));
        }
        if self.batches == 0 || self.repeats == 0 {
            return Err(Error::config("--batches and --repeats must be at least 1"));
        }
        if let DataSource::Synthetic { samples: 0 } = self.source {
            return Err(Error::config("--synthetic-samples must be at least 1"));
        }
        self.pin.memories(self.device).map(|_| ())
    }
}

/// One row: a worker count and a host memory. Field names follow [`crate::bench::BenchReport`].
#[derive(Clone, Debug, Serialize)]
pub struct LoaderBenchReport {
    /// Always "crossclr".
    pub r#impl: &'static str,
    /// Always "loader" (step rows have no `bench` field).
    pub bench: &'static str,
    pub torch: String,
    /// The config's model; the loader is the same for every model (see the module doc).
    pub model: String,
    /// The model's views, computed on the device inside the step (not by the loader).
    pub views: Vec<String>,
    pub batch: usize,
    /// `[C, T, V, M]` of one sample.
    pub sample_shape: [usize; 4],
    /// Where the samples came from.
    pub dataset: String,
    pub dataset_samples: usize,
    /// Augmented copies per sample (query and key).
    pub copies_per_sample: usize,
    pub augment: Option<AugmentConfig>,
    pub device: String,
    pub device_name: String,
    pub host_cpu: String,
    /// Hardware threads the process may use.
    pub host_threads: usize,
    pub workers: usize,
    /// Finished batches kept ready ahead of the consumer.
    pub prefetch: usize,
    /// "pageable" or "pinned".
    pub host_memory: &'static str,
    /// Whether the timed region includes the host -> device copy of every batch.
    pub h2d_copy: bool,
    pub warmup: usize,
    pub batches: usize,
    pub repeats: usize,
    /// Median over the repeats.
    pub samples_per_s: f64,
    pub batches_per_s: f64,
    pub ms_per_batch: f64,
    /// samples/s of every repeat, in order.
    pub samples_per_s_runs: Vec<f64>,
    /// Process CPU time (all threads) per timed batch and per sample, median over the repeats.
    pub cpu_ms_per_batch: Option<f64>,
    pub cpu_us_per_sample: Option<f64>,
    /// Samples per CPU-second: what one fully busy core delivers.
    pub samples_per_cpu_s: Option<f64>,
    /// CUDA: host time spent issuing the copies, per batch (median over the repeats).
    pub h2d_host_ms_per_batch: Option<f64>,
    /// CUDA + pinned: whether libtorch reports the first timed batch as pinned.
    pub pinned_checked: Option<bool>,
}

impl LoaderBenchReport {
    /// One human-readable line.
    pub fn summary(&self) -> String {
        let cpu = match (self.cpu_us_per_sample, self.samples_per_cpu_s) {
            (Some(us), Some(per_cpu)) => {
                format!(", {us:.1} CPU-us/sample ({per_cpu:.0} samples per CPU-second)")
            }
            _ => String::new(),
        };
        let copy = match self.h2d_host_ms_per_batch {
            Some(ms) => format!(", copy to {} issued in {ms:.2} ms/batch", self.device),
            None => String::new(),
        };
        format!(
            "loader ({}, batch {}, {} workers, {} memory) on {}: {:.0} samples/s, {:.2} batches/s, \
             {:.2} ms/batch (median of {}){cpu}{copy}",
            self.model,
            self.batch,
            self.workers,
            self.host_memory,
            self.host_cpu,
            self.samples_per_s,
            self.batches_per_s,
            self.ms_per_batch,
            self.repeats
        )
    }
}

/// Per-sample stage times of one thread (see the module doc), microseconds per sample.
#[derive(Clone, Debug, Serialize)]
pub struct StageReport {
    pub r#impl: &'static str,
    /// Always "loader_stages".
    pub bench: &'static str,
    pub batch: usize,
    pub sample_shape: [usize; 4],
    pub copies_per_sample: usize,
    pub host_memory: &'static str,
    /// Samples timed per stage.
    pub samples: usize,
    /// A whole batch build on this thread (a loader with 0 workers), per sample.
    pub build_us: f64,
    /// The random draws of all copies (ChaCha stream set-up, crop start, six shear uniforms).
    pub draw_us: f64,
    /// Crop + shear of all copies into a warm batch buffer.
    pub augment_us: f64,
    /// `build - draw - augment`: fresh batch tensors and their first touch, labels, bookkeeping.
    pub rest_us: f64,
    /// Floor: a plain copy of the sample into every copy's slot of a warm batch buffer.
    pub copy_us: f64,
}

impl StageReport {
    pub fn summary(&self) -> String {
        format!(
            "stages per sample ({} copies, {} memory, one thread): build {:.2} us = draws {:.2} + \
             crop/shear {:.2} + rest {:.2} (allocation, first touch, labels); plain copy floor {:.2} us",
            self.copies_per_sample,
            self.host_memory,
            self.build_us,
            self.draw_us,
            self.augment_us,
            self.rest_us,
            self.copy_us
        )
    }
}

/// Process CPU time (all threads, including finished ones) in seconds, where the OS offers it.
#[cfg(all(target_os = "linux", target_pointer_width = "64"))]
pub fn process_cpu_seconds() -> Option<f64> {
    /// `struct timespec` on 64-bit Linux.
    #[repr(C)]
    struct Timespec {
        tv_sec: i64,
        tv_nsec: i64,
    }
    extern "C" {
        fn clock_gettime(clock: i32, tp: *mut Timespec) -> i32;
    }
    /// `CLOCK_PROCESS_CPUTIME_ID` in Linux's `<time.h>`.
    const CLOCK_PROCESS_CPUTIME_ID: i32 = 2;
    let mut ts = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable `struct timespec`; clock_gettime only writes into it.
    let rc = unsafe { clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    (rc == 0).then_some(ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9)
}

/// Process CPU time: not measured on this platform.
#[cfg(not(all(target_os = "linux", target_pointer_width = "64")))]
pub fn process_cpu_seconds() -> Option<f64> {
    None
}

/// Opens the samples `source` names, with a description for the report.
pub fn open_source(
    source: &DataSource,
    cfg: &PretrainConfig,
) -> Result<(Arc<SkeletonDataset>, String)> {
    match source {
        DataSource::Config => {
            let spec = cfg.dataset_spec();
            let ds = formats::open(&spec)?;
            Ok((Arc::new(ds), format!("{}", spec.data.display())))
        }
        DataSource::SynthFolder(dir) => {
            let ds = formats::open(&synth_folder_spec(dir)?)?;
            Ok((Arc::new(ds), format!("{} (mmap)", dir.display())))
        }
        DataSource::Synthetic { samples } => {
            let base = SynthConfig::default();
            let per_class = samples.div_ceil(base.num_classes);
            let (train, _) = synth::try_generate(&SynthConfig {
                train_per_class: per_class,
                val_per_class: 0,
                seed: cfg.seed,
                ..base
            })?;
            Ok((Arc::new(train), "synthetic (in memory)".to_string()))
        }
    }
}

/// The training split of a `crossclr synth` folder, as `pretrain` would read it.
fn synth_folder_spec(dir: &Path) -> Result<DatasetSpec> {
    if !dir.is_dir() {
        return Err(Error::input(
            dir,
            "--data",
            "expected a folder written by `crossclr synth` (train_data.npy, train_label.pkl); \
             for other data use --config with `dataset:` or `train_feeder_args`",
        ));
    }
    let layout = layout_of_folder(dir)?;
    Ok(DatasetSpec {
        format: DatasetFormat::Npy,
        data: dir.join("train_data.npy"),
        label: Some(dir.join("train_label.pkl")),
        layout,
        part: None,
        mmap: true,
    })
}

/// The `layout` key of `<dir>/dataset.toml` (a file name is resolved against `dir`), or ntu25
/// when the folder has no dataset.toml.
fn layout_of_folder(dir: &Path) -> Result<String> {
    let file = dir.join("dataset.toml");
    let Ok(text) = std::fs::read_to_string(&file) else {
        return Ok("ntu25".into());
    };
    let value: toml::Value =
        toml::from_str(&text).map_err(|e| Error::input(&file, "toml", e.to_string()))?;
    let Some(layout) = value.get("layout") else {
        return Ok("ntu25".into());
    };
    let layout = layout
        .as_str()
        .ok_or_else(|| Error::input(&file, "layout", "expected a string"))?;
    let as_file = dir.join(layout);
    Ok(if as_file.is_file() {
        as_file.display().to_string()
    } else {
        layout.to_string()
    })
}

/// Batches of consecutive epochs from `first_epoch` on (a fresh loader per epoch, as in
/// `pretrain`).
struct EpochStream {
    dataset: Arc<SkeletonDataset>,
    cfg: LoaderConfig,
    memory: HostMemory,
    epoch: usize,
    loader: Loader,
}

impl EpochStream {
    fn new(
        dataset: &Arc<SkeletonDataset>,
        cfg: &LoaderConfig,
        memory: HostMemory,
        first_epoch: usize,
    ) -> Result<Self> {
        if batches_per_epoch(dataset.len(), cfg) == 0 {
            return Err(Error::config(format!(
                "batch size {} exceeds the {} samples of the dataset (drop_last leaves no batch)",
                cfg.batch_size,
                dataset.len()
            )));
        }
        let loader = try_epoch_batches_in(Arc::clone(dataset), cfg, first_epoch, 0, memory)?;
        Ok(EpochStream {
            dataset: Arc::clone(dataset),
            cfg: cfg.clone(),
            memory,
            epoch: first_epoch,
            loader,
        })
    }

    fn next_batch(&mut self) -> Result<Batch> {
        loop {
            if let Some(b) = self.loader.next() {
                return Ok(b);
            }
            self.epoch += 1;
            self.loader = try_epoch_batches_in(
                Arc::clone(&self.dataset),
                &self.cfg,
                self.epoch,
                0,
                self.memory,
            )?;
        }
    }
}

/// What one timed run measured.
struct RunTimes {
    seconds: f64,
    cpu_seconds: Option<f64>,
    /// Host time spent issuing the device copies (CUDA only).
    copy_seconds: Option<f64>,
    pinned: Option<bool>,
}

/// Pulls `warmup` then times `batches` batches from a fresh loader on `epoch` (copied to
/// `device` when it is CUDA).
fn timed_run(
    dataset: &Arc<SkeletonDataset>,
    cfg: &LoaderConfig,
    memory: HostMemory,
    device: Device,
    (warmup, batches): (usize, usize),
    epoch: usize,
) -> Result<RunTimes> {
    let mut stream = EpochStream::new(dataset, cfg, memory, epoch)?;
    let copy = |batch: &Batch| -> Result<()> {
        for v in &batch.views {
            // As the training step: f32, non_blocking (truly asynchronous from pinned memory).
            drop(v.f_to_device_(device, Kind::Float, true, false)?);
        }
        Ok(())
    };
    for _ in 0..warmup {
        let batch = stream.next_batch()?;
        if device.is_cuda() {
            copy(&batch)?;
        }
    }
    let mut copy_seconds = 0.0;
    let mut pinned = None;
    let cpu0 = process_cpu_seconds();
    let t0 = Instant::now();
    for i in 0..batches {
        let batch = stream.next_batch()?;
        if device.is_cuda() {
            if i == 0 && matches!(memory, HostMemory::Pinned(_)) {
                pinned = Some(batch.views[0].f_is_pinned(device)?);
            }
            let c0 = Instant::now();
            copy(&batch)?;
            copy_seconds += c0.elapsed().as_secs_f64();
        }
    }
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
    let seconds = t0.elapsed().as_secs_f64();
    let cpu_seconds = match (cpu0, process_cpu_seconds()) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    Ok(RunTimes {
        seconds,
        cpu_seconds,
        copy_seconds: device.is_cuda().then_some(copy_seconds),
        pinned,
    })
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

fn median_of(xs: Vec<Option<f64>>) -> Option<f64> {
    xs.into_iter().collect::<Option<Vec<f64>>>().map(median)
}

fn device_string(device: Device) -> String {
    match device {
        Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".into(),
    }
}

/// What [`run`] measured.
#[derive(Clone, Debug)]
pub struct LoaderBenchOutput {
    /// One row per (worker count, host memory), in that order.
    pub rows: Vec<LoaderBenchReport>,
    /// With `cfg.stages`: the stage split, in the first host memory timed.
    pub stages: Option<StageReport>,
}

/// Opens the data once and times every (worker count, host memory) row, then the stages if
/// asked; `on_row` sees each row as soon as it is measured (to print it).
pub fn run(
    cfg: &LoaderBenchConfig,
    mut on_row: impl FnMut(&LoaderBenchReport),
) -> Result<LoaderBenchOutput> {
    cfg.validate()?;
    let memories = cfg.pin.memories(cfg.device)?;
    let (dataset, source) = open_source(&cfg.source, &cfg.pretrain)?;
    let views = cfg
        .pretrain
        .views()?
        .iter()
        .map(|v| v.name().to_string())
        .collect();
    let base = loader_config(&cfg.pretrain);
    let mut rows = Vec::new();
    for &workers in &cfg.workers {
        for &memory in &memories {
            let loader = LoaderConfig {
                workers,
                prefetch: 2 * workers.max(1),
                ..base.clone()
            };
            // Each repeat starts a fresh loader on epochs no earlier repeat used (its own order
            // and draws), as pretrain starts one per epoch.
            let epochs_per_run = (cfg.warmup + cfg.batches)
                .div_ceil(batches_per_epoch(dataset.len(), &loader).max(1));
            let mut runs = Vec::with_capacity(cfg.repeats);
            for r in 0..cfg.repeats {
                let epoch = 1 + r * epochs_per_run;
                runs.push(timed_run(
                    &dataset,
                    &loader,
                    memory,
                    cfg.device,
                    (cfg.warmup, cfg.batches),
                    epoch,
                )?);
            }
            let samples = (cfg.batches * loader.batch_size) as f64;
            let per_s: Vec<f64> = runs.iter().map(|r| samples / r.seconds).collect();
            let sps = median(per_s.clone());
            let cpu = median_of(runs.iter().map(|r| r.cpu_seconds).collect());
            let copy = median_of(runs.iter().map(|r| r.copy_seconds).collect());
            let row = LoaderBenchReport {
                r#impl: "crossclr",
                bench: "loader",
                torch: format!("libtorch (tch {})", "0.24.0"),
                model: cfg.pretrain.model.name().to_string(),
                views: Vec::clone(&views),
                batch: loader.batch_size,
                sample_shape: dataset.sample_shape(),
                dataset: source.clone(),
                dataset_samples: dataset.len(),
                copies_per_sample: loader.num_views,
                augment: loader.augment,
                device: device_string(cfg.device),
                device_name: gpu::device_name(cfg.device)
                    .unwrap_or_else(|e| format!("unknown ({e})")),
                host_cpu: gpu::cpu_name(),
                host_threads: std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1),
                workers,
                prefetch: loader.prefetch,
                host_memory: memory.name(),
                h2d_copy: cfg.device.is_cuda(),
                warmup: cfg.warmup,
                batches: cfg.batches,
                repeats: cfg.repeats,
                samples_per_s: sps,
                batches_per_s: sps / loader.batch_size as f64,
                ms_per_batch: 1e3 * loader.batch_size as f64 / sps,
                samples_per_s_runs: per_s,
                cpu_ms_per_batch: cpu.map(|c| 1e3 * c / cfg.batches as f64),
                cpu_us_per_sample: cpu.map(|c| 1e6 * c / samples),
                samples_per_cpu_s: cpu.map(|c| samples / c),
                h2d_host_ms_per_batch: copy.map(|c| 1e3 * c / cfg.batches as f64),
                pinned_checked: runs[0].pinned,
            };
            on_row(&row);
            rows.push(row);
        }
    }
    let stages = if cfg.stages {
        Some(profile_stages(cfg, &dataset, memories[0])?)
    } else {
        None
    };
    Ok(LoaderBenchOutput { rows, stages })
}

/// Times the stages of the batch build on this thread over `batches` batches (see the module
/// doc), for the loader of `cfg.pretrain` in host memory `memory`.
pub fn profile_stages(
    cfg: &LoaderBenchConfig,
    dataset: &Arc<SkeletonDataset>,
    memory: HostMemory,
) -> Result<StageReport> {
    let base = LoaderConfig {
        workers: 0,
        ..loader_config(&cfg.pretrain)
    };
    let bs = base.batch_size;
    let copies = base.num_views;
    let shape = dataset.sample_shape();
    let len = dataset.sample_len();
    let n = cfg.batches * bs;
    let samples = n as f64;

    // The whole build, as the loader does it (one warm-up batch first).
    let mut stream = EpochStream::new(dataset, &base, memory, 1)?;
    drop(stream.next_batch()?);
    let t0 = Instant::now();
    for _ in 0..cfg.batches {
        drop(stream.next_batch()?);
    }
    let build = t0.elapsed().as_secs_f64();

    // The draws of every copy of the first `n` positions.
    let aug = base.augment.unwrap_or_else(AugmentConfig::none);
    let t0 = Instant::now();
    let mut draws = Vec::with_capacity(n * copies);
    for position in 0..n {
        let mut rng = sample_rng(base.seed, 1, position);
        for _ in 0..copies {
            draws.push(AugmentDraw::sample(shape[1], &aug, &mut rng));
        }
    }
    let draw = t0.elapsed().as_secs_f64();
    let draws = std::hint::black_box(draws);

    // Crop + shear and the plain copy into a warm batch buffer per copy.
    let order = epoch_order(dataset.len(), &base, 1);
    let mut bufs = vec![vec![0.0f32; bs * len]; copies];
    let sample_of = |position: usize| dataset.sample(order[position % order.len()]);
    let t0 = Instant::now();
    for position in 0..n {
        let x = sample_of(position);
        let row = position % bs;
        for (c, buf) in bufs.iter_mut().enumerate() {
            let out = &mut buf[row * len..(row + 1) * len];
            apply_draw(x, shape, &draws[position * copies + c], out);
        }
    }
    let augment = t0.elapsed().as_secs_f64();
    std::hint::black_box(&bufs);
    let t0 = Instant::now();
    for position in 0..n {
        let x = sample_of(position);
        let row = position % bs;
        for buf in bufs.iter_mut() {
            buf[row * len..(row + 1) * len].copy_from_slice(x);
        }
    }
    let copy = t0.elapsed().as_secs_f64();
    std::hint::black_box(&bufs);

    let us = |s: f64| 1e6 * s / samples;
    Ok(StageReport {
        r#impl: "crossclr",
        bench: "loader_stages",
        batch: bs,
        sample_shape: shape,
        copies_per_sample: copies,
        host_memory: memory.name(),
        samples: n,
        build_us: us(build),
        draw_us: us(draw),
        augment_us: us(augment),
        rest_us: us(build - draw - augment),
        copy_us: us(copy),
    })
}
