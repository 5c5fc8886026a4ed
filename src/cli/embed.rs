//! `crossclr embed`: pooled eval-mode encoder features (or projection-head outputs) of an
//! `(N, C, T, V, M)` float32 `.npy`, written as an `(N, D)` float32 `.npy`.
use anyhow::Context;
use crossclr::data::layout::Layout;
use crossclr::data::npy;
use crossclr::device::parse_device;
use crossclr::model::weights::{EmbedLayer, LoadedEncoder};
use std::path::PathBuf;
use tch::Tensor;

#[derive(clap::Args)]
pub struct Args {
    /// Weights: an official `.pt` state dict / checkpoint or a safetensors file.
    #[arg(long)]
    pub weights: PathBuf,
    /// Input skeletons `(N, C, T, V, M)` float32 `.npy`.
    #[arg(long)]
    pub input: PathBuf,
    /// Output `.npy` `(N, D)` float32.
    #[arg(long)]
    pub output: PathBuf,
    /// Key prefix of the encoder in the weights (e.g. `encoder_q.`, `encoder_q_bone.`, `""` for a
    /// bare encoder). Default: detected from the file as in every command (the joint query
    /// encoder, the only encoder, or the only query encoder). `module.` is removed automatically.
    #[arg(long)]
    pub prefix: Option<String>,
    /// `features` (pooled backbone output, hidden_dim wide) or `projection` (the `fc` head).
    #[arg(long, default_value = "features", value_parser = ["features", "projection"])]
    pub layer: String,
    /// Skeleton layout name (`ntu25`, `kinect20`, `msr20`) or a layout file.
    #[arg(long, default_value = "ntu25")]
    pub layout: String,
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let device = parse_device(&args.device)?;
    let layout = Layout::resolve(&args.layout)?;
    let layer = if args.layer == "projection" {
        EmbedLayer::Projection
    } else {
        EmbedLayer::Features
    };
    anyhow::ensure!(args.batch > 0, "--batch must be positive");
    let enc = LoadedEncoder::load(
        &args.weights,
        args.prefix.as_deref(),
        &layout,
        device,
        layer == EmbedLayer::Projection,
    )?;
    if let Some(why) = enc.detected {
        eprintln!(
            "encoder '{}' of {} ({why}; --prefix chooses another)",
            enc.prefix,
            args.weights.display()
        );
    }
    let (shape, data) = npy::mmap_f32(&args.input)?;
    let data = data.as_slice();
    if shape.len() != 5
        || shape[3] != layout.num_joints()
        || shape[1] as i64 != enc.config.in_channels
    {
        anyhow::bail!(
            "{}: shape {shape:?}: expected (N, {}, T, {}, M) for layout {} and these weights",
            args.input.display(),
            enc.config.in_channels,
            layout.num_joints(),
            layout.name
        );
    }
    let n = shape[0];
    let sample: usize = shape[1..].iter().product();
    let dims: Vec<i64> = shape[1..].iter().map(|&d| d as i64).collect();
    let bar = indicatif::ProgressBar::new(n as u64);
    let mut out: Vec<f32> = Vec::new();
    let mut width = 0usize;
    for start in (0..n).step_by(args.batch) {
        let end = (start + args.batch).min(n);
        let mut batch_shape = vec![(end - start) as i64];
        batch_shape.extend(&dims);
        let x = Tensor::from_slice(&data[start * sample..end * sample])
            .view(batch_shape.as_slice())
            .to_device(device);
        let y = enc
            .embed(&x, layer)
            .to_device(tch::Device::Cpu)
            .to_kind(tch::Kind::Float)
            .contiguous();
        width = y.size()[1] as usize;
        let v: Vec<f32> = Vec::try_from(y.flatten(0, -1)).context("copying embeddings")?;
        out.extend(v);
        bar.inc((end - start) as u64);
    }
    bar.finish_and_clear();
    npy::write_f32(&args.output, &[n, width], &out)?;
    eprintln!("wrote {} x {width} to {}", n, args.output.display());
    Ok(())
}
