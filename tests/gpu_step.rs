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
    assert_states_close(&a, &b);
}

/// Same names in the same order; float tensors within 1e-4 of their scale, the others equal.
/// Relative to the tensor's scale: the tiny model's head bias grows to ~1e4 at lr 0.1, where one
/// float32 ulp is ~1e-3; fused vs unfused SGD rounding drifts by ~1e-5 in 4 steps.
fn assert_states_close(a: &[(String, Tensor)], b: &[(String, Tensor)]) {
    assert_eq!(a.len(), b.len());
    for ((na, ta), (nb, tb)) in a.iter().zip(b) {
        assert_eq!(na, nb);
        if ta.kind() == Kind::Float {
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

/// On a CUDA device (skipped without one): the step with one side stream per pass
/// (`kernels.view_streams=passes`) gives the same losses and states as the step on one stream
/// (`off`), eagerly (2 steps) and captured in a CUDA graph (3 warm-up steps + 2 replays), TF32
/// off. A missing join or a race between the streams would show as different parameters.
#[test]
fn side_streams_on_cuda_match_one_stream() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !cuda_ready() {
        return;
    }
    use crossclr::gpu::{CaptureMode, CapturedStep};
    let device = Device::Cuda(0);
    let layout = Layout::ntu25();
    let mut spec = tiny_spec();
    spec.stgcn.hidden_channels = 16;
    spec.stgcn.hidden_dim = 64;
    spec.queue_size = 64;
    let batch = 8;
    let inputs: Vec<(Tensor, Tensor)> = (0..7)
        .map(|i| {
            tch::manual_seed(200 + i);
            let opts = (Kind::Float, device);
            (
                Tensor::randn([batch, 3, 20, 25, 2], opts),
                Tensor::randn([batch, 3, 20, 25, 2], opts),
            )
        })
        .collect();
    let run = |side_streams: bool| -> (Vec<f64>, Vec<(String, Tensor)>) {
        use crossclr::model::kernels::{Kernels, ViewStreams};
        tch::manual_seed(7);
        let mut pre =
            Pretrainer::new(&spec, &layout, device, LR, SGD.momentum, SGD.weight_decay).unwrap();
        pre.model.set_kernels(Kernels {
            view_streams: if side_streams {
                ViewStreams::Passes
            } else {
                ViewStreams::Off
            },
            ..Kernels::for_device(device)
        });
        let mut step = FastStep::new(&pre.model, batch, LR, SGD).unwrap();
        assert_eq!(step.uses_side_streams(), side_streams);
        let mut losses = Vec::new();
        for (i, (xq, xk)) in inputs[..2].iter().enumerate() {
            tch::manual_seed(1000 + i as i64);
            let loss = step.step(&pre.model, xq, xk, true).unwrap();
            losses.push(loss.double_value(&[]));
        }
        let model = &pre.model;
        tch::manual_seed(2000);
        let mut captured = CapturedStep::capture(
            device,
            &[&inputs[2].0, &inputs[2].1],
            3,
            CaptureMode::Global,
            |inp| Ok(vec![step.step(model, &inp[0], &inp[1], true)?]),
        )
        .unwrap();
        for (i, (xq, xk)) in inputs[5..].iter().enumerate() {
            tch::manual_seed(3000 + i as i64);
            let out = captured.run(&[xq, xk]).unwrap();
            losses.push(out[0].double_value(&[]));
        }
        tch::Cuda::synchronize(0);
        let mut m = pre;
        step.write_back_ptr(&mut m.model);
        let state = m
            .model
            .state_tensors()
            .into_iter()
            .map(|(n, t)| (n, t.to_device(Device::Cpu)))
            .collect();
        (losses, state)
    };
    // The first step of a process times the fused kernels against the tch ops per shape (which
    // draws dropout masks); a throw-away run makes both compared runs start from the same state.
    let _ = run(true);
    let (loss_a, state_a) = run(false);
    let (loss_b, state_b) = run(true);
    eprintln!("losses on one stream / on side streams: {loss_a:?} / {loss_b:?}");
    for (i, (a, b)) in loss_a.iter().zip(&loss_b).enumerate() {
        assert!(
            (a - b).abs() < 1e-4 * a.abs().max(1.0),
            "step {i}: {a} vs {b}"
        );
    }
    assert_states_close(&state_a, &state_b);
}

/// On a CUDA device (skipped without one): the graph product on packed rows
/// (`model::stgcn::aggregate::packed`, P = 4 for 25 joints) against the unpacked op, values and
/// both gradients, TF32 off.
#[test]
fn packed_aggregation_on_cuda_matches() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !cuda_ready() {
        return;
    }
    use crossclr::model::stgcn::aggregate;
    let device = Device::Cuda(0);
    assert_eq!(aggregate::packing(25, true), 4);
    tch::manual_seed(9);
    let opts = (Kind::Float, device);
    let rows = 16 * 256 * 50;
    let x = Tensor::randn([rows, 25], opts);
    let g = Tensor::randn([3, 25, 25], opts);
    let dz = Tensor::randn([3, rows, 25], opts);
    let run = |pack: i64| {
        let (x, g) = (
            x.detach().set_requires_grad(true),
            g.detach().set_requires_grad(true),
        );
        let z = aggregate::packed(&x, &g, pack, true);
        (&z * &dz).sum(Kind::Float).backward();
        [z.detach(), x.grad(), g.grad()]
    };
    let got = run(4);
    let want = run(1);
    for (name, a, b) in [
        ("z", &got[0], &want[0]),
        ("dx", &got[1], &want[1]),
        ("dg", &got[2], &want[2]),
    ] {
        let rel = (a - b).norm().double_value(&[]) / b.norm().double_value(&[]);
        eprintln!("packed vs unpacked {name}: relative L2 {rel:.3e}");
        assert!(rel < 1e-5, "{name}: relative L2 {rel}");
    }
}

/// On a CUDA device (skipped without one): the device-time timing of the fused-vs-tch choice
/// (the default, CUDA-graph timing) captures and replays both implementations, leaves the model's
/// batch norm untouched and frees everything it allocated.
#[test]
fn graph_timed_choice_on_cuda() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !cuda_ready() {
        return;
    }
    use crossclr::model::stgcn::{fused_cuda, layers::BatchNorm};
    let device = Device::Cuda(0);
    let vs = tch::nn::VarStore::new(device);
    let bn = BatchNorm::new(&vs.root(), 16);
    let x = Tensor::randn([1, 16, 256, 50, 25], (Kind::Float, device));
    let before = crossclr::gpu::cuda_memory(device).unwrap();
    let (fused_ms, native_ms) = fused_cuda::graph_timed_bn(&x, &bn, true).unwrap();
    let after = crossclr::gpu::cuda_memory(device).unwrap();
    eprintln!(
        "BN + ReLU [16, 256, 50, 25] device time: fused {fused_ms:.4} ms, tch {native_ms:.4} ms; \
         allocated {} -> {} bytes",
        before.current_allocated, after.current_allocated
    );
    assert!(fused_ms > 0.0 && native_ms > 0.0);
    assert_eq!(bn.num_batches_tracked.int64_value(&[]), 0);
    assert_eq!(bn.running_mean.abs().max().double_value(&[]), 0.0);
    assert_eq!(after.current_allocated, before.current_allocated);
}

/// True on a CUDA device with the shim's CUDA half (then with TF32 off, for exact comparisons);
/// prints why the calling test is skipped otherwise.
fn cuda_ready() -> bool {
    if !tch::Cuda::is_available() || crossclr::gpu::shim_status() != ShimStatus::Cuda {
        eprintln!("skipping: needs a CUDA device and the shim's CUDA half");
        return false;
    }
    crossclr::gpu::set_tf32(false).unwrap();
    true
}
