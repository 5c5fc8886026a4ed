//! Official PyTorch .pt state-dict import and safetensors checkpoints.
