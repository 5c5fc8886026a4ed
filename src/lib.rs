//! CrosSCLR and SkeletonCLR: self-supervised skeleton action representation learning on libtorch.
//!
//! The modules follow the data flow:
//! [`data`] (formats, layouts, preprocessing, views, augmentation, loaders, synthetic data) ->
//! [`model`] (graph, ST-GCN, heads, weight import) -> [`ssl`] (queues, SkeletonCLR, CrosSCLR) ->
//! [`train`] (config, schedule, loop, checkpoints, logs) -> [`eval`] (linear, KNN, semi, fine-tune,
//! ensemble, metrics, plots). [`device`] resolves `--device cpu|cuda[:N]`; [`bench`](mod@bench) times steps.
pub mod bench;
pub mod cpu_cache;
pub mod data;
pub mod device;
pub mod dist;
pub mod error;
pub mod eval;
pub mod fuzz;
pub mod gpu;
pub mod model;
pub mod plot;
pub mod ssl;
pub mod train;

pub use error::{Error, Result};
