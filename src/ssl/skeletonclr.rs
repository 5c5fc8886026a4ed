//! SkeletonCLR: single-view MoCo v2 on any view (official `net/skeletonclr.py`).
//!
//! It is an [`SslModel`] with one branch and the official single-model names (`encoder_q.*`,
//! `encoder_k.*`, `queue`, `queue_ptr`) whatever the view. One step: `q = normalize(f_q(view(x_q)))`;
//! EMA `theta_k <- m theta_k + (1-m) theta_q` over parameters only (not BN buffers), *before*
//! the key forward; `k = normalize(f_k(view(x_k)))` in train mode without grad; logits
//! `[q.k, q.Queue] / T`; cross-entropy with target 0; enqueue `k` at the pointer.
use crate::data::views::View;
use crate::model::stgcn::StGcnConfig;
pub use crate::ssl::model::SslModel;
use crate::ssl::model::SslSpec;

/// Official hyper-parameters: feature 128, K 32768, m 0.999, T 0.07, MLP head, 1/4-width ST-GCN,
/// independently initialised key encoder.
pub fn official_spec(view: View) -> SslSpec {
    SslSpec {
        views: vec![view],
        per_view_names: false,
        stgcn: StGcnConfig::default(),
        feature_dim: 128,
        mlp: true,
        queue_size: 32768,
        momentum: 0.999,
        temperature: 0.07,
        cross: None,
        shared_head: false,
        independent_key_init: true,
        recipe: Default::default(),
    }
}
