//! The group-commit writer: one OS thread that takes everything appended since its last turn, so
//! the next batch fills while this one syncs, writes it with one write per segment touched and one
//! fdatasync each, and only then moves the durable watermark.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::segment::{self, Active};
use crate::{names, Durability, LogError, Shared};

/// How often a moved checkpoint is written to its file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

pub(crate) fn run(shared: Arc<Shared>, mut active: Active) {
    // However the loop ends, even by a panic, everyone waiting must hear that the writer is gone.
    let _finish = Finish(&shared);
    let mut last_checkpoint = Instant::now();
    loop {
        let (chunk, start, rolls, closing) = {
            let mut s = shared.lock();
            while s.pending.is_empty()
                && !s.closed
                && !(s.checkpoint != s.persisted && last_checkpoint.elapsed() >= CHECKPOINT_EVERY)
            {
                let wait = if s.checkpoint != s.persisted {
                    CHECKPOINT_EVERY.saturating_sub(last_checkpoint.elapsed())
                } else {
                    Duration::from_secs(1)
                };
                s.writer_waiting = true;
                s = shared
                    .work
                    .wait_timeout(s, wait)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                s.writer_waiting = false;
            }
            let take = s.pending.len().min(shared.options.max_batch_bytes.max(1));
            // Take whole records only: walk the frames up to the batch limit.
            let mut cut = 0usize;
            while cut < s.pending.len() {
                let size = crate::record::frame_size(&s.pending[cut..]).unwrap_or(0) as usize;
                if size == 0 || (cut > 0 && cut + size > take) {
                    break;
                }
                cut += size;
            }
            let chunk = s.pending.split_to(cut).freeze();
            let start = s.pending_start;
            s.pending_start += chunk.len() as u64;
            let chunk_end = s.pending_start;
            let split = s.rolls.partition_point(|r| *r < chunk_end);
            let rolls: Vec<u64> = s.rolls.drain(..split).collect();
            let closing = s.closed && s.pending.is_empty();
            (chunk, start, rolls, closing)
        };
        if !chunk.is_empty() {
            if let Err(e) = write(&shared, &mut active, &chunk, start, &rolls) {
                fail(&shared, &e);
                break;
            }
        }
        let due = last_checkpoint.elapsed() >= CHECKPOINT_EVERY;
        if due || closing {
            last_checkpoint = Instant::now();
            if let Err(e) = shared.persist_checkpoint() {
                fail(&shared, &e);
                break;
            }
        }
        if closing {
            break;
        }
    }
}

/// Marks the writer finished and wakes readers, appenders and `closed()` when dropped.
struct Finish<'a>(&'a Shared);

impl Drop for Finish<'_> {
    fn drop(&mut self) {
        let shared = self.0;
        if std::thread::panicking() {
            tracing::error!("the ingest log writer thread panicked; no more messages are accepted");
            let mut s = shared.lock();
            s.failed = Some("the writer thread panicked".into());
            s.closed = true;
        }
        shared.finished.send_replace(true);
        shared.data.notify_waiters();
        shared.space.notify_waiters();
    }
}

/// Writes `chunk` (which starts at position `start`), creating the segments that start at
/// `rolls`, syncs every file touched, then publishes the new watermark.
fn write(
    shared: &Shared,
    active: &mut Active,
    chunk: &Bytes,
    start: u64,
    rolls: &[u64],
) -> Result<(), LogError> {
    let dir = &shared.options.dir;
    let sync = shared.options.durability == Durability::Fsync;
    let mut at = start;
    let mut syncs = 0;
    for boundary in rolls
        .iter()
        .copied()
        .chain(std::iter::once(start + chunk.len() as u64))
    {
        if boundary > at {
            let piece = &chunk[(at - start) as usize..(boundary - start) as usize];
            active
                .write(piece)
                .map_err(|e| LogError::io("writing a segment", e))?;
            at = boundary;
        }
        if boundary < start + chunk.len() as u64 {
            // A roll: the old segment is complete; sync it before the new one takes writes, and
            // make the new file's name durable (segment::create syncs the directory).
            syncs += sync_if(sync, active)?;
            let file = segment::create(dir, boundary)
                .map_err(|e| LogError::io("creating a segment", e))?;
            *active = Active {
                base: boundary,
                file,
                len: 0,
            };
            let mut s = shared.lock();
            s.bases.push(boundary);
            metrics::gauge!(names::SEGMENTS).set(s.bases.len() as f64);
        }
    }
    syncs += sync_if(sync, active)?;
    let end = start + chunk.len() as u64;
    {
        let mut s = shared.lock();
        s.durable = end;
        s.stats.syncs += syncs;
        s.stats.bytes_written += chunk.len() as u64;
        if shared.options.memory_bytes > 0 {
            s.memory.push_back((start, chunk.clone()));
            s.memory_len += chunk.len();
            while s.memory_len > shared.options.memory_bytes {
                match s.memory.pop_front() {
                    Some((_, old)) => s.memory_len -= old.len(),
                    None => break,
                }
            }
        }
    }
    shared.durable.send_replace(end);
    shared.data.notify_waiters();
    Ok(())
}

/// fdatasync of the active segment in `Fsync` mode; returns how many syncs it made.
fn sync_if(sync: bool, active: &Active) -> Result<u64, LogError> {
    if !sync {
        return Ok(0);
    }
    let began = Instant::now();
    active
        .file
        .sync_data()
        .map_err(|e| LogError::io("syncing a segment", e))?;
    metrics::histogram!(names::FSYNC_SECONDS).record(began.elapsed().as_secs_f64());
    Ok(1)
}

/// A disk failure: nothing past the last good watermark is ever reported durable; everyone
/// waiting is woken with the error.
fn fail(shared: &Shared, error: &LogError) {
    tracing::error!(
        %error,
        "the ingest log cannot write; no more messages are accepted: check the disk, then restart"
    );
    let mut s = shared.lock();
    s.failed = Some(error.to_string());
    s.closed = true;
}
