//! The checkpoint file: the consumer's durable "lowest position not yet stored", written
//! atomically (temporary file, fsync, rename, directory fsync) so a crash leaves either the old
//! or the new value, never a mix.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

use crate::segment;

const FILE: &str = "checkpoint";
const TEMP: &str = "checkpoint.tmp";
const LEN: usize = 12;

/// What was found in the checkpoint file.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Stored {
    Missing,
    /// The file exists but is not 12 bytes with a matching crc.
    Corrupt,
    At(u64),
}

/// Reads the checkpoint; a missing or damaged file is not an error, only unreadable storage is.
pub(crate) fn read(dir: &Path) -> io::Result<Stored> {
    let bytes = match std::fs::read(dir.join(FILE)) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Stored::Missing),
        Err(e) => return Err(e),
    };
    if bytes.len() != LEN {
        return Ok(Stored::Corrupt);
    }
    let mut pos = [0u8; 8];
    pos.copy_from_slice(&bytes[..8]);
    let mut crc = [0u8; 4];
    crc.copy_from_slice(&bytes[8..]);
    if crc32c::crc32c(&pos) != u32::from_le_bytes(crc) {
        return Ok(Stored::Corrupt);
    }
    Ok(Stored::At(u64::from_le_bytes(pos)))
}

/// Durably replaces the checkpoint with `pos`.
pub(crate) fn write(dir: &Path, pos: u64) -> io::Result<()> {
    let mut bytes = [0u8; LEN];
    bytes[..8].copy_from_slice(&pos.to_le_bytes());
    bytes[8..].copy_from_slice(&crc32c::crc32c(&pos.to_le_bytes()).to_le_bytes());
    let temp = dir.join(TEMP);
    let mut file: File = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&temp)?;
    file.write_all(&bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temp, dir.join(FILE))?;
    segment::sync_dir(dir)
}

/// Removes a temporary file left by a crash in the middle of `write`; it was never the
/// checkpoint, so it carries no information.
pub(crate) fn remove_leftover(dir: &Path) -> io::Result<()> {
    match std::fs::remove_file(dir.join(TEMP)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_read_and_damage() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(read(dir.path()).expect("read"), Stored::Missing);
        write(dir.path(), 77).expect("write");
        write(dir.path(), 1 << 60).expect("write");
        assert_eq!(read(dir.path()).expect("read"), Stored::At(1 << 60));
        let mut bytes = std::fs::read(dir.path().join(FILE)).expect("read");
        bytes[3] ^= 1;
        std::fs::write(dir.path().join(FILE), &bytes).expect("write");
        assert_eq!(read(dir.path()).expect("read"), Stored::Corrupt);
        std::fs::write(dir.path().join(FILE), b"short").expect("write");
        assert_eq!(read(dir.path()).expect("read"), Stored::Corrupt);
    }
}
