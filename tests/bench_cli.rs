//! `crossclr bench` end to end on CPU at a tiny size: valid JSON with the documented fields, and
//! clear errors for CUDA-only options on a CPU device.
use std::process::Command;

fn bench(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_crossclr"))
        .arg("bench")
        .args(args)
        .output()
        .expect("run crossclr bench")
}

const TINY: &[&str] = &[
    "--batch",
    "2",
    "--frames",
    "6",
    "--queue-size",
    "8",
    "--warmup",
    "1",
    "--iters",
    "1",
    "--inputs",
    "2",
];

#[test]
fn bench_emits_valid_json_on_cpu() {
    for (model, phase, step) in [
        ("skeletonclr", "1", "reference"),
        ("crossclr3", "2", "fast"),
    ] {
        let mut args = vec![
            "--model", model, "--phase", phase, "--step", step, "--device", "cpu", "--json",
        ];
        args.extend_from_slice(TINY);
        let out = bench(&args);
        assert!(
            out.status.success(),
            "{model}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let v: serde_json::Value = serde_json::from_str(text.trim()).expect("one JSON object");
        assert_eq!(v["impl"], "crossclr");
        assert_eq!(v["model"], model);
        assert_eq!(v["batch"], 2);
        assert_eq!(v["device"], "cpu");
        assert_eq!(v["step"], step);
        assert_eq!(v["graph"], false);
        assert!(v["device_name"].as_str().unwrap().starts_with("cpu"));
        for key in [
            "ms_median",
            "ms_min",
            "ms_mean",
            "ms_pipelined",
            "samples_per_s",
            "loss_first",
            "loss_last",
        ] {
            let x = v[key]
                .as_f64()
                .unwrap_or_else(|| panic!("{key} missing in {text}"));
            assert!(x.is_finite() && x > 0.0, "{key} = {x}");
        }
        assert!(v["peak_bytes"].as_i64().unwrap() > 0);
        assert_eq!(v["peak_kind"], "process_peak_rss");
    }
}

#[test]
fn bench_rejects_cuda_only_options_on_cpu() {
    let mut args = vec!["--device", "cpu", "--graph", "on"];
    args.extend_from_slice(TINY);
    let out = bench(&args);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CUDA"), "{err}");
    let out = bench(&["--model", "skeletonclr", "--phase", "2", "--device", "cpu"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("phase 2"));
    let out = bench(&["--batch", "3", "--queue-size", "8", "--device", "cpu"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("multiple"));
}

/// `bench --loader` at a tiny size: 1 warm-up and 2 timed batches, one run, then `extra`.
fn tiny_loader<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--loader",
        "--warmup",
        "1",
        "--batches",
        "2",
        "--repeats",
        "1",
    ];
    args.extend_from_slice(extra);
    args
}

/// Batch 4 over 24 in-memory synthetic samples.
const TINY_DATA: &[&str] = &["--batch", "4", "--synthetic-samples", "24"];

#[test]
fn loader_bench_emits_one_json_row_per_worker_count() {
    let mut args = tiny_loader(TINY_DATA);
    args.extend_from_slice(&[
        "--model",
        "crossclr3",
        "--workers",
        "0,2",
        "--device",
        "cpu",
        "--json",
        "--stages",
    ]);
    let out = bench(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let rows: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(rows.len(), 3, "two worker rows and the stage row: {text}");
    for (row, workers) in rows[..2].iter().zip([0, 2]) {
        assert_eq!(row["impl"], "crossclr");
        assert_eq!(row["bench"], "loader");
        assert_eq!(row["model"], "crossclr3");
        assert_eq!(row["views"], serde_json::json!(["joint", "motion", "bone"]));
        assert_eq!(row["batch"], 4);
        assert_eq!(row["workers"], workers);
        assert_eq!(row["sample_shape"], serde_json::json!([3, 50, 25, 2]));
        assert_eq!(row["copies_per_sample"], 2);
        assert_eq!(row["device"], "cpu");
        assert_eq!(row["host_memory"], "pageable");
        assert_eq!(row["h2d_copy"], false);
        assert_eq!(row["batches"], 2);
        assert!(row["dataset_samples"].as_u64().unwrap() >= 24);
        for key in ["samples_per_s", "batches_per_s", "ms_per_batch"] {
            let x = row[key]
                .as_f64()
                .unwrap_or_else(|| panic!("{key} in {row}"));
            assert!(x.is_finite() && x > 0.0, "{key} = {x}");
        }
        let (sps, bps) = (row["samples_per_s"].as_f64(), row["batches_per_s"].as_f64());
        assert!((sps.unwrap() / bps.unwrap() - 4.0).abs() < 1e-9);
        assert_eq!(row["samples_per_s_runs"].as_array().unwrap().len(), 1);
        if cfg!(target_os = "linux") {
            assert!(row["cpu_us_per_sample"].as_f64().unwrap() >= 0.0);
        }
    }
    let stages = &rows[2];
    assert_eq!(stages["bench"], "loader_stages");
    for key in ["build_us", "draw_us", "augment_us", "copy_us"] {
        assert!(stages[key].as_f64().unwrap() > 0.0, "{key} in {stages}");
    }
}

#[test]
fn loader_bench_reads_a_synth_folder_and_a_config() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("synth");
    let synth = Command::new(env!("CARGO_BIN_EXE_crossclr"))
        .args(["synth", "--out"])
        .arg(&data)
        .args([
            "--classes",
            "2",
            "--train-per-class",
            "6",
            "--val-per-class",
            "1",
        ])
        .output()
        .unwrap();
    assert!(
        synth.status.success(),
        "{}",
        String::from_utf8_lossy(&synth.stderr)
    );
    // The config's loader settings (batch_size, workers) over the folder's data.
    let config = dir.path().join("pretrain.yaml");
    std::fs::write(
        &config,
        "model: skeletonclr\nview: joint\nbatch_size: 4\nworkers: 1\n",
    )
    .unwrap();
    let (config, data) = (config.to_str().unwrap(), data.to_str().unwrap());
    let args = tiny_loader(&["--config", config, "--data", data, "--json", "seed=3"]);
    let out = bench(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row: serde_json::Value =
        serde_json::from_str(String::from_utf8(out.stdout).unwrap().trim()).unwrap();
    assert_eq!(row["model"], "skeletonclr");
    assert_eq!(row["batch"], 4);
    assert_eq!(row["workers"], 1);
    assert_eq!(row["dataset_samples"], 12);
    assert!(row["samples_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn loader_bench_rejects_bad_flag_combinations() {
    let fails = |args: &[&str], want: &str| {
        let out = bench(args);
        assert!(!out.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    };
    // Step-only switches make no sense for the loader.
    fails(&["--loader", "--graph", "on"], "cannot be used with");
    fails(&["--loader", "--phase", "2"], "cannot be used with");
    // Loader-only flags need --loader.
    fails(&["--workers", "1,2"], "--loader");
    // Pinned memory needs a GPU; a batch larger than the data leaves no batch.
    let mut args = tiny_loader(TINY_DATA);
    args.extend_from_slice(&["--pin", "on", "--device", "cpu"]);
    fails(&args, "--device cuda");
    fails(
        &tiny_loader(&["--batch", "64", "--synthetic-samples", "24"]),
        "exceeds",
    );
    // --model picks the default config; with --config the config names the model.
    fails(
        &["--loader", "--config", "x.yaml", "--model", "crossclr3"],
        "cannot be used with",
    );
}

/// On a CUDA machine: pinned and pageable rows, each with the copy to the GPU, and the pinned
/// batches really pinned. Skipped (with a message) without CUDA.
#[test]
fn loader_bench_pins_batches_on_cuda() {
    if !tch::Cuda::is_available() {
        eprintln!("skipped: no CUDA device (the pinned-memory path needs one)");
        return;
    }
    let mut args = tiny_loader(TINY_DATA);
    args.extend_from_slice(&["--workers", "2", "--device", "cuda", "--json"]);
    let out = bench(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let rows: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2, "{text}");
    assert_eq!(rows[0]["host_memory"], "pinned");
    assert_eq!(rows[0]["pinned_checked"], true);
    assert_eq!(rows[1]["host_memory"], "pageable");
    for row in &rows {
        assert_eq!(row["h2d_copy"], true);
        assert!(row["h2d_host_ms_per_batch"].as_f64().unwrap() > 0.0);
        assert!(row["samples_per_s"].as_f64().unwrap() > 0.0);
    }
}

/// The step timing takes a config's `kernels.*` keys and reports the resolved set; another key,
/// or a bad value, is refused with the key named.
#[test]
fn bench_takes_the_kernel_keys_of_a_config() {
    let mut args = vec![
        "--model",
        "skeletonclr",
        "--step",
        "reference",
        "--device",
        "cpu",
        "--json",
        "kernels.fold_bias=on",
        "kernels.stgcn=reference",
        "kernels.cpu_cache=off",
    ];
    args.extend_from_slice(TINY);
    let out = bench(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(String::from_utf8(out.stdout).unwrap().trim()).unwrap();
    let k = &v["kernels"];
    assert_eq!(k["fold_bias"], "on");
    assert_eq!(k["stgcn"], "reference");
    assert_eq!(k["cpu_cache"], "off");
    // `auto` resolved for the CPU.
    assert_eq!(k["agg_pack"], "off");
    let fused = if crossclr::gpu::cpu_avx512_kernels() {
        "on"
    } else {
        "off"
    };
    assert_eq!(k["fused_bn"], fused);

    let mut args = vec!["--device", "cpu", "batch_size=4"];
    args.extend_from_slice(TINY);
    let err = String::from_utf8_lossy(&bench(&args).stderr).to_string();
    assert!(err.contains("only kernels.* keys"), "{err}");
    let mut args = vec!["--device", "cpu", "kernels.fold_bias=sometimes"];
    args.extend_from_slice(TINY);
    let err = String::from_utf8_lossy(&bench(&args).stderr).to_string();
    assert!(
        err.contains("kernels.fold_bias") && err.contains("auto, on or off"),
        "{err}"
    );
}
