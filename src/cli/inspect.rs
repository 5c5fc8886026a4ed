//! `crossclr inspect`.

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`crossclr inspect` is not implemented yet")
}
