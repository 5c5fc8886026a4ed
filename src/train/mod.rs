//! Pre-training: config, schedule, optimizer, loop, checkpoints, logging.
pub mod atomic;
pub mod checkpoint;
pub mod config;
pub mod diagnostics;
pub mod fault;
pub mod lock;
pub mod logger;
pub mod numerics;
pub mod pretrain;
pub mod schedule;
pub mod sgd;
