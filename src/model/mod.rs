//! Model side: graph partition, ST-GCN encoder, heads, weight import/export.
pub mod graph;
pub mod head;
pub mod kernels;
pub mod stgcn;
pub mod weights;
