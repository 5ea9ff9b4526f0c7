//! Time-bucket aggregates: the summaries both backends keep at ingest (per minute and per hour,
//! per device and for the fleet), how a query's range is split into pieces answered from the
//! coarsest summaries that fit (raw readings only at sub-minute edges), and how pieces are merged
//! into buckets. Backends only store and fetch; the arithmetic is here, once.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::model::{Aggregate, Millis, Reading};
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

/// The summary of every numeric metric some readings carry, by metric name.
pub fn summarize<'a>(readings: impl IntoIterator<Item = &'a Reading>) -> BTreeMap<String, Summary> {
    let mut out: BTreeMap<String, Summary> = BTreeMap::new();
    for r in readings {
        for (name, value) in r.numeric_metrics() {
            let s = Summary::of(Point {
                ts: r.ts,
                seq: r.seq,
                value,
            });
            match out.get_mut(name) {
                Some(total) => total.merge(&s),
                None => {
                    out.insert(name.to_string(), s);
                }
            }
        }
    }
    out
}

/// The rollups a batch of readings makes stale, level by level: each level is recomputed from
/// the one below it once that one is stored.
#[derive(Debug, Default)]
pub struct Touched {
    /// Level 1, from raw rows: `(device, minute)` with the metrics the batch's readings carry.
    pub device_minutes: BTreeMap<(String, Millis), BTreeSet<String>>,
}

impl Touched {
    pub fn of(readings: &[Reading]) -> Self {
        let mut t = Touched::default();
        for r in readings {
            let metrics = t
                .device_minutes
                .entry((r.device.to_string(), Resolution::Minute.start_of(r.ts)))
                .or_default();
            metrics.extend(r.numeric_metrics().into_keys().map(str::to_string));
        }
        t
    }
}

/// The rollups above one device minute whose metrics were recomputed: level 2 (the device's hour,
/// the fleet's minute) and level 3 (the fleet's hour).
#[derive(Debug, Default)]
pub struct Above {
    /// `(device, metric, hour)`: the device's hour rollup, from its minute rollups.
    pub device_hours: BTreeSet<(String, String, Millis)>,
    /// `(metric, minute)`: the fleet's minute rollup, from every device's minute rollup.
    pub fleet_minutes: BTreeSet<(String, Millis)>,
    /// `(metric, hour)`: the fleet's hour rollup, from the fleet's minute rollups.
    pub fleet_hours: BTreeSet<(String, Millis)>,
}

impl Above {
    pub fn add(&mut self, device: &str, metric: &str, minute: Millis) {
        let hour = Resolution::Hour.start_of(minute);
        self.device_hours
            .insert((device.to_string(), metric.to_string(), hour));
        self.fleet_minutes.insert((metric.to_string(), minute));
        self.fleet_hours.insert((metric.to_string(), hour));
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

    fn check_plan(bucket: Bucket, since: Millis, until: Millis, expected: &[Span]) {
        let spans = plan(&q(bucket, since, until));
        assert_eq!(spans, expected, "{bucket:?} [{since}, {until})");
        // The spans tile the range.
        let mut at = since;
        for s in &spans {
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
            };
            assert_eq!(a, at);
            at = b;
        }
        assert_eq!(at, until.max(since));
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
