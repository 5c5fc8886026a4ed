//! The 1/4-width ST-GCN encoder.
