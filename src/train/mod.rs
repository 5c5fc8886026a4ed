//! Pre-training: config, schedule, loop, checkpoints, logging.
pub mod checkpoint;
pub mod config;
pub mod logger;
pub mod pretrain;
pub mod schedule;
