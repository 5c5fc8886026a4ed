//! An ST-GCN encoder (and its projection head) built from a weights file: the configuration
//! (widths, temporal kernel, edge importance, head type) is read off the tensor shapes, so
//! official checkpoints and ours load without a config file.
use crate::data::layout::Layout;
use crate::error::{Error, Result};
use crate::model::head::{self, Head, Mlp};
use crate::model::stgcn::{StGcn, StGcnConfig};
use crate::model::weights::{load_into, read_state_dict};
use std::collections::HashMap;
use std::path::Path;
use tch::nn::VarStore;
use tch::{Device, Tensor};

/// Which output [`LoadedEncoder::embed`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmbedLayer {
    /// Pooled backbone features `(N, hidden_dim)`.
    Features,
    /// Projection-head (`fc`) output.
    Projection,
}

/// Encoder + optional head with their own variable store, in eval mode.
pub struct LoadedEncoder {
    pub vs: VarStore,
    pub net: StGcn,
    pub head: Option<Head>,
    pub config: StGcnConfig,
    /// The key prefix the encoder was read from (given, or detected: [`super::prefix`]).
    pub prefix: String,
    /// Why that prefix, when it was detected rather than given.
    pub detected: Option<&'static str>,
}

fn shape(sd: &HashMap<&str, &Tensor>, name: &str, file: &Path) -> Result<Vec<i64>> {
    sd.get(name).map(|t| t.size()).ok_or_else(|| {
        Error::input(
            file,
            format!("key '{name}'"),
            "missing: not an ST-GCN state dict under this prefix",
        )
    })
}

/// Reads the encoder configuration off the shapes of an (already prefix-stripped) state dict.
pub fn infer_config(
    sd: &HashMap<&str, &Tensor>,
    num_partitions: i64,
    file: &Path,
) -> Result<StGcnConfig> {
    let first = shape(sd, "st_gcn_networks.0.gcn.conv.weight", file)?;
    let last = shape(sd, "st_gcn_networks.9.tcn.2.weight", file)?;
    if first.len() != 4 || last.len() != 4 || first[0] % num_partitions != 0 {
        return Err(Error::input(
            file,
            "st_gcn_networks",
            format!("unexpected shapes {first:?}, {last:?}"),
        ));
    }
    Ok(StGcnConfig {
        in_channels: first[1],
        hidden_channels: first[0] / num_partitions,
        hidden_dim: last[0],
        dropout: 0.0,
        edge_importance: sd.contains_key("edge_importance.0"),
        temporal_kernel: last[2],
        // A file's data_bn is applied with its statistics (identity for a run that skipped it).
        data_bn: true,
    })
}

impl LoadedEncoder {
    /// Loads the encoder under `prefix` (e.g. `encoder_q.`, `""` for a bare encoder; `module.` is
    /// removed automatically) from `path` onto `device`; `None` detects it from the file as every
    /// command does ([`super::prefix::detect_prefix`]: the joint query encoder, the only encoder or
    /// the only query encoder, else an error naming the encoders). With `with_head`, the `fc` head is loaded too (a Linear
    /// `fc.weight` or the MLP `fc.0`/`fc.2`); it is an error if the weights hold none.
    /// Every encoder variable must be present.
    pub fn load(
        path: &Path,
        prefix: Option<&str>,
        layout: &Layout,
        device: Device,
        with_head: bool,
    ) -> Result<Self> {
        let tensors = read_state_dict(path)?;
        let (prefix, detected) = match prefix {
            Some(p) => (p.to_string(), None),
            None => {
                let found =
                    super::prefix::encoder_prefixes(tensors.iter().map(|(k, _)| k.as_str()));
                let d = super::prefix::detect_prefix(&found, "encoder_q.")
                    .map_err(|e| Error::input(path, "keys", e))?;
                (d.prefix, Some(d.reason))
            }
        };
        let strip = |n: &str| -> Option<String> {
            let n = n.strip_prefix("module.").unwrap_or(n);
            n.strip_prefix(prefix.as_str()).map(str::to_string)
        };
        let stripped: Vec<(String, &Tensor)> = tensors
            .iter()
            .filter_map(|(k, t)| strip(k).map(|s| (s, t)))
            .collect();
        if stripped.is_empty() {
            return Err(Error::input(
                path,
                "keys",
                format!("no key starts with prefix '{prefix}'"),
            ));
        }
        let sd: HashMap<&str, &Tensor> = stripped.iter().map(|(k, t)| (k.as_str(), *t)).collect();
        let config = infer_config(&sd, crate::model::graph::NUM_PARTITIONS as i64, path)?;
        let mut vs = VarStore::new(device);
        let net = StGcn::new(&vs.root(), &config, layout);
        let head = if with_head {
            let fc = vs.root() / "fc";
            if let Some(w) = sd.get("fc.weight") {
                let s = w.size();
                Some(Head::Linear(head::classifier(&fc, s[1], s[0])))
            } else if let (Some(w0), Some(w2)) = (sd.get("fc.0.weight"), sd.get("fc.2.weight")) {
                let (s0, s2) = (w0.size(), w2.size());
                Some(Head::Mlp(Mlp::new(&fc, s0[1], s0[0], s2[0])))
            } else {
                return Err(Error::input(
                    path,
                    "fc",
                    "no projection head (fc.weight or fc.0.weight/fc.2.weight) in the weights",
                ));
            }
        } else {
            None
        };
        let skip: &[&str] = if with_head { &[] } else { &["fc."] };
        let report = load_into(&mut vs, &tensors, Some(prefix.as_str()), skip)
            .map_err(|e| Error::input(path, "weights", e.to_string()))?;
        // `A` follows from the layout and `num_batches_tracked` is absent from old checkpoints.
        let missing: Vec<&String> = report
            .missing
            .iter()
            .filter(|m| *m != "A" && !m.ends_with("num_batches_tracked"))
            .collect();
        if !missing.is_empty() {
            let names: Vec<&str> = missing.iter().map(|s| s.as_str()).collect();
            return Err(Error::input(
                path,
                "weights",
                format!("missing variables: {}", names.join(", ")),
            ));
        }
        if !report.unexpected.is_empty() {
            return Err(Error::input(
                path,
                "weights",
                format!("unexpected keys: {}", report.unexpected.join(", ")),
            ));
        }
        Ok(LoadedEncoder {
            vs,
            net,
            head,
            config,
            prefix,
            detected,
        })
    }

    /// Eval-mode output for `x` `(N, C, T, V, M)`: `(N, hidden_dim)` features or the head output.
    pub fn embed(&self, x: &Tensor, layer: EmbedLayer) -> Tensor {
        tch::no_grad(|| {
            let f = self.net.forward(x, false);
            match (layer, &self.head) {
                (EmbedLayer::Projection, Some(h)) => h.forward(&f),
                _ => f,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::weights::save_safetensors;
    use tch::Kind;

    #[test]
    fn loads_prefixed_encoder_with_mlp_head_and_infers_config() {
        tch::manual_seed(1);
        let vs = VarStore::new(Device::Cpu);
        let cfg = StGcnConfig {
            hidden_channels: 4,
            hidden_dim: 24,
            dropout: 0.0,
            temporal_kernel: 5,
            ..Default::default()
        };
        let q = vs.root() / "encoder_q";
        let net = StGcn::new(&q, &cfg, &Layout::ntu25());
        let mlp = Mlp::new(&(&q / "fc"), 24, 24, 8);
        // Another encoder in the same file must not interfere.
        let _other = StGcn::new(&(vs.root() / "encoder_k"), &cfg, &Layout::ntu25());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ckpt.safetensors");
        save_safetensors(&vs, &path).unwrap();

        let x = Tensor::randn([3, 3, 10, 25, 2], (Kind::Float, Device::Cpu));
        let enc = LoadedEncoder::load(
            &path,
            Some("encoder_q."),
            &Layout::ntu25(),
            Device::Cpu,
            true,
        )
        .unwrap();
        assert_eq!(enc.config, cfg);
        let want_f = tch::no_grad(|| net.forward(&x, false));
        let want_p = tch::no_grad(|| mlp.forward(&want_f));
        let f = enc.embed(&x, EmbedLayer::Features);
        let p = enc.embed(&x, EmbedLayer::Projection);
        assert!((f - want_f).abs().max().double_value(&[]) < 1e-6);
        assert!((p - want_p).abs().max().double_value(&[]) < 1e-6);

        let e = LoadedEncoder::load(
            &path,
            Some("encoder_x."),
            &Layout::ntu25(),
            Device::Cpu,
            false,
        );
        assert!(e.err().unwrap().to_string().contains("encoder_x."));
    }
}
