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
