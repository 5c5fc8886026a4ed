//! Command-line arguments shared by every evaluation protocol (`linear`, `knn`, `semi`, `finetune`):
//! which datasets (train / val), which encoder weights and streams, which device.
use crate::data::dataset::SkeletonDataset;
use crate::data::formats::{self, DatasetFormat, DatasetSpec};
use crate::error::{Error, Result};
use crate::eval::encoder::{parse_streams, StreamSpec};
use crate::eval::report;
use std::path::{Path, PathBuf};

/// Where the train and val splits come from. Give exactly one of: `--config`, `--data-dir`, or
/// `--train-data/--train-label/--val-data/--val-label`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct DatasetArgs {
    /// YAML naming the splits: `train:`/`val:` DatasetSpec mappings (format, data, label, layout,
    /// part), or the official `train_feeder_args`/`test_feeder_args` with `data_path`/`label_path`.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// A folder with `train_data.npy`, `train_label.pkl`, `val_data.npy`, `val_label.pkl`
    /// (e.g. written by `crossclr synth`; `{train,val}_position.npy` when there is no
    /// `_data.npy`, as `crossclr prepare generic` writes); its `dataset.toml` names the layout.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Training data (`.npy` N x C x T x V x M, `.npz`, or an MSR folder with --format msr).
    #[arg(long)]
    pub train_data: Option<PathBuf>,
    /// Training labels (`(names, labels)` pickle).
    #[arg(long)]
    pub train_label: Option<PathBuf>,
    /// Evaluation data.
    #[arg(long)]
    pub val_data: Option<PathBuf>,
    /// Evaluation labels.
    #[arg(long)]
    pub val_label: Option<PathBuf>,
    /// Reader: npy (ST-GCN / frame50 / generic), ctrgcn_npz, msr.
    #[arg(long, default_value = "npy")]
    pub format: String,
    /// Joint layout: ntu25, kinect20, msr20 or a layout file (default: the data folder's
    /// dataset.toml, else ntu25).
    #[arg(long)]
    pub layout: Option<String>,
}

/// The two splits of an evaluation, with class names.
pub struct Splits {
    pub train: SkeletonDataset,
    pub val: SkeletonDataset,
    /// One name per class (`classes.txt` next to the data, else the index).
    pub class_names: Vec<String>,
}

fn parse_format(s: &str) -> Result<DatasetFormat> {
    serde_yaml::from_str(s)
        .map_err(|_| Error::config(format!("--format {s}: expected npy, ctrgcn_npz or msr")))
}

/// Layout named by `<dir>/dataset.toml` (`layout = "..."`, a relative file resolved against dir).
fn layout_from_dataset_toml(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("dataset.toml")).ok()?;
    let value: toml::Value = toml::from_str(&text).ok()?;
    let layout = value.get("layout")?.as_str()?.to_string();
    let as_file = dir.join(&layout);
    Some(if as_file.is_file() {
        as_file.display().to_string()
    } else {
        layout
    })
}

/// `num_classes` declared in `<dir>/dataset.toml`, when present.
fn classes_from_dataset_toml(dir: &Path) -> Option<usize> {
    let text = std::fs::read_to_string(dir.join("dataset.toml")).ok()?;
    let value: toml::Value = toml::from_str(&text).ok()?;
    value.get("num_classes")?.as_integer().map(|k| k as usize)
}

#[derive(serde::Deserialize)]
struct SplitConfig {
    train: DatasetSpec,
    val: DatasetSpec,
}

#[derive(serde::Deserialize)]
struct FeederArgs {
    data_path: PathBuf,
    label_path: PathBuf,
}

#[derive(serde::Deserialize)]
struct OfficialConfig {
    train_feeder_args: FeederArgs,
    test_feeder_args: FeederArgs,
}

impl DatasetArgs {
    /// The two dataset specs these arguments name.
    pub fn specs(&self) -> Result<(DatasetSpec, DatasetSpec)> {
        let explicit = self.train_data.is_some() || self.val_data.is_some();
        let given = [self.config.is_some(), self.data_dir.is_some(), explicit]
            .iter()
            .filter(|b| **b)
            .count();
        if given != 1 {
            return Err(Error::config(
                "name the datasets with exactly one of --config, --data-dir, or --train-data/--train-label/--val-data/--val-label",
            ));
        }
        let format = parse_format(&self.format)?;
        let spec = |data: &Path, label: Option<PathBuf>, layout: String, part: &str| DatasetSpec {
            format,
            data: data.to_path_buf(),
            label,
            layout,
            part: Some(part.to_string()).filter(|_| format != DatasetFormat::Npy),
            mmap: true,
        };
        if let Some(cfg) = &self.config {
            let text = std::fs::read_to_string(cfg).map_err(|e| Error::io(cfg, e))?;
            crate::data::limits::check_yaml_text(&text, cfg)?;
            if let Ok(mut s) = serde_yaml::from_str::<SplitConfig>(&text) {
                if let Some(l) = &self.layout {
                    s.train.layout = l.clone();
                    s.val.layout = l.clone();
                }
                return Ok((s.train, s.val));
            }
            let o: OfficialConfig = serde_yaml::from_str(&text).map_err(|e| {
                Error::input(cfg, "yaml", format!("expected train:/val: dataset specs or train_feeder_args/test_feeder_args: {e}"))
            })?;
            let layout = self.layout.clone().unwrap_or_else(|| "ntu25".into());
            return Ok((
                spec(
                    &o.train_feeder_args.data_path,
                    Some(o.train_feeder_args.label_path),
                    layout.clone(),
                    "train",
                ),
                spec(
                    &o.test_feeder_args.data_path,
                    Some(o.test_feeder_args.label_path),
                    layout,
                    "test",
                ),
            ));
        }
        if let Some(dir) = &self.data_dir {
            let layout = self
                .layout
                .clone()
                .or_else(|| layout_from_dataset_toml(dir))
                .unwrap_or_else(|| "ntu25".into());
            // `<part>_data.npy`, else `<part>_position.npy` (what `prepare generic` writes).
            let data = |part: &str| {
                let d = dir.join(format!("{part}_data.npy"));
                let p = dir.join(format!("{part}_position.npy"));
                if !d.exists() && p.exists() {
                    p
                } else {
                    d
                }
            };
            return Ok((
                spec(
                    &data("train"),
                    Some(dir.join("train_label.pkl")),
                    layout.clone(),
                    "train",
                ),
                spec(
                    &data("val"),
                    Some(dir.join("val_label.pkl")),
                    layout,
                    "test",
                ),
            ));
        }
        let need = |p: &Option<PathBuf>, flag: &str| {
            p.clone()
                .ok_or_else(|| Error::config(format!("{flag} is required")))
        };
        let train_data = need(&self.train_data, "--train-data")?;
        let val_data = need(&self.val_data, "--val-data")?;
        let (train_label, val_label) = if format == DatasetFormat::Npy {
            (
                Some(need(&self.train_label, "--train-label")?),
                Some(need(&self.val_label, "--val-label")?),
            )
        } else {
            (self.train_label.clone(), self.val_label.clone())
        };
        let layout = self
            .layout
            .clone()
            .or_else(|| train_data.parent().and_then(layout_from_dataset_toml))
            .unwrap_or_else(|| "ntu25".into());
        Ok((
            spec(&train_data, train_label, layout.clone(), "train"),
            spec(&val_data, val_label, layout, "test"),
        ))
    }

    /// Opens both splits; both get the larger class count (a split may lack the last classes).
    pub fn open(&self) -> Result<Splits> {
        let (train_spec, val_spec) = self.specs()?;
        let mut train = formats::open(&train_spec)?;
        let mut val = formats::open(&val_spec)?;
        // Frames and bodies may differ (the encoder pools them); coordinates and joints may not.
        if train.shape[1] != val.shape[1] || train.shape[3] != val.shape[3] {
            return Err(Error::input(
                &val_spec.data,
                "shape",
                format!(
                    "samples are {:?}, the training set's are {:?}",
                    &val.shape[1..],
                    &train.shape[1..]
                ),
            ));
        }
        let dir = train_spec
            .data
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let declared = self
            .data_dir
            .as_deref()
            .and_then(classes_from_dataset_toml)
            .unwrap_or(0);
        let k = train.num_classes.max(val.num_classes).max(declared);
        train.num_classes = k;
        val.num_classes = k;
        let class_names = report::class_names_near(&dir.join("x"), k);
        Ok(Splits {
            train,
            val,
            class_names,
        })
    }
}

/// Encoder weights and streams.
#[derive(clap::Args, Debug, Clone)]
pub struct EncoderArgs {
    /// Pre-trained weights (`.safetensors` from `crossclr pretrain`, or an official `.pt`), or
    /// `none` for a randomly initialised encoder.
    #[arg(long)]
    pub weights: String,
    /// Streams to evaluate, comma-separated: joint, motion, bone, bone_motion. Each stream's input
    /// is computed from the joint data.
    #[arg(long, default_value = "joint")]
    pub streams: String,
    /// Key prefix of each stream's encoder in the weights: one per stream in order (`encoder_q.`)
    /// or `stream=prefix` (repeatable). Default: detected from the file, the same way in every
    /// command: the stream's query encoder (joint `encoder_q.`, motion `encoder_q_motion.`, bone
    /// `encoder_q_bone.`), else the file's only encoder or only query encoder (a SkeletonCLR
    /// trained on motion, `--streams motion`, reads its `encoder_q.`); the choice is printed.
    #[arg(long = "prefix")]
    pub prefixes: Vec<String>,
    /// Hidden channels of a random encoder (`--weights none`); files give their own.
    #[arg(long, default_value_t = 16)]
    pub hidden_channels: i64,
    /// Output feature dimension of a random encoder.
    #[arg(long, default_value_t = 256)]
    pub hidden_dim: i64,
    /// Recompute every batch norm's running statistics on the un-augmented training split before
    /// extracting features ("precise BN"; ours, the official protocol keeps the stored ones).
    /// The stored statistics come from augmented pre-training batches (a random encoder's from
    /// the init: mean 0, variance 1), which can squash eval-mode features onto one direction.
    #[arg(long)]
    pub recalibrate_bn: bool,
}

impl EncoderArgs {
    pub fn streams(&self) -> Result<Vec<StreamSpec>> {
        parse_streams(&self.streams, &self.prefixes)
    }

    /// `None` for `--weights none`.
    pub fn weights_path(&self) -> Option<PathBuf> {
        (!self.weights.eq_ignore_ascii_case("none")).then(|| PathBuf::from(&self.weights))
    }
}

/// `--baseline`: a reference encoder evaluated next to the given one with the same streams, data
/// and recipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Baseline {
    /// A randomly initialised encoder, built exactly as `--weights none` builds it (the
    /// `--hidden-channels` / `--hidden-dim` config, seeded by `--seed`).
    Random,
}
