//! Evaluation protocols: linear, KNN, semi-supervised, fine-tune, ensemble; metrics and plots.
pub mod args;
pub mod encoder;
pub mod ensemble;
pub mod features;
pub mod files;
pub mod finetune;
pub mod knn;
pub mod linear;
pub mod metrics;
pub mod protocol;
pub mod report;
pub mod semi;
pub mod split;
pub mod tsne;
