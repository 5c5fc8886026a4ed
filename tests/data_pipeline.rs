//! Data pipeline: synthetic dataset, loader (shuffle, drop_last, views, determinism), throughput.
use crossclr::data::augment::AugmentConfig;
use crossclr::data::dataset::{F32Buf, SkeletonDataset};
use crossclr::data::loader::{
    batches_per_epoch, epoch_batches, epoch_batches_from, Batch, Loader, LoaderConfig,
};
use crossclr::data::synth::{self, SynthConfig};
use crossclr::data::Layout;
use std::path::PathBuf;
use std::sync::Arc;
use tch::Tensor;

fn to_vec(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.flatten(0, -1)).unwrap()
}

fn small_synth(seed: u64) -> (SkeletonDataset, SkeletonDataset) {
    synth::generate(&SynthConfig {
        num_classes: 12,
        train_per_class: 6,
        val_per_class: 3,
        frames: 30,
        seed,
        ..SynthConfig::default()
    })
}

// ----------------------------------------------------------------------------- synth

#[test]
fn synth_is_deterministic_from_seed() {
    let (a, av) = small_synth(7);
    let (b, bv) = small_synth(7);
    let (c, _) = small_synth(8);
    assert_eq!(a.data.as_slice(), b.data.as_slice());
    assert_eq!(av.data.as_slice(), bv.data.as_slice());
    assert_eq!(a.names, b.names);
    assert_eq!(a.labels, b.labels);
    assert_ne!(a.data.as_slice(), c.data.as_slice());
}

#[test]
fn synth_shapes_and_balanced_labels() {
    let (train, val) = synth::demo_dataset(1);
    assert_eq!(train.shape, [12 * 40, 3, 50, 25, 2]);
    assert_eq!(val.shape, [12 * 20, 3, 50, 25, 2]);
    assert_eq!(train.class_counts(), vec![40; 12]);
    assert_eq!(val.class_counts(), vec![20; 12]);
    assert_eq!(train.names.len(), train.len());
    assert_eq!(train.layout, Layout::ntu25());
    // Plausible human-sized data in metres: centred coordinates within a few metres.
    let max = train
        .data
        .as_slice()
        .iter()
        .fold(0.0f32, |m, x| m.max(x.abs()));
    assert!(max > 0.3 && max < 3.0, "max |coordinate| = {max}");
    // Train and val subjects are disjoint (even / odd subject ids).
    let subject = |n: &str| n[9..12].parse::<u32>().unwrap();
    assert!(
        train.names.iter().all(|n| subject(n) % 2 == 1),
        "1-based: train ids odd"
    );
    assert!(val.names.iter().all(|n| subject(n) % 2 == 0));
}

/// Sum of |x| of body `m` of sample `i`.
fn body_energy(ds: &SkeletonDataset, i: usize, m: usize) -> f32 {
    let [_, c, t, v, mm] = ds.shape;
    let s = ds.sample(i);
    (0..c * t * v).map(|k| s[k * mm + m].abs()).sum()
}

#[test]
fn two_person_classes_have_a_second_body() {
    let (train, _) = small_synth(3);
    for i in 0..train.len() {
        let class = train.labels[i] as usize;
        assert!(body_energy(&train, i, 0) > 0.0);
        let second = body_energy(&train, i, 1);
        if synth::is_two_person(class) {
            assert!(second > 0.0, "sample {i} (class {class}) lacks its partner");
        } else {
            assert_eq!(second, 0.0, "sample {i} (class {class}) has a second body");
        }
    }
    assert!((0..12).filter(|&c| synth::is_two_person(c)).count() >= 2);
}

#[test]
fn synth_write_produces_readable_files() {
    let (train, val) = small_synth(4);
    let dir = tempfile::tempdir().unwrap();
    synth::write(dir.path(), &train, &val).unwrap();
    for f in [
        "train_data.npy",
        "train_label.pkl",
        "val_data.npy",
        "val_label.pkl",
        "classes.txt",
    ] {
        assert!(dir.path().join(f).is_file(), "{f} missing");
    }
    let (shape, data) = crossclr::data::npy::read_f32(&dir.path().join("train_data.npy")).unwrap();
    assert_eq!(shape, train.shape.to_vec());
    assert_eq!(data, train.data.as_slice());
    let (names, labels) =
        crossclr::data::pickle::read_labels(&dir.path().join("val_label.pkl")).unwrap();
    assert_eq!(names, val.names);
    assert_eq!(labels, val.labels);
    let classes = std::fs::read_to_string(dir.path().join("classes.txt")).unwrap();
    assert_eq!(classes.lines().count(), 12);
    // Built-in layout: named in dataset.toml, no layout.toml.
    let info = std::fs::read_to_string(dir.path().join("dataset.toml")).unwrap();
    assert!(info.contains("layout = \"ntu25\""), "{info}");
    assert!(!dir.path().join("layout.toml").exists());
}

#[test]
fn synth_custom_layout_round_trips_through_layout_toml() {
    let custom = crossclr::data::layout::LayoutFile {
        name: "rig5".into(),
        joints: vec![
            "hip".into(),
            "chest".into(),
            "head".into(),
            "l".into(),
            "r".into(),
        ],
        edges: vec![[1, 2], [2, 3], [2, 4], [2, 5]],
        center: 2,
        shoulders: [4, 5],
        bone_parents: None,
        length_joint: None,
        index_base: 1,
        partition: Default::default(),
    }
    .into_layout(std::path::Path::new("<test>"))
    .unwrap();
    let cfg = SynthConfig {
        train_per_class: 1,
        val_per_class: 1,
        frames: 10,
        layout: custom.clone(),
        ..SynthConfig::default()
    };
    let (train, val) = synth::generate(&cfg);
    let dir = tempfile::tempdir().unwrap();
    synth::write(dir.path(), &train, &val).unwrap();
    let back = Layout::from_file(&dir.path().join("layout.toml")).unwrap();
    assert_eq!(back, custom);
}

/// Features of frame `t` of body 0 of sample `i`: pose (3*V) and, if `velocity_weight > 0`, the
/// frame-to-frame motion scaled by it.
fn frame_feature(ds: &SkeletonDataset, i: usize, t: usize, velocity_weight: f32) -> Vec<f32> {
    let [_, c, tt, v, m] = ds.shape;
    let s = ds.sample(i);
    let at = |ci: usize, ti: usize, vi: usize| s[((ci * tt + ti) * v + vi) * m];
    let mut f = Vec::with_capacity(2 * c * v);
    for ci in 0..c {
        for vi in 0..v {
            f.push(at(ci, t, vi));
        }
    }
    if velocity_weight > 0.0 {
        for ci in 0..c {
            for vi in 0..v {
                f.push(velocity_weight * (at(ci, t + 1, vi) - at(ci, t, vi)));
            }
        }
    }
    f
}

/// 1-nearest-neighbour accuracy of single frames between two classes (train -> val frames).
fn frame_1nn_accuracy(
    train: &SkeletonDataset,
    val: &SkeletonDataset,
    classes: [usize; 2],
    velocity_weight: f32,
) -> f64 {
    const STRIDE: usize = 3; // every 3rd frame keeps the test fast
    let frames = train.shape[2] - 1;
    let collect = |ds: &SkeletonDataset| -> Vec<(Vec<f32>, usize)> {
        let mut out = Vec::new();
        for i in 0..ds.len() {
            let l = ds.labels[i] as usize;
            if let Some(k) = classes.iter().position(|&c| c == l) {
                for t in (0..frames).step_by(STRIDE) {
                    out.push((frame_feature(ds, i, t, velocity_weight), k));
                }
            }
        }
        out
    };
    let (tr, te) = (collect(train), collect(val));
    let mut correct = 0;
    for (f, k) in &te {
        let nearest = tr
            .iter()
            .map(|(g, kg)| {
                (
                    f.iter().zip(g).map(|(a, b)| (a - b) * (a - b)).sum::<f32>(),
                    *kg,
                )
            })
            .min_by(|a, b| a.0.total_cmp(&b.0))
            .unwrap();
        correct += (nearest.1 == *k) as usize;
    }
    correct as f64 / te.len() as f64
}

/// The classes of a pair share their poses (single frames are near chance), but their temporal
/// order differs (pose + motion of a frame separates them).
#[test]
fn paired_classes_are_not_separable_from_a_static_frame() {
    let cfg = SynthConfig {
        num_classes: 12,
        train_per_class: 24,
        val_per_class: 12,
        frames: 50,
        max_bodies: 1,
        seed: 11,
        noise: 0.01,
        ..SynthConfig::default()
    };
    let (train, val) = synth::generate(&cfg);
    let mut static_acc = Vec::new();
    let mut motion_acc = Vec::new();
    for a in (0..12).step_by(2) {
        let pair = [a, synth::paired_class(a, 12).unwrap()];
        static_acc.push(frame_1nn_accuracy(&train, &val, pair, 0.0));
        motion_acc.push(frame_1nn_accuracy(&train, &val, pair, 10.0));
    }
    println!("pair 1-NN frame accuracy, static: {static_acc:.3?}, with motion: {motion_acc:.3?}");
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    assert!(
        mean(&static_acc) < 0.62,
        "static frames separate the pairs: {static_acc:?}"
    );
    assert!(
        mean(&motion_acc) > mean(&static_acc) + 0.1,
        "{motion_acc:?} vs {static_acc:?}"
    );
}

// ----------------------------------------------------------------------------- loader

fn loader_cfg(workers: usize) -> LoaderConfig {
    LoaderConfig {
        batch_size: 16,
        seed: 99,
        workers,
        prefetch: 3,
        ..LoaderConfig::default()
    }
}

fn collect(ds: &Arc<SkeletonDataset>, cfg: &LoaderConfig, epoch: usize) -> Vec<Batch> {
    epoch_batches(Arc::clone(ds), cfg, epoch).collect()
}

#[test]
fn drop_last_batch_count_and_sizes() {
    let (train, _) = small_synth(2); // 72 samples
    let ds = Arc::new(train);
    let cfg = loader_cfg(2);
    assert_eq!(batches_per_epoch(72, &cfg), 4);
    let batches = collect(&ds, &cfg, 0);
    assert_eq!(batches.len(), 4);
    for b in &batches {
        assert_eq!(b.views.len(), 2);
        assert_eq!(b.views[0].size(), vec![16, 3, 30, 25, 2]);
        assert_eq!(b.views[0].kind(), tch::Kind::Float);
        assert_eq!(b.labels.size(), vec![16]);
        assert_eq!(b.labels.kind(), tch::Kind::Int64);
        assert_eq!(b.views[0].device(), tch::Device::Cpu);
    }
    let keep = LoaderConfig {
        drop_last: false,
        ..cfg
    };
    assert_eq!(batches_per_epoch(72, &keep), 5);
    let batches = collect(&ds, &keep, 0);
    assert_eq!(batches.len(), 5);
    assert_eq!(batches[4].views[0].size()[0], 8);
}

#[test]
fn every_index_once_per_epoch_and_labels_match() {
    let (train, _) = small_synth(2);
    let ds = Arc::new(train);
    let cfg = LoaderConfig {
        drop_last: false,
        ..loader_cfg(3)
    };
    for epoch in 0..2 {
        let batches = collect(&ds, &cfg, epoch);
        let mut seen: Vec<usize> = batches.iter().flat_map(|b| b.indices.clone()).collect();
        let order = seen.clone();
        seen.sort_unstable();
        assert_eq!(seen, (0..72).collect::<Vec<_>>());
        assert_ne!(order, (0..72).collect::<Vec<_>>(), "shuffled");
        for b in &batches {
            let labels = Vec::<i64>::try_from(&b.labels).unwrap();
            let want: Vec<i64> = b.indices.iter().map(|&i| ds.labels[i]).collect();
            assert_eq!(labels, want);
        }
    }
    // With drop_last, the indices are distinct and 4 x 16 of them.
    let batches = collect(&ds, &loader_cfg(2), 5);
    let mut seen: Vec<usize> = batches.iter().flat_map(|b| b.indices.clone()).collect();
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len(), 64);
}

#[test]
fn loader_is_deterministic_across_worker_counts_and_resumable() {
    let (train, _) = small_synth(2);
    let ds = Arc::new(train);
    let reference = collect(&ds, &loader_cfg(0), 3);
    for workers in [1, 2, 4] {
        let got = collect(&ds, &loader_cfg(workers), 3);
        assert_eq!(got.len(), reference.len());
        for (a, b) in got.iter().zip(&reference) {
            assert_eq!(a.indices, b.indices, "workers {workers}");
            for v in 0..2 {
                assert_eq!(
                    to_vec(&a.views[v]),
                    to_vec(&b.views[v]),
                    "workers {workers}"
                );
            }
        }
    }
    // Resuming at batch 2 gives batches 2.. of the full epoch.
    let resumed: Vec<Batch> = epoch_batches_from(Arc::clone(&ds), &loader_cfg(2), 3, 2).collect();
    assert_eq!(resumed.len(), reference.len() - 2);
    for (a, b) in resumed.iter().zip(&reference[2..]) {
        assert_eq!(a.indices, b.indices);
        assert_eq!(to_vec(&a.views[1]), to_vec(&b.views[1]));
    }
    // Another epoch is another order; another seed other augmentations.
    let other = collect(&ds, &loader_cfg(2), 4);
    assert_ne!(other[0].indices, reference[0].indices);
    // Dropping a loader early stops its workers cleanly.
    let mut early = epoch_batches(Arc::clone(&ds), &loader_cfg(2), 0);
    assert!(early.next().is_some());
    drop(early);
}

#[test]
fn two_views_differ_and_raw_views_are_the_data() {
    let (train, _) = small_synth(2);
    let ds = Arc::new(train);
    let b = collect(&ds, &loader_cfg(2), 0).remove(0);
    assert_ne!(
        to_vec(&b.views[0]),
        to_vec(&b.views[1]),
        "independent augmentations"
    );
    let raw = LoaderConfig {
        augment: None,
        ..loader_cfg(2)
    };
    let b = collect(&ds, &raw, 0).remove(0);
    let x = to_vec(&b.views[0]);
    assert_eq!(x, to_vec(&b.views[1]));
    let len = ds.sample_len();
    for (row, &i) in b.indices.iter().enumerate() {
        assert_eq!(&x[row * len..(row + 1) * len], ds.sample(i));
    }
}

#[test]
fn evaluation_loader_iterates_in_order() {
    let (_, val) = small_synth(2); // 36 samples
    let ds = Arc::new(val);
    let loader = Loader::in_order(Arc::clone(&ds), 10);
    assert_eq!(loader.len(), 4);
    let batches: Vec<Batch> = loader.collect();
    let order: Vec<usize> = batches.iter().flat_map(|b| b.indices.clone()).collect();
    assert_eq!(order, (0..36).collect::<Vec<_>>());
    assert_eq!(batches[3].views.len(), 1);
    assert_eq!(batches[3].views[0].size()[0], 6);
    assert_eq!(
        to_vec(&batches[0].views[0])[..ds.sample_len()],
        *ds.sample(0)
    );
}

#[test]
fn invalid_loader_config_is_an_error() {
    let (train, _) = small_synth(2);
    let cfg = LoaderConfig {
        batch_size: 0,
        ..LoaderConfig::default()
    };
    assert!(cfg.validate(&train).is_err());
    let cfg = LoaderConfig {
        num_views: 0,
        ..LoaderConfig::default()
    };
    assert!(cfg.validate(&train).is_err());
    let r = crossclr::data::loader::try_epoch_batches(Arc::new(train), &cfg, 0);
    assert!(r.is_err());
}

/// Loader throughput with 2 augmented views on NTU-shaped 50-frame data (N x 3 x 50 x 25 x 2).
/// Run: `cargo test --test data_pipeline loader_throughput -- --ignored --nocapture`.
#[test]
#[ignore]
fn loader_throughput() {
    const N: usize = 4096;
    let shape = [N, 3, 50, 25, 2];
    let len: usize = shape[1..].iter().product();
    let data: Vec<f32> = (0..N * len)
        .map(|i| ((i * 7919) % 2003) as f32 * 1e-3)
        .collect();
    let ds = Arc::new(SkeletonDataset {
        data: F32Buf::Owned(data),
        shape,
        labels: (0..N).map(|i| (i % 60) as i64).collect(),
        names: (0..N).map(|i| format!("s{i}")).collect(),
        num_classes: 60,
        layout: Layout::ntu25(),
        source: PathBuf::from("<bench>"),
    });
    for workers in [0, 1, 2, 4] {
        let cfg = LoaderConfig {
            batch_size: 128,
            workers,
            prefetch: 8,
            augment: Some(AugmentConfig::default()),
            ..LoaderConfig::default()
        };
        // Best of 3 epochs (the machine may be shared).
        let mut best = f64::INFINITY;
        let mut samples = 0;
        for epoch in 0..3 {
            let start = std::time::Instant::now();
            samples = 0;
            for b in epoch_batches(Arc::clone(&ds), &cfg, epoch) {
                samples += b.indices.len();
            }
            best = best.min(start.elapsed().as_secs_f64());
        }
        println!(
            "workers {workers}: {samples} samples x 2 views in {best:.3} s = {:.0} samples/s",
            samples as f64 / best
        );
    }
}
