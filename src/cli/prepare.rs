//! `crossclr prepare ntu60|ntu120|msr --raw <dir> --out <dir>` and
//! `crossclr prepare generic --format <reader> --raw <file|dir> --out <dir> [--layout ...]`.
use crossclr::data::generic::{self, GenericConfig};
use crossclr::data::msr;
use crossclr::data::prepare::{self, Benchmark, OnError, PrepareConfig};
use crossclr::data::preprocess::ResizeRule;
use std::io::IsTerminal;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Dataset: ntu60, ntu120 (raw .skeleton folder), msr (MSR Action3D real_world_coordinates
    /// folder), or generic (any reader of --format).
    pub dataset: String,
    /// Folder (or, for --format pyskl, file) of raw data.
    #[arg(long)]
    pub raw: PathBuf,
    /// Output folder. NTU: <out>/<benchmark>/{train,val}_{data.npy,label.pkl,position.npy};
    /// MSR: <out>/{train,val}_{position.npy,label.pkl} (cross-subject; read with layout msr20);
    /// generic: <out>/{train,val}_{position.npy,label.pkl} + dataset.toml (names the layout).
    #[arg(long)]
    pub out: PathBuf,
    /// generic: the reader: pyskl (annotation pickle), ucla-json (NW-UCLA per-sample JSON,
    /// CTR-GCN form), pku-mmd (skeleton text + --labels), kinetics-json (ST-GCN Kinetics-skeleton).
    #[arg(long)]
    pub format: Option<String>,
    /// generic: layout name (ntu25, pku25, kinect20, msr20, coco17, openpose18) or layout file;
    /// default: the format's (ucla-json kinect20, pku-mmd pku25, kinetics-json openpose18).
    #[arg(long)]
    pub layout: Option<String>,
    /// generic, pku-mmd: folder of label files (action_id,start,end,confidence per line).
    #[arg(long)]
    pub labels: Option<PathBuf>,
    /// generic: bodies kept (M).
    #[arg(long, default_value_t = 2)]
    pub bodies: usize,
    /// generic: per-sample scaling after the preprocessing: none or minmax ([-1, 1] per channel).
    #[arg(long, default_value = "none")]
    pub normalize: String,
    /// generic: the split: pyskl: a benchmark prefix (xsub -> xsub_train / xsub_val) or
    /// TRAIN,VAL split names; pku-mmd: xview (default). Default: the dataset's own protocol.
    #[arg(long)]
    pub split: Option<String>,
    /// generic: a split file: a split column (`name,train|val|test` per line), a list of training
    /// sample names (one per line or comma-separated), or "Training ...:" / "Validation ...:"
    /// sections (PKU-MMD's cross-subject.txt).
    #[arg(long)]
    pub split_file: Option<PathBuf>,
    /// generic (2D data): keep the keypoint score as a third channel, as ST-GCN does.
    #[arg(long)]
    pub score_channel: bool,
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

fn resize_rule(s: &str) -> anyhow::Result<ResizeRule> {
    Ok(match s {
        "ipp" => ResizeRule::OpencvIpp,
        "generic" => ResizeRule::OpencvGeneric,
        o => anyhow::bail!("unknown --resize {o:?} (ipp | generic)"),
    })
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.dataset == "generic" {
        let format = args.format.as_deref().ok_or_else(|| {
            anyhow::anyhow!(
                "prepare generic needs --format (pyskl | ucla-json | pku-mmd | kinetics-json)"
            )
        })?;
        let mut cfg = GenericConfig::new(format.parse()?, &args.raw, &args.out);
        cfg.layout = args.layout.clone();
        cfg.labels = args.labels.clone();
        cfg.frames = args.frames;
        cfg.bodies = args.bodies;
        cfg.normalize = args.normalize.parse()?;
        cfg.split = args.split.clone();
        cfg.split_file = args.split_file.clone();
        cfg.score_channel = args.score_channel;
        cfg.on_error = args.on_error.parse::<OnError>()?;
        cfg.threads = args.threads;
        cfg.progress = std::io::stderr().is_terminal();
        cfg.resize = resize_rule(&args.resize)?;
        let summary = generic::prepare_generic(&cfg)?;
        print!("{summary}");
        return Ok(());
    }
    if args.format.is_some() {
        anyhow::bail!("--format is for `prepare generic`");
    }
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
    cfg.resize = resize_rule(&args.resize)?;
    let summary = prepare::prepare_ntu(&cfg)?;
    print!("{summary}");
    Ok(())
}
