//! The (names, labels) label.pkl format.
