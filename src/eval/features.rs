//! Frozen-encoder features: run each stream's encoder in eval mode (BN running statistics, no
//! dropout) once over an un-augmented dataset and keep the pooled features `(N, D)` per stream.
use crate::data::dataset::SkeletonDataset;
use crate::error::{Error, Result};
use crate::eval::encoder::StreamEncoder;
use std::path::Path;
use tch::{Device, Tensor};

/// Pooled features of one dataset: one `(N, D)` f32 tensor per stream, in dataset order.
pub struct FeatureSet {
    /// Stream names (e.g. `joint`, `motion`, `bone`), one per tensor in `features`.
    pub streams: Vec<String>,
    /// One `(N, D)` f32 tensor per stream, all on the same device.
    pub features: Vec<Tensor>,
    /// N class indices in `0..num_classes`.
    pub labels: Vec<i64>,
    /// N sample names.
    pub names: Vec<String>,
    pub num_classes: usize,
}

impl FeatureSet {
    /// Checks that every stream has N rows and that labels/names have N entries in range.
    pub fn new(
        streams: Vec<String>,
        features: Vec<Tensor>,
        labels: Vec<i64>,
        names: Vec<String>,
        num_classes: usize,
    ) -> Result<Self> {
        let n = labels.len();
        if streams.len() != features.len() || features.is_empty() {
            return Err(Error::config(
                "features: need one tensor per stream and at least one stream",
            ));
        }
        for (s, f) in streams.iter().zip(&features) {
            let size = f.size();
            if size.len() != 2 || size[0] as usize != n {
                return Err(Error::config(format!(
                    "features of stream {s}: shape {size:?}, expected ({n}, D)"
                )));
            }
        }
        if names.len() != n {
            return Err(Error::config(format!(
                "features: {n} labels but {} names",
                names.len()
            )));
        }
        if let Some((i, l)) = labels
            .iter()
            .enumerate()
            .find(|(_, &l)| l < 0 || l as usize >= num_classes)
        {
            return Err(Error::config(format!(
                "features: sample {i} has label {l} outside 0..{num_classes}"
            )));
        }
        Ok(FeatureSet {
            streams,
            features,
            labels,
            names,
            num_classes,
        })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Feature dimension of each stream.
    pub fn dims(&self) -> Vec<i64> {
        self.features.iter().map(|f| f.size()[1]).collect()
    }

    /// The rows at `indices`, in that order (tensor gather, no per-sample loops on tensors).
    pub fn subset(&self, indices: &[usize]) -> FeatureSet {
        let device = self.device();
        let idx: Vec<i64> = indices.iter().map(|&i| i as i64).collect();
        let idx = Tensor::from_slice(&idx).to_device(device);
        FeatureSet {
            streams: self.streams.clone(),
            features: self
                .features
                .iter()
                .map(|f| f.index_select(0, &idx))
                .collect(),
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            names: indices.iter().map(|&i| self.names[i].clone()).collect(),
            num_classes: self.num_classes,
        }
    }

    pub fn device(&self) -> Device {
        self.features[0].device()
    }

    /// A copy on `device`.
    pub fn to_device(&self, device: Device) -> FeatureSet {
        FeatureSet {
            streams: self.streams.clone(),
            features: self.features.iter().map(|f| f.to_device(device)).collect(),
            labels: self.labels.clone(),
            names: self.names.clone(),
            num_classes: self.num_classes,
        }
    }
}

/// Joint data of samples `start..start + len` of `dataset` as one `(len, C, T, V, M)` f32 CPU
/// tensor (one copy of a contiguous slice).
pub fn batch_tensor(dataset: &SkeletonDataset, start: usize, len: usize) -> Tensor {
    let per = dataset.sample_len();
    let data = &dataset.data.as_slice()[start * per..(start + len) * per];
    let [_, c, t, v, m] = dataset.shape;
    Tensor::from_slice(data).view([len as i64, c as i64, t as i64, v as i64, m as i64])
}

/// Runs every stream's encoder in eval mode (BN running statistics, no dropout, no augmentation)
/// over `dataset` once, in dataset order, `batch_size` samples at a time on the encoders' device.
/// Returns the pooled features `(N, D)` per stream on the CPU.
pub fn extract(
    dataset: &SkeletonDataset,
    encoders: &[StreamEncoder],
    batch_size: usize,
) -> Result<FeatureSet> {
    if encoders.is_empty() || batch_size == 0 {
        return Err(Error::config(
            "features: need at least one stream and a positive batch size",
        ));
    }
    let device = encoders[0].vs.device();
    let n = dataset.len();
    let bar = progress(n as u64, &format!("features {}", dataset.source.display()));
    let mut parts: Vec<Vec<Tensor>> = encoders.iter().map(|_| Vec::new()).collect();
    let mut start = 0;
    while start < n {
        let len = batch_size.min(n - start);
        let x = batch_tensor(dataset, start, len).to_device(device);
        tch::no_grad(|| {
            for (enc, out) in encoders.iter().zip(parts.iter_mut()) {
                out.push(
                    enc.forward(&x, &dataset.layout, false)
                        .to_device(Device::Cpu),
                );
            }
        });
        start += len;
        bar.inc(len as u64);
    }
    bar.finish_and_clear();
    let features = parts
        .into_iter()
        .zip(encoders)
        .map(|(p, e)| {
            if p.is_empty() {
                Tensor::zeros([0, e.out_dim()], (tch::Kind::Float, Device::Cpu))
            } else {
                Tensor::cat(&p, 0)
            }
        })
        .collect();
    FeatureSet::new(
        encoders.iter().map(|e| e.spec.name().to_string()).collect(),
        features,
        dataset.labels.clone(),
        dataset.names.clone(),
        dataset.num_classes,
    )
}

/// "Precise BN": sets every batch norm's running statistics of each encoder to the batch
/// statistics of the first `max_samples` samples of `dataset` (un-augmented), so that the
/// eval-mode forward on them equals the train-mode forward on that whole batch. The running
/// statistics are zeroed, one train-mode forward (the encoders have no dropout in evaluation)
/// over that batch updates them by `momentum * batch statistics` (each layer's batch statistics
/// computed from the previous layer's train-mode output), and they are divided by the momentum.
/// Exact in one pass; with the default 1024 samples a dataset up to that size is used whole.
pub fn recalibrate_bn(
    dataset: &SkeletonDataset,
    encoders: &[StreamEncoder],
    max_samples: usize,
) -> Result<()> {
    let n = dataset.len().min(max_samples);
    if n < 2 {
        return Err(Error::config(format!(
            "recalibrate_bn: {} has {} samples, need at least 2",
            dataset.source.display(),
            dataset.len()
        )));
    }
    let momentum = crate::model::stgcn::layers::BN_MOMENTUM;
    for enc in encoders {
        let x = batch_tensor(dataset, 0, n).to_device(enc.vs.device());
        let stats: Vec<Tensor> = enc
            .vs
            .variables()
            .into_iter()
            .filter(|(name, _)| name.ends_with("running_mean") || name.ends_with("running_var"))
            .map(|(_, t)| t)
            .collect();
        tch::no_grad(|| {
            for t in &stats {
                let _ = t.shallow_clone().zero_();
            }
            let _ = enc.forward(&x, &dataset.layout, true);
            for t in &stats {
                let _ = t.shallow_clone().g_div_scalar_(momentum);
            }
        });
    }
    Ok(())
}

/// A progress bar over `len` items (drawn only on a terminal).
pub fn progress(len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg} {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}]",
    ) {
        bar.set_style(style);
    }
    bar.set_message(what.to_string());
    bar
}

impl FeatureSet {
    /// Writes `features_<split>_<stream>.npy` (`(N, D)` f32) per stream and `names_<split>.txt`.
    pub fn save(&self, dir: &Path, split: &str) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        for (s, f) in self.streams.iter().zip(&self.features) {
            crate::eval::files::write_matrix(&dir.join(format!("features_{split}_{s}.npy")), f)?;
        }
        crate::eval::files::write_lines(&dir.join(format!("names_{split}.txt")), &self.names)
    }

    /// The same samples with `num_classes` raised to `k` (e.g. the maximum over train and test).
    pub fn with_num_classes(mut self, k: usize) -> FeatureSet {
        self.num_classes = self.num_classes.max(k);
        self
    }
}
