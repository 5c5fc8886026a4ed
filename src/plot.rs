//! PNG plots: line curves, confusion matrix heatmap, scatter (t-SNE).
