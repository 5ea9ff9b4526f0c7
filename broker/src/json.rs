//! The JSON shapes of Messina's records: what the HTTP API answers and what Messina publishes
//! over MQTT (alerts, presence, upload replies) are the same shapes, so they live apart from
//! both. Each is a struct deriving `Serialize` and `utoipa::ToSchema`, so the OpenAPI document
//! (`/openapi.json`) describes exactly what is sent; each has a `*_json` function that builds it
//! from its record. Times are RFC 3339 ([`rfc3339`]).
//!
//! Fields are declared in alphabetical order on purpose: the API has always answered objects
//! with sorted keys (serde_json's maps are sorted), and a struct serializes its fields in the
//! order they are declared.

use std::collections::{BTreeMap, BTreeSet};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use messina_storage::{
    Aggregate, AggregateQuery, Alert, AttrValue, Connection, Credential, DeadLetter, DeviceId,
    DeviceState, Event, Millis, Page, Reading, RegisteredDevice, Upload,
};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use crate::clock::rfc3339;

/// An attribute value as JSON: a bool, a number or a text (storage's `AttrValue`, untagged).
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)] // Only its schema is used: `AttrValue` serializes itself the same way.
pub enum Attr {
    Bool(bool),
    Number(f64),
    Text(String),
}

/// Attributes by name.
pub type Attrs = BTreeMap<String, AttrValue>;

/// One telemetry reading. `battery`, `rssi`, `online` and `attrs` are left out when the reading
/// has none.
#[derive(Serialize, ToSchema)]
pub struct ReadingJson {
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    #[schema(value_type = BTreeMap<String, Attr>)]
    pub attrs: Attrs,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub battery: Option<f64>,
    pub device_id: String,
    pub metrics: BTreeMap<String, f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub online: Option<bool>,
    /// When Messina received it.
    pub received_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rssi: Option<i32>,
    pub seq: u64,
    /// Device time.
    pub ts: String,
}

pub fn reading_json(r: &Reading) -> ReadingJson {
    ReadingJson {
        attrs: r.attrs.clone(),
        battery: r.battery,
        device_id: r.device.to_string(),
        metrics: r.metrics.clone(),
        online: r.online,
        received_at: rfc3339(r.received_at),
        rssi: r.rssi,
        seq: r.seq,
        ts: rfc3339(r.ts),
    }
}

/// A device's connection as the edge saw it: connected now (on a node whose report holds), or
/// not, with when that last changed and on which node; apart from the `online` it reports.
#[derive(Serialize, ToSchema)]
pub struct ConnectionJson {
    /// `null` when the device never connected.
    #[schema(required = true)]
    pub changed_at: Option<String>,
    pub connected: bool,
    #[schema(required = true)]
    pub node: Option<String>,
}

pub fn connection_json(c: Option<&Connection>) -> ConnectionJson {
    ConnectionJson {
        changed_at: c.map(|c| rfc3339(c.at)),
        connected: c.is_some_and(|c| c.connected),
        node: c.map(|c| c.node.clone()),
    }
}

/// The latest state: each value flat, and `updated` giving the device time of every value.
/// `battery` and `rssi` are left out, and `online` is `null`, when the device never reported
/// them.
#[derive(Serialize, ToSchema)]
pub struct StateJson {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub battery: Option<f64>,
    pub connection: ConnectionJson,
    pub device_id: String,
    /// When Messina last received anything from the device.
    pub last_seen: String,
    pub metrics: BTreeMap<String, f64>,
    #[schema(required = true)]
    pub online: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rssi: Option<i32>,
    pub seq: u64,
    pub ts: String,
    /// The device time of each value: `battery`, `rssi`, `online`, `metrics.<name>`.
    pub updated: BTreeMap<String, String>,
}

pub fn state_json(s: &DeviceState, connection: Option<&Connection>) -> StateJson {
    let mut updated = BTreeMap::new();
    if let Some(b) = s.battery {
        updated.insert("battery".to_string(), rfc3339(b.ts));
    }
    if let Some(x) = s.rssi {
        updated.insert("rssi".to_string(), rfc3339(x.ts));
    }
    if let Some(o) = s.online {
        updated.insert("online".to_string(), rfc3339(o.ts));
    }
    let mut metrics = BTreeMap::new();
    for (name, m) in &s.metrics {
        metrics.insert(name.clone(), m.value);
        updated.insert(format!("metrics.{name}"), rfc3339(m.ts));
    }
    StateJson {
        battery: s.battery.map(|b| b.value),
        connection: connection_json(connection),
        device_id: s.device.to_string(),
        last_seen: rfc3339(s.last_seen),
        metrics,
        online: s.online.map(|o| o.value),
        rssi: s.rssi.map(|x| x.value),
        seq: s.seq,
        ts: rfc3339(s.ts),
        updated,
    }
}

/// One event.
#[derive(Serialize, ToSchema)]
pub struct EventJson {
    #[schema(value_type = BTreeMap<String, Attr>)]
    pub attrs: Attrs,
    pub device_id: String,
    pub kind: String,
    pub received_at: String,
    pub seq: u64,
    pub ts: String,
}

pub fn event_json(e: &Event) -> EventJson {
    EventJson {
        attrs: e.attrs.clone(),
        device_id: e.device.to_string(),
        kind: e.kind.clone(),
        received_at: rfc3339(e.received_at),
        seq: e.seq,
        ts: rfc3339(e.ts),
    }
}

/// A message that could not be stored, with why and its payload.
#[derive(Serialize, ToSchema)]
pub struct DeadLetterJson {
    /// `null` when the topic names no valid device.
    #[schema(required = true)]
    pub device_id: Option<String>,
    pub id: String,
    pub payload_base64: String,
    pub payload_size: usize,
    pub reason: String,
    pub received_at: String,
    pub topic: String,
}

pub fn dead_letter_json(d: &DeadLetter) -> DeadLetterJson {
    DeadLetterJson {
        device_id: d.device.as_ref().map(DeviceId::to_string),
        id: d.id.to_string(),
        payload_base64: STANDARD.encode(&d.payload),
        payload_size: d.payload.len(),
        reason: d.reason.clone(),
        received_at: rfc3339(d.received_at),
        topic: d.topic.clone(),
    }
}

/// An alert as the API answers it and as it is published on `alerts/{device}/{rule}`.
#[derive(Serialize, ToSchema)]
pub struct AlertJson {
    #[schema(required = true)]
    pub acked_at: Option<String>,
    #[schema(required = true)]
    pub acked_by: Option<String>,
    #[schema(required = true)]
    pub cleared_at: Option<String>,
    pub device_id: String,
    pub id: String,
    pub message: String,
    pub raised_at: String,
    /// E.g. `battery_low`, `offline`, `sync_failures`, `anomaly.temp_c`.
    pub rule: String,
    /// `info`, `warning` or `critical`.
    pub severity: String,
    #[schema(pattern = "^(raised|acknowledged|cleared)$")]
    pub state: String,
    #[schema(required = true)]
    pub threshold: Option<f64>,
    #[schema(required = true)]
    pub value: Option<f64>,
}

/// The ingest rates of one second, as `/v1/ingest/stream` sends them.
#[derive(Serialize, ToSchema)]
pub struct IngestRatesJson {
    /// When the rates were taken (RFC 3339).
    pub at: String,
    /// Bytes accepted into the ingest log and not yet stored.
    pub log_lag_bytes: u64,
    /// Device messages accepted into the ingest log (MQTT and HTTP) per second.
    pub received_per_s: f64,
    /// Device messages accepted since the process started.
    pub received_total: u64,
    /// Messages stored as dead letters instead of data, per second.
    pub rejected_per_s: f64,
    pub rejected_total: u64,
    /// Rows (readings, events, dead letters) written to storage per second.
    pub stored_per_s: f64,
    pub stored_total: u64,
}

pub fn alert_json(a: &Alert) -> AlertJson {
    AlertJson {
        acked_at: a.acked_at.map(rfc3339),
        acked_by: a.acked_by.clone(),
        cleared_at: a.cleared_at.map(rfc3339),
        device_id: a.device.to_string(),
        id: a.id.clone(),
        message: a.message.clone(),
        raised_at: rfc3339(a.raised_at),
        rule: a.rule.clone(),
        severity: a.severity.clone(),
        state: a.state.as_str().to_string(),
        threshold: a.threshold,
        value: a.value,
    }
}

/// One page of a listing; pass `next_cursor` as `cursor` for the next (`null` on the last).
#[derive(Serialize, ToSchema)]
pub struct PageJson<T> {
    pub items: Vec<T>,
    #[schema(required = true)]
    pub next_cursor: Option<String>,
}

/// The opaque text form of a storage cursor.
pub fn cursor_text(cursor: &messina_storage::Cursor) -> String {
    URL_SAFE_NO_PAD.encode(&cursor.0)
}

pub fn page_json<T, J>(page: Page<T>, f: impl Fn(&T) -> J) -> PageJson<J> {
    PageJson {
        items: page.items.iter().map(f).collect(),
        next_cursor: page.next_cursor.as_ref().map(cursor_text),
    }
}

/// An upload and what is known of its object. `download_url` and `download_expires_at` are
/// there only for a completed upload, and only where the API shows one upload.
#[derive(Serialize, ToSchema)]
pub struct UploadJson {
    pub content_type: String,
    pub created_at: String,
    pub device_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub download_expires_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub download_url: Option<String>,
    /// Why the upload was rejected.
    #[schema(required = true)]
    pub error: Option<String>,
    pub expires_at: String,
    /// What Messina read from the object (format, dimensions, duration, ...).
    #[schema(value_type = BTreeMap<String, Attr>)]
    pub extracted: Attrs,
    #[schema(required = true)]
    pub finished_at: Option<String>,
    /// `audio`, `photo` or `log`.
    pub kind: String,
    /// What the device sent along with its request.
    #[schema(value_type = BTreeMap<String, Attr>)]
    pub metadata: Attrs,
    pub object_key: String,
    #[schema(required = true)]
    pub sha256: Option<String>,
    pub size: u64,
    #[schema(pattern = "^(pending|completed|rejected|expired)$")]
    pub state: String,
    pub upload_id: String,
}

pub fn upload_json(u: &Upload) -> UploadJson {
    UploadJson {
        content_type: u.content_type.clone(),
        created_at: rfc3339(u.created_at),
        device_id: u.device.to_string(),
        download_expires_at: None,
        download_url: None,
        error: u.error.clone(),
        expires_at: rfc3339(u.expires_at),
        extracted: u.meta.clone(),
        finished_at: u.finished_at.map(rfc3339),
        kind: u.kind.clone(),
        metadata: u.attrs.clone(),
        object_key: u.object_key.clone(),
        sha256: u.sha256.clone(),
        size: u.size,
        state: u.state.as_str().to_string(),
        upload_id: u.id.clone(),
    }
}

/// What a device needs to upload: the presigned `PUT`, its headers, and until when.
#[derive(Serialize, ToSchema)]
pub struct TicketJson {
    pub expires_at: String,
    /// Headers the `PUT` must carry exactly (they are signed).
    pub headers: BTreeMap<String, String>,
    /// Always `PUT`.
    pub method: &'static str,
    pub object_key: String,
    pub upload_id: String,
    pub url: String,
}

/// The ticket of `upload`: its presigned `url` and the `headers` that URL signs.
pub fn ticket_json(upload: &Upload, url: &str, headers: &BTreeMap<String, String>) -> TicketJson {
    TicketJson {
        expires_at: rfc3339(upload.expires_at),
        headers: headers.clone(),
        method: "PUT",
        object_key: upload.object_key.clone(),
        upload_id: upload.id.clone(),
        url: url.to_string(),
    }
}

/// A presence change as Messina publishes it (retained) on `devices/{id}/presence`; `source`
/// tells it apart from a device's own will.
#[derive(Serialize, ToSchema)]
pub struct PresenceJson {
    pub at: String,
    pub device_id: String,
    pub online: bool,
    pub source: String,
}

pub fn presence_json(device: &DeviceId, online: bool, at: Millis, source: &str) -> PresenceJson {
    PresenceJson {
        at: rfc3339(at),
        device_id: device.to_string(),
        online,
        source: source.to_string(),
    }
}

/// How an identity authenticates; the secret itself is never shown.
#[derive(Serialize, ToSchema)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum CredentialJson {
    Secret,
    Certificate { sha256: String },
}

/// A registered identity as shown by the CLI and the HTTP API: everything but the credential's
/// value (a hash is nobody's business; a fingerprint is shown). `secret` is there once, in the
/// answer that generated it; `disconnected` (the live MQTT connections ended) in the answers of
/// rotate and revoke.
#[derive(Serialize, ToSchema)]
pub struct DeviceJson {
    pub created_at: String,
    pub credential: CredentialJson,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disconnected: Option<usize>,
    pub id: String,
    pub labels: BTreeSet<String>,
    #[schema(required = true)]
    pub model: Option<String>,
    #[schema(required = true)]
    pub name: Option<String>,
    #[schema(required = true)]
    pub photo_upload: Option<String>,
    #[schema(value_type = BTreeMap<String, Attr>)]
    pub profile: Attrs,
    /// `device`, `fleet_manager` or `service`.
    pub role: String,
    /// The generated secret (`null` for a certificate identity); shown in this answer only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<Option<String>>,
    /// `active` or `revoked`.
    pub status: String,
    pub updated_at: String,
}

pub fn device_json(d: &RegisteredDevice) -> DeviceJson {
    DeviceJson {
        created_at: rfc3339(d.created_at),
        credential: match &d.credential {
            Credential::Secret { .. } => CredentialJson::Secret,
            Credential::Certificate { sha256 } => CredentialJson::Certificate {
                sha256: sha256.clone(),
            },
        },
        disconnected: None,
        id: d.id.to_string(),
        labels: d.labels.clone(),
        model: d.model.clone(),
        name: d.name.clone(),
        photo_upload: d.photo_upload.clone(),
        profile: d.profile.clone(),
        role: d.role.as_str().to_string(),
        secret: None,
        status: d.status.as_str().to_string(),
        updated_at: rfc3339(d.updated_at),
    }
}

/// The fleet summary and a page of latest states.
#[derive(Serialize, ToSchema)]
pub struct FleetJson {
    /// Devices with an MQTT connection now, over every node.
    pub connected: u64,
    pub items: Vec<StateJson>,
    /// Devices whose latest battery is below `low_battery_percent`.
    pub low_battery: u64,
    pub low_battery_percent: f64,
    #[schema(required = true)]
    pub next_cursor: Option<String>,
    pub not_connected: u64,
    /// Devices with a reading.
    pub total: u64,
}

/// A device with repeated failed syncs.
#[derive(Serialize, ToSchema)]
pub struct FailingDeviceJson {
    /// The active `sync_failures` alert.
    pub alert: AlertJson,
    #[schema(required = true)]
    pub consecutive_failures: Option<f64>,
    pub device_id: String,
    pub failing_since: String,
}

/// The devices with repeated failed syncs.
#[derive(Serialize, ToSchema)]
pub struct FailingJson {
    pub items: Vec<FailingDeviceJson>,
    pub total: usize,
}

/// How many anomaly alerts one device raised, in all and by metric.
#[derive(Serialize, ToSchema)]
pub struct AnomalyCountJson {
    pub by_metric: BTreeMap<String, u64>,
    pub count: u64,
    pub device_id: String,
}

/// The anomaly report over `[since, until)`.
#[derive(Serialize, ToSchema)]
pub struct AnomaliesJson {
    pub items: Vec<AnomalyCountJson>,
    pub since: String,
    pub until: String,
}

/// The answer to an import: the devices registered (each with its secret) and the ids that were
/// registered already (left as they were).
#[derive(Serialize, ToSchema)]
pub struct ImportJson {
    pub existing: Vec<String>,
    pub items: Vec<DeviceJson>,
}

/// Device data accepted over HTTP: every item is durable in the ingest log.
#[derive(Serialize, ToSchema)]
pub struct AcceptedJson {
    pub accepted: usize,
}

/// An error (RFC 9457 problem details, `application/problem+json`). Some problems carry more
/// members: `parameter` names the query parameter or body field at fault; refused device data
/// also has `accepted` and `errors`.
#[derive(Serialize, ToSchema)]
pub struct Problem {
    /// What is wrong and what to do, for a person.
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameter: Option<String>,
    /// The HTTP status, repeated.
    pub status: u16,
    pub title: String,
    /// Always `about:blank`: the status and title say what kind of problem it is.
    #[serde(rename = "type")]
    pub kind: String,
}

/// A shape as a JSON value, for the messages that add members of their own (MQTT replies).
pub fn to_value(shape: impl Serialize) -> Value {
    serde_json::to_value(shape).unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    //! Each shape against the `json!` value the API answered before the shapes were typed:
    //! the same bytes, for records with every optional value present and with none.
    use super::*;
    use crate::uploads::Ticket;
    use messina_storage::{AlertState, DeviceStatus, Role, Stamped, UploadState};
    use serde_json::json;

    /// The bytes of `typed` are those of `expected`.
    fn check(typed: impl Serialize, expected: Value) {
        assert_eq!(
            serde_json::to_string(&typed).unwrap(),
            serde_json::to_string(&expected).unwrap()
        );
    }

    fn id(s: &str) -> DeviceId {
        DeviceId::new(s).unwrap()
    }

    fn attrs() -> Attrs {
        BTreeMap::from([
            ("b".to_string(), AttrValue::Bool(true)),
            ("i".to_string(), AttrValue::Int(-3)),
            ("f".to_string(), AttrValue::Float(1.5)),
            ("t".to_string(), AttrValue::Text("x".into())),
        ])
    }

    #[test]
    fn readings_and_events() {
        let full = Reading {
            device: id("d1"),
            ts: 1_764_000_000_123,
            seq: 7,
            received_at: 1_764_000_000_456,
            battery: Some(80.0),
            rssi: Some(-61),
            online: Some(true),
            metrics: BTreeMap::from([("temp_c".to_string(), 21.5), ("nan".to_string(), f64::NAN)]),
            attrs: attrs(),
        };
        check(
            reading_json(&full),
            json!({
                "device_id": "d1", "ts": "2025-11-24T16:00:00.123Z", "seq": 7,
                "received_at": "2025-11-24T16:00:00.456Z", "metrics": full.metrics,
                "battery": 80.0, "rssi": -61, "online": true,
                "attrs": serde_json::to_value(&full.attrs).unwrap(),
            }),
        );
        let bare = Reading {
            battery: None,
            rssi: None,
            online: None,
            metrics: BTreeMap::new(),
            attrs: BTreeMap::new(),
            ..full.clone()
        };
        check(
            reading_json(&bare),
            json!({
                "device_id": "d1", "ts": "2025-11-24T16:00:00.123Z", "seq": 7,
                "received_at": "2025-11-24T16:00:00.456Z", "metrics": {},
            }),
        );
        let event = Event {
            device: id("d1"),
            ts: 0,
            seq: 1,
            received_at: 5,
            kind: "boot".into(),
            attrs: BTreeMap::new(),
        };
        check(
            event_json(&event),
            json!({
                "device_id": "d1", "ts": "1970-01-01T00:00:00Z", "seq": 1,
                "received_at": "1970-01-01T00:00:00.005Z", "kind": "boot", "attrs": {},
            }),
        );
    }

    #[test]
    fn states_with_their_connection() {
        let full = DeviceState {
            device: id("d1"),
            ts: 2_000,
            seq: 3,
            last_seen: 3_000,
            battery: Some(Stamped {
                value: 15.0,
                ts: 1_000,
            }),
            rssi: Some(Stamped {
                value: -70,
                ts: 1_500,
            }),
            online: Some(Stamped {
                value: false,
                ts: 2_000,
            }),
            metrics: BTreeMap::from([(
                "temp_c".to_string(),
                Stamped {
                    value: 20.0,
                    ts: 1_900,
                },
            )]),
        };
        let connection = Connection {
            device: id("d1"),
            node: "n1".into(),
            connected: true,
            at: 2_500,
        };
        check(
            state_json(&full, Some(&connection)),
            json!({
                "device_id": "d1", "ts": rfc3339(2_000), "seq": 3, "last_seen": rfc3339(3_000),
                "online": false, "battery": 15.0, "rssi": -70, "metrics": {"temp_c": 20.0},
                "updated": {
                    "battery": rfc3339(1_000), "rssi": rfc3339(1_500),
                    "online": rfc3339(2_000), "metrics.temp_c": rfc3339(1_900),
                },
                "connection": {"connected": true, "changed_at": rfc3339(2_500), "node": "n1"},
            }),
        );
        let bare = DeviceState {
            battery: None,
            rssi: None,
            online: None,
            metrics: BTreeMap::new(),
            ..full
        };
        check(
            state_json(&bare, None),
            json!({
                "device_id": "d1", "ts": rfc3339(2_000), "seq": 3, "last_seen": rfc3339(3_000),
                "online": null, "metrics": {}, "updated": {},
                "connection": {"connected": false, "changed_at": null, "node": null},
            }),
        );
    }

    #[test]
    fn dead_letters_alerts_and_pages() {
        for device in [Some(id("d1")), None] {
            let d = DeadLetter {
                id: 42,
                received_at: 1,
                topic: "devices/d1/telemetry".into(),
                device: device.clone(),
                payload: vec![0xff, 0],
                reason: "not MessagePack".into(),
            };
            check(
                dead_letter_json(&d),
                json!({
                    "id": "42", "received_at": rfc3339(1), "topic": d.topic,
                    "device_id": device.as_ref().map(DeviceId::as_str), "reason": d.reason,
                    "payload_size": 2, "payload_base64": "/wA=",
                }),
            );
        }
        let raised = Alert {
            id: "d1~battery_low~1".into(),
            device: id("d1"),
            rule: "battery_low".into(),
            state: AlertState::Raised,
            severity: "warning".into(),
            message: "battery at 15%".into(),
            value: None,
            threshold: None,
            raised_at: 1,
            acked_at: None,
            acked_by: None,
            cleared_at: None,
        };
        let acked = Alert {
            state: AlertState::Acknowledged,
            value: Some(15.0),
            threshold: Some(20.0),
            acked_at: Some(2),
            acked_by: Some("ops".into()),
            cleared_at: Some(3),
            ..raised.clone()
        };
        for a in [&raised, &acked] {
            let expected = json!({
                "id": a.id, "device_id": "d1", "rule": a.rule, "state": a.state.as_str(),
                "severity": a.severity, "message": a.message, "value": a.value,
                "threshold": a.threshold, "raised_at": rfc3339(a.raised_at),
                "acked_at": a.acked_at.map(rfc3339), "acked_by": a.acked_by,
                "cleared_at": a.cleared_at.map(rfc3339),
            });
            check(alert_json(a), expected.clone());
            let page = Page {
                items: vec![a.clone()],
                next_cursor: Some(messina_storage::Cursor(vec![1, 2, 3])),
            };
            check(
                page_json(page, alert_json),
                json!({"items": [expected], "next_cursor": "AQID"}),
            );
        }
        let empty: Page<Alert> = Page {
            items: vec![],
            next_cursor: None,
        };
        check(
            page_json(empty, alert_json),
            json!({"items": [], "next_cursor": null}),
        );
    }

    #[test]
    fn uploads_tickets_presence_and_devices() {
        let mut u = Upload {
            id: "d1~1~n".into(),
            device: id("d1"),
            kind: "photo".into(),
            content_type: "image/png".into(),
            size: 10,
            sha256: None,
            object_key: "devices/d1/photo/d1~1~n".into(),
            state: UploadState::Pending,
            created_at: 1,
            expires_at: 2,
            finished_at: None,
            attrs: BTreeMap::new(),
            meta: BTreeMap::new(),
            error: None,
        };
        let legacy = |u: &Upload| {
            json!({
                "upload_id": u.id, "device_id": "d1", "kind": u.kind,
                "content_type": u.content_type, "size": u.size, "sha256": u.sha256,
                "object_key": u.object_key, "state": u.state.as_str(),
                "created_at": rfc3339(u.created_at), "expires_at": rfc3339(u.expires_at),
                "finished_at": u.finished_at.map(rfc3339), "metadata": u.attrs,
                "extracted": u.meta, "error": u.error,
            })
        };
        check(upload_json(&u), legacy(&u));
        u.state = UploadState::Completed;
        u.sha256 = Some("ab".into());
        u.finished_at = Some(3);
        u.attrs = attrs();
        u.meta = attrs();
        u.error = Some("no".into());
        check(upload_json(&u), legacy(&u));
        let mut with_download = upload_json(&u);
        with_download.download_url = Some("http://x/y".into());
        with_download.download_expires_at = Some(rfc3339(9));
        let mut expected = legacy(&u);
        expected["download_url"] = Value::String("http://x/y".into());
        expected["download_expires_at"] = Value::String(rfc3339(9));
        check(with_download, expected);

        let ticket = Ticket {
            upload: u.clone(),
            url: "http://x/put".into(),
            headers: BTreeMap::from([("content-type".to_string(), "image/png".to_string())]),
        };
        check(
            ticket_json(&ticket.upload, &ticket.url, &ticket.headers),
            json!({
                "upload_id": u.id, "url": ticket.url, "method": "PUT",
                "headers": ticket.headers, "expires_at": rfc3339(u.expires_at),
                "object_key": u.object_key,
            }),
        );
        check(
            presence_json(&id("d1"), true, 5, "messina"),
            json!({"device_id": "d1", "online": true, "at": rfc3339(5), "source": "messina"}),
        );

        let secret = RegisteredDevice {
            id: id("d1"),
            credential: Credential::Secret {
                hash: "$argon2id$...".into(),
            },
            role: Role::Device,
            status: DeviceStatus::Active,
            created_at: 1,
            updated_at: 2,
            name: None,
            model: None,
            labels: BTreeSet::new(),
            profile: BTreeMap::new(),
            photo_upload: None,
        };
        let certificate = RegisteredDevice {
            credential: Credential::Certificate {
                sha256: "cd".into(),
            },
            name: Some("Kitchen".into()),
            model: Some("m1".into()),
            labels: BTreeSet::from(["beta".to_string()]),
            profile: attrs(),
            photo_upload: Some("d1~1~n".into()),
            ..secret.clone()
        };
        for d in [&secret, &certificate] {
            let legacy = json!({
                "id": "d1", "role": d.role.as_str(), "status": d.status.as_str(),
                "credential": match &d.credential {
                    Credential::Secret { .. } => json!({"kind": "secret"}),
                    Credential::Certificate { sha256 } => json!({"kind": "certificate", "sha256": sha256}),
                },
                "name": d.name, "model": d.model, "labels": d.labels, "profile": d.profile,
                "photo_upload": d.photo_upload, "created_at": rfc3339(d.created_at),
                "updated_at": rfc3339(d.updated_at),
            });
            check(device_json(d), legacy.clone());
            for secret in [Some("s3cret".to_string()), None] {
                let mut typed = device_json(d);
                typed.secret = Some(secret.clone());
                typed.disconnected = Some(2);
                let mut expected = legacy.clone();
                expected["secret"] = json!(secret);
                expected["disconnected"] = json!(2);
                check(typed, expected);
            }
        }
    }

    #[test]
    fn problems() {
        let mut p = Problem {
            detail: "d".into(),
            parameter: None,
            status: 400,
            title: "t".into(),
            kind: "about:blank".into(),
        };
        check(
            &p,
            json!({"type": "about:blank", "title": "t", "status": 400, "detail": "d"}),
        );
        p.parameter = Some("limit".into());
        check(
            &p,
            json!({"type": "about:blank", "title": "t", "status": 400, "detail": "d", "parameter": "limit"}),
        );
    }
}

/// One time bucket of an aggregate.
#[derive(Serialize, ToSchema)]
pub struct BucketJson {
    /// `sum / count`.
    pub avg: f64,
    /// Readings in the bucket that carry the metric.
    pub count: u64,
    /// The value of the earliest reading by device time (ties: lower `seq`).
    pub first: f64,
    /// The value of the latest reading by device time (ties: higher `seq`).
    pub last: f64,
    pub max: f64,
    pub min: f64,
    /// Start of the bucket (the bucket cut by `since` still starts on its boundary).
    pub start: String,
    /// `start` in milliseconds since the epoch.
    pub start_ms: i64,
    pub sum: f64,
}

/// Aggregates of one metric per time bucket, oldest first, empty buckets left out.
#[derive(Serialize, ToSchema)]
pub struct AggregatesJson {
    /// `1m`, `5m`, `15m`, `1h`, `6h` or `1d`.
    pub bucket: String,
    pub buckets: Vec<BucketJson>,
    /// The device, in a device's aggregates; absent over the fleet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    pub metric: String,
    pub since: String,
    pub until: String,
}

pub fn aggregates_json(
    device: Option<&DeviceId>,
    q: &AggregateQuery,
    buckets: &[Aggregate],
) -> AggregatesJson {
    AggregatesJson {
        bucket: q.bucket.as_str().to_string(),
        buckets: buckets
            .iter()
            .map(|a| BucketJson {
                avg: a.avg,
                count: a.count,
                first: a.first,
                last: a.last,
                max: a.max,
                min: a.min,
                start: rfc3339(a.start),
                start_ms: a.start,
                sum: a.sum,
            })
            .collect(),
        device_id: device.map(|d| d.to_string()),
        metric: q.metric.clone(),
        since: rfc3339(q.since),
        until: rfc3339(q.until),
    }
}
