//! Batches for training and evaluation: shuffled, `drop_last`, `num_views` independent
//! augmentations per sample, produced by worker threads ahead of use.
//!
//! Reproducibility: the sample order of an epoch is a pure function of `(seed, epoch)` and the
//! augmentation draws of a sample are a pure function of `(seed, epoch, position of the sample in
//! the epoch order)` (one ChaCha stream per position). Neither depends on the number of workers,
//! the prefetch depth or the batch size (for the draws), so a run is reproducible and can resume
//! at any epoch / batch ([`epoch_batches_from`]). Batches always come out in order.
//!
//! Threads: worker `w` of `W` builds batches `w, w + W, w + 2W, ...` and hands them over through
//! its own bounded channel; the consumer reads the channels round-robin, so at most about
//! `prefetch` finished batches wait in memory. Each view of a batch is one contiguous buffer: the
//! samples are written straight into the storage of a fresh CPU tensor `(B, C, T, V, M)` on the
//! worker (no zero-fill, no extra copy, unlike `Tensor::from_slice`).
use crate::data::augment::{augment_into, AugmentConfig};
use crate::data::dataset::SkeletonDataset;
use crate::error::{Error, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;
use tch::{Device, Kind, Tensor};

/// Domain tags that separate the shuffle stream from the augmentation streams.
const SHUFFLE_DOMAIN: u64 = 0x5348_5546_464c_4531; // "SHUFFLE1"
const AUGMENT_DOMAIN: u64 = 0x4155_474d_454e_5431; // "AUGMENT1"

/// How batches are made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoaderConfig {
    pub batch_size: usize,
    /// Shuffle the samples each epoch (order = f(seed, epoch)); false = dataset order.
    pub shuffle: bool,
    /// Drop the last incomplete batch.
    pub drop_last: bool,
    /// Copies of each sample per batch: 1 = one copy, 2 = two independent augmentations
    /// (query and key).
    pub num_views: usize,
    /// Augmentation of every copy; `None` = raw data (evaluation).
    pub augment: Option<AugmentConfig>,
    pub seed: u64,
    /// Worker threads building batches (0 = build them on the consumer's thread).
    pub workers: usize,
    /// Finished batches kept ready ahead of the consumer (at least 1 per worker).
    pub prefetch: usize,
}

impl Default for LoaderConfig {
    /// Pre-training as in the official code: batch 128, shuffled, drop_last, two augmented views.
    fn default() -> Self {
        LoaderConfig {
            batch_size: 128,
            shuffle: true,
            drop_last: true,
            num_views: 2,
            augment: Some(AugmentConfig::default()),
            seed: 0,
            workers: 2,
            prefetch: 4,
        }
    }
}

impl LoaderConfig {
    /// Evaluation: every sample once, in dataset order, raw data, one view, last batch kept.
    pub fn evaluation(batch_size: usize) -> Self {
        LoaderConfig {
            batch_size,
            shuffle: false,
            drop_last: false,
            num_views: 1,
            augment: None,
            seed: 0,
            workers: 1,
            prefetch: 2,
        }
    }

    /// Checks the settings against a dataset (batch size, view count, augmentation vs shape).
    pub fn validate(&self, dataset: &SkeletonDataset) -> Result<()> {
        if self.batch_size == 0 {
            return Err(Error::config("batch size must be at least 1"));
        }
        if self.num_views == 0 {
            return Err(Error::config("num_views must be at least 1"));
        }
        if let Some(aug) = &self.augment {
            aug.validate(dataset.sample_shape())?;
        }
        if dataset.labels.len() != dataset.len() {
            return Err(Error::input(
                &dataset.source,
                "labels",
                format!(
                    "{} labels for {} samples",
                    dataset.labels.len(),
                    dataset.len()
                ),
            ));
        }
        Ok(())
    }
}

/// One batch: `num_views` tensors `(B, C, T, V, M)` f32 on the CPU, labels `(B,)` i64 on the
/// CPU, and the dataset indices of the `B` samples.
#[derive(Debug)]
pub struct Batch {
    pub views: Vec<Tensor>,
    pub labels: Tensor,
    pub indices: Vec<usize>,
}

/// Number of batches in one epoch of `n` samples.
pub fn batches_per_epoch(n: usize, cfg: &LoaderConfig) -> usize {
    if cfg.batch_size == 0 {
        return 0;
    }
    if cfg.drop_last {
        n / cfg.batch_size
    } else {
        n.div_ceil(cfg.batch_size)
    }
}

/// SplitMix64 finaliser: a well-mixed 64-bit value from `x`.
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A 256-bit ChaCha key derived from `(seed, epoch, domain)`.
fn derive_key(seed: u64, epoch: usize, domain: u64) -> [u8; 32] {
    let mut key = [0u8; 32];
    let mut state = splitmix64(seed ^ splitmix64(domain)) ^ splitmix64(epoch as u64);
    for chunk in key.chunks_exact_mut(8) {
        state = splitmix64(state);
        chunk.copy_from_slice(&state.to_le_bytes());
    }
    key
}

/// The sample order of `epoch` (a permutation of `0..n`; the identity without shuffle).
pub fn epoch_order(n: usize, cfg: &LoaderConfig, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if cfg.shuffle {
        let mut rng = ChaCha8Rng::from_seed(derive_key(cfg.seed, epoch, SHUFFLE_DOMAIN));
        order.shuffle(&mut rng);
    }
    order
}

/// The rng of the sample at `position` of the epoch order: its own ChaCha stream.
pub fn sample_rng(seed: u64, epoch: usize, position: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::from_seed(derive_key(seed, epoch, AUGMENT_DOMAIN));
    rng.set_stream(position as u64);
    rng
}

/// The storage of a freshly created, contiguous CPU f32 tensor of `numel` elements as a slice.
/// Only for tensors fresh from `Tensor::empty` that share their storage with nothing.
///
/// This skips `Tensor::from_slice`, which zero-fills a new tensor (an intra-op parallel fill) and
/// then copies the data in: writing the batch straight into the tensor is several times faster.
fn storage_mut(t: &mut Tensor, numel: usize) -> &mut [f32] {
    assert!(
        t.kind() == Kind::Float && t.device() == Device::Cpu && t.is_contiguous(),
        "storage_mut needs a contiguous CPU f32 tensor"
    );
    assert_eq!(t.numel(), numel);
    if numel == 0 {
        return &mut [];
    }
    // SAFETY: `t` was just created by `Tensor::empty` in `Plan::build` and is not shared: its
    // storage holds `numel` contiguous, properly aligned f32 values that nothing else reads or
    // writes while the slice lives (the slices are dropped before the tensors leave `build`).
    unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut f32, numel) }
}

/// What every worker shares.
struct Plan {
    dataset: Arc<SkeletonDataset>,
    cfg: LoaderConfig,
    epoch: usize,
    order: Vec<usize>,
}

impl Plan {
    /// Builds batch `b` (positions `b*B .. min((b+1)*B, n)` of the epoch order), writing the
    /// samples straight into the storage of fresh CPU tensors (one contiguous buffer per view).
    fn build(&self, b: usize) -> Batch {
        let bs = self.cfg.batch_size;
        let start = b * bs;
        let end = (start + bs).min(self.order.len());
        let indices = self.order[start..end].to_vec();
        let shape = self.dataset.sample_shape();
        let len = self.dataset.sample_len();
        let rows = indices.len();
        let dims = [
            rows as i64,
            shape[0] as i64,
            shape[1] as i64,
            shape[2] as i64,
            shape[3] as i64,
        ];
        let mut views: Vec<Tensor> = (0..self.cfg.num_views)
            .map(|_| Tensor::empty(dims, (Kind::Float, Device::Cpu)))
            .collect();
        {
            let mut bufs: Vec<&mut [f32]> = views
                .iter_mut()
                .map(|t| storage_mut(t, rows * len))
                .collect();
            for (row, &i) in indices.iter().enumerate() {
                let x = self.dataset.sample(i);
                let span = row * len..(row + 1) * len;
                match &self.cfg.augment {
                    None => {
                        for buf in bufs.iter_mut() {
                            buf[span.clone()].copy_from_slice(x);
                        }
                    }
                    Some(aug) => {
                        let mut rng = sample_rng(self.cfg.seed, self.epoch, start + row);
                        for buf in bufs.iter_mut() {
                            augment_into(x, shape, aug, &mut rng, &mut buf[span.clone()]);
                        }
                    }
                }
            }
        }
        let labels: Vec<i64> = indices.iter().map(|&i| self.dataset.labels[i]).collect();
        Batch {
            views,
            labels: Tensor::from_slice(&labels),
            indices,
        }
    }
}

/// An epoch's batches, in order. Dropping it stops and joins the workers.
pub struct Loader {
    plan: Arc<Plan>,
    /// First batch of this loader (workers count from it).
    start: usize,
    next: usize,
    end: usize,
    receivers: Vec<Receiver<Batch>>,
    handles: Vec<JoinHandle<()>>,
}

/// The batches of `epoch` (see the module doc). Panics on an invalid config: check it with
/// [`LoaderConfig::validate`] first, or use [`try_epoch_batches`].
pub fn epoch_batches(dataset: Arc<SkeletonDataset>, cfg: &LoaderConfig, epoch: usize) -> Loader {
    epoch_batches_from(dataset, cfg, epoch, 0)
}

/// As [`epoch_batches`], returning config errors instead of panicking.
pub fn try_epoch_batches(
    dataset: Arc<SkeletonDataset>,
    cfg: &LoaderConfig,
    epoch: usize,
) -> Result<Loader> {
    cfg.validate(&dataset)?;
    Ok(epoch_batches_from(dataset, cfg, epoch, 0))
}

/// The batches of `epoch` starting at batch `first_batch` (to resume inside an epoch); the
/// batches are identical to those of a full epoch.
pub fn epoch_batches_from(
    dataset: Arc<SkeletonDataset>,
    cfg: &LoaderConfig,
    epoch: usize,
    first_batch: usize,
) -> Loader {
    if let Err(e) = cfg.validate(&dataset) {
        panic!("invalid loader config: {e}");
    }
    let end = batches_per_epoch(dataset.len(), cfg);
    let order = epoch_order(dataset.len(), cfg, epoch);
    let plan = Arc::new(Plan {
        dataset,
        cfg: cfg.clone(),
        epoch,
        order,
    });
    let first = first_batch.min(end);
    let workers = cfg.workers.min(end - first);
    let mut receivers = Vec::with_capacity(workers);
    let mut handles = Vec::with_capacity(workers);
    // Each worker may hold this many finished batches (prefetch shared among the workers).
    let depth = cfg.prefetch.div_ceil(workers.max(1)).max(1);
    for w in 0..workers {
        let (tx, rx) = sync_channel::<Batch>(depth);
        let plan = Arc::clone(&plan);
        let handle = std::thread::Builder::new()
            .name(format!("loader-{w}"))
            .spawn(move || {
                let mut b = first + w;
                while b < end {
                    if tx.send(plan.build(b)).is_err() {
                        return; // the loader was dropped
                    }
                    b += workers;
                }
            })
            .expect("spawn loader thread");
        receivers.push(rx);
        handles.push(handle);
    }
    Loader {
        plan,
        start: first,
        next: first,
        end,
        receivers,
        handles,
    }
}

impl Loader {
    /// In-order batches over the whole dataset without shuffle or drop (evaluation).
    pub fn in_order(dataset: Arc<SkeletonDataset>, batch_size: usize) -> Loader {
        epoch_batches(dataset, &LoaderConfig::evaluation(batch_size), 0)
    }

    /// Batches left to yield.
    pub fn remaining(&self) -> usize {
        self.end - self.next
    }

    /// The sample order of this epoch.
    pub fn order(&self) -> &[usize] {
        &self.plan.order
    }
}

impl Iterator for Loader {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        if self.next >= self.end {
            return None;
        }
        let b = self.next;
        self.next += 1;
        if self.receivers.is_empty() {
            return Some(self.plan.build(b));
        }
        // Worker w builds batches start + w, start + w + W, ...
        let w = (b - self.start) % self.receivers.len();
        match self.receivers[w].recv() {
            Ok(batch) => Some(batch),
            // A worker died (panicked): rebuild here so no batch is lost.
            Err(_) => Some(self.plan.build(b)),
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining(), Some(self.remaining()))
    }
}

impl ExactSizeIterator for Loader {}

impl Drop for Loader {
    fn drop(&mut self) {
        self.receivers.clear();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}
