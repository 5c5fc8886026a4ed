//! Thin command-line handlers over the library: parse arguments, call the library, print.
pub mod bench;
pub mod demo;
pub mod embed;
pub mod ensemble;
pub mod finetune;
pub mod inspect;
pub mod knn;
pub mod linear;
pub mod prepare;
pub mod pretrain;
pub mod semi;
pub mod synth;
