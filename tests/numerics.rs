//! The numerics guards (`numerics` config block, docs/reliability.md): a NaN loss or gradient
//! stops the run naming the epoch, the step and the tensor, keeps the last good checkpoint and
//! resumes exactly; `non_finite: skip` skips the step without a trace in the model and counts it;
//! a loss above the divergence bound is reported (or stops the run).
mod common;
use common::{batch_of as batch, opts, serial, tiny_config, tiny_data};
use crossclr::data::SkeletonDataset;
use crossclr::ssl::Pretrainer;
use crossclr::train::config::PretrainConfig;
use crossclr::train::pretrain::{run_with, NanInjection, RunOptions};
use std::path::Path;
use tch::{Device, Kind, Tensor};

fn injected(ds: &std::sync::Arc<SkeletonDataset>, spec: &str) -> RunOptions {
    RunOptions {
        inject_nan: Some(spec.parse::<NanInjection>().unwrap()),
        ..opts(ds)
    }
}

/// Every tensor of the model, the optimiser's momentum buffers included, as (name, tensor).
fn everything(t: &Pretrainer) -> Vec<(String, Tensor)> {
    let mut all = t.model.state_tensors();
    for (n, b) in t.opt.state() {
        all.push((format!("momentum.{n}"), b.copy()));
    }
    all
}

fn assert_same(a: &[(String, Tensor)], b: &[(String, Tensor)]) {
    assert_eq!(a.len(), b.len());
    for ((na, ta), (nb, tb)) in a.iter().zip(b) {
        assert_eq!(na, nb);
        assert!(ta.equal(tb), "{na} differs");
    }
}

fn weights(dir: &Path, name: &str) -> Vec<(String, Tensor)> {
    let mut v = Tensor::read_safetensors(dir.join(format!("{name}.safetensors"))).unwrap();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn last_epoch(dir: &Path) -> i64 {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("last.json")).unwrap()).unwrap();
    meta["epoch"].as_i64().unwrap()
}

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A NaN gradient (finite loss) stops the run before the SGD step, naming the epoch, the step
/// and the parameter whose gradient it is; the last good checkpoint stays, and `--resume` from
/// it ends with exactly the weights of a run that never met the NaN.
#[test]
fn nan_gradient_stops_naming_the_parameter_and_resume_is_exact() {
    let _serial = serial();
    let ds = tiny_data();
    let clean = tempfile::tempdir().unwrap();
    run_with(
        &tiny_config("skeletonclr", clean.path(), &["num_epoch=3"]),
        &opts(&ds),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config("skeletonclr", dir.path(), &["num_epoch=3"]);
    // 2 steps per epoch: global step 3 is epoch 2, step 1.
    let e = run_with(&cfg, &injected(&ds, "grad:3"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("non-finite gradient")
            && e.contains("epoch 2, step 1 of 2")
            && e.contains("the gradient of encoder_q.")
            && e.contains("last.safetensors"),
        "{e}"
    );
    assert_eq!(last_epoch(dir.path()), 1);
    assert!(std::fs::read_to_string(dir.path().join("log.txt"))
        .unwrap()
        .contains("non-finite gradient"));
    let resume = RunOptions {
        resume: true,
        ..opts(&ds)
    };
    run_with(&cfg, &resume).unwrap();
    assert_same(&weights(dir.path(), "last"), &weights(clean.path(), "last"));
    assert_eq!(metrics(dir.path()).len(), 3);
}

/// NaN in the data: the stop message says it is the input batch and which samples hold it.
#[test]
fn nan_input_is_named_as_the_data() {
    let _serial = serial();
    let ds = tiny_data();
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config("crossclr3", dir.path(), &[]);
    let e = run_with(&cfg, &injected(&ds, "input:2"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("non-finite loss")
            && e.contains("the input batch x_q")
            && e.contains("batch positions [0, 1, 2")
            && e.contains("epoch 1, step 2 of 2")
            && e.contains("no checkpoint was written yet"),
        "{e}"
    );
}

/// `non_finite: skip`: a step with a NaN loss or gradient leaves every tensor of the model and
/// the optimiser exactly as it was, and is reported as skipped; the next step trains normally.
#[test]
fn a_skipped_step_leaves_no_trace() {
    let _serial = serial();
    let ds = tiny_data();
    let dir = tempfile::tempdir().unwrap();
    for model in ["skeletonclr", "crossclr3"] {
        let cfg = tiny_config(model, dir.path(), &["numerics.non_finite=skip"]);
        tch::manual_seed(0);
        let mut t = Pretrainer::from_config(&cfg, &ds.layout, Device::Cpu).unwrap();
        let (x_q, x_k) = (batch(&ds, 0, 8), batch(&ds, 8, 8));
        // A normal step first, so the momentum buffers are not empty.
        assert!(t.train_step(&x_q, &x_k, 1).unwrap().skipped.is_none());
        let before = everything(&t);
        let s = t.train_step(&(&x_q * f64::NAN), &x_k, 1).unwrap();
        let why = s.skipped.expect("skipped");
        assert!(
            why.contains("non-finite loss") && why.contains("x_q"),
            "{why}"
        );
        assert_same(&everything(&t), &before);
        t.poison_next_grad = true;
        let s = t.train_step(&x_q, &x_k, 1).unwrap();
        let why = s.skipped.expect("skipped");
        assert!(
            why.contains("non-finite gradient") && s.loss.is_finite(),
            "{why}"
        );
        assert_same(&everything(&t), &before);
        let s = t.train_step(&x_q, &x_k, 1).unwrap();
        assert!(s.skipped.is_none() && s.loss.is_finite());
        let after = everything(&t);
        assert!(
            after.iter().zip(&before).any(|(a, b)| !a.1.equal(&b.1)),
            "{model}: the step after the skips trained nothing"
        );
        for (n, x) in &after {
            if x.kind() == Kind::Float {
                assert!(bool::try_from(x.isfinite().all()).unwrap(), "{n}");
            }
        }
    }
}

/// A run with `non_finite: skip` goes on past a NaN step, counts it in `skipped_steps` (metrics
/// and log), and stops once more steps are skipped than `max_skipped_steps` allows.
#[test]
fn skip_policy_counts_and_is_bounded() {
    let _serial = serial();
    let ds = tiny_data();
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(
        "skeletonclr",
        dir.path(),
        &["num_epoch=3", "numerics.non_finite=skip"],
    );
    run_with(&cfg, &injected(&ds, "input:3")).unwrap();
    let m = metrics(dir.path());
    let skipped: Vec<i64> = m
        .iter()
        .map(|r| r["skipped_steps"].as_i64().unwrap())
        .collect();
    assert_eq!(skipped, [0, 1, 0]);
    assert!(m.iter().all(|r| r["loss"].as_f64().unwrap().is_finite()));
    let csv = std::fs::read_to_string(dir.path().join("metrics.csv")).unwrap();
    assert!(
        csv.lines().next().unwrap().ends_with(",skipped_steps"),
        "{csv}"
    );
    let log = std::fs::read_to_string(dir.path().join("log.txt")).unwrap();
    assert!(
        log.contains("skipped epoch 2, step 1 of 2 (global step 3): non-finite loss"),
        "{log}"
    );
    for (n, t) in weights(dir.path(), "last") {
        if t.kind() == Kind::Float {
            assert!(bool::try_from(t.isfinite().all()).unwrap(), "{n}");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(
        "skeletonclr",
        dir.path(),
        &[
            "num_epoch=3",
            "numerics.non_finite=skip",
            "numerics.max_skipped_steps=0",
        ],
    );
    let e = run_with(&cfg, &injected(&ds, "grad:2"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("1 steps skipped, more than numerics.max_skipped_steps 0")
            && e.contains("non-finite gradient"),
        "{e}"
    );
}

/// Skipping needs the reference step: an explicit fast step is refused naming the key.
#[test]
fn skip_with_the_fast_step_is_refused() {
    let e = PretrainConfig::from_text(
        "",
        false,
        Path::new("<test>"),
        &["numerics.non_finite=skip".into(), "step_impl=fast".into()],
    )
    .and_then(|c| c.validate())
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("numerics.non_finite") && e.contains("reference"),
        "{e}"
    );
    let e = PretrainConfig::from_text(
        "",
        false,
        Path::new("<test>"),
        &["numerics.non_finite=sometimes".into()],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("numerics.non_finite"), "{e}");
}

/// An epoch whose mean loss is above `numerics.max_loss` is reported; with
/// `on_divergence: stop` the run ends before that epoch's checkpoint.
#[test]
fn divergence_is_reported_and_can_stop_the_run() {
    let _serial = serial();
    let ds = tiny_data();
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config("skeletonclr", dir.path(), &["numerics.max_loss=0.5"]);
    run_with(&cfg, &opts(&ds)).unwrap();
    let log = std::fs::read_to_string(dir.path().join("log.txt")).unwrap();
    assert!(
        log.contains("WARNING: epoch 1 mean loss")
            && log.contains("above the divergence bound 0.500 (numerics.max_loss)"),
        "{log}"
    );
    // The auto bound (twice the chance loss ln(65)) is not reached by a healthy run.
    let dir = tempfile::tempdir().unwrap();
    run_with(&tiny_config("skeletonclr", dir.path(), &[]), &opts(&ds)).unwrap();
    let log = std::fs::read_to_string(dir.path().join("log.txt")).unwrap();
    assert!(
        !log.contains("diverging") && log.contains("divergence bound 8.349"),
        "{log}"
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(
        "skeletonclr",
        dir.path(),
        &["numerics.max_loss=0.5", "numerics.on_divergence=stop"],
    );
    let e = run_with(&cfg, &opts(&ds)).unwrap_err().to_string();
    assert!(
        e.contains("diverging") && e.contains("no checkpoint was written yet"),
        "{e}"
    );
    assert!(!dir.path().join("last.json").exists());
    assert_eq!(metrics(dir.path()).len(), 1);
}

/// NaN in the data itself (one sample of the training file): the stop names the dataset samples,
/// their names and the file, so the user can fix or drop them.
#[test]
fn nan_in_the_data_file_names_the_samples() {
    let _serial = serial();
    let cfg = crossclr::data::synth::SynthConfig {
        num_classes: 4,
        train_per_class: 4,
        val_per_class: 1,
        frames: 20,
        ..Default::default()
    };
    let mut ds = crossclr::data::synth::generate(&cfg).0;
    let per_sample: usize = ds.sample_shape().iter().product();
    if let crossclr::data::dataset::F32Buf::Owned(v) = &mut ds.data {
        v[5 * per_sample + 7] = f32::NAN;
    } else {
        panic!("generated data is owned");
    }
    ds.source = "bad/train_data.npy".into();
    let name5 = ds.names[5].clone();
    let ds = std::sync::Arc::new(ds);
    let dir = tempfile::tempdir().unwrap();
    // No augmentation, so the NaN reaches the batch whatever the crop.
    let cfg = tiny_config(
        "skeletonclr",
        dir.path(),
        &[
            "train_feeder_args.shear_amplitude=-1",
            "train_feeder_args.temperal_padding_ratio=0",
        ],
    );
    let e = run_with(&cfg, &opts(&ds)).unwrap_err().to_string();
    assert!(
        e.contains("the input batch x_q")
            && e.contains(&format!(
                "dataset samples [5 ({name5})] of bad/train_data.npy"
            )),
        "{e}"
    );
}
