//! Shuffled, drop_last batches with augmentation on worker threads.
