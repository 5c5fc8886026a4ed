//! The crate's error type. Every error that comes from input names the file, the place in it
//! (line, byte offset, sample index, key) and what is wrong.
use std::path::{Path, PathBuf};

/// Errors of the toolkit. `Input` is for bad user data: it always carries the file and the place.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input data: `file`, `place` (e.g. "line 12", "sample 3", "header"), `what` went wrong.
    #[error("{}: {place}: {what}", file.display())]
    Input {
        file: PathBuf,
        place: String,
        what: String,
    },
    /// An I/O failure on a file.
    #[error("{}: {err}", file.display())]
    Io { file: PathBuf, err: std::io::Error },
    /// A bad configuration value or command-line argument.
    #[error("config: {0}")]
    Config(String),
    /// An error from libtorch.
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
    /// Anything else, with context.
    #[error("{0}")]
    Other(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Bad input at `place` of `file`.
    pub fn input(
        file: impl AsRef<Path>,
        place: impl Into<String>,
        what: impl Into<String>,
    ) -> Self {
        Error::Input {
            file: file.as_ref().to_path_buf(),
            place: place.into(),
            what: what.into(),
        }
    }
    /// I/O error on `file`.
    pub fn io(file: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            file: file.as_ref().to_path_buf(),
            err: source,
        }
    }
    pub fn config(msg: impl Into<String>) -> Self {
        Error::Config(msg.into())
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Other(format!("i/o: {e}"))
    }
}
