//! Opening a log after any stop: find the segments and the checkpoint, delete what is wholly
//! stored, validate every record from the checkpoint on, truncate a torn tail of the last
//! segment, and skip (counting) corruption in sealed ones. The log always opens unless the
//! directory itself cannot be read or written.

use std::path::Path;

use crate::checkpoint::{self, Stored};
use crate::record::{self, Bad};
use crate::segment::{self, Active};
use crate::{names, LogError, Options};

/// What opening found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Recovered {
    /// Where the consumer resumes: the lowest position not yet stored.
    pub checkpoint: u64,
    /// Where the next append goes.
    pub end: u64,
    pub segments: usize,
    /// Bytes of a torn last record (never acknowledged) cut off the last segment.
    pub truncated_bytes: u64,
    /// Bytes of sealed segments skipped because a record in them was corrupt.
    pub corrupt_bytes: u64,
    /// Records from the checkpoint to the end: what the consumer replays.
    pub replay_records: u64,
}

pub(crate) fn recover(options: &Options) -> Result<(Recovered, Active, Vec<u64>), LogError> {
    let dir = options.dir.as_path();
    std::fs::create_dir_all(dir)
        .map_err(|e| LogError::io(format!("creating {}", dir.display()), e))?;
    checkpoint::remove_leftover(dir).map_err(|e| LogError::io("removing checkpoint.tmp", e))?;
    let mut bases =
        segment::list(dir).map_err(|e| LogError::io(format!("listing {}", dir.display()), e))?;
    let stored = checkpoint::read(dir).map_err(|e| LogError::io("reading the checkpoint", e))?;
    if stored == Stored::Corrupt {
        tracing::warn!(
            dir = %dir.display(),
            "the ingest log checkpoint is damaged; replaying from the oldest segment (replay is idempotent)"
        );
    }
    let mut found = Recovered::default();
    if bases.is_empty() {
        let start = match stored {
            Stored::At(p) => p,
            _ => crate::fresh_start(),
        };
        checkpoint::write(dir, start).map_err(|e| LogError::io("writing the checkpoint", e))?;
        return empty_at(dir, start, found);
    }
    let cp = match stored {
        Stored::At(p) => p.max(bases[0]),
        _ => bases[0],
    };
    // Segments wholly below the checkpoint were stored; a crash came before their deletion.
    while bases.len() > 1 && bases[1] <= cp {
        segment::remove(dir, bases[0]).map_err(|e| LogError::io("deleting a stored segment", e))?;
        bases.remove(0);
    }
    let last = bases.len() - 1;
    let mut active_len = 0;
    for (i, &base) in bases.iter().enumerate() {
        let data = std::fs::read(segment::path(dir, base))
            .map_err(|e| LogError::io("reading a segment", e))?;
        // A sealed segment holds exactly the positions up to the next segment's base: bytes past
        // that are not records, and a file that ends early lost records it once had.
        let expected = match bases.get(i + 1) {
            Some(next) => next - base,
            None => data.len() as u64,
        };
        let data = &data[..(expected.min(data.len() as u64)) as usize];
        let (valid, records, mut bad) = scan(data, base, cp);
        found.replay_records += records;
        if bad.is_none() && valid < expected {
            bad = Some(Bad::Incomplete { needed: expected });
        }
        if let Some(bad) = bad {
            let cut = expected - valid;
            if i == last {
                if !matches!(bad, Bad::Empty) || data[valid as usize..].iter().any(|b| *b != 0) {
                    tracing::warn!(
                        segment = %segment::path(dir, base).display(),
                        bytes = cut,
                        "torn tail in the ingest log (never acknowledged); truncated"
                    );
                }
                truncate(dir, base, valid)?;
                found.truncated_bytes += cut;
                metrics::counter!(names::TRUNCATED_BYTES).increment(cut);
            } else {
                tracing::error!(
                    segment = %segment::path(dir, base).display(),
                    offset = valid,
                    bytes = cut,
                    problem = ?bad,
                    "corrupt record in a sealed ingest log segment; the rest of it is skipped"
                );
                found.corrupt_bytes += cut;
                metrics::counter!(names::CORRUPT_BYTES).increment(cut);
            }
        }
        if i == last {
            active_len = valid;
        }
    }
    let last_base = bases[last];
    found.end = last_base + active_len;
    if cp > found.end {
        // The consumer stored records the files no longer hold (lost with the page cache under
        // OsBuffer, or removed by hand). Going back below the checkpoint would hand out
        // positions the consumer already used as ids, so the log continues at the checkpoint in
        // a new segment, and the old ones, wholly below it, go.
        tracing::warn!(
            checkpoint = cp,
            end = found.end,
            "the ingest log ends below its checkpoint; continuing at the checkpoint"
        );
        for base in bases.drain(..) {
            segment::remove(dir, base).map_err(|e| LogError::io("deleting a stored segment", e))?;
        }
        segment::sync_dir(dir).map_err(|e| LogError::io("syncing the log directory", e))?;
        return empty_at(dir, cp, found);
    }
    found.checkpoint = cp;
    found.segments = bases.len();
    let file =
        segment::open_rw(dir, last_base).map_err(|e| LogError::io("opening a segment", e))?;
    Ok((
        found,
        Active {
            base: last_base,
            file,
            len: active_len,
        },
        bases,
    ))
}

/// A log with one empty segment starting at `pos`, where both the consumer and the next append
/// begin (a brand-new log, or one that continues at its checkpoint).
fn empty_at(
    dir: &Path,
    pos: u64,
    mut found: Recovered,
) -> Result<(Recovered, Active, Vec<u64>), LogError> {
    let file = segment::create(dir, pos).map_err(|e| LogError::io("creating a segment", e))?;
    found.checkpoint = pos;
    found.end = pos;
    found.segments = 1;
    Ok((
        found,
        Active {
            base: pos,
            file,
            len: 0,
        },
        vec![pos],
    ))
}

/// Validates the records of one segment; returns the length of its valid prefix, how many of
/// its records end after `cp`, and why the scan stopped early, if it did.
fn scan(data: &[u8], base: u64, cp: u64) -> (u64, u64, Option<Bad>) {
    let mut offset = 0usize;
    let mut records = 0;
    while offset < data.len() {
        match record::validate(&data[offset..]) {
            Ok(()) => {
                let size = record::frame_size(&data[offset..]).unwrap_or(0) as usize;
                offset += size;
                if base + offset as u64 > cp {
                    records += 1;
                }
            }
            Err(bad) => return (offset as u64, records, Some(bad)),
        }
    }
    (offset as u64, records, None)
}

fn truncate(dir: &Path, base: u64, len: u64) -> Result<(), LogError> {
    let file = segment::open_rw(dir, base).map_err(|e| LogError::io("opening a segment", e))?;
    file.set_len(len)
        .and_then(|()| file.sync_all())
        .map_err(|e| LogError::io("truncating a torn tail", e))
}
