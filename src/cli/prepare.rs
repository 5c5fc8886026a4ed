//! `crossclr prepare ntu60|ntu120|msr --raw <dir> --out <dir>`.
use crossclr::data::msr;
use crossclr::data::prepare::{self, Benchmark, OnError, PrepareConfig};
use crossclr::data::preprocess::ResizeRule;
use std::io::IsTerminal;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Dataset: ntu60, ntu120 (raw .skeleton folder) or msr (MSR Action3D real_world_coordinates folder).
    pub dataset: String,
    /// Folder of raw files.
    #[arg(long)]
    pub raw: PathBuf,
    /// Output folder. NTU: <out>/<benchmark>/{train,val}_{data.npy,label.pkl,position.npy};
    /// MSR: <out>/{train,val}_{position.npy,label.pkl} (cross-subject; read with layout msr20).
    #[arg(long)]
    pub out: PathBuf,
    /// Comma-separated benchmarks (NTU-60: xsub,xview; NTU-120: xsub,xset). Default: both.
    #[arg(long, value_delimiter = ',')]
    pub benchmarks: Option<Vec<String>>,
    /// What to do with a corrupt file: skip (report it and leave it out) or fail.
    #[arg(long, default_value = "skip")]
    pub on_error: String,
    /// Worker threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Frames of the preprocessed *_position.npy.
    #[arg(long, default_value_t = prepare::DEFAULT_OUT_FRAMES)]
    pub frames: usize,
    /// Frames of the zero-padded *_data.npy (longer files are cut and reported).
    #[arg(long, default_value_t = prepare::RAW_FRAMES)]
    pub max_frames: usize,
    /// Resize arithmetic: ipp (as the opencv-python wheels compute it, default) or generic
    /// (OpenCV without IPP, the rule of the reference doc); they differ in the last bits.
    #[arg(long, default_value = "ipp")]
    pub resize: String,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.dataset == "msr" {
        let (train, val) = msr::prepare_msr(&args.raw, &args.out, args.frames)?;
        println!(
            "MSR Action3D cross-subject (557 used sequences): train {train}, val {val} -> {} (layout msr20)",
            args.out.display()
        );
        return Ok(());
    }
    let version: prepare::NtuVersion = args.dataset.parse()?;
    let mut cfg = PrepareConfig::new(version, &args.raw, &args.out);
    if let Some(b) = &args.benchmarks {
        cfg.benchmarks = b
            .iter()
            .map(|s| s.parse::<Benchmark>())
            .collect::<Result<_, _>>()?;
    }
    cfg.on_error = args.on_error.parse::<OnError>()?;
    cfg.threads = args.threads;
    cfg.out_frames = args.frames;
    cfg.max_frames = args.max_frames;
    cfg.progress = std::io::stderr().is_terminal();
    cfg.resize = match args.resize.as_str() {
        "ipp" => ResizeRule::OpencvIpp,
        "generic" => ResizeRule::OpencvGeneric,
        o => anyhow::bail!("unknown --resize {o:?} (ipp | generic)"),
    };
    let summary = prepare::prepare_ntu(&cfg)?;
    print!("{summary}");
    Ok(())
}
