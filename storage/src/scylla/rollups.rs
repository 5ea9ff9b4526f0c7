//! Aggregate rollups (`rollups`, `rollup_devices`, `rollups_pending`): a device's minute and
//! hour rollups are written with each batch from this node's [`RollupCache`]; the fleet's are
//! settled from `rollup_devices` by a background task, because every node writes into the same
//! fleet minute. Until a fleet minute is settled it is marked in `rollups_pending`, and a fleet
//! query answers it from the devices' rollups, so answers are exact at once.

use super::*;

use crate::model::Aggregate;
use crate::query::AggregateQuery;
use crate::rollup::{
    self, Buckets, DeviceMinuteRow, Loaded, MinutePoints, Need, Point, Resolution, RollupCache,
    RollupRow, Span, Summary, Writes, FLEET, HOUR_MS, MINUTE_MS,
};

/// Device minutes and hours this node's cache keeps.
const CACHE_ENTRIES: usize = 65_536;

/// How often the settler recomputes the fleet minutes marked pending.
const SETTLE_EVERY: Duration = Duration::from_secs(1);

/// Fleet minutes settled at once.
const SETTLE_IN_FLIGHT: usize = 16;

/// Every this many rounds the settler also takes over what other nodes left pending.
const TAKE_OVER_EVERY: u64 = 60;

const SUMMARY_COLS: &str =
    "count, sum, min, max, first_ts, first_seq, first_value, last_ts, last_seq, last_value";

pub(super) struct RollupStatements {
    insert_rollup: PreparedStatement,
    delete_rollup: PreparedStatement,
    rollups: PreparedStatement,
    insert_device: PreparedStatement,
    delete_device: PreparedStatement,
    devices: PreparedStatement,
    mark_pending: PreparedStatement,
    pending_mark: PreparedStatement,
    pending_in: PreparedStatement,
    all_pending: PreparedStatement,
    delete_pending: PreparedStatement,
}

impl RollupStatements {
    pub(super) async fn prepare(session: &Session, ks: &str) -> Result<Self> {
        let prepare = |cql: String| prepare_statement(session, cql);
        Ok(RollupStatements {
            insert_rollup: prepare(format!(
                "INSERT INTO {ks}.rollups (owner, metric, resolution, period, start, {SUMMARY_COLS}) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ? AND TTL ?"
            ))
            .await?,
            delete_rollup: prepare(format!(
                "DELETE FROM {ks}.rollups USING TIMESTAMP ? \
                 WHERE owner = ? AND metric = ? AND resolution = ? AND period = ? AND start = ?"
            ))
            .await?,
            rollups: prepare(format!(
                "SELECT start, {SUMMARY_COLS}, WRITETIME(count) FROM {ks}.rollups \
                 WHERE owner = ? AND metric = ? AND resolution = ? AND period = ? AND start >= ? AND start < ?"
            ))
            .await?,
            insert_device: prepare(format!(
                "INSERT INTO {ks}.rollup_devices (metric, minute, device_id, {SUMMARY_COLS}) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ? AND TTL ?"
            ))
            .await?,
            delete_device: prepare(format!(
                "DELETE FROM {ks}.rollup_devices USING TIMESTAMP ? WHERE metric = ? AND minute = ? AND device_id = ?"
            ))
            .await?,
            devices: prepare(format!(
                "SELECT device_id, {SUMMARY_COLS}, WRITETIME(count) FROM {ks}.rollup_devices WHERE metric = ? AND minute = ?"
            ))
            .await?,
            mark_pending: prepare(format!(
                "INSERT INTO {ks}.rollups_pending (metric, minute, marked) VALUES (?, ?, ?) USING TIMESTAMP ? AND TTL ?"
            ))
            .await?,
            pending_mark: prepare(format!(
                "SELECT WRITETIME(marked) FROM {ks}.rollups_pending WHERE metric = ? AND minute = ?"
            ))
            .await?,
            pending_in: prepare(format!(
                "SELECT minute FROM {ks}.rollups_pending WHERE metric = ? AND minute >= ? AND minute < ?"
            ))
            .await?,
            all_pending: prepare(format!("SELECT metric, minute FROM {ks}.rollups_pending"))
                .await?,
            delete_pending: prepare(format!(
                "DELETE FROM {ks}.rollups_pending USING TIMESTAMP ? WHERE metric = ? AND minute = ?"
            ))
            .await?,
        })
    }
}

/// The rollups state of a connection: this node's cache, and the fleet minutes waiting to be
/// settled.
pub(super) struct RollupState {
    /// Held for a whole batch: the bridge writes one batch at a time, and the cache must see
    /// batches in order.
    cache: tokio::sync::Mutex<RollupCache>,
    pending: Mutex<BTreeSet<(String, Millis)>>,
}

impl RollupState {
    pub(super) fn new() -> Self {
        RollupState {
            cache: tokio::sync::Mutex::new(RollupCache::new(CACHE_ENTRIES, false)),
            pending: Mutex::new(BTreeSet::new()),
        }
    }
}

/// A rollup row as read: its key (start or device id), the summary columns, WRITETIME(count).
type SummaryRow<K> = (
    K,
    i64,
    f64,
    f64,
    f64,
    CqlTimestamp,
    i64,
    f64,
    CqlTimestamp,
    i64,
    f64,
    i64,
);

fn from_row<K>(r: SummaryRow<K>) -> (K, Summary, i64) {
    let summary = Summary {
        count: r.1 as u64,
        sum: r.2,
        min: r.3,
        max: r.4,
        first: Point {
            ts: r.5 .0,
            seq: r.6 as u64,
            value: r.7,
        },
        last: Point {
            ts: r.8 .0,
            seq: r.9 as u64,
            value: r.10,
        },
    };
    (r.0, summary, r.11)
}

/// The summary columns as bound: count, sum, min, max, first and last (ts, seq, value).
#[derive(scylla::SerializeRow)]
#[scylla(flavor = "enforce_order", skip_name_checks)]
struct SummaryValues {
    count: i64,
    sum: f64,
    min: f64,
    max: f64,
    first_ts: CqlTimestamp,
    first_seq: i64,
    first_value: f64,
    last_ts: CqlTimestamp,
    last_seq: i64,
    last_value: f64,
}

impl SummaryValues {
    fn of(s: &Summary) -> Self {
        SummaryValues {
            count: s.count as i64,
            sum: s.sum,
            min: s.min,
            max: s.max,
            first_ts: ts(s.first.ts),
            first_seq: s.first.seq as i64,
            first_value: s.first.value,
            last_ts: ts(s.last.ts),
            last_seq: s.last.seq as i64,
            last_value: s.last.value,
        }
    }
}

/// The values of `INSERT INTO rollups`: the key, the summary, write time and TTL.
#[derive(scylla::SerializeRow)]
#[scylla(flavor = "enforce_order", skip_name_checks)]
struct RollupValues<'a> {
    owner: &'a str,
    metric: &'a str,
    resolution: &'static str,
    period: CqlDate,
    start: CqlTimestamp,
    #[scylla(flatten)]
    summary: SummaryValues,
    timestamp: i64,
    ttl: i32,
}

/// The values of `INSERT INTO rollup_devices`.
#[derive(scylla::SerializeRow)]
#[scylla(flavor = "enforce_order", skip_name_checks)]
struct DeviceValues<'a> {
    metric: &'a str,
    minute: CqlTimestamp,
    device: &'a str,
    #[scylla(flatten)]
    summary: SummaryValues,
    timestamp: i64,
    ttl: i32,
}

/// Now in microseconds: the write time of rollup rows a batch writes.
fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// The partition (`period`) of a rollup: its UTC day for minutes, its month for hours.
fn period_of(resolution: Resolution, start: Millis) -> CqlDate {
    cql_date(match resolution {
        Resolution::Minute => day_of(start),
        Resolution::Hour => rollup::month_of(start),
    })
}

type Request<'a, T> = futures::future::BoxFuture<'a, Result<T>>;

impl Inner {
    /// Loads what the cache misses for a batch's readings. Runs before the batch's rows are
    /// written, so what it reads is the store without the batch.
    pub(super) async fn prepare_rollups(&self, readings: &[Reading]) -> Result<()> {
        if readings.is_empty() {
            return Ok(());
        }
        let mut cache = self.rollups.cache.lock().await;
        loop {
            let needs = cache.needs(readings);
            if needs.is_empty() {
                return Ok(());
            }
            let loads: Vec<Request<'_, (Need, Loaded)>> = needs
                .into_iter()
                .map(|need| {
                    Box::pin(async move {
                        let loaded = self.load(&need).await?;
                        Ok((need, loaded))
                    }) as _
                })
                .collect();
            let loaded: Vec<(Need, Loaded)> = futures::stream::iter(loads)
                .buffer_unordered(self.options.max_in_flight)
                .try_collect()
                .await?;
            for (need, loaded) in loaded {
                cache.fill(need, loaded);
            }
        }
    }

    async fn load(&self, need: &Need) -> Result<Loaded> {
        Ok(match need {
            Need::Minute { device, minute } => Loaded::Minute(MinutePoints::of(
                &self
                    .readings_within_day(device.as_str(), *minute, minute + MINUTE_MS)
                    .await?,
            )),
            Need::Hour {
                owner,
                metric,
                hour,
            } => Loaded::Hour(
                self.rollup_rows(owner, metric, Resolution::Minute, *hour, hour + HOUR_MS)
                    .await?
                    .into_iter()
                    .map(|(start, s, _)| (start, s))
                    .collect(),
            ),
            Need::FleetMinute { metric, minute } => Loaded::FleetMinute(
                self.devices_of_minute(metric, *minute)
                    .await?
                    .into_iter()
                    .map(|(device, s, _)| (device, s))
                    .collect(),
            ),
        })
    }

    /// Writes the rollups of a batch whose rows are stored, then marks the fleet minutes it
    /// changed pending (after the devices' rows, which the settler reads). On failure the cache
    /// is cleared and the batch fails, to be written again.
    pub(super) async fn write_rollups(&self, readings: &[Reading]) -> Result<()> {
        if readings.is_empty() {
            return Ok(());
        }
        let mut cache = self.rollups.cache.lock().await;
        let writes = cache.apply(readings);
        let result = self.store_rollups(&writes).await;
        if result.is_err() {
            cache.clear();
            return result;
        }
        drop(cache);
        lock(&self.rollups.pending).extend(writes.fleet_minutes);
        Ok(())
    }

    async fn store_rollups(&self, writes: &Writes) -> Result<()> {
        let now = now_micros();
        let mut requests: Vec<Request<'_, ()>> = Vec::new();
        for row in &writes.rollups {
            requests.push(Box::pin(self.put_rollup(row, now)));
        }
        for row in &writes.device_minutes {
            requests.push(Box::pin(self.put_device_minute(row, now)));
        }
        futures::stream::iter(requests)
            .buffer_unordered(self.options.max_in_flight)
            .try_collect::<Vec<()>>()
            .await?;
        let marks: Vec<Request<'_, ()>> = writes
            .fleet_minutes
            .iter()
            .map(|(metric, minute)| {
                Box::pin(async move {
                    let values = (
                        metric.as_str(),
                        ts(*minute),
                        ts(now / 1000),
                        now,
                        self.ttl(),
                    );
                    self.unpaged_write(&self.st.rollups.mark_pending, values)
                        .await
                }) as _
            })
            .collect();
        futures::stream::iter(marks)
            .buffer_unordered(self.options.max_in_flight)
            .try_collect::<Vec<()>>()
            .await
            .map(|_| ())
    }

    async fn unpaged_write(&self, st: &PreparedStatement, values: impl SerializeRow) -> Result<()> {
        self.session
            .execute_unpaged(st, values)
            .await
            .map(|_| ())
            .map_err(|e| classify(st.get_statement(), e))
    }

    /// Writes a rollup row at `timestamp`, or deletes it when nothing is left under it.
    async fn put_rollup(&self, row: &RollupRow, timestamp: i64) -> Result<()> {
        let st = &self.st.rollups;
        let period = period_of(row.resolution, row.start);
        match &row.summary {
            Some(s) => {
                let values = RollupValues {
                    owner: &row.owner,
                    metric: &row.metric,
                    resolution: row.resolution.as_str(),
                    period,
                    start: ts(row.start),
                    summary: SummaryValues::of(s),
                    timestamp,
                    ttl: self.ttl(),
                };
                self.unpaged_write(&st.insert_rollup, values).await
            }
            None => {
                let values = (
                    timestamp,
                    row.owner.as_str(),
                    row.metric.as_str(),
                    row.resolution.as_str(),
                    period,
                    ts(row.start),
                );
                self.unpaged_write(&st.delete_rollup, values).await
            }
        }
    }

    async fn put_device_minute(&self, row: &DeviceMinuteRow, timestamp: i64) -> Result<()> {
        let st = &self.st.rollups;
        match &row.summary {
            Some(s) => {
                let values = DeviceValues {
                    metric: &row.metric,
                    minute: ts(row.minute),
                    device: &row.device,
                    summary: SummaryValues::of(s),
                    timestamp,
                    ttl: self.ttl(),
                };
                self.unpaged_write(&st.insert_device, values).await
            }
            None => {
                let values = (
                    timestamp,
                    row.metric.as_str(),
                    ts(row.minute),
                    row.device.as_str(),
                );
                self.unpaged_write(&st.delete_device, values).await
            }
        }
    }

    /// A device's readings in `[since, until)`, which lies inside one day.
    async fn readings_within_day(
        &self,
        device: &str,
        since: Millis,
        until: Millis,
    ) -> Result<Vec<Reading>> {
        let values = (device, cql_date(day_of(since)), ts(since), ts(until));
        let rows: Vec<ReadingRow> = self.all_rows(&self.st.telemetry_asc, values).await?;
        rows.into_iter().map(reading_from_row).collect()
    }

    /// Rollup rows of one series in `[since, until)`, with their write times, oldest first.
    async fn rollup_rows(
        &self,
        owner: &str,
        metric: &str,
        resolution: Resolution,
        since: Millis,
        until: Millis,
    ) -> Result<Vec<(Millis, Summary, i64)>> {
        let reads: Vec<Request<'_, Vec<SummaryRow<CqlTimestamp>>>> =
            rollup::periods(resolution, since, until)
                .into_iter()
                .map(|p| {
                    let values = (
                        owner.to_string(),
                        metric.to_string(),
                        resolution.as_str(),
                        cql_date(p),
                        ts(since),
                        ts(until),
                    );
                    Box::pin(self.all_rows(&self.st.rollups.rollups, values)) as _
                })
                .collect();
        let found: Vec<Vec<SummaryRow<CqlTimestamp>>> = futures::stream::iter(reads)
            .buffered(self.options.max_in_flight)
            .try_collect()
            .await?;
        Ok(found
            .into_iter()
            .flatten()
            .map(from_row)
            .map(|(start, s, w)| (start.0, s, w))
            .collect())
    }

    /// Each device's minute rollup of a metric, with its write time.
    async fn devices_of_minute(
        &self,
        metric: &str,
        minute: Millis,
    ) -> Result<Vec<(String, Summary, i64)>> {
        let rows: Vec<SummaryRow<String>> = self
            .all_rows(&self.st.rollups.devices, (metric, ts(minute)))
            .await?;
        Ok(rows.into_iter().map(from_row).collect())
    }

    /// Recomputes one pending fleet minute from the devices' rollups, then its hour, then
    /// clears the mark, unless it was marked again meanwhile: the delete is at the write time of
    /// the mark read, so a newer mark outlives it, and the minute is settled again.
    ///
    /// Whichever of two settlers of one minute writes last, its answer holds every device row
    /// written before the mark it read, which is all the mark promises. An hour is written at
    /// the time taken just before its minutes are read, so an hour computed from newer minutes
    /// always wins over one computed from older ones (given node clocks kept in step by NTP, as
    /// ScyllaDB's last-write-wins needs anyway).
    async fn settle(&self, metric: &str, minute: Millis) -> Result<()> {
        let st = &self.st.rollups;
        let Some((Some(marked),)) = self
            .first_row::<(Option<i64>,)>(&st.pending_mark, (metric, ts(minute)))
            .await?
        else {
            return Ok(()); // settled by another node
        };
        let devices = self.devices_of_minute(metric, minute).await?;
        let row = RollupRow {
            owner: FLEET.to_string(),
            metric: metric.to_string(),
            resolution: Resolution::Minute,
            start: minute,
            summary: Summary::merge_all(devices.iter().map(|d| &d.1)),
        };
        self.put_rollup(&row, now_micros()).await?;
        let hour = Resolution::Hour.start_of(minute);
        let at = now_micros();
        let minutes = self
            .rollup_rows(FLEET, metric, Resolution::Minute, hour, hour + HOUR_MS)
            .await?;
        let row = RollupRow {
            owner: FLEET.to_string(),
            metric: metric.to_string(),
            resolution: Resolution::Hour,
            start: hour,
            summary: Summary::merge_all(minutes.iter().map(|m| &m.1)),
        };
        self.put_rollup(&row, at).await?;
        self.unpaged_write(&st.delete_pending, (marked, metric, ts(minute)))
            .await
    }

    /// Settles what is pending, several minutes at a time; what fails stays pending for the
    /// next round.
    async fn settle_pending(&self) -> Result<()> {
        let pending = std::mem::take(&mut *lock(&self.rollups.pending));
        let settles: Vec<Request<'_, ()>> = pending
            .into_iter()
            .map(|(metric, minute)| {
                Box::pin(async move {
                    let result = self.settle(&metric, minute).await;
                    if result.is_err() {
                        lock(&self.rollups.pending).insert((metric, minute));
                    }
                    result
                }) as _
            })
            .collect();
        let results: Vec<Result<()>> = futures::stream::iter(settles)
            .buffer_unordered(SETTLE_IN_FLIGHT)
            .collect()
            .await;
        results.into_iter().collect()
    }

    /// The fleet minutes of a metric in `[since, until)` not settled yet.
    async fn pending_minutes(
        &self,
        metric: &str,
        since: Millis,
        until: Millis,
    ) -> Result<BTreeSet<Millis>> {
        let rows: Vec<(CqlTimestamp,)> = self
            .all_rows(
                &self.st.rollups.pending_in,
                (metric, ts(Resolution::Minute.start_of(since)), ts(until)),
            )
            .await?;
        Ok(rows.into_iter().map(|(m,)| m.0).collect())
    }

    /// Aggregates of a device (`Some`) or of the fleet (`None`).
    pub(super) async fn aggregates(
        &self,
        device: Option<&DeviceId>,
        q: &AggregateQuery,
    ) -> Result<Vec<Aggregate>> {
        rollup::check(q)?;
        let owner = device.map_or(FLEET, DeviceId::as_str);
        let metric = q.metric.as_str();
        let mut spans = rollup::plan(q);
        if device.is_none() {
            let pending = self.pending_minutes(metric, q.since, q.until).await?;
            spans = rollup::around_pending(spans, &pending);
        }
        let mut buckets = Buckets::new(q.bucket);
        for span in spans {
            match span {
                Span::Raw { since, until } => {
                    let devices = match device {
                        Some(d) => vec![d.to_string()],
                        // The fleet's devices with this metric in that minute.
                        None => self
                            .devices_of_minute(metric, Resolution::Minute.start_of(since))
                            .await?
                            .into_iter()
                            .map(|r| r.0)
                            .collect(),
                    };
                    let mut reads: Vec<Request<'_, Vec<Reading>>> = Vec::new();
                    for d in &devices {
                        reads.push(Box::pin(self.readings_within_day(d, since, until)));
                    }
                    let found: Vec<Vec<Reading>> = futures::stream::iter(reads)
                        .buffer_unordered(self.options.max_in_flight)
                        .try_collect()
                        .await?;
                    for r in found.iter().flatten() {
                        buckets.add_reading(r, metric);
                    }
                }
                Span::Rollup {
                    resolution,
                    since,
                    until,
                } => {
                    for (start, s, _) in self
                        .rollup_rows(owner, metric, resolution, since, until)
                        .await?
                    {
                        buckets.add(start, &s);
                    }
                }
                Span::Devices { minute } => {
                    for (_, s, _) in self.devices_of_minute(metric, minute).await? {
                        buckets.add(minute, &s);
                    }
                }
            }
        }
        Ok(buckets.finish())
    }
}

impl ScyllaStorage {
    /// Starts the settler of fleet rollups: it takes over the minutes left pending by any node
    /// (after a crash or a stop), then settles those this node marks, every second.
    pub(super) async fn start_rollup_settler(&self) -> Result<()> {
        let left: Vec<(String, CqlTimestamp)> = self
            .inner
            .small_table(&self.inner.st.rollups.all_pending)
            .await?;
        lock(&self.inner.rollups.pending).extend(left.into_iter().map(|(m, t)| (m, t.0)));
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SETTLE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let (mut round, mut failing) = (0u64, false);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { break };
                if inner.closed.load(Ordering::Acquire) {
                    break;
                }
                round += 1;
                if round.is_multiple_of(TAKE_OVER_EVERY) {
                    // Minutes a node that stopped left pending.
                    if let Ok(left) = inner
                        .small_table::<(String, CqlTimestamp)>(&inner.st.rollups.all_pending)
                        .await
                    {
                        lock(&inner.rollups.pending)
                            .extend(left.into_iter().map(|(m, t)| (m, t.0)));
                    }
                }
                match inner.settle_pending().await {
                    Ok(()) => failing = false,
                    Err(e) => {
                        if !failing {
                            tracing::warn!(error = %e, "cannot settle the fleet's aggregate rollups; fleet aggregates read the devices' rollups until ScyllaDB answers");
                        }
                        failing = true;
                    }
                }
            }
        });
        Ok(())
    }
}
