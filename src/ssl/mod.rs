//! Self-supervised methods: MoCo queue, losses, the multi-view MoCo model, SkeletonCLR, CrosSCLR
//! (CVC-KM), and the one-step trainer used by the training loop and the benchmark.
pub mod branch;
pub mod crossclr;
pub mod loss;
pub mod model;
pub mod queue;
pub mod skeletonclr;
pub mod trainer;

pub use model::{SslModel, SslSpec};
pub use trainer::{Pretrainer, StepStats};
