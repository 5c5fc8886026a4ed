//! Pre-training tests on tiny synthetic data (CPU): losses, queues, EMA, shared head, resume,
//! NaN stop, config overrides. Official-width ST-GCN, tiny queue (64), batch 8, T 20.
mod common;
use common::{opts, serial, tiny_config, tiny_data};
use crossclr::data::synth::{generate, SynthConfig};
use crossclr::data::views::View;
use crossclr::data::SkeletonDataset;
use crossclr::ssl::branch::momentum_update;
use crossclr::ssl::model::SslModel;
use crossclr::ssl::Pretrainer;
use crossclr::train::config::PretrainConfig;
use crossclr::train::pretrain::{run_with, RunOptions};
use std::path::Path;
use tch::{Device, Kind, Tensor};

fn fixed_batch(ds: &SkeletonDataset, n: usize) -> Tensor {
    common::batch_of(ds, 0, n)
}

/// With the queue held fixed, repeated SGD steps on one batch lower the loss (both phases).
#[test]
fn loss_finite_and_falls_on_fixed_batch() {
    let _serial = serial();
    let ds = tiny_data();
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config("crossclr2", dir.path(), &["model_args.dropout=0.0"]);
    tch::manual_seed(0);
    let mut t = Pretrainer::from_config(&cfg, &ds.layout, Device::Cpu).unwrap();
    let x = fixed_batch(&ds, 8);
    let x_k = &x * 1.01;
    for epoch in [1usize, 2] {
        let mut losses = Vec::new();
        for _ in 0..6 {
            let out = t.model.forward(&x, &x_k, epoch);
            let l = out.loss.double_value(&[]);
            assert!(l.is_finite(), "loss {l}");
            losses.push(l);
            t.opt.zero_grad();
            out.loss.backward();
            t.opt.step();
        }
        assert!(losses[5] < losses[0], "phase {epoch}: {losses:?}");
    }
    // A full step (with enqueue) is finite too.
    let s = t.train_step(&x, &x_k, 2).unwrap();
    assert!(s.loss.is_finite() && s.phase == 2 && s.view_losses.len() == 2);
}

/// All queues are written at the same slots and the pointers move together.
#[test]
fn queues_aligned() {
    let _serial = serial();
    let ds = tiny_data();
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config("crossclr3", dir.path(), &[]);
    tch::manual_seed(0);
    let mut t = Pretrainer::from_config(&cfg, &ds.layout, Device::Cpu).unwrap();
    let before: Vec<Tensor> = t
        .model
        .branches
        .iter()
        .map(|b| b.queue.keys.copy())
        .collect();
    let x = fixed_batch(&ds, 8);
    t.train_step(&x, &x, 1).unwrap();
    for (b, old) in t.model.branches.iter().zip(&before) {
        assert_eq!(b.queue.ptr, 8);
        let changed = (&b.queue.keys - old)
            .abs()
            .sum_dim_intlist(&[0i64][..], false, Kind::Float)
            .gt(0.0);
        let changed: Vec<bool> = Vec::<bool>::try_from(changed).unwrap();
        assert!(
            changed[..8].iter().all(|&c| c),
            "{}: slots 0..8 written",
            b.view
        );
        assert!(
            changed[8..].iter().all(|&c| !c),
            "{}: other slots untouched",
            b.view
        );
        // Written keys are unit vectors.
        let n = b
            .queue
            .keys
            .narrow(1, 0, 8)
            .norm_scalaropt_dim(2, [0], false);
        assert!(n.allclose(
            &Tensor::ones([8], (Kind::Float, Device::Cpu)),
            1e-4,
            1e-5,
            false
        ));
    }
}

/// EMA with m = 0.5 on tiny tensors: k <- 0.5 k + 0.5 q.
#[test]
fn ema_math() {
    let _serial = serial();
    let q = Tensor::from_slice(&[1.0f32, 3.0]);
    let k = Tensor::from_slice(&[5.0f32, -1.0]);
    momentum_update(&[("w".into(), q.shallow_clone(), k.shallow_clone())], 0.5);
    assert_eq!(Vec::<f32>::try_from(&k).unwrap(), vec![3.0, 1.0]);
    momentum_update(&[("w".into(), q, k.shallow_clone())], 0.5);
    assert_eq!(Vec::<f32>::try_from(&k).unwrap(), vec![2.0, 2.0]);
}

fn model(ds: &SkeletonDataset, dir: &Path, extra: &[&str]) -> SslModel {
    let cfg = tiny_config("crossclr3", dir, extra);
    tch::manual_seed(0);
    Pretrainer::from_config(&cfg, &ds.layout, Device::Cpu)
        .unwrap()
        .model
}

/// The shared-head quirk shares the joint head's variables (same storage) with the motion and
/// bone heads, on both sides, and their EMA walks them; the clean variant shares nothing.
#[test]
fn shared_head_shares_storage() {
    let _serial = serial();
    let ds = tiny_data();
    let dir = tempfile::tempdir().unwrap();
    let m = model(&ds, dir.path(), &[]);
    let q = m.vs_q.variables();
    assert!(q.contains_key("encoder_q.fc.0.weight") && q.contains_key("encoder_q.fc.2.weight"));
    assert!(q.contains_key("encoder_q_motion.fc.0.weight"));
    assert!(
        !q.contains_key("encoder_q_motion.fc.2.weight"),
        "shared layers exist once"
    );
    for b in &m.branches[1..] {
        let shared: Vec<&String> = b
            .ema_pairs
            .iter()
            .map(|(n, _, _)| n)
            .filter(|n| n.starts_with("encoder_q.fc."))
            .collect();
        assert_eq!(shared.len(), 4, "{}: EMA walks the shared layers", b.view);
        let (_, qw, _) = b
            .ema_pairs
            .iter()
            .find(|(n, _, _)| n == "encoder_q.fc.2.weight")
            .unwrap();
        assert_eq!(qw.data_ptr(), q["encoder_q.fc.2.weight"].data_ptr());
    }
    // Gradients of the motion loss reach the shared layers: one forward through the motion head.
    let names: Vec<String> = m.state_tensors().into_iter().map(|(n, _)| n).collect();
    for want in [
        "encoder_q_motion.fc.2.0.weight",
        "encoder_k_bone.fc.2.2.bias",
        "queue_bone",
        "queue_ptr_motion",
    ] {
        assert!(names.iter().any(|n| n == want), "checkpoint lacks {want}");
    }
    let clean = model(&ds, dir.path(), &["shared_head=false"]);
    let cq = clean.vs_q.variables();
    assert!(cq.contains_key("encoder_q_motion.fc.2.weight"));
    assert_ne!(
        cq["encoder_q_motion.fc.2.weight"].data_ptr(),
        cq["encoder_q.fc.2.weight"].data_ptr()
    );
    for b in &clean.branches[1..] {
        assert!(
            b.ema_pairs
                .iter()
                .all(|(n, _, _)| !n.starts_with("encoder_q.")),
            "{}",
            b.view
        );
    }
}

/// Phase 2 with the official flag EMA-updates only the motion key encoder.
#[test]
fn phase2_updates_only_motion_keys() {
    let _serial = serial();
    let ds = tiny_data();
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config("crossclr3", dir.path(), &[]);
    tch::manual_seed(0);
    let mut t = Pretrainer::from_config(&cfg, &ds.layout, Device::Cpu).unwrap();
    let x = fixed_batch(&ds, 8);
    let key = |t: &Pretrainer, n: &str| t.model.vs_k.variables()[n].copy();
    let names = [
        "encoder_k.st_gcn_networks.0.gcn.conv.weight",
        "encoder_k_motion.st_gcn_networks.0.gcn.conv.weight",
        "encoder_k_bone.st_gcn_networks.0.gcn.conv.weight",
    ];
    let before: Vec<Tensor> = names.iter().map(|n| key(&t, n)).collect();
    t.train_step(&x, &x, 2).unwrap();
    let moved: Vec<bool> = names
        .iter()
        .zip(&before)
        .map(|(n, b)| !key(&t, n).equal(b))
        .collect();
    assert_eq!(moved, vec![false, true, false]);
    t.train_step(&x, &x, 1).unwrap();
    let after1: Vec<bool> = names
        .iter()
        .zip(&before)
        .map(|(n, b)| !key(&t, n).equal(b))
        .collect();
    assert_eq!(after1, vec![true, true, true]);
}

fn all_tensors(dir: &Path) -> Vec<(String, Tensor)> {
    let mut v = Tensor::read_safetensors(dir.join("last.safetensors")).unwrap();
    v.extend(Tensor::read_safetensors(dir.join("last.state.safetensors")).unwrap());
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// 2 epochs straight == 1 epoch + resume 1 epoch (weights, queues, pointers, momentum buffers).
#[test]
fn resume_is_exact() {
    let _serial = serial();
    let ds = tiny_data();
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    // 2-view CrosSCLR: shared head, phase 1 then phase 2 (cross_epoch 1), motion-only EMA.
    run_with(&tiny_config("crossclr2", a.path(), &[]), &opts(&ds)).unwrap();
    run_with(
        &tiny_config("crossclr2", b.path(), &["num_epoch=1"]),
        &opts(&ds),
    )
    .unwrap();
    let e = run_with(&tiny_config("crossclr2", b.path(), &[]), &opts(&ds))
        .unwrap_err()
        .to_string();
    assert!(e.contains("--resume"), "{e}");
    let s = run_with(
        &tiny_config("crossclr2", b.path(), &[]),
        &RunOptions {
            resume: true,
            ..opts(&ds)
        },
    )
    .unwrap();
    assert_eq!((s.first_epoch, s.records.len()), (2, 2));
    let (ta, tb) = (all_tensors(a.path()), all_tensors(b.path()));
    assert_eq!(ta.len(), tb.len());
    for ((na, x), (nb, y)) in ta.iter().zip(&tb) {
        assert_eq!(na, nb);
        let d = (x.to_kind(Kind::Double) - y.to_kind(Kind::Double))
            .abs()
            .max()
            .double_value(&[]);
        assert!(d <= 1e-6, "{na} differs by {d}");
    }
    for f in [
        "steps.csv",
        "config.yaml",
        "log.txt",
        "metrics.jsonl",
        "metrics.csv",
        "loss.png",
        "epoch1.json",
        "epoch2.safetensors",
    ] {
        assert!(a.path().join(f).exists(), "{f} missing");
    }
    let csv = std::fs::read_to_string(b.path().join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), 3, "{csv}");
    let steps = std::fs::read_to_string(b.path().join("steps.csv")).unwrap();
    assert_eq!(steps.lines().count(), 1 + 2 * 2, "{steps}");
}

/// A NaN loss stops the run with a clear message and leaves the last good checkpoint intact.
#[test]
fn nan_loss_stops_and_keeps_checkpoint() {
    let _serial = serial();
    let ds = tiny_data();
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config("skeletonclr", dir.path(), &["num_epoch=3"]);
    let e = run_with(
        &cfg,
        &RunOptions {
            inject_nan_from_epoch: Some(2),
            ..opts(&ds)
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("non-finite loss") && e.contains("epoch 2") && e.contains("last.safetensors"),
        "{e}"
    );
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("last.json")).unwrap())
            .unwrap();
    assert_eq!(meta["epoch"], 1);
    for (n, t) in Tensor::read_safetensors(dir.path().join("last.safetensors")).unwrap() {
        if t.kind() == Kind::Float {
            assert!(
                bool::try_from(t.isfinite().all()).unwrap(),
                "{n} not finite"
            );
        }
    }
}

/// Overrides with dotted keys; unknown keys name the key; bad batch/queue combination rejected.
#[test]
fn config_overrides_and_unknown_key() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let c = tiny_config(
        "crossclr3",
        dir.path(),
        &["model_args.Temperature=0.2", "step=[1]"],
    );
    assert_eq!(c.model_args.temperature, 0.2);
    assert_eq!(
        c.views().unwrap(),
        vec![View::Joint, View::Motion, View::Bone]
    );
    let e = PretrainConfig::from_text(
        "",
        false,
        Path::new("x.yaml"),
        &["model_args.graph_args.layuot=ntu25".into()],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("model_args.graph_args.layuot"), "{e}");
    let e = PretrainConfig::from_text("batch_size: 7\n", false, Path::new("x.yaml"), &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("queue_size"), "{e}");
    // Every shipped config loads.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut n = 0;
    for sub in ["", "skeletonclr", "crossclr", "msr", "small"] {
        for entry in std::fs::read_dir(root.join(sub)).unwrap() {
            let p = entry.unwrap().path();
            if p.extension().is_some_and(|e| e == "yaml" || e == "toml") {
                let cfg = PretrainConfig::load(&p, &[])
                    .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                n += 1;
                // The official-scale configs stay exactly official: no small-data lever.
                if sub == "skeletonclr" || sub == "crossclr" {
                    let d = PretrainConfig::default();
                    assert_eq!(
                        (cfg.init, cfg.head_bn, cfg.shuffle_bn, cfg.reverse_negatives),
                        (d.init, d.head_bn, d.shuffle_bn, d.reverse_negatives),
                        "{}",
                        p.display()
                    );
                    assert_eq!((cfg.lr_schedule, cfg.warmup_epochs), (d.lr_schedule, 0));
                    assert_eq!(cfg.uniformity, 0.0, "{}", p.display());
                    assert_eq!(cfg.negatives, d.negatives, "{}", p.display());
                    assert_eq!(
                        cfg.train_feeder_args.augment(),
                        d.train_feeder_args.augment()
                    );
                }
            }
        }
    }
    assert!(n >= 25, "{n} configs");
}

/// Step timing (not a check): `H4_BATCH=128 H4_FRAMES=50 [H4_DEVICE=cuda] [H4_THREADS=n] cargo
/// test --test pretrain -- --ignored --nocapture step_timing`. Prints seconds per `train_step`
/// for SkeletonCLR and CrosSCLR-3 in both phases (queue 32768 as official when the batch divides
/// it, else the largest multiple of the batch below it).
#[test]
#[ignore]
fn step_timing() {
    let _serial = serial();
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    tch::set_num_threads(env("H4_THREADS", num_cpus()) as i32);
    let (batch, frames, reps) = (env("H4_BATCH", 16), env("H4_FRAMES", 50), env("H4_REPS", 2));
    let device = crossclr::device::parse_device(
        &std::env::var("H4_DEVICE").unwrap_or_else(|_| "cpu".into()),
    )
    .unwrap();
    let queue = 32768 / batch * batch;
    let cfg = SynthConfig {
        num_classes: 4,
        train_per_class: batch.div_ceil(4),
        val_per_class: 1,
        frames,
        ..SynthConfig::default()
    };
    let ds = generate(&cfg).0;
    let x = fixed_batch(&ds, batch).to_device(device);
    let dir = tempfile::tempdir().unwrap();
    println!(
        "device {device:?}, torch threads {}",
        tch::get_num_threads()
    );
    for model in ["skeletonclr", "crossclr3"] {
        let c = tiny_config(
            model,
            dir.path(),
            &[
                &format!("batch_size={batch}"),
                &format!("model_args.queue_size={queue}"),
                "cross_epoch=1",
            ],
        );
        tch::manual_seed(0);
        let mut t = Pretrainer::from_config(&c, &ds.layout, device).unwrap();
        for epoch in [1usize, 2] {
            t.train_step(&x, &x, epoch).unwrap(); // warm-up
            let t0 = std::time::Instant::now();
            for _ in 0..reps {
                t.train_step(&x, &x, epoch).unwrap();
            }
            let s = t0.elapsed().as_secs_f64() / reps as f64;
            let phase = t.model.is_cross_epoch(epoch) as u8 + 1;
            println!("{model} phase {phase}: batch {batch} x T {frames}, K {queue}: {s:.4} s/step");
            if model == "skeletonclr" {
                break;
            }
        }
    }
}

fn num_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Checkpoint tensors carry the official 3-view state-dict names and load back; the official
/// duplicate names of the shared head are accepted, unknown names are rejected.
#[test]
fn state_dict_roundtrip_with_official_names() {
    let _serial = serial();
    let ds = tiny_data();
    let dir = tempfile::tempdir().unwrap();
    let a = model(&ds, dir.path(), &[]);
    let tensors = a.state_tensors();
    let names: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
    for want in [
        "encoder_q.A",
        "encoder_q.data_bn.running_var",
        "encoder_k.fc.2.bias",
        "encoder_q_motion.fc.0.weight",
        "encoder_q_motion.fc.2.2.weight",
        "queue",
        "queue_ptr",
        "queue_ptr_bone",
    ] {
        assert!(names.contains(&want), "missing {want}");
    }
    let mut b = model(&ds, dir.path(), &[]);
    tch::no_grad(|| {
        let _ = b.vs_q.variables()["encoder_q_bone.fc.0.weight"]
            .shallow_clone()
            .zero_();
        let _ = b.branches[2].queue.keys.shallow_clone().zero_();
    });
    b.branches[2].queue.ptr = 8;
    b.load_state_tensors(&tensors, Path::new("<mem>")).unwrap();
    let (x, y) = (
        &a.vs_q.variables()["encoder_q_bone.fc.0.weight"],
        &b.vs_q.variables()["encoder_q_bone.fc.0.weight"],
    );
    assert!(x.equal(y) && bool::try_from(x.abs().sum(Kind::Float).gt(0.0)).unwrap());
    assert!(a.branches[2].queue.keys.equal(&b.branches[2].queue.keys));
    assert_eq!(b.branches[2].queue.ptr, 0);
    let mut extra = tensors;
    extra.push((
        "encoder_q.bogus".into(),
        Tensor::zeros([1], (Kind::Float, Device::Cpu)),
    ));
    let e = b
        .load_state_tensors(&extra, Path::new("<mem>"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("encoder_q.bogus"), "{e}");
}

/// The tiny synthetic validation split (4 samples) written as npy + pkl under `dir`, as a
/// `monitor` dataset spec.
fn monitor_split(dir: &Path) -> crossclr::data::formats::DatasetSpec {
    let cfg = SynthConfig {
        num_classes: 4,
        train_per_class: 4,
        val_per_class: 1,
        frames: 20,
        ..SynthConfig::default()
    };
    let (train, val) = generate(&cfg);
    crossclr::data::synth::write(dir, &train, &val).unwrap();
    crossclr::data::formats::DatasetSpec {
        format: crossclr::data::formats::DatasetFormat::Npy,
        data: dir.join("val_data.npy"),
        label: Some(dir.join("val_label.pkl")),
        layout: train.layout.name.clone(),
        part: None,
        mmap: false,
    }
}

/// Collapse diagnostics land in metrics.jsonl / metrics.csv (finite, per view, empty cells on
/// the epochs they skip), in diagnostics.png and in the log (with the collapse warning), and
/// survive a resume.
#[test]
fn diagnostics_written_to_metrics() {
    let _serial = serial();
    let ds = tiny_data();
    let dir = tempfile::tempdir().unwrap();
    let extra = [
        "diagnostics.interval=2",
        "diagnostics.rank_warning=1000",
        "num_epoch=1",
    ];
    run_with(&tiny_config("crossclr2", dir.path(), &extra), &opts(&ds)).unwrap();
    let s = run_with(
        &tiny_config(
            "crossclr2",
            dir.path(),
            &[extra[0], extra[1], "num_epoch=3"],
        ),
        &RunOptions {
            resume: true,
            ..opts(&ds)
        },
    )
    .unwrap();
    // Epoch 1 of the first run was its last: diagnostics ran; then epoch 2 (interval) and 3 (last).
    let with: Vec<usize> = s
        .records
        .iter()
        .filter(|r| r.diagnostics.is_some())
        .map(|r| r.epoch)
        .collect();
    assert_eq!(with, vec![1, 2, 3]);
    let back = crossclr::train::logger::read_records(dir.path(), 3).unwrap();
    assert_eq!(back.len(), 3);
    for r in &back {
        let d = r.diagnostics.as_ref().unwrap();
        assert_eq!(
            d.iter().map(|v| v.view.as_str()).collect::<Vec<_>>(),
            ["joint", "motion"]
        );
        for v in d {
            for x in [
                v.feat_rank,
                v.feat_cos,
                v.proj_rank,
                v.proj_cos,
                v.align,
                v.uniform,
                v.margin,
            ] {
                assert!(x.is_finite(), "epoch {} {v:?}", r.epoch);
            }
            assert!(v.feat_rank >= 1.0 && v.feat_rank <= 16.0, "{v:?}");
            assert!((-1.0..=1.0).contains(&v.feat_cos) && (0.0..=4.0).contains(&v.align));
            assert!((-4.0..=0.0).contains(&v.uniform), "{v:?}");
        }
        assert!(r.knn1.is_none() && r.diag_seconds.is_some());
    }
    let csv = std::fs::read_to_string(dir.path().join("metrics.csv")).unwrap();
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    for c in [
        "joint_feat_rank",
        "motion_margin",
        "joint_uniform",
        "diag_seconds",
    ] {
        assert!(header.contains(&c), "{header:?}");
    }
    for line in lines {
        let cells: Vec<&str> = line.split(',').collect();
        assert_eq!(cells.len(), header.len(), "{line}");
        let i = header
            .iter()
            .position(|&c| c == "motion_proj_rank")
            .unwrap();
        assert!(cells[i].parse::<f64>().unwrap().is_finite(), "{line}");
    }
    assert!(dir.path().join("diagnostics.png").exists());
    let log = std::fs::read_to_string(dir.path().join("log.txt")).unwrap();
    assert!(
        log.contains("diagnostics epoch 2: joint feat rank"),
        "{log}"
    );
    assert!(
        log.contains("WARNING: collapse? joint feature effective rank"),
        "{log}"
    );

    // Interval 2 in a fresh 3-epoch run: epoch 1 has empty diagnostic cells.
    let dir = tempfile::tempdir().unwrap();
    let c = tiny_config(
        "skeletonclr",
        dir.path(),
        &[extra[0], "num_epoch=3", "diagnostics.rank_warning=0"],
    );
    let s = run_with(&c, &opts(&ds)).unwrap();
    assert!(s.records[0].diagnostics.is_none() && s.records[1].diagnostics.is_some());
    let csv = std::fs::read_to_string(dir.path().join("metrics.csv")).unwrap();
    let rows: Vec<Vec<&str>> = csv.lines().map(|l| l.split(',').collect()).collect();
    let i = rows[0]
        .iter()
        .position(|&c| c == "joint_feat_rank")
        .unwrap();
    assert_eq!((rows[1][i], rows[1].len()), ("", rows[0].len()), "{csv}");
    assert!(rows[2][i].parse::<f64>().is_ok(), "{csv}");
    let log = std::fs::read_to_string(dir.path().join("log.txt")).unwrap();
    assert!(!log.contains("WARNING: collapse?"), "{log}");
}

/// Diagnostics (with the head batch norm, whose running statistics they restore) and the k-NN
/// monitor leave training bit-identical: same checkpoint tensors as a run without them.
#[test]
fn diagnostics_do_not_change_training() {
    let _serial = serial();
    let ds = tiny_data();
    let (a, b, m) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let base = ["head_bn=true", "shared_head=false"];
    let off = tiny_config(
        "crossclr2",
        a.path(),
        &[base[0], base[1], "diagnostics.interval=0"],
    );
    let mut on = tiny_config(
        "crossclr2",
        b.path(),
        &[base[0], base[1], "eval_interval=1"],
    );
    on.monitor = Some(monitor_split(m.path()));
    let so = run_with(&off, &opts(&ds)).unwrap();
    let sn = run_with(&on, &opts(&ds)).unwrap();
    assert!(so.records.iter().all(|r| r.diagnostics.is_none()));
    assert!(sn
        .records
        .iter()
        .all(|r| r.diagnostics.is_some() && r.knn1.is_some()));
    assert!(!a.path().join("diagnostics.png").exists());
    let (ta, tb) = (all_tensors(a.path()), all_tensors(b.path()));
    assert_eq!(ta.len(), tb.len());
    assert!(ta.iter().any(|(n, _)| n.contains("fc.1.running_mean")));
    for ((na, x), (nb, y)) in ta.iter().zip(&tb) {
        assert_eq!(na, nb);
        assert!(x.equal(y), "{na} differs");
    }
    let losses = |s: &crossclr::train::pretrain::Summary| -> Vec<f64> {
        s.records.iter().map(|r| r.loss).collect()
    };
    assert_eq!(losses(&so), losses(&sn));
}

/// The k-NN monitor on a labelled split gives k = 1 and k = 20 top-1 in [0, 100] every
/// `eval_interval` epochs and at the last, in metrics.jsonl / csv and the log.
#[test]
fn knn_monitor_runs() {
    let _serial = serial();
    let ds = tiny_data();
    let (dir, m) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut cfg = tiny_config(
        "skeletonclr",
        dir.path(),
        &["diagnostics.interval=0", "eval_interval=2", "num_epoch=3"],
    );
    cfg.monitor = Some(monitor_split(m.path()));
    let s = run_with(&cfg, &opts(&ds)).unwrap();
    let knn: Vec<(usize, Option<f64>, Option<f64>)> = s
        .records
        .iter()
        .map(|r| (r.epoch, r.knn1, r.knn20))
        .collect();
    assert!(knn[0].1.is_none() && knn[0].2.is_none(), "{knn:?}");
    for &(e, k1, k20) in &knn[1..] {
        for v in [k1.unwrap(), k20.unwrap()] {
            assert!((0.0..=100.0).contains(&v), "epoch {e}: {v}");
        }
    }
    assert!(s.records.iter().all(|r| r.diagnostics.is_none()));
    let csv = std::fs::read_to_string(dir.path().join("metrics.csv")).unwrap();
    let header = csv.lines().next().unwrap();
    assert!(header.ends_with(",knn1,knn20,diag_seconds"), "{header}");
    assert!(!header.contains("feat_rank"), "{header}");
    let log = std::fs::read_to_string(dir.path().join("log.txt")).unwrap();
    assert!(
        log.contains("kNN k1 ") && log.contains("bank 16 / queries 4"),
        "{log}"
    );
    assert!(dir.path().join("diagnostics.png").exists());
}

/// The `kernels:` block: dotted overrides reach the encoders, the work_dir's config.yaml holds the
/// set resolved for the device (no `auto` left) and loads back as a config, the log says which
/// kernels ran, and two forms of the same function train to the same losses (dropout off: the
/// reference form draws its dropout mask differently from the fused tail).
#[test]
fn kernels_are_resolved_written_and_used() {
    let _serial = serial();
    let ds = tiny_data();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let common = ["num_epoch=1", "model_args.dropout=0.0"];
    let forced = [
        &common[..],
        &["kernels.stgcn=reference", "kernels.fold_bias=on"],
    ]
    .concat();
    let sa = run_with(&tiny_config("skeletonclr", a.path(), &forced), &opts(&ds)).unwrap();
    let sb = run_with(&tiny_config("skeletonclr", b.path(), &common), &opts(&ds)).unwrap();
    let (la, lb) = (sa.records[0].loss, sb.records[0].loss);
    assert!((la - lb).abs() < 1e-3 * lb.abs(), "{la} vs {lb}");

    let written = PretrainConfig::load(&a.path().join("config.yaml"), &[]).unwrap();
    let k = written.kernels;
    assert_eq!(k.stgcn, crossclr::model::kernels::StGcnForm::Reference);
    assert_eq!(k.fold_bias, crossclr::model::kernels::Switch::On);
    assert_eq!(
        k,
        k.resolved(Device::Cpu),
        "config.yaml holds the resolved set"
    );
    let text = std::fs::read_to_string(b.path().join("config.yaml")).unwrap();
    let block = &text[text.find("kernels:").expect("a kernels block")..];
    assert!(!block.contains("auto"), "{block}");
    assert!(block.contains("fold_bias: off"), "CPU default: {block}");
    let log = std::fs::read_to_string(a.path().join("log.txt")).unwrap();
    assert!(
        log.contains("kernels: stgcn=reference fold_bias=on"),
        "{log}"
    );
}

/// `scale_to_data: true` replaces the queue size and the key momentum by the small-data rule
/// (16 sequences, batch 8, 2 epochs of 2 steps: queue 8, momentum 0.99), says so in the log,
/// writes the resolved values to the work_dir's config.yaml, and a resume re-derives the same.
#[test]
fn scale_to_data_sizes_queue_and_momentum_from_the_data() {
    let _serial = serial();
    let ds = tiny_data();
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(
        "skeletonclr",
        dir.path(),
        &["scale_to_data=true", "num_epoch=1"],
    );
    assert_eq!(cfg.model_args.queue_size, 64);
    run_with(&cfg, &opts(&ds)).unwrap();
    let log = std::fs::read_to_string(dir.path().join("log.txt")).unwrap();
    assert!(
        log.contains(
            "scale_to_data: 16 training sequences, 2 steps -> queue_size 8 (config 64), momentum \
             0.9900"
        ),
        "{log}"
    );
    let written = std::fs::read_to_string(dir.path().join("config.yaml")).unwrap();
    let resolved =
        PretrainConfig::from_text(&written, false, Path::new("config.yaml"), &[]).unwrap();
    assert_eq!(resolved.model_args.queue_size, 8);
    assert!((resolved.model_args.momentum - 0.99).abs() < 1e-12);
    // Off (the default): the config's values.
    let off = tempfile::tempdir().unwrap();
    run_with(
        &tiny_config("skeletonclr", off.path(), &["num_epoch=1"]),
        &opts(&ds),
    )
    .unwrap();
    let log = std::fs::read_to_string(off.path().join("log.txt")).unwrap();
    assert!(!log.contains("scale_to_data"), "{log}");
    // A resume of the scaled run (one more epoch) derives the same queue and goes on.
    let more = tiny_config(
        "skeletonclr",
        dir.path(),
        &["scale_to_data=true", "num_epoch=2"],
    );
    run_with(
        &more,
        &RunOptions {
            resume: true,
            ..opts(&ds)
        },
    )
    .unwrap();
}
