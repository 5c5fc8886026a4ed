//! `gpu::FastStep` (the capture-safe step) against the project's reference step
//! (`ssl::trainer::Pretrainer::train_step`) on CPU, from identical states and RNG: same losses,
//! parameters, queues and pointer after several steps, in both CrosSCLR phases.
use crossclr::data::layout::Layout;
use crossclr::data::views::View;
use crossclr::gpu::{FastStep, SgdConfig, ShimStatus};
use crossclr::model::stgcn::StGcnConfig;
use crossclr::ssl::crossclr as cc;
use crossclr::ssl::model::SslSpec;
use crossclr::ssl::trainer::Pretrainer;
use tch::{Device, Kind, Tensor};

const LR: f64 = 0.1;
const SGD: SgdConfig = SgdConfig {
    momentum: 0.9,
    weight_decay: 1e-4,
};

/// A tiny 3-view CrosSCLR: hidden 4, hidden_dim 16, feature 8, K 16, batch 4, 8 frames.
fn tiny_spec() -> SslSpec {
    let mut spec = cc::official_spec(vec![View::Joint, View::Motion, View::Bone]);
    spec.stgcn = StGcnConfig {
        hidden_channels: 4,
        hidden_dim: 16,
        ..StGcnConfig::default()
    };
    spec.feature_dim = 8;
    spec.queue_size = 16;
    spec
}

/// The tests seed libtorch's global generator: run them one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn fast_step_matches_reference_step() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if crossclr::gpu::shim_status() == ShimStatus::Missing {
        eprintln!("skipping: built without the C++ shim");
        return;
    }
    let layout = Layout::ntu25();
    let spec = tiny_spec();
    tch::manual_seed(7);
    let mut reference = Pretrainer::new(
        &spec,
        &layout,
        Device::Cpu,
        LR,
        SGD.momentum,
        SGD.weight_decay,
    )
    .unwrap();
    tch::manual_seed(7);
    let fast_model = Pretrainer::new(
        &spec,
        &layout,
        Device::Cpu,
        LR,
        SGD.momentum,
        SGD.weight_decay,
    )
    .unwrap();
    let mut fast = FastStep::new(&fast_model.model, 4, LR, SGD).unwrap();
    let cross_epoch = spec.cross.as_ref().unwrap().cross_epoch;
    // A phase-1 step, two phase-2 steps (motion-only EMA, CVC-KM), one more phase-1 step.
    for (i, epoch) in [1, cross_epoch + 1, cross_epoch + 1, 1]
        .into_iter()
        .enumerate()
    {
        tch::manual_seed(100 + i as i64);
        let xq = Tensor::randn([4, 3, 8, 25, 2], (Kind::Float, Device::Cpu));
        let xk = Tensor::randn([4, 3, 8, 25, 2], (Kind::Float, Device::Cpu));
        tch::manual_seed(1000 + i as i64);
        let want = reference.train_step(&xq, &xk, epoch).unwrap();
        tch::manual_seed(1000 + i as i64);
        let got = fast
            .step(&fast_model.model, &xq, &xk, epoch > cross_epoch)
            .unwrap()
            .double_value(&[]);
        assert!(
            (got - want.loss).abs() < 1e-4 * want.loss.abs().max(1.0),
            "step {i}: loss {got} vs {}",
            want.loss
        );
    }
    let a = reference.model.state_tensors();
    let mut fm = fast_model;
    fast.write_back_ptr(&mut fm.model);
    let b = fm.model.state_tensors();
    assert_eq!(a.len(), b.len());
    for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        if ta.kind() == Kind::Float {
            // Relative to the tensor's scale: the tiny model's head bias grows to ~1e4 at lr 0.1,
            // where one float32 ulp is ~1e-3; fused vs unfused SGD rounding drifts by ~1e-5 in 4 steps.
            let scale = ta.abs().max().double_value(&[]).max(1.0);
            let d = max_diff(ta, tb);
            assert!(d < 1e-4 * scale, "{na} differs by {d} (scale {scale})");
        } else {
            assert!(ta.equal(tb), "{na} differs");
        }
    }
}

#[test]
fn fast_step_rejects_wrong_batches() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if crossclr::gpu::shim_status() == ShimStatus::Missing {
        return;
    }
    let layout = Layout::ntu25();
    tch::manual_seed(1);
    let pre = Pretrainer::new(&tiny_spec(), &layout, Device::Cpu, LR, 0.9, 1e-4).unwrap();
    assert!(
        FastStep::new(&pre.model, 5, LR, SGD).is_err(),
        "5 does not divide K = 16"
    );
    let mut fast = FastStep::new(&pre.model, 4, LR, SGD).unwrap();
    assert!(!fast.uses_side_streams(), "side streams are CUDA-only");
    let x = Tensor::randn([2, 3, 12, 25, 2], (Kind::Float, Device::Cpu));
    assert!(fast.step(&pre.model, &x, &x, false).is_err());
}
