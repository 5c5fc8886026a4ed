//! Evaluation: metrics.
