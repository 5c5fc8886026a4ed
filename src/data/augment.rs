//! Augmentations: temporal crop with mirrored padding, then shear (seeded).
