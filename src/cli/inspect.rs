//! `crossclr inspect <file|dir>`: shape, dtype, labels and value statistics of any file the tool reads.
use crossclr::data::formats::inspect;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// A .npy, .pkl, .npz, .skeleton or MSR .txt file, or a dataset folder.
    pub path: PathBuf,
    /// Layout for dataset checks (ntu25, kinect20, msr20 or a layout file).
    #[arg(long)]
    pub layout: Option<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    print!("{}", inspect::inspect(&args.path, args.layout.as_deref())?);
    Ok(())
}
