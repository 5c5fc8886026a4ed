//! Projection / classification heads.
