//! The Kineto step profiler (`gpu::profiler`) on CPU: a few conv2d + mm forward / backward steps are
//! recorded and aggregated, the Chrome trace is written, and misuse returns errors. The CUDA
//! activity path needs a GPU (see docs/gpu.md); here only its error on a machine without one.
use crossclr::gpu::profiler::{ProfileRow, ProfileSummary, Profiler};
use crossclr::gpu::{self, ShimStatus};
use std::sync::{Mutex, MutexGuard};
use tch::{Device, Kind, Tensor};

/// The profiler is one per process: the tests of this file take turns.
static PROFILER: Mutex<()> = Mutex::new(());

fn exclusive() -> MutexGuard<'static, ()> {
    PROFILER.lock().unwrap_or_else(|e| e.into_inner())
}

/// Profiled steps.
const STEPS: usize = 3;

/// `STEPS` tiny training steps: conv2d (2 x 3 x 8 x 8 input, 4 filters 3 x 3) -> reshape (2 x 144)
/// -> mm with 144 x 5 -> sum -> backward.
fn run_steps() {
    let opts = (Kind::Float, Device::Cpu);
    let x = Tensor::randn([2, 3, 8, 8], opts);
    let w = Tensor::randn([4, 3, 3, 3], opts).set_requires_grad(true);
    let m = Tensor::randn([4 * 6 * 6, 5], opts).set_requires_grad(true);
    for _ in 0..STEPS {
        let y = x.conv2d(&w, None::<Tensor>, [1, 1], [0, 0], [1, 1], 1);
        let z = y.reshape([2, -1]).mm(&m);
        z.sum(Kind::Float).backward();
    }
}

fn shim_or_skip() -> bool {
    if gpu::shim_status() == ShimStatus::Missing {
        let err = Profiler::start(false).unwrap_err().to_string();
        assert!(err.contains("without the CUDA shim"), "{err}");
        eprintln!("skipping: crossclr was built without the C++ shim");
        return false;
    }
    true
}

fn row<'a>(s: &'a ProfileSummary, name: &str) -> &'a ProfileRow {
    s.rows
        .iter()
        .find(|r| r.name == name && r.kind == "op")
        .unwrap_or_else(|| panic!("no op row {name} in {:#?}", s.rows))
}

#[test]
fn profiles_cpu_ops_and_writes_a_chrome_trace() {
    if !shim_or_skip() {
        return;
    }
    let _turn = exclusive();
    tch::manual_seed(0);
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("trace.json");
    let prof = Profiler::start(false).unwrap();
    assert!(Profiler::is_active());
    run_steps();
    let summary = prof.stop(Some(&trace)).unwrap();
    assert!(!Profiler::is_active());
    assert!(!summary.cuda);

    let conv = row(&summary, "aten::conv2d");
    assert_eq!(conv.calls, STEPS as u64);
    assert!(conv.total_ns > 0);
    // conv2d dispatches to aten::convolution: its self time excludes that.
    assert!(conv.self_ns < conv.total_ns, "{conv:?}");
    assert!(row(&summary, "aten::convolution").calls >= STEPS as u64);
    // Forward mm, plus the backward's mm for the gradient of `m`.
    let mm = row(&summary, "aten::mm");
    assert!(mm.calls >= 2 * STEPS as u64, "{mm:?}");
    assert!(mm.total_ns > 0 && mm.self_ns > 0);
    assert!(
        summary
            .rows
            .iter()
            .any(|r| r.name.contains("ConvolutionBackward")),
        "the backward pass is missing: {:#?}",
        summary.rows
    );
    for r in &summary.rows {
        assert!(r.self_ns <= r.total_ns, "{r:?}");
        assert_eq!(r.device, "cpu", "{r:?}");
        assert_eq!(r.device_ns, 0, "{r:?}");
    }
    assert!(summary.device_rows().is_empty());

    let table = summary.table(10, STEPS);
    eprintln!("{table}");
    eprintln!("{}", summary.to_jsonl().unwrap());
    assert!(
        table.starts_with("no device events: ATen ops by self CPU time"),
        "{table}"
    );
    assert!(table.contains("aten::mm"), "{table}");
    assert_eq!(table.lines().count(), 2 + 10, "{table}");

    let jsonl = dir.path().join("profile.jsonl");
    summary.write_jsonl(&jsonl).unwrap();
    let back: Vec<ProfileRow> = std::fs::read_to_string(&jsonl)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(back.len(), summary.rows.len());

    let text = std::fs::read_to_string(&trace).unwrap();
    assert!(!dir.path().join("trace.json.tmp").exists());
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let events = json["traceEvents"].as_array().expect("traceEvents array");
    assert!(
        events
            .iter()
            .any(|e| e["name"] == "aten::mm" && e["cat"] == "cpu_op" && e["ph"] == "X"),
        "no aten::mm cpu_op in the trace (scripts/profile_summary.py reads these fields)"
    );
}

#[test]
fn misuse_returns_errors() {
    if !shim_or_skip() {
        return;
    }
    let _turn = exclusive();
    let first = Profiler::start(false).unwrap();
    let err = Profiler::start(false).unwrap_err().to_string();
    assert!(err.contains("already running"), "{err}");
    // Dropping a session ends it (discarding its events); a new one can start.
    drop(first);
    assert!(!Profiler::is_active());

    // A trace in a missing folder: an error, and the session is over all the same.
    let dir = tempfile::tempdir().unwrap();
    let prof = Profiler::start(false).unwrap();
    run_steps();
    let err = prof
        .stop(Some(&dir.path().join("missing").join("trace.json")))
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not exist"), "{err}");
    assert!(!Profiler::is_active());

    // Without a trace path, stop only aggregates.
    let prof = Profiler::start(false).unwrap();
    run_steps();
    let summary = prof.stop(None).unwrap();
    assert!(!summary.find("aten::mm").is_empty());

    if !tch::Cuda::is_available() {
        let err = Profiler::start(true).unwrap_err().to_string();
        assert!(err.contains("no CUDA device"), "{err}");
        assert!(!Profiler::is_active());
    }
}
