//! Configs mirroring the official YAML keys, with key=value overrides.
