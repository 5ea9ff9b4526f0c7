//! Time-bucket aggregates: the summaries both backends keep at ingest (per minute and per hour,
//! per device and for the fleet), how a query's range is split into pieces answered from the
//! coarsest summaries that fit (raw readings only at sub-minute edges), and how pieces are merged
//! into buckets. Backends only store and fetch; the arithmetic is here, once.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::Hash;

use serde::{Deserialize, Serialize};

use crate::model::{Aggregate, DeviceId, Millis, Reading};
use crate::query::{AggregateQuery, Bucket};
use crate::StorageError;

pub const MINUTE_MS: Millis = 60_000;
pub const HOUR_MS: Millis = 3_600_000;
pub const DAY_MS: Millis = 86_400_000;

/// The owner of fleet rollups, where a device id stands for a device's own; device ids cannot
/// contain `*`.
pub const FLEET: &str = "*";

/// The resolutions rollups are kept at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resolution {
    Minute,
    Hour,
}

impl Resolution {
    pub fn millis(self) -> Millis {
        match self {
            Resolution::Minute => MINUTE_MS,
            Resolution::Hour => HOUR_MS,
        }
    }

    /// `minute` or `hour`, as the ScyllaDB `rollups.resolution` column holds it.
    pub fn as_str(self) -> &'static str {
        match self {
            Resolution::Minute => "minute",
            Resolution::Hour => "hour",
        }
    }

    pub fn start_of(self, ts: Millis) -> Millis {
        ts - ts.rem_euclid(self.millis())
    }
}

/// Days since the epoch of the first day of the UTC month holding `ts`: the partition of an
/// hour rollup in ScyllaDB.
pub fn month_of(ts: Millis) -> i64 {
    const EPOCH_JULIAN_DAY: i64 = 2_440_588;
    let day = ts.div_euclid(DAY_MS);
    let date = i32::try_from(day + EPOCH_JULIAN_DAY)
        .ok()
        .and_then(|d| time::Date::from_julian_day(d).ok());
    match date.and_then(|d| d.replace_day(1).ok()) {
        Some(first) => i64::from(first.to_julian_day()) - EPOCH_JULIAN_DAY,
        // Beyond the calendar `time` knows: one partition per day, still correct.
        None => day,
    }
}

/// The partitions (days since the epoch: a UTC day for minutes, a month's first day for hours)
/// that hold rollups of a resolution in `[since, until)`, oldest first.
pub fn periods(resolution: Resolution, since: Millis, until: Millis) -> Vec<i64> {
    if since >= until {
        return Vec::new();
    }
    let last = (until - 1).div_euclid(DAY_MS);
    match resolution {
        Resolution::Minute => (since.div_euclid(DAY_MS)..=last).collect(),
        Resolution::Hour => {
            let mut out = vec![month_of(since)];
            loop {
                let next = month_of((out[out.len() - 1] + 32) * DAY_MS);
                if next > last || next <= out[out.len() - 1] {
                    return out;
                }
                out.push(next);
            }
        }
    }
}

/// One value of a metric and where it sits in time order.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Point {
    pub ts: Millis,
    pub seq: u64,
    pub value: f64,
}

impl Point {
    /// The order `first` and `last` follow: device time, then seq, then value, so readings of
    /// several devices at one device time order alike in every backend.
    fn order(&self, other: &Point) -> Ordering {
        self.ts
            .cmp(&other.ts)
            .then(self.seq.cmp(&other.seq))
            .then(self.value.total_cmp(&other.value))
    }
}

/// Count, sum, min, max, first and last of a metric over some readings; what a rollup row holds.
/// Summaries merge, so a bucket is the merge of the summaries of its pieces.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    pub first: Point,
    pub last: Point,
}

impl Summary {
    pub fn of(p: Point) -> Self {
        Summary {
            count: 1,
            sum: p.value,
            min: p.value,
            max: p.value,
            first: p,
            last: p,
        }
    }

    pub fn merge(&mut self, o: &Summary) {
        self.count += o.count;
        self.sum += o.sum;
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
        if o.first.order(&self.first) == Ordering::Less {
            self.first = o.first;
        }
        if o.last.order(&self.last) == Ordering::Greater {
            self.last = o.last;
        }
    }

    /// The merge of summaries, `None` when there are none.
    pub fn merge_all<'a>(summaries: impl IntoIterator<Item = &'a Summary>) -> Option<Summary> {
        let mut iter = summaries.into_iter();
        let mut total = *iter.next()?;
        for s in iter {
            total.merge(s);
        }
        Some(total)
    }

    fn aggregate(&self, start: Millis) -> Aggregate {
        Aggregate {
            start,
            count: self.count,
            min: self.min,
            max: self.max,
            avg: self.sum / self.count as f64,
            sum: self.sum,
            first: self.first.value,
            last: self.last.value,
        }
    }
}

/// The numeric values of one reading, by metric name.
type Values = Vec<(String, f64)>;

/// The readings of one device minute as stored, by `(ts, seq)`, so a redelivered reading replaces
/// itself and a changed one replaces its old values; with their summaries, kept up to date as
/// readings arrive (recomputed from the points only when a reading changes values).
#[derive(Debug, Default, Clone)]
pub struct MinutePoints {
    points: BTreeMap<(Millis, u64), Values>,
    summaries: BTreeMap<String, Summary>,
}

impl MinutePoints {
    pub fn of<'a>(readings: impl IntoIterator<Item = &'a Reading>) -> Self {
        let mut points = MinutePoints::default();
        for r in readings {
            points.put(r);
        }
        points
    }

    fn put(&mut self, r: &Reading) {
        let values: Values = r
            .numeric_metrics()
            .into_iter()
            .map(|(name, v)| (name.to_string(), v))
            .collect();
        match self.points.insert((r.ts, r.seq), values) {
            None => {
                let values = &self.points[&(r.ts, r.seq)];
                for (name, value) in values {
                    let s = Summary::of(Point {
                        ts: r.ts,
                        seq: r.seq,
                        value: *value,
                    });
                    match self.summaries.get_mut(name) {
                        Some(total) => total.merge(&s),
                        None => {
                            self.summaries.insert(name.clone(), s);
                        }
                    }
                }
            }
            Some(old) if old == self.points[&(r.ts, r.seq)] => {}
            // Changed values: min and max cannot be taken back, so count again.
            Some(_) => self.summaries = self.recount(),
        }
    }

    fn recount(&self) -> BTreeMap<String, Summary> {
        let mut out: BTreeMap<String, Summary> = BTreeMap::new();
        for (&(ts, seq), values) in &self.points {
            for (name, value) in values {
                let s = Summary::of(Point {
                    ts,
                    seq,
                    value: *value,
                });
                match out.get_mut(name) {
                    Some(total) => total.merge(&s),
                    None => {
                        out.insert(name.clone(), s);
                    }
                }
            }
        }
        out
    }

    /// The summary of every metric the minute's readings carry.
    fn summaries(&self) -> &BTreeMap<String, Summary> {
        &self.summaries
    }

    fn metrics(&self) -> impl Iterator<Item = &str> {
        self.summaries.keys().map(String::as_str)
    }
}

/// A map that keeps its most recently used entries.
#[derive(Debug)]
struct Lru<K, V> {
    map: HashMap<K, (u64, V)>,
    tick: u64,
    capacity: usize,
}

impl<K: Eq + Hash + Clone, V> Lru<K, V> {
    fn new(capacity: usize) -> Self {
        Lru {
            map: HashMap::new(),
            tick: 0,
            capacity: capacity.max(1),
        }
    }

    fn contains(&self, k: &K) -> bool {
        self.map.contains_key(k)
    }

    fn get_mut(&mut self, k: &K) -> Option<&mut V> {
        self.tick += 1;
        let tick = self.tick;
        self.map.get_mut(k).map(|(used, v)| {
            *used = tick;
            v
        })
    }

    fn insert(&mut self, k: K, v: V) {
        self.tick += 1;
        self.map.insert(k, (self.tick, v));
    }

    /// Drops the least recently used quarter once over capacity, so eviction costs O(1) per
    /// insert over time.
    fn evict(&mut self) {
        if self.map.len() <= self.capacity {
            return;
        }
        let mut ticks: Vec<u64> = self.map.values().map(|(t, _)| *t).collect();
        let keep = self.capacity * 3 / 4;
        let cut = ticks.len() - keep;
        let (_, nth, _) = ticks.select_nth_unstable(cut - 1);
        let oldest_kept = *nth;
        self.map.retain(|_, (t, _)| *t > oldest_kept);
    }

    fn clear(&mut self) {
        self.map.clear();
    }
}

/// What [`RollupCache::apply`] needs loaded from the store before it can run.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Need {
    /// The stored readings of a device minute: fill with [`Loaded::Minute`].
    Minute { device: DeviceId, minute: Millis },
    /// The stored minute rollups of one hour of a series (a device's, or the fleet's when the
    /// owner is [`FLEET`]): fill with [`Loaded::Hour`], minute start → summary.
    Hour {
        owner: String,
        metric: String,
        hour: Millis,
    },
    /// Every device's stored minute rollup of a metric's minute: fill with
    /// [`Loaded::FleetMinute`], device id → summary.
    FleetMinute { metric: String, minute: Millis },
}

pub enum Loaded {
    Minute(MinutePoints),
    Hour(BTreeMap<Millis, Summary>),
    FleetMinute(BTreeMap<String, Summary>),
}

/// One row of the `rollups` table to write: `None` deletes it (nothing is left under it).
#[derive(Debug, Clone, PartialEq)]
pub struct RollupRow {
    pub owner: String,
    pub metric: String,
    pub resolution: Resolution,
    pub start: Millis,
    pub summary: Option<Summary>,
}

/// One row of `rollup_devices` to write: a device's minute rollup, filed by metric and minute.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceMinuteRow {
    pub metric: String,
    pub minute: Millis,
    pub device: String,
    pub summary: Option<Summary>,
}

/// The rollup rows a batch of readings changes.
#[derive(Debug, Default)]
pub struct Writes {
    pub rollups: Vec<RollupRow>,
    pub device_minutes: Vec<DeviceMinuteRow>,
    /// `(metric, minute)` of the fleet rollups left stale, when the cache does not keep the
    /// fleet's: the backend settles them from `rollup_devices`.
    pub fleet_minutes: BTreeSet<(String, Millis)>,
}

/// The rollups one writer keeps at ingest, held as the store holds them: a device minute's
/// readings, the minute summaries of each hour, and (when it keeps the fleet's) each device's
/// summary of a fleet minute. A batch's rollups are then computed in memory from what is stored
/// with the batch laid over it, so a redelivered reading counts once and a late one lands in
/// its own minute, at a cost proportional to the batch, not to what is stored. Every entry is
/// loaded from the store on first use, so a cache evicted, cleared or new after a restart
/// gives the same rows.
///
/// It holds the truth only while its owner is the one writer of what it caches: a backend
/// clears it when a write fails (the store may hold part of the batch).
#[derive(Debug)]
pub struct RollupCache {
    minutes: Lru<(DeviceId, Millis), MinutePoints>,
    hours: Lru<(String, String, Millis), BTreeMap<Millis, Summary>>,
    fleet_minutes: Option<Lru<(String, Millis), BTreeMap<String, Summary>>>,
}

impl RollupCache {
    /// A cache of at most `capacity` entries of each kind; `fleet`: whether it keeps the
    /// fleet's rollups too (only a backend with a single writer may).
    pub fn new(capacity: usize, fleet: bool) -> Self {
        RollupCache {
            minutes: Lru::new(capacity),
            hours: Lru::new(capacity),
            fleet_minutes: fleet.then(|| Lru::new(capacity / 16 + 1)),
        }
    }

    fn by_minute(readings: &[Reading]) -> BTreeMap<(DeviceId, Millis), Vec<&Reading>> {
        let mut out: BTreeMap<(DeviceId, Millis), Vec<&Reading>> = BTreeMap::new();
        for r in readings {
            out.entry((r.device.clone(), Resolution::Minute.start_of(r.ts)))
                .or_default()
                .push(r);
        }
        out
    }

    /// What must be loaded before [`RollupCache::apply`] can run for these readings; call
    /// again after filling it until it returns nothing (device minutes come first, because
    /// which hours are needed depends on the metrics stored in them).
    pub fn needs(&self, readings: &[Reading]) -> Vec<Need> {
        let groups = Self::by_minute(readings);
        let minutes: Vec<Need> = groups
            .keys()
            .filter(|k| !self.minutes.contains(k))
            .map(|(device, minute)| Need::Minute {
                device: device.clone(),
                minute: *minute,
            })
            .collect();
        if !minutes.is_empty() {
            return minutes;
        }
        let mut needs = BTreeSet::new();
        for ((device, minute), batch) in &groups {
            let stored = &self.minutes.map[&(device.clone(), *minute)].1;
            let mut metrics: BTreeSet<&str> = stored.metrics().collect();
            let carried: Vec<BTreeMap<&str, f64>> =
                batch.iter().map(|r| r.numeric_metrics()).collect();
            metrics.extend(carried.iter().flat_map(|m| m.keys().copied()));
            let hour = Resolution::Hour.start_of(*minute);
            for metric in metrics {
                let mut owners = vec![device.as_str()];
                if let Some(fleet) = &self.fleet_minutes {
                    owners.push(FLEET);
                    let key = (metric.to_string(), *minute);
                    if !fleet.contains(&key) {
                        needs.insert(Need::FleetMinute {
                            metric: key.0,
                            minute: key.1,
                        });
                    }
                }
                for owner in owners {
                    let key = (owner.to_string(), metric.to_string(), hour);
                    if !self.hours.contains(&key) {
                        needs.insert(Need::Hour {
                            owner: key.0,
                            metric: key.1,
                            hour,
                        });
                    }
                }
            }
        }
        needs.into_iter().collect()
    }

    /// Fills what [`RollupCache::needs`] asked for.
    pub fn fill(&mut self, need: Need, loaded: Loaded) {
        match (need, loaded) {
            (Need::Minute { device, minute }, Loaded::Minute(points)) => {
                self.minutes.insert((device, minute), points)
            }
            (
                Need::Hour {
                    owner,
                    metric,
                    hour,
                },
                Loaded::Hour(minutes),
            ) => self.hours.insert((owner, metric, hour), minutes),
            (Need::FleetMinute { metric, minute }, Loaded::FleetMinute(devices)) => {
                if let Some(fleet) = &mut self.fleet_minutes {
                    fleet.insert((metric, minute), devices);
                }
            }
            (need, _) => debug_assert!(false, "{need:?} filled with the wrong kind"),
        }
    }

    /// Lays the readings over the cached rollups and returns the rows that changed. Everything
    /// [`RollupCache::needs`] named must be filled.
    pub fn apply(&mut self, readings: &[Reading]) -> Writes {
        let mut writes = Writes::default();
        let mut hours: BTreeSet<(String, String, Millis)> = BTreeSet::new();
        let mut fleet_minutes: BTreeSet<(String, Millis)> = BTreeSet::new();
        for ((device, minute), batch) in Self::by_minute(readings) {
            let key = (device.clone(), minute);
            let Some(points) = self.minutes.get_mut(&key) else {
                debug_assert!(false, "device minute {key:?} not loaded");
                continue;
            };
            let before = points.summaries().clone();
            for r in batch {
                points.put(r);
            }
            let after = points.summaries();
            let metrics: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
            let hour = Resolution::Hour.start_of(minute);
            for metric in metrics {
                let summary = after.get(metric).copied();
                if summary == before.get(metric).copied() {
                    continue;
                }
                writes.rollups.push(RollupRow {
                    owner: device.to_string(),
                    metric: metric.clone(),
                    resolution: Resolution::Minute,
                    start: minute,
                    summary,
                });
                writes.device_minutes.push(DeviceMinuteRow {
                    metric: metric.clone(),
                    minute,
                    device: device.to_string(),
                    summary,
                });
                let hour_key = (device.to_string(), metric.clone(), hour);
                if let Some(h) = self.hours.get_mut(&hour_key) {
                    set(h, minute, summary);
                }
                hours.insert(hour_key);
                match &mut self.fleet_minutes {
                    Some(fleet) => {
                        if let Some(f) = fleet.get_mut(&(metric.clone(), minute)) {
                            set(f, device.to_string(), summary);
                        }
                        fleet_minutes.insert((metric.clone(), minute));
                    }
                    None => {
                        writes.fleet_minutes.insert((metric.clone(), minute));
                    }
                }
            }
        }
        if let Some(fleet) = &mut self.fleet_minutes {
            for (metric, minute) in fleet_minutes {
                let Some(devices) = fleet.get_mut(&(metric.clone(), minute)) else {
                    continue;
                };
                let summary = Summary::merge_all(devices.values());
                writes.rollups.push(RollupRow {
                    owner: FLEET.to_string(),
                    metric: metric.clone(),
                    resolution: Resolution::Minute,
                    start: minute,
                    summary,
                });
                let hour_key = (FLEET.to_string(), metric, Resolution::Hour.start_of(minute));
                if let Some(h) = self.hours.get_mut(&hour_key) {
                    set(h, minute, summary);
                }
                hours.insert(hour_key);
            }
        }
        for key in hours {
            if let Some(minutes) = self.hours.get_mut(&key) {
                let (owner, metric, hour) = key;
                writes.rollups.push(RollupRow {
                    owner,
                    metric,
                    resolution: Resolution::Hour,
                    start: hour,
                    summary: Summary::merge_all(minutes.values()),
                });
            }
        }
        self.minutes.evict();
        self.hours.evict();
        if let Some(fleet) = &mut self.fleet_minutes {
            fleet.evict();
        }
        writes
    }

    /// Forgets everything, after a write that may have stored only part of a batch.
    pub fn clear(&mut self) {
        self.minutes.clear();
        self.hours.clear();
        if let Some(fleet) = &mut self.fleet_minutes {
            fleet.clear();
        }
    }
}

fn set<K: Ord>(map: &mut BTreeMap<K, Summary>, key: K, summary: Option<Summary>) {
    match summary {
        Some(s) => {
            map.insert(key, s);
        }
        None => {
            map.remove(&key);
        }
    }
}

/// A stretch of a query's range answered from one source. A raw span lies inside one minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Span {
    Raw {
        since: Millis,
        until: Millis,
    },
    Rollup {
        resolution: Resolution,
        since: Millis,
        until: Millis,
    },
    /// One fleet minute whose rollup is not settled yet: the merge of every device's.
    Devices {
        minute: Millis,
    },
}

/// Replaces, in a fleet query's plan, each fleet minute still `pending` (its rollup not yet
/// recomputed from the devices') by a [`Span::Devices`], and reads each hour holding one at
/// minute level, so the answer is exact before the fleet rollups settle.
pub fn around_pending(spans: Vec<Span>, pending: &BTreeSet<Millis>) -> Vec<Span> {
    if pending.is_empty() {
        return spans;
    }
    let minutes = |since: Millis, until: Millis, out: &mut Vec<Span>| {
        let mut at = since;
        for &m in pending.range(since..until) {
            if at < m {
                out.push(Span::Rollup {
                    resolution: Resolution::Minute,
                    since: at,
                    until: m,
                });
            }
            out.push(Span::Devices { minute: m });
            at = m + MINUTE_MS;
        }
        if at < until {
            out.push(Span::Rollup {
                resolution: Resolution::Minute,
                since: at,
                until,
            });
        }
    };
    let mut out = Vec::new();
    for span in spans {
        match span {
            Span::Rollup {
                resolution: Resolution::Hour,
                since,
                until,
            } => {
                let mut at = since;
                let hours: BTreeSet<Millis> = pending
                    .range(since..until)
                    .map(|m| Resolution::Hour.start_of(*m))
                    .collect();
                for h in hours {
                    if at < h {
                        out.push(Span::Rollup {
                            resolution: Resolution::Hour,
                            since: at,
                            until: h,
                        });
                    }
                    minutes(h, h + HOUR_MS, &mut out);
                    at = h + HOUR_MS;
                }
                if at < until {
                    out.push(Span::Rollup {
                        resolution: Resolution::Hour,
                        since: at,
                        until,
                    });
                }
            }
            Span::Rollup {
                resolution: Resolution::Minute,
                since,
                until,
            } => minutes(since, until, &mut out),
            other => out.push(other),
        }
    }
    out
}

fn ceil_to(ts: Millis, step: Millis) -> Millis {
    let r = ts.rem_euclid(step);
    if r == 0 {
        ts
    } else {
        ts - r + step
    }
}

fn floor_to(ts: Millis, step: Millis) -> Millis {
    ts - ts.rem_euclid(step)
}

/// Splits `[since, until)` into spans: raw readings for the partial minutes at the edges, hour
/// rollups for whole hours when buckets are an hour or more, minute rollups for the rest. Every
/// rollup row of a span lies inside one bucket, because bucket sizes are multiples of the
/// resolution and aligned alike.
pub fn plan(q: &AggregateQuery) -> Vec<Span> {
    let (since, until) = (q.since, q.until);
    if since >= until {
        return Vec::new();
    }
    let (m0, m1) = (ceil_to(since, MINUTE_MS), floor_to(until, MINUTE_MS));
    if m0 > m1 {
        // Both ends inside one minute.
        return vec![Span::Raw { since, until }];
    }
    let mut spans = Vec::new();
    if since < m0 {
        spans.push(Span::Raw { since, until: m0 });
    }
    if m0 == m1 {
        // Two partial minutes and no whole one between them.
        if m1 < until {
            spans.push(Span::Raw { since: m1, until });
        }
        return spans;
    }
    let minutes = |since, until| Span::Rollup {
        resolution: Resolution::Minute,
        since,
        until,
    };
    let (h0, h1) = (ceil_to(m0, HOUR_MS), floor_to(m1, HOUR_MS));
    if q.bucket.millis() >= HOUR_MS && h0 < h1 {
        if m0 < h0 {
            spans.push(minutes(m0, h0));
        }
        spans.push(Span::Rollup {
            resolution: Resolution::Hour,
            since: h0,
            until: h1,
        });
        if h1 < m1 {
            spans.push(minutes(h1, m1));
        }
    } else {
        spans.push(minutes(m0, m1));
    }
    if m1 < until {
        spans.push(Span::Raw { since: m1, until });
    }
    spans
}

/// Checks a query as a backend receives it.
pub fn check(q: &AggregateQuery) -> Result<(), StorageError> {
    q.check()
        .map_err(|(field, why)| StorageError::InvalidRequest(format!("`{field}`: {why}")))
}

/// Collects the pieces of a query (rollup rows and single readings) into its buckets.
pub struct Buckets {
    bucket: Bucket,
    by_start: BTreeMap<Millis, Summary>,
}

impl Buckets {
    pub fn new(bucket: Bucket) -> Self {
        Buckets {
            bucket,
            by_start: BTreeMap::new(),
        }
    }

    /// A piece starting at `at` (a rollup row's start, or a reading's time).
    pub fn add(&mut self, at: Millis, s: &Summary) {
        let start = self.bucket.start_of(at);
        match self.by_start.get_mut(&start) {
            Some(total) => total.merge(s),
            None => {
                self.by_start.insert(start, *s);
            }
        }
    }

    /// A reading's value of the metric, if it carries one.
    pub fn add_reading(&mut self, r: &Reading, metric: &str) {
        if let Some(value) = r.metric(metric) {
            let s = Summary::of(Point {
                ts: r.ts,
                seq: r.seq,
                value,
            });
            self.add(r.ts, &s);
        }
    }

    /// The non-empty buckets, oldest first.
    pub fn finish(self) -> Vec<Aggregate> {
        self.by_start
            .iter()
            .map(|(start, s)| s.aggregate(*start))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(bucket: Bucket, since: Millis, until: Millis) -> AggregateQuery {
        AggregateQuery {
            metric: "battery".into(),
            bucket,
            since,
            until,
        }
    }

    /// Checks that spans tile `[since, until)` in order, each aligned to its source.
    fn check_tiles(spans: &[Span], since: Millis, until: Millis) {
        let mut at = since;
        for s in spans {
            let (a, b) = match *s {
                Span::Raw { since, until } => {
                    assert_eq!(floor_to(since, MINUTE_MS), floor_to(until - 1, MINUTE_MS));
                    (since, until)
                }
                Span::Rollup {
                    resolution,
                    since,
                    until,
                } => {
                    assert_eq!(since % resolution.millis(), 0);
                    assert_eq!(until % resolution.millis(), 0);
                    (since, until)
                }
                Span::Devices { minute } => {
                    assert_eq!(minute % MINUTE_MS, 0);
                    (minute, minute + MINUTE_MS)
                }
            };
            assert_eq!(a, at, "{spans:?}");
            at = b;
        }
        assert_eq!(at, until.max(since));
    }

    fn check_plan(bucket: Bucket, since: Millis, until: Millis, expected: &[Span]) {
        let spans = plan(&q(bucket, since, until));
        assert_eq!(spans, expected, "{bucket:?} [{since}, {until})");
        check_tiles(&spans, since, until);
    }

    #[test]
    fn pending_fleet_minutes_are_read_from_the_devices() {
        use Resolution::{Hour, Minute};
        const M: Millis = MINUTE_MS;
        const H: Millis = HOUR_MS;
        let roll = |resolution, since, until| Span::Rollup {
            resolution,
            since,
            until,
        };
        let (since, until) = (H - 2 * M, 4 * H);
        let spans = plan(&q(Bucket::Day, since, until));
        assert_eq!(spans, vec![roll(Minute, since, H), roll(Hour, H, 4 * H)]);
        let pending = BTreeSet::from([H - M, 2 * H + 5 * M, 2 * H + 6 * M, 9 * H]);
        let around = around_pending(spans, &pending);
        check_tiles(&around, since, until);
        assert_eq!(
            around,
            vec![
                roll(Minute, H - 2 * M, H - M),
                Span::Devices { minute: H - M },
                roll(Hour, H, 2 * H),
                roll(Minute, 2 * H, 2 * H + 5 * M),
                Span::Devices {
                    minute: 2 * H + 5 * M
                },
                Span::Devices {
                    minute: 2 * H + 6 * M
                },
                roll(Minute, 2 * H + 7 * M, 3 * H),
                roll(Hour, 3 * H, 4 * H),
            ]
        );
        assert_eq!(around_pending(around.clone(), &BTreeSet::new()), around);
    }

    fn reading(device: &str, ts: Millis, seq: u64, battery: f64) -> Reading {
        Reading {
            device: DeviceId::new(device).unwrap(),
            ts,
            seq,
            received_at: ts,
            battery: Some(battery),
            rssi: None,
            online: None,
            metrics: BTreeMap::from([("temp".to_string(), battery / 2.0)]),
            attrs: BTreeMap::new(),
        }
    }

    /// A store the way a backend keeps it: raw rows and the rollup rows written so far.
    #[derive(Default)]
    struct Store {
        raw: BTreeMap<(String, Millis, u64), Reading>,
        rollups: BTreeMap<(String, String, Resolution, Millis), Summary>,
        devices: BTreeMap<(String, Millis, String), Summary>,
    }

    impl Store {
        fn load(&self, need: &Need) -> Loaded {
            match need {
                Need::Minute { device, minute } => {
                    Loaded::Minute(MinutePoints::of(self.raw.values().filter(|r| {
                        r.device == *device && Resolution::Minute.start_of(r.ts) == *minute
                    })))
                }
                Need::Hour {
                    owner,
                    metric,
                    hour,
                } => Loaded::Hour(
                    self.rollups
                        .iter()
                        .filter(|((o, m, res, start), _)| {
                            o == owner
                                && m == metric
                                && *res == Resolution::Minute
                                && Resolution::Hour.start_of(*start) == *hour
                        })
                        .map(|((_, _, _, start), s)| (*start, *s))
                        .collect(),
                ),
                Need::FleetMinute { metric, minute } => Loaded::FleetMinute(
                    self.devices
                        .iter()
                        .filter(|((m, at, _), _)| m == metric && at == minute)
                        .map(|((_, _, d), s)| (d.clone(), *s))
                        .collect(),
                ),
            }
        }

        fn write(&mut self, cache: &mut RollupCache, readings: &[Reading]) {
            loop {
                let needs = cache.needs(readings);
                if needs.is_empty() {
                    break;
                }
                for need in needs {
                    let loaded = self.load(&need);
                    cache.fill(need, loaded);
                }
            }
            let writes = cache.apply(readings);
            for r in readings {
                self.raw
                    .insert((r.device.to_string(), r.ts, r.seq), r.clone());
            }
            for row in writes.rollups {
                let key = (row.owner, row.metric, row.resolution, row.start);
                match row.summary {
                    Some(s) => self.rollups.insert(key, s),
                    None => self.rollups.remove(&key),
                };
            }
            for row in writes.device_minutes {
                let key = (row.metric, row.minute, row.device);
                match row.summary {
                    Some(s) => self.devices.insert(key, s),
                    None => self.devices.remove(&key),
                };
            }
        }

        /// Every rollup recomputed from the raw rows.
        fn expected(&self) -> BTreeMap<(String, String, Resolution, Millis), Summary> {
            let mut out: BTreeMap<(String, String, Resolution, Millis), Summary> = BTreeMap::new();
            for r in self.raw.values() {
                for (metric, value) in r.numeric_metrics() {
                    let s = Summary::of(Point {
                        ts: r.ts,
                        seq: r.seq,
                        value,
                    });
                    for owner in [r.device.as_str(), FLEET] {
                        for res in [Resolution::Minute, Resolution::Hour] {
                            let key = (
                                owner.to_string(),
                                metric.to_string(),
                                res,
                                res.start_of(r.ts),
                            );
                            match out.get_mut(&key) {
                                Some(t) => t.merge(&s),
                                None => {
                                    out.insert(key, s);
                                }
                            }
                        }
                    }
                }
            }
            out
        }
    }

    #[test]
    fn cached_rollups_equal_a_recomputation_under_redelivery_changes_and_eviction() {
        // A tiny cache, so entries are evicted and loaded again from the store mid-way.
        for capacity in [2, 1_000] {
            let mut store = Store::default();
            let mut cache = RollupCache::new(capacity, true);
            let mut all = Vec::new();
            for i in 0..300u64 {
                let device = ["a", "b", "c"][(i % 3) as usize];
                let ts = (i as i64) * 7_919 % (3 * HOUR_MS);
                all.push(reading(device, ts, i, (i % 97) as f64));
            }
            for chunk in all.chunks(25) {
                store.write(&mut cache, chunk);
            }
            // Redelivered, and a few changed values under the same (device, ts, seq).
            let again: Vec<Reading> = all.iter().step_by(4).cloned().collect();
            store.write(&mut cache, &again);
            let changed: Vec<Reading> = all
                .iter()
                .step_by(9)
                .map(|r| reading(r.device.as_str(), r.ts, r.seq, 1_000.0 - r.battery.unwrap()))
                .collect();
            store.write(&mut cache, &changed);
            // A cache cleared after a failed write loads everything again.
            cache.clear();
            store.write(&mut cache, &all[..10]);
            assert_eq!(store.rollups, store.expected(), "capacity {capacity}");
        }
    }

    #[test]
    fn plans_use_raw_rows_only_at_sub_minute_edges() {
        use Resolution::{Hour, Minute};
        let raw = |since, until| Span::Raw { since, until };
        let roll = |resolution, since, until| Span::Rollup {
            resolution,
            since,
            until,
        };
        const M: Millis = MINUTE_MS;
        const H: Millis = HOUR_MS;
        check_plan(Bucket::Minute, 10, 20, &[raw(10, 20)]);
        check_plan(Bucket::Minute, 0, M, &[roll(Minute, 0, M)]);
        check_plan(Bucket::Day, -7, 5, &[raw(-7, 0), raw(0, 5)]);
        check_plan(
            Bucket::Minute,
            -5,
            2 * M + 7,
            &[raw(-5, 0), roll(Minute, 0, 2 * M), raw(2 * M, 2 * M + 7)],
        );
        // Minute buckets never read hours.
        check_plan(Bucket::FifteenMinutes, 0, 3 * H, &[roll(Minute, 0, 3 * H)]);
        check_plan(
            Bucket::Day,
            H - 30 * M - 1,
            3 * H + M + 1,
            &[
                raw(H - 30 * M - 1, H - 30 * M),
                roll(Minute, H - 30 * M, H),
                roll(Hour, H, 3 * H),
                roll(Minute, 3 * H, 3 * H + M),
                raw(3 * H + M, 3 * H + M + 1),
            ],
        );
        check_plan(Bucket::Hour, 5 * M, 50 * M, &[roll(Minute, 5 * M, 50 * M)]);
        check_plan(Bucket::Hour, 7, 7, &[]);
    }

    #[test]
    fn summaries_merge_in_any_order() {
        let p = |ts, seq, value| Summary::of(Point { ts, seq, value });
        let parts = [p(5, 0, 3.0), p(1, 2, 9.0), p(1, 1, -4.0), p(9, 0, 2.5)];
        let mut forward = parts[0];
        parts[1..].iter().for_each(|s| forward.merge(s));
        let mut backward = parts[3];
        parts[..3].iter().rev().for_each(|s| backward.merge(s));
        assert_eq!(forward, backward);
        assert_eq!(
            (forward.count, forward.min, forward.max, forward.sum),
            (4, -4.0, 9.0, 10.5)
        );
        assert_eq!((forward.first.value, forward.last.value), (-4.0, 2.5));
    }

    #[test]
    fn hour_partitions_are_utc_months() {
        // 2025-10-09T23:00Z, 2025-10-01, 2025-11-01, 2025-12-01 in days since the epoch.
        let t = 1_760_050_800_000;
        assert_eq!(month_of(t), 20_362);
        assert_eq!(month_of(20_362 * DAY_MS), 20_362);
        assert_eq!(month_of(20_362 * DAY_MS - 1), 20_332);
        assert_eq!(
            periods(Resolution::Hour, t, t + 40 * DAY_MS),
            vec![20_362, 20_393]
        );
        assert_eq!(
            periods(Resolution::Hour, t, 20_423 * DAY_MS + 1),
            vec![20_362, 20_393, 20_423]
        );
        assert_eq!(
            periods(Resolution::Minute, t, t + DAY_MS),
            vec![20_370, 20_371]
        );
    }

    #[test]
    fn bucket_counts_and_limits() {
        assert_eq!(q(Bucket::Minute, 0, MINUTE_MS).bucket_count(), 1);
        assert_eq!(q(Bucket::Minute, 1, MINUTE_MS + 1).bucket_count(), 2);
        assert_eq!(q(Bucket::Day, 5, 5).bucket_count(), 0);
        let long = q(Bucket::Minute, 0, 10_001 * MINUTE_MS);
        assert_eq!(long.check().unwrap_err().0, "since");
        assert!(q(Bucket::Minute, 0, 10_000 * MINUTE_MS).check().is_ok());
        assert_eq!(q(Bucket::Hour, 2, 1).check().unwrap_err().0, "until");
        assert_eq!(Bucket::parse("15m"), Some(Bucket::FifteenMinutes));
        assert_eq!(Bucket::parse("2h"), None);
        assert_eq!(Bucket::Day.start_of(-1), -DAY_MS);
    }
}
