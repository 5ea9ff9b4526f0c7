//! HTTP ingest: `POST /v1/devices/{id}/telemetry` and `POST /v1/devices/{id}/events`, for
//! devices without MQTT. A body is JSON (`application/json`) or MessagePack
//! (`application/msgpack`), one item or an array of them, with the fields and validation of the
//! MQTT payloads; a timestamp may also be an RFC 3339 string here.
//!
//! Each item becomes one ingest log record, exactly as if the device had published it, and the
//! answer comes only once every record is durable, as a PUBACK does: 202 with the count, or 400
//! naming each invalid item's field (`[2].battery`). Invalid items are still appended, so they
//! become dead letters as over MQTT, and the valid ones of the same request are stored.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use messina_bridge::Kind;
use messina_log::{LogError, Record};
use messina_storage::DeviceId;
use serde::Deserialize;
use serde_json::{json, Value};
use utoipa::ToSchema;

use super::AppState;
use crate::ingest::KIND_PUBLISH;
use crate::json::AcceptedJson;

/// How long a request waits for room in a full ingest log before it is answered 503.
const APPEND_WAIT: Duration = Duration::from_secs(10);

type Body = Result<Bytes, axum::extract::rejection::BytesRejection>;

/// A device time: milliseconds since the epoch, or RFC 3339 text.
#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)] // Its schema documents the bodies `ingest` reads.
pub enum Timestamp {
    Millis(i64),
    Rfc3339(String),
}

/// One reading, with the fields of the MQTT payload. Any other key is kept: a number as a
/// metric, a string or bool as an attribute.
#[derive(Deserialize, ToSchema)]
#[allow(dead_code)] // Its schema documents the bodies `ingest` reads.
pub struct TelemetryItem {
    ts: Timestamp,
    /// Per-device sequence; `(device, ts, seq)` is the reading's identity.
    seq: Option<u64>,
    /// Percent, 0 to 100.
    #[schema(minimum = 0, maximum = 100)]
    battery: Option<f64>,
    /// dBm, -200 to 0.
    #[schema(minimum = -200, maximum = 0)]
    rssi: Option<i32>,
    online: Option<bool>,
    /// Any other sensor values.
    metrics: Option<std::collections::BTreeMap<String, f64>>,
}

/// One event, with the fields of the MQTT payload; other top-level keys are kept as
/// attributes.
#[derive(Deserialize, ToSchema)]
#[allow(dead_code)] // Its schema documents the bodies `ingest` reads.
pub struct EventItem {
    ts: Timestamp,
    seq: Option<u64>,
    /// 1 to 64 characters of `[A-Za-z0-9_.-]`, e.g. `button`, `sync`.
    #[schema(pattern = "^[A-Za-z0-9_.-]{1,64}$")]
    kind: String,
    #[schema(value_type = Option<std::collections::BTreeMap<String, crate::json::Attr>>)]
    attrs: Option<Value>,
}

/// One reading or an array of them (at most `bridge.max_readings_per_message`).
#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)] // Its schema documents the bodies `ingest` reads.
pub enum TelemetryBody {
    One(TelemetryItem),
    Many(Vec<TelemetryItem>),
}

/// One event or an array of them.
#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)] // Its schema documents the bodies `ingest` reads.
pub enum EventBody {
    One(EventItem),
    Many(Vec<EventItem>),
}

/// The answers of an ingest request (telemetry or events).
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // Read as documentation: the handlers answer through `ingest`.
pub enum IngestAnswers {
    /// Every item is durable
    #[response(status = 202)]
    Accepted(#[to_schema] AcceptedJson),
    /// Some items are invalid: `errors` names each one's field, `accepted` counts the others
    #[response(status = 400)]
    Invalid,
    /// Over `http.max_body_kib` or `bridge.max_readings_per_message`
    #[response(status = 413)]
    TooLarge,
    /// Neither JSON nor MessagePack
    #[response(status = 415)]
    UnsupportedType,
}

/// Device readings over HTTP, for devices without MQTT.
///
/// Answered only once every item is durable in the ingest log (as a PUBACK). Invalid items
/// become dead letters and the rest are stored. Idempotent by (device, `ts`, `seq`).
#[utoipa::path(
    post,
    path = "/devices/{id}/telemetry",
    operation_id = "ingest_telemetry",
    tag = "ingest",
    params(("id" = String, Path, description = "The device id")),
    request_body(content(
        (TelemetryBody = "application/json"),
        (TelemetryBody = "application/msgpack"),
    )),
    responses(IngestAnswers)
)]
pub async fn telemetry(
    state: State<Arc<AppState>>,
    id: Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    ingest(state, id, headers, body, Kind::Telemetry).await
}

/// Device events over HTTP: as telemetry.
#[utoipa::path(
    post,
    path = "/devices/{id}/events",
    operation_id = "ingest_events",
    tag = "ingest",
    params(("id" = String, Path, description = "The device id")),
    request_body(content(
        (EventBody = "application/json"),
        (EventBody = "application/msgpack"),
    )),
    responses(IngestAnswers)
)]
pub async fn events(
    state: State<Arc<AppState>>,
    id: Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    ingest(state, id, headers, body, Kind::Events).await
}

fn problem(status: StatusCode, title: &str, detail: String, extra: Value) -> Response {
    let mut body = json!({
        "type": "about:blank",
        "title": title,
        "status": status.as_u16(),
        "detail": detail,
    });
    if let (Value::Object(b), Value::Object(e)) = (&mut body, extra) {
        b.extend(e);
    }
    let mut response = (status, Json(body)).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    response
}

fn bad_body(detail: String) -> Response {
    problem(StatusCode::BAD_REQUEST, "Invalid body", detail, json!({}))
}

async fn ingest(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
    kind: Kind,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(rejection) => {
            let status = rejection.status();
            let detail = if status == StatusCode::PAYLOAD_TOO_LARGE {
                format!(
                    "the body is larger than `http.max_body_kib` ({} KiB); send fewer items per request",
                    state.max_body_bytes >> 10
                )
            } else {
                rejection.body_text()
            };
            return problem(status, "Body not accepted", detail, json!({}));
        }
    };
    let Some(ingest) = &state.ingest else {
        return problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "Ingest unavailable",
            "this server does not accept device data over HTTP".into(),
            json!({}),
        );
    };
    let device = match DeviceId::new(&id) {
        Ok(d) => d,
        Err(e) => {
            return problem(
                StatusCode::BAD_REQUEST,
                "Invalid device id",
                format!("`{id}`: {e}"),
                json!({"parameter": "id"}),
            )
        }
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    let parsed: Result<Value, String> = match content_type.as_str() {
        "application/json" | "" => serde_json::from_slice(&body).map_err(|e| e.to_string()),
        "application/msgpack" | "application/x-msgpack" | "application/vnd.msgpack" => {
            rmp_serde::from_slice(&body).map_err(|e| e.to_string())
        }
        other => {
            return problem(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "Unsupported media type",
                format!("Content-Type `{other}`: send application/json or application/msgpack"),
                json!({}),
            )
        }
    };
    let value = match parsed {
        Ok(v) => v,
        Err(e) => return bad_body(format!("the body is not valid {content_type}: {e}")),
    };
    let (items, batch) = match value {
        Value::Array(items) => (items, true),
        item => (vec![item], false),
    };
    if items.is_empty() {
        return bad_body("an empty array; send at least one item".into());
    }
    if items.len() > ingest.limits.max_readings_per_message {
        return problem(
            StatusCode::PAYLOAD_TOO_LARGE,
            "Too many items",
            format!(
                "{} items in one request; at most {} (`bridge.max_readings_per_message`)",
                items.len(),
                ingest.limits.max_readings_per_message
            ),
            json!({}),
        );
    }

    let now = crate::clock::now_millis();
    let topic = messina_bridge::topics::device_data(device.as_str(), kind);
    let mut payloads = Vec::with_capacity(items.len());
    let mut errors = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        let at = |field: &str| {
            if batch {
                format!("[{i}].{field}")
            } else {
                field.to_string()
            }
        };
        let mut item = item;
        let ts_error = rfc3339_to_millis(&mut item).err();
        let payload = match rmp_serde::to_vec_named(&item) {
            Ok(p) => p,
            Err(e) => return bad_body(format!("item {i} cannot be encoded: {e}")),
        };
        // An item with an unreadable timestamp goes in as sent; its dead letter keeps it.
        let rejection = match ts_error {
            Some(detail) => Some((Some("ts".to_string()), detail)),
            None => messina_bridge::wire::decode(&device, kind, &payload, now, &ingest.limits)
                .err()
                .map(|r| (r.field, r.message)),
        };
        if let Some((field, detail)) = rejection {
            errors.push(json!({"field": field.as_deref().map(at), "detail": detail}));
        }
        payloads.push(payload);
    }
    let mut last_end = 0;
    for payload in &payloads {
        let record = Record {
            kind: KIND_PUBLISH,
            flags: 0,
            received_at: now,
            topic: topic.as_bytes(),
            meta: &[],
            payload,
        };
        match tokio::time::timeout(APPEND_WAIT, ingest.log.append(record)).await {
            Ok(Ok(end)) => last_end = end,
            Ok(Err(LogError::TooLarge { .. })) => {
                return problem(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "Item too large",
                    "an item is larger than the ingest log accepts".into(),
                    json!({}),
                )
            }
            Ok(Err(e)) => return unavailable(&e.to_string()),
            Err(_) => return unavailable("the ingest log is full; storage is behind"),
        }
    }
    if let Err(e) = ingest.log.wait_durable(last_end).await {
        return unavailable(&e.to_string());
    }
    let accepted = payloads.len() - errors.len();
    metrics::counter!("messina_http_ingested_total", "kind" => kind.as_str())
        .increment(accepted as u64);
    if errors.is_empty() {
        return (StatusCode::ACCEPTED, Json(AcceptedJson { accepted })).into_response();
    }
    let first = errors[0]["field"].as_str().unwrap_or("body").to_string();
    problem(
        StatusCode::BAD_REQUEST,
        "Invalid items",
        format!(
            "{} of {} items are invalid (first: `{first}`: {}); they are kept as dead letters, \
             the other {accepted} are accepted",
            errors.len(),
            payloads.len(),
            errors[0]["detail"].as_str().unwrap_or("")
        ),
        json!({"accepted": accepted, "errors": errors}),
    )
}

fn unavailable(why: &str) -> Response {
    let mut r = problem(
        StatusCode::SERVICE_UNAVAILABLE,
        "Ingest unavailable",
        format!("{why}; nothing of this request counts as accepted, retry later"),
        json!({}),
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

/// Rewrites an RFC 3339 `ts` into milliseconds since the epoch, the form MQTT payloads use; on
/// error the item is left as it was.
fn rfc3339_to_millis(item: &mut Value) -> Result<(), String> {
    if let Some(Value::String(s)) = item.get_mut("ts") {
        let ms = crate::clock::parse_rfc3339(s).map_err(|e| {
            format!("`{s}` is neither milliseconds since the epoch nor RFC 3339: {e}")
        })?;
        item["ts"] = Value::from(ms);
    }
    Ok(())
}

/// What HTTP ingest needs besides the rest of the API.
pub struct Ingest {
    pub log: messina_log::Log,
    pub limits: messina_bridge::Limits,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_timestamps_become_milliseconds() {
        let mut v = json!({"ts": "2026-12-01T10:00:00.250Z", "battery": 5});
        rfc3339_to_millis(&mut v).unwrap();
        assert_eq!(v["ts"], 1_796_119_200_250i64);
        let mut v = json!({"ts": 17});
        rfc3339_to_millis(&mut v).unwrap();
        assert_eq!(v["ts"], 17);
        let mut v = json!({"ts": "yesterday"});
        assert!(rfc3339_to_millis(&mut v).is_err());
        assert_eq!(v["ts"], "yesterday");
    }
}
