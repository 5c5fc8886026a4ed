//! NumPy .npy / .npz reading (memory-mapped) and writing (atomic).
