//! `crossclr pretrain --config <file> [key=value ...] [--resume] [--device cpu|cuda|cuda:N]`.
use crossclr::train::config::PretrainConfig;
use crossclr::train::pretrain::{run_with, RunOptions};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Config file (YAML, or TOML by extension); official CrosSCLR YAML files load as is.
    #[arg(long, short = 'c')]
    pub config: PathBuf,
    /// Overrides with dotted keys, values as YAML: `model_args.queue_size=1024 step=[100,200]`.
    pub overrides: Vec<String>,
    /// Continue the run in work_dir from its `last` checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// cpu | cuda | cuda:N (overrides the config's `device`).
    #[arg(long)]
    pub device: Option<String>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let cfg = PretrainConfig::load(&args.config, &args.overrides)?;
    super::install_cpu_cache(&cfg.kernels);
    if let Some(d) = &args.device {
        crossclr::device::parse_device(d)?;
    }
    let opts = RunOptions {
        resume: args.resume,
        device: args.device.clone(),
        progress: !args.quiet,
        echo: true,
        ..Default::default()
    };
    let summary = run_with(&cfg, &opts)?;
    if let Some(r) = summary.records.last() {
        println!(
            "pre-training done: epoch {} loss {:.4}; work_dir {}; last checkpoint {}",
            r.epoch,
            r.loss,
            summary.work_dir.display(),
            summary.last_checkpoint.display()
        );
    }
    Ok(())
}
