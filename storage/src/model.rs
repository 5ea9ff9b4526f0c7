//! Domain types stored by every backend: device ids, readings, events, dead letters and the latest
//! state of a device. They know nothing of MessagePack, MQTT or JSON.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch, UTC.
pub type Millis = i64;

/// The server's clock, in [`Millis`].
pub fn now_millis() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as Millis)
}

/// A device id: 1 to 128 characters of `[A-Za-z0-9_.-]`, the `{id}` segment of `devices/{id}/...`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DeviceId(String);

/// Why a string is not a valid device id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidDeviceId {
    #[error("device id is empty")]
    Empty,
    #[error("device id is {0} characters long; at most 128 are allowed")]
    TooLong(usize),
    #[error("device id contains {0:?}; only A-Z, a-z, 0-9, '_', '.' and '-' are allowed")]
    BadCharacter(char),
}

impl DeviceId {
    pub const MAX_LEN: usize = 128;

    pub fn new(id: impl Into<String>) -> Result<Self, InvalidDeviceId> {
        let id = id.into();
        if id.is_empty() {
            return Err(InvalidDeviceId::Empty);
        }
        if id.len() > Self::MAX_LEN {
            return Err(InvalidDeviceId::TooLong(id.len()));
        }
        if let Some(c) = id
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
        {
            return Err(InvalidDeviceId::BadCharacter(c));
        }
        Ok(DeviceId(id))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for DeviceId {
    type Error = InvalidDeviceId;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        DeviceId::new(s)
    }
}

impl From<DeviceId> for String {
    fn from(d: DeviceId) -> String {
        d.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A value of an event attribute, or of a telemetry key that is neither a known field nor a number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AttrValue {
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
}

/// One telemetry reading of one device at one device time.
///
/// Its identity is `(device, ts, seq)`: storing the same identity again overwrites, never duplicates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    pub device: DeviceId,
    /// Device time of the reading.
    pub ts: Millis,
    /// Per-device sequence number; 0 when the device sends none.
    pub seq: u64,
    /// Server time the message arrived.
    pub received_at: Millis,
    /// Battery level in percent, 0 to 100.
    pub battery: Option<f64>,
    /// Signal strength in dBm.
    pub rssi: Option<i32>,
    pub online: Option<bool>,
    /// Any other sensor values, by name.
    pub metrics: BTreeMap<String, f64>,
    /// Keys that were neither known fields nor numbers, kept rather than rejected.
    pub attrs: BTreeMap<String, AttrValue>,
}

impl Reading {
    /// The numeric values this reading carries, by metric name: every entry of `metrics`, with
    /// `battery` and `rssi` taken from their own fields when the reading has them. Non-finite
    /// numbers are left out; `online` and `attrs` are not numeric metrics.
    pub fn numeric_metrics(&self) -> BTreeMap<&str, f64> {
        let mut values: BTreeMap<&str, f64> = self
            .metrics
            .iter()
            .map(|(name, v)| (name.as_str(), *v))
            .collect();
        if let Some(b) = self.battery {
            values.insert("battery", b);
        }
        if let Some(r) = self.rssi {
            values.insert("rssi", f64::from(r));
        }
        values.retain(|_, v| v.is_finite());
        values
    }

    /// The value of one metric, as [`Reading::numeric_metrics`] names them.
    pub fn metric(&self, name: &str) -> Option<f64> {
        let value = match name {
            "battery" => self.battery.or_else(|| self.metrics.get(name).copied()),
            "rssi" => self
                .rssi
                .map(f64::from)
                .or_else(|| self.metrics.get(name).copied()),
            _ => self.metrics.get(name).copied(),
        };
        value.filter(|v| v.is_finite())
    }
}

/// The aggregate of one metric over one time bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Aggregate {
    /// Start of the bucket (aligned to a multiple of its size since the epoch, UTC). The first
    /// and last buckets of a query cover only the part inside the query's range.
    pub start: Millis,
    /// Readings in the bucket that carry the metric.
    pub count: u64,
    pub min: f64,
    pub max: f64,
    /// `sum / count`.
    pub avg: f64,
    pub sum: f64,
    /// The value of the earliest reading by device time (ties: lower `seq`, then lower value).
    pub first: f64,
    /// The value of the latest reading by device time (ties: higher `seq`, then higher value).
    pub last: f64,
}

/// A discrete event of one device: a button press, a sync result, ...
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub device: DeviceId,
    pub ts: Millis,
    pub seq: u64,
    pub received_at: Millis,
    /// What happened, e.g. `button` or `sync`.
    pub kind: String,
    pub attrs: BTreeMap<String, AttrValue>,
}

/// A message that could not be decoded or validated, kept with the reason instead of being dropped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Unique among dead letters with the same `received_at`.
    pub id: u64,
    pub received_at: Millis,
    pub topic: String,
    /// The device named by the topic, when the topic named a valid one.
    pub device: Option<DeviceId>,
    /// The raw payload, byte for byte.
    pub payload: Vec<u8>,
    /// What was wrong, naming the field.
    pub reason: String,
}

/// A value with the device time it was measured at; the latest state keeps, per field, the value of
/// the newest reading that carried that field.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Stamped<T> {
    pub value: T,
    pub ts: Millis,
}

/// The latest known state of a device, merged field by field from its readings by device time, so a
/// late, older reading never overwrites a newer value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceState {
    pub device: DeviceId,
    /// Device time of the newest reading.
    pub ts: Millis,
    /// Sequence number of the newest reading.
    pub seq: u64,
    /// Server time the most recent message of this device arrived.
    pub last_seen: Millis,
    pub battery: Option<Stamped<f64>>,
    pub rssi: Option<Stamped<i32>>,
    pub online: Option<Stamped<bool>>,
    pub metrics: BTreeMap<String, Stamped<f64>>,
}

fn merge<T: Copy>(slot: &mut Option<Stamped<T>>, value: Option<T>, ts: Millis) {
    if let Some(value) = value {
        if slot.is_none_or(|s| ts >= s.ts) {
            *slot = Some(Stamped { value, ts });
        }
    }
}

impl Connection {
    /// What `connections` answers for one device, from its row on each node and the nodes
    /// whose reports hold.
    pub fn resolve(
        rows: impl IntoIterator<Item = Connection>,
        live: impl Fn(&str) -> bool,
    ) -> Option<Connection> {
        let mut best: Option<Connection> = None;
        for mut c in rows {
            c.connected &= live(&c.node);
            let better = match &best {
                None => true,
                Some(b) => (c.connected, c.at) > (b.connected, b.at),
            };
            if better {
                best = Some(c);
            }
        }
        best
    }
}

impl DeviceState {
    /// The state of a device whose first reading is `r`.
    pub fn from_reading(r: &Reading) -> Self {
        let mut s = DeviceState {
            device: r.device.clone(),
            ts: r.ts,
            seq: r.seq,
            last_seen: r.received_at,
            battery: None,
            rssi: None,
            online: None,
            metrics: BTreeMap::new(),
        };
        s.apply(r);
        s
    }

    /// Merges one reading: each field takes the reading's value only if the reading is at least as
    /// new as the value held. This is the same rule ScyllaDB applies with `USING TIMESTAMP`.
    pub fn apply(&mut self, r: &Reading) {
        if (r.ts, r.seq) >= (self.ts, self.seq) {
            self.ts = r.ts;
            self.seq = r.seq;
        }
        self.last_seen = self.last_seen.max(r.received_at);
        merge(&mut self.battery, r.battery, r.ts);
        merge(&mut self.rssi, r.rssi, r.ts);
        merge(&mut self.online, r.online, r.ts);
        for (name, value) in &r.metrics {
            let stamped = Stamped {
                value: *value,
                ts: r.ts,
            };
            match self.metrics.get_mut(name) {
                Some(slot) if r.ts >= slot.ts => *slot = stamped,
                Some(_) => {}
                None => {
                    self.metrics.insert(name.clone(), stamped);
                }
            }
        }
    }

    /// True when the newest `online` value says so.
    pub fn is_online(&self) -> bool {
        self.online.is_some_and(|o| o.value)
    }
}

/// A device's connection to a Messina node, as the edge saw it change: connected since `at`,
/// or disconnected at `at`. Kept apart from the `online` field a device reports itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connection {
    pub device: DeviceId,
    /// The node that saw the change (its process id, `node_id` in the logs).
    pub node: String,
    pub connected: bool,
    /// Server time of the change.
    pub at: Millis,
}

/// Where an alert is in its lifecycle: raised → acknowledged (optional) → cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertState {
    Raised,
    Acknowledged,
    Cleared,
}

impl AlertState {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertState::Raised => "raised",
            AlertState::Acknowledged => "acknowledged",
            AlertState::Cleared => "cleared",
        }
    }

    /// Raised or acknowledged: the condition still holds.
    pub fn is_active(self) -> bool {
        self != AlertState::Cleared
    }
}

/// One occurrence of a rule's condition on one device, from raised to cleared. At most one alert
/// per (device, rule) is active; a condition that returns after clearing is a new alert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    /// `{device}~{rule}~{raised_at}`, see [`Alert::id_for`].
    pub id: String,
    pub device: DeviceId,
    /// The rule's name, e.g. `battery_low`, `offline`, `sync_failures`, `anomaly.temp_c`.
    pub rule: String,
    pub state: AlertState,
    /// `info`, `warning` or `critical`.
    pub severity: String,
    /// A sentence for a person.
    pub message: String,
    /// The value that raised (or last updated) the alert, when there is one.
    pub value: Option<f64>,
    pub threshold: Option<f64>,
    pub raised_at: Millis,
    pub acked_at: Option<Millis>,
    pub acked_by: Option<String>,
    pub cleared_at: Option<Millis>,
}

impl Alert {
    /// The id of the alert of `rule` on `device` raised at `raised_at`. Device ids and rule names
    /// cannot contain `~`, so the id can be split back into its parts.
    pub fn id_for(device: &DeviceId, rule: &str, raised_at: Millis) -> String {
        format!("{device}~{rule}~{raised_at}")
    }

    /// The family of a rule: what comes before its first `.` (`anomaly` for `anomaly.temp_c`),
    /// or the whole name.
    pub fn family(rule: &str) -> &str {
        rule.split('.').next().unwrap_or(rule)
    }

    /// The device, rule and raise time an id names, if it is an alert id at all.
    pub fn parse_id(id: &str) -> Option<(DeviceId, &str, Millis)> {
        let mut parts = id.split('~');
        let (Some(device), Some(rule), Some(at), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        Some((DeviceId::new(device).ok()?, rule, at.parse().ok()?))
    }
}

/// Where a device upload is: a URL was handed out (pending), the object was checked and its
/// metadata recorded (completed), the object failed the checks (rejected), or the URL expired
/// before the device said it was done (expired).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UploadState {
    Pending,
    Completed,
    Rejected,
    Expired,
}

impl UploadState {
    pub fn as_str(self) -> &'static str {
        match self {
            UploadState::Pending => "pending",
            UploadState::Completed => "completed",
            UploadState::Rejected => "rejected",
            UploadState::Expired => "expired",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => UploadState::Pending,
            "completed" => UploadState::Completed,
            "rejected" => UploadState::Rejected,
            "expired" => UploadState::Expired,
            _ => return None,
        })
    }
}

/// A blob a device uploads straight to object storage (an audio clip, a photo, a log), with what
/// it declared when it asked for the URL and what the server found in the object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Upload {
    /// `{device}~{created_at}~{nonce}`, see [`Upload::id_for`].
    pub id: String,
    pub device: DeviceId,
    /// `audio`, `photo` or `log`.
    pub kind: String,
    /// The declared content type, signed into the upload URL.
    pub content_type: String,
    /// The declared size in bytes, signed into the upload URL.
    pub size: u64,
    /// The declared SHA-256 of the body, lowercase hex, when the device gave one.
    pub sha256: Option<String>,
    /// The object's key in the bucket.
    pub object_key: String,
    pub state: UploadState,
    pub created_at: Millis,
    /// When the upload URL stops working.
    pub expires_at: Millis,
    /// When the upload was completed, rejected or expired.
    pub finished_at: Option<Millis>,
    /// Metadata the device sent with its request (e.g. `duration_s`, `button_id`).
    pub attrs: BTreeMap<String, AttrValue>,
    /// Metadata the server extracted from the object (e.g. `width`, `height`, `duration_s`).
    pub meta: BTreeMap<String, AttrValue>,
    /// Why the upload was rejected.
    pub error: Option<String>,
}

impl Upload {
    /// The id of an upload of `device` requested at `created_at`; `nonce` makes it unguessable.
    /// Device ids cannot contain `~`, so the id can be split back into its parts.
    pub fn id_for(device: &DeviceId, created_at: Millis, nonce: &str) -> String {
        format!("{device}~{created_at}~{nonce}")
    }

    /// The device and request time an id names, if it is an upload id at all.
    pub fn parse_id(id: &str) -> Option<(DeviceId, Millis)> {
        let mut parts = id.split('~');
        let (Some(device), Some(at), Some(nonce), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        if nonce.is_empty() || !nonce.chars().all(|c| c.is_ascii_alphanumeric()) {
            return None;
        }
        Some((DeviceId::new(device).ok()?, at.parse().ok()?))
    }
}

/// Everything the bridge writes in one go. Backends write a batch atomically where they can, and
/// always idempotently, so a batch retried after a failure never duplicates rows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch {
    pub readings: Vec<Reading>,
    pub events: Vec<Event>,
    pub dead_letters: Vec<DeadLetter>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.readings.len() + self.events.len() + self.dead_letters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn clear(&mut self) {
        self.readings.clear();
        self.events.clear();
        self.dead_letters.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_follow_the_topic_syntax() {
        assert!(DeviceId::new("dev-01_a.b").is_ok());
        assert_eq!(DeviceId::new(""), Err(InvalidDeviceId::Empty));
        assert_eq!(
            DeviceId::new("a/b"),
            Err(InvalidDeviceId::BadCharacter('/'))
        );
        assert_eq!(
            DeviceId::new("x".repeat(129)),
            Err(InvalidDeviceId::TooLong(129))
        );
        assert!(DeviceId::new("x".repeat(128)).is_ok());
    }
}
