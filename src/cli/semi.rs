//! `crossclr semi`.

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`crossclr semi` is not implemented yet")
}
