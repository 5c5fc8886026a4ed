//! kill -9 at any moment loses nothing (issue 18, item 1), and one writer per work_dir (item 5).
//!
//! `crossclr pretrain` (the binary) on a tiny synthetic dataset: SkeletonCLR (a narrow ST-GCN:
//! hidden_channels 4, 32k parameters), 16 samples, batch 8 (2 steps per epoch), 4 epochs,
//! queue 64, no diagnostics, `epoch<N>` checkpoints every 2 epochs,
//! reference step on the CPU with `OMP_NUM_THREADS=1` and one loader worker (the deterministic
//! settings: every tensor is then bit-identical from run to run). An unbroken run is the
//! reference. Each trial starts the same run in a fresh work_dir, kills it with SIGKILL after a
//! seeded random delay, or makes it abort at a crash point (the middle of a checkpoint write, of
//! a metrics write, between the renames), then runs it again with `--resume` (plain when no
//! `last.json` was written yet) until it completes. Every trial must end with the reference's
//! exact final weights, queue and momentum (`last.*.safetensors` byte for byte), the same
//! `epoch<N>` checkpoints, the same `metrics.jsonl` rows (wall-time fields aside), the same
//! `steps.csv`, and only complete files under final names.
use crossclr::data::synth::{generate, write, SynthConfig};
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_crossclr");

/// Writes the dataset and config; returns the config path.
fn setup(root: &Path) -> PathBuf {
    let cfg = SynthConfig {
        num_classes: 4,
        train_per_class: 4,
        val_per_class: 1,
        frames: 20,
        ..SynthConfig::default()
    };
    let (train, val) = generate(&cfg);
    let data = root.join("data");
    write(&data, &train, &val).unwrap();
    let text = format!(
        "model: skeletonclr\nview: joint\ndataset:\n  format: npy\n  data: {d}/train_data.npy\n  \
label: {d}/train_label.pkl\n  layout: ntu25\n  mmap: false\nmodel_args:\n  queue_size: 64\n  \
hidden_channels: 4\n  hidden_dim: 16\n  feature_dim: 16\ndiagnostics:\n  interval: 0\n\
batch_size: 8\nnum_epoch: 4\nworkers: 1\nsave_interval: 2\ndevice: cpu\nlog_interval: 1\n\
seed: 3\nstep_impl: reference\n",
        d = data.display()
    );
    let p = root.join("cfg.yaml");
    std::fs::write(&p, text).unwrap();
    p
}

fn command(cfg: &Path, work: &Path, resume: bool, crash: Option<&str>) -> Command {
    let mut c = Command::new(BIN);
    c.args(["pretrain", "--quiet", "-c"])
        .arg(cfg)
        .arg(format!("work_dir={}", work.display()))
        .env("OMP_NUM_THREADS", "1")
        .env("MKL_NUM_THREADS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if resume {
        c.arg("--resume");
    }
    if let Some(at) = crash {
        c.arg(format!("--crash-at={at}"));
    }
    c
}

/// Runs to completion (resuming when a checkpoint exists); panics on failure.
fn finish(cfg: &Path, work: &Path) {
    let resume = work.join("last.json").exists();
    let out = command(cfg, work, resume, None).output().unwrap();
    assert!(
        out.status.success(),
        "resume in {} failed: {}",
        work.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What must be identical to the unbroken run.
#[derive(Debug, PartialEq)]
struct Outcome {
    files: Vec<(String, Vec<u8>)>,
    metrics: Vec<serde_json::Value>,
    csv_rows: Vec<String>,
}

fn outcome(work: &Path) -> Outcome {
    let mut files = Vec::new();
    for f in [
        "last.safetensors",
        "last.state.safetensors",
        "epoch2.safetensors",
        "epoch2.state.safetensors",
        "epoch4.safetensors",
        "epoch4.state.safetensors",
        "steps.csv",
    ] {
        let b = std::fs::read(work.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        files.push((f.to_string(), b));
    }
    for f in ["last.json", "epoch2.json", "epoch4.json"] {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(work.join(f)).unwrap()).unwrap();
        files.push((f.to_string(), v.to_string().into_bytes()));
    }
    // Wall-time fields differ between any two runs.
    let metrics = std::fs::read_to_string(work.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            for k in ["seconds", "samples_per_second", "diag_seconds"] {
                v.as_object_mut().unwrap().remove(k);
            }
            v
        })
        .collect();
    // metrics.csv without the seconds / samples_per_second columns.
    let csv = std::fs::read_to_string(work.join("metrics.csv")).unwrap();
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    let keep: Vec<usize> = (0..header.len())
        .filter(|&i| !matches!(header[i], "seconds" | "samples_per_second" | "diag_seconds"))
        .collect();
    let csv_rows = csv
        .lines()
        .map(|l| {
            let cells: Vec<&str> = l.split(',').collect();
            keep.iter().map(|&i| cells[i]).collect::<Vec<_>>().join(",")
        })
        .collect();
    Outcome {
        files,
        metrics,
        csv_rows,
    }
}

/// No duplicate or missing rows; nothing under a final name is torn.
fn check_complete(work: &Path, trial: &str) {
    let steps = std::fs::read_to_string(work.join("steps.csv")).unwrap();
    assert_eq!(
        steps.lines().count(),
        1 + 4 * 2,
        "{trial}: steps.csv\n{steps}"
    );
    let m = std::fs::read_to_string(work.join("metrics.jsonl")).unwrap();
    let epochs: Vec<u64> = m
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["epoch"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(epochs, vec![1, 2, 3, 4], "{trial}: metrics.jsonl epochs");
    for e in std::fs::read_dir(work).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with(".safetensors") {
            tch::Tensor::read_safetensors(&p).unwrap_or_else(|e| panic!("{trial}: {name}: {e}"));
        } else if name.ends_with(".json") {
            serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(&p).unwrap())
                .unwrap_or_else(|e| panic!("{trial}: {name}: {e}"));
        }
    }
}

#[test]
fn kill_anywhere_then_resume_equals_unbroken_run() {
    let root = tempfile::tempdir().unwrap();
    let cfg = setup(root.path());
    let reference = root.path().join("ref");
    let t0 = Instant::now();
    finish(&cfg, &reference);
    let full = t0.elapsed();
    let want = outcome(&reference);
    check_complete(&reference, "reference");

    // Crash points: the middle of checkpoint and metrics writes (n-th hit = which epoch).
    let mut trials: Vec<(String, Option<String>, Duration)> = Vec::new();
    for (point, hits) in [
        ("ckpt.tmp_written", &[1usize, 6][..]),
        ("ckpt.committed", &[1, 3]),
        ("ckpt.weights_renamed", &[2]),
        ("atomic.tmp_synced", &[2, 5]),
    ] {
        for n in hits {
            trials.push((
                format!("{point}:{n}"),
                Some(format!("{point}:{n}")),
                Duration::ZERO,
            ));
        }
    }
    // Then SIGKILL after seeded random delays over the whole run (start-up, steps, writes,
    // epoch ends), until `CROSSCLR_KILL_TRIALS` (default 14) of them interrupted the run. The
    // window is the unbroken run's duration, shrunk to the duration of any trial run that
    // finished before its kill (the machine may be faster than when the reference ran).
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(18);
    let n_random: usize = std::env::var("CROSSCLR_KILL_TRIALS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(14);
    let mut window = full;
    let (mut killed, mut random_killed, mut finished_first, mut ran) = (0, 0, 0, 0);
    let mut i = 0;
    while (i < trials.len() || random_killed < n_random) && i < trials.len() + 3 * n_random {
        let (name, crash, delay) = match trials.get(i) {
            Some((n, c, d)) => (n.clone(), c.clone(), *d),
            None => {
                let ms = rng.gen_range(0..window.as_millis().max(1) as u64);
                (
                    format!("random {i}: SIGKILL at {ms} ms"),
                    None,
                    Duration::from_millis(ms),
                )
            }
        };
        let work = root.path().join(format!("t{i}"));
        i += 1;
        ran += 1;
        let started = Instant::now();
        let mut child = command(&cfg, &work, false, crash.as_deref())
            .spawn()
            .unwrap();
        if crash.is_none() {
            std::thread::sleep(delay);
            // SIGKILL (std's kill on Unix); a run that already finished is simply reaped.
            let _ = child.kill();
        }
        let status = child.wait().unwrap();
        if status.success() {
            finished_first += 1;
            window = window.min(started.elapsed());
        } else {
            killed += 1;
            random_killed += usize::from(crash.is_none());
        }
        finish(&cfg, &work);
        check_complete(&work, &name);
        let got = outcome(&work);
        for ((f, a), (_, b)) in want.files.iter().zip(&got.files) {
            assert!(a == b, "{name}: {f} differs from the unbroken run");
        }
        assert_eq!(want.metrics, got.metrics, "{name}: metrics.jsonl");
        assert_eq!(want.csv_rows, got.csv_rows, "{name}: metrics.csv");
        let _ = std::fs::remove_dir_all(&work);
    }
    eprintln!(
        "{ran} trials: {killed} interrupted ({} at crash points, {random_killed} by SIGKILL at a \
         random moment), {finished_first} finished before the kill; unbroken run {:.2} s; every \
         trial resumed to the unbroken run's exact result",
        killed - random_killed,
        full.as_secs_f64()
    );
    assert!(
        random_killed >= n_random && killed >= 20,
        "only {killed} trials were interrupted"
    );
}

/// A second `pretrain` on a work_dir in use refuses; the lock of a killed run is not stale;
/// `--resume` with another queue size refuses naming the key.
#[test]
fn one_writer_per_work_dir() {
    let root = tempfile::tempdir().unwrap();
    let cfg = setup(root.path());
    let work = root.path().join("w");
    std::fs::create_dir_all(&work).unwrap();
    // Hold the lock as a running pretrain would.
    let held = crossclr::train::lock::WorkDirLock::acquire(&work).unwrap();
    let out = command(&cfg, &work, false, None).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("in use by another run") && err.contains("pid"),
        "{err}"
    );
    drop(held);
    // A run killed while holding the lock leaves no stale lock.
    let mut child = command(&cfg, &work, false, Some("ckpt.committed:1"))
        .spawn()
        .unwrap();
    assert!(!child.wait().unwrap().success());
    assert!(work.join(".lock").exists());
    let out = command(&cfg, &work, true, None)
        .arg("model_args.queue_size=128")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("'model_args.queue_size'"),
        "{err}"
    );
    finish(&cfg, &work);
    check_complete(&work, "after a stale lock");
}

/// A full disk (`ulimit -f`, SIGXFSZ ignored so the write fails with EFBIG) while the epoch-3
/// checkpoint is written: the run ends with an error naming the file, the epoch-2 checkpoint and
/// the dataset stay intact, and a resume with space continues to the unbroken run's result.
#[test]
fn disk_full_keeps_last_checkpoint_and_resume_continues() {
    let root = tempfile::tempdir().unwrap();
    let cfg = setup(root.path());
    let reference = root.path().join("ref");
    finish(&cfg, &reference);
    let want = outcome(&reference);
    let data: Vec<Vec<u8>> = ["train_data.npy", "train_label.pkl"]
        .iter()
        .map(|f| std::fs::read(root.path().join("data").join(f)).unwrap())
        .collect();

    let work = root.path().join("w");
    let out = command(&cfg, &work, false, None)
        .arg("num_epoch=2")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last2 = std::fs::read(work.join("last.safetensors")).unwrap();
    // 200 KiB per file: the logs, metrics, loss.png (~125 kB) and the momentum file (~140 kB)
    // fit, the weights file (~320 kB) does not.
    let mut limited = Command::new("bash");
    limited
        .arg("-c")
        .arg("trap '' XFSZ; ulimit -f 200; exec \"$@\"")
        .arg("limited");
    let inner = command(&cfg, &work, true, None);
    limited.arg(inner.get_program());
    limited.args(inner.get_args());
    limited
        .env("OMP_NUM_THREADS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let out = limited.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the limited run succeeded: {err}");
    assert!(
        err.contains("last.safetensors") && (err.contains("File too large") || err.contains("27")),
        "{err}"
    );
    // The previous checkpoint is intact and still the one that loads.
    assert_eq!(std::fs::read(work.join("last.safetensors")).unwrap(), last2);
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(work.join("last.json")).unwrap()).unwrap();
    assert_eq!(meta["epoch"], 2, "{meta}");
    for (f, b) in ["train_data.npy", "train_label.pkl"].iter().zip(&data) {
        assert!(
            &std::fs::read(root.path().join("data").join(f)).unwrap() == b,
            "{f} changed"
        );
    }
    finish(&cfg, &work);
    check_complete(&work, "after disk full");
    let got = outcome(&work);
    for ((f, a), (_, b)) in want.files.iter().zip(&got.files) {
        assert!(a == b, "after disk full: {f} differs from the unbroken run");
    }
    assert_eq!(want.metrics, got.metrics);
    assert_eq!(want.csv_rows, got.csv_rows);
}

/// A `.skeleton` of `frames` frames and `bodies` bodies (valid for the NTU reader).
fn skeleton_text(frames: usize, bodies: usize, seed: f32) -> String {
    let mut s = format!("{frames}\n");
    for t in 0..frames {
        s += &format!("{bodies}\n");
        for m in 0..bodies {
            s += &format!(
                "{} 0 1 1 1 1 0 0.1 0.1 2\n25\n",
                72057594037931101u64 + m as u64
            );
            for v in 0..25 {
                let a = seed + 0.05 * t as f32 + v as f32 * 0.3;
                s += &format!(
                    "{:.6} {:.6} {:.6} 1 2 3 4 0 0 0 0 2\n",
                    0.5 * m as f32 + 0.05 * a.sin(),
                    v as f32 * 0.05 + 0.02 * a.cos(),
                    3.0 + 0.05 * a.cos()
                );
            }
        }
    }
    s
}

/// `prepare` killed at seeded random moments and run again finishes with output identical to an
/// unbroken run (every file of the output tree, byte for byte).
#[test]
fn prepare_killed_then_rerun_is_identical() {
    let root = tempfile::tempdir().unwrap();
    let raw = root.path().join("raw");
    std::fs::create_dir_all(&raw).unwrap();
    for i in 0..40 {
        let n = format!(
            "S00{}C00{}P0{:02}R00{}A0{:02}",
            1 + i % 3,
            1 + i % 3,
            1 + i % 40,
            1 + i % 2,
            1 + i % 20
        );
        std::fs::write(
            raw.join(format!("{n}.skeleton")),
            skeleton_text(40 + 7 * i, 1 + i % 2, i as f32),
        )
        .unwrap();
    }
    let run = |out: &Path| {
        let mut c = Command::new(BIN);
        c.args(["prepare", "ntu60", "--threads", "1", "--raw"])
            .arg(&raw)
            .arg("--out")
            .arg(out)
            .env("OMP_NUM_THREADS", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c
    };
    let tree = |out: &Path| -> Vec<(String, Vec<u8>)> {
        let mut v = Vec::new();
        let mut todo = vec![out.to_path_buf()];
        while let Some(d) = todo.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    todo.push(p);
                } else {
                    let rel = p.strip_prefix(out).unwrap().display().to_string();
                    v.push((rel, std::fs::read(&p).unwrap()));
                }
            }
        }
        v.sort();
        v
    };
    let reference = root.path().join("ref");
    let t0 = Instant::now();
    let o = run(&reference).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let full = t0.elapsed();
    let want = tree(&reference);
    assert!(
        want.iter().any(|(n, _)| n.ends_with("train_data.npy")),
        "{:?}",
        want.iter().map(|x| &x.0).collect::<Vec<_>>()
    );
    // Seeded random kill moments until 6 runs were interrupted (the window shrinks to the
    // duration of any run that finished before its kill).
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(19);
    let (mut killed, mut window, mut i) = (0, full, 0);
    while killed < 6 && i < 20 {
        i += 1;
        let out = root.path().join(format!("p{i}"));
        let ms = rng.gen_range(0..window.as_millis().max(1) as u64);
        let started = Instant::now();
        let mut child = run(&out).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(ms));
        let _ = child.kill();
        if child.wait().unwrap().success() {
            window = window.min(started.elapsed());
        } else {
            killed += 1;
        }
        let o = run(&out).output().unwrap();
        assert!(
            o.status.success(),
            "re-run {i}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let got = tree(&out);
        assert_eq!(
            want.iter().map(|x| &x.0).collect::<Vec<_>>(),
            got.iter().map(|x| &x.0).collect::<Vec<_>>(),
            "trial {i} (killed at {ms} ms): files"
        );
        for ((n, a), (_, b)) in want.iter().zip(&got) {
            assert!(a == b, "trial {i} (killed at {ms} ms): {n} differs");
        }
    }
    eprintln!(
        "prepare: {i} trials, {killed} killed mid-run (unbroken {:.2} s), all identical",
        full.as_secs_f64()
    );
    assert!(killed >= 6, "only {killed} prepare runs were interrupted");
}
