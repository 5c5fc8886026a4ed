//! Helpers shared by the pre-training test binaries (tests/pretrain.rs, tests/pretrain_fast.rs):
//! a lock for the process-global torch RNG, a tiny synthetic dataset and a tiny config.
#![allow(dead_code)] // each test binary uses its own subset
use crossclr::data::synth::{generate, SynthConfig};
use crossclr::data::SkeletonDataset;
use crossclr::train::config::PretrainConfig;
use crossclr::train::pretrain::RunOptions;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

/// The torch RNG is process-global: tests that seed it and rely on the stream run one at a time.
static TORCH_RNG: Mutex<()> = Mutex::new(());

/// Takes the RNG lock and sets one intra-op thread (the tensors are tiny; on a loaded 2-core
/// machine extra threads only add synchronisation stalls).
pub fn serial() -> MutexGuard<'static, ()> {
    let guard = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::set_num_threads(1);
    guard
}

/// 16 training samples (4 classes x 4), 20 frames, ntu25, 2 bodies: 2 batches of 8.
pub fn tiny_data() -> Arc<SkeletonDataset> {
    let cfg = SynthConfig {
        num_classes: 4,
        train_per_class: 4,
        val_per_class: 1,
        frames: 20,
        ..SynthConfig::default()
    };
    Arc::new(generate(&cfg).0)
}

/// Queue 64, batch 8, 2 epochs with CVC-KM from epoch 2, one loader worker, a checkpoint every
/// epoch, on the CPU; SkeletonCLR on joints, CrosSCLR on all its views; then `extra` overrides.
pub fn tiny_config(model: &str, work_dir: &Path, extra: &[&str]) -> PretrainConfig {
    let view = if model == "skeletonclr" {
        "joint"
    } else {
        "all"
    };
    let mut ov: Vec<String> = vec![
        format!("model={model}"),
        format!("work_dir={}", work_dir.display()),
        "model_args.queue_size=64".into(),
        "batch_size=8".into(),
        "num_epoch=2".into(),
        "cross_epoch=1".into(),
        "workers=1".into(),
        "save_interval=1".into(),
        "device=cpu".into(),
        "log_interval=0".into(),
        format!("view={view}"),
    ];
    ov.extend(extra.iter().map(|s| s.to_string()));
    PretrainConfig::from_text("", false, Path::new("<test>"), &ov).unwrap()
}

/// Run options that train on `ds` (no progress bar, no echo).
pub fn opts(ds: &Arc<SkeletonDataset>) -> RunOptions {
    RunOptions {
        dataset: Some(Arc::clone(ds)),
        ..Default::default()
    }
}

/// Samples `from..from + n` of `ds` as one batch (n, C, T, V, M).
pub fn batch_of(ds: &SkeletonDataset, from: usize, n: usize) -> tch::Tensor {
    let mut v = Vec::new();
    for i in from..from + n {
        v.extend_from_slice(ds.sample(i));
    }
    let s = ds.sample_shape();
    tch::Tensor::from_slice(&v).view([n as i64, s[0] as i64, s[1] as i64, s[2] as i64, s[3] as i64])
}
