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
use scylla::response::query_result::QueryRowsResult;
use scylla::response::{PagingState, PagingStateResponse};
use scylla::serialize::row::SerializeRow;
use scylla::statement::batch::{Batch as CqlBatch, BatchType};
use scylla::statement::prepared::PreparedStatement;
pub use scylla::statement::Consistency;
use scylla::value::{CqlDate, CqlTimestamp, MaybeUnset};

use crate::backoff::Backoff;
use crate::model::{
    Aggregate, Alert, AlertState, AttrValue, Batch, Connection, DeadLetter, DeviceId, DeviceState,
    Event, Millis, Reading, Stamped, Upload, UploadState,
};
use crate::query::{
    AggregateQuery, AlertCount, AlertCountQuery, AlertQuery, AlertTally, Cursor, DeadLetterQuery,
    EventQuery, FleetCounts, FleetQuery, Order, Page, PageRequest, TelemetryQuery, TimeRange,
    UploadQuery,
};
use crate::registry::{Credential, DeviceQuery, RegisteredDevice, RegistryChange};
use crate::{BoxError, Cause, Result, Storage, StorageError};

mod alerts;
mod dead_letters;
mod fleet;
mod readings;
mod registry;
mod rollups;
mod statements;
mod uploads;
mod write;

use self::alerts::*;
use self::dead_letters::*;
use self::fleet::*;
use self::readings::*;
use self::registry::*;
use self::rollups::*;
use self::statements::*;
use self::uploads::*;
use self::write::*;

/// The schema applied at start; see the file for the tables.
pub const SCHEMA: &str = include_str!("../../schema.cql");
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

/// The ScyllaDB backend; cheap to clone.
#[derive(Clone)]
pub struct ScyllaStorage {
    inner: Arc<Inner>,
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
    rollups: RollupState,
    closed: AtomicBool,
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

fn device_id(id: String) -> Result<DeviceId> {
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
                rollups: RollupState::new(),
                closed: AtomicBool::new(false),
            }),
        };
        storage.start_fleet_upkeep().await?;
        storage.start_rollup_settler().await?;
        Ok(storage)
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

    /// The whole answer of one unpaged execution of `st`: a lookup by key or a small table.
    async fn unpaged(
        &self,
        st: &PreparedStatement,
        values: impl SerializeRow,
    ) -> Result<QueryRowsResult> {
        self.session
            .execute_unpaged(st, values)
            .await
            .map_err(|e| classify(st.get_statement(), e))?
            .into_rows_result()
            .map_err(|e| StorageError::Fatal(Cause::new(st.get_statement(), e)))
    }

    /// The first row `st` answers with, if any: a lookup by primary key.
    async fn first_row<R>(
        &self,
        st: &PreparedStatement,
        values: impl SerializeRow,
    ) -> Result<Option<R>>
    where
        R: for<'f, 'm> DeserializeRow<'f, 'm>,
    {
        self.unpaged(st, values)
            .await?
            .maybe_first_row::<R>()
            .map_err(|e| StorageError::Fatal(Cause::new(st.get_statement(), e)))
    }

    /// Every row of an unpaged query on a small table (tens of rows: fleet shards, nodes).
    async fn small_table<R>(&self, st: &PreparedStatement) -> Result<Vec<R>>
    where
        R: for<'f, 'm> DeserializeRow<'f, 'm>,
    {
        self.all_rows(st, ()).await
    }

    /// Every row of one unpaged execution of `st`, for answers known to be small (a small
    /// table, a minute of one device, an hour of rollups).
    async fn all_rows<R>(&self, st: &PreparedStatement, values: impl SerializeRow) -> Result<Vec<R>>
    where
        R: for<'f, 'm> DeserializeRow<'f, 'm>,
    {
        let fatal = |e: BoxError| StorageError::Fatal(Cause::new(st.get_statement(), e));
        let rows = self.unpaged(st, values).await?;
        rows.rows::<R>()
            .map_err(|e| fatal(e.into()))?
            .map(|row| row.map_err(|e| fatal(e.into())))
            .collect()
    }

    fn ttl(&self) -> i32 {
        self.options.ttl_seconds
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
        write::write_batch(self, batch).await
    }

    async fn device(&self, device: &DeviceId) -> Result<Option<DeviceState>> {
        fleet::device(self, device).await
    }

    async fn fleet(&self, query: &FleetQuery) -> Result<Page<DeviceState>> {
        fleet::fleet(self, query).await
    }

    async fn fleet_counts(&self) -> Result<FleetCounts> {
        fleet::fleet_counts(self).await
    }

    async fn report_node(&self, node: &str, connected: u64, ttl_ms: Millis) -> Result<()> {
        fleet::report_node(self, node, connected, ttl_ms).await
    }

    async fn connected_devices(&self) -> Result<u64> {
        fleet::connected_devices(self).await
    }

    async fn put_connections(&self, connections: &[Connection]) -> Result<()> {
        fleet::put_connections(self, connections).await
    }

    async fn connections(&self, devices: &[DeviceId]) -> Result<Vec<Connection>> {
        fleet::connections(self, devices).await
    }

    async fn telemetry(&self, q: &TelemetryQuery) -> Result<Page<Reading>> {
        readings::telemetry(self, q).await
    }

    async fn aggregates(&self, device: &DeviceId, q: &AggregateQuery) -> Result<Vec<Aggregate>> {
        self.check_open()?;
        self.inner.aggregates(Some(device), q).await
    }

    async fn fleet_aggregates(&self, q: &AggregateQuery) -> Result<Vec<Aggregate>> {
        self.check_open()?;
        self.inner.aggregates(None, q).await
    }

    async fn events(&self, q: &EventQuery) -> Result<Page<Event>> {
        readings::events(self, q).await
    }

    async fn dead_letters(&self, q: &DeadLetterQuery) -> Result<Page<DeadLetter>> {
        dead_letters::dead_letters(self, q).await
    }

    async fn put_alerts(&self, alerts: &[Alert]) -> Result<()> {
        alerts::put_alerts(self, alerts).await
    }

    async fn alert_counts(&self, q: &AlertCountQuery) -> Result<Vec<AlertCount>> {
        alerts::alert_counts(self, q).await
    }

    async fn alert(&self, id: &str) -> Result<Option<Alert>> {
        alerts::alert(self, id).await
    }

    async fn alerts(&self, q: &AlertQuery) -> Result<Page<Alert>> {
        alerts::alerts(self, q).await
    }

    async fn register_device(&self, d: &RegisteredDevice) -> Result<bool> {
        registry::register_device(self, d).await
    }

    async fn update_device(&self, d: &RegisteredDevice) -> Result<()> {
        registry::update_device(self, d).await
    }

    async fn registry_changes(&self, since: Millis, limit: usize) -> Result<Vec<RegistryChange>> {
        registry::registry_changes(self, since, limit).await
    }

    async fn registered_device(&self, id: &DeviceId) -> Result<Option<RegisteredDevice>> {
        registry::registered_device(self, id).await
    }

    async fn registered_devices(&self, q: &DeviceQuery) -> Result<Page<RegisteredDevice>> {
        registry::registered_devices(self, q).await
    }

    async fn put_upload(&self, u: &Upload) -> Result<()> {
        uploads::put_upload(self, u).await
    }

    async fn put_alert_states(&self, states: &[(DeviceId, Vec<u8>)]) -> Result<()> {
        alerts::put_alert_states(self, states).await
    }

    async fn alert_states(&self) -> Result<Vec<(DeviceId, Vec<u8>)>> {
        alerts::alert_states(self).await
    }

    async fn upload(&self, id: &str) -> Result<Option<Upload>> {
        uploads::upload(self, id).await
    }

    async fn uploads(&self, q: &UploadQuery) -> Result<Page<Upload>> {
        uploads::uploads(self, q).await
    }

    async fn expired_uploads(&self, before: Millis, limit: usize) -> Result<Vec<Upload>> {
        uploads::expired_uploads(self, before, limit).await
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
        assert_eq!(statements.len(), 21);
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
