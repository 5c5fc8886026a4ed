//! The C++ shim's device-agnostic parts on CPU tensors (EMA, fused SGD, zero_grad, TF32 flags) against
//! plain tch arithmetic, and the CUDA-only parts' error behaviour on a machine without a GPU.
use crossclr::gpu::{self, CaptureMode, CudaGraph, FusedSgd, Lr, SgdConfig, ShimStatus};
use tch::{Device, Kind, Tensor};

fn shim_or_skip() -> bool {
    if gpu::shim_status() == ShimStatus::Missing {
        eprintln!("skipping: crossclr was built without the C++ shim");
        return false;
    }
    true
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn ema_matches_plain_arithmetic() {
    if !shim_or_skip() {
        return;
    }
    tch::manual_seed(3);
    let shapes: [&[i64]; 3] = [&[4, 3], &[7], &[2, 3, 5]];
    let keys: Vec<Tensor> = shapes
        .iter()
        .map(|s| Tensor::randn(*s, (Kind::Float, Device::Cpu)))
        .collect();
    let queries: Vec<Tensor> = shapes
        .iter()
        .map(|s| Tensor::randn(*s, (Kind::Float, Device::Cpu)).set_requires_grad(true))
        .collect();
    let m = 0.999;
    let want: Vec<Tensor> = keys
        .iter()
        .zip(&queries)
        .map(|(k, q)| k * m + q.detach() * (1.0 - m))
        .collect();
    gpu::ema_(&keys, &queries, m).unwrap();
    for (k, w) in keys.iter().zip(&want) {
        assert!(
            max_abs_diff(k, w) < 1e-6,
            "EMA differs by {}",
            max_abs_diff(k, w)
        );
    }
    // Queries are untouched and no autograd history was recorded on the keys.
    assert!(!keys[0].requires_grad());
}

#[test]
fn ema_rejects_bad_input() {
    if !shim_or_skip() {
        return;
    }
    let a = Tensor::zeros([3], (Kind::Float, Device::Cpu));
    let b = Tensor::zeros([4], (Kind::Float, Device::Cpu));
    let e = gpu::ema_(&[a.shallow_clone()], &[b], 0.9)
        .unwrap_err()
        .to_string();
    assert!(e.contains("shape"), "{e}");
    // The same key storage twice in one call would race in a foreach kernel.
    let q = Tensor::ones([3], (Kind::Float, Device::Cpu));
    let e = gpu::ema_(
        &[a.shallow_clone(), a.shallow_clone()],
        &[q.shallow_clone(), q.shallow_clone()],
        0.9,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("shares its storage"), "{e}");
    assert!(gpu::ema_(&[a], &[], 0.9).is_err());
    assert!(gpu::ema_(&[], &[], 1.5).is_err());
}

/// Two steps of torch.optim.SGD semantics (momentum 0.9, dampening 0, wd folded) by plain tch ops.
#[test]
fn fused_sgd_matches_reference_formula() {
    if !shim_or_skip() {
        return;
    }
    tch::manual_seed(5);
    let cfg = SgdConfig::default();
    let lr = 0.1;
    let params: Vec<Tensor> = [[3i64, 4], [1, 5]]
        .iter()
        .map(|s| Tensor::randn(*s, (Kind::Float, Device::Cpu)).set_requires_grad(true))
        .collect();
    let mut want_p: Vec<Tensor> = params.iter().map(|p| p.detach().copy()).collect();
    let mut want_buf: Vec<Option<Tensor>> = vec![None, None];
    let bufs: Vec<Tensor> = params.iter().map(|p| p.detach().zeros_like()).collect();
    for step in 0..2 {
        let grads: Vec<Tensor> = params
            .iter()
            .map(|p| p.detach().sin() + step as f64)
            .collect();
        gpu::fused_sgd_(&params, &grads, &bufs, &cfg, Lr::Value(lr)).unwrap();
        for i in 0..params.len() {
            let d = &grads[i] + &want_p[i] * cfg.weight_decay;
            let buf = match &want_buf[i] {
                None => d.copy(),
                Some(b) => b * cfg.momentum + &d,
            };
            want_p[i] = &want_p[i] - &buf * lr;
            want_buf[i] = Some(buf);
        }
    }
    for i in 0..params.len() {
        assert!(max_abs_diff(&params[i].detach(), &want_p[i]) < 1e-5);
        assert!(max_abs_diff(&bufs[i], want_buf[i].as_ref().unwrap()) < 1e-5);
    }
}

#[test]
fn fused_sgd_optimizer_with_tensor_lr_and_zero_grad() {
    if !shim_or_skip() {
        return;
    }
    let p = Tensor::ones([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let mut opt = FusedSgd::new(
        &[p.shallow_clone()],
        0.1,
        SgdConfig {
            momentum: 0.9,
            weight_decay: 0.5,
        },
    )
    .unwrap();
    // No gradient yet: a clear error, nothing changes.
    assert!(opt.step().unwrap_err().to_string().contains("no gradient"));
    (&p * 2.0).sum(Kind::Float).backward();
    opt.step().unwrap();
    // d = 2 + 0.5 * 1 = 2.5; buf = 2.5; p = 1 - 0.1 * 2.5 = 0.75
    assert!((p.double_value(&[0]) - 0.75).abs() < 1e-6);
    opt.set_lr(0.2);
    opt.zero_grad(false).unwrap();
    assert_eq!(p.grad().abs().sum(Kind::Float).double_value(&[]), 0.0);
    (&p * 2.0).sum(Kind::Float).backward();
    opt.step().unwrap();
    // d = 2 + 0.5 * 0.75 = 2.375; buf = 0.9 * 2.5 + 2.375 = 4.625; p = 0.75 - 0.2 * 4.625 = -0.175
    assert!(
        (p.double_value(&[0]) + 0.175).abs() < 1e-6,
        "{}",
        p.double_value(&[0])
    );
    assert!((opt.momentum_buffers()[0].double_value(&[1]) - 4.625).abs() < 1e-6);
    opt.zero_grad(true).unwrap();
    assert!(!p.grad().defined());
}

#[test]
fn tf32_flags_round_trip() {
    if !shim_or_skip() {
        return;
    }
    let before = gpu::tf32_state().unwrap();
    gpu::set_tf32(true).unwrap();
    assert_eq!(gpu::tf32_state().unwrap(), (true, true));
    gpu::set_tf32(false).unwrap();
    assert_eq!(gpu::tf32_state().unwrap(), (false, false));
    // Restore the library defaults for the other tests of this binary.
    gpu::set_tf32(before.0).unwrap();
}

#[test]
fn cuda_parts_fail_clearly_without_a_gpu() {
    let e = CudaGraph::new(Device::Cpu)
        .err()
        .expect("a CPU graph must be refused")
        .to_string();
    assert!(e.contains("CUDA"), "{e}");
    if tch::Cuda::is_available() {
        return;
    }
    // A CUDA device that does not exist: an error, never an abort.
    assert!(CudaGraph::new(Device::Cuda(0)).is_err());
    let x = Tensor::zeros([2], (Kind::Float, Device::Cpu));
    let r = gpu::CapturedStep::capture(Device::Cpu, &[&x], 1, CaptureMode::Global, |i| {
        Ok(vec![i[0].copy()])
    });
    assert!(r.is_err());
    assert!(gpu::cuda_memory(Device::Cpu).is_err());
    assert!(gpu::device_name(Device::Cpu).unwrap().starts_with("cpu"));
}
