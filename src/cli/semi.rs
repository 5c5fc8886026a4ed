//! `crossclr semi`: fine-tune on a class-balanced 1% / 10% labelled subset, test on the full val.
use crate::cli::finetune::{run_with, RecipeArgs};
use crate::cli::linear::OutputArgs;
use crossclr::eval::args::{DatasetArgs, EncoderArgs};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub data: DatasetArgs,
    #[command(flatten)]
    pub encoder: EncoderArgs,
    #[command(flatten)]
    pub output: OutputArgs,
    #[command(flatten)]
    pub recipe: RecipeArgs,
    /// Percentage of labelled training samples per class (e.g. 1 or 10); at least one per class.
    #[arg(long)]
    pub percent: f64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let fraction = crossclr::eval::semi::fraction_of_percent(args.percent)?;
    run_with(
        &args.data,
        &args.encoder,
        &args.output,
        &args.recipe,
        Some(fraction),
    )
}
