//! MSR Action3D text reader.
