//! The steps `crossclr bench` times, built from the project's SSL model (`ssl::trainer::Pretrainer`).
use super::{BenchConfig, BenchModel, StepKind, StepRunner};
use crate::data::layout::Layout;
use crate::data::views::View;
use crate::error::Result;
use crate::gpu::{CaptureMode, CapturedStep, FastStep, SgdConfig};
use crate::ssl::model::SslSpec;
use crate::ssl::trainer::Pretrainer;
use crate::ssl::{crossclr, skeletonclr};
use tch::Tensor;

/// Official pre-training SGD: lr 0.1, momentum 0.9, weight decay 1e-4 (reference section 7.1).
const LR: f64 = 0.1;
const SGD: SgdConfig = SgdConfig {
    momentum: 0.9,
    weight_decay: 1e-4,
};
/// Warm-up steps on the side stream before a capture (PyTorch's recipe uses 3).
const CAPTURE_WARMUP: usize = 3;

fn spec(cfg: &BenchConfig) -> SslSpec {
    let mut spec = match cfg.model {
        BenchModel::Skeletonclr => skeletonclr::official_spec(View::Joint),
        BenchModel::Crossclr2 => crossclr::official_spec(vec![View::Joint, View::Motion]),
        BenchModel::Crossclr3 => {
            crossclr::official_spec(vec![View::Joint, View::Motion, View::Bone])
        }
    };
    spec.queue_size = cfg.queue_size;
    spec
}

struct Reference {
    pre: Pretrainer,
    epoch: usize,
}

impl StepRunner for Reference {
    fn run(&mut self, x_q: &Tensor, x_k: &Tensor) -> Result<Tensor> {
        let stats = self.pre.train_step(x_q, x_k, self.epoch)?;
        Ok(Tensor::from(stats.loss))
    }
}

struct Fast {
    pre: Pretrainer,
    step: FastStep,
    cross: bool,
}

impl StepRunner for Fast {
    fn run(&mut self, x_q: &Tensor, x_k: &Tensor) -> Result<Tensor> {
        self.step.step(&self.pre.model, x_q, x_k, self.cross)
    }
}

/// The fast step captured into a CUDA graph. Field order: the graph is dropped before the tensors
/// its kernels address.
struct Graphed {
    captured: CapturedStep,
    _step: FastStep,
    _pre: Pretrainer,
}

impl StepRunner for Graphed {
    fn run(&mut self, x_q: &Tensor, x_k: &Tensor) -> Result<Tensor> {
        let out = self.captured.run(&[x_q, x_k])?;
        // A device-side copy: the static output is overwritten by the next replay.
        Ok(out[0].copy())
    }
}

/// Builds the step `cfg` asks for; `example` is one input pair (for the graph's static inputs).
pub(super) fn build(
    cfg: &BenchConfig,
    layout: &Layout,
    example: &(Tensor, Tensor),
) -> Result<Box<dyn StepRunner>> {
    let spec = spec(cfg);
    let mut pre = Pretrainer::new(
        &spec,
        layout,
        cfg.device,
        LR,
        SGD.momentum,
        SGD.weight_decay,
    )?;
    pre.model.set_kernels(cfg.kernels.resolved(cfg.device));
    let cross = cfg.phase == 2;
    match (cfg.step, cfg.graph) {
        (StepKind::Reference, _) => {
            let epoch = pre.epoch_for_phase(cfg.phase);
            Ok(Box::new(Reference { pre, epoch }))
        }
        (StepKind::Fast, false) => {
            let step = FastStep::new(&pre.model, cfg.batch, LR, SGD)?;
            Ok(Box::new(Fast { pre, step, cross }))
        }
        (StepKind::Fast, true) => {
            let mut step = FastStep::new(&pre.model, cfg.batch, LR, SGD)?;
            let model = &pre.model;
            let captured = CapturedStep::capture(
                cfg.device,
                &[&example.0, &example.1],
                CAPTURE_WARMUP,
                CaptureMode::Global,
                |inputs| Ok(vec![step.step(model, &inputs[0], &inputs[1], cross)?]),
            )?;
            Ok(Box::new(Graphed {
                captured,
                _step: step,
                _pre: pre,
            }))
        }
    }
}
