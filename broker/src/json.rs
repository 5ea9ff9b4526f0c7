//! The JSON shapes of Messina's records, one function per record: what the HTTP API answers and
//! what Messina publishes over MQTT (alerts, presence, upload replies) are the same shapes, so
//! they live apart from both. Times are RFC 3339 ([`rfc3339`]).

use std::collections::BTreeMap;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use messina_storage::{
    Alert, AttrValue, Connection, Credential, DeadLetter, DeviceId, DeviceState, Event, Millis,
    Page, Reading, RegisteredDevice, Upload,
};
use serde::Serialize;
use serde_json::{json, Value};

use crate::clock::rfc3339;
use crate::uploads::Ticket;

pub fn attrs_json(attrs: &BTreeMap<String, AttrValue>) -> Value {
    serde_json::to_value(attrs).unwrap_or(Value::Null)
}

pub fn reading_json(r: &Reading) -> Value {
    let mut v = json!({
        "device_id": r.device.as_str(),
        "ts": rfc3339(r.ts),
        "seq": r.seq,
        "received_at": rfc3339(r.received_at),
        "metrics": r.metrics,
    });
    if let Some(b) = r.battery {
        v["battery"] = json!(b);
    }
    if let Some(x) = r.rssi {
        v["rssi"] = json!(x);
    }
    if let Some(o) = r.online {
        v["online"] = json!(o);
    }
    if !r.attrs.is_empty() {
        v["attrs"] = attrs_json(&r.attrs);
    }
    v
}

/// The latest state: each value flat, and `updated` giving the device time of every value.
pub fn state_json(s: &DeviceState) -> Value {
    let mut updated = serde_json::Map::new();
    let mut v = json!({
        "device_id": s.device.as_str(),
        "ts": rfc3339(s.ts),
        "seq": s.seq,
        "last_seen": rfc3339(s.last_seen),
        // null when the device never reported it
        "online": s.online.map(|o| o.value),
    });
    if let Some(b) = s.battery {
        v["battery"] = json!(b.value);
        updated.insert("battery".into(), json!(rfc3339(b.ts)));
    }
    if let Some(x) = s.rssi {
        v["rssi"] = json!(x.value);
        updated.insert("rssi".into(), json!(rfc3339(x.ts)));
    }
    if let Some(o) = s.online {
        updated.insert("online".into(), json!(rfc3339(o.ts)));
    }
    let mut metrics = serde_json::Map::new();
    for (name, m) in &s.metrics {
        metrics.insert(name.clone(), json!(m.value));
        updated.insert(format!("metrics.{name}"), json!(rfc3339(m.ts)));
    }
    v["metrics"] = Value::Object(metrics);
    v["updated"] = Value::Object(updated);
    v
}

pub fn event_json(e: &Event) -> Value {
    json!({
        "device_id": e.device.as_str(),
        "ts": rfc3339(e.ts),
        "seq": e.seq,
        "received_at": rfc3339(e.received_at),
        "kind": e.kind,
        "attrs": attrs_json(&e.attrs),
    })
}

pub fn dead_letter_json(d: &DeadLetter) -> Value {
    json!({
        "id": d.id.to_string(),
        "received_at": rfc3339(d.received_at),
        "topic": d.topic,
        "device_id": d.device.as_ref().map(DeviceId::as_str),
        "reason": d.reason,
        "payload_size": d.payload.len(),
        "payload_base64": STANDARD.encode(&d.payload),
    })
}

/// An alert as the API answers it and as it is published on `alerts/{device}/{rule}`.
pub fn alert_json(a: &Alert) -> Value {
    json!({
        "id": a.id,
        "device_id": a.device.as_str(),
        "rule": a.rule,
        "state": a.state.as_str(),
        "severity": a.severity,
        "message": a.message,
        "value": a.value,
        "threshold": a.threshold,
        "raised_at": rfc3339(a.raised_at),
        "acked_at": a.acked_at.map(rfc3339),
        "acked_by": a.acked_by,
        "cleared_at": a.cleared_at.map(rfc3339),
    })
}

#[derive(Serialize)]
pub struct PageJson {
    pub items: Vec<Value>,
    pub next_cursor: Option<String>,
}

pub fn page_json<T>(page: Page<T>, f: impl Fn(&T) -> Value) -> PageJson {
    PageJson {
        items: page.items.iter().map(f).collect(),
        next_cursor: page.next_cursor.map(|c| URL_SAFE_NO_PAD.encode(c.0)),
    }
}

/// A device's connection as the edge saw it: connected now (on a node whose report holds), or
/// not, with when that last changed and on which node; apart from the `online` it reports.
pub fn connection_json(c: Option<&Connection>) -> Value {
    json!({
        "connected": c.is_some_and(|c| c.connected),
        "changed_at": c.map(|c| rfc3339(c.at)),
        "node": c.map(|c| c.node.as_str()),
    })
}

/// An upload as the API shows it.
pub fn upload_json(u: &Upload) -> Value {
    json!({
        "upload_id": u.id,
        "device_id": u.device.as_str(),
        "kind": u.kind,
        "content_type": u.content_type,
        "size": u.size,
        "sha256": u.sha256,
        "object_key": u.object_key,
        "state": u.state.as_str(),
        "created_at": rfc3339(u.created_at),
        "expires_at": rfc3339(u.expires_at),
        "finished_at": u.finished_at.map(rfc3339),
        "metadata": u.attrs,
        "extracted": u.meta,
        "error": u.error,
    })
}

/// What a device needs to upload: the presigned `PUT`, its headers, and until when.
pub fn ticket_json(t: &Ticket) -> Value {
    json!({
        "upload_id": t.upload.id,
        "url": t.url,
        "method": "PUT",
        "headers": t.headers,
        "expires_at": rfc3339(t.upload.expires_at),
        "object_key": t.upload.object_key,
    })
}

/// A presence change as Messina publishes it (retained) on `devices/{id}/presence`; `source`
/// tells it apart from a device's own will.
pub fn presence_json(device: &DeviceId, online: bool, at: Millis, source: &str) -> Value {
    json!({
        "device_id": device.as_str(),
        "online": online,
        "at": rfc3339(at),
        "source": source,
    })
}

/// A registered identity as shown by the CLI and the HTTP API: everything but the credential's
/// value (a hash is nobody's business; a fingerprint is shown).
pub fn device_json(d: &RegisteredDevice) -> Value {
    json!({
        "id": d.id.as_str(),
        "role": d.role.as_str(),
        "status": d.status.as_str(),
        "credential": match &d.credential {
            Credential::Secret { .. } => json!({"kind": "secret"}),
            Credential::Certificate { sha256 } => json!({"kind": "certificate", "sha256": sha256}),
        },
        "name": d.name,
        "model": d.model,
        "labels": d.labels,
        "profile": d.profile,
        "photo_upload": d.photo_upload,
        "created_at": rfc3339(d.created_at),
        "updated_at": rfc3339(d.updated_at),
    })
}
