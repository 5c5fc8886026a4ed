//! `crossclr knn`: k-nearest-neighbour evaluation on pooled features.
use crate::cli::linear::{encoder_setup, OutputArgs};
use crossclr::eval::args::{Baseline, DatasetArgs, EncoderArgs};
use crossclr::eval::knn::KnnConfig;
use crossclr::eval::protocol;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub data: DatasetArgs,
    #[command(flatten)]
    pub encoder: EncoderArgs,
    #[command(flatten)]
    pub output: OutputArgs,
    /// Neighbours of the weighted vote (k = 1 is always reported too).
    #[arg(long, default_value_t = 20)]
    pub k: usize,
    /// Temperature of the vote weights exp(cosine / t).
    #[arg(long, default_value_t = 0.07)]
    pub temperature: f64,
    /// Seed of a random encoder (--weights none) and of the t-SNE subsample.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also evaluate this baseline with the same streams and data, print both side by side and
    /// write the baseline's outputs into <work_dir>/baseline_random.
    #[arg(long, value_enum)]
    pub baseline: Option<Baseline>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let device = args.output.device()?;
    let splits = args.data.open()?;
    let setup = encoder_setup(&args.encoder, args.seed)?;
    let configs = [
        KnnConfig::nearest(),
        KnnConfig {
            k: args.k,
            temperature: Some(args.temperature),
        },
    ];
    let opts = args.output.options();
    if args.baseline == Some(Baseline::Random) {
        if setup.weights.is_some() {
            let cmp = protocol::run_knn_with_baseline(&splits, &setup, &configs, device, &opts)?;
            print_summary(&cmp.trained);
            print_summary(&cmp.random);
            println!();
            for l in cmp.lines() {
                println!("{l}");
            }
            if let Some(dir) = &args.output.work_dir {
                println!("  {}", protocol::baseline_outputs_line(dir));
            }
            return Ok(());
        }
        println!("--baseline random: --weights none is itself the random encoder");
    }
    let s = protocol::run_knn(&splits, &setup, &configs, device, &opts)?;
    print_summary(&s);
    Ok(())
}

fn print_summary(s: &protocol::KnnSummary) {
    println!(
        "knn ({}; streams {}): bank {} train samples, {} test samples",
        s.weights,
        s.streams
            .iter()
            .map(|x| x.name())
            .collect::<Vec<_>>()
            .join(","),
        s.bank_samples,
        s.test_samples
    );
    for (label, m) in &s.results {
        println!(
            "  {label:>10}: top-1 {:6.2}%  mean-class {:6.2}%",
            m.top1, m.mean_class
        );
    }
}
