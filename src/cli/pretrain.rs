//! `crossclr pretrain --config <file> [key=value ...] [--resume] [--device cpu|cuda|cuda:N]`.
use crossclr::dist::{ProcessGroup, Rendezvous};
use crossclr::train::config::PretrainConfig;
use crossclr::train::pretrain::{run_with, RunOptions};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

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
    /// Data parallelism (launched by `torchrun --no-python`, or with RANK, WORLD_SIZE,
    /// MASTER_ADDR, MASTER_PORT set): seconds a rank waits for the others (joining, or in a
    /// collective) before the job ends with an error naming the operation.
    #[arg(long, default_value_t = 300)]
    pub dist_timeout: u64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let cfg = PretrainConfig::load(&args.config, &args.overrides)?;
    super::install_cpu_cache(&cfg.kernels);
    if let Some(d) = &args.device {
        crossclr::device::parse_device(d)?;
    }
    let group = match Rendezvous::from_vars(|k| std::env::var(k).ok())? {
        Some(r) if r.world_size > 1 => Some(Arc::new(ProcessGroup::gloo(
            &r,
            Duration::from_secs(args.dist_timeout),
        )?)),
        _ => None,
    };
    let rank0 = group.as_ref().is_none_or(|g| g.rank() == 0);
    let opts = RunOptions {
        resume: args.resume,
        group,
        device: args.device.clone(),
        progress: !args.quiet && rank0,
        echo: rank0,
        ..Default::default()
    };
    let summary = run_with(&cfg, &opts)?;
    if let Some(r) = summary.records.last().filter(|_| rank0) {
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
