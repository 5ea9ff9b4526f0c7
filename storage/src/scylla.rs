//! The ScyllaDB backend (Apache Cassandra works too), on the `scylla` driver: the schema of
//! `storage/schema.cql` applied at start, prepared statements, unlogged batches that stay inside one
//! partition, token-aware routing, a bounded number of requests in flight, retries with backoff and
//! jitter for timeouts, overload and unavailability, and cursors built on the driver's paging state.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt};
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::deserialize::row::DeserializeRow;
use scylla::errors::{DbError, ExecutionError, RequestAttemptError};
use scylla::policies::load_balancing::DefaultPolicy;
use scylla::response::{PagingState, PagingStateResponse};
use scylla::serialize::row::SerializeRow;
use scylla::statement::batch::{Batch as CqlBatch, BatchType};
use scylla::statement::prepared::PreparedStatement;
pub use scylla::statement::Consistency;
use scylla::value::{CqlDate, CqlTimestamp, MaybeUnset};

use crate::backoff::Backoff;
use crate::model::{
    Alert, AlertState, AttrValue, Batch, Connection, DeadLetter, DeviceId, DeviceState, Event,
    Millis, Reading, Stamped, Upload, UploadState,
};
use crate::query::{
    AlertCount, AlertCountQuery, AlertQuery, AlertTally, Cursor, DeadLetterQuery, EventQuery,
    FleetCounts, FleetQuery, Order, Page, PageRequest, TelemetryQuery, TimeRange, UploadQuery,
};
use crate::registry::{Credential, DeviceQuery, RegisteredDevice, RegistryChange};
use crate::{BoxError, Cause, Result, Storage, StorageError};

/// The schema applied at start; see the file for the tables.
pub const SCHEMA: &str = include_str!("../schema.cql");
/// The version of `SCHEMA`, recorded in `schema_version`.
pub const SCHEMA_VERSION: i32 = 1;

/// Settings of the ScyllaDB backend.
#[derive(Debug, Clone)]
pub struct ScyllaOptions {
    /// Contact points, "host:port".
    pub nodes: Vec<String>,
    pub keyspace: String,
    /// CQL replication map used when the keyspace is created.
    pub replication: String,
    pub consistency: Consistency,
    pub local_datacenter: Option<String>,
    /// TTL of readings, events and dead letters; 0 keeps them forever.
    pub ttl_seconds: i32,
    pub max_in_flight: usize,
    pub request_timeout: Duration,
    /// Attempts of a write failing with a retryable error before `write_batch` gives up.
    pub write_attempts: u32,
    pub credentials: Option<(String, String)>,
    /// Devices whose latest battery is below this percentage count as low on battery.
    pub low_battery_percent: f64,
}

impl ScyllaOptions {
    /// Defaults for a single local node with a given keyspace.
    pub fn local(keyspace: &str) -> Self {
        ScyllaOptions {
            nodes: vec!["127.0.0.1:9042".into()],
            keyspace: keyspace.into(),
            replication: "{'class': 'SimpleStrategy', 'replication_factor': 1}".into(),
            consistency: Consistency::LocalQuorum,
            local_datacenter: None,
            ttl_seconds: 0,
            max_in_flight: 64,
            request_timeout: Duration::from_secs(5),
            write_attempts: 3,
            credentials: None,
            low_battery_percent: 20.0,
        }
    }
}

/// Rows per unlogged batch: keeps each batch (all of one partition) under Cassandra's default
/// 5 KiB batch-size warning for typical readings.
const ROWS_PER_BATCH: usize = 32;
const DAY_MS: i64 = 86_400_000;
const HOUR_MS: i64 = 3_600_000;
/// Owner of the fleet-wide (dead letters, alerts) partition index entries; device ids cannot
/// contain '*'.
const DEAD_LETTER_OWNER: &str = "*";

/// The ScyllaDB backend; cheap to clone.
#[derive(Clone)]
pub struct ScyllaStorage {
    inner: Arc<Inner>,
}

struct Statements {
    insert_reading: PreparedStatement,
    insert_event: PreparedStatement,
    insert_event_by_kind: PreparedStatement,
    insert_partition: PreparedStatement,
    insert_dead_letter: PreparedStatement,
    update_latest: PreparedStatement,
    update_last_seen: PreparedStatement,
    days_desc: PreparedStatement,
    days_asc: PreparedStatement,
    telemetry_desc: PreparedStatement,
    telemetry_asc: PreparedStatement,
    events_desc: PreparedStatement,
    events_asc: PreparedStatement,
    events_kind_desc: PreparedStatement,
    events_kind_asc: PreparedStatement,
    dead_letters: PreparedStatement,
    latest: PreparedStatement,
    fleet: PreparedStatement,
    fleet_member: PreparedStatement,
    insert_alert_family: PreparedStatement,
    alerts_of_family: PreparedStatement,
    fleet_flag: PreparedStatement,
    fleet_shard: PreparedStatement,
    put_shard_counts: PreparedStatement,
    fleet_counts: PreparedStatement,
    latest_batteries: PreparedStatement,
    report_node: PreparedStatement,
    nodes: PreparedStatement,
    put_connection: PreparedStatement,
    connections: PreparedStatement,
    insert_alert: PreparedStatement,
    alert: PreparedStatement,
    alerts: PreparedStatement,
    insert_upload: PreparedStatement,
    upload: PreparedStatement,
    uploads: PreparedStatement,
    insert_pending_upload: PreparedStatement,
    delete_pending_upload: PreparedStatement,
    expired_uploads: PreparedStatement,
    insert_alert_state: PreparedStatement,
    delete_alert_state: PreparedStatement,
    alert_states: PreparedStatement,
    insert_device: PreparedStatement,
    insert_registry_change: PreparedStatement,
    registry_changes: PreparedStatement,
    register_device: PreparedStatement,
    registered_device: PreparedStatement,
    registered_devices: PreparedStatement,
}

struct Inner {
    session: Session,
    st: Statements,
    options: ScyllaOptions,
    /// Partition index entries already written by this process; bounded by clearing.
    known_partitions: Mutex<HashSet<(String, String, i64)>>,
    /// What this process last wrote to `fleet_devices` per device; bounded by clearing.
    fleet_flags: Mutex<HashMap<DeviceId, Option<bool>>>,
    /// Shards whose devices changed since their last recount.
    dirty_shards: Mutex<BTreeSet<i32>>,
    closed: AtomicBool,
}

/// Shards of `fleet_devices` and `fleet_counts`.
const FLEET_SHARDS: i32 = 64;
/// Devices whose last written fleet flag this process remembers before it forgets them all.
const FLEET_FLAGS_KEPT: usize = 1_000_000;

/// A device's shard: FNV-1a of its id, so every node agrees.
fn fleet_shard(device: &DeviceId) -> i32 {
    let mut hash: u32 = 0x811c_9dc5;
    for b in device.as_str().bytes() {
        hash = (hash ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    (hash % FLEET_SHARDS as u32) as i32
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn day_of(ms: Millis) -> i64 {
    ms.div_euclid(DAY_MS)
}

fn cql_date(day: i64) -> CqlDate {
    CqlDate((day + (1i64 << 31)).clamp(0, u32::MAX as i64) as u32)
}

fn from_cql_date(d: CqlDate) -> i64 {
    i64::from(d.0) - (1i64 << 31)
}

fn ts(ms: Millis) -> CqlTimestamp {
    CqlTimestamp(ms)
}

fn unset<T>(v: Option<T>) -> MaybeUnset<T> {
    v.map_or(MaybeUnset::Unset, MaybeUnset::Set)
}

/// Attributes as the `frozen<map<text, text>>` columns hold them: each value as JSON. A value
/// that cannot be written is an error naming the attribute, never an empty string.
fn attrs_to_cql(attrs: &BTreeMap<String, AttrValue>) -> Result<BTreeMap<String, String>> {
    attrs
        .iter()
        .map(|(k, v)| {
            serde_json::to_string(v)
                .map(|json| (k.clone(), json))
                .map_err(|e| StorageError::InvalidRequest(format!("attribute `{k}`: {e}")))
        })
        .collect()
}

fn attrs_from_cql(attrs: Option<BTreeMap<String, String>>) -> Result<BTreeMap<String, AttrValue>> {
    attrs
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| {
            serde_json::from_str(&v).map(|v| (k, v)).map_err(|e| {
                StorageError::Fatal(Cause::new(
                    format!("attribute value {v:?} is not a JSON scalar"),
                    e,
                ))
            })
        })
        .collect()
}

fn device(id: String) -> Result<DeviceId> {
    DeviceId::new(id).map_err(|e| StorageError::Fatal(Cause::new("stored device id is invalid", e)))
}

/// Decides whether a failed request may succeed later, keeping the statement in the message.
fn classify(statement: &str, e: ExecutionError) -> StorageError {
    let retryable = match &e {
        ExecutionError::ConnectionPoolError(_)
        | ExecutionError::RequestTimeout(_)
        | ExecutionError::EmptyPlan
        | ExecutionError::SchemaAgreementError(_) => true,
        ExecutionError::LastAttemptError(attempt) => match attempt {
            RequestAttemptError::DbError(db, _) => matches!(
                db,
                DbError::Unavailable { .. }
                    | DbError::Overloaded
                    | DbError::IsBootstrapping
                    | DbError::ReadTimeout { .. }
                    | DbError::WriteTimeout { .. }
                    | DbError::ReadFailure { .. }
                    | DbError::WriteFailure { .. }
                    | DbError::RateLimitReached { .. }
                    | DbError::TruncateError
            ),
            RequestAttemptError::BrokenConnectionError(_)
            | RequestAttemptError::UnableToAllocStreamId => true,
            _ => false,
        },
        _ => false,
    };
    let cause = Cause::new(
        statement.split_whitespace().collect::<Vec<_>>().join(" "),
        e,
    );
    if retryable {
        StorageError::Unavailable(cause)
    } else {
        StorageError::Fatal(cause)
    }
}

/// Statements of a schema file: comments removed, split on `;`.
fn schema_statements(schema: &str) -> Vec<String> {
    let text: String = schema
        .lines()
        .map(|l| l.split("--").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    text.split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// FNV-1a, to bind a cursor to the query that issued it.
fn fingerprint(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.iter().chain(&[0xff]) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x100_0000_01b3);
        }
    }
    h
}

/// A cursor over a day-partitioned stream: which query, which day, and where in that day.
struct DayCursor {
    day: i64,
    paging: PagingState,
}

const CURSOR_MAGIC: u8 = b'S';

fn encode_day_cursor(query: u64, c: &DayCursor) -> Cursor {
    let mut bytes = vec![CURSOR_MAGIC];
    bytes.extend_from_slice(&query.to_be_bytes());
    bytes.extend_from_slice(&c.day.to_be_bytes());
    if let Some(state) = c.paging.as_bytes_slice() {
        bytes.extend_from_slice(state);
    }
    Cursor(bytes)
}

fn decode_day_cursor(query: u64, cursor: &Cursor) -> Result<DayCursor> {
    let b = &cursor.0;
    if b.len() < 17 || b[0] != CURSOR_MAGIC || b[1..9] != query.to_be_bytes() {
        return Err(StorageError::InvalidRequest(
            "cursor does not belong to this query; start again without a cursor".into(),
        ));
    }
    let day = i64::from_be_bytes(b[9..17].try_into().expect("8 bytes"));
    let paging = if b.len() > 17 {
        PagingState::new_from_raw_bytes(&b[17..])
    } else {
        PagingState::start()
    };
    Ok(DayCursor { day, paging })
}

/// Columns read for a reading.
type ReadingRow = (
    String,
    CqlTimestamp,
    i64,
    CqlTimestamp,
    Option<f64>,
    Option<i32>,
    Option<bool>,
    Option<BTreeMap<String, f64>>,
    Option<BTreeMap<String, String>>,
);

fn reading_from_row(r: ReadingRow) -> Result<Reading> {
    Ok(Reading {
        device: device(r.0)?,
        ts: r.1 .0,
        seq: r.2 as u64,
        received_at: r.3 .0,
        battery: r.4,
        rssi: r.5,
        online: r.6,
        metrics: r.7.unwrap_or_default(),
        attrs: attrs_from_cql(r.8)?,
    })
}

type EventRow = (
    String,
    CqlTimestamp,
    i64,
    CqlTimestamp,
    String,
    Option<BTreeMap<String, String>>,
);

fn event_from_row(r: EventRow) -> Result<Event> {
    Ok(Event {
        device: device(r.0)?,
        ts: r.1 .0,
        seq: r.2 as u64,
        received_at: r.3 .0,
        kind: r.4,
        attrs: attrs_from_cql(r.5)?,
    })
}

type DeadLetterRow = (
    CqlTimestamp,
    i64,
    String,
    Option<String>,
    Option<Vec<u8>>,
    String,
);

fn dead_letter_from_row(r: DeadLetterRow) -> Result<DeadLetter> {
    Ok(DeadLetter {
        id: r.1 as u64,
        received_at: r.0 .0,
        topic: r.2,
        device: r.3.map(device).transpose()?,
        payload: r.4.unwrap_or_default(),
        reason: r.5,
    })
}

type LatestRow = (
    String,
    Option<CqlTimestamp>,
    Option<i64>,
    Option<CqlTimestamp>,
    Option<f64>,
    Option<i64>,
    Option<i32>,
    Option<i64>,
    Option<bool>,
    Option<i64>,
    Option<BTreeMap<String, (f64, CqlTimestamp)>>,
);

const LATEST_COLUMNS: &str = "device_id, ts, seq, last_seen, battery, WRITETIME(battery), rssi, \
     WRITETIME(rssi), online, WRITETIME(online), metrics";

fn stamped<T>(value: Option<T>, writetime: Option<i64>) -> Option<Stamped<T>> {
    Some(Stamped {
        value: value?,
        ts: writetime?.div_euclid(1000),
    })
}

fn latest_from_row(r: LatestRow) -> Result<DeviceState> {
    Ok(DeviceState {
        device: device(r.0)?,
        ts: r.1.map_or(0, |t| t.0),
        seq: r.2.unwrap_or(0) as u64,
        last_seen: r.3.map_or(0, |t| t.0),
        battery: stamped(r.4, r.5),
        rssi: stamped(r.6, r.7),
        online: stamped(r.8, r.9),
        metrics: r
            .10
            .unwrap_or_default()
            .into_iter()
            .map(|(k, (value, t))| (k, Stamped { value, ts: t.0 }))
            .collect(),
    })
}

const ALERT_DATA_COLUMNS: &str =
    "device_id, rule, state, severity, message, value, threshold, acked_at, acked_by, cleared_at";

type AlertRow = (
    CqlTimestamp,
    String,
    String,
    String,
    String,
    String,
    String,
    Option<f64>,
    Option<f64>,
    Option<CqlTimestamp>,
    Option<String>,
    Option<CqlTimestamp>,
);

fn alert_from_row(r: AlertRow) -> Result<Alert> {
    let state = match r.4.as_str() {
        "raised" => AlertState::Raised,
        "acknowledged" => AlertState::Acknowledged,
        "cleared" => AlertState::Cleared,
        other => {
            return Err(StorageError::Fatal(
                format!("stored alert state {other:?} is unknown").into(),
            ))
        }
    };
    Ok(Alert {
        raised_at: r.0 .0,
        id: r.1,
        device: device(r.2)?,
        rule: r.3,
        state,
        severity: r.5,
        message: r.6,
        value: r.7,
        threshold: r.8,
        acked_at: r.9.map(|t| t.0),
        acked_by: r.10,
        cleared_at: r.11.map(|t| t.0),
    })
}

type AlertValues = (
    CqlDate,
    CqlTimestamp,
    String,
    String,
    String,
    &'static str,
    String,
    String,
    Option<f64>,
    Option<f64>,
    Option<CqlTimestamp>,
    Option<String>,
    Option<CqlTimestamp>,
);

const UPLOAD_COLUMNS: &str = "device_id, created_at, id, kind, content_type, size, sha256, object_key, state, expires_at, finished_at, attrs, meta, error";

type UploadRow = (
    String,
    CqlTimestamp,
    String,
    String,
    String,
    i64,
    Option<String>,
    String,
    String,
    CqlTimestamp,
    Option<CqlTimestamp>,
    Option<BTreeMap<String, String>>,
    Option<BTreeMap<String, String>>,
    Option<String>,
);

fn upload_from_row(r: UploadRow) -> Result<Upload> {
    let state = UploadState::parse(&r.8).ok_or_else(|| {
        StorageError::Fatal(format!("stored upload state {:?} is unknown", r.8).into())
    })?;
    Ok(Upload {
        device: device(r.0)?,
        created_at: r.1 .0,
        id: r.2,
        kind: r.3,
        content_type: r.4,
        size: u64::try_from(r.5).map_err(|_| {
            StorageError::Fatal(format!("stored upload size {} is negative", r.5).into())
        })?,
        sha256: r.6,
        object_key: r.7,
        state,
        expires_at: r.9 .0,
        finished_at: r.10.map(|t| t.0),
        attrs: attrs_from_cql(r.11)?,
        meta: attrs_from_cql(r.12)?,
        error: r.13,
    })
}

const DEVICE_COLS: &str = "device_id, role, status, credential_kind, credential, created_at, \
    updated_at, name, model, labels, profile, photo_upload";

type DeviceRow = (
    String,
    String,
    String,
    String,
    String,
    CqlTimestamp,
    CqlTimestamp,
    Option<String>,
    Option<String>,
    Option<BTreeSet<String>>,
    Option<BTreeMap<String, String>>,
    Option<String>,
);

type DeviceValues<'a> = (
    &'a str,
    &'a str,
    &'a str,
    &'static str,
    &'a str,
    CqlTimestamp,
    CqlTimestamp,
    Option<&'a str>,
    Option<&'a str>,
    &'a BTreeSet<String>,
    BTreeMap<String, String>,
    Option<&'a str>,
);

fn device_values(d: &RegisteredDevice) -> Result<DeviceValues<'_>> {
    Ok((
        d.id.as_str(),
        d.role.as_str(),
        d.status.as_str(),
        d.credential.kind(),
        d.credential.value(),
        ts(d.created_at),
        ts(d.updated_at),
        d.name.as_deref(),
        d.model.as_deref(),
        &d.labels,
        attrs_to_cql(&d.profile)?,
        d.photo_upload.as_deref(),
    ))
}

fn device_from_row(r: DeviceRow) -> Result<RegisteredDevice> {
    let bad = |e: crate::registry::UnknownName| {
        StorageError::Fatal(Cause::new(format!("devices row {:?}", r.0), e))
    };
    Ok(RegisteredDevice {
        role: r.1.parse().map_err(bad)?,
        status: r.2.parse().map_err(bad)?,
        credential: Credential::from_parts(&r.3, r.4.clone()).map_err(bad)?,
        created_at: r.5 .0,
        updated_at: r.6 .0,
        name: r.7,
        model: r.8,
        labels: r.9.unwrap_or_default(),
        profile: attrs_from_cql(r.10)?,
        photo_upload: r.11,
        id: device(r.0)?,
    })
}

/// The pending-uploads index has one partition; see `schema.cql`.
const PENDING_SHARD: i32 = 0;

/// One request of a batch write: an unlogged batch inside one partition, or a single statement.
enum Job {
    Batch {
        batch: CqlBatch,
        values: JobValues,
        statement: &'static str,
    },
}

/// The bound values of a job's statements; all rows of one job use one statement.
enum JobValues {
    Readings(Vec<ReadingValues>),
    Events(Vec<EventValues>),
    EventsByKind(Vec<EventByKindValues>),
    Latest(Vec<LatestValues>),
    LastSeen(Vec<LastSeenValues>),
    Partitions(Vec<PartitionValues>),
    DeadLetters(Vec<DeadLetterValues>),
    Alerts(Vec<AlertValues>),
    FleetMembers(Vec<(i32, String)>),
    AlertFamilies(Vec<(String, CqlDate, CqlTimestamp, String)>),
    FleetFlags(Vec<(i64, bool, i32, String)>),
}

type ReadingValues = (
    String,
    CqlDate,
    CqlTimestamp,
    i64,
    CqlTimestamp,
    MaybeUnset<f64>,
    MaybeUnset<i32>,
    MaybeUnset<bool>,
    BTreeMap<String, f64>,
    BTreeMap<String, String>,
    i32,
);
type EventValues = (
    String,
    CqlDate,
    CqlTimestamp,
    i64,
    CqlTimestamp,
    String,
    BTreeMap<String, String>,
    i32,
);
type EventByKindValues = (
    String,
    String,
    CqlDate,
    CqlTimestamp,
    i64,
    CqlTimestamp,
    BTreeMap<String, String>,
    i32,
);
type LatestValues = (
    i64,
    CqlTimestamp,
    i64,
    MaybeUnset<f64>,
    MaybeUnset<i32>,
    MaybeUnset<bool>,
    MaybeUnset<BTreeMap<String, (f64, CqlTimestamp)>>,
    String,
);
type LastSeenValues = (i64, CqlTimestamp, String);
type PartitionValues = (String, String, CqlDate, i32);
type DeadLetterValues = (
    CqlDate,
    CqlTimestamp,
    i64,
    String,
    Option<String>,
    Vec<u8>,
    String,
    i32,
);

impl ScyllaStorage {
    /// Connects, creates the keyspace when missing, applies the schema and prepares statements.
    pub async fn connect(options: &ScyllaOptions) -> Result<Self> {
        let mut policy = DefaultPolicy::builder().token_aware(true);
        if let Some(dc) = &options.local_datacenter {
            policy = policy.prefer_datacenter(dc.clone());
        }
        let profile = ExecutionProfile::builder()
            .consistency(options.consistency)
            .request_timeout(Some(options.request_timeout))
            .load_balancing_policy(policy.build())
            .build();
        let mut builder = SessionBuilder::new()
            .known_nodes(&options.nodes)
            .connection_timeout(options.request_timeout)
            .default_execution_profile_handle(profile.into_handle());
        if let Some((user, password)) = &options.credentials {
            builder = builder.user(user, password);
        }
        let session = builder.build().await.map_err(|e| {
            StorageError::Unavailable(Cause::new(
                format!(
                    "cannot connect to ScyllaDB at {} (`storage.scylla.nodes`)",
                    options.nodes.join(", ")
                ),
                e,
            ))
        })?;
        let ks = &options.keyspace;
        let create = format!(
            "CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = {}",
            options.replication
        );
        session
            .query_unpaged(create.as_str(), ())
            .await
            .map_err(|e| classify(&create, e))?;
        session
            .use_keyspace(ks, false)
            .await
            .map_err(|e| StorageError::Fatal(Cause::new(format!("USE {ks}"), e)))?;
        for statement in schema_statements(SCHEMA) {
            session
                .query_unpaged(statement.as_str(), ())
                .await
                .map_err(|e| classify(&statement, e))?;
        }
        Self::check_schema_version(&session, ks).await?;
        let st = Statements::prepare(&session, ks).await?;
        let storage = ScyllaStorage {
            inner: Arc::new(Inner {
                session,
                st,
                options: options.clone(),
                known_partitions: Mutex::new(HashSet::new()),
                fleet_flags: Mutex::new(HashMap::new()),
                dirty_shards: Mutex::new(BTreeSet::new()),
                closed: AtomicBool::new(false),
            }),
        };
        storage.start_fleet_upkeep().await?;
        Ok(storage)
    }

    /// Counts the fleet from `device_latest` when its counts are missing or were made at
    /// another threshold, then keeps them: the shards changed by written batches are recounted
    /// every second, and every shard in turn every few minutes (repairing what a crash between
    /// a write and its recount, or a flag another node wrote, left behind).
    async fn start_fleet_upkeep(&self) -> Result<()> {
        let threshold = self.inner.options.low_battery_percent;
        let shards = self.inner.shard_counts().await?;
        let rebuild = shards.len() < FLEET_SHARDS as usize
            || shards.iter().any(|(_, _, t)| *t != Some(threshold));
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            if rebuild {
                let Some(inner) = weak.upgrade() else { return };
                tracing::info!(
                    low_battery_percent = threshold,
                    "counting the fleet from device_latest once"
                );
                match inner.rebuild_fleet().await {
                    Ok(devices) => tracing::info!(devices, "the fleet is counted"),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot count the fleet now; the counts are recounted shard by shard")
                    }
                }
            }
            let mut dirty: BTreeSet<i32> = (0..FLEET_SHARDS).collect();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let (mut round, mut failing) = (0u64, false);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { break };
                if inner.closed.load(Ordering::Acquire) {
                    break;
                }
                round += 1;
                if round.is_multiple_of(5) {
                    dirty.insert(((round / 5) % FLEET_SHARDS as u64) as i32);
                }
                dirty.append(&mut lock(&inner.dirty_shards));
                while let Some(shard) = dirty.pop_first() {
                    if let Err(e) = inner.recount_shard(shard).await {
                        dirty.insert(shard);
                        if !failing {
                            tracing::warn!(error = %e, "cannot recount the fleet; the summary's counts lag until ScyllaDB answers");
                        }
                        failing = true;
                        break;
                    }
                    failing = false;
                }
            }
        });
        Ok(())
    }

    async fn check_schema_version(session: &Session, ks: &str) -> Result<()> {
        let select = format!("SELECT version FROM {ks}.schema_version WHERE component = 'messina'");
        let found = session
            .query_unpaged(select.as_str(), ())
            .await
            .map_err(|e| classify(&select, e))?
            .into_rows_result()
            .map_err(|e| StorageError::Fatal(Cause::new(select.to_string(), e)))?
            .maybe_first_row::<(Option<i32>,)>()
            .map_err(|e| StorageError::Fatal(Cause::new(select.to_string(), e)))?
            .and_then(|(v,)| v);
        match found {
            Some(v) if v > SCHEMA_VERSION => Err(StorageError::Fatal(format!(
                "keyspace {ks} holds schema version {v}, newer than this Messina's {SCHEMA_VERSION}; upgrade Messina"
            ).into())),
            Some(v) if v == SCHEMA_VERSION => Ok(()),
            _ => {
                let insert = format!(
                    "INSERT INTO {ks}.schema_version (component, version, applied_at) VALUES ('messina', {SCHEMA_VERSION}, toTimestamp(now()))"
                );
                session
                    .query_unpaged(insert.as_str(), ())
                    .await
                    .map(|_| ())
                    .map_err(|e| classify(&insert, e))
            }
        }
    }

    /// The driver session, for tools and tests that query with plain CQL.
    pub fn session(&self) -> &Session {
        &self.inner.session
    }

    fn check_open(&self) -> Result<()> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(StorageError::Fatal("ScyllaDB storage is closed".into()));
        }
        Ok(())
    }
}

impl Statements {
    async fn prepare(session: &Session, ks: &str) -> Result<Self> {
        let prepare = |cql: String| async move {
            session
                .prepare(cql.as_str())
                .await
                .map_err(|e| StorageError::Fatal(Cause::new(format!("preparing {cql}"), e)))
        };
        let reading_cols = "device_id, ts, seq, received_at, battery, rssi, online, metrics, attrs";
        let event_cols = "device_id, ts, seq, received_at, kind, attrs";
        let range = "WHERE device_id = ? AND day = ? AND ts >= ? AND ts < ?";
        let kind_range = "WHERE device_id = ? AND kind = ? AND day = ? AND ts >= ? AND ts < ?";
        let asc = "ORDER BY ts ASC, seq ASC";
        Ok(Statements {
            insert_reading: prepare(format!(
                "INSERT INTO {ks}.telemetry (device_id, day, ts, seq, received_at, battery, rssi, online, metrics, attrs) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) USING TTL ?"
            ))
            .await?,
            insert_event: prepare(format!(
                "INSERT INTO {ks}.events (device_id, day, ts, seq, received_at, kind, attrs) VALUES (?, ?, ?, ?, ?, ?, ?) USING TTL ?"
            ))
            .await?,
            insert_event_by_kind: prepare(format!(
                "INSERT INTO {ks}.events_by_kind (device_id, kind, day, ts, seq, received_at, attrs) VALUES (?, ?, ?, ?, ?, ?, ?) USING TTL ?"
            ))
            .await?,
            insert_partition: prepare(format!(
                "INSERT INTO {ks}.partitions (owner, stream, day) VALUES (?, ?, ?) USING TTL ?"
            ))
            .await?,
            insert_dead_letter: prepare(format!(
                "INSERT INTO {ks}.dead_letters (day, received_at, id, topic, device_id, payload, reason) VALUES (?, ?, ?, ?, ?, ?, ?) USING TTL ?"
            ))
            .await?,
            update_latest: prepare(format!(
                "UPDATE {ks}.device_latest USING TIMESTAMP ? SET ts = ?, seq = ?, battery = ?, rssi = ?, online = ?, metrics = metrics + ? WHERE device_id = ?"
            ))
            .await?,
            update_last_seen: prepare(format!(
                "UPDATE {ks}.device_latest USING TIMESTAMP ? SET last_seen = ? WHERE device_id = ?"
            ))
            .await?,
            days_desc: prepare(format!(
                "SELECT day FROM {ks}.partitions WHERE owner = ? AND stream = ? AND day >= ? AND day <= ?"
            ))
            .await?,
            days_asc: prepare(format!(
                "SELECT day FROM {ks}.partitions WHERE owner = ? AND stream = ? AND day >= ? AND day <= ? ORDER BY day ASC"
            ))
            .await?,
            telemetry_desc: prepare(format!("SELECT {reading_cols} FROM {ks}.telemetry {range}")).await?,
            telemetry_asc: prepare(format!("SELECT {reading_cols} FROM {ks}.telemetry {range} {asc}")).await?,
            events_desc: prepare(format!("SELECT {event_cols} FROM {ks}.events {range}")).await?,
            events_asc: prepare(format!("SELECT {event_cols} FROM {ks}.events {range} {asc}")).await?,
            events_kind_desc: prepare(format!("SELECT {event_cols} FROM {ks}.events_by_kind {kind_range}")).await?,
            events_kind_asc: prepare(format!("SELECT {event_cols} FROM {ks}.events_by_kind {kind_range} {asc}")).await?,
            dead_letters: prepare(format!(
                "SELECT received_at, id, topic, device_id, payload, reason FROM {ks}.dead_letters WHERE day = ? AND received_at >= ? AND received_at < ?"
            ))
            .await?,
            latest: prepare(format!("SELECT {LATEST_COLUMNS} FROM {ks}.device_latest WHERE device_id = ?")).await?,
            fleet: prepare(format!("SELECT {LATEST_COLUMNS} FROM {ks}.device_latest")).await?,
            insert_alert_family: prepare(format!(
                "INSERT INTO {ks}.alerts_by_family (family, day, raised_at, id) VALUES (?, ?, ?, ?)"
            ))
            .await?,
            alerts_of_family: prepare(format!(
                "SELECT id FROM {ks}.alerts_by_family WHERE family = ? AND day = ? AND raised_at >= ? AND raised_at < ?"
            ))
            .await?,
            fleet_member: prepare(format!(
                "INSERT INTO {ks}.fleet_devices (shard, device_id) VALUES (?, ?)"
            ))
            .await?,
            fleet_flag: prepare(format!(
                "UPDATE {ks}.fleet_devices USING TIMESTAMP ? SET low_battery = ? WHERE shard = ? AND device_id = ?"
            ))
            .await?,
            fleet_shard: prepare(format!(
                "SELECT low_battery FROM {ks}.fleet_devices WHERE shard = ?"
            ))
            .await?,
            put_shard_counts: prepare(format!(
                "INSERT INTO {ks}.fleet_counts (fleet, shard, devices, low_battery, low_battery_percent) \
                 VALUES ('fleet', ?, ?, ?, ?) USING TIMESTAMP ?"
            ))
            .await?,
            fleet_counts: prepare(format!(
                "SELECT devices, low_battery, low_battery_percent FROM {ks}.fleet_counts WHERE fleet = 'fleet'"
            ))
            .await?,
            latest_batteries: prepare(format!(
                "SELECT device_id, ts, battery, WRITETIME(battery) FROM {ks}.device_latest"
            ))
            .await?,
            report_node: prepare(format!(
                "INSERT INTO {ks}.nodes (cluster, node_id, connected) VALUES ('messina', ?, ?) USING TTL ?"
            ))
            .await?,
            nodes: prepare(format!(
                "SELECT node_id, connected FROM {ks}.nodes WHERE cluster = 'messina'"
            ))
            .await?,
            put_connection: prepare(format!(
                "INSERT INTO {ks}.device_connections (device_id, node, connected, at) VALUES (?, ?, ?, ?) USING TIMESTAMP ?"
            ))
            .await?,
            connections: prepare(format!(
                "SELECT device_id, node, connected, at FROM {ks}.device_connections WHERE device_id IN ?"
            ))
            .await?,
            insert_alert: prepare(format!(
                "INSERT INTO {ks}.alerts (day, raised_at, id, {ALERT_DATA_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            ))
            .await?,
            alert: prepare(format!(
                "SELECT raised_at, id, {ALERT_DATA_COLUMNS} FROM {ks}.alerts WHERE day = ? AND raised_at = ? AND id = ?"
            ))
            .await?,
            alerts: prepare(format!(
                "SELECT raised_at, id, {ALERT_DATA_COLUMNS} FROM {ks}.alerts WHERE day = ? AND raised_at >= ? AND raised_at < ?"
            ))
            .await?,
            insert_upload: prepare(format!(
                "INSERT INTO {ks}.uploads ({UPLOAD_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            ))
            .await?,
            upload: prepare(format!(
                "SELECT {UPLOAD_COLUMNS} FROM {ks}.uploads WHERE device_id = ? AND created_at = ? AND id = ?"
            ))
            .await?,
            uploads: prepare(format!("SELECT {UPLOAD_COLUMNS} FROM {ks}.uploads WHERE device_id = ?")).await?,
            insert_pending_upload: prepare(format!(
                "INSERT INTO {ks}.uploads_pending (shard, expires_at, id) VALUES (?, ?, ?)"
            ))
            .await?,
            delete_pending_upload: prepare(format!(
                "DELETE FROM {ks}.uploads_pending WHERE shard = ? AND expires_at = ? AND id = ?"
            ))
            .await?,
            expired_uploads: prepare(format!(
                "SELECT id FROM {ks}.uploads_pending WHERE shard = ? AND expires_at < ? LIMIT ?"
            ))
            .await?,
            insert_alert_state: prepare(format!(
                "INSERT INTO {ks}.alert_states (device_id, state) VALUES (?, ?)"
            ))
            .await?,
            delete_alert_state: prepare(format!(
                "DELETE FROM {ks}.alert_states WHERE device_id = ?"
            ))
            .await?,
            alert_states: prepare(format!("SELECT device_id, state FROM {ks}.alert_states"))
                .await?,
            insert_device: prepare(format!(
                "INSERT INTO {ks}.devices ({DEVICE_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            ))
            .await?,
            insert_registry_change: prepare(format!(
                "INSERT INTO {ks}.registry_changes (hour, at, device_id) VALUES (?, ?, ?)"
            ))
            .await?,
            registry_changes: prepare(format!(
                "SELECT at, device_id FROM {ks}.registry_changes WHERE hour = ? AND at >= ? LIMIT ?"
            ))
            .await?,
            register_device: prepare(format!(
                "INSERT INTO {ks}.devices ({DEVICE_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) IF NOT EXISTS"
            ))
            .await?,
            registered_device: prepare(format!(
                "SELECT {DEVICE_COLS} FROM {ks}.devices WHERE device_id = ?"
            ))
            .await?,
            registered_devices: prepare(format!("SELECT {DEVICE_COLS} FROM {ks}.devices")).await?,
        })
    }
}

/// Makes unlogged batches of at most `ROWS_PER_BATCH` rows of one statement, one partition each.
fn batches<V>(
    statement: &PreparedStatement,
    name: &'static str,
    partitions: impl IntoIterator<Item = Vec<V>>,
    wrap: impl Fn(Vec<V>) -> JobValues,
    jobs: &mut Vec<Job>,
) {
    for rows in partitions {
        let mut rows = rows.into_iter().peekable();
        while rows.peek().is_some() {
            let chunk: Vec<V> = rows.by_ref().take(ROWS_PER_BATCH).collect();
            let mut batch = CqlBatch::new(BatchType::Unlogged);
            for _ in 0..chunk.len() {
                batch.append_statement(statement.clone());
            }
            jobs.push(Job::Batch {
                batch,
                values: wrap(chunk),
                statement: name,
            });
        }
    }
}

impl Inner {
    /// One page of a whole table in token order (stable across pages), of the rows `keep` turns
    /// into items: reads pages until `limit` items are found or the table ends.
    async fn token_scan<R, T>(
        &self,
        stmt: &PreparedStatement,
        tag: u8,
        what: &str,
        page: &PageRequest,
        keep: impl Fn(R) -> Result<Option<T>>,
    ) -> Result<Page<T>>
    where
        R: for<'f, 'm> DeserializeRow<'f, 'm>,
    {
        if page.limit == 0 {
            return Err(StorageError::InvalidRequest(
                "limit must be at least 1".into(),
            ));
        }
        let mut paging = match &page.cursor {
            None => PagingState::start(),
            Some(c) => match c.0.split_first() {
                Some((t, state)) if *t == tag && !state.is_empty() => {
                    PagingState::new_from_raw_bytes(state)
                }
                _ => {
                    return Err(StorageError::InvalidRequest(format!(
                        "cursor does not belong to {what}; start again without a cursor"
                    )))
                }
            },
        };
        let table = stmt
            .get_table_spec()
            .map(|t| t.table_name().to_string())
            .unwrap_or_default();
        let fatal = |e: BoxError| StorageError::Fatal(Cause::new(table.clone(), e));
        let mut items = Vec::new();
        loop {
            // A page never holds more rows than items still wanted, so the paging state after it
            // is exactly where the next page starts.
            let mut stmt = stmt.clone();
            stmt.set_page_size((page.limit - items.len()).clamp(1, 5000) as i32);
            let (result, next) = self
                .session
                .execute_single_page(&stmt, (), paging)
                .await
                .map_err(|e| classify(stmt.get_statement(), e))?;
            let rows = result.into_rows_result().map_err(|e| fatal(e.into()))?;
            for row in rows.rows::<R>().map_err(|e| fatal(e.into()))? {
                if let Some(item) = keep(row.map_err(|e| fatal(e.into()))?)? {
                    items.push(item);
                }
            }
            match next {
                PagingStateResponse::HasMorePages { state } if items.len() >= page.limit => {
                    let mut bytes = vec![tag];
                    bytes.extend_from_slice(
                        state.as_bytes_slice().map(|s| &s[..]).unwrap_or_default(),
                    );
                    return Ok(Page {
                        items,
                        next_cursor: Some(Cursor(bytes)),
                    });
                }
                PagingStateResponse::HasMorePages { state } => paging = state,
                PagingStateResponse::NoMorePages => {
                    return Ok(Page {
                        items,
                        next_cursor: None,
                    })
                }
            }
        }
    }

    fn ttl(&self) -> i32 {
        self.options.ttl_seconds
    }

    /// Partition index entries not yet written by this process.
    fn new_partitions(&self, entries: HashSet<(String, String, i64)>) -> Vec<PartitionValues> {
        let mut known = self
            .known_partitions
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if known.len() > 100_000 {
            known.clear();
        }
        // The index outlives its rows by a day so a range query never misses a live partition.
        let ttl = if self.ttl() == 0 {
            0
        } else {
            self.ttl().saturating_add(86_400)
        };
        entries
            .into_iter()
            .filter(|e| known.insert(e.clone()))
            .map(|(owner, stream, day)| (owner, stream, cql_date(day), ttl))
            .collect()
    }

    fn forget_fleet_flags(&self) {
        lock(&self.fleet_flags).clear();
    }

    /// The `fleet_devices` writes of a batch: each device's newest battery flag (always, so a
    /// flag another node wrote is corrected), and the row itself when this process has not
    /// written it yet. Returns the shards whose counts may change (a new device, a flag that
    /// crosses the threshold), to recount once the batch is written.
    fn fleet_jobs(&self, batch: &Batch, jobs: &mut Vec<Job>) -> Vec<i32> {
        let threshold = self.options.low_battery_percent;
        let mut newest: HashMap<&DeviceId, Option<(Millis, f64)>> = HashMap::new();
        for r in &batch.readings {
            let slot = newest.entry(&r.device).or_insert(None);
            if let Some(b) = r.battery {
                if slot.is_none_or(|(ts, _)| r.ts >= ts) {
                    *slot = Some((r.ts, b));
                }
            }
        }
        let mut members: HashMap<i32, Vec<(i32, String)>> = HashMap::new();
        let mut flags: HashMap<i32, Vec<(i64, bool, i32, String)>> = HashMap::new();
        let mut changed = Vec::new();
        {
            let mut known = lock(&self.fleet_flags);
            if known.len() > FLEET_FLAGS_KEPT {
                known.clear();
            }
            for (device, battery) in newest {
                let shard = fleet_shard(device);
                let low = battery.map(|(_, b)| b < threshold);
                let before = known.get(device).copied();
                if before.is_none() {
                    members
                        .entry(shard)
                        .or_default()
                        .push((shard, device.to_string()));
                }
                if let Some((at, _)) = battery {
                    flags.entry(shard).or_default().push((
                        at.saturating_mul(1000),
                        low.unwrap_or(false),
                        shard,
                        device.to_string(),
                    ));
                }
                let after = low.or(before.flatten());
                if before.is_none() || before.flatten() != after {
                    changed.push(shard);
                }
                known.insert(device.clone(), after);
            }
        }
        batches(
            &self.st.fleet_member,
            "INSERT INTO fleet_devices",
            members.into_values(),
            JobValues::FleetMembers,
            jobs,
        );
        batches(
            &self.st.fleet_flag,
            "UPDATE fleet_devices",
            flags.into_values(),
            JobValues::FleetFlags,
            jobs,
        );
        changed
    }

    /// Counts one shard's devices and low batteries from its partition and writes them,
    /// timestamped with when the read began: a recount that read older data never overwrites a
    /// later one's.
    async fn recount_shard(&self, shard: i32) -> Result<()> {
        let began = crate::model::now_millis().saturating_mul(1000);
        let mut rows = self
            .session
            .execute_iter(self.st.fleet_shard.clone(), (shard,))
            .await
            .map_err(|e| StorageError::Unavailable(Cause::new("recounting the fleet", e)))?
            .rows_stream::<(Option<bool>,)>()
            .map_err(|e| StorageError::Fatal(Cause::new("recounting the fleet", e)))?;
        let (mut devices, mut low) = (0i64, 0i64);
        while let Some(row) = rows.next().await {
            let (flag,) =
                row.map_err(|e| StorageError::Unavailable(Cause::new("recounting the fleet", e)))?;
            devices += 1;
            low += i64::from(flag == Some(true));
        }
        let st = &self.st.put_shard_counts;
        self.session
            .execute_unpaged(
                st,
                (shard, devices, low, self.options.low_battery_percent, began),
            )
            .await
            .map_err(|e| classify(st.get_statement(), e))?;
        Ok(())
    }

    /// Writes every device's flag again from `device_latest` at the configured threshold (a
    /// store from before the fleet was counted, or a changed `low_battery_percent`), each
    /// timestamped just after the battery it was computed from.
    async fn rebuild_fleet(&self) -> Result<u64> {
        let threshold = self.options.low_battery_percent;
        let mut rows = self
            .session
            .execute_iter(self.st.latest_batteries.clone(), ())
            .await
            .map_err(|e| StorageError::Unavailable(Cause::new("counting the fleet", e)))?
            .rows_stream::<(String, Option<CqlTimestamp>, Option<f64>, Option<i64>)>()
            .map_err(|e| StorageError::Fatal(Cause::new("counting the fleet", e)))?;
        let mut jobs = Vec::new();
        let mut seen = 0u64;
        while let Some(row) = rows.next().await {
            let (device, reading_ts, battery, written) =
                row.map_err(|e| StorageError::Unavailable(Cause::new("counting the fleet", e)))?;
            if reading_ts.is_none() {
                // Only last_seen: not a device yet.
                continue;
            }
            let Ok(id) = DeviceId::new(device) else {
                continue;
            };
            let shard = fleet_shard(&id);
            let mut group = vec![(shard, id.to_string())];
            batches(
                &self.st.fleet_member,
                "INSERT INTO fleet_devices",
                std::iter::once(std::mem::take(&mut group)),
                JobValues::FleetMembers,
                &mut jobs,
            );
            if let (Some(b), Some(w)) = (battery, written) {
                batches(
                    &self.st.fleet_flag,
                    "UPDATE fleet_devices",
                    std::iter::once(vec![(
                        w.saturating_add(1),
                        b < threshold,
                        shard,
                        id.to_string(),
                    )]),
                    JobValues::FleetFlags,
                    &mut jobs,
                );
            }
            seen += 1;
            if jobs.len() >= 256 {
                self.run_jobs(std::mem::take(&mut jobs)).await?;
            }
            if seen.is_multiple_of(100_000) {
                tracing::info!(devices = seen, "counting the fleet");
            }
        }
        self.run_jobs(jobs).await?;
        Ok(seen)
    }

    /// Each shard's counts row: (devices, low battery, threshold).
    async fn shard_counts(&self) -> Result<Vec<(i64, i64, Option<f64>)>> {
        let st = &self.st.fleet_counts;
        let rows = self
            .session
            .execute_unpaged(st, ())
            .await
            .map_err(|e| classify(st.get_statement(), e))?
            .into_rows_result()
            .map_err(|e| StorageError::Fatal(Cause::new("fleet_counts", e)))?;
        rows.rows::<(Option<i64>, Option<i64>, Option<f64>)>()
            .map_err(|e| StorageError::Fatal(Cause::new("fleet_counts", e)))?
            .map(|row| {
                row.map(|(d, l, t)| (d.unwrap_or(0), l.unwrap_or(0), t))
                    .map_err(|e| StorageError::Fatal(Cause::new("fleet_counts", e)))
            })
            .collect()
    }

    /// The nodes whose reports hold, with their connected devices.
    async fn live_nodes(&self) -> Result<Vec<(String, i64)>> {
        let st = &self.st.nodes;
        let rows = self
            .session
            .execute_unpaged(st, ())
            .await
            .map_err(|e| classify(st.get_statement(), e))?
            .into_rows_result()
            .map_err(|e| StorageError::Fatal(Cause::new("nodes", e)))?;
        rows.rows::<(String, Option<i64>)>()
            .map_err(|e| StorageError::Fatal(Cause::new("nodes", e)))?
            .map(|row| {
                row.map(|(n, c)| (n, c.unwrap_or(0)))
                    .map_err(|e| StorageError::Fatal(Cause::new("nodes", e)))
            })
            .collect()
    }

    async fn run_jobs(&self, jobs: Vec<Job>) -> Result<()> {
        let requests: Vec<futures::future::BoxFuture<'_, Result<()>>> = jobs
            .iter()
            .map(|job| Box::pin(self.run_job(job)) as _)
            .collect();
        futures::stream::iter(requests)
            .buffer_unordered(self.options.max_in_flight)
            .try_collect::<Vec<()>>()
            .await
            .map(|_| ())
    }

    fn forget_partitions(&self) {
        self.known_partitions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    fn jobs(&self, batch: &Batch) -> Result<Vec<Job>> {
        let st = &self.st;
        let ttl = self.ttl();
        let mut index = HashSet::new();
        let mut jobs = Vec::new();

        let mut by_partition: HashMap<(&DeviceId, i64), Vec<ReadingValues>> = HashMap::new();
        let mut latest: HashMap<&DeviceId, Vec<LatestValues>> = HashMap::new();
        let mut last_seen: HashMap<&DeviceId, Millis> = HashMap::new();
        for r in &batch.readings {
            let day = day_of(r.ts);
            index.insert((r.device.to_string(), "telemetry".to_string(), day));
            by_partition.entry((&r.device, day)).or_default().push((
                r.device.to_string(),
                cql_date(day),
                ts(r.ts),
                r.seq as i64,
                ts(r.received_at),
                unset(r.battery),
                unset(r.rssi),
                unset(r.online),
                r.metrics.clone(),
                attrs_to_cql(&r.attrs)?,
                ttl,
            ));
            let metrics: BTreeMap<String, (f64, CqlTimestamp)> = r
                .metrics
                .iter()
                .map(|(k, v)| (k.clone(), (*v, ts(r.ts))))
                .collect();
            latest.entry(&r.device).or_default().push((
                r.ts.saturating_mul(1000),
                ts(r.ts),
                r.seq as i64,
                unset(r.battery),
                unset(r.rssi),
                unset(r.online),
                if metrics.is_empty() {
                    MaybeUnset::Unset
                } else {
                    MaybeUnset::Set(metrics)
                },
                r.device.to_string(),
            ));
            let seen = last_seen.entry(&r.device).or_insert(r.received_at);
            *seen = (*seen).max(r.received_at);
        }
        batches(
            &st.insert_reading,
            "INSERT INTO telemetry",
            by_partition.into_values(),
            JobValues::Readings,
            &mut jobs,
        );
        batches(
            &st.update_latest,
            "UPDATE device_latest",
            latest.into_values(),
            JobValues::Latest,
            &mut jobs,
        );
        let seen: Vec<Vec<LastSeenValues>> = last_seen
            .into_iter()
            .map(|(d, at)| vec![(at.saturating_mul(1000), ts(at), d.to_string())])
            .collect();
        batches(
            &st.update_last_seen,
            "UPDATE device_latest SET last_seen",
            seen,
            JobValues::LastSeen,
            &mut jobs,
        );

        let mut events: HashMap<(&DeviceId, i64), Vec<EventValues>> = HashMap::new();
        let mut by_kind: HashMap<(&DeviceId, &str, i64), Vec<EventByKindValues>> = HashMap::new();
        for e in &batch.events {
            let day = day_of(e.ts);
            let attrs = attrs_to_cql(&e.attrs)?;
            index.insert((e.device.to_string(), "events".to_string(), day));
            index.insert((e.device.to_string(), format!("events:{}", e.kind), day));
            events.entry((&e.device, day)).or_default().push((
                e.device.to_string(),
                cql_date(day),
                ts(e.ts),
                e.seq as i64,
                ts(e.received_at),
                e.kind.clone(),
                attrs.clone(),
                ttl,
            ));
            by_kind.entry((&e.device, &e.kind, day)).or_default().push((
                e.device.to_string(),
                e.kind.clone(),
                cql_date(day),
                ts(e.ts),
                e.seq as i64,
                ts(e.received_at),
                attrs,
                ttl,
            ));
        }
        batches(
            &st.insert_event,
            "INSERT INTO events",
            events.into_values(),
            JobValues::Events,
            &mut jobs,
        );
        batches(
            &st.insert_event_by_kind,
            "INSERT INTO events_by_kind",
            by_kind.into_values(),
            JobValues::EventsByKind,
            &mut jobs,
        );

        let mut dead: HashMap<i64, Vec<DeadLetterValues>> = HashMap::new();
        for d in &batch.dead_letters {
            let day = day_of(d.received_at);
            index.insert((
                DEAD_LETTER_OWNER.to_string(),
                "dead_letters".to_string(),
                day,
            ));
            dead.entry(day).or_default().push((
                cql_date(day),
                ts(d.received_at),
                d.id as i64,
                d.topic.clone(),
                d.device.as_ref().map(DeviceId::to_string),
                d.payload.clone(),
                d.reason.clone(),
                ttl,
            ));
        }
        batches(
            &st.insert_dead_letter,
            "INSERT INTO dead_letters",
            dead.into_values(),
            JobValues::DeadLetters,
            &mut jobs,
        );

        // Each index entry is its own partition, so each is its own request.
        let entries: Vec<Vec<PartitionValues>> = self
            .new_partitions(index)
            .into_iter()
            .map(|p| vec![p])
            .collect();
        batches(
            &st.insert_partition,
            "INSERT INTO partitions",
            entries,
            JobValues::Partitions,
            &mut jobs,
        );
        Ok(jobs)
    }

    async fn run_job(&self, job: &Job) -> Result<()> {
        let Job::Batch {
            batch,
            values,
            statement,
        } = job;
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        let mut attempt = 1;
        loop {
            let result = match values {
                JobValues::Readings(v) => self.session.batch(batch, v).await,
                JobValues::Events(v) => self.session.batch(batch, v).await,
                JobValues::EventsByKind(v) => self.session.batch(batch, v).await,
                JobValues::Latest(v) => self.session.batch(batch, v).await,
                JobValues::LastSeen(v) => self.session.batch(batch, v).await,
                JobValues::Partitions(v) => self.session.batch(batch, v).await,
                JobValues::DeadLetters(v) => self.session.batch(batch, v).await,
                JobValues::Alerts(v) => self.session.batch(batch, v).await,
                JobValues::FleetMembers(v) => self.session.batch(batch, v).await,
                JobValues::AlertFamilies(v) => self.session.batch(batch, v).await,
                JobValues::FleetFlags(v) => self.session.batch(batch, v).await,
            };
            match result.map_err(|e| classify(statement, e)) {
                Ok(_) => return Ok(()),
                Err(e) if e.is_retryable() && attempt < self.options.write_attempts => {
                    tracing::debug!(error = %e, attempt, "retrying a ScyllaDB write");
                    tokio::time::sleep(backoff.next_delay()).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Days holding rows of `(owner, stream)` within a range, in query order.
    async fn days(
        &self,
        owner: &str,
        stream: &str,
        range: &TimeRange,
        order: Order,
    ) -> Result<Vec<i64>> {
        let lo = range.since.map_or(i64::from(i32::MIN), day_of);
        let hi = range.until.map_or(i64::from(i32::MAX), |u| day_of(u - 1));
        let stmt = match order {
            Order::NewestFirst => &self.st.days_desc,
            Order::OldestFirst => &self.st.days_asc,
        };
        let values = (owner, stream, cql_date(lo), cql_date(hi));
        self.session
            .execute_iter(stmt.clone(), values)
            .await
            .map_err(|e| StorageError::Unavailable(Cause::new("SELECT day FROM partitions", e)))?
            .rows_stream::<(CqlDate,)>()
            .map_err(|e| StorageError::Fatal(Cause::new("SELECT day FROM partitions", e)))?
            .map_ok(|(d,)| from_cql_date(d))
            .try_collect()
            .await
            .map_err(|e| StorageError::Unavailable(Cause::new("SELECT day FROM partitions", e)))
    }

    /// Pages through day partitions in order, resuming at a cursor, with the driver's paging state
    /// inside a day. Only rows `keep` accepts count towards the page.
    #[allow(clippy::too_many_arguments)]
    async fn page_days<R, T, V>(
        &self,
        query: u64,
        days: Vec<i64>,
        stmt: &PreparedStatement,
        values: impl Fn(CqlDate) -> V,
        page: &PageRequest,
        decode: impl Fn(R) -> Result<T>,
        keep: impl Fn(&T) -> bool,
    ) -> Result<Page<T>>
    where
        R: for<'f, 'm> DeserializeRow<'f, 'm>,
        V: SerializeRow,
    {
        if page.limit == 0 {
            return Err(StorageError::InvalidRequest(
                "limit must be at least 1".into(),
            ));
        }
        let (mut index, mut paging) = match &page.cursor {
            None => (0, PagingState::start()),
            Some(c) => {
                let c = decode_day_cursor(query, c)?;
                // Days newer (or older) than the cursor's were already returned.
                match days.iter().position(|d| *d == c.day) {
                    Some(i) => (i, c.paging),
                    None => (days.len(), PagingState::start()),
                }
            }
        };
        let mut items = Vec::new();
        while index < days.len() {
            let mut stmt = stmt.clone();
            stmt.set_page_size((page.limit - items.len()).clamp(1, 5000) as i32);
            let (result, next) = self
                .session
                .execute_single_page(&stmt, values(cql_date(days[index])), paging)
                .await
                .map_err(|e| classify(stmt.get_statement(), e))?;
            let rows = result
                .into_rows_result()
                .map_err(|e| StorageError::Fatal(Cause::new(stmt.get_statement(), e)))?;
            for row in rows
                .rows::<R>()
                .map_err(|e| StorageError::Fatal(Cause::new(stmt.get_statement(), e)))?
            {
                let row =
                    row.map_err(|e| StorageError::Fatal(Cause::new(stmt.get_statement(), e)))?;
                let item = decode(row)?;
                if keep(&item) {
                    items.push(item);
                }
            }
            match next {
                PagingStateResponse::HasMorePages { state } => {
                    if items.len() >= page.limit {
                        let cursor = DayCursor {
                            day: days[index],
                            paging: state,
                        };
                        return Ok(Page {
                            items,
                            next_cursor: Some(encode_day_cursor(query, &cursor)),
                        });
                    }
                    paging = state;
                }
                PagingStateResponse::NoMorePages => {
                    index += 1;
                    paging = PagingState::start();
                    if items.len() >= page.limit {
                        let next_cursor = days.get(index).map(|&day| {
                            encode_day_cursor(
                                query,
                                &DayCursor {
                                    day,
                                    paging: PagingState::start(),
                                },
                            )
                        });
                        return Ok(Page { items, next_cursor });
                    }
                }
            }
        }
        Ok(Page {
            items,
            next_cursor: None,
        })
    }
}

fn bounds(range: &TimeRange) -> (CqlTimestamp, CqlTimestamp) {
    (
        ts(range.since.unwrap_or(i64::MIN)),
        ts(range.until.unwrap_or(i64::MAX)),
    )
}

fn order_byte(order: Order) -> &'static [u8] {
    match order {
        Order::NewestFirst => b"n",
        Order::OldestFirst => b"o",
    }
}

#[async_trait]
impl Storage for ScyllaStorage {
    async fn write_batch(&self, batch: &Batch) -> Result<()> {
        self.check_open()?;
        if batch.is_empty() {
            return Ok(());
        }
        let inner = &self.inner;
        let mut jobs = inner.jobs(batch)?;
        let changed_shards = inner.fleet_jobs(batch, &mut jobs);
        let requests: Vec<futures::future::BoxFuture<'_, Result<()>>> = jobs
            .iter()
            .map(|job| Box::pin(inner.run_job(job)) as _)
            .collect();
        let result = futures::stream::iter(requests)
            .buffer_unordered(inner.options.max_in_flight)
            .try_collect::<Vec<()>>()
            .await;
        if result.is_err() {
            // Index entries and fleet rows of a failed batch may not have been written; write
            // them again next time.
            inner.forget_partitions();
            inner.forget_fleet_flags();
        } else if !changed_shards.is_empty() {
            lock(&inner.dirty_shards).extend(changed_shards);
        }
        result.map(|_| ())
    }

    async fn device(&self, device: &DeviceId) -> Result<Option<DeviceState>> {
        self.check_open()?;
        let st = &self.inner.st.latest;
        let rows = self
            .inner
            .session
            .execute_unpaged(st, (device.as_str(),))
            .await
            .map_err(|e| classify(st.get_statement(), e))?
            .into_rows_result()
            .map_err(|e| StorageError::Fatal(Cause::new("device_latest", e)))?;
        match rows
            .maybe_first_row::<LatestRow>()
            .map_err(|e| StorageError::Fatal(Cause::new("device_latest", e)))?
        {
            // A row with only last_seen (its readings not yet written) is not a device yet.
            Some(row) if row.1.is_some() => Ok(Some(latest_from_row(row)?)),
            _ => Ok(None),
        }
    }

    async fn fleet(&self, query: &FleetQuery) -> Result<Page<DeviceState>> {
        self.check_open()?;
        if query.page.limit == 0 {
            return Err(StorageError::InvalidRequest(
                "limit must be at least 1".into(),
            ));
        }
        let inner = &self.inner;
        inner
            .token_scan(
                &inner.st.fleet,
                b'F',
                "the fleet listing",
                &query.page,
                |row: LatestRow| row.1.is_some().then(|| latest_from_row(row)).transpose(),
            )
            .await
    }

    async fn fleet_counts(&self) -> Result<FleetCounts> {
        self.check_open()?;
        let shards = self.inner.shard_counts().await?;
        Ok(FleetCounts {
            total: shards.iter().map(|(d, _, _)| *d).sum::<i64>().max(0) as u64,
            low_battery: shards.iter().map(|(_, l, _)| *l).sum::<i64>().max(0) as u64,
        })
    }

    async fn report_node(&self, node: &str, connected: u64, ttl_ms: Millis) -> Result<()> {
        self.check_open()?;
        let st = &self.inner.st.report_node;
        let ttl = i32::try_from((ttl_ms / 1000).max(1)).unwrap_or(i32::MAX);
        self.inner
            .session
            .execute_unpaged(st, (node, connected as i64, ttl))
            .await
            .map_err(|e| classify(st.get_statement(), e))?;
        Ok(())
    }

    async fn connected_devices(&self) -> Result<u64> {
        self.check_open()?;
        let nodes = self.inner.live_nodes().await?;
        Ok(nodes.iter().map(|(_, c)| *c).sum::<i64>().max(0) as u64)
    }

    async fn put_connections(&self, connections: &[Connection]) -> Result<()> {
        self.check_open()?;
        let st = &self.inner.st.put_connection;
        let session = &self.inner.session;
        // Built in a loop, not a closure: the futures borrow `connections` for the whole call.
        let mut writes: Vec<futures::future::BoxFuture<'_, Result<()>>> = Vec::new();
        for c in connections {
            writes.push(Box::pin(async move {
                session
                    .execute_unpaged(
                        st,
                        (
                            c.device.as_str(),
                            c.node.as_str(),
                            c.connected,
                            ts(c.at),
                            c.at.saturating_mul(1000),
                        ),
                    )
                    .await
                    .map(|_| ())
                    .map_err(|e| classify(st.get_statement(), e))
            }));
        }
        futures::stream::iter(writes)
            .buffer_unordered(self.inner.options.max_in_flight)
            .try_collect::<Vec<()>>()
            .await
            .map(|_| ())
    }

    async fn connections(&self, devices: &[DeviceId]) -> Result<Vec<Connection>> {
        self.check_open()?;
        if devices.is_empty() {
            return Ok(Vec::new());
        }
        let live: HashSet<String> = self
            .inner
            .live_nodes()
            .await?
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let st = &self.inner.st.connections;
        let ids: Vec<&str> = devices.iter().map(DeviceId::as_str).collect();
        let rows = self
            .inner
            .session
            .execute_unpaged(st, (ids,))
            .await
            .map_err(|e| classify(st.get_statement(), e))?
            .into_rows_result()
            .map_err(|e| StorageError::Fatal(Cause::new("device_connections", e)))?;
        let mut by_device: HashMap<DeviceId, Vec<Connection>> = HashMap::new();
        for row in rows
            .rows::<(String, String, Option<bool>, Option<CqlTimestamp>)>()
            .map_err(|e| StorageError::Fatal(Cause::new("device_connections", e)))?
        {
            let (device, node, connected, at) =
                row.map_err(|e| StorageError::Fatal(Cause::new("device_connections", e)))?;
            let Ok(device) = DeviceId::new(device) else {
                continue;
            };
            by_device
                .entry(device.clone())
                .or_default()
                .push(Connection {
                    device,
                    node,
                    connected: connected.unwrap_or(false),
                    at: at.map_or(0, |t| t.0),
                });
        }
        Ok(by_device
            .into_values()
            .filter_map(|rows| Connection::resolve(rows, |n| live.contains(n)))
            .collect())
    }

    async fn telemetry(&self, q: &TelemetryQuery) -> Result<Page<Reading>> {
        self.check_open()?;
        let inner = &self.inner;
        let days = inner
            .days(q.device.as_str(), "telemetry", &q.range, q.order)
            .await?;
        let stmt = match q.order {
            Order::NewestFirst => &inner.st.telemetry_desc,
            Order::OldestFirst => &inner.st.telemetry_asc,
        };
        let id = fingerprint(&[
            b"telemetry",
            q.device.as_str().as_bytes(),
            order_byte(q.order),
        ]);
        let (since, until) = bounds(&q.range);
        let device = q.device.as_str();
        inner
            .page_days(
                id,
                days,
                stmt,
                |day| (device, day, since, until),
                &q.page,
                reading_from_row,
                |_| true,
            )
            .await
    }

    async fn events(&self, q: &EventQuery) -> Result<Page<Event>> {
        self.check_open()?;
        let inner = &self.inner;
        let (since, until) = bounds(&q.range);
        let device = q.device.as_str();
        match &q.kind {
            None => {
                let days = inner.days(device, "events", &q.range, q.order).await?;
                let stmt = match q.order {
                    Order::NewestFirst => &inner.st.events_desc,
                    Order::OldestFirst => &inner.st.events_asc,
                };
                let id = fingerprint(&[b"events", device.as_bytes(), order_byte(q.order)]);
                inner
                    .page_days(
                        id,
                        days,
                        stmt,
                        |day| (device, day, since, until),
                        &q.page,
                        event_from_row,
                        |_| true,
                    )
                    .await
            }
            Some(kind) => {
                let days = inner
                    .days(device, &format!("events:{kind}"), &q.range, q.order)
                    .await?;
                let stmt = match q.order {
                    Order::NewestFirst => &inner.st.events_kind_desc,
                    Order::OldestFirst => &inner.st.events_kind_asc,
                };
                let id = fingerprint(&[
                    b"events",
                    device.as_bytes(),
                    kind.as_bytes(),
                    order_byte(q.order),
                ]);
                let kind = kind.as_str();
                inner
                    .page_days(
                        id,
                        days,
                        stmt,
                        |day| (device, kind, day, since, until),
                        &q.page,
                        event_from_row,
                        |_| true,
                    )
                    .await
            }
        }
    }

    async fn dead_letters(&self, q: &DeadLetterQuery) -> Result<Page<DeadLetter>> {
        self.check_open()?;
        let inner = &self.inner;
        let days = inner
            .days(
                DEAD_LETTER_OWNER,
                "dead_letters",
                &q.range,
                Order::NewestFirst,
            )
            .await?;
        let device = q.device.as_ref().map(DeviceId::as_str).unwrap_or("");
        let id = fingerprint(&[b"dead_letters", device.as_bytes()]);
        let (since, until) = bounds(&q.range);
        inner
            .page_days(
                id,
                days,
                &inner.st.dead_letters,
                |day| (day, since, until),
                &q.page,
                dead_letter_from_row,
                |d: &DeadLetter| q.accepts(d),
            )
            .await
    }

    async fn put_alerts(&self, alerts: &[Alert]) -> Result<()> {
        self.check_open()?;
        let inner = &self.inner;
        let mut by_day: HashMap<i64, Vec<AlertValues>> = HashMap::new();
        let mut index = HashSet::new();
        for a in alerts {
            let day = day_of(a.raised_at);
            index.insert((DEAD_LETTER_OWNER.to_string(), "alerts".to_string(), day));
            by_day.entry(day).or_default().push((
                cql_date(day),
                ts(a.raised_at),
                a.id.clone(),
                a.device.to_string(),
                a.rule.clone(),
                a.state.as_str(),
                a.severity.clone(),
                a.message.clone(),
                a.value,
                a.threshold,
                a.acked_at.map(ts),
                a.acked_by.clone(),
                a.cleared_at.map(ts),
            ));
        }
        let mut families: HashMap<(&str, i64), Vec<(String, CqlDate, CqlTimestamp, String)>> =
            HashMap::new();
        for a in alerts {
            let (family, day) = (Alert::family(&a.rule), day_of(a.raised_at));
            families.entry((family, day)).or_default().push((
                family.to_string(),
                cql_date(day),
                ts(a.raised_at),
                a.id.clone(),
            ));
        }
        let mut jobs = Vec::new();
        batches(
            &inner.st.insert_alert,
            "INSERT INTO alerts",
            by_day.into_values(),
            JobValues::Alerts,
            &mut jobs,
        );
        batches(
            &inner.st.insert_alert_family,
            "INSERT INTO alerts_by_family",
            families.into_values(),
            JobValues::AlertFamilies,
            &mut jobs,
        );
        let entries: Vec<Vec<PartitionValues>> = inner
            .new_partitions(index)
            .into_iter()
            .map(|p| vec![p])
            .collect();
        batches(
            &inner.st.insert_partition,
            "INSERT INTO partitions",
            entries,
            JobValues::Partitions,
            &mut jobs,
        );
        for job in &jobs {
            if let Err(e) = inner.run_job(job).await {
                inner.forget_partitions();
                return Err(e);
            }
        }
        Ok(())
    }

    async fn alert_counts(&self, q: &AlertCountQuery) -> Result<Vec<AlertCount>> {
        self.check_open()?;
        if q.until <= q.since {
            return Ok(Vec::new());
        }
        let inner = &self.inner;
        let mut tally = AlertTally::default();
        for day in day_of(q.since)..=day_of(q.until - 1) {
            let mut rows = inner
                .session
                .execute_iter(
                    inner.st.alerts_of_family.clone(),
                    (q.family.as_str(), cql_date(day), ts(q.since), ts(q.until)),
                )
                .await
                .map_err(|e| StorageError::Unavailable(Cause::new("alerts_by_family", e)))?
                .rows_stream::<(String,)>()
                .map_err(|e| StorageError::Fatal(Cause::new("alerts_by_family", e)))?;
            while let Some(row) = rows.next().await {
                let (id,) =
                    row.map_err(|e| StorageError::Unavailable(Cause::new("alerts_by_family", e)))?;
                tally.add(q, &id)?;
            }
        }
        Ok(tally.counts())
    }

    async fn alert(&self, id: &str) -> Result<Option<Alert>> {
        self.check_open()?;
        let Some((_, _, raised_at)) = Alert::parse_id(id) else {
            return Ok(None);
        };
        let st = &self.inner.st.alert;
        let rows = self
            .inner
            .session
            .execute_unpaged(st, (cql_date(day_of(raised_at)), ts(raised_at), id))
            .await
            .map_err(|e| classify(st.get_statement(), e))?
            .into_rows_result()
            .map_err(|e| StorageError::Fatal(Cause::new("alerts", e)))?;
        rows.maybe_first_row::<AlertRow>()
            .map_err(|e| StorageError::Fatal(Cause::new("alerts", e)))?
            .map(alert_from_row)
            .transpose()
    }

    async fn alerts(&self, q: &AlertQuery) -> Result<Page<Alert>> {
        self.check_open()?;
        let inner = &self.inner;
        let days = inner
            .days(DEAD_LETTER_OWNER, "alerts", &q.range, Order::NewestFirst)
            .await?;
        let filters = format!("{:?}{:?}{:?}", q.state, q.device, q.rule);
        let id = fingerprint(&[b"alerts", filters.as_bytes()]);
        let (since, until) = bounds(&q.range);
        inner
            .page_days(
                id,
                days,
                &inner.st.alerts,
                |day| (day, since, until),
                &q.page,
                alert_from_row,
                |a| q.accepts(a),
            )
            .await
    }

    async fn register_device(&self, d: &RegisteredDevice) -> Result<bool> {
        self.check_open()?;
        let st = &self.inner.st.register_device;
        let rows = self
            .inner
            .session
            .execute_unpaged(st, device_values(d)?)
            .await
            .map_err(|e| classify(st.get_statement(), e))?
            .into_rows_result()
            .map_err(|e| StorageError::Fatal(Cause::new("devices", e)))?;
        // A lightweight transaction answers with `[applied]` first, then the existing row.
        let applied = rows
            .maybe_first_row::<scylla::value::Row>()
            .map_err(|e| StorageError::Fatal(Cause::new("devices", e)))?
            .and_then(|row| row.columns.into_iter().next().flatten());
        match applied {
            Some(scylla::value::CqlValue::Boolean(applied)) => Ok(applied),
            other => Err(StorageError::Fatal(
                format!("registering a device: unexpected answer {other:?} to IF NOT EXISTS")
                    .into(),
            )),
        }
    }

    async fn update_device(&self, d: &RegisteredDevice) -> Result<()> {
        self.check_open()?;
        let session = &self.inner.session;
        // The change first: if the record's write then fails, nodes look at an unchanged
        // record, which is harmless; the other order could hide a revocation.
        let st = &self.inner.st.insert_registry_change;
        session
            .execute_unpaged(
                st,
                (
                    d.updated_at.div_euclid(HOUR_MS),
                    ts(d.updated_at),
                    d.id.as_str(),
                ),
            )
            .await
            .map_err(|e| classify(st.get_statement(), e))?;
        let st = &self.inner.st.insert_device;
        session
            .execute_unpaged(st, device_values(d)?)
            .await
            .map_err(|e| classify(st.get_statement(), e))?;
        Ok(())
    }

    async fn registry_changes(&self, since: Millis, limit: usize) -> Result<Vec<RegistryChange>> {
        self.check_open()?;
        let st = &self.inner.st.registry_changes;
        let now = crate::model::now_millis();
        let oldest = since.max(now - RegistryChange::KEPT_MS);
        let mut found = Vec::new();
        // One partition per hour, from the one `since` falls in to the current one (and the
        // next, for a writer whose clock is a little ahead).
        for hour in oldest.div_euclid(HOUR_MS)..=(now + 60_000).div_euclid(HOUR_MS) {
            if found.len() >= limit {
                break;
            }
            let left = i32::try_from(limit - found.len()).unwrap_or(i32::MAX);
            let rows = self
                .inner
                .session
                .execute_unpaged(st, (hour, ts(since), left))
                .await
                .map_err(|e| classify(st.get_statement(), e))?
                .into_rows_result()
                .map_err(|e| StorageError::Fatal(Cause::new("registry_changes", e)))?;
            for row in rows
                .rows::<(CqlTimestamp, String)>()
                .map_err(|e| StorageError::Fatal(Cause::new("registry_changes", e)))?
            {
                let (at, device) =
                    row.map_err(|e| StorageError::Fatal(Cause::new("registry_changes", e)))?;
                let device = DeviceId::new(device).map_err(|e| {
                    StorageError::Fatal(Cause::new("registry_changes holds a bad device id", e))
                })?;
                found.push(RegistryChange { at: at.0, device });
            }
        }
        Ok(found)
    }

    async fn registered_device(&self, id: &DeviceId) -> Result<Option<RegisteredDevice>> {
        self.check_open()?;
        let st = &self.inner.st.registered_device;
        let rows = self
            .inner
            .session
            .execute_unpaged(st, (id.as_str(),))
            .await
            .map_err(|e| classify(st.get_statement(), e))?
            .into_rows_result()
            .map_err(|e| StorageError::Fatal(Cause::new("devices", e)))?;
        rows.maybe_first_row::<DeviceRow>()
            .map_err(|e| StorageError::Fatal(Cause::new("devices", e)))?
            .map(device_from_row)
            .transpose()
    }

    async fn registered_devices(&self, q: &DeviceQuery) -> Result<Page<RegisteredDevice>> {
        self.check_open()?;
        let inner = &self.inner;
        inner
            .token_scan(
                &inner.st.registered_devices,
                b'R',
                "the device registry listing",
                &q.page,
                |row: DeviceRow| {
                    let d = device_from_row(row)?;
                    Ok(q.accepts(&d).then_some(d))
                },
            )
            .await
    }

    async fn put_upload(&self, u: &Upload) -> Result<()> {
        self.check_open()?;
        let session = &self.inner.session;
        let st = &self.inner.st;
        let size = i64::try_from(u.size).map_err(|_| {
            StorageError::InvalidRequest(format!("upload size {} is too large", u.size))
        })?;
        let values = (
            u.device.as_str(),
            ts(u.created_at),
            u.id.as_str(),
            u.kind.as_str(),
            u.content_type.as_str(),
            size,
            u.sha256.as_deref(),
            u.object_key.as_str(),
            u.state.as_str(),
            ts(u.expires_at),
            u.finished_at.map(ts),
            attrs_to_cql(&u.attrs)?,
            attrs_to_cql(&u.meta)?,
            u.error.as_deref(),
        );
        session
            .execute_unpaged(&st.insert_upload, values)
            .await
            .map_err(|e| classify(st.insert_upload.get_statement(), e))?;
        // The row is written before the index changes, so a failure in between leaves at worst
        // an index entry the sweep finds already finished (and deletes) or a pending row the
        // next put indexes again.
        let pending = if u.state == UploadState::Pending {
            &st.insert_pending_upload
        } else {
            &st.delete_pending_upload
        };
        session
            .execute_unpaged(pending, (PENDING_SHARD, ts(u.expires_at), u.id.as_str()))
            .await
            .map_err(|e| classify(pending.get_statement(), e))?;
        Ok(())
    }

    async fn put_alert_states(&self, states: &[(DeviceId, Vec<u8>)]) -> Result<()> {
        self.check_open()?;
        let st = &self.inner.st;
        let session = &self.inner.session;
        // Built in a loop, not a closure: the futures borrow `states` for the whole call.
        let mut writes: Vec<futures::future::BoxFuture<'_, Result<()>>> = Vec::new();
        for (device, state) in states {
            writes.push(if state.is_empty() {
                Box::pin(async move {
                    session
                        .execute_unpaged(&st.delete_alert_state, (device.as_str(),))
                        .await
                        .map(|_| ())
                        .map_err(|e| classify(st.delete_alert_state.get_statement(), e))
                })
            } else {
                Box::pin(async move {
                    session
                        .execute_unpaged(
                            &st.insert_alert_state,
                            (device.as_str(), state.as_slice()),
                        )
                        .await
                        .map(|_| ())
                        .map_err(|e| classify(st.insert_alert_state.get_statement(), e))
                })
            });
        }
        let mut results = futures::stream::iter(writes).buffer_unordered(32);
        while let Some(r) = results.next().await {
            r?;
        }
        Ok(())
    }

    async fn alert_states(&self) -> Result<Vec<(DeviceId, Vec<u8>)>> {
        self.check_open()?;
        let failed = |e: BoxError| StorageError::Unavailable(Cause::new("reading alert_states", e));
        let mut rows = self
            .inner
            .session
            .execute_iter(self.inner.st.alert_states.clone(), ())
            .await
            .map_err(|e| failed(e.into()))?
            .rows_stream::<(String, Vec<u8>)>()
            .map_err(|e| StorageError::Fatal(Cause::new("alert_states", e)))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().await {
            let (id, state) = row.map_err(|e| failed(e.into()))?;
            let device = DeviceId::new(id)
                .map_err(|e| StorageError::Fatal(Cause::new("alert_states", e)))?;
            out.push((device, state));
        }
        Ok(out)
    }

    async fn upload(&self, id: &str) -> Result<Option<Upload>> {
        self.check_open()?;
        let Some((device, created_at)) = Upload::parse_id(id) else {
            return Ok(None);
        };
        let st = &self.inner.st.upload;
        let rows = self
            .inner
            .session
            .execute_unpaged(st, (device.as_str(), ts(created_at), id))
            .await
            .map_err(|e| classify(st.get_statement(), e))?
            .into_rows_result()
            .map_err(|e| StorageError::Fatal(Cause::new("uploads", e)))?;
        rows.maybe_first_row::<UploadRow>()
            .map_err(|e| StorageError::Fatal(Cause::new("uploads", e)))?
            .map(upload_from_row)
            .transpose()
    }

    async fn uploads(&self, q: &UploadQuery) -> Result<Page<Upload>> {
        self.check_open()?;
        let inner = &self.inner;
        let id = fingerprint(&[b"uploads", q.device.as_str().as_bytes()]);
        let device = q.device.as_str();
        // One partition per device: page through it as a single "day".
        inner
            .page_days(
                id,
                vec![0],
                &inner.st.uploads,
                |_| (device,),
                &q.page,
                upload_from_row,
                |_| true,
            )
            .await
    }

    async fn expired_uploads(&self, before: Millis, limit: usize) -> Result<Vec<Upload>> {
        self.check_open()?;
        let st = &self.inner.st.expired_uploads;
        let limit = i32::try_from(limit.max(1)).unwrap_or(i32::MAX);
        let ids: Vec<(String,)> = self
            .inner
            .session
            .execute_unpaged(st, (PENDING_SHARD, ts(before), limit))
            .await
            .map_err(|e| classify(st.get_statement(), e))?
            .into_rows_result()
            .map_err(|e| StorageError::Fatal(Cause::new("uploads_pending", e)))?
            .rows::<(String,)>()
            .map_err(|e| StorageError::Fatal(Cause::new("uploads_pending", e)))?
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| StorageError::Fatal(Cause::new("uploads_pending", e)))?;
        let mut found = Vec::with_capacity(ids.len());
        for (id,) in ids {
            match self.upload(&id).await? {
                Some(u) if u.state == UploadState::Pending => found.push(u),
                // Finished, but the index entry outlived a failed delete: remove it now.
                Some(u) => self.put_upload(&u).await?,
                None => {
                    return Err(StorageError::Fatal(
                        format!("pending upload {id} has no upload row").into(),
                    ))
                }
            }
        }
        Ok(found)
    }

    async fn health(&self) -> Result<()> {
        self.check_open()?;
        let cql = "SELECT release_version FROM system.local";
        self.inner
            .session
            .query_unpaged(cql, ())
            .await
            .map(|_| ())
            .map_err(|e| classify(cql, e))
    }

    async fn close(&self) -> Result<()> {
        // Every write was acknowledged by the cluster at the configured consistency; there is
        // nothing to flush, only further use to refuse.
        self.inner.closed.store(true, Ordering::Release);
        Ok(())
    }
}

/// The node that test suites (the contract suite, end-to-end tests, benchmarks) run against.
pub mod test_node {
    /// Set to `1` when building the tests to have the ones that need a ScyllaDB node compiled as
    /// ignored (`build.rs` of `storage` and `broker`); the project's test command never sets it.
    pub const SKIP_VAR: &str = "MESSINA_SKIP_SCYLLA_TESTS";

    /// `$MESSINA_SCYLLA_NODES` (comma-separated `host:port`), default `127.0.0.1:9042`.
    pub fn nodes() -> Vec<String> {
        std::env::var("MESSINA_SCYLLA_NODES")
            .unwrap_or_else(|_| "127.0.0.1:9042".into())
            .split(',')
            .map(str::to_string)
            .collect()
    }

    /// A session to the test node, as an analyst opens one to read Messina's tables with plain
    /// CQL; panics with [`unreachable`] when the node does not answer.
    pub async fn analyst() -> scylla::client::session::Session {
        scylla::client::session_builder::SessionBuilder::new()
            .known_nodes(nodes())
            .build()
            .await
            .unwrap_or_else(|e| panic!("{}", unreachable(e)))
    }

    /// The `seq` of every reading of `device` on `day` (`YYYY-MM-DD`) in `keyspace`, by plain
    /// CQL; `Err` when the node does not answer the query (yet).
    pub async fn telemetry_seqs(
        session: &scylla::client::session::Session,
        keyspace: &str,
        device: &str,
        day: &str,
    ) -> Result<Vec<u64>, String> {
        use futures::StreamExt;
        let query = format!(
            "SELECT seq FROM {keyspace}.telemetry WHERE device_id = '{device}' AND day = '{day}'"
        );
        let mut rows = session
            .query_iter(query.as_str(), ())
            .await
            .map_err(|e| format!("{query}: {e}"))?
            .rows_stream::<(i64,)>()
            .map_err(|e| format!("{query}: {e}"))?;
        let mut seqs = Vec::new();
        while let Some(row) = rows.next().await {
            seqs.push(row.map_err(|e| format!("{query}: {e}"))?.0 as u64);
        }
        Ok(seqs)
    }

    /// A keyspace name for an end-to-end test, `messina_{purpose}_{pid}`, after dropping the
    /// `messina_{purpose}_*` keyspaces of earlier test processes (runs that failed before
    /// dropping their own). Panics with [`unreachable`] when the node does not answer.
    pub async fn fresh_keyspace(purpose: &str) -> String {
        let session = scylla::client::session_builder::SessionBuilder::new()
            .known_nodes(nodes())
            .build()
            .await
            .unwrap_or_else(|e| panic!("{}", unreachable(e)));
        let prefix = format!("messina_{purpose}_");
        let ours = format!("{prefix}{}", std::process::id());
        let rows = session
            .query_unpaged("SELECT keyspace_name FROM system_schema.keyspaces", ())
            .await
            .unwrap_or_else(|e| panic!("{}", unreachable(e)))
            .into_rows_result()
            .expect("keyspace rows");
        for row in rows.rows::<(String,)>().expect("keyspace names") {
            let (name,) = row.expect("keyspace name");
            if name.starts_with(&prefix) && name != ours {
                let _ = session
                    .query_unpaged(format!("DROP KEYSPACE IF EXISTS {name}"), ())
                    .await;
            }
        }
        ours
    }

    /// What a test says when the node does not answer: how to start one, or how to opt out.
    pub fn unreachable(error: impl std::fmt::Display) -> String {
        format!(
            "cannot reach ScyllaDB/Cassandra at {}: {error}\n\
             start a local node with `scripts/cassandra start` (scripts/test does), point \
             MESSINA_SCYLLA_NODES at one, or set {SKIP_VAR}=1 to skip these tests",
            nodes().join(",")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_splits_into_statements_without_comments() {
        let statements = schema_statements(SCHEMA);
        assert_eq!(statements.len(), 18);
        assert!(statements
            .iter()
            .all(|s| s.starts_with("CREATE TABLE IF NOT EXISTS")));
        assert!(statements.iter().all(|s| !s.contains("--")));
    }

    #[test]
    fn dates_round_trip() {
        for day in [-1_000, -1, 0, 1, 20_415] {
            assert_eq!(from_cql_date(cql_date(day)), day);
        }
        assert_eq!(day_of(-1), -1);
        assert_eq!(day_of(DAY_MS), 1);
    }

    #[test]
    fn attribute_values_round_trip_through_json_text() {
        let attrs = BTreeMap::from([
            ("a".to_string(), AttrValue::Int(12)),
            ("b".to_string(), AttrValue::Float(4.0)),
            ("c".to_string(), AttrValue::Bool(true)),
            ("d".to_string(), AttrValue::Text("12".into())),
        ]);
        assert_eq!(
            attrs_from_cql(Some(attrs_to_cql(&attrs).unwrap())).unwrap(),
            attrs
        );
    }
}
