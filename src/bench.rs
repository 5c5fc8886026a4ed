//! `crossclr bench`: time one pre-training step.
