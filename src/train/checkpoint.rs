//! Atomic checkpoints with resume state.
