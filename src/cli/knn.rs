//! `crossclr knn`: k-nearest-neighbour evaluation on pooled features.
use crate::cli::linear::{encoder_setup, OutputArgs};
use crossclr::eval::args::{DatasetArgs, EncoderArgs};
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
    let s = protocol::run_knn(&splits, &setup, &configs, device, &args.output.options())?;
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
    Ok(())
}
