//! Frozen-encoder features: run each stream's encoder in eval mode (BN running statistics, no
//! dropout) once over an un-augmented dataset and keep the pooled features `(N, D)` per stream.
use crate::error::{Error, Result};
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
            return Err(Error::config("features: need one tensor per stream and at least one stream"));
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
            return Err(Error::config(format!("features: {n} labels but {} names", names.len())));
        }
        if let Some((i, l)) = labels.iter().enumerate().find(|(_, &l)| l < 0 || l as usize >= num_classes) {
            return Err(Error::config(format!("features: sample {i} has label {l} outside 0..{num_classes}")));
        }
        Ok(FeatureSet { streams, features, labels, names, num_classes })
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
            features: self.features.iter().map(|f| f.index_select(0, &idx)).collect(),
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
