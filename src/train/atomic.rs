//! Durable atomic file writes: write `<file>.tmp`, fsync it, rename it over `<file>`, fsync the
//! directory. A reader (or a run resumed after `kill -9` or a power cut) sees the old file or
//! the new one, never a torn one. A failed write (disk full, `EFBIG`) removes the temp file,
//! leaves the old file as it was and returns an error naming the file.
use crate::error::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// `<path>.tmp`.
pub fn tmp_of(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

/// Fsyncs the directory holding `path` (so a rename into it is durable).
pub fn sync_dir_of(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let f = std::fs::File::open(dir).map_err(|e| Error::io(dir, e))?;
    f.sync_all().map_err(|e| Error::io(dir, e))
}

/// Fsyncs the file at `path`.
pub fn sync_file(path: &Path) -> Result<()> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    f.sync_all().map_err(|e| Error::io(path, e))
}

/// Renames `from` over `to` and fsyncs the directory.
pub fn commit(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to).map_err(|e| Error::io(to, e))?;
    sync_dir_of(to)
}

/// Writes `bytes` to `path` atomically and durably (tmp, fsync, rename, fsync dir).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_of(path);
    let res = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(&tmp, e));
    }
    crate::train::fault::point("atomic.tmp_synced");
    commit(&tmp, path)
}

/// A stable 64-bit checksum (FNV-1a over little-endian 8-byte words, then the tail bytes) of a
/// file's contents, as 16 hex digits. Detects torn and mixed files, not tampering.
pub fn checksum_bytes(bytes: &[u8]) -> String {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        h = (h ^ w).wrapping_mul(PRIME);
    }
    for &b in chunks.remainder() {
        h = (h ^ b as u64).wrapping_mul(PRIME);
    }
    h ^= bytes.len() as u64;
    format!("{h:016x}")
}

/// [`checksum_bytes`] of the file at `path`.
pub fn checksum_file(path: &Path) -> Result<String> {
    let b = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    Ok(checksum_bytes(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_checksum_is_stable() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("a.txt");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert!(!tmp_of(&p).exists());
        assert_eq!(checksum_bytes(b""), "cbf29ce484222325");
        assert_ne!(checksum_bytes(b"abcdefgh1"), checksum_bytes(b"abcdefgh2"));
    }
}
