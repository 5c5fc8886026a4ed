//! CrosSCLR: 2- and 3-view MoCo with cross-view consistent knowledge mining.
