//! The steps `crossclr bench` times. Placeholder until `ssl::model` / `ssl::trainer` are exported
//! by src/ssl/mod.rs; the full version is src/bench/ssl_steps_full.rs.txt.
use super::{BenchConfig, StepRunner};
use crate::data::layout::Layout;
use crate::error::{Error, Result};
use tch::Tensor;

pub(super) fn build(
    _cfg: &BenchConfig,
    _layout: &Layout,
    _example: &(Tensor, Tensor),
) -> Result<Box<dyn StepRunner>> {
    Err(Error::Other(
        "bench: the SSL model (src/ssl) is not available in this build yet".into(),
    ))
}
