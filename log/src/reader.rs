//! The consumer's view of the log: committed records in position order, from the in-memory
//! chunks while it keeps up, from the segment files when it lags or after a restart.

use std::sync::Arc;

use bytes::Bytes;

use crate::record::{self, Bad};
use crate::segment;
use crate::{names, Entry, LogError, Shared};

/// How much one file read takes at most (a larger record is read whole).
const READ_CHUNK: usize = 1 << 20;

/// Reads committed records in position order; see [`crate::Log::reader`].
pub struct Reader {
    shared: Arc<Shared>,
    pos: u64,
}

impl Reader {
    pub(crate) fn new(shared: Arc<Shared>, from: u64) -> Reader {
        Reader { shared, pos: from }
    }

    /// The position of the next record to return.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Waits for at least one committed record and returns up to `max` of them; `Ok(None)` once
    /// the log is closed and read to its end.
    pub async fn next_batch(&mut self, max: usize) -> Result<Option<Vec<Entry>>, LogError> {
        // A batch of zero could never make progress; the caller gets at least one record.
        let max = max.max(1);
        loop {
            let waker = Arc::clone(&self.shared);
            let notified = waker.data.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (durable, done) = {
                let s = self.shared.lock();
                // Records below the oldest segment are gone (stored and deleted).
                if let Some(first) = s.bases.first() {
                    if self.pos < *first {
                        self.pos = *first;
                    }
                }
                let done = *self.shared.finished.borrow()
                    || (s.closed && s.pending.is_empty() && s.durable == s.end);
                if let (Some(detail), true) = (&s.failed, self.pos >= s.durable) {
                    return Err(self.shared.failed_error(detail));
                }
                (s.durable, done)
            };
            if self.pos < durable {
                if let Some(entries) = self.read_memory(durable, max) {
                    if !entries.is_empty() {
                        return Ok(Some(entries));
                    }
                }
                let shared = Arc::clone(&self.shared);
                let pos = self.pos;
                let (next, entries) =
                    tokio::task::spawn_blocking(move || read_files(&shared, pos, durable, max))
                        .await
                        .map_err(|e| LogError::io("reading the log", std::io::Error::other(e)))??;
                self.pos = next;
                metrics::counter!(names::REPLAYED).increment(entries.len() as u64);
                self.shared.lock().stats.records_replayed += entries.len() as u64;
                if !entries.is_empty() {
                    return Ok(Some(entries));
                }
                continue;
            }
            if done {
                return Ok(None);
            }
            notified.await;
        }
    }

    /// Records from the in-memory chunks, or None when the position is no longer in memory.
    fn read_memory(&mut self, durable: u64, max: usize) -> Option<Vec<Entry>> {
        // Only the lookup happens under the log's lock (appenders share it); the chunks are
        // reference-counted, so decoding and checking CRCs happens after it is released.
        let chunks: Vec<(u64, Bytes)> = {
            let s = self.shared.lock();
            let pos = self.pos;
            let i = s
                .memory
                .partition_point(|(start, chunk)| start + chunk.len() as u64 <= pos);
            match s.memory.get(i) {
                Some((start, _)) if *start <= pos => {}
                _ => return None,
            }
            let mut taken = 0usize;
            let mut expect = s.memory[i].0;
            let mut out = Vec::new();
            for (start, chunk) in s.memory.range(i..) {
                // Chunks are contiguous; a gap would mean a bug, and the files can answer.
                if *start != expect || taken >= READ_CHUNK {
                    break;
                }
                expect = start + chunk.len() as u64;
                taken += chunk.len();
                out.push((*start, chunk.clone()));
            }
            out
        };
        let mut out = Vec::new();
        for (start, chunk) in &chunks {
            let chunk_end = start + chunk.len() as u64;
            while self.pos < chunk_end && self.pos < durable && out.len() < max {
                match record::decode(chunk, (self.pos - start) as usize, *start) {
                    Ok(entry) => {
                        self.pos = entry.end;
                        out.push(entry);
                    }
                    Err(_) => return if out.is_empty() { None } else { Some(out) },
                }
            }
            if out.len() >= max || self.pos >= durable {
                break;
            }
        }
        Some(out)
    }
}

/// Reads records from the files from `pos` (below `durable`); returns the next position and the
/// records. A bad record in a sealed segment is counted and skipped to the next segment; one in
/// the active segment below the watermark is an error.
fn read_files(
    shared: &Shared,
    mut pos: u64,
    durable: u64,
    max: usize,
) -> Result<(u64, Vec<Entry>), LogError> {
    let bases = shared.lock().bases.clone();
    let idx = bases.partition_point(|b| *b <= pos).saturating_sub(1);
    let Some(&base) = bases.get(idx) else {
        return Ok((pos, Vec::new()));
    };
    if pos < base {
        // The segment was deleted after the caller looked (a checkpoint passed it).
        return Ok((base, Vec::new()));
    }
    let next_base = bases.get(idx + 1).copied();
    let limit = next_base.unwrap_or(durable).min(durable);
    if pos >= limit {
        // The rest of this segment holds no records (a skipped tail); go to the next one.
        return Ok((next_base.map_or(pos, |n| n.max(pos)), Vec::new()));
    }
    let path = segment::path(&shared.options.dir, base);
    let file = match std::fs::File::open(&path) {
        Ok(file) => file,
        // Deleted under us because a checkpoint passed it: the caller moves on to what is left.
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound && !shared.lock().bases.contains(&base) =>
        {
            return Ok((pos, Vec::new()));
        }
        Err(e) => return Err(LogError::io("opening a segment", e)),
    };
    let want = ((limit - pos) as usize).min(READ_CHUNK);
    let mut buf = segment::read_at(&file, pos - base, want)
        .map_err(|e| LogError::io("reading a segment", e))?;
    // A record larger than the read: read it whole.
    if let Ok(size) = record::frame_size(&buf) {
        if size as usize > buf.len() && pos + size <= limit {
            buf = segment::read_at(&file, pos - base, size as usize)
                .map_err(|e| LogError::io("reading a segment", e))?;
        }
    }
    let chunk = Bytes::from(buf);
    let mut out = Vec::new();
    let mut offset = 0usize;
    while out.len() < max && pos < limit {
        match record::decode(&chunk, offset, pos - offset as u64) {
            Ok(entry) => {
                offset += (entry.end - entry.pos) as usize;
                pos = entry.end;
                out.push(entry);
            }
            Err(Bad::Incomplete { .. }) if offset > 0 => break,
            Err(bad) => match next_base {
                Some(next) => {
                    let lost = next - pos;
                    tracing::error!(
                        segment = %path.display(),
                        position = pos,
                        bytes = lost,
                        problem = ?bad,
                        "corrupt record in the ingest log; skipping the rest of this segment"
                    );
                    metrics::counter!(names::CORRUPT_BYTES).increment(lost);
                    return Ok((next, out));
                }
                // Hand out the good records first; the next call starts at the bad one.
                None if !out.is_empty() => return Ok((pos, out)),
                None => {
                    return Err(LogError::Corrupt {
                        pos,
                        detail: format!("{bad:?} in {}", path.display()),
                    })
                }
            },
        }
    }
    Ok((pos, out))
}
