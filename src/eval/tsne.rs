//! Evaluation: tsne.
