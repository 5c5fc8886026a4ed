//! `prepare ntu60|ntu120`: raw .skeleton corpus -> official npy/pkl files and 50-frame files.
