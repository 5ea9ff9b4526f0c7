//! The bridge task: receives device messages on a bounded queue, decodes and validates them, batches
//! them by size and by time, and writes each batch through the storage trait, retrying with backoff
//! while storage is unavailable. A full queue makes the sender wait: backpressure, never loss.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use messina_storage::backoff::Backoff;
use messina_storage::{Batch, DeadLetter, DeviceId, Millis, Storage, StorageError};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::alerts::AlertService;
use crate::meter;
use crate::wire::{self, Decoded, Limits};
use crate::OnStored;

/// One message as the broker received it, with its place in the ingest log.
#[derive(Debug, Clone)]
pub struct Inbound {
    /// Where the message starts in the ingest log. Unique for ever (the log never reuses a
    /// position), so it is also the id of the message's dead letter: a replay after a crash
    /// overwrites that dead letter instead of adding a second one.
    pub pos: u64,
    /// Where the next message starts: once this message is stored, everything before `end` is.
    pub end: u64,
    pub topic: String,
    pub payload: Bytes,
    /// Server time of arrival.
    pub received_at: Millis,
}

/// Where the writer hands each stored batch and the log position it completes.
#[derive(Clone)]
pub enum AfterWrite {
    /// Straight to the checkpoint: no alert rules run.
    Checkpoint(OnStored),
    /// To the alert service, which judges the batch and tells its own [`OnStored`] the position
    /// once the rules' memory of it is saved too, so a crash replays what that memory lacks.
    Alerts(Arc<AlertService>),
}

/// What travels on the bridge queue.
enum Message {
    Data(Inbound),
    /// A log record that is not the bridge's (a will, an ack, an upload request) ends here; the
    /// bridge reports it stored together with the data before it, so the checkpoint stays in order.
    Pass(u64),
}

/// How the bridge batches and retries; from `[bridge]` in the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub batch_max_rows: usize,
    pub batch_max_delay: Duration,
    pub queue_capacity: usize,
    pub retry_initial_delay: Duration,
    pub retry_max_delay: Duration,
    /// After shutdown is requested, how many more attempts a failing write gets before its rows
    /// are given up (and counted as lost).
    pub retries_after_shutdown: u32,
    pub limits: Limits,
}

impl Settings {
    pub fn from_config(c: &messina_config::BridgeConfig) -> Self {
        Settings {
            batch_max_rows: c.batch_max_rows,
            batch_max_delay: Duration::from_millis(c.batch_max_delay_ms),
            queue_capacity: c.queue_capacity,
            retry_initial_delay: Duration::from_millis(c.retry_initial_delay_ms),
            retry_max_delay: Duration::from_millis(c.retry_max_delay_ms),
            retries_after_shutdown: 3,
            limits: Limits {
                max_future_skew_ms: (c.max_future_skew_s as i64).saturating_mul(1000),
                max_age_ms: (c.max_age_days as i64).saturating_mul(86_400_000),
                max_readings_per_message: c.max_readings_per_message,
            },
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings::from_config(&messina_config::BridgeConfig::default())
    }
}

/// The sending side of the bridge queue. The bridge runs until every handle is dropped, then
/// drains the queue, writes the last batch and ends.
#[derive(Clone)]
pub struct BridgeHandle {
    tx: mpsc::Sender<Message>,
}

/// The bridge is gone (it ended after a fatal storage error); nothing more can be delivered.
#[derive(Debug, thiserror::Error)]
#[error("the bridge has stopped")]
pub struct BridgeClosed;

impl BridgeHandle {
    /// Queues a message, waiting while the queue is full.
    pub async fn send(&self, inbound: Inbound) -> Result<(), BridgeClosed> {
        self.tx
            .send(Message::Data(inbound))
            .await
            .map_err(|_| BridgeClosed)
    }

    /// Says that the log record ending at `end` was handled outside the bridge, so the stored
    /// position may move past it once everything before it is stored.
    pub async fn pass(&self, end: u64) -> Result<(), BridgeClosed> {
        self.tx
            .send(Message::Pass(end))
            .await
            .map_err(|_| BridgeClosed)
    }

    /// Messages waiting in the queue.
    pub fn queue_depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}

/// Starts the bridge. `after` is handed, in order, each stored batch and the log position through
/// which everything is stored. `shutdown` only shortens retries of a failing write once requested;
/// the bridge itself ends when every [`BridgeHandle`] is dropped, so nothing queued is left behind.
pub fn spawn(
    storage: Arc<dyn Storage>,
    settings: Settings,
    after: AfterWrite,
    shutdown: CancellationToken,
) -> (BridgeHandle, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(settings.queue_capacity);
    let bridge = Bridge {
        writer: Arc::new(Writer {
            storage,
            settings: settings.clone(),
            after,
            shutdown,
            gave_up: std::sync::atomic::AtomicBool::new(false),
        }),
        in_flight: None,
        pending: Pending::default(),
        settings,
        depth: tx.clone().downgrade(),
    };
    let task = tokio::spawn(bridge.run(rx));
    (BridgeHandle { tx }, task)
}

/// The batch being filled: its rows, the messages they came from (kept to find the one at fault
/// when storage refuses the batch) and the log position it covers.
#[derive(Default)]
struct Pending {
    batch: Batch,
    messages: Vec<Inbound>,
    /// Everything before this position is in this batch or in an earlier one.
    through: Option<u64>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.batch.is_empty() && self.through.is_none()
    }
}

struct Bridge {
    writer: Arc<Writer>,
    /// The batch being written, if any.
    in_flight: Option<JoinHandle<()>>,
    pending: Pending,
    settings: Settings,
    /// Only to read the queue depth for metrics; does not keep the queue open.
    depth: mpsc::WeakSender<Message>,
}

/// Decodes one message into rows of `batch`; a message that fails becomes a dead letter whose id
/// is the message's log position.
fn decode_into(inbound: &Inbound, limits: &Limits, batch: &mut Batch, count: bool) {
    let (device, kind, result) = match wire::route(&inbound.topic) {
        Ok((device, kind)) => {
            let result = wire::decode(&device, kind, &inbound.payload, inbound.received_at, limits);
            (Some(device), Some(kind), result)
        }
        Err(rejection) => (None, None, Err(rejection)),
    };
    if count {
        meter::received(kind, inbound.payload.len());
    }
    match result {
        Ok(Decoded::Readings(readings)) => {
            if count {
                meter::decoded(kind, readings.len());
            }
            batch.readings.extend(readings);
        }
        Ok(Decoded::Event(event)) => {
            if count {
                meter::decoded(kind, 1);
            }
            batch.events.push(event);
        }
        Err(rejection) => {
            if count {
                meter::rejected(kind, &inbound.topic, &rejection);
            }
            batch
                .dead_letters
                .push(dead_letter(inbound, device, rejection.to_string()));
        }
    }
}

fn dead_letter(inbound: &Inbound, device: Option<DeviceId>, reason: String) -> DeadLetter {
    DeadLetter {
        id: inbound.pos,
        received_at: inbound.received_at,
        topic: inbound.topic.clone(),
        device,
        payload: inbound.payload.to_vec(),
        reason,
    }
}

impl Bridge {
    async fn run(mut self, mut rx: mpsc::Receiver<Message>) {
        let mut deadline: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                biased;
                msg = rx.recv() => match msg {
                    Some(message) => {
                        if self.pending.is_empty() {
                            deadline = Some(tokio::time::Instant::now() + self.settings.batch_max_delay);
                        }
                        match message {
                            Message::Data(inbound) => self.accept(inbound),
                            Message::Pass(end) => self.pending.through = Some(end),
                        }
                        if self.pending.batch.len() >= self.settings.batch_max_rows {
                            self.flush().await;
                            deadline = None;
                        }
                    }
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => {
                    self.flush().await;
                    deadline = None;
                }
            }
        }
        self.flush().await;
        self.wait_for_writer().await;
        tracing::info!("bridge drained and stopped");
    }

    /// Decodes one message into the pending batch.
    fn accept(&mut self, inbound: Inbound) {
        decode_into(
            &inbound,
            &self.settings.limits,
            &mut self.pending.batch,
            true,
        );
        self.pending.through = Some(inbound.end);
        self.pending.messages.push(inbound);
    }

    /// Hands the pending batch to the writer. At most one batch is being written while the next
    /// one fills, so decoding overlaps storage I/O, writes (and stored positions) stay in order,
    /// and memory stays bounded at two batches.
    async fn flush(&mut self) {
        if let Some(tx) = self.depth.upgrade() {
            meter::queue_depth(tx.max_capacity() - tx.capacity());
        }
        if self.pending.is_empty() {
            return;
        }
        self.wait_for_writer().await;
        let pending = std::mem::take(&mut self.pending);
        let writer = Arc::clone(&self.writer);
        self.in_flight = Some(tokio::spawn(async move { writer.write(pending).await }));
    }

    async fn wait_for_writer(&mut self) {
        if let Some(task) = self.in_flight.take() {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "batch writer task failed");
            }
        }
    }
}

/// Writes batches, retrying with exponential backoff while storage is unavailable. While it
/// retries, the bridge stops taking messages once its next batch is full, the queue and then the
/// ingest log fill, and the edge stops reading from devices: slow storage slows publishers
/// instead of losing data.
struct Writer {
    storage: Arc<dyn Storage>,
    settings: Settings,
    after: AfterWrite,
    shutdown: CancellationToken,
    /// Set once a batch was given up at shutdown: nothing after it may be reported stored, so the
    /// next start replays it from the log.
    gave_up: std::sync::atomic::AtomicBool,
}

/// How one write attempt sequence ended.
enum Outcome {
    Stored,
    /// Storage refused the batch for a reason retrying cannot fix.
    Refused(StorageError),
    /// Shutdown was requested and storage kept failing.
    GaveUp,
}

impl Writer {
    async fn write(&self, pending: Pending) {
        let Pending {
            batch,
            messages,
            through,
        } = pending;
        if self.gave_up.load(Ordering::Relaxed) {
            return;
        }
        let stored = match self.write_retrying(&batch).await {
            Outcome::Stored => true,
            Outcome::Refused(e) => {
                tracing::warn!(
                    error = %e,
                    rows = batch.len(),
                    "storage refused a batch; writing it in parts to find the messages at fault"
                );
                Box::pin(self.write_split(&messages, e)).await
            }
            Outcome::GaveUp => false,
        };
        if !stored {
            self.gave_up.store(true, Ordering::Relaxed);
            tracing::warn!(
                rows = batch.len(),
                "storage is still failing at shutdown; the rows stay in the ingest log and are \
                 written at the next start"
            );
            return;
        }
        match &self.after {
            AfterWrite::Alerts(alerts) => alerts.on_batch(&batch, through).await,
            AfterWrite::Checkpoint(on_stored) => {
                if let Some(through) = through {
                    on_stored(through);
                }
            }
        }
    }

    /// Writes `messages` in halves until the ones storage refuses are alone; each of those becomes
    /// a dead letter with storage's reason, so the rest is stored and nothing is lost silently.
    /// Returns false when storage became unavailable and shutdown gave up.
    async fn write_split(&self, messages: &[Inbound], refusal: StorageError) -> bool {
        if messages.len() <= 1 {
            let Some(message) = messages.first() else {
                return true;
            };
            let device = wire::route(&message.topic).ok().map(|(d, _)| d);
            let letter = dead_letter(
                message,
                device,
                format!("storage refused the message: {refusal}"),
            );
            meter::refused(&message.topic, &refusal);
            let batch = Batch {
                dead_letters: vec![letter],
                ..Batch::default()
            };
            return match self.write_retrying(&batch).await {
                Outcome::Stored => true,
                Outcome::Refused(e) => {
                    // Even the dead letter is refused: nothing more can be done with this
                    // message here; say so loudly, it needs an operator.
                    tracing::error!(
                        error = %e,
                        topic = %message.topic,
                        position = message.pos,
                        "storage refused a message and its dead letter; the message is dropped"
                    );
                    true
                }
                Outcome::GaveUp => false,
            };
        }
        let (left, right) = messages.split_at(messages.len() / 2);
        for half in [left, right] {
            let mut batch = Batch::default();
            for m in half {
                decode_into(m, &self.settings.limits, &mut batch, false);
            }
            let ok = match self.write_retrying(&batch).await {
                Outcome::Stored => true,
                Outcome::Refused(e) => Box::pin(self.write_split(half, e)).await,
                Outcome::GaveUp => false,
            };
            if !ok {
                return false;
            }
        }
        true
    }

    async fn write_retrying(&self, batch: &Batch) -> Outcome {
        if batch.is_empty() {
            return Outcome::Stored;
        }
        let mut backoff = Backoff::new(
            self.settings.retry_initial_delay,
            self.settings.retry_max_delay,
        );
        let mut attempts_after_shutdown = 0;
        loop {
            let started = Instant::now();
            match self.storage.write_batch(batch).await {
                Ok(()) => {
                    meter::written(batch, started.elapsed());
                    return Outcome::Stored;
                }
                Err(e) if !e.is_retryable() => {
                    meter::write_failed(&e, batch.len(), false);
                    return Outcome::Refused(e);
                }
                Err(e) => {
                    let give_up = self.shutdown.is_cancelled() && {
                        attempts_after_shutdown += 1;
                        attempts_after_shutdown > self.settings.retries_after_shutdown
                    };
                    meter::write_failed(&e, batch.len(), give_up);
                    if give_up {
                        return Outcome::GaveUp;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                        _ = self.shutdown.cancelled(), if !self.shutdown.is_cancelled() => {}
                    }
                }
            }
        }
    }
}
