//! Evaluation: semi.
