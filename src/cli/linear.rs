//! `crossclr linear`: linear evaluation on frozen, cached features.
use crossclr::eval::args::{Baseline, DatasetArgs, EncoderArgs};
use crossclr::eval::linear::{LinearConfig, Standardize};
use crossclr::eval::protocol::{self, EncoderSetup, OutputOptions};
use crossclr::model::stgcn::StGcnConfig;
use std::path::PathBuf;

/// Output options shared by the protocol commands.
#[derive(clap::Args, Debug, Clone)]
pub struct OutputArgs {
    /// Work directory for scores, names, confusion matrix, t-SNE, curves and metrics.json.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Skip the t-SNE plot.
    #[arg(long)]
    pub no_tsne: bool,
    /// Also save the frozen features as features_<split>_<stream>.npy in the work dir.
    #[arg(long)]
    pub save_features: bool,
    /// Samples per encoder forward pass when computing features.
    #[arg(long, default_value_t = 256)]
    pub feature_batch: usize,
    /// Cache the frozen features in this folder and reuse them on later runs with the same
    /// weights file, streams and data (linear, knn).
    #[arg(long)]
    pub feature_cache: Option<PathBuf>,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// CPU threads for libtorch (0 = libtorch's default). Small matmuls are often fastest with 1.
    #[arg(long, default_value_t = 0)]
    pub threads: i32,
}

impl OutputArgs {
    pub fn options(&self) -> OutputOptions {
        OutputOptions {
            work_dir: self.work_dir.clone(),
            tsne: !self.no_tsne,
            save_features: self.save_features,
            feature_batch: self.feature_batch,
            feature_cache: self.feature_cache.clone(),
        }
    }

    /// Parses the device and applies --threads.
    pub fn device(&self) -> anyhow::Result<tch::Device> {
        if self.threads > 0 {
            tch::set_num_threads(self.threads);
        }
        Ok(crossclr::device::parse_device(&self.device)?)
    }
}

/// Builds the encoder setup of the shared encoder arguments.
pub fn encoder_setup(enc: &EncoderArgs, seed: u64) -> anyhow::Result<EncoderSetup> {
    Ok(EncoderSetup {
        weights: enc.weights_path(),
        streams: enc.streams()?,
        random: StGcnConfig {
            hidden_channels: enc.hidden_channels,
            hidden_dim: enc.hidden_dim,
            ..Default::default()
        },
        seed,
        recalibrate_bn: enc.recalibrate_bn,
    })
}

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub data: DatasetArgs,
    #[command(flatten)]
    pub encoder: EncoderArgs,
    #[command(flatten)]
    pub output: OutputArgs,
    #[arg(long, default_value_t = 100)]
    pub epochs: usize,
    #[arg(long, default_value_t = 3.0)]
    pub lr: f64,
    /// 0-based epochs where the lr is multiplied by 0.1 (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "80")]
    pub step: Vec<usize>,
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f64,
    /// Evaluate every this many epochs (and at the last).
    #[arg(long, default_value_t = 5)]
    pub eval_interval: usize,
    /// Hold out this fraction of the training set (class-stratified, seeded) as validation and
    /// report the test accuracy at the best validation epoch.
    #[arg(long, default_value_t = 0.0)]
    pub val_split: f64,
    /// Seeds the heads, the shuffles, the holdout and a random encoder (--weights none,
    /// --baseline random).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Standardise each stream's features before its head (BatchNorm without affine parameters,
    /// as the MAE-family linear probes): auto = on for a random encoder (--weights none, and the
    /// --baseline random encoder), off for trained weights (the official recipe).
    #[arg(long, value_enum, default_value_t = Standardize::Auto)]
    pub standardize: Standardize,
    /// Also evaluate this baseline with the same streams, data and recipe, print both side by
    /// side and write the baseline's outputs into <work_dir>/baseline_random.
    #[arg(long, value_enum)]
    pub baseline: Option<Baseline>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let device = args.output.device()?;
    let splits = args.data.open()?;
    let setup = encoder_setup(&args.encoder, args.seed)?;
    let standardize = protocol::resolve_standardize(args.standardize, &setup);
    let cfg = LinearConfig {
        epochs: args.epochs,
        lr: args.lr,
        steps: args.step.clone(),
        gamma: 0.1,
        momentum: args.momentum,
        weight_decay: args.weight_decay,
        batch_size: args.batch,
        eval_interval: args.eval_interval,
        seed: args.seed,
        cpu_threads: if args.output.threads > 0 {
            args.output.threads
        } else {
            1
        },
        standardize,
        ..LinearConfig::default()
    };
    let opts = args.output.options();
    match args.baseline {
        Some(Baseline::Random) if setup.weights.is_some() => {
            let cmp = protocol::run_linear_with_baseline(
                &splits,
                &setup,
                &cfg,
                args.standardize,
                args.val_split,
                device,
                &opts,
            )?;
            for l in cmp
                .trained
                .lines()
                .into_iter()
                .chain(cmp.random.lines())
                .chain(std::iter::once(String::new()))
                .chain(cmp.lines())
            {
                println!("{l}");
            }
            if let Some(dir) = &args.output.work_dir {
                println!("  {}", protocol::baseline_outputs_line(dir));
            }
        }
        baseline => {
            if baseline.is_some() {
                println!("--baseline random: --weights none is itself the random encoder");
            }
            let summary =
                protocol::run_linear(&splits, &setup, &cfg, args.val_split, device, &opts)?;
            for l in summary.lines() {
                println!("{l}");
            }
            if let Some(dir) = &args.output.work_dir {
                println!("  outputs in {}", dir.display());
            }
        }
    }
    Ok(())
}
