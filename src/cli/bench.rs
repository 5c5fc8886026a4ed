//! `crossclr bench`: time one pre-training step (see `crossclr::bench`).
use clap::ValueEnum;
use crossclr::bench::{self, BenchConfig, BenchModel, StepKind, Tf32};

/// `on` / `off` switches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    On,
    Off,
}

impl Switch {
    fn on(self) -> bool {
        self == Switch::On
    }
}

#[derive(clap::Args)]
pub struct Args {
    /// Model: skeletonclr, crossclr2 (joint + motion) or crossclr3 (joint + motion + bone).
    #[arg(long, value_enum, default_value = "skeletonclr")]
    model: BenchModel,
    /// 1 = MoCo phase, 2 = CVC-KM phase (CrosSCLR only).
    #[arg(long, default_value_t = 1)]
    phase: u8,
    #[arg(long, default_value_t = 128)]
    batch: i64,
    /// cpu, cuda or cuda:N.
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
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// reference = the training loop's step; fast = the capture-safe multi-tensor step.
    #[arg(long, value_enum, default_value = "fast")]
    step: StepKind,
    /// Capture the (fast) step into a CUDA graph and replay it.
    #[arg(long, value_enum, default_value = "off")]
    graph: Switch,
    /// TF32 for cuBLAS and cuDNN: default leaves libtorch's defaults (matmul off, conv on).
    #[arg(long, value_enum, default_value = "default")]
    tf32: Tf32,
    /// cuDNN autotuning.
    #[arg(long, value_enum, default_value = "off")]
    cudnn_benchmark: Switch,
    /// Distinct random input batches rotated through.
    #[arg(long, default_value_t = 4)]
    inputs: usize,
    #[arg(long, default_value_t = 0)]
    seed: i64,
    /// Instead of timing: check the encoder on --device against the official fixture in DIR
    /// (tests/fixtures/official) and report the differences.
    #[arg(long, value_name = "DIR")]
    parity_fixture: Option<std::path::PathBuf>,
    /// Print one JSON object instead of a sentence.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let device = crossclr::device::parse_device(&args.device)?;
    if let Some(dir) = &args.parity_fixture {
        bench::apply_modes(device, args.tf32, false)?;
        let tf32 = format!("{:?}", args.tf32).to_lowercase();
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
        batch: args.batch,
        frames: args.frames,
        joints: args.joints,
        bodies: args.bodies,
        queue_size: args.queue_size,
        device,
        warmup: args.warmup,
        iters: args.iters,
        step: args.step,
        graph: args.graph.on(),
        tf32: args.tf32,
        cudnn_benchmark: args.cudnn_benchmark.on(),
        inputs: args.inputs,
        seed: args.seed,
    };
    let report = bench::run(&cfg)?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{}", report.summary());
    }
    Ok(())
}
