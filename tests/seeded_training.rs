//! A training-mode forward (dropout 0.5 in every block, fused CPU ops where they apply) is
//! reproducible from `tch::manual_seed` and changes with the seed.
//!
//! One test in its own file, hence its own process: libtorch's global generator is shared by all
//! tests of a binary, and tests run in parallel threads.
use crossclr::data::layout::Layout;
use crossclr::model::stgcn::{StGcn, StGcnConfig};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

#[test]
fn training_forward_is_reproducible_from_the_seed() {
    tch::manual_seed(1);
    let vs = VarStore::new(Device::Cpu);
    let cfg = StGcnConfig {
        hidden_channels: 4,
        hidden_dim: 16,
        dropout: 0.5,
        ..StGcnConfig::default()
    };
    let net = StGcn::new(&vs.root(), &cfg, &Layout::ntu25());
    let x = Tensor::randn([2, 3, 12, 25, 2], (Kind::Float, Device::Cpu));
    let run = |seed: i64| {
        tch::manual_seed(seed);
        tch::no_grad(|| net.forward(&x, true))
    };
    let (a, b, c) = (run(11), run(11), run(12));
    let diff = |p: &Tensor, q: &Tensor| (p - q).abs().max().double_value(&[]);
    assert_eq!(diff(&a, &b), 0.0, "same seed, different outputs");
    assert!(diff(&a, &c) > 0.0, "different seeds, same output");
}
