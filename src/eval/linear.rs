//! Evaluation: linear.
