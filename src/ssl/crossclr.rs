//! CrosSCLR: 2-view (joint + motion, official `net/crossclr.py`) and 3-view (joint, motion, bone,
//! official `net/crossclr_3views.py`) MoCo with cross-view consistent knowledge mining.
//!
//! The views are data: an [`SslModel`] with one branch per view. Phase 1 (1-based epochs
//! `<= cross_epoch`): the sum of independent MoCo losses, every key encoder EMA-updated (joint,
//! motion, bone order). Phase 2: [`cvc_km_losses`] (top-k positives mined in the other view's raw
//! similarities, context block `s_u * s_v`, multi-positive mean log-probability, per-view average
//! over partners, summed). All queues are written at the same slots, so slot i of every queue
//! holds the same training sample.
//!
//! Faithfulness flags (defaults = official code):
//! - `shared_head`: motion/bone heads are an own Linear(256,256)-ReLU followed by the joint
//!   head's Linear-ReLU-Linear (the same variables), query and key side; in phase 1 the shared
//!   key layers therefore get one EMA update per view per step. Off: separate 2-layer heads.
//! - `phase2_motion_ema_only`: in phase 2 only the motion key encoder (and through it the shared
//!   key head layers) is EMA-updated; joint and bone key backbones stay frozen. Off: all updated.
//! - `independent_key_init`: key encoders start as independent random networks.
use crate::data::views::View;
use crate::model::stgcn::StGcnConfig;
pub use crate::ssl::loss::cvc_km_losses;
pub use crate::ssl::model::SslModel;
use crate::ssl::model::{CrossSpec, SslSpec};

/// Official hyper-parameters for `views` (joint first): K 32768, m 0.999, T 0.07, cross epoch
/// 150, top-1, context, all quirks on.
pub fn official_spec(views: Vec<View>) -> SslSpec {
    SslSpec {
        views,
        per_view_names: true,
        stgcn: StGcnConfig::default(),
        feature_dim: 128,
        mlp: true,
        queue_size: 32768,
        momentum: 0.999,
        temperature: 0.07,
        cross: Some(CrossSpec {
            cross_epoch: 150,
            topk: 1,
            context: true,
            phase2_motion_ema_only: true,
        }),
        shared_head: true,
        independent_key_init: true,
        recipe: Default::default(),
    }
}
