//! Latest state and the fleet: `device_latest`, the fleet counts kept in `fleet_devices` and
//! `fleet_counts` (sharded, recounted in the background), live `nodes` and
//! `device_connections`.

use super::*;

/// Shards of `fleet_devices` and `fleet_counts`.
pub(super) const FLEET_SHARDS: i32 = 64;

/// Devices whose last written fleet flag this process remembers before it forgets them all.
pub(super) const FLEET_FLAGS_KEPT: usize = 1_000_000;

/// A device's shard: FNV-1a of its id, so every node agrees.
pub(super) fn fleet_shard(device: &DeviceId) -> i32 {
    let mut hash: u32 = 0x811c_9dc5;
    for b in device.as_str().bytes() {
        hash = (hash ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    (hash % FLEET_SHARDS as u32) as i32
}

pub(super) type LatestRow = (
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

pub(super) const LATEST_COLUMNS: &str =
    "device_id, ts, seq, last_seen, battery, WRITETIME(battery), rssi, \
     WRITETIME(rssi), online, WRITETIME(online), metrics";

pub(super) fn stamped<T>(value: Option<T>, writetime: Option<i64>) -> Option<Stamped<T>> {
    Some(Stamped {
        value: value?,
        ts: writetime?.div_euclid(1000),
    })
}

pub(super) fn latest_from_row(r: LatestRow) -> Result<DeviceState> {
    Ok(DeviceState {
        device: device_id(r.0)?,
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

pub(super) type LatestValues = (
    i64,
    CqlTimestamp,
    i64,
    MaybeUnset<f64>,
    MaybeUnset<i32>,
    MaybeUnset<bool>,
    MaybeUnset<BTreeMap<String, (f64, CqlTimestamp)>>,
    String,
);

pub(super) type LastSeenValues = (i64, CqlTimestamp, String);

pub(super) async fn device(
    store: &ScyllaStorage,
    device: &DeviceId,
) -> Result<Option<DeviceState>> {
    store.check_open()?;
    let latest = store
        .inner
        .first_row::<LatestRow>(&store.inner.st.latest, (device.as_str(),))
        .await?;
    match latest {
        // A row with only last_seen (its readings not yet written) is not a device yet.
        Some(row) if row.1.is_some() => Ok(Some(latest_from_row(row)?)),
        _ => Ok(None),
    }
}

pub(super) async fn fleet(store: &ScyllaStorage, query: &FleetQuery) -> Result<Page<DeviceState>> {
    store.check_open()?;
    if query.page.limit == 0 {
        return Err(StorageError::InvalidRequest(
            "limit must be at least 1".into(),
        ));
    }
    let inner = &store.inner;
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

pub(super) async fn fleet_counts(store: &ScyllaStorage) -> Result<FleetCounts> {
    store.check_open()?;
    let shards = store.inner.shard_counts().await?;
    Ok(FleetCounts {
        total: shards.iter().map(|(d, _, _)| *d).sum::<i64>().max(0) as u64,
        low_battery: shards.iter().map(|(_, l, _)| *l).sum::<i64>().max(0) as u64,
    })
}

pub(super) async fn report_node(
    store: &ScyllaStorage,
    node: &str,
    connected: u64,
    ttl_ms: Millis,
) -> Result<()> {
    store.check_open()?;
    let st = &store.inner.st.report_node;
    let ttl = i32::try_from((ttl_ms / 1000).max(1)).unwrap_or(i32::MAX);
    store
        .inner
        .session
        .execute_unpaged(st, (node, connected as i64, ttl))
        .await
        .map_err(|e| classify(st.get_statement(), e))?;
    Ok(())
}

pub(super) async fn connected_devices(store: &ScyllaStorage) -> Result<u64> {
    store.check_open()?;
    let nodes = store.inner.live_nodes().await?;
    Ok(nodes.iter().map(|(_, c)| *c).sum::<i64>().max(0) as u64)
}

pub(super) async fn put_connections(
    store: &ScyllaStorage,
    connections: &[Connection],
) -> Result<()> {
    store.check_open()?;
    let st = &store.inner.st.put_connection;
    let session = &store.inner.session;
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
        .buffer_unordered(store.inner.options.max_in_flight)
        .try_collect::<Vec<()>>()
        .await
        .map(|_| ())
}

pub(super) async fn connections(
    store: &ScyllaStorage,
    devices: &[DeviceId],
) -> Result<Vec<Connection>> {
    store.check_open()?;
    if devices.is_empty() {
        return Ok(Vec::new());
    }
    let live: HashSet<String> = store
        .inner
        .live_nodes()
        .await?
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let st = &store.inner.st.connections;
    let ids: Vec<&str> = devices.iter().map(DeviceId::as_str).collect();
    let rows = store
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

impl ScyllaStorage {
    /// Counts the fleet from `device_latest` when its counts are missing or were made at
    /// another threshold, then keeps them: the shards changed by written batches are recounted
    /// every second, and every shard in turn every few minutes (repairing what a crash between
    /// a write and its recount, or a flag another node wrote, left behind).
    pub(super) async fn start_fleet_upkeep(&self) -> Result<()> {
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
}

impl Inner {
    pub(super) fn forget_fleet_flags(&self) {
        lock(&self.fleet_flags).clear();
    }

    /// The `fleet_devices` writes of a batch: each device's newest battery flag (always, so a
    /// flag another node wrote is corrected), and the row itself when this process has not
    /// written it yet. Returns the shards whose counts may change (a new device, a flag that
    /// crosses the threshold), to recount once the batch is written.
    pub(super) fn fleet_jobs(&self, batch: &Batch, jobs: &mut Vec<Job>) -> Vec<i32> {
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
    pub(super) async fn recount_shard(&self, shard: i32) -> Result<()> {
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
    pub(super) async fn rebuild_fleet(&self) -> Result<u64> {
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
    pub(super) async fn shard_counts(&self) -> Result<Vec<(i64, i64, Option<f64>)>> {
        let rows = self
            .small_table::<(Option<i64>, Option<i64>, Option<f64>)>(&self.st.fleet_counts)
            .await?;
        Ok(rows
            .into_iter()
            .map(|(d, l, t)| (d.unwrap_or(0), l.unwrap_or(0), t))
            .collect())
    }

    /// The nodes whose reports hold, with their connected devices.
    pub(super) async fn live_nodes(&self) -> Result<Vec<(String, i64)>> {
        let rows = self
            .small_table::<(String, Option<i64>)>(&self.st.nodes)
            .await?;
        Ok(rows.into_iter().map(|(n, c)| (n, c.unwrap_or(0))).collect())
    }
}
