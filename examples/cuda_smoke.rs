//! Smoke test for a GPU machine: does the binary see CUDA, run cuDNN convs, and how fast is a
//! conv stack fwd+bwd. `cargo run --example cuda_smoke`.
use tch::{Device, Kind, Tensor};

fn main() {
    println!("cuda available: {}", tch::Cuda::is_available());
    println!("cudnn available: {}", tch::Cuda::cudnn_is_available());
    println!("device count: {}", tch::Cuda::device_count());
    let device = if tch::Cuda::is_available() {
        Device::Cuda(0)
    } else {
        Device::Cpu
    };
    let x = Tensor::randn([256, 64, 50, 25], (Kind::Float, device)).set_requires_grad(true);
    let w = Tensor::randn([64, 64, 9, 1], (Kind::Float, device)).set_requires_grad(true);
    for i in 0..3 {
        let t = std::time::Instant::now();
        let y = x.conv2d(&w, None::<Tensor>, [1, 1], [4, 0], [1, 1], 1);
        let loss = y.square().mean(Kind::Float);
        loss.backward();
        if device.is_cuda() {
            tch::Cuda::synchronize(0);
        }
        println!(
            "iter {i}: conv fwd+bwd {:.2} ms, loss {:.4}",
            t.elapsed().as_secs_f64() * 1e3,
            loss.double_value(&[])
        );
    }
}
