//! Evaluation: knn.
