//! Stream encoders for evaluation: one ST-GCN per stream (view), with weights taken from a
//! checkpoint under the stream's prefix (our safetensors or an official `.pt`), or randomly
//! initialised (`--weights none`: the supervised-from-scratch baseline of fine-tuning).
//!
//! A stream's input is computed from the joint data with [`apply_view`], as the official CrosSCLR
//! model does; so a SkeletonCLR pre-trained on motion is evaluated with `--streams motion` (its
//! only query encoder, `encoder_q.`, is found in the file; [`crate::model::weights::prefix`]) and
//! really sees motion (the official linear evaluation silently feeds it joints).
use crate::data::layout::Layout;
use crate::data::views::{apply_view, View};
use crate::error::{Error, Result};
use crate::model::graph::NUM_PARTITIONS;
use crate::model::stgcn::{StGcn, StGcnConfig};
use crate::model::weights::prefix::{detect_prefix, encoder_prefixes};
use crate::model::weights::{encoder::infer_config, load_into, read_state_dict};
use std::collections::HashMap;
use std::path::Path;
use tch::nn::VarStore;
use tch::{Device, Tensor};

/// One evaluated stream: its view of the joint data and the key prefix of its encoder.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StreamSpec {
    pub view: View,
    /// e.g. `encoder_q.`, `encoder_q_motion.`: given with `--prefix`, else the view's default
    /// until [`build_encoders`] detects the encoder in the file
    /// ([`crate::model::weights::prefix`]).
    pub prefix: String,
    /// Whether `prefix` was given (`--prefix`); if not, it is detected from the weights file.
    #[serde(skip)]
    pub given: bool,
}

impl StreamSpec {
    pub fn name(&self) -> &'static str {
        self.view.name()
    }
}

/// The query-encoder prefix of a view in our (and the official CrosSCLR) checkpoints.
pub fn default_prefix(view: View) -> &'static str {
    match view {
        View::Joint => "encoder_q.",
        View::Motion => "encoder_q_motion.",
        View::Bone => "encoder_q_bone.",
        View::BoneMotion => "encoder_q_bone_motion.",
    }
}

/// Parses `--streams joint,motion,bone` and the `--prefix` values: either one per stream in order
/// (`encoder_q.`) or keyed (`motion=encoder_q.`); unnamed streams get [`default_prefix`].
pub fn parse_streams(streams: &str, prefixes: &[String]) -> Result<Vec<StreamSpec>> {
    let views: Vec<View> = streams
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::parse)
        .collect::<Result<_>>()?;
    if views.is_empty() {
        return Err(Error::config(
            "--streams: name at least one of joint, motion, bone, bone_motion",
        ));
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(v) = views.iter().find(|v| !seen.insert(**v)) {
        return Err(Error::config(format!("--streams: {v} is named twice")));
    }
    let mut specs: Vec<StreamSpec> = views
        .iter()
        .map(|&view| StreamSpec {
            view,
            prefix: default_prefix(view).to_string(),
            given: false,
        })
        .collect();
    let keyed = prefixes.iter().any(|p| p.contains('='));
    if keyed {
        for p in prefixes {
            let (stream, prefix) = p.split_once('=').ok_or_else(|| {
                Error::config(format!(
                    "--prefix {p}: mix of keyed and positional prefixes"
                ))
            })?;
            let view: View = stream.trim().parse()?;
            let spec = specs.iter_mut().find(|s| s.view == view).ok_or_else(|| {
                Error::config(format!("--prefix {p}: stream {view} is not in --streams"))
            })?;
            spec.prefix = prefix.to_string();
            spec.given = true;
        }
    } else if !prefixes.is_empty() {
        if prefixes.len() != specs.len() {
            return Err(Error::config(format!(
                "--prefix: {} values for {} streams (give one per stream, or stream=prefix)",
                prefixes.len(),
                specs.len()
            )));
        }
        for (s, p) in specs.iter_mut().zip(prefixes) {
            s.prefix = p.clone();
            s.given = true;
        }
    }
    Ok(specs)
}

/// A stream's encoder with its own variable store.
pub struct StreamEncoder {
    pub spec: StreamSpec,
    pub vs: VarStore,
    pub net: StGcn,
    pub config: StGcnConfig,
}

impl StreamEncoder {
    /// `x` joint data `(N, C, T, V, M)` -> pooled features `(N, D)` of this stream's view.
    /// `train`: batch-statistics BN and dropout (fine-tuning); otherwise eval mode.
    pub fn forward(&self, x: &Tensor, layout: &Layout, train: bool) -> Tensor {
        self.net
            .forward(&apply_view(self.spec.view, x, layout), train)
    }

    pub fn out_dim(&self) -> i64 {
        self.net.out_dim()
    }
}

/// Where encoder weights come from.
#[derive(Debug, Clone, PartialEq)]
pub enum WeightsSource<'a> {
    /// A checkpoint (`.safetensors` or official `.pt`); the encoder config is read off the shapes.
    File(&'a Path),
    /// Random official initialisation with this config (`in_channels` is set from the data).
    Random(&'a StGcnConfig),
}

/// Builds one encoder per stream on `device`. From a file: each stream's variables come from the
/// keys under its prefix (`fc.*` skipped); a missing encoder variable or an extra key is an error
/// naming the file. `dropout` overrides the checkpoint's (it only acts in train mode).
pub fn build_encoders(
    source: WeightsSource,
    streams: &[StreamSpec],
    layout: &Layout,
    in_channels: i64,
    dropout: f64,
    device: Device,
) -> Result<Vec<StreamEncoder>> {
    let tensors = match source {
        WeightsSource::File(path) => Some(read_state_dict(path)?),
        WeightsSource::Random(_) => None,
    };
    let mut out = Vec::new();
    for spec in streams {
        let mut spec = spec.clone();
        if let (WeightsSource::File(path), Some(tensors), false) = (&source, &tensors, spec.given) {
            let found = encoder_prefixes(tensors.iter().map(|(k, _)| k.as_str()));
            let d = detect_prefix(&found, &spec.prefix)
                .map_err(|e| Error::input(path, format!("stream {}", spec.name()), e))?;
            eprintln!(
                "stream {}: encoder '{}' of {} ({}; --prefix chooses another)",
                spec.name(),
                d.prefix,
                path.display(),
                d.reason
            );
            spec.prefix = d.prefix;
        }
        let config = match (&source, &tensors) {
            (WeightsSource::File(path), Some(tensors)) => {
                let stripped: Vec<(String, &Tensor)> = tensors
                    .iter()
                    .filter_map(|(k, t)| {
                        let k = k.strip_prefix("module.").unwrap_or(k);
                        k.strip_prefix(spec.prefix.as_str())
                            .map(|s| (s.to_string(), t))
                    })
                    .collect();
                if stripped.is_empty() {
                    let mut prefixes: Vec<String> = tensors
                        .iter()
                        .filter_map(|(k, _)| k.split_once('.').map(|p| format!("{}.", p.0)))
                        .collect();
                    prefixes.sort();
                    prefixes.dedup();
                    return Err(Error::input(
                        path,
                        "keys",
                        format!(
                            "no key starts with '{}' (stream {}); prefixes in the file: {}",
                            spec.prefix,
                            spec.name(),
                            prefixes.join(" ")
                        ),
                    ));
                }
                let sd: HashMap<&str, &Tensor> =
                    stripped.iter().map(|(k, t)| (k.as_str(), *t)).collect();
                let mut cfg = infer_config(&sd, NUM_PARTITIONS as i64, path)?;
                cfg.dropout = dropout;
                cfg
            }
            (WeightsSource::Random(cfg), _) => StGcnConfig {
                in_channels,
                dropout,
                ..(*cfg).clone()
            },
            _ => unreachable!("tensors are read exactly for WeightsSource::File"),
        };
        if config.in_channels != in_channels {
            return Err(Error::config(format!(
                "stream {}: the encoder takes {} input channels but the data has {in_channels}",
                spec.name(),
                config.in_channels
            )));
        }
        let mut vs = VarStore::new(device);
        let net = StGcn::new(&vs.root(), &config, layout);
        if let (WeightsSource::File(path), Some(tensors)) = (&source, &tensors) {
            let report =
                load_into(&mut vs, tensors, Some(&spec.prefix), &["fc."]).map_err(|e| {
                    Error::input(path, format!("stream {}", spec.name()), e.to_string())
                })?;
            // `A` follows from the layout; old checkpoints have no `num_batches_tracked`.
            let missing: Vec<&str> = report
                .missing
                .iter()
                .map(String::as_str)
                .filter(|m| *m != "A" && !m.ends_with("num_batches_tracked"))
                .collect();
            if !missing.is_empty() || !report.unexpected.is_empty() {
                return Err(Error::input(
                    path,
                    format!("prefix {}", spec.prefix),
                    format!(
                        "weights do not fit the encoder (layout {}): missing [{}], unexpected [{}]",
                        layout.name,
                        missing.join(", "),
                        report.unexpected.join(", ")
                    ),
                ));
            }
        }
        out.push(StreamEncoder {
            spec: spec.clone(),
            vs,
            net,
            config,
        });
    }
    Ok(out)
}
