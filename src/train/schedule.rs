//! Step learning-rate schedule.
