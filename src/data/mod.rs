//! Data side: formats, layouts, preprocessing, views, augmentation, loaders, synthetic data.
pub mod augment;
pub mod dataset;
pub mod formats;
pub mod generic;
pub mod layout;
pub mod limits;
pub mod loader;
pub mod msr;
pub mod npy;
pub mod ntu;
pub mod pickle;
pub mod pickle_bounds;
pub mod prepare;
pub mod preprocess;
pub mod pyobj;
pub mod readers;
pub mod synth;
pub mod views;

pub use dataset::{F32Buf, SkeletonDataset};
pub use layout::Layout;
