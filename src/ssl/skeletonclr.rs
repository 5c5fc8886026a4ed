//! SkeletonCLR: single-view MoCo v2.
