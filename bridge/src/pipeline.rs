//! The bridge task: receives device messages on a bounded queue, decodes and validates them, batches
//! them by size and by time, and writes each batch through the storage trait, retrying with backoff
//! while storage is unavailable. A full queue makes the sender wait: backpressure, never loss.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use messina_storage::backoff::Backoff;
use messina_storage::{Batch, DeadLetter, Millis, Storage};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::alerts::AlertService;
use crate::meter;
use crate::wire::{self, Decoded, Limits};

/// One message as the broker received it.
#[derive(Debug, Clone)]
pub struct Inbound {
    pub topic: String,
    pub payload: Bytes,
    /// Server time of arrival.
    pub received_at: Millis,
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
    tx: mpsc::Sender<Inbound>,
}

/// The bridge is gone (it ended after a fatal storage error); nothing more can be delivered.
#[derive(Debug, thiserror::Error)]
#[error("the bridge has stopped")]
pub struct BridgeClosed;

impl BridgeHandle {
    /// Queues a message, waiting while the queue is full.
    pub async fn send(&self, inbound: Inbound) -> Result<(), BridgeClosed> {
        self.tx.send(inbound).await.map_err(|_| BridgeClosed)
    }

    /// Queues a message from a thread outside the async runtime, blocking while the queue is full.
    pub fn blocking_send(&self, inbound: Inbound) -> Result<(), BridgeClosed> {
        self.tx.blocking_send(inbound).map_err(|_| BridgeClosed)
    }

    /// Messages waiting in the queue.
    pub fn queue_depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}

/// Starts the bridge. `shutdown` only shortens retries of a failing write once requested; the
/// bridge itself ends when every [`BridgeHandle`] is dropped, so nothing queued is left behind.
pub fn spawn(
    storage: Arc<dyn Storage>,
    settings: Settings,
    alerts: Option<Arc<AlertService>>,
    shutdown: CancellationToken,
) -> (BridgeHandle, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(settings.queue_capacity);
    let bridge = Bridge {
        writer: Arc::new(Writer {
            storage,
            settings: settings.clone(),
            alerts,
            shutdown,
        }),
        in_flight: None,
        batch: Batch::default(),
        settings,
        depth: tx.clone().downgrade(),
    };
    let task = tokio::spawn(bridge.run(rx));
    (BridgeHandle { tx }, task)
}

struct Bridge {
    writer: Arc<Writer>,
    /// The batch being written, if any.
    in_flight: Option<JoinHandle<()>>,
    batch: Batch,
    settings: Settings,
    /// Only to read the queue depth for metrics; does not keep the queue open.
    depth: mpsc::WeakSender<Inbound>,
}

/// Ids of dead letters: unique per process run and, being seeded with the clock, across runs.
fn next_dead_letter_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let seed = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    };
    let _ = NEXT.compare_exchange(0, seed(), Ordering::Relaxed, Ordering::Relaxed);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

impl Bridge {
    async fn run(mut self, mut rx: mpsc::Receiver<Inbound>) {
        let mut deadline: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                biased;
                msg = rx.recv() => match msg {
                    Some(inbound) => {
                        if self.batch.is_empty() {
                            deadline = Some(tokio::time::Instant::now() + self.settings.batch_max_delay);
                        }
                        self.accept(inbound);
                        if self.batch.len() >= self.settings.batch_max_rows {
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

    /// Decodes one message into the pending batch; a message that fails becomes a dead letter.
    fn accept(&mut self, inbound: Inbound) {
        let (device, kind, result) = match wire::route(&inbound.topic) {
            Ok((device, kind)) => {
                let result = wire::decode(
                    &device,
                    kind,
                    &inbound.payload,
                    inbound.received_at,
                    &self.settings.limits,
                );
                (Some(device), Some(kind), result)
            }
            Err(rejection) => (None, None, Err(rejection)),
        };
        meter::received(kind, inbound.payload.len());
        match result {
            Ok(Decoded::Readings(readings)) => {
                meter::decoded(kind, readings.len());
                self.batch.readings.extend(readings);
            }
            Ok(Decoded::Event(event)) => {
                meter::decoded(kind, 1);
                self.batch.events.push(event);
            }
            Err(rejection) => {
                meter::rejected(kind, &inbound.topic, &rejection);
                self.batch.dead_letters.push(DeadLetter {
                    id: next_dead_letter_id(),
                    received_at: inbound.received_at,
                    topic: inbound.topic,
                    device,
                    payload: inbound.payload.to_vec(),
                    reason: rejection.to_string(),
                });
            }
        }
    }

    /// Hands the pending batch to the writer. At most one batch is being written while the next
    /// one fills, so decoding overlaps storage I/O, writes stay in order, and memory stays bounded
    /// at two batches.
    async fn flush(&mut self) {
        if let Some(tx) = self.depth.upgrade() {
            meter::queue_depth(tx.max_capacity() - tx.capacity());
        }
        if self.batch.is_empty() {
            return;
        }
        self.wait_for_writer().await;
        let batch = std::mem::take(&mut self.batch);
        let writer = Arc::clone(&self.writer);
        self.in_flight = Some(tokio::spawn(async move { writer.write(batch).await }));
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
/// retries, the bridge stops taking messages once its next batch is full, the queue fills and
/// senders wait: slow storage slows publishers instead of losing data.
struct Writer {
    storage: Arc<dyn Storage>,
    settings: Settings,
    /// Evaluates alert rules on each batch once it is stored.
    alerts: Option<Arc<AlertService>>,
    shutdown: CancellationToken,
}

impl Writer {
    async fn write(&self, batch: Batch) {
        let mut backoff = Backoff::new(
            self.settings.retry_initial_delay,
            self.settings.retry_max_delay,
        );
        let mut attempts_after_shutdown = 0;
        loop {
            let started = Instant::now();
            match self.storage.write_batch(&batch).await {
                Ok(()) => {
                    meter::written(&batch, started.elapsed());
                    if let Some(alerts) = &self.alerts {
                        alerts.on_batch(&batch).await;
                    }
                    return;
                }
                Err(e) => {
                    let give_up = !e.is_retryable()
                        || (self.shutdown.is_cancelled() && {
                            attempts_after_shutdown += 1;
                            attempts_after_shutdown > self.settings.retries_after_shutdown
                        });
                    meter::write_failed(&e, batch.len(), give_up);
                    if give_up {
                        return;
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
