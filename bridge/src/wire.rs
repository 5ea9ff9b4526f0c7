//! The device wire contract: topics and MessagePack payloads, decoded and validated into storage
//! rows. Every rejection says which field is wrong and why, because it ends up in a dead letter
//! that a firmware developer reads.

use std::collections::BTreeMap;
use std::fmt;

use messina_storage::{AttrValue, DeviceId, Event, Millis, Reading};
use rmpv::ValueRef as Value;

use crate::topics::Topic;

/// What a device topic carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `devices/{id}/telemetry`: one reading, or an array of readings.
    Telemetry,
    /// `devices/{id}/events`: one discrete event.
    Events,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Telemetry => "telemetry",
            Kind::Events => "events",
        }
    }
}

/// A device message the bridge must store or dead-letter.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    Readings(Vec<Reading>),
    Event(Event),
}

/// Why a message was rejected. `field` is the path of the offending value, e.g. `battery`,
/// `metrics.temp` or `[3].ts` in a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.field {
            Some(field) => write!(f, "field `{field}`: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

fn reject(field: impl Into<String>, message: impl Into<String>) -> Rejection {
    Rejection {
        field: Some(field.into()),
        message: message.into(),
    }
}

fn reject_message(message: impl Into<String>) -> Rejection {
    Rejection {
        field: None,
        message: message.into(),
    }
}

/// Bounds on what a message may contain; from `[bridge]` in the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_future_skew_ms: i64,
    pub max_age_ms: i64,
    pub max_readings_per_message: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_future_skew_ms: 86_400_000,
            max_age_ms: 365 * 86_400_000,
            max_readings_per_message: 1_000,
        }
    }
}

/// Nesting deeper than this is refused before it can exhaust the stack.
const MAX_DEPTH: usize = 8;
/// Names of metrics and attributes.
const MAX_NAME_LEN: usize = 128;
const MAX_TEXT_LEN: usize = 1_024;
const MAX_FIELDS: usize = 256;
const MAX_KIND_LEN: usize = 64;

/// Splits `devices/{id}/{telemetry|events}` into the device and what it carries.
pub fn route(topic: &str) -> Result<(DeviceId, Kind), Rejection> {
    let (id, kind) = match Topic::parse(topic) {
        Topic::Telemetry(id) => (id, Kind::Telemetry),
        Topic::Events(id) => (id, Kind::Events),
        _ => {
            return Err(reject_message(
                match topic.strip_prefix("devices/").and_then(|r| r.split_once('/')) {
                    Some((_, leaf)) if !leaf.contains('/') => format!(
                        "topic `{topic}`: unknown message type `{leaf}`; expected `telemetry` or `events`"
                    ),
                    _ => format!(
                        "topic `{topic}` is not `devices/{{id}}/telemetry` or `devices/{{id}}/events`"
                    ),
                },
            ))
        }
    };
    let device = DeviceId::new(id).map_err(|e| reject_message(format!("topic `{topic}`: {e}")))?;
    Ok((device, kind))
}

/// Decodes and validates one payload of `device` on a `kind` topic, received at `received_at`.
pub fn decode(
    device: &DeviceId,
    kind: Kind,
    payload: &[u8],
    received_at: Millis,
    limits: &Limits,
) -> Result<Decoded, Rejection> {
    if payload.is_empty() {
        return Err(reject_message("empty payload; expected a MessagePack map"));
    }
    let mut rest = payload;
    let value = rmpv::decode::read_value_ref_with_max_depth(&mut rest, MAX_DEPTH)
        .map_err(|e| reject_message(format!("payload is not valid MessagePack: {e}")))?;
    if !rest.is_empty() {
        return Err(reject_message(format!(
            "{} trailing byte(s) after the MessagePack value; send one map (or one array of maps) per message",
            rest.len()
        )));
    }
    let ctx = Ctx {
        device,
        received_at,
        limits,
    };
    match (kind, &value) {
        (Kind::Telemetry, Value::Array(items)) => {
            if items.is_empty() {
                return Err(reject_message("empty array; expected at least one reading"));
            }
            if items.len() > limits.max_readings_per_message {
                return Err(reject_message(format!(
                    "{} readings in one message; at most {} are accepted",
                    items.len(),
                    limits.max_readings_per_message
                )));
            }
            let readings = items
                .iter()
                .enumerate()
                .map(|(i, item)| ctx.reading(item, &format!("[{i}].")))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Decoded::Readings(readings))
        }
        (Kind::Telemetry, _) => Ok(Decoded::Readings(vec![ctx.reading(&value, "")?])),
        (Kind::Events, _) => Ok(Decoded::Event(ctx.event(&value)?)),
    }
}

struct Ctx<'a> {
    device: &'a DeviceId,
    received_at: Millis,
    limits: &'a Limits,
}

fn type_name(v: &Value<'_>) -> &'static str {
    match v {
        Value::Nil => "nil",
        Value::Boolean(_) => "bool",
        Value::Integer(_) => "integer",
        Value::F32(_) | Value::F64(_) => "float",
        Value::String(_) => "string",
        Value::Binary(_) => "binary",
        Value::Array(_) => "array",
        Value::Map(_) => "map",
        Value::Ext(..) => "extension",
    }
}

fn expected(field: &str, what: &str, got: &Value<'_>) -> Rejection {
    reject(field, format!("expected {what}, got {}", type_name(got)))
}

fn number(field: &str, v: &Value<'_>) -> Result<f64, Rejection> {
    let n = match v {
        Value::Integer(i) => i.as_f64().unwrap_or(f64::NAN),
        Value::F32(f) => f64::from(*f),
        Value::F64(f) => *f,
        _ => return Err(expected(field, "a number", v)),
    };
    if n.is_finite() {
        Ok(n)
    } else {
        Err(reject(field, "must be a finite number"))
    }
}

/// The path of a field: the key itself for a single reading (borrowed, no allocation on the hot
/// path), `[i].key` in the batch form.
fn path<'n>(prefix: &str, name: &'n str) -> std::borrow::Cow<'n, str> {
    if prefix.is_empty() {
        std::borrow::Cow::Borrowed(name)
    } else {
        std::borrow::Cow::Owned(format!("{prefix}{name}"))
    }
}

/// Checks a metric or attribute name; the error is the message, without the field.
fn name_ok(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN || name.chars().any(char::is_control) {
        return Err(format!(
            "names must be 1 to {MAX_NAME_LEN} printable characters"
        ));
    }
    Ok(())
}

/// The text of a MessagePack string that is valid UTF-8.
fn text<'v>(v: &'v Value<'_>) -> Option<&'v str> {
    match v {
        Value::String(s) => s.as_str(),
        _ => None,
    }
}

/// Reads a map's entries as `(name, value)`, rejecting non-string keys.
fn entries<'v, 'a>(
    field: &str,
    v: &'v Value<'a>,
) -> Result<Vec<(&'v str, &'v Value<'a>)>, Rejection> {
    let Value::Map(map) = v else {
        return Err(expected(field, "a map", v));
    };
    if map.len() > MAX_FIELDS {
        return Err(reject(
            field,
            format!("{} entries; at most {MAX_FIELDS} are accepted", map.len()),
        ));
    }
    map.iter()
        .map(|(k, v)| match text(k) {
            Some(k) => Ok((k, v)),
            None => Err(reject(
                field,
                format!("map keys must be strings, got {}", type_name(k)),
            )),
        })
        .collect()
}

/// An attribute value: string, number or bool.
fn attr(field: &str, v: &Value<'_>) -> Result<AttrValue, Rejection> {
    Ok(match v {
        Value::Boolean(b) => AttrValue::Bool(*b),
        Value::Integer(i) => match i.as_i64() {
            Some(i) => AttrValue::Int(i),
            None => AttrValue::Float(number(field, v)?),
        },
        Value::F32(_) | Value::F64(_) => AttrValue::Float(number(field, v)?),
        Value::String(s) => match s.as_str() {
            Some(s) if s.len() <= MAX_TEXT_LEN => AttrValue::Text(s.to_string()),
            Some(_) => {
                return Err(reject(
                    field,
                    format!("text longer than {MAX_TEXT_LEN} bytes"),
                ))
            }
            None => return Err(reject(field, "string is not valid UTF-8")),
        },
        _ => return Err(expected(field, "a string, number or bool", v)),
    })
}

impl Ctx<'_> {
    /// Device time: milliseconds since the epoch, or a MessagePack timestamp extension (type -1).
    fn timestamp(&self, field: &str, v: &Value<'_>) -> Result<Millis, Rejection> {
        let ts = match v {
            Value::Integer(i) => i.as_i64().ok_or_else(|| reject(field, "out of range"))?,
            Value::Ext(-1, data) => ext_timestamp(data)
                .ok_or_else(|| reject(field, "malformed MessagePack timestamp extension"))?,
            _ => {
                return Err(expected(
                    field,
                    "milliseconds since the epoch (integer) or a MessagePack timestamp",
                    v,
                ))
            }
        };
        let newest = self
            .received_at
            .saturating_add(self.limits.max_future_skew_ms);
        let oldest = self.received_at.saturating_sub(self.limits.max_age_ms);
        if ts > newest {
            return Err(reject(
                field,
                format!(
                    "{ts} is {} s ahead of the server clock (more than the {} s allowed); is the device clock set?",
                    (ts - self.received_at) / 1000,
                    self.limits.max_future_skew_ms / 1000
                ),
            ));
        }
        if ts < oldest {
            return Err(reject(
                field,
                format!(
                    "{ts} is more than {} days old; `ts` is milliseconds (not seconds) since the epoch",
                    self.limits.max_age_ms / 86_400_000
                ),
            ));
        }
        Ok(ts)
    }

    fn seq(&self, field: &str, v: &Value<'_>) -> Result<u64, Rejection> {
        v.as_u64()
            .ok_or_else(|| expected(field, "a non-negative integer", v))
    }

    fn reading(&self, v: &Value<'_>, prefix: &str) -> Result<Reading, Rejection> {
        let at = |name: &str| path(prefix, name).into_owned();
        let fields = entries(prefix.trim_end_matches('.'), v).map_err(|mut e| {
            if e.field.as_deref() == Some("") {
                e.field = None;
                e.message = format!("a reading must be a map: {}", e.message);
            }
            e
        })?;
        let mut r = Reading {
            device: self.device.clone(),
            ts: 0,
            seq: 0,
            received_at: self.received_at,
            battery: None,
            rssi: None,
            online: None,
            metrics: BTreeMap::new(),
            attrs: BTreeMap::new(),
        };
        let mut ts = None;
        for (name, value) in fields {
            let field = path(prefix, name);
            match name {
                "ts" => ts = Some(self.timestamp(&field, value)?),
                "seq" => r.seq = self.seq(&field, value)?,
                "battery" => {
                    let b = number(&field, value)?;
                    if !(0.0..=100.0).contains(&b) {
                        return Err(reject(field, format!("{b} is outside 0 to 100 (percent)")));
                    }
                    r.battery = Some(b);
                }
                "rssi" => {
                    let rssi = match value {
                        Value::Integer(i) => i.as_i64(),
                        _ => return Err(expected(&field, "an integer (dBm)", value)),
                    };
                    match rssi {
                        Some(x @ -200..=0) => r.rssi = Some(x as i32),
                        _ => {
                            return Err(reject(field, "outside -200 to 0 dBm"));
                        }
                    }
                }
                "online" => match value {
                    Value::Boolean(b) => r.online = Some(*b),
                    _ => return Err(expected(&field, "a bool", value)),
                },
                "metrics" => {
                    for (metric, mv) in entries(&field, value)? {
                        // The path of the value is only built for a rejection.
                        let path = || format!("{field}.{metric}");
                        name_ok(metric).map_err(|m| reject(path(), m))?;
                        let n = number(&field, mv).map_err(|e| reject(path(), e.message))?;
                        r.metrics.insert(metric.to_string(), n);
                    }
                }
                _ => {
                    // Unknown keys are kept: numbers as metrics, other scalars as attributes.
                    name_ok(name).map_err(|m| reject(field.as_ref(), m))?;
                    match value {
                        Value::Nil => {}
                        Value::Integer(_) | Value::F32(_) | Value::F64(_) => {
                            let n = number(&field, value)?;
                            r.metrics.entry(name.to_string()).or_insert(n);
                        }
                        _ => {
                            r.attrs.insert(name.to_string(), attr(&field, value)?);
                        }
                    }
                }
            }
        }
        r.ts = ts.ok_or_else(|| reject(at("ts"), "missing; every reading needs a device time"))?;
        if r.metrics.len() + r.attrs.len() > MAX_FIELDS {
            return Err(reject_message(format!(
                "more than {MAX_FIELDS} metrics and attributes in one reading"
            )));
        }
        Ok(r)
    }

    fn event(&self, v: &Value<'_>) -> Result<Event, Rejection> {
        let fields = entries("", v)
            .map_err(|e| reject_message(format!("an event must be a map: {}", e.message)))?;
        let mut ts = None;
        let mut seq = 0;
        let mut kind = None;
        let mut attrs = BTreeMap::new();
        for (name, value) in fields {
            match name {
                "ts" => ts = Some(self.timestamp(name, value)?),
                "seq" => seq = self.seq(name, value)?,
                "kind" => {
                    let k = text(value).ok_or_else(|| expected("kind", "a string", value))?;
                    if k.is_empty()
                        || k.len() > MAX_KIND_LEN
                        || !k
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
                    {
                        return Err(reject(
                            "kind",
                            format!("must be 1 to {MAX_KIND_LEN} characters of A-Z, a-z, 0-9, '_', '.', '-'"),
                        ));
                    }
                    kind = Some(k.to_string());
                }
                "attrs" => {
                    for (attr_name, av) in entries("attrs", value)? {
                        let path = || format!("attrs.{attr_name}");
                        name_ok(attr_name).map_err(|m| reject(path(), m))?;
                        let a = attr(attr_name, av).map_err(|e| reject(path(), e.message))?;
                        attrs.insert(attr_name.to_string(), a);
                    }
                }
                _ => {
                    // Unknown top-level keys are kept as attributes (explicit `attrs` win).
                    name_ok(name).map_err(|m| reject(name, m))?;
                    if !matches!(value, Value::Nil) {
                        let a = attr(name, value)?;
                        attrs.entry(name.to_string()).or_insert(a);
                    }
                }
            }
        }
        let kind = kind.ok_or_else(|| reject("kind", "missing; e.g. \"button\" or \"sync\""))?;
        if kind == "sync" {
            check_sync(&attrs)?;
        }
        if attrs.len() > MAX_FIELDS {
            return Err(reject(
                "attrs",
                format!("more than {MAX_FIELDS} attributes"),
            ));
        }
        Ok(Event {
            device: self.device.clone(),
            ts: ts.ok_or_else(|| reject("ts", "missing; every event needs a device time"))?,
            seq,
            received_at: self.received_at,
            kind,
            attrs,
        })
    }
}

/// `sync` events carry `files_synced` and `errors` (non-negative integers) and `speed_mbps` (a
/// non-negative number); the failure monitoring relies on them.
fn check_sync(attrs: &BTreeMap<String, AttrValue>) -> Result<(), Rejection> {
    for name in ["files_synced", "errors"] {
        match attrs.get(name) {
            None => {}
            Some(AttrValue::Int(n)) if *n >= 0 => {}
            Some(_) => {
                return Err(reject(
                    name,
                    "a sync event needs a non-negative integer here",
                ));
            }
        }
    }
    match attrs.get("speed_mbps") {
        None => Ok(()),
        Some(AttrValue::Int(n)) if *n >= 0 => Ok(()),
        Some(AttrValue::Float(f)) if *f >= 0.0 => Ok(()),
        Some(_) => Err(reject(
            "speed_mbps",
            "a sync event needs a non-negative number here",
        )),
    }
}

/// Decodes the MessagePack timestamp extension (type -1) in its 32, 64 and 96-bit forms.
fn ext_timestamp(data: &[u8]) -> Option<Millis> {
    let (secs, nanos): (i64, u32) = match data.len() {
        4 => (i64::from(u32::from_be_bytes(data.try_into().ok()?)), 0),
        8 => {
            let v = u64::from_be_bytes(data.try_into().ok()?);
            ((v & 0x3_ffff_ffff) as i64, (v >> 34) as u32)
        }
        12 => (
            i64::from_be_bytes(data[4..12].try_into().ok()?),
            u32::from_be_bytes(data[0..4].try_into().ok()?),
        ),
        _ => return None,
    };
    if nanos >= 1_000_000_000 {
        return None;
    }
    secs.checked_mul(1000)?
        .checked_add(i64::from(nanos / 1_000_000))
}
