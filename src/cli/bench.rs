//! `crossclr bench`: time one pre-training step (see `crossclr::bench`), or with `--loader` the
//! pre-training data pipeline (see `crossclr::bench::loader`).
use clap::ValueEnum;
use crossclr::bench::loader::{self as loader_bench, DataSource, LoaderBenchConfig, PinChoice};
use crossclr::bench::{self, BenchConfig, BenchModel, StepKind, Tf32};
use crossclr::model::kernels::Kernels;
use crossclr::train::config::{ModelKind, PretrainConfig};
use std::path::{Path, PathBuf};

/// Synthetic samples generated in memory when `--loader` has no other data (about 123 MB).
const DEFAULT_SYNTHETIC_SAMPLES: usize = 4096;

/// `auto` / `on` / `off` switches; `auto` follows what `crossclr pretrain` does on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AutoSwitch {
    Auto,
    On,
    Off,
}

/// `--tf32`: `auto` (on on CUDA, as `crossclr pretrain`'s default), libtorch's `default`, `on`,
/// `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Tf32Arg {
    Auto,
    Default,
    On,
    Off,
}

impl Tf32Arg {
    fn resolve(self, cuda: bool) -> Tf32 {
        match self {
            Tf32Arg::Auto if cuda => Tf32::On,
            Tf32Arg::Auto | Tf32Arg::Default => Tf32::Default,
            Tf32Arg::On => Tf32::On,
            Tf32Arg::Off => Tf32::Off,
        }
    }
}

#[derive(clap::Args)]
pub struct Args {
    /// Model: skeletonclr, crossclr2 (joint + motion) or crossclr3 (joint + motion + bone).
    /// With --loader: the model of the default config (the loader is the same for all).
    #[arg(long, value_enum, default_value = "skeletonclr")]
    model: BenchModel,
    /// 1 = MoCo phase, 2 = CVC-KM phase (CrosSCLR only).
    #[arg(long, default_value_t = 1)]
    phase: u8,
    /// Batch size [default: 128; with --loader: the config's batch_size].
    #[arg(long)]
    batch: Option<i64>,
    /// cpu, cuda or cuda:N (--loader: cuda adds the host -> device copy of every batch).
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, default_value_t = 50)]
    frames: i64,
    /// 25 (NTU RGB+D) or 20 (Kinect v1).
    #[arg(long, default_value_t = 25)]
    joints: i64,
    #[arg(long, default_value_t = 2)]
    bodies: i64,
    #[arg(long, default_value_t = 32768)]
    queue_size: i64,
    /// Untimed steps first (--loader: untimed batches).
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// reference = the training loop's step; fast = the capture-safe multi-tensor step.
    #[arg(long, value_enum, default_value = "fast")]
    step: StepKind,
    /// Capture the (fast) step into a CUDA graph and replay it; auto = on for the fast step on
    /// CUDA (what `crossclr pretrain` runs there by default), off otherwise and with --profile.
    #[arg(long, value_enum, default_value = "auto")]
    graph: AutoSwitch,
    /// TF32 for cuBLAS and cuDNN: auto = on on CUDA (`crossclr pretrain`'s default); default
    /// leaves libtorch's defaults (matmul off, conv on); on / off force both.
    #[arg(long, value_enum, default_value = "auto")]
    tf32: Tf32Arg,
    /// cuDNN autotuning; auto = on on CUDA (`crossclr pretrain`'s default).
    #[arg(long, value_enum, default_value = "auto")]
    cudnn_benchmark: AutoSwitch,
    /// Distinct random input batches rotated through.
    #[arg(long, default_value_t = 4)]
    inputs: usize,
    #[arg(long, default_value_t = 0)]
    seed: i64,
    /// Instead of timing: check the encoder on --device against the official fixture in DIR
    /// (tests/fixtures/official) and report the differences.
    #[arg(long, value_name = "DIR", conflicts_with = "loader")]
    parity_fixture: Option<std::path::PathBuf>,
    /// Print one JSON object per result line instead of a sentence.
    #[arg(long)]
    json: bool,
    /// After the timed steps, profile --profile-steps more with libtorch's profiler (Kineto):
    /// Chrome trace to PATH, per-kernel rows to PATH with extension .jsonl, table to .txt.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["loader", "parity_fixture"])]
    profile: Option<PathBuf>,
    /// Steps profiled with --profile.
    #[arg(long, default_value_t = 5, requires = "profile")]
    profile_steps: usize,

    /// Time the pre-training data pipeline instead of the step: the loader `crossclr pretrain`
    /// builds (augmented query/key copies, batch tensors), per worker count.
    #[arg(
        long,
        conflicts_with_all = [
            "phase", "step", "graph", "tf32", "cudnn_benchmark", "queue_size", "iters", "inputs",
            "seed", "frames", "joints", "bodies",
        ]
    )]
    loader: bool,
    /// --loader: pre-training config whose loader (and dataset) to time; key=value overrides
    /// follow as for `crossclr pretrain` (e.g. `batch_size=64 seed=1`).
    #[arg(long, short = 'c', requires = "loader", conflicts_with = "model")]
    config: Option<PathBuf>,
    /// Dotted key=value overrides, YAML values. Step timing: the kernel levers of a config's
    /// `kernels:` block (`kernels.fold_bias=off kernels.stgcn=reference ...`, see
    /// `crossclr::model::kernels`). --loader: any key of the config.
    overrides: Vec<String>,
    /// --loader: a `crossclr synth` output folder to read (train split, memory-mapped), instead
    /// of the config's dataset.
    #[arg(
        long,
        value_name = "DIR",
        requires = "loader",
        conflicts_with = "synthetic_samples"
    )]
    data: Option<PathBuf>,
    /// --loader: generate this many NTU-shaped synthetic samples (3 x 50 x 25 x 2) in memory
    /// [default without --config or --data: 4096].
    #[arg(long, value_name = "N", requires = "loader")]
    synthetic_samples: Option<usize>,
    /// --loader: worker thread counts to time, comma-separated (0 = no worker thread)
    /// [default: the config's workers].
    #[arg(long, value_delimiter = ',', num_args = 1.., requires = "loader")]
    workers: Option<Vec<usize>>,
    /// --loader: timed batches per run.
    #[arg(long, default_value_t = 40, requires = "loader")]
    batches: usize,
    /// --loader: timed runs per row (the row reports the median).
    #[arg(long, default_value_t = 3, requires = "loader")]
    repeats: usize,
    /// --loader: host memory of the batches: auto = pinned and pageable rows on CUDA, pageable
    /// on CPU; on = pinned (CUDA only); off = pageable.
    #[arg(long, value_enum, default_value = "auto", requires = "loader")]
    pin: PinChoice,
    /// --loader: also split one thread's per-sample time into stages.
    #[arg(long, requires = "loader")]
    stages: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let device = crossclr::device::parse_device(&args.device)?;
    if args.loader {
        return run_loader(&args, device);
    }
    let cuda = device.is_cuda();
    let tf32 = args.tf32.resolve(cuda);
    if let Some(dir) = &args.parity_fixture {
        bench::apply_modes(device, tf32, false)?;
        let tf32 = format!("{tf32:?}").to_lowercase();
        let report = bench::parity::run(dir, device, &tf32)?;
        if args.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            println!(
                "parity on {} (tf32 {tf32}, flags {:?}): eval vs fixture rel {:.3e} (informative); eval vs CPU \
                 max |diff| {:.3e} rel {:.3e}; train vs fixture max |diff| {:.3e} rel {:.3e}; tolerance {:.0e} -> {}",
                report.device_name,
                report.tf32_state,
                report.eval_fixture_rel_diff,
                report.eval_max_abs_diff,
                report.eval_rel_diff,
                report.train_max_abs_diff,
                report.train_rel_diff,
                report.tolerance,
                if report.pass { "PASS" } else { "FAIL" }
            );
        }
        if !report.pass {
            anyhow::bail!("parity check failed");
        }
        return Ok(());
    }
    let cfg = BenchConfig {
        model: args.model,
        phase: args.phase,
        batch: args.batch.unwrap_or(128),
        frames: args.frames,
        joints: args.joints,
        bodies: args.bodies,
        queue_size: args.queue_size,
        device,
        warmup: args.warmup,
        iters: args.iters,
        step: args.step,
        graph: match args.graph {
            // Not with --profile: per-kernel times inside CUDA graphs are not reliable.
            AutoSwitch::Auto => {
                cuda && args.step == StepKind::Fast
                    && args.profile.is_none()
                    && crossclr::gpu::shim_status() == crossclr::gpu::ShimStatus::Cuda
            }
            AutoSwitch::On => true,
            AutoSwitch::Off => false,
        },
        tf32,
        cudnn_benchmark: match args.cudnn_benchmark {
            AutoSwitch::Auto => cuda,
            AutoSwitch::On => true,
            AutoSwitch::Off => false,
        },
        inputs: args.inputs,
        seed: args.seed,
        profile: args.profile.clone(),
        profile_steps: args.profile_steps,
        kernels: step_kernels(&args.overrides)?,
    };
    super::install_cpu_cache(&cfg.kernels);
    let report = bench::run(&cfg)?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{}", report.summary());
    }
    Ok(())
}

/// The kernel levers of the step timing: the `kernels.*` overrides applied to the defaults, parsed
/// and checked as a config file's `kernels:` block (errors name the key).
fn step_kernels(overrides: &[String]) -> anyhow::Result<Kernels> {
    if let Some(other) = overrides
        .iter()
        .find(|o| !o.trim_start().starts_with("kernels."))
    {
        anyhow::bail!(
            "bench: override '{other}': step timing takes only kernels.* keys (any config key \
             needs --loader)"
        );
    }
    let defaults = PretrainConfig::default().to_yaml()?;
    let cfg = PretrainConfig::from_text(
        &defaults,
        false,
        Path::new("<crossclr bench overrides>"),
        overrides,
    )?;
    Ok(cfg.kernels)
}

/// The model kind of the default config for `--model`.
fn model_kind(model: BenchModel) -> ModelKind {
    match model {
        BenchModel::Skeletonclr => ModelKind::Skeletonclr,
        BenchModel::Crossclr2 => ModelKind::Crossclr2,
        BenchModel::Crossclr3 => ModelKind::Crossclr3,
    }
}

/// `--loader`: the config (file or the official defaults of `--model`) with the overrides, then
/// `--batch` on top.
fn loader_pretrain_config(args: &Args) -> anyhow::Result<PretrainConfig> {
    let mut overrides = args.overrides.clone();
    if let Some(b) = args.batch {
        overrides.push(format!("batch_size={b}"));
    }
    Ok(match &args.config {
        Some(path) => PretrainConfig::load(path, &overrides)?,
        None => {
            let defaults = PretrainConfig::with_model(model_kind(args.model));
            let source = format!("<official defaults of --model {}>", args.model.name());
            PretrainConfig::from_text(&defaults.to_yaml()?, false, Path::new(&source), &overrides)?
        }
    })
}

fn run_loader(args: &Args, device: tch::Device) -> anyhow::Result<()> {
    let pretrain = loader_pretrain_config(args)?;
    let source = match (&args.data, args.synthetic_samples, &args.config) {
        (Some(dir), _, _) => DataSource::SynthFolder(dir.clone()),
        (None, Some(samples), _) => DataSource::Synthetic { samples },
        (None, None, Some(_)) => DataSource::Config,
        (None, None, None) => DataSource::Synthetic {
            samples: DEFAULT_SYNTHETIC_SAMPLES,
        },
    };
    let cfg = LoaderBenchConfig {
        workers: args.workers.clone().unwrap_or(vec![pretrain.workers]),
        pretrain,
        source,
        warmup: args.warmup,
        batches: args.batches,
        repeats: args.repeats,
        device,
        pin: args.pin,
        stages: args.stages,
    };
    let json = args.json;
    let print = |line: anyhow::Result<String>| match line {
        Ok(l) => println!("{l}"),
        Err(e) => eprintln!("cannot print a result: {e}"),
    };
    let out = loader_bench::run(&cfg, |row| {
        print(if json {
            serde_json::to_string(row).map_err(Into::into)
        } else {
            Ok(row.summary())
        })
    })?;
    if let Some(stages) = &out.stages {
        print(if json {
            serde_json::to_string(stages).map_err(Into::into)
        } else {
            Ok(stages.summary())
        });
    }
    Ok(())
}
