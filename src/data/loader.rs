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
//!
//! Host memory ([`HostMemory`]): for a CUDA target the workers write each view straight into
//! page-locked (pinned) memory, so that a `non_blocking` host -> device copy of the batch is a
//! true asynchronous DMA and the host thread goes on at once. Every batch gets fresh tensors
//! (never a reused buffer): libtorch's caching host allocator records the copy's stream event on
//! a pinned block and hands the block out again only after that copy has finished, so dropping a
//! batch right after starting its copy is safe. On a CPU target nothing is pinned (and no CUDA
//! call is made).
use crate::data::augment::{apply_bone_length, augment_into, AugmentConfig, BoneTree};
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

/// Where the loader puts the batch tensors (all on the CPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HostMemory {
    /// Ordinary (pageable) memory: the only choice without CUDA.
    #[default]
    Pageable,
    /// Page-locked memory registered for copies to this CUDA device.
    Pinned(Device),
}

impl HostMemory {
    /// Pinned for a CUDA `target`, pageable otherwise (CPU training never touches CUDA).
    pub fn for_target(target: Device) -> Self {
        if target.is_cuda() {
            HostMemory::Pinned(target)
        } else {
            HostMemory::Pageable
        }
    }

    /// `pageable` or `pinned`.
    pub fn name(&self) -> &'static str {
        match self {
            HostMemory::Pageable => "pageable",
            HostMemory::Pinned(_) => "pinned",
        }
    }

    /// Checks that pinned memory can be allocated (one tiny pinned tensor): an error names the
    /// device and libtorch's reason. Pageable memory always works.
    pub fn check(&self) -> Result<()> {
        match *self {
            HostMemory::Pageable => Ok(()),
            HostMemory::Pinned(device) if !device.is_cuda() => Err(Error::config(format!(
                "pinned host memory needs a CUDA target device, got {device:?}"
            ))),
            HostMemory::Pinned(device) => Tensor::zeros([1], (Kind::Float, Device::Cpu))
                .f_internal_pin_memory(device)
                .map(|_| ())
                .map_err(|e| {
                    Error::Other(format!(
                        "cannot allocate pinned host memory for {device:?}: {e}"
                    ))
                }),
        }
    }

    /// A fresh, uninitialised, contiguous CPU f32 tensor of shape `dims` in this kind of
    /// memory. Pinned tensors are allocated without copying any data: see [`empty_pinned`].
    /// Should pinning fail (pinned memory exhausted), the tensor is pageable: the batch holds the
    /// same values, only its copy to the device is then synchronous.
    fn empty(&self, dims: [i64; 5]) -> Tensor {
        match *self {
            HostMemory::Pageable => Tensor::empty(dims, (Kind::Float, Device::Cpu)),
            HostMemory::Pinned(device) => empty_pinned(dims, device)
                .unwrap_or_else(|_| Tensor::empty(dims, (Kind::Float, Device::Cpu))),
        }
    }
}

/// A fresh, uninitialised, contiguous f32 tensor of shape `dims` in pinned host memory for
/// `device`, from libtorch's caching host allocator, with no data copy.
///
/// libtorch has no "empty pinned" constructor in the C API, and `pin_memory` copies the whole
/// source (an intra-op parallel copy: an OpenMP team per loader thread). But `_pin_memory`
/// sizes the pinned storage from the source's sizes *and strides*, and copies only its
/// elements: a 2-element source with stride `numel - 1` spans exactly `numel` elements, so its
/// pinned copy owns a `numel`-element pinned storage after a 2-element copy. The batch tensor is
/// the contiguous view of that whole storage. (`_pin_memory` is called directly because
/// `pin_memory(device)` prints a deprecation warning on every call in libtorch 2.x.)
fn empty_pinned(dims: [i64; 5], device: Device) -> std::result::Result<Tensor, tch::TchError> {
    let numel: i64 = dims.iter().product();
    let (size, stride) = spanning_sizes(numel);
    let source = Tensor::f_empty_strided([size], [stride], (Kind::Float, Device::Cpu))?;
    let pinned = source.f_internal_pin_memory(device)?;
    pinned.f_as_strided(dims, contiguous_strides(dims), 0)
}

/// Size and stride of a 1-d tensor of at most 2 elements whose storage spans exactly `numel`
/// elements (`1 + (size - 1) * stride = numel`; no elements for `numel == 0`).
fn spanning_sizes(numel: i64) -> (i64, i64) {
    match numel {
        0 => (0, 1),
        1 => (1, 1),
        n => (2, n - 1),
    }
}

/// Row-major (contiguous) strides of `dims`, in elements.
fn contiguous_strides(dims: [i64; 5]) -> [i64; 5] {
    let mut strides = [1i64; 5];
    for d in (0..4).rev() {
        strides[d] = strides[d + 1] * dims[d + 1].max(1);
    }
    strides
}

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

/// One batch: `num_views` tensors `(B, C, T, V, M)` f32 on the CPU (pinned when the loader was
/// made for a CUDA target, see [`HostMemory`]), labels `(B,)` i64 on the CPU (pageable), and the
/// dataset indices of the `B` samples.
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
/// Only for tensors fresh from [`HostMemory::empty`] that share their storage with nothing.
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
    // SAFETY: `t` was just created by `HostMemory::empty` in `Plan::build` and is not shared: its
    // storage holds `numel` contiguous, properly aligned f32 values that nothing else reads or
    // writes while the slice lives (the slices are dropped before the tensors leave `build`).
    unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut f32, numel) }
}

/// One rank's share of every batch in data-parallel training: the epoch order and the
/// augmentation draws are those of a single-process run with batch `batch_size · world`; global
/// batch `b` holds positions `b·B·W .. (b+1)·B·W`, and rank `r` builds the `B` positions starting at
/// `b·B·W + r·B`. So the ranks' batches together are exactly that run's batch, sample for sample
/// and draw for draw, and every rank runs the same number of steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub world: usize,
}

impl Shard {
    /// A single-process run.
    pub const WHOLE: Shard = Shard { rank: 0, world: 1 };
}

/// Batches per epoch of one rank of `shard` (drop_last over the global batch `B · world`; without
/// drop_last only a single process is supported).
pub fn shard_batches_per_epoch(n: usize, cfg: &LoaderConfig, shard: Shard) -> usize {
    if shard.world <= 1 {
        return batches_per_epoch(n, cfg);
    }
    n / (cfg.batch_size * shard.world).max(1)
}

/// What every worker shares.
struct Plan {
    /// The skeleton tree for the bone-length jitter (`None` when it is off).
    bone_tree: Option<BoneTree>,
    dataset: Arc<SkeletonDataset>,
    cfg: LoaderConfig,
    epoch: usize,
    order: Vec<usize>,
    memory: HostMemory,
    shard: Shard,
}

impl Plan {
    /// Builds batch `b` (positions `b*B .. min((b+1)*B, n)` of the epoch order), writing the
    /// samples straight into the storage of fresh CPU tensors (one contiguous buffer per view,
    /// pinned when the plan says so).
    fn build(&self, b: usize) -> Batch {
        let bs = self.cfg.batch_size;
        let start = b * bs * self.shard.world + self.shard.rank * bs;
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
            .map(|_| self.memory.empty(dims))
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
                            if let Some(tree) = &self.bone_tree {
                                let view = &mut buf[span.clone()];
                                apply_bone_length(view, shape, tree, aug.bone_length, &mut rng);
                            }
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
    start_loader(
        dataset,
        cfg,
        epoch,
        first_batch,
        HostMemory::Pageable,
        Shard::WHOLE,
    )
}

/// As [`epoch_batches_from`] with the batch views in `memory` (pinned for a CUDA target, see
/// [`HostMemory::for_target`]); returns config errors, and an error when pinned memory cannot be
/// allocated, instead of panicking. The batches hold the same values whatever the memory.
pub fn try_epoch_batches_in(
    dataset: Arc<SkeletonDataset>,
    cfg: &LoaderConfig,
    epoch: usize,
    first_batch: usize,
    memory: HostMemory,
) -> Result<Loader> {
    cfg.validate(&dataset)?;
    memory.check()?;
    Ok(start_loader(
        dataset,
        cfg,
        epoch,
        first_batch,
        memory,
        Shard::WHOLE,
    ))
}

/// As [`try_epoch_batches_in`], for one rank of a data-parallel run ([`Shard`]): `cfg.batch_size`
/// is the per-rank batch. Needs `drop_last` when `shard.world > 1`.
pub fn try_epoch_shard_in(
    dataset: Arc<SkeletonDataset>,
    cfg: &LoaderConfig,
    epoch: usize,
    shard: Shard,
    memory: HostMemory,
) -> Result<Loader> {
    cfg.validate(&dataset)?;
    if shard.world == 0 || shard.rank >= shard.world {
        return Err(Error::config(format!(
            "rank {} is not in a world of {}",
            shard.rank, shard.world
        )));
    }
    if shard.world > 1 && !cfg.drop_last {
        return Err(Error::config(
            "a data-parallel loader drops the last incomplete batch (drop_last)",
        ));
    }
    memory.check()?;
    Ok(start_loader(dataset, cfg, epoch, 0, memory, shard))
}

/// Starts the workers of an epoch (see the module doc). Panics on an invalid config.
fn start_loader(
    dataset: Arc<SkeletonDataset>,
    cfg: &LoaderConfig,
    epoch: usize,
    first_batch: usize,
    memory: HostMemory,
    shard: Shard,
) -> Loader {
    if let Err(e) = cfg.validate(&dataset) {
        panic!("invalid loader config: {e}");
    }
    let end = shard_batches_per_epoch(dataset.len(), cfg, shard);
    let order = epoch_order(dataset.len(), cfg, epoch);
    let bone_tree = cfg.augment.filter(|a| a.bone_length > 0.0).map(|_| {
        BoneTree::new(
            dataset.layout.num_joints(),
            &dataset.layout.edges,
            dataset.layout.center,
        )
    });
    let plan = Arc::new(Plan {
        bone_tree,
        dataset,
        cfg: cfg.clone(),
        epoch,
        order,
        memory,
        shard,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::augment::augment;
    use crate::data::dataset::F32Buf;
    use crate::data::layout::Layout;

    /// `n` samples of shape (3, 6, 25, 2) with distinct, non-linear values; label = index % 3.
    fn dataset(n: usize) -> Arc<SkeletonDataset> {
        let shape = [n, 3, 6, 25, 2];
        let len: usize = shape.iter().product();
        let data = (0..len)
            .map(|i| ((i * 7919) % 1013) as f32 * 0.01 - 5.0)
            .collect();
        Arc::new(SkeletonDataset {
            data: F32Buf::Owned(data),
            shape,
            labels: (0..n as i64).map(|i| i % 3).collect(),
            names: (0..n).map(|i| format!("s{i}")).collect(),
            num_classes: 3,
            layout: Layout::ntu25(),
            source: "<test>".into(),
        })
    }

    fn cfg(workers: usize) -> LoaderConfig {
        LoaderConfig {
            batch_size: 4,
            seed: 7,
            workers,
            prefetch: 2,
            ..LoaderConfig::default()
        }
    }

    /// FNV-1a over the bit patterns of every value of every view of every batch, in order.
    fn fingerprint(batches: &[Batch]) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in batches {
            for v in &b.views {
                for x in Vec::<f32>::try_from(v.flatten(0, -1)).unwrap() {
                    for byte in x.to_bits().to_le_bytes() {
                        h = (h ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
                    }
                }
            }
        }
        h
    }

    #[test]
    fn batches_are_the_per_sample_augmentations_and_unchanged() {
        let ds = dataset(10);
        let c = cfg(2);
        let batches: Vec<Batch> = epoch_batches(Arc::clone(&ds), &c, 3).collect();
        assert_eq!(batches.len(), 2, "10 samples, batch 4, drop_last");
        let order = epoch_order(ds.len(), &c, 3);
        let aug = c.augment.unwrap();
        for (b, batch) in batches.iter().enumerate() {
            assert_eq!(batch.indices, order[b * 4..(b + 1) * 4].to_vec());
            assert_eq!(batch.views.len(), 2);
            let views: Vec<Vec<f32>> = batch
                .views
                .iter()
                .map(|v| Vec::<f32>::try_from(v.flatten(0, -1)).unwrap())
                .collect();
            let len = ds.sample_len();
            for (row, &i) in batch.indices.iter().enumerate() {
                // The loader's batch = `augment` of the sample with its position's stream, one
                // call per copy in copy order.
                let mut rng = sample_rng(c.seed, 3, b * 4 + row);
                for view in &views {
                    let want = augment(ds.sample(i), ds.sample_shape(), &aug, &mut rng);
                    assert_eq!(&view[row * len..(row + 1) * len], &want[..]);
                }
            }
            let labels = Vec::<i64>::try_from(&batch.labels).unwrap();
            let want: Vec<i64> = batch.indices.iter().map(|&i| ds.labels[i]).collect();
            assert_eq!(labels, want);
        }
        // Golden value: any change of the order, the draws or the arithmetic shows up here.
        assert_eq!(fingerprint(&batches), GOLDEN_FINGERPRINT);
        let inline: Vec<Batch> = epoch_batches(ds, &cfg(0), 3).collect();
        assert_eq!(fingerprint(&inline), GOLDEN_FINGERPRINT);
    }

    /// `fingerprint` of epoch 3 of `dataset(10)` under `cfg(_)` (recorded from the loader).
    const GOLDEN_FINGERPRINT: u64 = 6_179_891_754_798_461_763;

    #[test]
    fn pinned_layout_math_spans_the_whole_batch() {
        assert_eq!(contiguous_strides([2, 3, 4, 5, 6]), [360, 120, 30, 6, 1]);
        for numel in [0i64, 1, 2, 7, 128 * 7500] {
            let (size, stride) = spanning_sizes(numel);
            let span = if size == 0 {
                0
            } else {
                1 + (size - 1) * stride
            };
            assert_eq!(span, numel, "numel {numel}");
        }
        // The same view construction on ordinary memory: a contiguous tensor over the whole
        // storage of the small strided source (the pinned path does this on pinned storage).
        let dims = [2i64, 3, 4, 5, 2];
        let numel: i64 = dims.iter().product();
        let (size, stride) = spanning_sizes(numel);
        let source = Tensor::empty_strided([size], [stride], (Kind::Float, Device::Cpu));
        let mut view = source.as_strided(dims, contiguous_strides(dims), 0);
        assert!(view.is_contiguous());
        assert_eq!(view.size(), dims.to_vec());
        assert_eq!(view.data_ptr(), source.data_ptr());
        let filled = view.fill_(1.5);
        assert_eq!(
            filled.sum(Kind::Double).double_value(&[]),
            1.5 * numel as f64
        );
    }

    #[test]
    fn cpu_targets_never_pin() {
        assert_eq!(HostMemory::for_target(Device::Cpu), HostMemory::Pageable);
        assert_eq!(
            HostMemory::for_target(Device::Cuda(0)),
            HostMemory::Pinned(Device::Cuda(0))
        );
        assert!(HostMemory::Pageable.check().is_ok());
        let e = HostMemory::Pinned(Device::Cpu).check().unwrap_err();
        assert!(e.to_string().contains("CUDA"), "{e}");
        let ds = dataset(8);
        let loader = try_epoch_batches_in(ds, &cfg(1), 1, 0, HostMemory::Pageable).unwrap();
        assert_eq!(loader.count(), 2);
    }

    /// CUDA only (skipped otherwise): pinned batches hold the same values as pageable ones,
    /// really are pinned, and copy to the device asynchronously with the same result.
    #[test]
    fn pinned_batches_match_pageable_ones_on_cuda() {
        if !tch::Cuda::is_available() {
            eprintln!("skipped: no CUDA device (pinned memory needs one)");
            return;
        }
        let device = Device::Cuda(0);
        let memory = HostMemory::for_target(device);
        let pinned: Vec<Batch> = try_epoch_batches_in(dataset(10), &cfg(2), 3, 0, memory)
            .unwrap()
            .collect();
        assert_eq!(fingerprint(&pinned), GOLDEN_FINGERPRINT);
        for b in &pinned {
            for v in &b.views {
                assert!(v.is_contiguous());
                assert!(v.is_pinned(device), "a batch view is not pinned");
                let on_device = v.to_device_(device, Kind::Float, true, false);
                let back = on_device.to_device(Device::Cpu);
                assert!(back.equal(v));
            }
        }
    }

    /// Two ranks' shards of batch 2 are, side by side, the single-process batch of 4: the same
    /// samples and the same augmentation draws; both ranks run the same number of steps.
    #[test]
    fn shards_together_are_the_single_process_batches() {
        let ds = dataset(10);
        let whole: Vec<Batch> = epoch_batches(Arc::clone(&ds), &cfg(1), 3).collect();
        let half = LoaderConfig {
            batch_size: 2,
            ..cfg(1)
        };
        let ranks: Vec<Vec<Batch>> = (0..2)
            .map(|rank| {
                let shard = Shard { rank, world: 2 };
                assert_eq!(shard_batches_per_epoch(ds.len(), &half, shard), 2);
                try_epoch_shard_in(Arc::clone(&ds), &half, 3, shard, HostMemory::Pageable)
                    .unwrap()
                    .collect()
            })
            .collect();
        assert_eq!(whole.len(), 2);
        for (b, batch) in whole.iter().enumerate() {
            let (r0, r1) = (&ranks[0][b], &ranks[1][b]);
            assert_eq!(
                [r0.indices.clone(), r1.indices.clone()].concat(),
                batch.indices
            );
            for v in 0..2 {
                let joined = Tensor::cat(&[&r0.views[v], &r1.views[v]], 0);
                assert_eq!(
                    (&joined - &batch.views[v]).abs().max().double_value(&[]),
                    0.0
                );
            }
        }
        let bad = Shard { rank: 2, world: 2 };
        assert!(try_epoch_shard_in(ds, &half, 3, bad, HostMemory::Pageable).is_err());
    }
}
