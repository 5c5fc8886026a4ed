//! `crossclr embed`.

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`crossclr embed` is not implemented yet")
}
