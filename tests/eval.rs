//! Evaluation protocols: metrics, k-NN, linear heads, subsets, ensemble, plots, t-SNE, end-to-end.
use crossclr::eval::features::FeatureSet;
use crossclr::eval::knn::{self, KnnConfig};
use crossclr::eval::linear::{self, EpochRecord, LinearConfig};
use crossclr::eval::metrics::{self, Metrics};
use crossclr::eval::{split, tsne};
use std::path::Path;
use tch::{Kind, Tensor};

fn scores(rows: &[&[f32]]) -> Tensor {
    let k = rows[0].len() as i64;
    let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_slice(&flat).view([rows.len() as i64, k])
}

fn is_png(path: &Path) -> bool {
    let bytes = std::fs::read(path).unwrap_or_default();
    bytes.len() > 100 && bytes.starts_with(&[0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a])
}

#[test]
fn metrics_on_hand_example() {
    // 6 samples, 6 classes. Row i scores; labels chosen so that:
    // top-1 hits: samples 0, 1, 2 (3/6); sample 3 label is 2nd best, sample 4 label is 5th best,
    // sample 5 label is the worst (6th).
    let s = scores(&[
        &[0.9, 0.1, 0.0, 0.0, 0.0, 0.0],
        &[0.0, 0.8, 0.1, 0.0, 0.0, 0.0],
        &[0.0, 0.1, 0.7, 0.0, 0.0, 0.0],
        &[0.5, 0.0, 0.0, 0.4, 0.0, 0.0],
        &[0.6, 0.5, 0.4, 0.3, 0.2, 0.1],
        &[0.6, 0.5, 0.4, 0.3, 0.2, 0.1],
    ]);
    let labels = [0, 1, 2, 3, 4, 5];
    assert_eq!(metrics::topk_correct(&s, &labels, 1).unwrap(), 3);
    assert_eq!(metrics::topk_correct(&s, &labels, 5).unwrap(), 5);
    let m = metrics::evaluate(&s, &labels).unwrap();
    assert!((m.top1 - 50.0).abs() < 1e-9);
    assert!((m.top5 - 500.0 / 6.0).abs() < 1e-9);
    // Every class has one sample, so mean-class accuracy equals top-1 here.
    assert!((m.mean_class - 50.0).abs() < 1e-9);
    assert_eq!(m.samples, 6);

    // Imbalanced: class 0 has 3 samples (2 right), class 1 has 1 (right): top-1 75%, mean-class
    // (2/3 + 1) / 2 = 83.33%.
    let s = scores(&[&[1.0, 0.0], &[1.0, 0.0], &[0.0, 1.0], &[0.0, 1.0]]);
    let labels = [0, 0, 0, 1];
    let conf = metrics::confusion_matrix(&metrics::predictions(&s), &labels, 2).unwrap();
    assert_eq!(conf, vec![vec![2, 1], vec![0, 1]]);
    let m = metrics::evaluate(&s, &labels).unwrap();
    assert!((m.top1 - 75.0).abs() < 1e-9);
    assert!((m.mean_class - 250.0 / 3.0).abs() < 1e-9);
    // Top-5 with only 2 classes is 100%.
    assert!((m.top5 - 100.0).abs() < 1e-9);
    let csv = metrics::confusion_csv(&conf, &["walk".into(), "sit, down".into()]);
    assert_eq!(
        csv,
        "true\\predicted,walk,\"sit, down\"\nwalk,2,1\n\"sit, down\",0,1\n"
    );
    // Bad labels are errors, not panics.
    assert!(metrics::evaluate(&s, &[0, 0, 0, 7]).is_err());
    assert!(metrics::evaluate(&s, &[0, 0]).is_err());
}

#[test]
fn knn_on_toy_features() {
    // Bank: class 0 near +x, class 1 near +y, class 2 near -x.
    let bank = scores(&[
        &[1.0, 0.1],
        &[2.0, -0.1],
        &[0.1, 1.0],
        &[-0.1, 3.0],
        &[-1.0, 0.05],
        &[-1.0, -0.05],
    ]);
    let bank_labels = [0, 0, 1, 1, 2, 2];
    let query = scores(&[&[5.0, 0.2], &[0.3, 1.0], &[-2.0, 0.1], &[0.0, -1.0]]);
    let s1 = knn::knn_scores(
        &[bank.shallow_clone()],
        &bank_labels,
        &[query.shallow_clone()],
        3,
        &KnnConfig::nearest(),
    )
    .unwrap();
    assert_eq!(metrics::predictions(&s1)[..3], [0, 1, 2]);
    // Unweighted k=1 gives exactly one vote.
    assert_eq!(s1.sum(Kind::Float).double_value(&[]), 4.0);
    // Weighted k=20 (clamped to the 6 bank rows): query 3 (0,-1) has cosine -0.1/.. with class 0
    // rows, ~-1 with class 1, ~0 with class 2 -> class 0 (row [2,-0.1]) or 2 ([-1,-0.05]) win.
    let cfg = KnnConfig {
        k: 20,
        temperature: Some(0.07),
    };
    let s20 = knn::knn_scores(
        &[bank.shallow_clone()],
        &bank_labels,
        &[query.shallow_clone()],
        3,
        &cfg,
    )
    .unwrap();
    assert_eq!(s20.size(), vec![4, 3]);
    assert_eq!(metrics::predictions(&s20)[..3], [0, 1, 2]);
    // The weights are exp(cos / 0.07): check row 0's class-1 score by hand.
    let q = [5.0f64, 0.2];
    let cos = |b: [f64; 2]| {
        (q[0] * b[0] + q[1] * b[1])
            / ((q[0] * q[0] + q[1] * q[1]).sqrt() * (b[0] * b[0] + b[1] * b[1]).sqrt())
    };
    let want = (cos([0.1, 1.0]) / 0.07).exp() + (cos([-0.1, 3.0]) / 0.07).exp();
    let got = s20.double_value(&[0, 1]);
    assert!((got - want).abs() / want < 1e-4, "{got} vs {want}");
    let out = knn::evaluate(
        &[bank],
        &bank_labels,
        &[query],
        &[0, 1, 2, 1],
        3,
        &[KnnConfig::nearest(), cfg],
    )
    .unwrap();
    assert_eq!(out.len(), 2);
    assert!((out[0].metrics.top1 - 75.0).abs() < 1e-9);
}

/// Separable toy features: class c has mean 3 * e_c in 8 dims plus small noise.
fn toy_features(n_per_class: usize, classes: usize, seed: i64) -> FeatureSet {
    tch::manual_seed(seed);
    let d = 8i64;
    let labels: Vec<i64> = (0..n_per_class * classes)
        .map(|i| (i % classes) as i64)
        .collect();
    let y = Tensor::from_slice(&labels);
    let means =
        Tensor::eye(classes as i64, (Kind::Float, tch::Device::Cpu)).narrow(1, 0, classes as i64)
            * 3.0;
    let means = Tensor::cat(
        &[
            means,
            Tensor::zeros(
                [classes as i64, d - classes as i64],
                (Kind::Float, tch::Device::Cpu),
            ),
        ],
        1,
    );
    let x = means.index_select(0, &y)
        + Tensor::randn([labels.len() as i64, d], (Kind::Float, tch::Device::Cpu)) * 0.3;
    let names = (0..labels.len()).map(|i| format!("s{i}")).collect();
    FeatureSet::new(vec!["joint".into()], vec![x], labels, names, classes).unwrap()
}

#[test]
fn linear_on_separable_features() {
    let train = toy_features(40, 4, 1);
    let test = toy_features(20, 4, 2);
    let (tr_idx, va_idx) = split::stratified_split(&train.labels, 4, 0.25, 7).unwrap();
    let (tr, va) = (train.subset(&tr_idx), train.subset(&va_idx));
    let cfg = LinearConfig {
        epochs: 10,
        lr: 0.5,
        steps: vec![8],
        batch_size: 16,
        eval_interval: 2,
        ..Default::default()
    };
    let out = linear::train_linear(&tr, Some(&va), &test, &cfg).unwrap();
    assert!(out.last.top1 > 99.0, "last top-1 {}", out.last.top1);
    assert_eq!(out.history.len(), 10);
    // Evaluations at epochs 2, 4, 6, 8, 10.
    let evaluated: Vec<usize> = out
        .history
        .iter()
        .filter(|r| r.test.is_some())
        .map(|r| r.epoch)
        .collect();
    assert_eq!(evaluated, vec![2, 4, 6, 8, 10]);
    assert!(out.history[8].lr < out.history[7].lr);
    assert!(out.best_test.test.top1 >= out.last.top1);
    assert!(out.val_selected.is_some());
    assert_eq!(out.test_scores.size(), vec![80, 4]);
    // Same seed, same result.
    let again = linear::train_linear(&tr, Some(&va), &test, &cfg).unwrap();
    assert_eq!(
        again.history.last().unwrap().loss,
        out.history.last().unwrap().loss
    );
}

fn record(epoch: usize, val: Option<f64>, test: Option<f64>) -> EpochRecord {
    let m = |t: f64| Metrics {
        top1: t,
        top5: 100.0,
        mean_class: t,
        samples: 10,
    };
    EpochRecord {
        epoch,
        lr: 1.0,
        loss: 0.0,
        train_top1: 0.0,
        val: val.map(m),
        test: test.map(m),
    }
}

#[test]
fn selection_rules() {
    // Test peaks at epoch 10 (80), validation peaks at epoch 15 (where test is 70); last is 60.
    let h = vec![
        record(5, Some(50.0), Some(60.0)),
        record(10, Some(55.0), Some(80.0)),
        record(15, Some(65.0), Some(70.0)),
        record(20, Some(65.0), Some(60.0)),
        record(21, None, None),
    ];
    let (best, by_val) = linear::select(&h);
    let best = best.unwrap();
    assert_eq!((best.epoch, best.test.top1), (10, 80.0));
    let by_val = by_val.unwrap();
    // Ties in validation go to the earliest epoch.
    assert_eq!((by_val.epoch, by_val.test.top1), (15, 70.0));
    assert!(
        linear::is_eval_epoch(100, 5, 100)
            && linear::is_eval_epoch(7, 5, 7)
            && !linear::is_eval_epoch(7, 5, 9)
    );
    assert_eq!(linear::step_lr(3.0, &[80], 0.1, 79), 3.0);
    assert!((linear::step_lr(3.0, &[80], 0.1, 80) - 0.3).abs() < 1e-12);
}

#[test]
fn semi_subset_is_balanced_and_seeded() {
    // Class sizes 100, 50, 7, 1.
    let mut labels = vec![0i64; 100];
    labels.extend(vec![1; 50]);
    labels.extend(vec![2; 7]);
    labels.push(3);
    let a = split::balanced_subset(&labels, 4, 0.1, 42).unwrap();
    let count = |idx: &[usize], c: i64| idx.iter().filter(|&&i| labels[i] == c).count();
    assert_eq!(
        [count(&a, 0), count(&a, 1), count(&a, 2), count(&a, 3)],
        [10, 5, 1, 1]
    );
    let b = split::balanced_subset(&labels, 4, 0.1, 42).unwrap();
    assert_eq!(a, b);
    let c = split::balanced_subset(&labels, 4, 0.1, 43).unwrap();
    assert_ne!(a, c);
    assert!(a.windows(2).all(|w| w[0] < w[1]));
    let one = split::balanced_subset(&labels, 4, 0.01, 0).unwrap();
    assert_eq!(
        [
            count(&one, 0),
            count(&one, 1),
            count(&one, 2),
            count(&one, 3)
        ],
        [1, 1, 1, 1]
    );
}

#[test]
fn plots_write_pngs() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("curves.png");
    crossclr::plot::line_chart(
        &p,
        "loss",
        "epoch",
        "value",
        &[
            ("train", vec![(1.0, 2.0), (2.0, 1.0), (3.0, 0.5)]),
            ("val", vec![(1.0, 2.5), (3.0, f64::NAN)]),
        ],
    )
    .unwrap();
    assert!(is_png(&p));
    let h = dir.path().join("sub/confusion.png");
    let m = vec![vec![3.0, 1.0], vec![0.0, 4.0]];
    crossclr::plot::heatmap(
        &h,
        "confusion",
        &m,
        &["a".into(), "b".into()],
        &["a".into(), "b".into()],
    )
    .unwrap();
    assert!(is_png(&h));
    let one = dir.path().join("one.png");
    crossclr::plot::heatmap(&one, "1x1", &[vec![5.0]], &["only".into()], &[]).unwrap();
    assert!(is_png(&one));
    let s = dir.path().join("tsne.png");
    crossclr::plot::scatter(
        &s,
        "t-SNE",
        &[(0.0, 0.0, 0), (1.0, 1.0, 1), (0.5, 0.2, 1)],
        &["x".into()],
    )
    .unwrap();
    assert!(is_png(&s));
    // No temporary files are left behind.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty());
    assert!(crossclr::plot::heatmap(&h, "bad", &[vec![1.0], vec![1.0, 2.0]], &[], &[]).is_err());
}

#[test]
fn tsne_separates_clusters() {
    let set = toy_features(30, 3, 5);
    let cfg = tsne::TsneConfig {
        iterations: 500,
        perplexity: 10.0,
        ..Default::default()
    };
    let y = tsne::tsne(&set.features[0], &cfg).unwrap();
    assert_eq!(y.size(), vec![90, 2]);
    // Each point's nearest embedded neighbour has its class.
    let d = (y.unsqueeze(1) - y.unsqueeze(0)).square().sum_dim_intlist(
        [2i64].as_slice(),
        false,
        Kind::Double,
    ) + Tensor::eye(90, (Kind::Double, tch::Device::Cpu)) * 1e9;
    let nn: Vec<i64> = Vec::try_from(&d.argmin(1, false)).unwrap();
    let agree = nn
        .iter()
        .enumerate()
        .filter(|(i, &j)| set.labels[*i] == set.labels[j as usize])
        .count();
    println!("t-SNE: {agree}/90 nearest neighbours share the class");
    assert!(agree >= 85, "{agree}/90 neighbours agree");
    let idx = tsne::subsample(&[0, 1, 2, 2, 2, 1, 3], 2, 100, 0);
    assert_eq!(idx, vec![1, 2, 3, 4, 5]);
}

/// Speed of the linear protocol on NTU-60-size random features (40k x 256, 60 classes, 100 epochs).
/// Run with `cargo test --test eval -- --ignored --nocapture linear_speed` (SPEED_EPOCHS,
/// SPEED_THREADS optional).
#[test]
#[ignore]
fn linear_speed_ntu60_size() {
    tch::manual_seed(0);
    // SPEED_THREADS: libtorch threads of the training loop (default 1, LinearConfig's default).
    let threads = std::env::var("SPEED_THREADS")
        .ok()
        .and_then(|e| e.parse().ok())
        .unwrap_or(1);
    let n = 40_000;
    let labels: Vec<i64> = (0..n).map(|i| (i % 60) as i64).collect();
    let names: Vec<String> = (0..n).map(|i| i.to_string()).collect();
    let x = Tensor::randn([n as i64, 256], (Kind::Float, tch::Device::Cpu));
    let train = FeatureSet::new(vec!["joint".into()], vec![x], labels, names, 60).unwrap();
    let test = train.subset(&(0..16_000).collect::<Vec<_>>());
    let t = std::time::Instant::now();
    let epochs = std::env::var("SPEED_EPOCHS")
        .ok()
        .and_then(|e| e.parse().ok())
        .unwrap_or(100);
    let out = linear::train_linear(
        &train,
        None,
        &test,
        &LinearConfig {
            epochs,
            cpu_threads: threads,
            ..Default::default()
        },
    )
    .unwrap();
    println!(
        "linear {epochs} epochs 40k x 256 x 60: {:.2} s (loop {:.2} s), last top-1 {:.2}",
        t.elapsed().as_secs_f64(),
        out.seconds,
        out.last.top1
    );
}

/// A small slice of the demo dataset written in the generic format: (train, val) subsets with
/// `per_class_train` / `per_class_val` samples of each class.
/// [`small_demo`] in a temporary folder, opened as the evaluation commands open it (the folder
/// lives as long as the returned guard).
fn small_demo_splits(
    per_class_train: usize,
    per_class_val: usize,
) -> (tempfile::TempDir, crossclr::eval::args::Splits) {
    let data = tempfile::tempdir().unwrap();
    small_demo(data.path(), per_class_train, per_class_val);
    let args = crossclr::eval::args::DatasetArgs {
        data_dir: Some(data.path().to_path_buf()),
        format: "npy".into(),
        ..Default::default()
    };
    let splits = args.open().unwrap();
    (data, splits)
}

fn small_demo(dir: &Path, per_class_train: usize, per_class_val: usize) {
    use crossclr::data::synth;
    let (train, val) = synth::demo_dataset(3);
    let pick = |ds: &crossclr::data::SkeletonDataset, per: usize| -> Vec<usize> {
        let mut taken = vec![0usize; ds.num_classes];
        (0..ds.len())
            .filter(|&i| {
                let c = ds.labels[i] as usize;
                taken[c] += 1;
                taken[c] <= per
            })
            .collect()
    };
    let (tr, va) = (
        train.subset(&pick(&train, per_class_train)),
        val.subset(&pick(&val, per_class_val)),
    );
    synth::write(dir, &tr, &va).unwrap();
}

fn tiny_encoder(
    streams: &str,
    weights: Option<std::path::PathBuf>,
) -> crossclr::eval::protocol::EncoderSetup {
    crossclr::eval::protocol::EncoderSetup {
        weights,
        streams: crossclr::eval::encoder::parse_streams(streams, &[]).unwrap(),
        random: crossclr::model::stgcn::StGcnConfig {
            hidden_channels: 4,
            hidden_dim: 16,
            ..Default::default()
        },
        seed: 1,
        recalibrate_bn: false,
    }
}

#[test]
fn linear_end_to_end_on_demo_data() {
    use crossclr::eval::protocol::{self, OutputOptions};
    // Tests share the process: keep libtorch from oversubscribing the CPU.
    tch::set_num_threads(1);
    let (_data, splits) = small_demo_splits(4, 2);
    let k = splits.train.num_classes;
    assert_eq!(splits.class_names.len(), k);
    let work = tempfile::tempdir().unwrap();
    let opts = OutputOptions {
        work_dir: Some(work.path().to_path_buf()),
        save_features: true,
        ..Default::default()
    };
    let cfg = LinearConfig {
        epochs: 6,
        lr: 0.5,
        steps: vec![4],
        batch_size: 8,
        eval_interval: 2,
        ..Default::default()
    };
    let s = protocol::run_linear(
        &splits,
        &tiny_encoder("joint,motion", None),
        &cfg,
        0.25,
        tch::Device::Cpu,
        &opts,
    )
    .unwrap();
    assert_eq!(s.test_samples, 2 * k);
    assert_eq!(s.train_samples + s.validation_samples, 4 * k);
    assert_eq!(s.validation_samples, k);
    assert_eq!(s.last.epoch, 6);
    assert!(s.val_selected.is_some());
    for f in [
        "scores.npy",
        "names.txt",
        "confusion.csv",
        "metrics.json",
        "features_train_joint.npy",
        "features_val_motion.npy",
    ] {
        assert!(work.path().join(f).is_file(), "{f} missing");
    }
    for f in ["confusion.png", "tsne.png", "curves.png", "accuracy.png"] {
        assert!(is_png(&work.path().join(f)), "{f} is not a PNG");
    }
    let (shape, _) = crossclr::data::npy::read_f32(&work.path().join("scores.npy")).unwrap();
    assert_eq!(shape, vec![2 * k, k]);
    let names = std::fs::read_to_string(work.path().join("names.txt")).unwrap();
    assert_eq!(names.lines().count(), 2 * k);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(work.path().join("metrics.json")).unwrap())
            .unwrap();
    assert!(json["best_test"]["rule"]
        .as_str()
        .unwrap()
        .contains("test-set selection"));
    assert!(json["last"]["test"]["top1"].as_f64().is_some());
    let csv = std::fs::read_to_string(work.path().join("confusion.csv")).unwrap();
    assert_eq!(csv.lines().count(), k + 1);

    // A feature cache is written on the first run and reused (same results) on the second.
    let cache = work.path().join("cache");
    let opts = OutputOptions {
        feature_cache: Some(cache.clone()),
        tsne: false,
        ..Default::default()
    };
    let setup = tiny_encoder("joint,motion", None);
    let a = protocol::run_linear(&splits, &setup, &cfg, 0.25, tch::Device::Cpu, &opts).unwrap();
    assert!(cache.join("features_key.json").is_file());
    let b = protocol::run_linear(&splits, &setup, &cfg, 0.25, tch::Device::Cpu, &opts).unwrap();
    assert_eq!(a.last.test, b.last.test);
    assert_eq!(a.last.test, s.last.test);
    // A cache file that does not match the checksum its key recorded (torn, or left by another
    // run) is recomputed, never read.
    let f = cache.join("features_val_motion.npy");
    let (shape, data) = crossclr::data::npy::read_f32(&f).unwrap();
    crossclr::data::npy::write_f32(&f, &shape, &vec![0.0; data.len()]).unwrap();
    let c = protocol::run_linear(&splits, &setup, &cfg, 0.25, tch::Device::Cpu, &opts).unwrap();
    assert_eq!(a.last.test, c.last.test);
    assert_eq!(crossclr::data::npy::read_f32(&f).unwrap().1, data);
}

#[test]
fn stream_view_is_computed_and_prefix_is_honoured() {
    use crossclr::data::views::{apply_view, View};
    use crossclr::eval::encoder::{build_encoders, parse_streams, WeightsSource};
    use crossclr::model::stgcn::{StGcn, StGcnConfig};
    // A SkeletonCLR-like checkpoint: one encoder under `encoder_q.` (trained on motion).
    tch::manual_seed(9);
    let layout = crossclr::data::Layout::ntu25();
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let cfg = StGcnConfig {
        hidden_channels: 4,
        hidden_dim: 16,
        ..Default::default()
    };
    let net = StGcn::new(&(vs.root() / "encoder_q"), &cfg, &layout);
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("skeletonclr_motion.safetensors");
    crossclr::model::weights::save_safetensors(&vs, &ckpt).unwrap();

    let streams = parse_streams("motion", &["encoder_q.".to_string()]).unwrap();
    let enc = build_encoders(
        WeightsSource::File(&ckpt),
        &streams,
        &layout,
        3,
        0.0,
        tch::Device::Cpu,
    )
    .unwrap();
    let x = Tensor::randn([2, 3, 12, 25, 2], (Kind::Float, tch::Device::Cpu));
    let got = tch::no_grad(|| enc[0].forward(&x, &layout, false));
    let want = tch::no_grad(|| net.forward(&apply_view(View::Motion, &x, &layout), false));
    let joints = tch::no_grad(|| net.forward(&x, false));
    // Random N(0, 0.02) weights shrink activations layer by layer: compare relative differences.
    let scale = got.abs().max().double_value(&[]);
    assert!(scale > 0.0);
    assert!((&got - want).abs().max().double_value(&[]) < 1e-4 * scale);
    assert!(
        (&got - joints).abs().max().double_value(&[]) > 1e-2 * scale,
        "motion stream must not see joints"
    );
    // Without --prefix: the default motion prefix is absent from this file, and its only encoder
    // is detected (the same weights as the explicit prefix).
    let streams = parse_streams("motion", &[]).unwrap();
    let detected = build_encoders(
        WeightsSource::File(&ckpt),
        &streams,
        &layout,
        3,
        0.0,
        tch::Device::Cpu,
    )
    .unwrap();
    assert_eq!(detected[0].spec.prefix, "encoder_q.");
    let again = tch::no_grad(|| detected[0].forward(&x, &layout, false));
    assert_eq!((&again - &got).abs().max().double_value(&[]), 0.0);
    // A file with two query encoders, neither the bone one: a clear error naming them, not
    // random weights.
    let two = tch::nn::VarStore::new(tch::Device::Cpu);
    let _j = StGcn::new(&(two.root() / "encoder_q"), &cfg, &layout);
    let _m = StGcn::new(&(two.root() / "encoder_q_motion"), &cfg, &layout);
    let two_path = dir.path().join("two.safetensors");
    crossclr::model::weights::save_safetensors(&two, &two_path).unwrap();
    let err = build_encoders(
        WeightsSource::File(&two_path),
        &parse_streams("bone", &[]).unwrap(),
        &layout,
        3,
        0.0,
        tch::Device::Cpu,
    )
    .err()
    .unwrap();
    assert!(
        err.to_string().contains("'encoder_q_motion.'") && err.to_string().contains("--prefix"),
        "{err}"
    );
    // Keyed prefixes.
    let s = parse_streams("joint,bone", &["bone=encoder_q.".to_string()]).unwrap();
    assert_eq!(
        (s[0].prefix.as_str(), s[1].prefix.as_str()),
        ("encoder_q.", "encoder_q.")
    );
    assert!(parse_streams("joint,joint", &[]).is_err());
    assert!(parse_streams("joint", &["a.".into(), "b.".into()]).is_err());
}

#[test]
fn ensemble_weighting() {
    use crossclr::eval::ensemble::{self, WeightedScores};
    let a = scores(&[&[1.0, 0.0], &[0.0, 1.0]]);
    let b = scores(&[&[0.0, 2.0], &[1.0, 0.0]]);
    let fused = ensemble::fuse(&[(a, 0.6), (b, 0.4)]).unwrap();
    let got: Vec<f32> = Vec::try_from(&fused.view([-1])).unwrap();
    let want = [0.6, 0.8, 0.4, 0.6];
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-6, "{got:?}");
    }
    assert!(ensemble::fuse(&[(scores(&[&[1.0]]), 1.0), (scores(&[&[1.0, 2.0]]), 1.0)]).is_err());
    let w: WeightedScores = "/x/joint.npy:0.6".parse().unwrap();
    assert_eq!((w.path.to_str().unwrap(), w.weight), ("/x/joint.npy", 0.6));
    let w: WeightedScores = "c:/scores.npy".parse().unwrap();
    assert_eq!(w.weight, 1.0);
    // Files: names next to a score file must match the labels' names.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.npy");
    crossclr::data::npy::write_f32(&p, &[2, 2], &[1.0, 0.0, 0.0, 1.0]).unwrap();
    std::fs::write(dir.path().join("names.txt"), "a\nb\n").unwrap();
    let files = [WeightedScores {
        path: p.clone(),
        weight: 2.0,
    }];
    let ok = ensemble::fuse_files(&files, Some(&["a".into(), "b".into()])).unwrap();
    assert_eq!(ok.double_value(&[0, 0]), 2.0);
    assert!(ensemble::fuse_files(&files, Some(&["b".into(), "a".into()])).is_err());
}

#[test]
fn semi_end_to_end_writes_balanced_indices() {
    use crossclr::eval::finetune::{self, BnMode, FinetuneConfig};
    use crossclr::eval::protocol::OutputOptions;
    tch::set_num_threads(1);
    let (_data, splits) = small_demo_splits(4, 1);
    let k = splits.train.num_classes;
    let train_names = splits.train.names.clone();
    let train_labels = splits.train.labels.clone();
    let work = tempfile::tempdir().unwrap();
    let opts = OutputOptions {
        work_dir: Some(work.path().to_path_buf()),
        tsne: false,
        ..Default::default()
    };
    let cfg = FinetuneConfig {
        epochs: 2,
        batch_size: 4,
        eval_interval: 1,
        bn: BnMode::Train,
        workers: 1,
        ..Default::default()
    };
    let s = finetune::run(
        splits,
        &tiny_encoder("joint", None),
        &cfg,
        Some(0.5),
        0.0,
        tch::Device::Cpu,
        &opts,
    )
    .unwrap();
    assert_eq!(s.protocol, "semi");
    assert_eq!(s.train_samples, 2 * k);
    assert_eq!(s.test_samples, k);
    assert_eq!(s.history.len(), 2);
    let (shape, idx) =
        crossclr::data::npy::read_i64(&work.path().join("labelled_indices.npy")).unwrap();
    assert_eq!(shape, vec![2 * k]);
    for c in 0..k as i64 {
        assert_eq!(
            idx.iter()
                .filter(|&&i| train_labels[i as usize] == c)
                .count(),
            2
        );
    }
    let txt = std::fs::read_to_string(work.path().join("labelled_indices.txt")).unwrap();
    let first = txt.lines().next().unwrap();
    assert_eq!(
        first,
        format!("{}\t{}", idx[0], train_names[idx[0] as usize])
    );
    for f in [
        "scores.npy",
        "names.txt",
        "confusion.csv",
        "confusion.png",
        "curves.png",
        "metrics.json",
    ] {
        assert!(work.path().join(f).is_file(), "{f} missing");
    }
}

#[test]
fn official_pt_features_match_the_official_encoder() {
    use crossclr::eval::encoder::{build_encoders, parse_streams, WeightsSource};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/official");
    let pt = dir.join("stgcn_official_seed0.pt");
    if !pt.is_file() {
        println!("skipped: {} is absent", pt.display());
        return;
    }
    tch::set_num_threads(1);
    let layout = crossclr::data::Layout::ntu25();
    // The fixture's state dict has no prefix: `--prefix ""`.
    let streams = parse_streams("joint", &[String::new()]).unwrap();
    let enc = build_encoders(
        WeightsSource::File(&pt),
        &streams,
        &layout,
        3,
        0.0,
        tch::Device::Cpu,
    )
    .unwrap();
    let (shape, input) =
        crossclr::data::npy::read_f32(&dir.join("stgcn_official_seed0_input.npy")).unwrap();
    let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    let x = Tensor::from_slice(&input).view(dims.as_slice());
    // The fixture's saved BN statistics are one train-mode update (momentum 0.1) later than those
    // its eval features used (fixture README; tests/parity.rs): with S saved and S' after one more
    // train pass on the same input, the earlier statistics are (1.9 S - S') / 0.9.
    let vars = enc[0].vs.variables();
    let stats: Vec<(Tensor, Tensor)> = vars
        .iter()
        .filter(|(k, _)| k.ends_with("running_mean") || k.ends_with("running_var"))
        .map(|(_, v)| (v.shallow_clone(), v.copy()))
        .collect();
    let _ = tch::no_grad(|| enc[0].forward(&x, &layout, true));
    tch::no_grad(|| {
        for (v, saved) in &stats {
            let earlier = (saved * 1.9 - v) / 0.9;
            v.shallow_clone().copy_(&earlier);
        }
    });
    let got = tch::no_grad(|| enc[0].forward(&x, &layout, false));
    let want = crossclr::data::npy::read_npz_array(
        &dir.join("stgcn_official_seed0.npz"),
        "eval_features256",
    )
    .unwrap();
    let want: Vec<f32> = want.to_f32().unwrap();
    let want = Tensor::from_slice(&want).view([4, 256]);
    let diff = (&got - &want).abs().max().double_value(&[]);
    assert!(
        diff < 1e-4,
        "eval features differ from the official ones by {diff}"
    );
}

#[test]
fn dataset_args_resolve_configs_and_reject_ambiguity() {
    use crossclr::data::formats::DatasetFormat;
    use crossclr::eval::args::DatasetArgs;
    let dir = tempfile::tempdir().unwrap();
    let official = dir.path().join("linear.yaml");
    std::fs::write(
        &official,
        "train_feeder_args:\n  data_path: /d/train_position.npy\n  label_path: /d/train_label.pkl\n\
         test_feeder_args:\n  data_path: /d/val_position.npy\n  label_path: /d/val_label.pkl\n",
    )
    .unwrap();
    let args = DatasetArgs {
        config: Some(official),
        format: "npy".into(),
        ..Default::default()
    };
    let (tr, va) = args.specs().unwrap();
    assert_eq!(tr.data, Path::new("/d/train_position.npy"));
    assert_eq!(va.label.as_deref(), Some(Path::new("/d/val_label.pkl")));
    assert_eq!(
        (tr.format, tr.layout.as_str()),
        (DatasetFormat::Npy, "ntu25")
    );
    let specs = dir.path().join("specs.yaml");
    std::fs::write(
        &specs,
        "train: {format: msr, data: /m, layout: msr20, part: train}\nval: {format: msr, data: /m, layout: msr20, part: test}\n",
    )
    .unwrap();
    let args = DatasetArgs {
        config: Some(specs),
        format: "npy".into(),
        ..Default::default()
    };
    let (tr, va) = args.specs().unwrap();
    assert_eq!(
        (tr.format, va.part.as_deref(), va.layout.as_str()),
        (DatasetFormat::Msr, Some("test"), "msr20")
    );
    // Two sources at once, or none, is an error.
    let both = DatasetArgs {
        data_dir: Some(dir.path().to_path_buf()),
        train_data: Some("x.npy".into()),
        format: "npy".into(),
        ..Default::default()
    };
    assert!(both.specs().is_err());
    assert!(DatasetArgs {
        format: "npy".into(),
        ..Default::default()
    }
    .specs()
    .is_err());
    assert!(DatasetArgs {
        data_dir: Some(dir.path().into()),
        format: "csv".into(),
        ..Default::default()
    }
    .specs()
    .is_err());
}

/// Features like a random encoder's: a large common offset, a weak class signal and noise
/// (`classes` classes, `d` dims), scaled by `scale`.
fn offset_features(n_per_class: usize, classes: usize, seed: i64, scale: f64) -> FeatureSet {
    tch::manual_seed(seed);
    let d = 16i64;
    let k = classes as i64;
    let labels: Vec<i64> = (0..n_per_class * classes)
        .map(|i| (i % classes) as i64)
        .collect();
    let n = labels.len() as i64;
    let y = Tensor::from_slice(&labels);
    let means = Tensor::cat(
        &[
            Tensor::eye(k, (Kind::Float, tch::Device::Cpu)),
            Tensor::zeros([k, d - k], (Kind::Float, tch::Device::Cpu)),
        ],
        1,
    );
    let x = (means.index_select(0, &y)
        + Tensor::randn([n, d], (Kind::Float, tch::Device::Cpu)) * 0.5
        + 20.0)
        * scale;
    let names = (0..labels.len()).map(|i| format!("s{i}")).collect();
    FeatureSet::new(vec!["joint".into()], vec![x], labels, names, classes).unwrap()
}

#[test]
fn standardized_linear_probe_is_scale_invariant() {
    tch::set_num_threads(1);
    let (classes, tiny) = (5, 1e-6);
    let chance = 100.0 / classes as f64;
    let (train, test) = (
        offset_features(40, classes, 11, 1.0),
        offset_features(20, classes, 12, 1.0),
    );
    let (train_t, test_t) = (
        offset_features(40, classes, 11, tiny),
        offset_features(20, classes, 12, tiny),
    );
    // The official recipe (lr 3.0, momentum 0.9, step at 80 %), shortened.
    let raw = LinearConfig {
        epochs: 30,
        steps: vec![24],
        batch_size: 32,
        eval_interval: 5,
        ..Default::default()
    };
    let std_cfg = LinearConfig {
        standardize: true,
        ..raw.clone()
    };
    let a = linear::train_linear(&train, None, &test, &std_cfg).unwrap();
    let b = linear::train_linear(&train_t, None, &test_t, &std_cfg).unwrap();
    println!(
        "standardised: unscaled {:.2}%, x1e-6 {:.2}%",
        a.last.top1, b.last.top1
    );
    assert!(a.last.top1 > chance + 30.0, "{}", a.last.top1);
    // Scale invariance: the same accuracy (to one test sample) and nearly the same loss curve.
    assert!((a.last.top1 - b.last.top1).abs() <= 100.0 / test.len() as f64 + 1e-9);
    let (la, lb) = (
        a.history.last().unwrap().loss,
        b.history.last().unwrap().loss,
    );
    assert!((la - lb).abs() <= 1e-2 * la.abs().max(0.1), "{la} vs {lb}");
    assert_eq!(a.feature_norms.len(), 1);
    let s = a.feature_norms[0].prescale;
    let st = b.feature_norms[0].prescale;
    assert!((st / s - tiny).abs() < 1e-3 * tiny, "{s} {st}");
    assert_eq!(a.feature_norms[0].num_batches_tracked, 30 * (200 / 32));

    // Without standardisation the tiny features cannot move the lr-3.0 probe: only the biases
    // learn, every test sample gets the same class, chance accuracy.
    let c = linear::train_linear(&train_t, None, &test_t, &raw).unwrap();
    println!("raw x1e-6: {:.2}%", c.last.top1);
    assert!(c.last.top1 < chance + 5.0, "{}", c.last.top1);
    assert!(c.feature_norms.is_empty());
    // A bare BatchNorm1d (absolute eps 1e-5, no prescale) does not rescue them either: eps
    // swamps their variance (~5e-13).
    let bare = LinearConfig {
        standardize_prescale: false,
        ..std_cfg.clone()
    };
    let d = linear::train_linear(&train_t, None, &test_t, &bare).unwrap();
    println!("bare BatchNorm x1e-6: {:.2}%", d.last.top1);
    assert!(d.last.top1 < chance + 5.0, "{}", d.last.top1);
    // On unit-scale features the bare BatchNorm works (and nearly equals the prescaled one).
    let e = linear::train_linear(&train, None, &test, &bare).unwrap();
    assert!(e.last.top1 > chance + 30.0, "{}", e.last.top1);
}

#[test]
fn feature_norm_matches_batch_norm1d() {
    use crossclr::eval::linear::{FeatureNorm, NORM_EPS, NORM_MOMENTUM};
    tch::manual_seed(3);
    let opts = (Kind::Float, tch::Device::Cpu);
    let d = 6i64;
    let x = Tensor::randn([48, d], opts) * Tensor::linspace(0.5, 3.0, d, opts)
        + Tensor::linspace(-2.0, 5.0, d, opts);
    let close = |a: &Tensor, b: &Tensor, tol: f64| {
        let err = (a - b).abs().max().double_value(&[]);
        assert!(err < tol, "max difference {err}");
    };
    for prescaled in [false, true] {
        let mut norm = FeatureNorm::new(d, NORM_EPS, NORM_MOMENTUM, tch::Device::Cpu);
        // The reference: PyTorch's batch_norm (= F.batch_norm / BatchNorm1d(affine=False)) on
        // x / s, s computed by hand in f64.
        let s = if prescaled {
            let v: Vec<f64> = Vec::try_from(&x.to_kind(Kind::Double).var_dim(
                [0i64].as_slice(),
                false,
                false,
            ))
            .unwrap();
            (v.iter().sum::<f64>() / v.len() as f64).sqrt()
        } else {
            1.0
        };
        if prescaled {
            norm = norm.prescaled(&x);
            assert!(
                (norm.prescale - s).abs() < 1e-6 * s,
                "{} {s}",
                norm.prescale
            );
        }
        let rm = Tensor::zeros([d], opts);
        let rv = Tensor::ones([d], opts);
        for b in 0..3 {
            let batch = x.narrow(0, 16 * b, 16);
            let got = norm.train_forward(&batch);
            let want = Tensor::batch_norm(
                &(&batch / s),
                None::<&Tensor>,
                None::<&Tensor>,
                Some(&rm),
                Some(&rv),
                true,
                NORM_MOMENTUM,
                NORM_EPS,
                false,
            );
            close(&got, &want, 1e-5);
            close(&norm.running_mean, &rm, 1e-6);
            close(&norm.running_var, &rv, 1e-6);
        }
        assert_eq!(norm.num_batches_tracked, 3);
        // The running variance is the unbiased one: after one batch from the start (0, 1) it is
        // 0.9 + 0.1 * var_unbiased.
        let mut one = FeatureNorm::new(d, NORM_EPS, NORM_MOMENTUM, tch::Device::Cpu);
        let first = x.narrow(0, 0, 16);
        let _ = one.train_forward(&first);
        let unbiased = first.var_dim([0i64].as_slice(), true, false);
        close(&one.running_var, &(unbiased * 0.1 + 0.9), 1e-5);
        // Evaluation uses the running statistics.
        let got = norm.eval_forward(&x);
        let want = Tensor::batch_norm(
            &(&x / s),
            None::<&Tensor>,
            None::<&Tensor>,
            Some(&rm),
            Some(&rv),
            false,
            NORM_MOMENTUM,
            NORM_EPS,
            false,
        );
        close(&got, &want, 1e-5);
    }
}

#[test]
fn standardize_auto_resolves_on_for_a_random_encoder_only() {
    use crossclr::eval::linear::Standardize;
    use crossclr::eval::protocol;
    assert!(Standardize::Auto.resolve(true));
    assert!(!Standardize::Auto.resolve(false));
    assert!(Standardize::On.resolve(false) && Standardize::On.resolve(true));
    assert!(!Standardize::Off.resolve(true) && !Standardize::Off.resolve(false));
    assert_eq!(Standardize::default(), Standardize::Auto);
    let random = tiny_encoder("joint,bone", None);
    let trained = tiny_encoder("joint,bone", Some("w.safetensors".into()));
    assert!(protocol::resolve_standardize(Standardize::Auto, &random));
    assert!(!protocol::resolve_standardize(Standardize::Auto, &trained));
    assert!(protocol::resolve_standardize(Standardize::On, &trained));
    // The baseline of a trained setup is the `--weights none` encoder of the same streams.
    let base = protocol::random_baseline(&trained);
    assert!(base.weights.is_none());
    assert_eq!(base.streams, trained.streams);
    assert_eq!(base.seed, trained.seed);
    assert_eq!(
        serde_json::to_value(&base.random).unwrap(),
        serde_json::to_value(&random.random).unwrap()
    );
    // Old configs (no standardisation keys) still load, with standardisation off.
    let mut old = serde_json::to_value(LinearConfig::default()).unwrap();
    for k in ["standardize", "standardize_eps", "standardize_prescale"] {
        old.as_object_mut().unwrap().remove(k);
    }
    let cfg: LinearConfig = serde_json::from_value(old).unwrap();
    assert_eq!(cfg, LinearConfig::default());
    assert!(!cfg.standardize);
}

/// Runs the binary; returns stdout (panics with stderr on failure).
fn crossclr_cli(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_crossclr"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "crossclr {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn cli_baseline_random_matches_weights_none() {
    use crossclr::model::stgcn::{StGcn, StGcnConfig};
    let data = tempfile::tempdir().unwrap();
    small_demo(data.path(), 4, 2);
    // A "trained" checkpoint: any encoder with the tiny config under `encoder_q.`.
    tch::manual_seed(5);
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let cfg = StGcnConfig {
        hidden_channels: 4,
        hidden_dim: 16,
        ..Default::default()
    };
    let _net = StGcn::new(
        &(vs.root() / "encoder_q"),
        &cfg,
        &crossclr::data::Layout::ntu25(),
    );
    let work = tempfile::tempdir().unwrap();
    let ckpt = work.path().join("w.safetensors");
    crossclr::model::weights::save_safetensors(&vs, &ckpt).unwrap();
    let dir = |n: &str| work.path().join(n).display().to_string();
    let data_dir = data.path().display().to_string();
    let common = [
        "--data-dir",
        &data_dir,
        "--hidden-channels",
        "4",
        "--hidden-dim",
        "16",
        "--no-tsne",
        "--threads",
        "1",
        "--seed",
        "2",
    ];
    let lin = ["--epochs", "4", "--eval-interval", "2", "--batch", "8"];
    let trained_dir = dir("trained");
    let ckpt_s = ckpt.display().to_string();
    let mut args = vec!["linear", "--weights", &ckpt_s, "--baseline", "random"];
    args.extend(common);
    args.extend(lin);
    args.extend(["--work-dir", &trained_dir]);
    let stdout = crossclr_cli(&args);
    assert!(
        stdout.contains("trained encoder vs random-encoder baseline"),
        "{stdout}"
    );
    let none_dir = dir("none");
    let mut args = vec!["linear", "--weights", "none"];
    args.extend(common);
    args.extend(lin);
    args.extend(["--work-dir", &none_dir]);
    crossclr_cli(&args);

    let trained = read_json(&work.path().join("trained/metrics.json"));
    let base = read_json(&work.path().join("trained/baseline_random/metrics.json"));
    let none = read_json(&work.path().join("none/metrics.json"));
    // auto: the trained encoder keeps the official recipe, the random one is standardised.
    assert_eq!(trained["config"]["standardize"], false);
    assert_eq!(trained["extra"]["standardize"]["on"], false);
    assert_eq!(trained["extra"]["standardize_request"], "auto");
    assert_eq!(base["config"]["standardize"], true);
    assert_eq!(base["extra"]["standardize"]["on"], true);
    assert_eq!(none["config"]["standardize"], true);
    // The baseline is exactly the `--weights none` run: same figures, same scores.
    assert_eq!(base["weights"], none["weights"]);
    assert_eq!(base["last"], none["last"]);
    assert_eq!(base["best_test"], none["best_test"]);
    assert_eq!(trained["extra"]["baseline_random"]["last"], none["last"]);
    assert_eq!(
        std::fs::read(work.path().join("trained/baseline_random/scores.npy")).unwrap(),
        std::fs::read(work.path().join("none/scores.npy")).unwrap()
    );
    // --standardize on applies to both encoders.
    let on_dir = dir("on");
    let mut args = vec![
        "linear",
        "--weights",
        &ckpt_s,
        "--baseline",
        "random",
        "--standardize",
        "on",
    ];
    args.extend(common);
    args.extend(lin);
    args.extend(["--work-dir", &on_dir]);
    crossclr_cli(&args);
    let on = read_json(&work.path().join("on/metrics.json"));
    assert_eq!(on["config"]["standardize"], true);
    assert_eq!(
        on["extra"]["baseline_random"]["config"]["standardize"],
        true
    );

    // k-NN: both printed, the baseline equal to `--weights none`.
    let knn_dir = dir("knn");
    let mut args = vec!["knn", "--weights", &ckpt_s, "--baseline", "random"];
    args.extend(common);
    args.extend(["--work-dir", &knn_dir]);
    let stdout = crossclr_cli(&args);
    assert!(stdout.contains("random-encoder baseline"), "{stdout}");
    let knn_none_dir = dir("knn_none");
    let mut args = vec!["knn", "--weights", "none"];
    args.extend(common);
    args.extend(["--work-dir", &knn_none_dir]);
    crossclr_cli(&args);
    let k = read_json(&work.path().join("knn/metrics.json"));
    let kb = read_json(&work.path().join("knn/baseline_random/metrics.json"));
    let kn = read_json(&work.path().join("knn_none/metrics.json"));
    assert_eq!(kb["results"], kn["results"]);
    assert_eq!(k["baseline_random"]["results"], kn["results"]);
    assert!(kn.get("baseline_random").is_none());
}

/// `embed` on a SkeletonCLR-style file (query and key encoders, as `pretrain` writes) without
/// `--prefix`: the joint query encoder is detected and named, and its features are written.
#[test]
fn embed_detects_the_query_encoder_of_a_pretrain_checkpoint() {
    use crossclr::model::stgcn::{StGcn, StGcnConfig};
    let layout = crossclr::data::Layout::ntu25();
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let cfg = StGcnConfig {
        hidden_channels: 4,
        hidden_dim: 16,
        ..Default::default()
    };
    let _q = StGcn::new(&(vs.root() / "encoder_q"), &cfg, &layout);
    let _k = StGcn::new(&(vs.root() / "encoder_k"), &cfg, &layout);
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("last.safetensors");
    crossclr::model::weights::save_safetensors(&vs, &weights).unwrap();
    let input = dir.path().join("x.npy");
    let x: Vec<f32> = (0..2 * 3 * 8 * 25 * 2)
        .map(|i| (i % 7) as f32 * 0.1)
        .collect();
    crossclr::data::npy::write_f32(&input, &[2, 3, 8, 25, 2], &x).unwrap();
    let output = dir.path().join("f.npy");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_crossclr"))
        .args(["embed", "--weights"])
        .arg(&weights)
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("encoder 'encoder_q.'") && stderr.contains("query encoder"),
        "{stderr}"
    );
    let (shape, _) = crossclr::data::npy::mmap_f32(&output).unwrap();
    assert_eq!(shape, vec![2, 16]);
}
