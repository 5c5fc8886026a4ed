//! `crossclr`: the command-line tool. Each subcommand's arguments and handler live in `src/cli/`.
use clap::{Parser, Subcommand};

mod cli;

#[derive(Parser)]
#[command(
    name = "crossclr",
    version,
    about = "CrosSCLR / SkeletonCLR skeleton action representation learning"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Fault injection for tests/kill_resume.rs: abort at the n-th pass of a crash point
    /// (`<point>:<n>`, see `crossclr::train::fault`).
    #[arg(long, global = true, hide = true)]
    crash_at: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Build training files (npy + pkl, 50-frame position.npy): raw NTU, MSR Action3D, or any
    /// supported format (`prepare generic --format pyskl|ucla-json|pku-mmd|kinetics-json`).
    Prepare(cli::prepare::Args),
    /// Print shape, dtype, label counts and value ranges of any dataset file the tool reads.
    Inspect(cli::inspect::Args),
    /// Generate the embedded procedural synthetic dataset.
    Synth(cli::synth::Args),
    /// Self-supervised pre-training (SkeletonCLR, CrosSCLR 2s/3s).
    Pretrain(cli::pretrain::Args),
    /// Data-parallel pre-training on this machine: `launch --nproc N -- pretrain <args>` starts N
    /// ranks with torchrun's variables, prefixes their output, and ends them all when one fails.
    Launch(cli::launch::Args),
    /// Write pooled encoder features (or projection-head outputs) of a dataset to .npy.
    Embed(cli::embed::Args),
    /// Linear evaluation on frozen, cached features.
    Linear(cli::linear::Args),
    /// k-nearest-neighbour evaluation (k=1 and weighted k=20) on pooled features.
    Knn(cli::knn::Args),
    /// Semi-supervised evaluation: fine-tune on a class-balanced 1% / 10% labelled subset.
    Semi(cli::semi::Args),
    /// Supervised fine-tuning of the whole encoder.
    Finetune(cli::finetune::Args),
    /// Fuse per-stream score files with weights.
    Ensemble(cli::ensemble::Args),
    /// Time one pre-training step.
    Bench(cli::bench::Args),
    /// The demo: synthetic data -> CrosSCLR pre-training -> linear evaluation.
    Demo(cli::demo::Args),
}

fn main() {
    let cli = Cli::parse();
    if let Some(spec) = &cli.crash_at {
        if let Err(e) = crossclr::train::fault::arm(spec) {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
    // Before any CUDA tensor exists and any thread starts: expandable segments unless the user
    // configured the CUDA allocator (less reserved memory with the step's side streams).
    crossclr::gpu::default_cuda_alloc_conf();
    // Before any tensor exists: reuse large CPU tensor blocks across steps (src/cpu_cache.rs).
    // `pretrain` and `bench` install it as their `kernels.cpu_cache*` keys say, after reading
    // them; the other commands with the defaults.
    if !matches!(
        cli.command,
        Command::Pretrain(_) | Command::Bench(_) | Command::Launch(_)
    ) {
        cli::install_cpu_cache(&Default::default());
    }
    let result = match cli.command {
        Command::Prepare(a) => cli::prepare::run(a),
        Command::Inspect(a) => cli::inspect::run(a),
        Command::Synth(a) => cli::synth::run(a),
        Command::Pretrain(a) => cli::pretrain::run(a),
        Command::Launch(a) => cli::launch::run(a),
        Command::Embed(a) => cli::embed::run(a),
        Command::Linear(a) => cli::linear::run(a),
        Command::Knn(a) => cli::knn::run(a),
        Command::Semi(a) => cli::semi::run(a),
        Command::Finetune(a) => cli::finetune::run(a),
        Command::Ensemble(a) => cli::ensemble::run(a),
        Command::Bench(a) => cli::bench::run(a),
        Command::Demo(a) => cli::demo::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
