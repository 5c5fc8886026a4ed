//! work_dir log and metrics files.
