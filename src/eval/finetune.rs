//! Evaluation: finetune.
