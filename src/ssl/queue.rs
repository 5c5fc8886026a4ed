//! MoCo key queues.
