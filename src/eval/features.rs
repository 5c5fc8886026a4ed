//! Evaluation: features.
