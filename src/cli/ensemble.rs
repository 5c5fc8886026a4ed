//! `crossclr ensemble`: fuse per-stream score files (weighted sum) and report top-1 / top-5.
use crossclr::data::pickle;
use crossclr::eval::ensemble::{self, WeightedScores, BONE_WEIGHT, JOINT_WEIGHT, MOTION_WEIGHT};
use crossclr::eval::report;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// A score file `(N, classes)` .npy with its weight: `path.npy:0.6` (weight 1 without `:w`).
    /// Repeatable.
    #[arg(long = "scores")]
    pub scores: Vec<WeightedScores>,
    /// Joint-stream scores (weight --joint-weight).
    #[arg(long)]
    pub joint: Option<PathBuf>,
    /// Bone-stream scores (weight --bone-weight).
    #[arg(long)]
    pub bone: Option<PathBuf>,
    /// Motion-stream scores (weight --motion-weight).
    #[arg(long)]
    pub motion: Option<PathBuf>,
    #[arg(long, default_value_t = JOINT_WEIGHT)]
    pub joint_weight: f64,
    #[arg(long, default_value_t = BONE_WEIGHT)]
    pub bone_weight: f64,
    #[arg(long, default_value_t = MOTION_WEIGHT)]
    pub motion_weight: f64,
    /// Label file of the evaluated split (`(names, labels)` pickle), rows in the score files' order.
    #[arg(long)]
    pub label: PathBuf,
    /// Where to write the fused scores, confusion matrix and metrics.json (optional).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut files = args.scores.clone();
    for (path, weight) in [
        (&args.joint, args.joint_weight),
        (&args.bone, args.bone_weight),
        (&args.motion, args.motion_weight),
    ] {
        if let Some(p) = path {
            files.push(WeightedScores {
                path: p.clone(),
                weight,
            });
        }
    }
    anyhow::ensure!(
        !files.is_empty(),
        "give score files with --scores path.npy:w or --joint/--bone/--motion"
    );
    let (names, labels) = pickle::read_labels(&args.label)?;
    let fused = ensemble::fuse_files(&files, Some(&names))?;
    let classes = fused.size()[1] as usize;
    for f in &files {
        println!("  {:>6.3} x {}", f.weight, f.path.display());
    }
    let m = match &args.work_dir {
        Some(dir) => {
            let class_names = report::class_names_near(&args.label, classes);
            let (m, _) =
                report::write_scores(dir, "", &fused, &labels, &names, &class_names, "ensemble")?;
            let inputs: Vec<serde_json::Value> = files
                .iter()
                .map(|f| serde_json::json!({"path": f.path, "weight": f.weight}))
                .collect();
            report::write_json(
                &dir.join("metrics.json"),
                &serde_json::json!({"protocol": "ensemble", "inputs": inputs, "test": m}),
            )?;
            m
        }
        None => crossclr::eval::metrics::evaluate(&fused, &labels)?,
    };
    println!(
        "ensemble of {} streams on {} samples: top-1 {:.2}%  top-5 {:.2}%  mean-class {:.2}%",
        files.len(),
        m.samples,
        m.top1,
        m.top5,
        m.mean_class
    );
    Ok(())
}
