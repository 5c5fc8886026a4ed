//! The in-memory (or memory-mapped) labelled skeleton dataset every protocol works on.
use crate::data::layout::Layout;
use memmap2::Mmap;
use std::path::PathBuf;
use std::sync::Arc;

/// A float32 buffer: owned, or a read-only memory map of a file (e.g. a large `.npy`).
pub enum F32Buf {
    Owned(Vec<f32>),
    /// `offset` in bytes into `mmap` (4-byte aligned), `len` in f32 elements.
    Mapped {
        mmap: Arc<Mmap>,
        offset: usize,
        len: usize,
    },
}

impl F32Buf {
    pub fn as_slice(&self) -> &[f32] {
        match self {
            F32Buf::Owned(v) => v,
            F32Buf::Mapped { mmap, offset, len } => {
                let bytes = &mmap[*offset..*offset + *len * 4];
                // SAFETY: alignment and length are checked when the map is created
                // (`F32Buf::mapped`); f32 has no invalid bit patterns.
                unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const f32, *len) }
            }
        }
    }

    /// Wraps a map if `offset` is 4-byte aligned and in range; otherwise copies (little-endian).
    pub fn mapped(mmap: Arc<Mmap>, offset: usize, len: usize) -> Self {
        let in_range = offset + len * 4 <= mmap.len();
        let aligned = (mmap.as_ptr() as usize + offset).is_multiple_of(std::mem::align_of::<f32>());
        if in_range && aligned && cfg!(target_endian = "little") {
            F32Buf::Mapped { mmap, offset, len }
        } else {
            let end = (offset + len * 4).min(mmap.len());
            let v = mmap[offset..end]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            F32Buf::Owned(v)
        }
    }
}

/// Skeleton sequences `N x C x T x V x M` (C = coordinates, T frames, V joints, M bodies), with
/// labels, sample names and the layout their joints follow.
pub struct SkeletonDataset {
    pub data: F32Buf,
    /// `[N, C, T, V, M]`.
    pub shape: [usize; 5],
    /// One class index per sample, `0..num_classes`.
    pub labels: Vec<i64>,
    /// One name per sample (e.g. `S001C001P001R001A001.skeleton`).
    pub names: Vec<String>,
    pub num_classes: usize,
    pub layout: Layout,
    /// Where the data came from (for messages).
    pub source: PathBuf,
}

impl SkeletonDataset {
    pub fn len(&self) -> usize {
        self.shape[0]
    }
    pub fn is_empty(&self) -> bool {
        self.shape[0] == 0
    }
    /// Elements of one sample: `C * T * V * M`.
    pub fn sample_len(&self) -> usize {
        self.shape[1..].iter().product()
    }
    /// `[C, T, V, M]` of one sample.
    pub fn sample_shape(&self) -> [usize; 4] {
        [self.shape[1], self.shape[2], self.shape[3], self.shape[4]]
    }
    /// Sample `i` as a flat `C x T x V x M` slice.
    pub fn sample(&self, i: usize) -> &[f32] {
        let n = self.sample_len();
        &self.data.as_slice()[i * n..(i + 1) * n]
    }
    /// A new owned dataset made of the samples at `indices`, in that order.
    pub fn subset(&self, indices: &[usize]) -> SkeletonDataset {
        let mut data = Vec::with_capacity(indices.len() * self.sample_len());
        for &i in indices {
            data.extend_from_slice(self.sample(i));
        }
        let mut shape = self.shape;
        shape[0] = indices.len();
        SkeletonDataset {
            data: F32Buf::Owned(data),
            shape,
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            names: indices.iter().map(|&i| self.names[i].clone()).collect(),
            num_classes: self.num_classes,
            layout: self.layout.clone(),
            source: self.source.clone(),
        }
    }
    /// Samples per class.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut c = vec![0; self.num_classes];
        for &l in &self.labels {
            if (l as usize) < c.len() {
                c[l as usize] += 1;
            }
        }
        c
    }
}
