//! The bridge's internal events, each logged and counted in one place, so logs and Prometheus
//! metrics never disagree. Metric names are listed in `names` for the HTTP side to describe.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use messina_storage::{Alert, AlertState, Batch, StorageError};

use crate::wire::{Kind, Rejection};

/// Metric names, for `describe_*` at start-up and for tests.
pub mod names {
    pub const RECEIVED: &str = "messina_messages_received_total";
    pub const RECEIVED_BYTES: &str = "messina_received_bytes_total";
    pub const DECODED: &str = "messina_rows_decoded_total";
    pub const REJECTED: &str = "messina_messages_rejected_total";
    pub const WRITTEN: &str = "messina_rows_written_total";
    pub const BATCH_ROWS: &str = "messina_batch_rows";
    pub const WRITE_SECONDS: &str = "messina_write_seconds";
    pub const WRITE_ERRORS: &str = "messina_write_errors_total";
    pub const ROWS_DEFERRED: &str = "messina_rows_deferred_total";
    pub const REFUSED: &str = "messina_messages_refused_total";
    pub const QUEUE_DEPTH: &str = "messina_bridge_queue_depth";
    pub const ALERTS_RAISED: &str = "messina_alerts_raised_total";
    pub const ALERTS_CLEARED: &str = "messina_alerts_cleared_total";
    pub const ALERTS_ACKED: &str = "messina_alerts_acknowledged_total";
    pub const ALERTS_ACTIVE: &str = "messina_alerts_active";
    pub const ALERT_COMMITS_PENDING: &str = "messina_alert_commits_pending";
    pub const UNTRACKED_METRICS: &str = "messina_alerts_untracked_metrics_total";
}

/// Rows stored and messages rejected since the process started: the same events as the
/// `WRITTEN` and `REJECTED`/`REFUSED` counters, readable in the process (the dashboard's live
/// rates) without parsing the Prometheus text.
static STORED_ROWS: AtomicU64 = AtomicU64::new(0);
static REJECTED_MESSAGES: AtomicU64 = AtomicU64::new(0);

/// See [`totals`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Readings, events and dead letters written to storage.
    pub stored_rows: u64,
    /// Messages stored as dead letters instead of data (invalid, or refused by storage).
    pub rejected: u64,
}

/// What this process has stored and rejected so far.
pub fn totals() -> Totals {
    Totals {
        stored_rows: STORED_ROWS.load(Ordering::Relaxed),
        rejected: REJECTED_MESSAGES.load(Ordering::Relaxed),
    }
}

fn label(kind: Option<Kind>) -> &'static str {
    kind.map_or("unknown", Kind::as_str)
}

/// The counters bumped for every message, looked up once (a lookup hashes the name and labels).
/// The process installs its recorder before the first message, so the handles are live.
struct PerMessage {
    /// By kind: telemetry, events, unknown.
    received: [metrics::Counter; 3],
    received_bytes: metrics::Counter,
    decoded: [metrics::Counter; 3],
}

fn per_message() -> &'static PerMessage {
    static COUNTERS: std::sync::OnceLock<PerMessage> = std::sync::OnceLock::new();
    COUNTERS.get_or_init(|| {
        let by_kind = |name: &'static str| {
            [Some(Kind::Telemetry), Some(Kind::Events), None]
                .map(|k| metrics::counter!(name, "kind" => label(k)))
        };
        PerMessage {
            received: by_kind(names::RECEIVED),
            received_bytes: metrics::counter!(names::RECEIVED_BYTES),
            decoded: by_kind(names::DECODED),
        }
    })
}

fn kind_index(kind: Option<Kind>) -> usize {
    match kind {
        Some(Kind::Telemetry) => 0,
        Some(Kind::Events) => 1,
        None => 2,
    }
}

pub fn received(kind: Option<Kind>, bytes: usize) {
    let c = per_message();
    c.received[kind_index(kind)].increment(1);
    c.received_bytes.increment(bytes as u64);
}

pub fn decoded(kind: Option<Kind>, rows: usize) {
    per_message().decoded[kind_index(kind)].increment(rows as u64);
}

pub fn rejected(kind: Option<Kind>, topic: &str, rejection: &Rejection) {
    // Debug, not warn: one misbehaving device must not flood the log; the dead letter keeps it all.
    tracing::debug!(topic, reason = %rejection, "message rejected, stored as dead letter");
    metrics::counter!(names::REJECTED, "kind" => label(kind)).increment(1);
    REJECTED_MESSAGES.fetch_add(1, Ordering::Relaxed);
}

pub fn written(batch: &Batch, took: Duration) {
    tracing::trace!(rows = batch.len(), ?took, "batch written");
    STORED_ROWS.fetch_add(batch.len() as u64, Ordering::Relaxed);
    for (table, n) in [
        ("telemetry", batch.readings.len()),
        ("events", batch.events.len()),
        ("dead_letters", batch.dead_letters.len()),
    ] {
        if n > 0 {
            metrics::counter!(names::WRITTEN, "table" => table).increment(n as u64);
        }
    }
    metrics::histogram!(names::BATCH_ROWS).record(batch.len() as f64);
    metrics::histogram!(names::WRITE_SECONDS).record(took.as_secs_f64());
}

pub fn write_failed(error: &StorageError, rows: usize, giving_up: bool) {
    metrics::counter!(names::WRITE_ERRORS).increment(1);
    if giving_up {
        tracing::warn!(
            %error,
            rows,
            "storage write failed at shutdown; the rows stay in the ingest log for the next start"
        );
        metrics::counter!(names::ROWS_DEFERRED).increment(rows as u64);
    } else {
        tracing::warn!(%error, rows, "storage write failed; retrying");
    }
}

/// Storage refused one message for good (not an outage); it is kept as a dead letter instead.
pub fn refused(topic: &str, error: &StorageError) {
    tracing::warn!(topic, %error, "storage refused a message; stored as a dead letter");
    metrics::counter!(names::REFUSED).increment(1);
    REJECTED_MESSAGES.fetch_add(1, Ordering::Relaxed);
}

pub fn queue_depth(depth: usize) {
    metrics::gauge!(names::QUEUE_DEPTH).set(depth as f64);
}

pub fn alert_transition(alert: &Alert) {
    let (name, level) = match alert.state {
        AlertState::Raised => (names::ALERTS_RAISED, tracing::Level::WARN),
        AlertState::Acknowledged => (names::ALERTS_ACKED, tracing::Level::INFO),
        AlertState::Cleared => (names::ALERTS_CLEARED, tracing::Level::INFO),
    };
    // Rules are few and configured, so the rule is a bounded label (anomaly rules are folded).
    let rule = if alert.rule.starts_with(crate::alerts::ANOMALY_PREFIX) {
        "anomaly".to_string()
    } else {
        alert.rule.clone()
    };
    metrics::counter!(name, "rule" => rule).increment(1);
    if level == tracing::Level::WARN {
        tracing::warn!(id = %alert.id, message = %alert.message, "alert raised");
    } else {
        tracing::info!(id = %alert.id, state = alert.state.as_str(), "alert {}", alert.state.as_str());
    }
}

pub fn active_alerts(n: usize) {
    metrics::gauge!(names::ALERTS_ACTIVE).set(n as f64);
}

/// A metric the anomaly rule does not judge: the device has `alerts.anomaly_max_metrics_per_device`
/// windows already.
pub fn untracked_metric() {
    metrics::counter!(names::UNTRACKED_METRICS).increment(1);
}

/// Groups of alert transitions waiting for the alert committer (grows while alert storage is
/// slow or down; ingestion does not wait for it).
pub fn alert_commits_pending(delta: f64) {
    metrics::gauge!(names::ALERT_COMMITS_PENDING).increment(delta);
}
