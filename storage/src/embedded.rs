//! The embedded backend: fjall (an LSM-tree key-value store) on disk inside the Messina process,
//! with the same keys and ordering as the ScyllaDB schema, so both backends answer alike.
//!
//! Keyspaces and keys (integers big-endian; times with the sign bit flipped so they sort):
//! - `telemetry`: `device 0x00 ts seq` → `Reading`
//! - `events`: `device 0x00 ts seq` → `Event`
//! - `device_latest`: `device` → `DeviceState`
//! - `dead_letters`: `received_at id` → `DeadLetter`
//! - `alerts`: `raised_at id` → `Alert`
//! - `alerts_by_family`: `family 0x00 raised_at id` → empty, the alerts of a rule family by time
//! - `uploads`: `device 0x00 created_at id` → `Upload`
//! - `uploads_pending`: `expires_at id` → empty, the pending uploads the expiry sweep looks at
//! - `alert_states`: `device` → the alert engine's encoded state
//! - `devices`: `device` → `RegisteredDevice` (the registry)
//! - `registry_changes`: `updated_at device` → empty, what changed in the registry (a week of it)
//! - `fleet`: `counts` → the fleet's counts and the threshold they were counted at, written in
//!   the same batch as the latest states they count
//! - `connections`: `device 0x00 node` → the device's last `Connection` change on that node
//! - `rollups`: `owner 0x00 len(metric) metric resolution start` → `rollup::Summary`, where
//!   the owner is a device id or `*` for the fleet and the resolution is `m` or `h`
//! - `rollup_devices`: `len(metric) metric minute device` → that device's minute `Summary`,
//!   the devices a fleet minute merges
//!
//! fjall's calls block on disk, so every call runs on tokio's blocking pool.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::model::{
    now_millis, Aggregate, Alert, Batch, Connection, DeadLetter, DeviceId, DeviceState, Event,
    Millis, Reading, Upload, UploadState,
};
use crate::query::{
    low_battery, AggregateQuery, AlertCount, AlertCountQuery, AlertQuery, AlertTally, Cursor,
    DeadLetterQuery, EventQuery, FleetCounts, FleetQuery, Order, Page, PageRequest, TelemetryQuery,
    TimeRange, UploadQuery,
};
use crate::registry::{DeviceQuery, RegisteredDevice, RegistryChange};
use crate::rollup::{
    self, Buckets, Loaded, MinutePoints, Need, Resolution, RollupCache, Span, Summary, FLEET,
    HOUR_MS, MINUTE_MS,
};
use crate::{Cause, Result, Storage, StorageError};

/// Settings of the embedded backend.
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    pub path: PathBuf,
    /// Fsync each batch before `write_batch` returns.
    pub fsync: bool,
    pub cache_bytes: u64,
    /// Devices whose latest battery is below this percentage count as low on battery.
    pub low_battery_percent: f64,
}

impl EmbeddedOptions {
    pub fn new(path: impl AsRef<Path>) -> Self {
        EmbeddedOptions {
            path: path.as_ref().to_path_buf(),
            fsync: true,
            cache_bytes: 64 << 20,
            low_battery_percent: 20.0,
        }
    }
}

/// The embedded backend; cheap to clone.
#[derive(Clone)]
pub struct EmbeddedStorage {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    telemetry: Keyspace,
    events: Keyspace,
    latest: Keyspace,
    dead_letters: Keyspace,
    alerts: Keyspace,
    uploads: Keyspace,
    uploads_pending: Keyspace,
    /// The alert engine's state per device, by device id.
    alert_states: Keyspace,
    /// The device registry, by device id.
    devices: Keyspace,
    /// Registry changes by time, for the nodes' watch of revocations and rotations.
    registry_changes: Keyspace,
    /// The fleet's counts (one key).
    fleet: Keyspace,
    /// Each device's last connection change.
    connections: Keyspace,
    /// Alert ids by rule family and raise time.
    alerts_by_family: Keyspace,
    low_battery_percent: f64,
    /// The counts as last committed; changed under `write_lock`.
    counts: Mutex<FleetCounts>,
    /// Node reports: connected devices, and until when the report holds.
    nodes: Mutex<HashMap<String, (u64, Millis)>>,
    /// Minute and hour rollups of each device and of the fleet.
    rollups: Keyspace,
    /// Each device's minute rollup again, by (metric, minute), for the fleet's minute rollup.
    rollup_devices: Keyspace,
    /// The rollups as stored, so a batch's are computed from what it changes; changed under
    /// `write_lock`.
    rollup_cache: Mutex<RollupCache>,
    fsync: bool,
    closed: AtomicBool,
    /// One writer at a time, because the latest state is read, merged and written back.
    write_lock: Mutex<()>,
}

/// Entries of each kind the rollup cache keeps (device minutes, hours): the minutes and hours
/// being written to, for this many devices.
const ROLLUP_CACHE_ENTRIES: usize = 65_536;

/// Tags the first byte of a cursor with the result set it belongs to.
const CURSOR_TELEMETRY: u8 = b'T';
const CURSOR_EVENTS: u8 = b'E';
const CURSOR_DEAD: u8 = b'D';
const CURSOR_FLEET: u8 = b'F';
const CURSOR_ALERTS: u8 = b'A';
const CURSOR_UPLOADS: u8 = b'U';
const CURSOR_REGISTRY: u8 = b'R';

fn upload_key(device: &DeviceId, created_at: Millis, id: &str) -> Vec<u8> {
    let mut key = with_time(&device_prefix(device), created_at);
    key.extend_from_slice(id.as_bytes());
    key
}

/// `family 0x00 raised_at id`: alerts of a rule family in raise-time order.
fn family_key(family: &str, raised_at: Millis, id: &str) -> Vec<u8> {
    [family.as_bytes(), &[0], &time_key(raised_at), id.as_bytes()].concat()
}

fn alert_key(raised_at: Millis, id: &str) -> Vec<u8> {
    let mut key = time_key(raised_at).to_vec();
    key.extend_from_slice(id.as_bytes());
    key
}

fn metric_prefix(key: &mut Vec<u8>, metric: &str) {
    // Length-prefixed, so no metric name is a prefix of another's keys whatever its bytes.
    let len = u16::try_from(metric.len()).unwrap_or(u16::MAX);
    key.extend_from_slice(&len.to_be_bytes());
    key.extend_from_slice(&metric.as_bytes()[..usize::from(len)]);
}

fn resolution_byte(resolution: Resolution) -> u8 {
    match resolution {
        Resolution::Minute => b'm',
        Resolution::Hour => b'h',
    }
}

/// `owner 0x00 len(metric) metric resolution`, the prefix of one series of rollups.
fn rollup_prefix(owner: &str, metric: &str, resolution: Resolution) -> Vec<u8> {
    let mut key = Vec::with_capacity(owner.len() + metric.len() + 12);
    key.extend_from_slice(owner.as_bytes());
    key.push(0);
    metric_prefix(&mut key, metric);
    key.push(resolution_byte(resolution));
    key
}

fn rollup_key(owner: &str, metric: &str, resolution: Resolution, start: Millis) -> Vec<u8> {
    with_time(&rollup_prefix(owner, metric, resolution), start)
}

/// `len(metric) metric minute`, the devices with a rollup of that minute follow.
fn rollup_devices_prefix(metric: &str, minute: Millis) -> Vec<u8> {
    let mut key = Vec::with_capacity(metric.len() + 10);
    metric_prefix(&mut key, metric);
    key.extend_from_slice(&time_key(minute));
    key
}

fn io(e: fjall::Error) -> StorageError {
    StorageError::Unavailable(Cause::new("embedded store", e))
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    rmp_serde::to_vec_named(value)
        .map_err(|e| StorageError::Fatal(Cause::new("cannot encode a row", e)))
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    rmp_serde::from_slice(bytes)
        .map_err(|e| StorageError::Fatal(Cause::new("stored row does not decode", e)))
}

/// Writes a rollup row, or removes it when nothing is left to summarise.
fn put_summary(
    wb: &mut fjall::OwnedWriteBatch,
    keyspace: &Keyspace,
    key: Vec<u8>,
    summary: Option<Summary>,
) -> Result<()> {
    match summary {
        Some(s) => wb.insert(keyspace, key, encode(&s)?),
        None => wb.remove(keyspace, key),
    }
    Ok(())
}

/// Lower and upper key bounds of a scan.
type KeyBounds = (Bound<Vec<u8>>, Bound<Vec<u8>>);

fn time_key(ts: Millis) -> [u8; 8] {
    ((ts as u64) ^ (1 << 63)).to_be_bytes()
}

fn from_time_key(bytes: &[u8]) -> Option<Millis> {
    let bytes = <[u8; 8]>::try_from(bytes).ok()?;
    Some((u64::from_be_bytes(bytes) ^ (1 << 63)) as Millis)
}

fn device_prefix(device: &DeviceId) -> Vec<u8> {
    let mut key = Vec::with_capacity(device.as_str().len() + 17);
    key.extend_from_slice(device.as_str().as_bytes());
    key.push(0);
    key
}

fn row_key(device: &DeviceId, ts: Millis, seq: u64) -> Vec<u8> {
    let mut key = device_prefix(device);
    key.extend_from_slice(&time_key(ts));
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn with_time(prefix: &[u8], ts: Millis) -> Vec<u8> {
    let mut key = prefix.to_vec();
    key.extend_from_slice(&time_key(ts));
    key
}

/// Key bounds of a half-open time range below a prefix; `prefix` must end in the 0x00 separator,
/// so `prefix` with its last byte raised to 0x01 is past every key of the prefix.
fn time_bounds(prefix: &[u8], range: &TimeRange) -> KeyBounds {
    let lo = match range.since {
        Some(since) => Bound::Included(with_time(prefix, since)),
        None => Bound::Included(prefix.to_vec()),
    };
    let hi = match range.until {
        Some(until) => Bound::Excluded(with_time(prefix, until)),
        None if prefix.is_empty() => Bound::Unbounded,
        None => {
            let mut end = prefix.to_vec();
            *end.last_mut().expect("non-empty prefix") = 1;
            Bound::Excluded(end)
        }
    };
    (lo, hi)
}

/// Narrows bounds to what comes after a cursor in the given order.
fn resume(
    bounds: KeyBounds,
    tag: u8,
    prefix: &[u8],
    order: Order,
    cursor: Option<&Cursor>,
) -> Result<KeyBounds> {
    let Some(cursor) = cursor else {
        return Ok(bounds);
    };
    let key = match cursor.0.split_first() {
        Some((t, key)) if *t == tag && key.starts_with(prefix) && key.len() > prefix.len() => key,
        _ => {
            return Err(StorageError::InvalidRequest(
                "cursor does not belong to this query; start again without a cursor".into(),
            ))
        }
    };
    let at = Bound::Excluded(key.to_vec());
    Ok(match order {
        Order::OldestFirst => (at, bounds.1),
        Order::NewestFirst => (bounds.0, at),
    })
}

fn cursor(tag: u8, key: &[u8]) -> Cursor {
    let mut bytes = Vec::with_capacity(key.len() + 1);
    bytes.push(tag);
    bytes.extend_from_slice(key);
    Cursor(bytes)
}

/// Reads one page of rows between bounds, keeping those `keep` accepts.
fn scan<T: DeserializeOwned>(
    keyspace: &Keyspace,
    bounds: KeyBounds,
    order: Order,
    limit: usize,
    tag: u8,
    keep: impl Fn(&T) -> bool,
) -> Result<Page<T>> {
    if limit == 0 {
        return Err(StorageError::InvalidRequest(
            "limit must be at least 1".into(),
        ));
    }
    let iter = keyspace.range::<Vec<u8>, _>(bounds);
    let iter: Box<dyn Iterator<Item = fjall::Guard>> = match order {
        Order::OldestFirst => Box::new(iter),
        Order::NewestFirst => Box::new(iter.rev()),
    };
    let mut items = Vec::new();
    let mut last_key = None;
    for guard in iter {
        let (key, value) = guard.into_inner().map_err(io)?;
        let item: T = decode(&value)?;
        if !keep(&item) {
            continue;
        }
        if items.len() == limit {
            // One more item exists: the page ends at the previous one.
            let next_cursor = last_key.map(|k: fjall::Slice| cursor(tag, &k));
            return Ok(Page { items, next_cursor });
        }
        items.push(item);
        last_key = Some(key);
    }
    Ok(Page {
        items,
        next_cursor: None,
    })
}

/// One page of a device's rows (telemetry or events) in a time range, resuming at a cursor.
fn device_scan<T: DeserializeOwned>(
    keyspace: &Keyspace,
    tag: u8,
    device: &DeviceId,
    range: &TimeRange,
    order: Order,
    page: &PageRequest,
    keep: impl Fn(&T) -> bool,
) -> Result<Page<T>> {
    let prefix = device_prefix(device);
    let bounds = resume(
        time_bounds(&prefix, range),
        tag,
        &prefix,
        order,
        page.cursor.as_ref(),
    )?;
    scan(keyspace, bounds, order, page.limit, tag, keep)
}

/// One page of a fleet-wide keyspace keyed by time (dead letters, alerts), newest first.
fn newest_scan<T: DeserializeOwned>(
    keyspace: &Keyspace,
    tag: u8,
    range: &TimeRange,
    page: &PageRequest,
    keep: impl Fn(&T) -> bool,
) -> Result<Page<T>> {
    let order = Order::NewestFirst;
    let bounds = resume(
        time_bounds(&[], range),
        tag,
        &[],
        order,
        page.cursor.as_ref(),
    )?;
    scan(keyspace, bounds, order, page.limit, tag, keep)
}

/// Where a listing keyed by device id resumes: after the cursor's id.
fn after_id(page: &PageRequest, tag: u8, what: &str) -> Result<Bound<Vec<u8>>> {
    match &page.cursor {
        None => Ok(Bound::Unbounded),
        Some(c) => match c.0.split_first() {
            Some((t, key)) if *t == tag && !key.is_empty() => Ok(Bound::Excluded(key.to_vec())),
            _ => Err(StorageError::InvalidRequest(format!(
                "cursor does not belong to {what}; start again without a cursor"
            ))),
        },
    }
}

impl EmbeddedStorage {
    /// Opens (creating when missing) the store in `options.path`.
    pub fn open(options: &EmbeddedOptions) -> Result<Self> {
        std::fs::create_dir_all(&options.path).map_err(|e| {
            StorageError::Fatal(Cause::new(
                format!("cannot create data directory {}", options.path.display()),
                e,
            ))
        })?;
        let db = Database::builder(&options.path)
            .cache_size(options.cache_bytes)
            .open()
            .map_err(|e| {
                StorageError::Fatal(
                    format!(
                        "cannot open embedded store in {}: {e} (is another Messina using it?)",
                        options.path.display()
                    )
                    .into(),
                )
            })?;
        let ks = |name: &str| {
            db.keyspace(name, KeyspaceCreateOptions::default)
                .map_err(io)
        };
        let inner = Inner {
            telemetry: ks("telemetry")?,
            events: ks("events")?,
            latest: ks("device_latest")?,
            dead_letters: ks("dead_letters")?,
            alerts: ks("alerts")?,
            uploads: ks("uploads")?,
            uploads_pending: ks("uploads_pending")?,
            alert_states: ks("alert_states")?,
            devices: ks("devices")?,
            registry_changes: ks("registry_changes")?,
            fleet: ks("fleet")?,
            connections: ks("connections")?,
            alerts_by_family: ks("alerts_by_family")?,
            low_battery_percent: options.low_battery_percent,
            counts: Mutex::new(FleetCounts::default()),
            nodes: Mutex::new(HashMap::new()),
            rollups: ks("rollups")?,
            rollup_devices: ks("rollup_devices")?,
            rollup_cache: Mutex::new(RollupCache::new(ROLLUP_CACHE_ENTRIES, true)),
            db,
            fsync: options.fsync,
            closed: AtomicBool::new(false),
            write_lock: Mutex::new(()),
        };
        inner.load_counts()?;
        inner.index_alerts()?;
        Ok(EmbeddedStorage {
            inner: Arc::new(inner),
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let inner = Arc::clone(&self.inner);
        if inner.closed.load(Ordering::Acquire) {
            return Err(StorageError::Fatal("embedded store is closed".into()));
        }
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| StorageError::Fatal(Cause::new("storage task failed", e)))?
    }
}

impl Inner {
    /// A write batch that is fsynced on commit when `fsync` is configured.
    fn batch(&self) -> fjall::OwnedWriteBatch {
        self.db
            .batch()
            .durability(self.fsync.then_some(PersistMode::SyncData))
    }

    /// Reads the saved counts, or counts the fleet once when there are none yet (a store from
    /// before counts were kept) or they were counted at another threshold.
    fn load_counts(&self) -> Result<()> {
        let saved: Option<FleetTally> = match self.fleet.get(FLEET_COUNTS).map_err(io)? {
            Some(bytes) => Some(decode(&bytes)?),
            None => None,
        };
        let counts = match saved {
            Some(t) if t.low_battery_percent == self.low_battery_percent => t.counts,
            _ => {
                let mut counts = FleetCounts::default();
                for guard in self.latest.iter() {
                    let (_, value) = guard.into_inner().map_err(io)?;
                    let state: DeviceState = decode(&value)?;
                    counts.total += 1;
                    counts.low_battery += u64::from(low_battery(&state, self.low_battery_percent));
                }
                let tally = FleetTally {
                    low_battery_percent: self.low_battery_percent,
                    counts,
                };
                let mut wb = self.batch();
                wb.insert(&self.fleet, FLEET_COUNTS, encode(&tally)?);
                wb.commit().map_err(io)?;
                counts
            }
        };
        *self.counts.lock().expect("fleet counts") = counts;
        Ok(())
    }

    /// Indexes the alerts of a store from before the family index, once.
    fn index_alerts(&self) -> Result<()> {
        if !self.alerts_by_family.is_empty().map_err(io)? || self.alerts.is_empty().map_err(io)? {
            return Ok(());
        }
        let mut wb = self.batch();
        for guard in self.alerts.iter() {
            let (_, value) = guard.into_inner().map_err(io)?;
            let a: Alert = decode(&value)?;
            wb.insert(
                &self.alerts_by_family,
                family_key(Alert::family(&a.rule), a.raised_at, &a.id),
                [],
            );
        }
        wb.commit().map_err(io)
    }

    fn write_batch(&self, batch: &Batch) -> Result<()> {
        let _writer = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut wb = self.db.batch();
        // Each device's state before and after the batch.
        let mut states: HashMap<&DeviceId, (Option<bool>, DeviceState)> = HashMap::new();
        for r in &batch.readings {
            wb.insert(&self.telemetry, row_key(&r.device, r.ts, r.seq), encode(r)?);
            match states.get_mut(&r.device) {
                Some((_, state)) => state.apply(r),
                None => {
                    let (was_low, state) = match self.latest.get(r.device.as_str()).map_err(io)? {
                        Some(bytes) => {
                            let mut state: DeviceState = decode(&bytes)?;
                            let was_low = low_battery(&state, self.low_battery_percent);
                            state.apply(r);
                            (Some(was_low), state)
                        }
                        None => (None, DeviceState::from_reading(r)),
                    };
                    states.insert(&r.device, (was_low, state));
                }
            }
        }
        let mut counts = *self.counts.lock().expect("fleet counts");
        for (device, (was_low, state)) in &states {
            wb.insert(&self.latest, device.as_str(), encode(state)?);
            let low = low_battery(state, self.low_battery_percent);
            match *was_low {
                None => {
                    counts.total += 1;
                    counts.low_battery += u64::from(low);
                }
                Some(was) if was != low => {
                    if low {
                        counts.low_battery += 1;
                    } else {
                        counts.low_battery = counts.low_battery.saturating_sub(1);
                    }
                }
                Some(_) => {}
            }
        }
        let tally = FleetTally {
            low_battery_percent: self.low_battery_percent,
            counts,
        };
        if !states.is_empty() {
            wb.insert(&self.fleet, FLEET_COUNTS, encode(&tally)?);
        }
        for e in &batch.events {
            wb.insert(&self.events, row_key(&e.device, e.ts, e.seq), encode(e)?);
        }
        for d in &batch.dead_letters {
            let mut key = time_key(d.received_at).to_vec();
            key.extend_from_slice(&d.id.to_be_bytes());
            wb.insert(&self.dead_letters, key, encode(d)?);
        }
        let mut cache = self.rollup_cache.lock().expect("rollup cache");
        let rollups = self
            .rollup_rows(&mut cache, &batch.readings, &mut wb)
            .and_then(|()| {
                wb.durability(self.fsync.then_some(PersistMode::SyncData))
                    .commit()
                    .map_err(io)
            });
        if rollups.is_err() {
            // Nothing of the batch is stored; the cache already holds it.
            cache.clear();
        }
        rollups?;
        // Committed with the states it counts; in force for readers from now on.
        *self.counts.lock().expect("fleet counts") = counts;
        Ok(())
    }

    /// Adds to `wb` the rollup rows the readings change: the cache is loaded from the store
    /// where it misses, then laid over with the readings (see [`RollupCache`]). Committed with
    /// the rows themselves, so the rollups hold exactly what is stored, also after a crash.
    fn rollup_rows(
        &self,
        cache: &mut RollupCache,
        readings: &[Reading],
        wb: &mut fjall::OwnedWriteBatch,
    ) -> Result<()> {
        loop {
            let needs = cache.needs(readings);
            if needs.is_empty() {
                break;
            }
            for need in needs {
                let loaded = self.load_rollup(&need)?;
                cache.fill(need, loaded);
            }
        }
        let writes = cache.apply(readings);
        for row in writes.rollups {
            let key = rollup_key(&row.owner, &row.metric, row.resolution, row.start);
            put_summary(wb, &self.rollups, key, row.summary)?;
        }
        for row in writes.device_minutes {
            let mut key = rollup_devices_prefix(&row.metric, row.minute);
            key.extend_from_slice(row.device.as_bytes());
            put_summary(wb, &self.rollup_devices, key, row.summary)?;
        }
        Ok(())
    }

    fn load_rollup(&self, need: &Need) -> Result<Loaded> {
        Ok(match need {
            Need::Minute { device, minute } => {
                let range = TimeRange {
                    since: Some(*minute),
                    until: Some(minute + MINUTE_MS),
                };
                let rows = self
                    .telemetry
                    .range::<Vec<u8>, _>(time_bounds(&device_prefix(device), &range))
                    .map(|guard| decode::<Reading>(&guard.value().map_err(io)?))
                    .collect::<Result<Vec<_>>>()?;
                Loaded::Minute(MinutePoints::of(&rows))
            }
            Need::Hour {
                owner,
                metric,
                hour,
            } => {
                let prefix = rollup_prefix(owner, metric, Resolution::Minute);
                let bounds = with_time(&prefix, *hour)..with_time(&prefix, hour + HOUR_MS);
                let mut minutes = BTreeMap::new();
                for guard in self.rollups.range::<Vec<u8>, _>(bounds) {
                    let (key, value) = guard.into_inner().map_err(io)?;
                    let start = from_time_key(&key[prefix.len()..])
                        .ok_or_else(|| StorageError::Fatal("a rollup key is malformed".into()))?;
                    minutes.insert(start, decode(&value)?);
                }
                Loaded::Hour(minutes)
            }
            Need::FleetMinute { metric, minute } => {
                let prefix = rollup_devices_prefix(metric, *minute);
                let mut devices = BTreeMap::new();
                for guard in self.rollup_devices.prefix(&prefix) {
                    let (key, value) = guard.into_inner().map_err(io)?;
                    let device = String::from_utf8(key[prefix.len()..].to_vec()).map_err(|_| {
                        StorageError::Fatal("a rollup_devices key is malformed".into())
                    })?;
                    devices.insert(device, decode(&value)?);
                }
                Loaded::FleetMinute(devices)
            }
        })
    }

    /// Aggregates of a device (`Some`) or of the fleet (`None`).
    fn aggregates(&self, device: Option<&DeviceId>, q: &AggregateQuery) -> Result<Vec<Aggregate>> {
        rollup::check(q)?;
        let mut buckets = Buckets::new(q.bucket);
        for span in rollup::plan(q) {
            match span {
                Span::Raw { since, until } => {
                    let devices = match device {
                        Some(d) => vec![d.clone()],
                        // The fleet's devices with this metric in that minute.
                        None => self.devices_in_minute(&q.metric, since)?,
                    };
                    let range = TimeRange {
                        since: Some(since),
                        until: Some(until),
                    };
                    for d in &devices {
                        let bounds = time_bounds(&device_prefix(d), &range);
                        for guard in self.telemetry.range::<Vec<u8>, _>(bounds) {
                            let r: Reading = decode(&guard.value().map_err(io)?)?;
                            buckets.add_reading(&r, &q.metric);
                        }
                    }
                }
                Span::Rollup {
                    resolution,
                    since,
                    until,
                } => {
                    let owner = device.map_or(FLEET, DeviceId::as_str);
                    let prefix = rollup_prefix(owner, &q.metric, resolution);
                    let bounds = with_time(&prefix, since)..with_time(&prefix, until);
                    for guard in self.rollups.range::<Vec<u8>, _>(bounds) {
                        let (key, value) = guard.into_inner().map_err(io)?;
                        let start = from_time_key(&key[prefix.len()..]).ok_or_else(|| {
                            StorageError::Fatal("a rollup key is malformed".into())
                        })?;
                        buckets.add(start, &decode(&value)?);
                    }
                }
                Span::Devices { minute } => {
                    let prefix = rollup_devices_prefix(&q.metric, minute);
                    for guard in self.rollup_devices.prefix(&prefix) {
                        buckets.add(minute, &decode(&guard.value().map_err(io)?)?);
                    }
                }
            }
        }
        Ok(buckets.finish())
    }

    fn devices_in_minute(&self, metric: &str, ts: Millis) -> Result<Vec<DeviceId>> {
        let prefix = rollup_devices_prefix(metric, Resolution::Minute.start_of(ts));
        self.rollup_devices
            .prefix(&prefix)
            .map(|guard| {
                let key = guard.key().map_err(io)?;
                std::str::from_utf8(&key[prefix.len()..])
                    .ok()
                    .and_then(|id| DeviceId::new(id).ok())
                    .ok_or_else(|| StorageError::Fatal("a rollup_devices key is malformed".into()))
            })
            .collect()
    }

    fn fleet(&self, query: &FleetQuery) -> Result<Page<DeviceState>> {
        let lo = after_id(&query.page, CURSOR_FLEET, "the fleet listing")?;
        scan::<DeviceState>(
            &self.latest,
            (lo, Bound::Unbounded),
            Order::OldestFirst,
            query.page.limit,
            CURSOR_FLEET,
            |_| true,
        )
    }
}

/// The key of the fleet's counts in the `fleet` keyspace.
const FLEET_COUNTS: &[u8] = b"counts";

/// The fleet's counts and the threshold they were counted at.
#[derive(Serialize, serde::Deserialize)]
struct FleetTally {
    low_battery_percent: f64,
    counts: FleetCounts,
}

#[async_trait]
impl Storage for EmbeddedStorage {
    async fn write_batch(&self, batch: &Batch) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let batch = batch.clone();
        self.blocking(move |inner| inner.write_batch(&batch)).await
    }

    async fn device(&self, device: &DeviceId) -> Result<Option<DeviceState>> {
        let device = device.clone();
        self.blocking(
            move |inner| match inner.latest.get(device.as_str()).map_err(io)? {
                Some(bytes) => Ok(Some(decode(&bytes)?)),
                None => Ok(None),
            },
        )
        .await
    }

    async fn fleet(&self, query: &FleetQuery) -> Result<Page<DeviceState>> {
        let query = query.clone();
        self.blocking(move |inner| inner.fleet(&query)).await
    }

    async fn fleet_counts(&self) -> Result<FleetCounts> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(StorageError::Fatal("embedded store is closed".into()));
        }
        Ok(*self.inner.counts.lock().expect("fleet counts"))
    }

    async fn report_node(&self, node: &str, connected: u64, ttl_ms: Millis) -> Result<()> {
        let now = now_millis();
        let mut nodes = self.inner.nodes.lock().expect("node reports");
        nodes.retain(|_, (_, until)| *until > now);
        nodes.insert(node.to_string(), (connected, now + ttl_ms));
        Ok(())
    }

    async fn connected_devices(&self) -> Result<u64> {
        let now = now_millis();
        let nodes = self.inner.nodes.lock().expect("node reports");
        Ok(nodes
            .values()
            .filter(|(_, u)| *u > now)
            .map(|(c, _)| c)
            .sum())
    }

    async fn put_connections(&self, connections: &[Connection]) -> Result<()> {
        let connections = connections.to_vec();
        self.blocking(move |inner| {
            let _writer = inner.write_lock.lock().unwrap_or_else(|p| p.into_inner());
            let mut wb = inner.batch();
            for c in &connections {
                let mut key = device_prefix(&c.device);
                key.extend_from_slice(c.node.as_bytes());
                let newer = match inner.connections.get(&key).map_err(io)? {
                    Some(bytes) => decode::<Connection>(&bytes)?.at <= c.at,
                    None => true,
                };
                if newer {
                    wb.insert(&inner.connections, key, encode(c)?);
                }
            }
            wb.commit().map_err(io)
        })
        .await
    }

    async fn connections(&self, devices: &[DeviceId]) -> Result<Vec<Connection>> {
        let devices = devices.to_vec();
        let now = now_millis();
        let live: HashSet<String> = {
            let nodes = self.inner.nodes.lock().expect("node reports");
            nodes
                .iter()
                .filter(|(_, (_, until))| *until > now)
                .map(|(n, _)| n.clone())
                .collect()
        };
        self.blocking(move |inner| {
            let mut found = Vec::new();
            for d in &devices {
                let mut rows = Vec::new();
                for guard in inner.connections.prefix(device_prefix(d)) {
                    let (_, value) = guard.into_inner().map_err(io)?;
                    rows.push(decode::<Connection>(&value)?);
                }
                found.extend(Connection::resolve(rows, |n| live.contains(n)));
            }
            Ok(found)
        })
        .await
    }

    async fn telemetry(&self, query: &TelemetryQuery) -> Result<Page<Reading>> {
        let q = query.clone();
        self.blocking(move |inner| {
            device_scan(
                &inner.telemetry,
                CURSOR_TELEMETRY,
                &q.device,
                &q.range,
                q.order,
                &q.page,
                |_| true,
            )
        })
        .await
    }

    async fn aggregates(&self, device: &DeviceId, q: &AggregateQuery) -> Result<Vec<Aggregate>> {
        let (device, q) = (device.clone(), q.clone());
        self.blocking(move |inner| inner.aggregates(Some(&device), &q))
            .await
    }

    async fn fleet_aggregates(&self, q: &AggregateQuery) -> Result<Vec<Aggregate>> {
        let q = q.clone();
        self.blocking(move |inner| inner.aggregates(None, &q)).await
    }

    async fn events(&self, query: &EventQuery) -> Result<Page<Event>> {
        let q = query.clone();
        self.blocking(move |inner| {
            device_scan(
                &inner.events,
                CURSOR_EVENTS,
                &q.device,
                &q.range,
                q.order,
                &q.page,
                |e| q.accepts(e),
            )
        })
        .await
    }

    async fn dead_letters(&self, query: &DeadLetterQuery) -> Result<Page<DeadLetter>> {
        let q = query.clone();
        self.blocking(move |inner| {
            newest_scan(
                &inner.dead_letters,
                CURSOR_DEAD,
                &q.range,
                &q.page,
                |d: &DeadLetter| q.accepts(d),
            )
        })
        .await
    }

    async fn put_alerts(&self, alerts: &[Alert]) -> Result<()> {
        if alerts.is_empty() {
            return Ok(());
        }
        let alerts = alerts.to_vec();
        self.blocking(move |inner| {
            let mut wb = inner.batch();
            for a in &alerts {
                wb.insert(&inner.alerts, alert_key(a.raised_at, &a.id), encode(a)?);
                wb.insert(
                    &inner.alerts_by_family,
                    family_key(Alert::family(&a.rule), a.raised_at, &a.id),
                    [],
                );
            }
            wb.commit().map_err(io)
        })
        .await
    }

    async fn alert_counts(&self, query: &AlertCountQuery) -> Result<Vec<AlertCount>> {
        let q = query.clone();
        self.blocking(move |inner| {
            let lo = family_key(&q.family, q.since, "");
            let hi = family_key(&q.family, q.until, "");
            let mut tally = AlertTally::default();
            for guard in inner.alerts_by_family.range(lo..hi) {
                let key = guard.key().map_err(io)?;
                let id = std::str::from_utf8(&key[q.family.len() + 9..]).map_err(|_| {
                    StorageError::Fatal("an alert index entry has a malformed key".into())
                })?;
                tally.add(&q, id)?;
            }
            Ok(tally.counts())
        })
        .await
    }

    async fn alert(&self, id: &str) -> Result<Option<Alert>> {
        let Some((_, _, raised_at)) = Alert::parse_id(id) else {
            return Ok(None);
        };
        let key = alert_key(raised_at, id);
        self.blocking(move |inner| match inner.alerts.get(key).map_err(io)? {
            Some(bytes) => Ok(Some(decode(&bytes)?)),
            None => Ok(None),
        })
        .await
    }

    async fn alerts(&self, query: &AlertQuery) -> Result<Page<Alert>> {
        let q = query.clone();
        self.blocking(move |inner| {
            newest_scan(&inner.alerts, CURSOR_ALERTS, &q.range, &q.page, |a| {
                q.accepts(a)
            })
        })
        .await
    }

    async fn put_alert_states(&self, states: &[(DeviceId, Vec<u8>)]) -> Result<()> {
        let states = states.to_vec();
        self.blocking(move |inner| {
            let mut wb = inner.batch();
            for (device, state) in &states {
                if state.is_empty() {
                    wb.remove(&inner.alert_states, device.as_str().as_bytes());
                } else {
                    wb.insert(
                        &inner.alert_states,
                        device.as_str().as_bytes(),
                        state.as_slice(),
                    );
                }
            }
            wb.commit().map_err(io)
        })
        .await
    }

    async fn alert_states(&self) -> Result<Vec<(DeviceId, Vec<u8>)>> {
        self.blocking(move |inner| {
            let mut out = Vec::new();
            for guard in inner.alert_states.iter() {
                let (k, v) = guard.into_inner().map_err(io)?;
                let id = String::from_utf8(k.to_vec())
                    .ok()
                    .and_then(|s| DeviceId::new(s).ok())
                    .ok_or_else(|| {
                        StorageError::Fatal("a saved alert state has a malformed device id".into())
                    })?;
                out.push((id, v.to_vec()));
            }
            Ok(out)
        })
        .await
    }

    async fn register_device(&self, device: &RegisteredDevice) -> Result<bool> {
        let device = device.clone();
        self.blocking(move |inner| {
            // Check and insert under the writer lock, so two registrations of one id cannot both
            // succeed.
            let _writer = inner.write_lock.lock().unwrap_or_else(|p| p.into_inner());
            let key = device.id.as_str().as_bytes();
            if inner.devices.contains_key(key).map_err(io)? {
                return Ok(false);
            }
            let mut wb = inner.batch();
            wb.insert(&inner.devices, key, encode(&device)?);
            wb.commit().map_err(io)?;
            Ok(true)
        })
        .await
    }

    async fn update_device(&self, device: &RegisteredDevice) -> Result<()> {
        let device = device.clone();
        self.blocking(move |inner| {
            let _writer = inner.write_lock.lock().unwrap_or_else(|p| p.into_inner());
            let mut wb = inner.batch();
            wb.insert(
                &inner.devices,
                device.id.as_str().as_bytes(),
                encode(&device)?,
            );
            wb.insert(
                &inner.registry_changes,
                [
                    &time_key(device.updated_at)[..],
                    device.id.as_str().as_bytes(),
                ]
                .concat(),
                [],
            );
            // Changes older than a week go, a few at a time, as new ones come.
            let expired = ..time_key(device.updated_at - RegistryChange::KEPT_MS).to_vec();
            for guard in inner.registry_changes.range::<Vec<u8>, _>(expired).take(16) {
                wb.remove(&inner.registry_changes, guard.key().map_err(io)?);
            }
            wb.commit().map_err(io)
        })
        .await
    }

    async fn registry_changes(&self, since: Millis, limit: usize) -> Result<Vec<RegistryChange>> {
        self.blocking(move |inner| {
            let mut found = Vec::new();
            let range = time_key(since).to_vec()..;
            for guard in inner
                .registry_changes
                .range::<Vec<u8>, _>(range)
                .take(limit)
            {
                let key = guard.key().map_err(io)?;
                let (at, device) = key.split_at(8.min(key.len()));
                let device = std::str::from_utf8(device)
                    .ok()
                    .and_then(|s| DeviceId::new(s).ok());
                match (from_time_key(at), device) {
                    (Some(at), Some(device)) => found.push(RegistryChange { at, device }),
                    _ => {
                        return Err(StorageError::Fatal(
                            "a registry change has a malformed key".into(),
                        ))
                    }
                }
            }
            Ok(found)
        })
        .await
    }

    async fn registered_device(&self, id: &DeviceId) -> Result<Option<RegisteredDevice>> {
        let id = id.clone();
        self.blocking(
            move |inner| match inner.devices.get(id.as_str()).map_err(io)? {
                Some(bytes) => Ok(Some(decode(&bytes)?)),
                None => Ok(None),
            },
        )
        .await
    }

    async fn registered_devices(&self, query: &DeviceQuery) -> Result<Page<RegisteredDevice>> {
        let query = query.clone();
        self.blocking(move |inner| {
            let lo = after_id(&query.page, CURSOR_REGISTRY, "the device registry listing")?;
            scan(
                &inner.devices,
                (lo, Bound::Unbounded),
                Order::OldestFirst,
                query.page.limit,
                CURSOR_REGISTRY,
                |d| query.accepts(d),
            )
        })
        .await
    }

    async fn put_upload(&self, upload: &Upload) -> Result<()> {
        let upload = upload.clone();
        self.blocking(move |inner| {
            let mut wb = inner.batch();
            let key = upload_key(&upload.device, upload.created_at, &upload.id);
            wb.insert(&inner.uploads, key, encode(&upload)?);
            // The pending index holds only uploads the sweep may still have to expire.
            let pending = alert_key(upload.expires_at, &upload.id);
            if upload.state == UploadState::Pending {
                wb.insert(&inner.uploads_pending, pending, []);
            } else {
                wb.remove(&inner.uploads_pending, pending);
            }
            wb.commit().map_err(io)
        })
        .await
    }

    async fn upload(&self, id: &str) -> Result<Option<Upload>> {
        let Some((device, created_at)) = Upload::parse_id(id) else {
            return Ok(None);
        };
        let key = upload_key(&device, created_at, id);
        self.blocking(move |inner| match inner.uploads.get(key).map_err(io)? {
            Some(bytes) => Ok(Some(decode(&bytes)?)),
            None => Ok(None),
        })
        .await
    }

    async fn uploads(&self, query: &UploadQuery) -> Result<Page<Upload>> {
        let q = query.clone();
        self.blocking(move |inner| {
            device_scan(
                &inner.uploads,
                CURSOR_UPLOADS,
                &q.device,
                &TimeRange::default(),
                Order::NewestFirst,
                &q.page,
                |_: &Upload| true,
            )
        })
        .await
    }

    async fn expired_uploads(&self, before: Millis, limit: usize) -> Result<Vec<Upload>> {
        self.blocking(move |inner| {
            let mut found = Vec::new();
            let range = ..time_key(before).to_vec();
            for guard in inner.uploads_pending.range::<Vec<u8>, _>(range).take(limit) {
                let key = guard.key().map_err(io)?;
                let id = std::str::from_utf8(&key[8..])
                    .map_err(|e| StorageError::Fatal(Cause::new("pending upload key", e)))?;
                let Some((device, created_at)) = Upload::parse_id(id) else {
                    return Err(StorageError::Fatal(
                        format!("pending upload key holds {id:?}, not an upload id").into(),
                    ));
                };
                match inner
                    .uploads
                    .get(upload_key(&device, created_at, id))
                    .map_err(io)?
                {
                    Some(bytes) => found.push(decode(&bytes)?),
                    None => {
                        return Err(StorageError::Fatal(
                            format!("pending upload {id} has no upload row").into(),
                        ))
                    }
                }
            }
            Ok(found)
        })
        .await
    }

    async fn health(&self) -> Result<()> {
        // A point read touches the journal, memtables and tables, which is what must work.
        self.blocking(|inner| inner.latest.get([0xff]).map(|_| ()).map_err(io))
            .await
    }

    async fn close(&self) -> Result<()> {
        let result = self
            .blocking(|inner| inner.db.persist(PersistMode::SyncAll).map_err(io))
            .await;
        self.inner.closed.store(true, Ordering::Release);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_keys_sort_like_times() {
        let times = [i64::MIN, -5, -1, 0, 1, 1_700_000_000_000, i64::MAX];
        for w in times.windows(2) {
            assert!(time_key(w[0]) < time_key(w[1]), "{} < {}", w[0], w[1]);
        }
    }

    #[test]
    fn device_prefixes_do_not_overlap() {
        // "a" must not scan into "a.b" or "ab": the 0x00 separator sorts below every id byte.
        let a = device_prefix(&DeviceId::new("a").unwrap());
        let ab = row_key(&DeviceId::new("ab").unwrap(), 0, 0);
        let (lo, hi) = time_bounds(&a, &TimeRange::default());
        let inside = |k: &Vec<u8>| {
            matches!(&lo, Bound::Included(l) if k >= l)
                && matches!(&hi, Bound::Excluded(h) if k < h)
        };
        assert!(!inside(&ab));
        assert!(inside(&row_key(
            &DeviceId::new("a").unwrap(),
            i64::MAX,
            u64::MAX
        )));
    }
}
