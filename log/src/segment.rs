//! Segment files: naming by base position, listing, creation, and the directory fsync that
//! makes a new or removed file itself durable.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Suffix of segment files; anything else in the directory is ignored.
const SUFFIX: &str = ".seg";
/// Width of the zero-padded base position, enough for any u64.
const DIGITS: usize = 20;

/// Path of the segment whose first record starts at position `base`.
pub(crate) fn path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:0DIGITS$}{SUFFIX}"))
}

/// Parses a segment file name back into its base position.
fn parse_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SUFFIX)?;
    if digits.len() != DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Base positions of every segment in `dir`, ascending.
pub(crate) fn list(dir: &Path) -> io::Result<Vec<u64>> {
    let mut bases = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        match name.to_str().and_then(parse_name) {
            Some(base) => bases.push(base),
            None => {
                if name.to_string_lossy().ends_with(SUFFIX) {
                    tracing::warn!(file = ?name, "ignoring a .seg file whose name is not a position");
                }
            }
        }
    }
    bases.sort_unstable();
    Ok(bases)
}

/// Flushes the directory entry list, so that files created, renamed or removed in it survive a
/// power loss; fsyncing a file alone does not persist its name.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates a new, empty segment and makes its name durable before anything is written to it.
pub(crate) fn create(dir: &Path, base: u64) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path(dir, base))?;
    sync_dir(dir)?;
    Ok(file)
}

/// Opens an existing segment for reading and writing (recovery and the writer's active segment).
pub(crate) fn open_rw(dir: &Path, base: u64) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path(dir, base))
}

/// Removes a segment file; one that is already gone counts as removed.
pub(crate) fn remove(dir: &Path, base: u64) -> io::Result<()> {
    match std::fs::remove_file(path(dir, base)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Reads up to `len` bytes at `offset`, stopping early only at the end of the file.
pub(crate) fn read_at(file: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut filled = 0;
    while filled < len {
        match file.read_at(&mut buf[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(filled);
    Ok(buf)
}

/// The segment the writer appends to.
pub(crate) struct Active {
    pub(crate) base: u64,
    pub(crate) file: File,
    /// Bytes of valid records in the file; the next write goes here.
    pub(crate) len: u64,
}

impl Active {
    /// Writes `data` at the end of the segment (no sync).
    pub(crate) fn write(&mut self, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, self.len)?;
        self.len += data.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_strangers_are_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        for base in [0u64, 1_234_567_890, u64::MAX] {
            create(dir.path(), base).expect("create");
        }
        std::fs::write(dir.path().join("checkpoint"), b"x").expect("write");
        std::fs::write(dir.path().join("12.seg"), b"x").expect("write");
        assert_eq!(
            path(dir.path(), 1_234_567_890).file_name(),
            Some(std::ffi::OsStr::new("00000000001234567890.seg"))
        );
        assert_eq!(
            list(dir.path()).expect("list"),
            vec![0, 1_234_567_890, u64::MAX]
        );
        remove(dir.path(), 0).expect("remove");
        remove(dir.path(), 0).expect("removing twice is fine");
        assert_eq!(list(dir.path()).expect("list").len(), 2);
    }
}
