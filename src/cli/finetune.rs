//! `crossclr finetune`: supervised fine-tuning of the whole encoder (+ linear heads).
use crate::cli::linear::{encoder_setup, OutputArgs};
use crossclr::eval::args::{DatasetArgs, EncoderArgs};
use crossclr::eval::finetune::{self, BnMode, FinetuneConfig};

/// The fine-tuning recipe (shared by `finetune` and `semi`).
#[derive(clap::Args, Debug, Clone)]
pub struct RecipeArgs {
    #[arg(long, default_value_t = 100)]
    pub epochs: usize,
    #[arg(long, default_value_t = 0.1)]
    pub lr: f64,
    /// 0-based epochs where the lr is multiplied by 0.1 (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "80")]
    pub step: Vec<usize>,
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    #[arg(long, default_value_t = 1e-4)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f64,
    /// Evaluate every this many epochs (and at the last).
    #[arg(long, default_value_t = 5)]
    pub eval_interval: usize,
    /// Keep the encoder in eval mode while training (frozen BN statistics, no dropout): the
    /// AimCLR finetune_evaluation variant. Default: train mode (batch statistics, dropout).
    #[arg(long)]
    pub bn_eval: bool,
    /// Dropout of encoder blocks 2-10 in train mode.
    #[arg(long, default_value_t = 0.5)]
    pub dropout: f64,
    /// Augment the labelled samples (official crop + shear). Default: raw data (AimCLR).
    #[arg(long)]
    pub augment: bool,
    /// Clip the global gradient norm to this value.
    #[arg(long)]
    pub grad_clip: Option<f64>,
    /// Loader threads.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Hold out this fraction of the (labelled) training set as validation for model selection.
    #[arg(long, default_value_t = 0.0)]
    pub val_split: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl RecipeArgs {
    pub fn config(&self) -> FinetuneConfig {
        FinetuneConfig {
            epochs: self.epochs,
            lr: self.lr,
            steps: self.step.clone(),
            gamma: 0.1,
            momentum: self.momentum,
            weight_decay: self.weight_decay,
            batch_size: self.batch,
            eval_interval: self.eval_interval,
            seed: self.seed,
            bn: if self.bn_eval {
                BnMode::Eval
            } else {
                BnMode::Train
            },
            dropout: self.dropout,
            augment: self.augment,
            grad_clip: self.grad_clip,
            workers: self.workers,
        }
    }
}

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
}

/// Runs fine-tuning on all labels (`labelled` = None) or a labelled fraction, and prints.
pub fn run_with(
    data: &DatasetArgs,
    encoder: &EncoderArgs,
    output: &OutputArgs,
    recipe: &RecipeArgs,
    labelled: Option<f64>,
) -> anyhow::Result<()> {
    let device = output.device()?;
    let splits = data.open()?;
    let setup = encoder_setup(encoder, recipe.seed)?;
    let summary = finetune::run(
        splits,
        &setup,
        &recipe.config(),
        labelled,
        recipe.val_split,
        device,
        &output.options(),
    )?;
    for l in summary.lines() {
        println!("{l}");
    }
    if let Some(dir) = &output.work_dir {
        println!("  outputs in {}", dir.display());
    }
    Ok(())
}

pub fn run(args: Args) -> anyhow::Result<()> {
    run_with(&args.data, &args.encoder, &args.output, &args.recipe, None)
}
