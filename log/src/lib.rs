//! The ingest log: an append-only, segmented, checksummed log with group commit, a durable
//! watermark that says which appends are on disk, a byte budget that makes appenders wait
//! (backpressure, never loss), a reader that serves committed records from memory or from the
//! files, and a durable checkpoint below which segments are deleted. It knows nothing of MQTT:
//! a record is a kind, flags, an arrival time, a topic, opaque metadata and a payload.

mod checkpoint;
mod reader;
mod record;
mod recovery;
mod segment;
mod writer;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};
use tokio::sync::{watch, Notify};

pub use reader::Reader;
pub use recovery::Recovered;

/// When an append counts as durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// After `fdatasync`: survives a process crash, a kernel crash and a power loss.
    #[default]
    Fsync,
    /// UNSAFE, for benchmarks only: after the write reached the page cache. A kernel crash or a
    /// power loss loses appends that were already reported durable.
    OsBuffer,
}

/// How the log is laid out and bounded.
#[derive(Debug, Clone)]
pub struct Options {
    pub dir: PathBuf,
    /// Size of one segment file; a record never spans segments (a larger record gets a segment
    /// of its own).
    pub segment_bytes: u64,
    /// Most bytes appended but not yet checkpointed; `append` waits past it.
    pub max_bytes: u64,
    /// Most bytes the writer takes for one write and fdatasync.
    pub max_batch_bytes: usize,
    /// Committed bytes kept in memory for a reader that keeps up.
    pub memory_bytes: usize,
    pub durability: Durability,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            dir: PathBuf::from("data/log"),
            segment_bytes: 64 << 20,
            max_bytes: 1 << 30,
            max_batch_bytes: 4 << 20,
            memory_bytes: 64 << 20,
            durability: Durability::Fsync,
        }
    }
}

/// One record to append; the log copies it.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    pub kind: u8,
    pub flags: u8,
    pub received_at: i64,
    pub topic: &'a [u8],
    pub meta: &'a [u8],
    pub payload: &'a [u8],
}

/// One record read back, with its place in the log. The byte fields are zero-copy slices of the
/// chunk they were read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Where the record starts.
    pub pos: u64,
    /// Where the next record starts.
    pub end: u64,
    pub kind: u8,
    pub flags: u8,
    pub received_at: i64,
    pub topic: Bytes,
    pub meta: Bytes,
    pub payload: Bytes,
}

/// What went wrong; each variant says what the caller should do.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The disk failed; the log stops taking appends. Fatal: an operator must look.
    #[error("ingest log I/O error while {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The log was closed (shutdown); nothing more is accepted.
    #[error("the ingest log is closed")]
    Closed,
    /// The byte budget is used up; wait (or use `append`, which waits).
    #[error("the ingest log is full")]
    Full,
    /// The record can never fit; reject it.
    #[error("record of {bytes} bytes is larger than the ingest log allows ({max})")]
    TooLarge { bytes: u64, max: u64 },
    /// A record below the durable watermark does not read back; an operator must look.
    #[error("ingest log record at position {pos} is corrupt: {detail}")]
    Corrupt { pos: u64, detail: String },
}

impl LogError {
    fn io(context: impl Into<String>, source: std::io::Error) -> LogError {
        LogError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Metric names.
pub mod names {
    pub const BYTES: &str = "messina_log_bytes";
    pub const SEGMENTS: &str = "messina_log_segments";
    pub const FSYNC_SECONDS: &str = "messina_log_fsync_seconds";
    pub const APPENDED: &str = "messina_log_appended_total";
    pub const REPLAYED: &str = "messina_log_replayed_total";
    pub const CORRUPT_BYTES: &str = "messina_log_corrupt_bytes_total";
    pub const TRUNCATED_BYTES: &str = "messina_log_truncated_bytes_total";
    pub const APPEND_WAITS: &str = "messina_log_append_waits_total";
}

/// Describes the log's metrics to the installed recorder.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(
        names::BYTES,
        Unit::Bytes,
        "Ingest log bytes appended and not yet stored."
    );
    describe_gauge!(names::SEGMENTS, "Ingest log segment files.");
    describe_histogram!(
        names::FSYNC_SECONDS,
        Unit::Seconds,
        "Time of one ingest log fdatasync (none in the unsafe OsBuffer mode)."
    );
    describe_counter!(names::APPENDED, "Records appended to the ingest log.");
    describe_counter!(
        names::REPLAYED,
        "Records read back from the ingest log files (after a restart or while the bridge lags)."
    );
    describe_counter!(
        names::CORRUPT_BYTES,
        "Bytes of ingest log segments skipped because a record was corrupt."
    );
    describe_counter!(
        names::TRUNCATED_BYTES,
        "Bytes of torn ingest log tails truncated at start."
    );
    describe_counter!(
        names::APPEND_WAITS,
        "Appends that waited because the ingest log was full."
    );
}

/// Counters a test or benchmark can read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub syncs: u64,
    pub bytes_written: u64,
    pub records_appended: u64,
    /// Records a reader read back from the segment files (lag or restart), not from memory.
    pub records_replayed: u64,
}

/// State shared by appenders, the writer thread and readers.
pub(crate) struct Shared {
    pub(crate) options: Options,
    pub(crate) state: Mutex<State>,
    /// Wakes the writer thread.
    pub(crate) work: Condvar,
    /// Wakes appenders waiting for budget.
    pub(crate) space: Notify,
    /// Wakes readers when the watermark moves or the log closes.
    pub(crate) data: Notify,
    pub(crate) durable: watch::Sender<u64>,
    /// True once the writer thread has finished.
    pub(crate) finished: watch::Sender<bool>,
    /// Serialises writes of the checkpoint file.
    pub(crate) checkpoint_file: Mutex<()>,
    /// `messina_log_appended_total`, looked up once: appends are the hottest path.
    appended: metrics::Counter,
}

pub(crate) struct State {
    /// Next position to assign.
    pub(crate) end: u64,
    /// Encoded records not yet taken by the writer, starting at `pending_start`.
    pub(crate) pending: BytesMut,
    pub(crate) pending_start: u64,
    /// Positions inside the pending bytes where a new segment starts.
    pub(crate) rolls: Vec<u64>,
    /// Base of the segment `end` is in (as assigned, maybe not yet created).
    pub(crate) assign_base: u64,
    /// Bases of the segment files, ascending (created ones only).
    pub(crate) bases: Vec<u64>,
    pub(crate) durable: u64,
    pub(crate) checkpoint: u64,
    pub(crate) persisted: u64,
    pub(crate) closed: bool,
    pub(crate) failed: Option<String>,
    /// Recently committed chunks: (start position, bytes).
    pub(crate) memory: VecDeque<(u64, Bytes)>,
    pub(crate) memory_len: usize,
    pub(crate) stats: Stats,
    /// The writer thread is parked on `work`; only then does an append pay for a wake-up.
    pub(crate) writer_waiting: bool,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-updated in a way that
        // matters more than stopping would, so a poisoned lock is taken as is.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn failed_error(&self, detail: &str) -> LogError {
        LogError::io(
            "writing (an earlier failure stopped the log)",
            std::io::Error::other(detail.to_string()),
        )
    }

    /// Persists the in-memory checkpoint if it moved, then deletes segments wholly below it.
    pub(crate) fn persist_checkpoint(&self) -> Result<(), LogError> {
        let _file = self
            .checkpoint_file
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let (target, persisted) = {
            let s = self.lock();
            (s.checkpoint, s.persisted)
        };
        if target == persisted {
            return Ok(());
        }
        checkpoint::write(&self.options.dir, target)
            .map_err(|e| LogError::io("writing the checkpoint", e))?;
        let doomed: Vec<u64> = {
            let mut s = self.lock();
            s.persisted = target;
            // A segment is wholly below the checkpoint when the next one starts at or before it;
            // the last segment is never deleted (the writer appends to it).
            let keep_from = s.bases.windows(2).take_while(|w| w[1] <= target).count();
            let doomed = s.bases.drain(..keep_from).collect();
            metrics::gauge!(names::SEGMENTS).set(s.bases.len() as f64);
            doomed
        };
        for base in &doomed {
            segment::remove(&self.options.dir, *base)
                .map_err(|e| LogError::io("deleting a stored segment", e))?;
        }
        if !doomed.is_empty() {
            segment::sync_dir(&self.options.dir)
                .map_err(|e| LogError::io("syncing the log directory", e))?;
        }
        Ok(())
    }
}

/// The handle every user holds; the last one dropped closes the log.
struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        close(&self.shared);
    }
}

fn close(shared: &Shared) {
    let mut s = shared.lock();
    if !s.closed {
        s.closed = true;
        drop(s);
        shared.work.notify_all();
        shared.space.notify_waiters();
        shared.data.notify_waiters();
    }
}

/// The ingest log; cheap to clone.
#[derive(Clone)]
pub struct Log {
    handle: Arc<Handle>,
}

impl Log {
    /// Opens the log in `options.dir` (created when missing), recovering a torn or corrupt
    /// tail, and starts the writer thread.
    pub fn open(options: Options) -> Result<(Log, Recovered), LogError> {
        let (recovered, active, bases) = recovery::recover(&options)?;
        let (durable, _) = watch::channel(recovered.end);
        let (finished, _) = watch::channel(false);
        let end = recovered.end;
        let assign_base = active.base;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                end,
                pending: BytesMut::new(),
                pending_start: end,
                rolls: Vec::new(),
                assign_base,
                bases,
                durable: end,
                checkpoint: recovered.checkpoint,
                persisted: recovered.checkpoint,
                closed: false,
                failed: None,
                memory: VecDeque::new(),
                memory_len: 0,
                stats: Stats::default(),
                writer_waiting: false,
            }),
            options,
            appended: metrics::counter!(names::APPENDED),
            work: Condvar::new(),
            space: Notify::new(),
            data: Notify::new(),
            durable,
            finished,
            checkpoint_file: Mutex::new(()),
        });
        metrics::gauge!(names::BYTES).set((end - recovered.checkpoint) as f64);
        metrics::gauge!(names::SEGMENTS).set(recovered.segments as f64);
        let thread_shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("messina-log".into())
            .spawn(move || writer::run(thread_shared, active))
            .map_err(|e| LogError::io("starting the writer thread", e))?;
        Ok((
            Log {
                handle: Arc::new(Handle { shared }),
            },
            recovered,
        ))
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.handle.shared
    }

    /// Appends a record, waiting while the log is full; returns its end position, which is
    /// durable once [`Log::durable`] reaches it.
    pub async fn append(&self, record: Record<'_>) -> Result<u64, LogError> {
        // The fast path registers no waiter: the log is rarely full.
        match self.try_append(record) {
            Err(LogError::Full) => {}
            other => return other,
        }
        let mut waited = false;
        loop {
            let notified = self.shared().space.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.try_append(record) {
                Err(LogError::Full) => {
                    if !waited {
                        waited = true;
                        metrics::counter!(names::APPEND_WAITS).increment(1);
                    }
                    notified.await;
                }
                other => return other,
            }
        }
    }

    /// Appends a record, or fails with [`LogError::Full`] instead of waiting.
    pub fn try_append(&self, record: Record<'_>) -> Result<u64, LogError> {
        let prepared = record::Prepared::new(record)?;
        let size = prepared.size();
        let shared = self.shared();
        if size > shared.options.max_bytes {
            return Err(LogError::TooLarge {
                bytes: size,
                max: shared.options.max_bytes,
            });
        }
        let mut s = shared.lock();
        if let Some(detail) = &s.failed {
            return Err(shared.failed_error(detail));
        }
        if s.closed {
            return Err(LogError::Closed);
        }
        if s.end + size - s.checkpoint > shared.options.max_bytes {
            return Err(LogError::Full);
        }
        if s.end > s.assign_base && s.end - s.assign_base + size > shared.options.segment_bytes {
            let at = s.end;
            s.rolls.push(at);
            s.assign_base = at;
        }
        prepared.encode_into(&mut s.pending);
        s.end += size;
        s.stats.records_appended += 1;
        let end = s.end;
        // The writer only sleeps when nothing is pending; while it is busy it takes this record
        // on its next turn anyway, so a wake-up syscall per append would be pure cost.
        let wake = std::mem::take(&mut s.writer_waiting);
        drop(s);
        if wake {
            shared.work.notify_one();
        }
        shared.appended.increment(1);
        Ok(end)
    }

    /// Every record that ends at or before this position is on disk.
    pub fn durable(&self) -> u64 {
        *self.shared().durable.borrow()
    }

    /// The durable watermark as it moves.
    pub fn watch_durable(&self) -> watch::Receiver<u64> {
        self.shared().durable.subscribe()
    }

    /// Waits until `pos` is durable; fails when the writer stopped before that.
    pub async fn wait_durable(&self, pos: u64) -> Result<(), LogError> {
        let mut rx = self.watch_durable();
        let mut finished = self.shared().finished.subscribe();
        loop {
            if *rx.borrow_and_update() >= pos {
                return Ok(());
            }
            if *finished.borrow_and_update() {
                let s = self.shared().lock();
                if s.durable >= pos {
                    return Ok(());
                }
                return Err(match &s.failed {
                    Some(detail) => self.shared().failed_error(detail),
                    None => LogError::Closed,
                });
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { return Err(LogError::Closed) },
                _ = finished.changed() => {}
            }
        }
    }

    /// The next position to be assigned.
    pub fn end(&self) -> u64 {
        self.shared().lock().end
    }

    /// Bytes appended and not yet checkpointed.
    pub fn used_bytes(&self) -> u64 {
        let s = self.shared().lock();
        s.end - s.checkpoint
    }

    /// Counters for tests and benchmarks (syncs made, bytes written, records appended and
    /// replayed from files).
    pub fn stats(&self) -> Stats {
        self.shared().lock().stats
    }

    /// A reader of committed records from `from` on.
    pub fn reader(&self, from: u64) -> Reader {
        Reader::new(Arc::clone(self.shared()), from)
    }

    /// Records that every record ending at or before `through` is stored: frees budget at once;
    /// the checkpoint file follows within 100 ms (and at [`Log::persist_checkpoint`]).
    pub fn checkpoint(&self, through: u64) -> Result<(), LogError> {
        let shared = self.shared();
        let mut s = shared.lock();
        let through = through.min(s.durable);
        if through <= s.checkpoint {
            return Ok(());
        }
        s.checkpoint = through;
        metrics::gauge!(names::BYTES).set((s.end - s.checkpoint) as f64);
        drop(s);
        shared.space.notify_waiters();
        shared.work.notify_one();
        Ok(())
    }

    pub fn checkpointed(&self) -> u64 {
        self.shared().lock().checkpoint
    }

    /// Writes the checkpoint file now and deletes the segments below it.
    pub fn persist_checkpoint(&self) -> Result<(), LogError> {
        self.shared().persist_checkpoint()
    }

    /// Refuses new appends, then writes and syncs what was appended; idempotent.
    pub fn close(&self) {
        close(self.shared());
    }

    /// Resolves once the writer thread has finished after [`Log::close`].
    pub async fn closed(&self) {
        let mut rx = self.shared().finished.subscribe();
        let _ = rx.wait_for(|done| *done).await;
    }
}

/// Nanoseconds since the Unix epoch: where a brand-new log starts, so a log that is deleted and
/// created again never reuses a position (it grows far slower than a byte per nanosecond), and
/// positions can serve as ids downstream.
pub(crate) fn fresh_start() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
}
