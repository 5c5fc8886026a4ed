//! `crossclr knn`.

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`crossclr knn` is not implemented yet")
}
