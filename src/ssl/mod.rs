//! Self-supervised methods: MoCo queue, SkeletonCLR, CrosSCLR (CVC-KM).
pub mod crossclr;
pub mod queue;
pub mod skeletonclr;
