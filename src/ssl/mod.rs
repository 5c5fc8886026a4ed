//! Self-supervised methods: MoCo queue, losses, the multi-view MoCo model, SkeletonCLR, CrosSCLR
//! (CVC-KM), and the one-step trainer used by the training loop and the benchmark.
pub mod loss;
pub mod queue;
