//! The pre-training loop with `step_impl: fast` (gpu::FastStep) on CPU, tiny synthetic data
//! (16 samples, T 20, batch 8: 2 steps per epoch; queue 64): same losses and weights as the
//! reference step, exact resume, NaN stop with the last good checkpoint kept, `graph` refused on
//! CPU, and the config keys (`step_impl`, `tf32`, `cudnn_benchmark`) in files and overrides.
mod common;
use common::{opts, serial, tiny_config, tiny_data};
use crossclr::gpu::ShimStatus;
use crossclr::train::config::{CudnnBenchmark, PretrainConfig, StepImpl, Tf32Mode};
use crossclr::train::pretrain::{run_with, RunOptions, Summary};
use std::path::Path;
use tch::{Kind, Tensor};

fn have_shim() -> bool {
    let ok = crossclr::gpu::shim_status() != ShimStatus::Missing;
    if !ok {
        eprintln!("skipping: built without the C++ shim (gpu::FastStep needs it)");
    }
    ok
}

/// `last` checkpoint tensors (weights, queues, pointers, momentum buffers), sorted by name.
fn last_tensors(dir: &Path) -> Vec<(String, Tensor)> {
    let mut v = Tensor::read_safetensors(dir.join("last.safetensors")).unwrap();
    v.extend(Tensor::read_safetensors(dir.join("last.state.safetensors")).unwrap());
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn rel_diff(a: f64, b: f64) -> f64 {
    (a - b).abs() / a.abs().max(b.abs()).max(1e-12)
}

fn log_lines(dir: &Path, pattern: &str) -> Vec<String> {
    std::fs::read_to_string(dir.join("log.txt"))
        .unwrap()
        .lines()
        .filter(|l| l.contains(pattern))
        // Drop the timestamp: "[YYYY-MM-DD HH:MM:SS] ".
        .map(|l| l.split_once("] ").map_or(l, |x| x.1).to_string())
        .collect()
}

/// The `epoch E step S/N: loss L lr R` lines of the log.
fn step_lines(dir: &Path) -> Vec<String> {
    let mut v = log_lines(dir, " step ");
    v.retain(|l| l.starts_with("epoch "));
    v
}

/// (a) 2 epochs (phase 1, then CVC-KM) with the fast step give the reference step's per-epoch and
/// per-view losses and, close to float rounding, its weights, queues and momentum buffers.
/// FastStep is not bit-identical: the fused SGD kernel, the foreach EMA and the f32 device lr round
/// differently (~1 ulp per op), which grows to ~1e-6 relative over 4 steps.
#[test]
fn fast_matches_reference_over_two_epochs() {
    let _serial = serial();
    if !have_shim() {
        return;
    }
    let ds = tiny_data();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let extra = ["log_interval=1"];
    let reference = run_with(
        &tiny_config("crossclr2", a.path(), &[extra[0], "step_impl=reference"]),
        &opts(&ds),
    )
    .unwrap();
    let fast = run_with(
        &tiny_config("crossclr2", b.path(), &[extra[0], "step_impl=fast"]),
        &opts(&ds),
    )
    .unwrap();
    assert_eq!(reference.step_impl, StepImpl::Reference);
    assert_eq!(fast.step_impl, StepImpl::Fast);
    assert_eq!(fast.records.len(), 2);
    for (r, f) in reference.records.iter().zip(&fast.records) {
        eprintln!(
            "epoch {}: loss reference {} fast {} (relative difference {:.2e})",
            r.epoch,
            r.loss,
            f.loss,
            rel_diff(r.loss, f.loss)
        );
        assert_eq!((r.epoch, r.phase, r.steps), (f.epoch, f.phase, f.steps));
        assert!(
            rel_diff(r.loss, f.loss) < 1e-4,
            "epoch {}: {} vs {}",
            r.epoch,
            r.loss,
            f.loss
        );
        for ((vr, lr), (vf, lf)) in r.view_losses.iter().zip(&f.view_losses) {
            assert_eq!(vr, vf);
            assert!(
                rel_diff(*lr, *lf) < 1e-4,
                "epoch {} {vr}: {lr} vs {lf}",
                r.epoch
            );
        }
    }
    assert_eq!(fast.records[1].phase, 2);
    // Step lines are written at the same steps (log_interval 1: the fast step reads every step).
    assert_eq!(step_lines(a.path()).len(), step_lines(b.path()).len());
    let steps = std::fs::read_to_string(b.path().join("steps.csv")).unwrap();
    assert_eq!(steps.lines().count(), 1 + 2 * 2, "{steps}");
    let (ta, tb) = (last_tensors(a.path()), last_tensors(b.path()));
    assert_eq!(
        ta.iter().map(|t| &t.0).collect::<Vec<_>>(),
        tb.iter().map(|t| &t.0).collect::<Vec<_>>(),
        "same tensors, momentum buffers included"
    );
    let mut worst = 0.0f64;
    for ((n, x), (_, y)) in ta.iter().zip(&tb) {
        if x.kind() == Kind::Float {
            let scale = x.abs().max().double_value(&[]).max(1.0);
            let d = (x - y).abs().max().double_value(&[]);
            worst = worst.max(d / scale);
            assert!(d < 1e-4 * scale, "{n} differs by {d} (scale {scale})");
        } else {
            assert!(x.equal(y), "{n} differs");
        }
    }
    eprintln!("largest tensor difference relative to its scale: {worst:.2e}");
}

/// (b) Fast step: 2 epochs straight == 1 epoch + `--resume` 1 epoch, exactly (weights, queues,
/// queue pointers, momentum buffers). The resumed FastStep takes its momentum from the checkpoint
/// and its device pointer from the model.
#[test]
fn fast_resume_is_exact() {
    let _serial = serial();
    if !have_shim() {
        return;
    }
    let ds = tiny_data();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let fast = ["step_impl=fast"];
    run_with(&tiny_config("crossclr2", a.path(), &fast), &opts(&ds)).unwrap();
    run_with(
        &tiny_config("crossclr2", b.path(), &["step_impl=fast", "num_epoch=1"]),
        &opts(&ds),
    )
    .unwrap();
    let ptr_after_1 = Tensor::read_safetensors(b.path().join("last.safetensors"))
        .unwrap()
        .into_iter()
        .find(|(n, _)| n == "queue_ptr")
        .unwrap()
        .1
        .int64_value(&[0]);
    assert_eq!(ptr_after_1, 16, "2 steps of 8 written back to the model");
    let s: Summary = run_with(
        &tiny_config("crossclr2", b.path(), &fast),
        &RunOptions {
            resume: true,
            ..opts(&ds)
        },
    )
    .unwrap();
    assert_eq!((s.first_epoch, s.records.len()), (2, 2));
    let (ta, tb) = (last_tensors(a.path()), last_tensors(b.path()));
    assert_eq!(ta.len(), tb.len());
    let mut momentum = 0;
    for ((na, x), (nb, y)) in ta.iter().zip(&tb) {
        assert_eq!(na, nb);
        let d = (x.to_kind(Kind::Double) - y.to_kind(Kind::Double))
            .abs()
            .max()
            .double_value(&[]);
        assert!(d <= 1e-6, "{na} differs by {d}");
        // With kernels.fold_bias on the biases of the temporal and residual convolutions are
        // folded into their batch norms: their gradient is exactly zero (float noise in
        // PyTorch), so from their initial value 0 their momentum stays 0.
        let folded = crossclr::model::kernels::Kernels::for_device(tch::Device::Cpu)
            .fold_bias_on(tch::Device::Cpu)
            && (na.ends_with("tcn.2.bias") || na.ends_with("residual.0.bias"));
        if na.starts_with("momentum_buffer.") && !folded {
            momentum += 1;
            assert!(x.abs().max().double_value(&[]) > 0.0, "{na} is all zeros");
        }
    }
    assert!(momentum > 0, "momentum buffers are checkpointed");
    let csv = std::fs::read_to_string(b.path().join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), 3, "{csv}");
}

/// (c) NaN inputs from epoch 2 with the fast step: the run stops with the reference message
/// format when the losses are read, and the last good checkpoint (epoch 1) stays intact.
#[test]
fn fast_nan_stops_and_keeps_checkpoint() {
    let _serial = serial();
    if !have_shim() {
        return;
    }
    let ds = tiny_data();
    // log_interval 0: read at epoch end only; 1: read after every step.
    for (interval, step) in [
        ("log_interval=0", "step 1 of 2"),
        ("log_interval=1", "step 1 of 2"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = tiny_config(
            "skeletonclr",
            dir.path(),
            &["num_epoch=3", "step_impl=fast", interval],
        );
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
            e.starts_with("stopping: non-finite loss")
                && e.contains("epoch 2")
                && e.contains(step)
                && e.contains("the last good checkpoint is")
                && e.contains("last.safetensors"),
            "{interval}: {e}"
        );
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("last.json")).unwrap())
                .unwrap();
        assert_eq!(meta["epoch"], 1, "{interval}");
        assert!(!dir.path().join("epoch2.json").exists(), "{interval}");
        for (n, t) in last_tensors(dir.path()) {
            if t.kind() == Kind::Float {
                assert!(
                    bool::try_from(t.isfinite().all()).unwrap(),
                    "{interval}: {n} not finite"
                );
            }
        }
        let metrics = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
        assert_eq!(metrics.lines().count(), 1, "{interval}: {metrics}");
    }
}

/// (d) `step_impl: graph` on CPU is refused before anything is written (CUDA graphs do not exist
/// on CPU); `auto` on CPU runs the reference step and says so in the log.
#[test]
fn graph_refused_on_cpu_and_auto_is_reference() {
    let _serial = serial();
    let ds = tiny_data();
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("run");
    let e = run_with(
        &tiny_config("skeletonclr", &work, &["step_impl=graph"]),
        &opts(&ds),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("step_impl: graph needs a CUDA device") && e.contains("step_impl=fast"),
        "{e}"
    );
    assert!(!work.exists(), "nothing written for a refused config");
    let s = run_with(
        &tiny_config("skeletonclr", &work, &["num_epoch=1"]),
        &opts(&ds),
    )
    .unwrap();
    assert_eq!(s.step_impl, StepImpl::Reference);
    let lines = log_lines(&work, "step_impl auto");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with("step reference (step_impl auto: auto on CPU"),
        "{lines:?}"
    );
}

/// (e) The keys load from a file, default to auto / default / false, take `key=value` overrides
/// (the CLI form), survive the resolved config.yaml round trip, and bad values name the key. The
/// binary refuses `step_impl=graph` on CPU given on its command line.
#[test]
fn step_keys_parse_and_override() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.yaml");
    std::fs::write(
        &file,
        "model: skeletonclr\nview: joint\nstep_impl: reference\n",
    )
    .unwrap();
    let c = PretrainConfig::load(&file, &[]).unwrap();
    assert_eq!(
        (c.step_impl, c.tf32, c.cudnn_benchmark),
        (StepImpl::Reference, Tf32Mode::Auto, CudnnBenchmark::Auto)
    );
    let d = PretrainConfig::from_text("", false, Path::new("<t>"), &[]).unwrap();
    assert_eq!(d.step_impl, StepImpl::Auto);
    let ov: Vec<String> = ["step_impl=fast", "tf32=on", "cudnn_benchmark=true"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let c = PretrainConfig::load(&file, &ov).unwrap();
    assert_eq!(
        (c.step_impl, c.tf32, c.cudnn_benchmark),
        (StepImpl::Fast, Tf32Mode::On, CudnnBenchmark::On)
    );
    let ov: Vec<String> = ["tf32=default", "cudnn_benchmark=false"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let c = PretrainConfig::load(&file, &ov).unwrap();
    assert_eq!(
        (c.tf32, c.cudnn_benchmark),
        (Tf32Mode::Default, CudnnBenchmark::Off)
    );
    let bad = PretrainConfig::load(&file, &["cudnn_benchmark=sometimes".to_string()])
        .expect_err("unknown value");
    assert!(bad.to_string().contains("cudnn_benchmark"), "{bad}");
    let back =
        PretrainConfig::from_text(&c.to_yaml().unwrap(), false, Path::new("r"), &[]).unwrap();
    assert_eq!(back, c);
    let toml = PretrainConfig::from_text(
        "step_impl = \"graph\"\ntf32 = \"off\"\n",
        true,
        Path::new("t.toml"),
        &[],
    )
    .unwrap();
    assert_eq!(
        (toml.step_impl, toml.tf32),
        (StepImpl::Graph, Tf32Mode::Off)
    );
    for (bad, key) in [("step_impl=quick", "step_impl"), ("tf32=maybe", "tf32")] {
        let e = PretrainConfig::load(&file, &[bad.to_string()])
            .unwrap_err()
            .to_string();
        assert!(e.contains(key) && e.contains("unknown value"), "{e}");
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_crossclr"))
        .args(["pretrain", "--quiet", "--device", "cpu", "-c"])
        .arg(&file)
        .arg(format!("work_dir={}", dir.path().join("w").display()))
        .arg("step_impl=graph")
        .output()
        .expect("run crossclr pretrain");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("step_impl: graph needs a CUDA device"),
        "{stderr}"
    );
}

/// (f) `step_impl: graph` bookkeeping on CPU with the eager stand-in for the CUDA graph: the first
/// 3 batches of each phase are the warm-up steps of the capture, the rest are replays, the graph
/// is recaptured at the phase change and reused across epochs of one phase, and batches left in
/// the warm-up buffer at epoch end are trained eagerly. Every batch is trained exactly once and in
/// order: the run equals the plain fast step bit for bit (losses, steps.csv, checkpoint).
#[test]
fn emulated_graph_equals_fast_step() {
    let _serial = serial();
    if !have_shim() {
        return;
    }
    let ds = tiny_data();
    // crossclr2, batch 4 (4 steps per epoch), phase 1 in epochs 1-2, phase 2 in epoch 3, log every
    // 3 steps: captures in epochs 1 and 3, replays everywhere else. skeletonclr, batch 8 (2 steps
    // per epoch, fewer than the warm-up): never captured, the buffer is trained at epoch end.
    let cases: [(&str, &[&str], usize); 2] = [
        (
            "crossclr2",
            &[
                "batch_size=4",
                "num_epoch=3",
                "cross_epoch=2",
                "log_interval=3",
            ],
            2,
        ),
        ("skeletonclr", &["num_epoch=2"], 0),
    ];
    for (model, extra, captures) in cases {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let with = |dir: &Path, step: &str| {
            let mut ov = extra.to_vec();
            ov.push(step);
            tiny_config(model, dir, &ov)
        };
        let fast = run_with(&with(a.path(), "step_impl=fast"), &opts(&ds)).unwrap();
        let graph = run_with(
            &with(b.path(), "step_impl=graph"),
            &RunOptions {
                emulate_graph: true,
                ..opts(&ds)
            },
        )
        .unwrap();
        assert_eq!(graph.step_impl, StepImpl::Graph);
        for (f, g) in fast.records.iter().zip(&graph.records) {
            assert_eq!(
                (f.epoch, f.phase, f.steps, f.loss, &f.view_losses),
                (g.epoch, g.phase, g.steps, g.loss, &g.view_losses),
                "{model}"
            );
        }
        assert_eq!(fast.records.len(), graph.records.len());
        let steps = |d: &Path| std::fs::read_to_string(d.join("steps.csv")).unwrap();
        assert_eq!(steps(a.path()), steps(b.path()), "{model}");
        assert_eq!(
            step_lines(a.path()),
            step_lines(b.path()),
            "{model}: step log lines"
        );
        let captured = log_lines(b.path(), "captured the phase-");
        assert_eq!(captured.len(), captures, "{model}: {captured:?}");
        for ((n, x), (_, y)) in last_tensors(a.path()).iter().zip(&last_tensors(b.path())) {
            assert!(x.equal(y), "{model}: {n} differs");
        }
    }
}
