//! Projection / classification heads (official `fc`), with the official initialisation
//! (weights N(0, 0.02), biases 0).
use crate::model::stgcn::layers::INIT_STD;
use tch::nn::{self, Init, Module, Path};
use tch::Tensor;

fn linear(p: &Path, in_dim: i64, out_dim: i64) -> nn::Linear {
    nn::linear(
        p,
        in_dim,
        out_dim,
        nn::LinearConfig {
            ws_init: Init::Randn {
                mean: 0.0,
                stdev: INIT_STD,
            },
            bs_init: Some(Init::Const(0.0)),
            bias: true,
        },
    )
}

/// The MLP projection head `Linear(in, hidden) -> ReLU -> Linear(hidden, out)`; variables
/// `0.weight, 0.bias, 2.weight, 2.bias` under `p` (official `fc = nn.Sequential(...)`).
#[derive(Debug)]
pub struct Mlp {
    pub fc0: nn::Linear,
    pub fc2: nn::Linear,
}

impl Mlp {
    pub fn new(p: &Path, in_dim: i64, hidden: i64, out: i64) -> Mlp {
        Mlp {
            fc0: linear(&(p / "0"), in_dim, hidden),
            fc2: linear(&(p / "2"), hidden, out),
        }
    }

    /// `(N, in) -> (N, out)`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.fc2.forward(&self.fc0.forward(x).relu())
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Tensor {
        Mlp::forward(self, x)
    }
}

/// A linear classifier / projection `Linear(in_dim, classes)` (`weight`, `bias` under `p`),
/// weight N(0, 0.02), bias 0. `(N, in_dim) -> (N, classes)`.
pub fn classifier(p: &Path, in_dim: i64, classes: i64) -> nn::Linear {
    linear(p, in_dim, classes)
}

/// The projection head of a checkpoint: a single `Linear` (`fc.weight`) or the MLP
/// (`fc.0.weight`, `fc.2.weight`).
#[derive(Debug)]
pub enum Head {
    Linear(nn::Linear),
    Mlp(Mlp),
}

impl Head {
    /// `(N, in) -> (N, out)`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Head::Linear(l) => l.forward(x),
            Head::Mlp(m) => m.forward(x),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn mlp_names_shapes_and_init() {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let mlp = Mlp::new(&(vs.root() / "fc"), 256, 256, 128);
        let vars = vs.variables();
        assert_eq!(vars["fc.0.weight"].size(), vec![256, 256]);
        assert_eq!(vars["fc.2.weight"].size(), vec![128, 256]);
        assert_eq!(
            vars["fc.2.bias"].abs().sum(Kind::Float).double_value(&[]),
            0.0
        );
        let std = vars["fc.0.weight"].std(true).double_value(&[]);
        assert!((std - 0.02).abs() < 0.001, "std {std}");
        let y = mlp.forward(&Tensor::randn([5, 256], (Kind::Float, Device::Cpu)));
        assert_eq!(y.size(), vec![5, 128]);
        let c = classifier(&(vs.root() / "cls"), 256, 60);
        assert_eq!(c.ws.size(), vec![60, 256]);
    }
}
