//! Procedural, licence-free synthetic skeleton action dataset.
