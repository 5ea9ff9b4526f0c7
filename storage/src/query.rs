//! Query types shared by every backend: time ranges, order, paging with opaque cursors.

use crate::model::{Alert, AlertState, DeadLetter, DeviceId, DeviceState, Event, Millis};
use serde::{Deserialize, Serialize};

/// Which end of a time range comes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Order {
    #[default]
    NewestFirst,
    OldestFirst,
}

/// A half-open range of device time, `[since, until)`; an open end is unbounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TimeRange {
    pub since: Option<Millis>,
    pub until: Option<Millis>,
}

impl TimeRange {
    pub fn contains(&self, ts: Millis) -> bool {
        self.since.is_none_or(|s| ts >= s) && self.until.is_none_or(|u| ts < u)
    }
}

/// A position in a result set, returned with a page and given back to get the next one. Its bytes
/// belong to the backend that made it; callers only carry them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor(pub Vec<u8>);

/// How many items to return and where to resume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequest {
    pub limit: usize,
    pub cursor: Option<Cursor>,
}

impl PageRequest {
    pub fn first(limit: usize) -> Self {
        PageRequest {
            limit,
            cursor: None,
        }
    }
}

/// One page of results; `next_cursor` is `None` on the last page.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<Cursor>,
}

/// Readings of one device.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryQuery {
    pub device: DeviceId,
    pub range: TimeRange,
    pub order: Order,
    pub page: PageRequest,
}

/// Events of one device, optionally of one kind.
#[derive(Debug, Clone, PartialEq)]
pub struct EventQuery {
    pub device: DeviceId,
    pub kind: Option<String>,
    pub range: TimeRange,
    pub order: Order,
    pub page: PageRequest,
}

impl EventQuery {
    /// True when an event passes the kind filter.
    pub fn accepts(&self, e: &Event) -> bool {
        self.kind.as_deref().is_none_or(|k| e.kind == k)
    }
}

/// Dead letters, newest first, optionally of one device; the range is over arrival time.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetterQuery {
    pub device: Option<DeviceId>,
    pub range: TimeRange,
    pub page: PageRequest,
}

impl DeadLetterQuery {
    /// True when a dead letter passes the device filter.
    pub fn accepts(&self, d: &DeadLetter) -> bool {
        self.device
            .as_ref()
            .is_none_or(|dev| d.device.as_ref() == Some(dev))
    }
}

/// The fleet: every device's latest state, a page at a time in the backend's device order.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetQuery {
    pub page: PageRequest,
}

/// Counts over the whole fleet, which each backend maintains as readings arrive (reading them
/// costs the same for ten devices or a million).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct FleetCounts {
    /// Devices with at least one stored reading.
    pub total: u64,
    /// Devices whose latest battery is below the backend's `low_battery_percent`.
    pub low_battery: u64,
}

/// Whether a latest state counts as low on battery at `threshold` percent.
pub fn low_battery(state: &DeviceState, threshold: f64) -> bool {
    state.battery.is_some_and(|b| b.value < threshold)
}

/// Alerts of one rule family (see [`crate::Alert::family`]) raised in `[since, until)`,
/// optionally of one device: answered from an index by family and day, so it reads only the
/// alerts it counts.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertCountQuery {
    pub family: String,
    pub device: Option<DeviceId>,
    pub since: Millis,
    pub until: Millis,
}

/// How many alerts of `rule` a device raised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertCount {
    pub device: DeviceId,
    pub rule: String,
    pub count: u64,
}

/// Counts alert ids read from a family index, per device and rule, for one query.
#[derive(Debug, Default)]
pub struct AlertTally(std::collections::BTreeMap<(DeviceId, String), u64>);

impl AlertTally {
    /// Counts the alert `id` when the query wants its device; an id that is not an alert id
    /// is a corrupt index entry.
    pub fn add(&mut self, query: &AlertCountQuery, id: &str) -> Result<(), crate::StorageError> {
        let Some((device, rule, _)) = crate::Alert::parse_id(id) else {
            return Err(crate::StorageError::Fatal(
                format!("the alert index holds {id:?}, not an alert id").into(),
            ));
        };
        if query.device.as_ref().is_none_or(|d| *d == device) {
            *self.0.entry((device, rule.to_string())).or_default() += 1;
        }
        Ok(())
    }

    /// The counts, sorted by device then rule.
    pub fn counts(self) -> Vec<AlertCount> {
        self.0
            .into_iter()
            .map(|((device, rule), count)| AlertCount {
                device,
                rule,
                count,
            })
            .collect()
    }
}

/// Which alerts a query wants by state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertStateFilter {
    /// Raised or acknowledged.
    Active,
    Only(AlertState),
}

/// Alerts, newest raised first, filtered by state, device, rule and raise time.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertQuery {
    pub state: Option<AlertStateFilter>,
    pub device: Option<DeviceId>,
    pub rule: Option<String>,
    /// Over `raised_at`.
    pub range: TimeRange,
    pub page: PageRequest,
}

impl AlertQuery {
    /// Every alert, newest first, `limit` at a time.
    pub fn all(limit: usize) -> Self {
        AlertQuery {
            state: None,
            device: None,
            rule: None,
            range: TimeRange::default(),
            page: PageRequest::first(limit),
        }
    }

    /// True when an alert passes the state, device and rule filters (the range is applied by the
    /// backend's key order).
    pub fn accepts(&self, a: &Alert) -> bool {
        let state_ok = match self.state {
            None => true,
            Some(AlertStateFilter::Active) => a.state.is_active(),
            Some(AlertStateFilter::Only(s)) => a.state == s,
        };
        state_ok
            && self.device.as_ref().is_none_or(|d| *d == a.device)
            && self.rule.as_deref().is_none_or(|r| r == a.rule)
            && self.range.contains(a.raised_at)
    }
}

/// Uploads of one device, newest requested first.
#[derive(Debug, Clone, PartialEq)]
pub struct UploadQuery {
    pub device: DeviceId,
    pub page: PageRequest,
}

/// The size of the time buckets of an aggregate query. Buckets are aligned to multiples of their
/// size since the Unix epoch, so every bucket starts on a UTC minute, hour or midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Bucket {
    Minute,
    FiveMinutes,
    FifteenMinutes,
    Hour,
    SixHours,
    Day,
}

impl Bucket {
    pub const ALL: [Bucket; 6] = [
        Bucket::Minute,
        Bucket::FiveMinutes,
        Bucket::FifteenMinutes,
        Bucket::Hour,
        Bucket::SixHours,
        Bucket::Day,
    ];

    /// `1m`, `5m`, `15m`, `1h`, `6h` or `1d`.
    pub fn as_str(self) -> &'static str {
        match self {
            Bucket::Minute => "1m",
            Bucket::FiveMinutes => "5m",
            Bucket::FifteenMinutes => "15m",
            Bucket::Hour => "1h",
            Bucket::SixHours => "6h",
            Bucket::Day => "1d",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Bucket::ALL.into_iter().find(|b| b.as_str() == s)
    }

    pub fn millis(self) -> Millis {
        const MINUTE: Millis = 60_000;
        match self {
            Bucket::Minute => MINUTE,
            Bucket::FiveMinutes => 5 * MINUTE,
            Bucket::FifteenMinutes => 15 * MINUTE,
            Bucket::Hour => 60 * MINUTE,
            Bucket::SixHours => 360 * MINUTE,
            Bucket::Day => 1440 * MINUTE,
        }
    }

    /// The start of the bucket holding `ts`.
    pub fn start_of(self, ts: Millis) -> Millis {
        ts - ts.rem_euclid(self.millis())
    }
}

/// Aggregates of one metric over the time buckets of a half-open range `[since, until)` of device
/// time: of one device, or of the whole fleet. A bucket cut by `since` or `until` aggregates only
/// the readings inside the range, so every answer is exact for the range asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AggregateQuery {
    /// `battery`, `rssi` or the name of any numeric metric readings carry.
    pub metric: String,
    pub bucket: Bucket,
    pub since: Millis,
    pub until: Millis,
}

impl AggregateQuery {
    /// The most buckets one query may span.
    pub const MAX_BUCKETS: u64 = 10_000;
    /// Times beyond ±2^52 ms (about 140,000 years) are refused, so bucket arithmetic cannot
    /// overflow.
    pub const MAX_ABS_TIME: Millis = 1 << 52;

    /// How many buckets the range touches.
    pub fn bucket_count(&self) -> u64 {
        if self.since >= self.until {
            return 0;
        }
        let first = self.bucket.start_of(self.since);
        let last = self.bucket.start_of(self.until - 1);
        ((last - first) / self.bucket.millis() + 1) as u64
    }

    /// Why the query cannot be answered, naming the field at fault.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if self.metric.is_empty() {
            return Err(("metric", "must name a metric".into()));
        }
        for (name, t) in [("since", self.since), ("until", self.until)] {
            if t.abs() > Self::MAX_ABS_TIME {
                return Err((name, format!("{t} is out of range")));
            }
        }
        if self.since > self.until {
            return Err(("until", "must not be before `since`".into()));
        }
        let n = self.bucket_count();
        if n > Self::MAX_BUCKETS {
            return Err((
                "since",
                format!(
                    "the range spans {n} buckets of {}; at most {} are allowed: narrow the range or use a larger bucket",
                    self.bucket.as_str(),
                    Self::MAX_BUCKETS
                ),
            ));
        }
        Ok(())
    }
}
