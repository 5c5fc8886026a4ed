//! The pre-training loop.
