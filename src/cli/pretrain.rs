//! `crossclr pretrain --config <file> [key=value ...] [--resume] [--device cpu|cuda|cuda:N]`.
use crossclr::data::formats::DatasetFormat;
use crossclr::dist::{self, Backend, ProcessGroup, Rendezvous};
use crossclr::train::config::{DistBackend, PretrainConfig};
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
    /// Fault injection for the numerics tests: NaN in the query batch (`input:<n>`) or the first
    /// gradient (`grad:<n>`) of global step n.
    #[arg(long, hide = true)]
    pub inject_nan: Option<String>,
}

/// Overrides that make the config follow the data where the user left a setting implicit:
/// `model_args.in_channels` = the data's C (2D data: 2, or 3 with a score channel) and the layout
/// named by a `dataset.toml` next to the data (as `prepare generic` and `synth` write), each only
/// when neither the config file nor the command line mentions it.
fn follow_the_data(
    cfg: &PretrainConfig,
    config: &std::path::Path,
    overrides: &[String],
    echo: bool,
) -> Vec<String> {
    let mentioned = |keys: &[&str]| {
        keys.iter()
            .any(|k| PretrainConfig::sets_key(config, overrides, k).unwrap_or(true))
    };
    let spec = cfg.dataset_spec();
    let mut extra = Vec::new();
    if spec.format == DatasetFormat::Npy && !mentioned(&["model_args.in_channels"]) {
        if let Ok(h) = crossclr::data::npy::read_header(&spec.data) {
            if h.shape.len() == 5 && h.shape[1] as i64 != cfg.model_args.in_channels {
                if echo {
                    println!(
                        "model_args.in_channels = {} from {} (C of the data)",
                        h.shape[1],
                        spec.data.display()
                    );
                }
                extra.push(format!("model_args.in_channels={}", h.shape[1]));
            }
        }
    }
    if !mentioned(&["layout", "dataset.layout", "model_args.graph_args.layout"]) {
        let toml_path = spec.data.parent().map(|d| d.join("dataset.toml"));
        let named = toml_path
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|t| toml::from_str::<toml::Value>(&t).ok())
            .and_then(|v| v.get("layout").and_then(|l| l.as_str()).map(str::to_string));
        if let (Some(layout), Some(p)) = (named, toml_path) {
            let dir = p.parent().map(|d| d.to_path_buf()).unwrap_or_default();
            let file = dir.join(&layout);
            let layout = if file.is_file() {
                file.display().to_string()
            } else {
                layout
            };
            if echo {
                println!("layout {layout} from {}", p.display());
            }
            let key = if cfg.dataset.is_some() {
                "dataset.layout"
            } else {
                "layout"
            };
            extra.push(format!("{key}={layout}"));
        }
    }
    extra
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut cfg = PretrainConfig::load(&args.config, &args.overrides)?;
    // In a data-parallel job only rank 0 says what it took from the data.
    let echo = std::env::var("RANK").map_or(true, |r| r.trim() == "0");
    let extra = follow_the_data(&cfg, &args.config, &args.overrides, echo);
    if !extra.is_empty() {
        let mut all = extra;
        all.extend(args.overrides.iter().cloned());
        cfg = PretrainConfig::load(&args.config, &all)?;
    }
    super::install_cpu_cache(&cfg.kernels);
    if let Some(d) = &args.device {
        crossclr::device::parse_device(d)?;
    }
    let mut device = args.device.clone();
    let group = match Rendezvous::from_vars(|k| std::env::var(k).ok())? {
        // One rank forms a group only when a backend is named (to try NCCL on one GPU).
        Some(r) if r.world_size > 1 || cfg.dist_backend != DistBackend::Auto => {
            let named = match &device {
                Some(d) => d.clone(),
                None => cfg.device.as_device_string()?,
            };
            let local_rank = std::env::var("LOCAL_RANK")
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(r.rank);
            let (rank_device, backend) = rank_device(&named, local_rank, cfg.dist_backend)?;
            device = Some(rank_device);
            let timeout = Duration::from_secs(args.dist_timeout);
            Some(Arc::new(ProcessGroup::join(&r, timeout, backend)?))
        }
        _ => None,
    };
    let rank0 = group.as_ref().is_none_or(|g| g.rank() == 0);
    let opts = RunOptions {
        resume: args.resume,
        group,
        device,
        progress: !args.quiet && rank0,
        echo: rank0,
        inject_nan: args.inject_nan.as_deref().map(str::parse).transpose()?,
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

/// The device and the process-group backend of one rank of a data-parallel job. `device` is the
/// configured one: `cuda` (or `gpu`) without an index becomes `cuda:<local_rank>` (one GPU per
/// rank, as torchrun's LOCAL_RANK says); `cpu` and `cuda:N` stay. `dist_backend: auto` is NCCL
/// on CUDA when this binary has it, else Gloo.
fn rank_device(
    device: &str,
    local_rank: usize,
    backend: DistBackend,
) -> anyhow::Result<(String, Backend)> {
    let name = device.trim().to_ascii_lowercase();
    let name = if name == "cuda" || name == "gpu" {
        format!("cuda:{local_rank}")
    } else {
        name
    };
    let cuda_index = match crossclr::device::parse_device(&name)? {
        tch::Device::Cuda(i) => Some(i),
        _ => None,
    };
    let backend = match (backend, cuda_index) {
        (DistBackend::Gloo, _) => Backend::Gloo,
        (DistBackend::Auto, Some(i)) if dist::nccl_available() => Backend::Nccl { cuda_index: i },
        (DistBackend::Auto, _) => Backend::Gloo,
        (DistBackend::Nccl, None) => anyhow::bail!(
            "dist_backend: nccl needs a CUDA device, but this rank runs on {name}; use \
             dist_backend=gloo on the CPU"
        ),
        (DistBackend::Nccl, Some(_)) if !dist::nccl_available() => anyhow::bail!(
            "dist_backend: nccl: this binary was built without NCCL (build.rs found no CUDA \
             runtime, CCCL or NCCL headers; scripts/setup.sh installs them with the torch wheel); \
             use dist_backend=gloo"
        ),
        (DistBackend::Nccl, Some(i)) => Backend::Nccl { cuda_index: i },
    };
    Ok((name, backend))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rank_on_the_cpu_uses_gloo_and_refuses_nccl() {
        let (d, b) = rank_device("cpu", 3, DistBackend::Auto).unwrap();
        assert_eq!((d.as_str(), b), ("cpu", Backend::Gloo));
        let (d, b) = rank_device(" CPU ", 0, DistBackend::Gloo).unwrap();
        assert_eq!((d.as_str(), b), ("cpu", Backend::Gloo));
        let e = rank_device("cpu", 0, DistBackend::Nccl)
            .unwrap_err()
            .to_string();
        assert!(e.contains("nccl needs a CUDA device"), "{e}");
    }

    #[test]
    fn a_rank_on_cuda_takes_its_local_rank_as_the_device() {
        if !tch::Cuda::is_available() {
            let e = rank_device("cuda", 1, DistBackend::Auto)
                .unwrap_err()
                .to_string();
            assert!(e.contains("cuda:1"), "{e}");
            return;
        }
        let (d, b) = rank_device("cuda", 0, DistBackend::Gloo).unwrap();
        assert_eq!((d.as_str(), b), ("cuda:0", Backend::Gloo));
        let (_, b) = rank_device("cuda:0", 5, DistBackend::Auto).unwrap();
        let want = if dist::nccl_available() {
            Backend::Nccl { cuda_index: 0 }
        } else {
            Backend::Gloo
        };
        assert_eq!(b, want);
    }
}
