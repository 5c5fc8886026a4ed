//! Evaluation: ensemble.
