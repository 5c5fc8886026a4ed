//! Pre-training: config, schedule, optimizer, loop, checkpoints, logging.
pub mod atomic;
pub mod config;
pub mod logger;
pub mod schedule;
pub mod sgd;
