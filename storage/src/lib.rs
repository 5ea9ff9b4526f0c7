//! Storage for Messina: the domain types, the `Storage` trait every backend implements, the
//! embedded backend, and the contract suite that every backend must pass.

pub mod backoff;
pub mod contract;
pub mod embedded;
pub mod model;
pub mod query;
pub mod registry;
pub mod rollup;
pub mod scylla;

use async_trait::async_trait;

pub use embedded::EmbeddedStorage;
pub use model::{
    Aggregate, Alert, AlertState, AttrValue, Batch, Connection, DeadLetter, DeviceId, DeviceState,
    Event, InvalidDeviceId, Millis, Reading, Stamped, Upload, UploadState,
};
pub use query::{
    low_battery, AggregateQuery, AlertCount, AlertCountQuery, AlertQuery, AlertStateFilter, Bucket,
    Cursor, DeadLetterQuery, EventQuery, FleetCounts, FleetQuery, Order, Page, PageRequest,
    TelemetryQuery, TimeRange, UploadQuery,
};
pub use registry::{
    Credential, DeviceQuery, DeviceStatus, RegisteredDevice, RegistryChange, Role, UnknownName,
};
pub use scylla::ScyllaStorage;

/// What went wrong in storage; each variant says what the caller should do.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The backend could not do it now (I/O error, timeout, overload); the same call may succeed
    /// later. Writers keep the batch and retry.
    #[error("storage unavailable, retry later: {0}")]
    Unavailable(#[source] Cause),
    /// The request itself is wrong (e.g. a cursor that was not issued for this query); do not
    /// retry, tell the caller.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// Stored data cannot be read back, or the backend is closed; an operator must look.
    #[error("storage failure: {0}")]
    Fatal(#[source] Cause),
}

impl StorageError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, StorageError::Unavailable(_))
    }
}

/// A lower-level error, as [`Error::source`](std::error::Error::source) gives it.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What storage was doing when it failed, and the driver's or the disk's error that made it fail,
/// kept as the error's source. Its `Display` shows both (`what: source`), so a one-line log of a
/// storage error is complete.
#[derive(Debug)]
pub struct Cause {
    what: String,
    source: Option<BoxError>,
}

impl Cause {
    /// `what` failed because of `source`.
    pub fn new(what: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Cause {
            what: what.into(),
            source: Some(source.into()),
        }
    }

    /// What was being done, without the source.
    pub fn what(&self) -> &str {
        &self.what
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.source {
            Some(source) => write!(f, "{}: {source}", self.what),
            None => f.write_str(&self.what),
        }
    }
}

impl std::error::Error for Cause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as _)
    }
}

/// A failure found by storage itself (a malformed row, a closed backend), with no lower error.
impl From<String> for Cause {
    fn from(what: String) -> Self {
        Cause { what, source: None }
    }
}

impl From<&str> for Cause {
    fn from(what: &str) -> Self {
        Cause::from(what.to_string())
    }
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// The one storage interface of Messina; the bridge writes through it and the HTTP API reads
/// through it. Its behaviour is specified by the [`contract`] suite.
#[async_trait]
pub trait Storage: Send + Sync + 'static {
    /// Stores a batch idempotently: a reading or event with the same `(device, ts, seq)` as a stored
    /// one overwrites it. Updates each device's latest state by device time, and recomputes the
    /// aggregate rollups of every minute and hour the batch's readings fall in. When this returns
    /// `Ok`, the batch is durable to the backend's configured degree.
    async fn write_batch(&self, batch: &Batch) -> Result<()>;

    /// The latest state of one device, `None` when it never sent a reading.
    async fn device(&self, device: &DeviceId) -> Result<Option<DeviceState>>;

    /// A page of the fleet's latest states, in the backend's device order (by id embedded, by
    /// token on ScyllaDB); each page reads only its own devices.
    async fn fleet(&self, query: &FleetQuery) -> Result<Page<DeviceState>>;

    /// The fleet's counts, maintained as readings are written: reading them costs the same for
    /// ten devices or a million. `low_battery` uses the backend's `low_battery_percent`.
    async fn fleet_counts(&self) -> Result<FleetCounts>;

    /// Records that `node` has `connected` devices connected now; the report holds for `ttl`,
    /// so a node that stops reporting drops out of [`Storage::connected_devices`].
    async fn report_node(&self, node: &str, connected: u64, ttl_ms: Millis) -> Result<()>;

    /// Devices connected over every node whose last report still holds.
    async fn connected_devices(&self) -> Result<u64>;

    /// Records connection changes, each for its device on its node (the later `at` wins).
    async fn put_connections(&self, connections: &[Connection]) -> Result<()>;

    /// The connection state of each of `devices` that has one: a connection on a node whose
    /// report still holds (the latest, if several), else its latest change, as not connected.
    async fn connections(&self, devices: &[DeviceId]) -> Result<Vec<Connection>>;

    /// Readings of one device in a time range.
    async fn telemetry(&self, query: &TelemetryQuery) -> Result<Page<Reading>>;

    /// Aggregates of one metric of one device per time bucket, oldest first, empty buckets left
    /// out. Exact whatever the range: served from the rollups `write_batch` keeps (per minute,
    /// per hour; days from hours), with raw readings only for the partial minutes at the edges.
    async fn aggregates(&self, device: &DeviceId, query: &AggregateQuery)
        -> Result<Vec<Aggregate>>;

    /// Aggregates of one metric over every device per time bucket, as [`Storage::aggregates`].
    async fn fleet_aggregates(&self, query: &AggregateQuery) -> Result<Vec<Aggregate>>;

    /// Events of one device in a time range.
    async fn events(&self, query: &EventQuery) -> Result<Page<Event>>;

    /// Dead letters, newest first.
    async fn dead_letters(&self, query: &DeadLetterQuery) -> Result<Page<DeadLetter>>;

    /// Stores alerts, each replacing the stored alert with the same id (every lifecycle
    /// transition is written this way).
    async fn put_alerts(&self, alerts: &[Alert]) -> Result<()>;

    /// Alerts of a rule family raised in a range, counted per device and rule, sorted by device
    /// then rule.
    async fn alert_counts(&self, query: &AlertCountQuery) -> Result<Vec<AlertCount>>;

    /// One alert by id; `None` when there is no such alert (or the id is not an alert id).
    async fn alert(&self, id: &str) -> Result<Option<Alert>>;

    /// Alerts, newest raised first.
    async fn alerts(&self, query: &AlertQuery) -> Result<Page<Alert>>;

    /// Saves the alert engine's state of each device (opaque bytes the alert service encodes),
    /// each replacing the device's saved state; an empty value deletes it.
    async fn put_alert_states(&self, states: &[(DeviceId, Vec<u8>)]) -> Result<()>;

    /// Every saved alert-engine state, one per device (read once at start).
    async fn alert_states(&self) -> Result<Vec<(DeviceId, Vec<u8>)>>;

    /// Adds an identity to the device registry; `false`, with nothing written, when the id is
    /// registered already (even by a concurrent caller).
    async fn register_device(&self, device: &RegisteredDevice) -> Result<bool>;

    /// Replaces a registered identity's record (rotation, revocation, attribute changes) and
    /// records a [`RegistryChange`] at its `updated_at`.
    async fn update_device(&self, device: &RegisteredDevice) -> Result<()>;

    /// Up to `limit` registry changes at or after `since`, oldest first (ties by device id).
    async fn registry_changes(&self, since: Millis, limit: usize) -> Result<Vec<RegistryChange>>;

    /// One registered identity; `None` when the id is not registered.
    async fn registered_device(&self, id: &DeviceId) -> Result<Option<RegisteredDevice>>;

    /// Registered identities passing the query's filters, a page at a time.
    async fn registered_devices(&self, query: &DeviceQuery) -> Result<Page<RegisteredDevice>>;

    /// Stores an upload, replacing the stored upload with the same id (each state change is
    /// written this way).
    async fn put_upload(&self, upload: &Upload) -> Result<()>;

    /// One upload by id; `None` when there is no such upload (or the id is not an upload id).
    async fn upload(&self, id: &str) -> Result<Option<Upload>>;

    /// A device's uploads, newest requested first.
    async fn uploads(&self, query: &UploadQuery) -> Result<Page<Upload>>;

    /// Up to `limit` pending uploads whose URL expired before `before`, soonest expired first:
    /// what the expiry sweep marks expired.
    async fn expired_uploads(&self, before: Millis, limit: usize) -> Result<Vec<Upload>>;

    /// `Ok` when the backend can serve reads and writes now.
    async fn health(&self) -> Result<()>;

    /// Makes everything written durable and releases the backend; later calls fail with `Fatal`.
    async fn close(&self) -> Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn storage_errors_keep_the_error_that_caused_them() {
        let disk = std::io::Error::new(std::io::ErrorKind::StorageFull, "no space left");
        let e = StorageError::Unavailable(Cause::new("writing a batch", disk));
        assert_eq!(
            e.to_string(),
            "storage unavailable, retry later: writing a batch: no space left"
        );
        let cause = e.source().expect("the cause");
        let io = cause
            .source()
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .expect("the io::Error under the cause");
        assert_eq!(io.kind(), std::io::ErrorKind::StorageFull);
        assert!(e.is_retryable());

        let own = StorageError::Fatal("a row is malformed".into());
        assert_eq!(own.to_string(), "storage failure: a row is malformed");
        assert!(own.source().and_then(|c| c.source()).is_none());
    }
}
