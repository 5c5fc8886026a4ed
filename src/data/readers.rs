//! Readers of `prepare generic` (`docs/own-data.md` describes each format):
//! each lists its samples (name, file, label and split when known) and returns a loader per
//! sample that the parallel pipeline of [`crate::data::generic`] runs.
use crate::data::generic::{Format, GenericConfig, Listing};
use crate::error::Result;

pub mod kinetics;
pub mod pkummd;
pub mod pyskl;
pub mod ucla;

/// Lists the samples of `cfg.input` with the reader of `cfg.format`.
pub fn list(cfg: &GenericConfig) -> Result<Listing> {
    match cfg.format {
        Format::Pyskl => pyskl::list(cfg),
        Format::UclaJson => ucla::list(cfg),
        Format::PkuMmd => pkummd::list(cfg),
        Format::KineticsJson => kinetics::list(cfg),
    }
}

/// Files of `dir` whose name ends with `suffix`, sorted by name.
pub fn files_with_suffix(dir: &std::path::Path, suffix: &str) -> Result<Vec<std::path::PathBuf>> {
    use crate::error::Error;
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut out = Vec::new();
    for e in rd {
        let e = e.map_err(|e| Error::io(dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(suffix) && e.path().is_file() {
            out.push(e.path());
        }
    }
    out.sort();
    Ok(out)
}
