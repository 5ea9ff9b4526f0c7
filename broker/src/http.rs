//! The HTTP side-port: JSON queries under `/v1`, device data posted over HTTP (`ingest`), the
//! device registry (`admin`), health, readiness and Prometheus metrics. Every route but
//! `/healthz` and `/readyz` passes `auth` (API keys with roles, or a device's own
//! credentials). Handlers read through the storage trait; every error is
//! `application/problem+json` that names the problem.

pub mod admin;
pub mod auth;
pub mod ingest;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use messina_bridge::alerts::{AckError, AlertService, ANOMALY_PREFIX, SYNC_FAILURES};
use messina_storage::{
    Alert, AlertCountQuery, AlertQuery, AlertState, AlertStateFilter, AttrValue, Connection,
    Cursor, DeadLetter, DeadLetterQuery, DeviceId, DeviceState, Event, EventQuery, FleetQuery,
    Millis, Order, Page, PageRequest, Reading, Storage, StorageError, TelemetryQuery, TimeRange,
    UploadQuery,
};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::tls::PeerCertificate;
use crate::uploads::{upload_json, UploadError, UploadRequest, UploadService};
use serde::Serialize;
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// What the handlers share.
pub struct AppState {
    pub storage: Arc<dyn Storage>,
    pub metrics: Option<PrometheusHandle>,
    /// The API keys, and the check of device credentials.
    pub access: auth::Access,
    /// The MQTT edge's sessions, so revoking an identity ends its live connections.
    pub sessions: Arc<crate::edge::session::Registry>,
    /// Origins allowed by CORS (`http.cors_origins`); empty sends no CORS headers.
    pub cors_origins: Vec<String>,
    pub default_page_size: usize,
    pub max_page_size: usize,
    pub low_battery_percent: f64,
    /// `None` when alerts are disabled.
    pub alerts: Option<Arc<AlertService>>,
    /// `None` when uploads are disabled.
    pub uploads: Option<Arc<UploadService>>,
    /// `None` when the server takes no device data over HTTP (tests of the query API).
    pub ingest: Option<ingest::Ingest>,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Longest a request may take before it is answered 503.
    pub request_timeout: std::time::Duration,
    /// Requests served at once; more are answered 503 at once (load shedding).
    pub max_concurrent_requests: usize,
}

/// The whole HTTP API as a router, testable without a socket.
pub fn app(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/devices", get(fleet))
        .route("/devices/{id}", get(device))
        .route(
            "/devices/{id}/telemetry",
            get(telemetry).post(ingest::telemetry),
        )
        .route("/devices/{id}/events", get(events).post(ingest::events))
        .route("/dead-letters", get(dead_letters))
        .route("/devices/failing", get(failing))
        .route("/alerts", get(list_alerts))
        .route("/alerts/{id}", get(one_alert))
        .route("/alerts/{id}/ack", post(ack_alert))
        .route("/anomalies", get(anomalies))
        .route(
            "/devices/{id}/uploads",
            get(list_uploads).post(request_upload),
        )
        .route(
            "/devices/{id}/uploads/{upload}/complete",
            post(complete_upload),
        )
        .route("/uploads/{upload}", get(one_upload))
        .merge(admin::routes())
        .fallback(not_found)
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authorize,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(state.max_body_bytes));
    let (timeout, max_concurrent) = (state.request_timeout, state.max_concurrent_requests);
    let cors = cors(&state.cors_origins);
    let router = Router::new()
        .nest("/v1", v1)
        .route(
            "/metrics",
            get(prometheus).route_layer(middleware::from_fn_with_state(
                state.clone(),
                auth::authorize,
            )),
        )
        // Load balancers and orchestrators probe these without credentials.
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .with_state(state);
    let router = with_limits(router, timeout, max_concurrent);
    // Outermost, so refusals and 503s carry CORS headers too and preflights are answered here.
    match cors {
        Some(cors) => router.layer(cors),
        None => router,
    }
}

/// The service of one HTTP connection: the API, with the client certificate its TLS handshake
/// verified (if any) in every request's extensions, where [`auth`] finds it.
pub fn connection_service(
    app: Router,
    certificate: Option<PeerCertificate>,
) -> hyper_util::service::TowerToHyperService<
    tower::util::MapRequest<
        Router,
        impl FnMut(hyper::Request<hyper::body::Incoming>) -> hyper::Request<hyper::body::Incoming>
            + Clone,
    >,
> {
    use tower::ServiceExt;
    hyper_util::service::TowerToHyperService::new(app.map_request(
        move |mut request: hyper::Request<hyper::body::Incoming>| {
            if let Some(c) = &certificate {
                request.extensions_mut().insert(c.clone());
            }
            request
        },
    ))
}

/// The CORS layer for `http.cors_origins` (checked at load), `None` when there are none.
fn cors(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::PATCH])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
            .expose_headers([
                header::WWW_AUTHENTICATE,
                header::RETRY_AFTER,
                header::LOCATION,
            ])
            .max_age(std::time::Duration::from_secs(3600)),
    )
}

/// A span per request, a concurrency limit that sheds what is over it (503 with `Retry-After`
/// rather than a queue that grows), and a timeout (503), around the whole side-port.
fn with_limits(router: Router, timeout: std::time::Duration, max_concurrent: usize) -> Router {
    router.layer(
        tower::ServiceBuilder::new()
            .layer(tower_http::trace::TraceLayer::new_for_http())
            .layer(axum::error_handling::HandleErrorLayer::new(overloaded))
            .load_shed()
            // Global: `Router::layer` wraps each route on its own, and one limit must hold for
            // the whole port.
            .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
                max_concurrent,
            ))
            .timeout(timeout),
    )
}

async fn overloaded(error: tower::BoxError) -> Response {
    let (detail, retry) = if error.is::<tower::timeout::error::Elapsed>() {
        (
            "the request took longer than `http.request_timeout_ms`",
            "1",
        )
    } else if error.is::<tower::load_shed::error::Overloaded>() {
        metrics::counter!("messina_http_shed_total").increment(1);
        (
            "the server is serving `http.max_concurrent_requests` requests already",
            "1",
        )
    } else {
        tracing::error!(%error, "HTTP middleware failed");
        ("internal error; see the server log", "5")
    };
    let mut response = ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        title: "Service unavailable",
        detail: format!("{detail}; retry later"),
        parameter: None,
    }
    .into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static(retry));
    response
}

/// An error answered as `application/problem+json` (RFC 9457). Internal details are logged, not
/// sent.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    title: &'static str,
    detail: String,
    parameter: Option<String>,
}

impl ApiError {
    fn bad_parameter(name: &str, detail: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            title: "Invalid query parameter",
            detail: format!("`{name}`: {}", detail.into()),
            parameter: Some(name.to_string()),
        }
    }

    fn not_found(detail: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            title: "Not found",
            detail: detail.into(),
            parameter: None,
        }
    }
}

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::InvalidRequest(detail) => ApiError::bad_parameter("cursor", detail),
            StorageError::Unavailable(_) => {
                tracing::warn!(error = %e, "query failed");
                ApiError {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    title: "Storage unavailable",
                    detail: "storage is unavailable; retry later".into(),
                    parameter: None,
                }
            }
            StorageError::Fatal(_) => {
                tracing::error!(error = %e, "query failed");
                ApiError {
                    status: StatusCode::INTERNAL_SERVER_ERROR,
                    title: "Internal error",
                    detail: "the query failed; see the server log".into(),
                    parameter: None,
                }
            }
        }
    }
}

impl From<UploadError> for ApiError {
    fn from(e: UploadError) -> Self {
        let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let (title, parameter) = match &e {
            UploadError::Invalid { field, .. } => {
                ("Invalid upload request", Some(field.to_string()))
            }
            UploadError::NotFound(_) => ("Not found", None),
            UploadError::Conflict(_) => ("Upload not ready", None),
            UploadError::Rejected(_) => ("Upload rejected", None),
            UploadError::Unavailable(_) => {
                tracing::warn!(error = %e, "upload request failed");
                ("Object storage unavailable", None)
            }
            UploadError::Fatal(_) => {
                tracing::error!(error = %e, "upload request failed");
                return ApiError {
                    status,
                    title: "Internal error",
                    detail: "the upload request failed; see the server log".into(),
                    parameter: None,
                };
            }
        };
        ApiError {
            status,
            title,
            detail: e.to_string(),
            parameter,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({
            "type": "about:blank",
            "title": self.title,
            "status": self.status.as_u16(),
            "detail": self.detail,
        });
        if let Some(p) = self.parameter {
            body["parameter"] = Value::String(p);
        }
        let mut response = (self.status, Json(body)).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        response
    }
}

type ApiResult<T> = Result<T, ApiError>;

async fn not_found(request: Request) -> ApiError {
    ApiError::not_found(format!("no such endpoint: {}", request.uri().path()))
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    match state.storage.health().await {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "not ready");
            (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n")).into_response()
        }
    }
}

async fn prometheus(State(state): State<Arc<AppState>>) -> Response {
    match &state.metrics {
        Some(handle) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => ApiError::not_found("metrics are not enabled in this process").into_response(),
    }
}

/// Query parameters, checked against the names an endpoint accepts, so a typo is an error rather
/// than a silently ignored filter.
struct Params {
    map: HashMap<String, String>,
}

impl Params {
    fn new(map: HashMap<String, String>, allowed: &[&str]) -> ApiResult<Self> {
        if let Some(unknown) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(ApiError::bad_parameter(
                unknown,
                format!(
                    "unknown parameter; this endpoint accepts {}",
                    allowed.join(", ")
                ),
            ));
        }
        Ok(Params { map })
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.map
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    /// A time as RFC 3339 (`2026-01-01T00:00:00Z`) or milliseconds since the epoch.
    fn time(&self, name: &str) -> ApiResult<Option<Millis>> {
        let Some(v) = self.get(name) else {
            return Ok(None);
        };
        if let Ok(ms) = v.parse::<i64>() {
            return Ok(Some(ms));
        }
        OffsetDateTime::parse(v, &Rfc3339)
            .map(|t| Some((t.unix_timestamp_nanos() / 1_000_000) as i64))
            .map_err(|_| {
                ApiError::bad_parameter(
                    name,
                    format!("{v:?} is not an RFC 3339 time (e.g. 2026-01-01T00:00:00Z) or milliseconds since the epoch"),
                )
            })
    }

    fn range(&self) -> ApiResult<TimeRange> {
        let range = TimeRange {
            since: self.time("since")?,
            until: self.time("until")?,
        };
        if let (Some(s), Some(u)) = (range.since, range.until) {
            if s > u {
                return Err(ApiError::bad_parameter(
                    "until",
                    "must not be before `since`",
                ));
            }
        }
        Ok(range)
    }

    fn order(&self) -> ApiResult<Order> {
        match self.get("order") {
            None | Some("newest") | Some("desc") => Ok(Order::NewestFirst),
            Some("oldest") | Some("asc") => Ok(Order::OldestFirst),
            Some(v) => Err(ApiError::bad_parameter(
                "order",
                format!("{v:?} is not `newest` or `oldest`"),
            )),
        }
    }

    fn page(&self, state: &AppState) -> ApiResult<PageRequest> {
        let limit = match self.get("limit") {
            None => state.default_page_size,
            Some(v) => match v.parse::<usize>() {
                Ok(n) if (1..=state.max_page_size).contains(&n) => n,
                _ => {
                    return Err(ApiError::bad_parameter(
                        "limit",
                        format!(
                            "{v:?} is not a whole number from 1 to {}",
                            state.max_page_size
                        ),
                    ))
                }
            },
        };
        let cursor = match self.get("cursor") {
            None => None,
            Some(v) => Some(Cursor(URL_SAFE_NO_PAD.decode(v).map_err(|_| {
                ApiError::bad_parameter(
                    "cursor",
                    "not a cursor returned by this API; pass `next_cursor` unchanged",
                )
            })?)),
        };
        Ok(PageRequest { limit, cursor })
    }
}

fn device_id(id: String) -> ApiResult<DeviceId> {
    DeviceId::new(id).map_err(|e| ApiError {
        status: StatusCode::BAD_REQUEST,
        title: "Invalid device id",
        detail: e.to_string(),
        parameter: Some("id".into()),
    })
}

/// RFC 3339 UTC with milliseconds, e.g. `2026-11-23T09:15:22.123Z`.
pub fn rfc3339(ms: Millis) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| ms.to_string())
}

fn attrs_json(attrs: &BTreeMap<String, AttrValue>) -> Value {
    serde_json::to_value(attrs).unwrap_or(Value::Null)
}

fn reading_json(r: &Reading) -> Value {
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
fn state_json(s: &DeviceState) -> Value {
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

fn event_json(e: &Event) -> Value {
    json!({
        "device_id": e.device.as_str(),
        "ts": rfc3339(e.ts),
        "seq": e.seq,
        "received_at": rfc3339(e.received_at),
        "kind": e.kind,
        "attrs": attrs_json(&e.attrs),
    })
}

fn dead_letter_json(d: &DeadLetter) -> Value {
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
struct PageJson {
    items: Vec<Value>,
    next_cursor: Option<String>,
}

fn page_json<T>(page: Page<T>, f: impl Fn(&T) -> Value) -> PageJson {
    PageJson {
        items: page.items.iter().map(f).collect(),
        next_cursor: page.next_cursor.map(|c| URL_SAFE_NO_PAD.encode(c.0)),
    }
}

/// A device's connection as the edge saw it: connected now (on a node whose report holds), or
/// not, with when that last changed and on which node; apart from the `online` it reports.
fn connection_json(c: Option<&Connection>) -> Value {
    json!({
        "connected": c.is_some_and(|c| c.connected),
        "changed_at": c.map(|c| rfc3339(c.at)),
        "node": c.map(|c| c.node.as_str()),
    })
}

async fn device(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    Params::new(params, &[])?;
    let id = device_id(id)?;
    match state.storage.device(&id).await? {
        Some(s) => {
            let connections = state.storage.connections(std::slice::from_ref(&id)).await?;
            let mut v = state_json(&s);
            v["connection"] = connection_json(connections.first());
            Ok(Json(v))
        }
        None => Err(ApiError::not_found(format!(
            "device `{id}` has sent no telemetry"
        ))),
    }
}

async fn telemetry(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Json<PageJson>> {
    let p = Params::new(params, &["since", "until", "limit", "cursor", "order"])?;
    let query = TelemetryQuery {
        device: device_id(id)?,
        range: p.range()?,
        order: p.order()?,
        page: p.page(&state)?,
    };
    Ok(Json(page_json(
        state.storage.telemetry(&query).await?,
        reading_json,
    )))
}

async fn events(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Json<PageJson>> {
    let p = Params::new(
        params,
        &["kind", "since", "until", "limit", "cursor", "order"],
    )?;
    let query = EventQuery {
        device: device_id(id)?,
        kind: p.get("kind").map(str::to_string),
        range: p.range()?,
        order: p.order()?,
        page: p.page(&state)?,
    };
    Ok(Json(page_json(
        state.storage.events(&query).await?,
        event_json,
    )))
}

async fn dead_letters(
    State(state): State<Arc<AppState>>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Json<PageJson>> {
    let p = Params::new(params, &["device", "since", "until", "limit", "cursor"])?;
    let device = match p.get("device") {
        Some(d) => {
            Some(DeviceId::new(d).map_err(|e| ApiError::bad_parameter("device", e.to_string()))?)
        }
        None => None,
    };
    let query = DeadLetterQuery {
        device,
        range: p.range()?,
        page: p.page(&state)?,
    };
    Ok(Json(page_json(
        state.storage.dead_letters(&query).await?,
        dead_letter_json,
    )))
}

async fn fleet(
    State(state): State<Arc<AppState>>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let p = Params::new(params, &["limit", "cursor"])?;
    let storage = &state.storage;
    let query = FleetQuery {
        page: p.page(&state)?,
    };
    let (page, counts, connected) = tokio::try_join!(
        storage.fleet(&query),
        storage.fleet_counts(),
        storage.connected_devices(),
    )?;
    let ids: Vec<DeviceId> = page.items.iter().map(|d| d.device.clone()).collect();
    let connections: HashMap<DeviceId, Connection> = storage
        .connections(&ids)
        .await?
        .into_iter()
        .map(|c| (c.device.clone(), c))
        .collect();
    let devices = page_json(page, |d| {
        let mut v = state_json(d);
        v["connection"] = connection_json(connections.get(&d.device));
        v
    });
    Ok(Json(json!({
        "total": counts.total,
        "connected": connected,
        "not_connected": counts.total.saturating_sub(connected),
        "low_battery": counts.low_battery,
        "low_battery_percent": state.low_battery_percent,
        "items": devices.items,
        "next_cursor": devices.next_cursor,
    })))
}

fn alerts_service(state: &AppState) -> ApiResult<&Arc<AlertService>> {
    state.alerts.as_ref().ok_or_else(|| ApiError {
        status: StatusCode::NOT_FOUND,
        title: "Alerts disabled",
        detail: "alerts are disabled on this server (`alerts.enabled = false`)".into(),
        parameter: None,
    })
}

async fn list_alerts(
    State(state): State<Arc<AppState>>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Json<PageJson>> {
    let p = Params::new(
        params,
        &[
            "state", "device", "rule", "since", "until", "limit", "cursor",
        ],
    )?;
    let filter = match p.get("state") {
        None | Some("all") => None,
        Some("active") => Some(AlertStateFilter::Active),
        Some("raised") => Some(AlertStateFilter::Only(AlertState::Raised)),
        Some("acknowledged") => Some(AlertStateFilter::Only(AlertState::Acknowledged)),
        Some("cleared") => Some(AlertStateFilter::Only(AlertState::Cleared)),
        Some(v) => {
            return Err(ApiError::bad_parameter(
                "state",
                format!("{v:?} is not active, raised, acknowledged, cleared or all"),
            ))
        }
    };
    let device = match p.get("device") {
        Some(d) => {
            Some(DeviceId::new(d).map_err(|e| ApiError::bad_parameter("device", e.to_string()))?)
        }
        None => None,
    };
    let query = AlertQuery {
        state: filter,
        device,
        rule: p.get("rule").map(str::to_string),
        range: p.range()?,
        page: p.page(&state)?,
    };
    Ok(Json(page_json(
        state.storage.alerts(&query).await?,
        alert_json,
    )))
}

async fn one_alert(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    match state.storage.alert(&id).await? {
        Some(a) => Ok(Json(alert_json(&a))),
        None => Err(ApiError::not_found(format!("no alert `{id}`"))),
    }
}

async fn ack_alert(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    axum::Extension(caller): axum::Extension<auth::Caller>,
    body: axum::body::Bytes,
) -> ApiResult<Json<Value>> {
    let service = alerts_service(&state)?;
    // The body is optional: `{"by": "name"}` records who acknowledged; without it, the
    // caller's API key name (or "api" on an open API).
    let by_caller = match &caller {
        auth::Caller::Open => "api".to_string(),
        auth::Caller::Key { name, .. } => name.clone(),
        auth::Caller::Device(id) => id.to_string(),
    };
    let by = if body.is_empty() {
        by_caller
    } else {
        let v: Value = serde_json::from_slice(&body).map_err(|e| ApiError {
            status: StatusCode::BAD_REQUEST,
            title: "Invalid body",
            detail: format!("the body must be JSON like {{\"by\": \"name\"}}: {e}"),
            parameter: Some("by".into()),
        })?;
        match &v["by"] {
            Value::String(s) if !s.is_empty() && s.len() <= 128 => s.clone(),
            Value::Null => by_caller,
            _ => {
                return Err(ApiError {
                    status: StatusCode::BAD_REQUEST,
                    title: "Invalid body",
                    detail: "`by` must be a string of 1 to 128 characters".into(),
                    parameter: Some("by".into()),
                })
            }
        }
    };
    match service.ack(&id, &by, crate::mqtt::now_millis()).await {
        Ok(alert) => {
            tracing::info!(%caller, alert = %id, by, "alert acknowledged");
            Ok(Json(alert_json(&alert)))
        }
        Err(AckError::NotActive(_)) => match state.storage.alert(&id).await? {
            Some(a) => Err(ApiError {
                status: StatusCode::CONFLICT,
                title: "Alert not active",
                detail: format!(
                    "alert `{id}` is {}; only raised alerts can be acknowledged",
                    a.state.as_str()
                ),
                parameter: None,
            }),
            None => Err(ApiError::not_found(format!("no alert `{id}`"))),
        },
    }
}

fn uploads_service(state: &AppState) -> ApiResult<&Arc<UploadService>> {
    state
        .uploads
        .as_ref()
        .ok_or_else(|| ApiError::not_found("uploads are disabled (`uploads.enabled = false`)"))
}

/// Asks for a presigned upload URL on behalf of a device.
async fn request_upload(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
    body: axum::body::Bytes,
) -> ApiResult<(StatusCode, Json<Value>)> {
    Params::new(params, &[])?;
    let device = device_id(id)?;
    let service = uploads_service(&state)?;
    let request = UploadRequest::parse(&body)?;
    let ticket = service
        .request(&device, request, crate::mqtt::now_millis())
        .await?;
    Ok((StatusCode::CREATED, Json(ticket.json())))
}

/// Checks an uploaded object and records its metadata.
async fn complete_upload(
    State(state): State<Arc<AppState>>,
    Path((id, upload)): Path<(String, String)>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    Params::new(params, &[])?;
    let device = device_id(id)?;
    let service = uploads_service(&state)?;
    let now = crate::mqtt::now_millis();
    let done = service.complete(&device, &upload, now).await?;
    Ok(Json(with_download(service, &done, now).await))
}

async fn with_download(service: &UploadService, u: &messina_storage::Upload, now: Millis) -> Value {
    let mut v = upload_json(u);
    if let Some((url, expires)) = service.download_url(u, now).await {
        v["download_url"] = Value::String(url);
        v["download_expires_at"] = Value::String(rfc3339(expires));
    }
    v
}

async fn list_uploads(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Json<PageJson>> {
    let p = Params::new(params, &["limit", "cursor"])?;
    let query = UploadQuery {
        device: device_id(id)?,
        page: p.page(&state)?,
    };
    Ok(Json(page_json(
        state.storage.uploads(&query).await?,
        upload_json,
    )))
}

/// One upload with its metadata and, once completed, a short-lived download URL.
async fn one_upload(
    State(state): State<Arc<AppState>>,
    Path(upload): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    Params::new(params, &[])?;
    let service = uploads_service(&state)?;
    match state.storage.upload(&upload).await? {
        Some(u) => Ok(Json(
            with_download(service, &u, crate::mqtt::now_millis()).await,
        )),
        None => Err(ApiError::not_found(format!("no upload `{upload}`"))),
    }
}

/// Devices with repeated failed syncs (an active `sync_failures` alert).
async fn failing(
    State(state): State<Arc<AppState>>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    Params::new(params, &[])?;
    let service = alerts_service(&state)?;
    let items: Vec<Value> = service
        .active_of(SYNC_FAILURES)
        .iter()
        .map(|a| {
            json!({
                "device_id": a.device.as_str(),
                "consecutive_failures": a.value,
                "failing_since": rfc3339(a.raised_at),
                "alert": alert_json(a),
            })
        })
        .collect();
    Ok(Json(json!({ "total": items.len(), "items": items })))
}

/// Longest range the anomaly report reads (one index partition per day).
const ANOMALY_MAX_DAYS: i64 = 366;
/// Its range when `since` is not given: the 30 days before `until`.
const ANOMALY_DEFAULT_DAYS: i64 = 30;

/// How many anomaly alerts each device raised in a time range, by metric, from the alert index
/// by rule family: it reads the anomalies it counts, not every alert.
async fn anomalies(
    State(state): State<Arc<AppState>>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let p = Params::new(params, &["device", "since", "until"])?;
    let device = match p.get("device") {
        Some(d) => {
            Some(DeviceId::new(d).map_err(|e| ApiError::bad_parameter("device", e.to_string()))?)
        }
        None => None,
    };
    let range = p.range()?;
    let until = range.until.unwrap_or_else(|| crate::mqtt::now_millis() + 1);
    let since = range
        .since
        .unwrap_or(until - ANOMALY_DEFAULT_DAYS * 86_400_000);
    if until - since > ANOMALY_MAX_DAYS * 86_400_000 {
        return Err(ApiError::bad_parameter(
            "since",
            format!("the range may cover at most {ANOMALY_MAX_DAYS} days"),
        ));
    }
    let counts = state
        .storage
        .alert_counts(&AlertCountQuery {
            family: ANOMALY_PREFIX.trim_end_matches('.').to_string(),
            device,
            since,
            until,
        })
        .await?;
    let mut by_device: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for c in counts {
        if let Some(metric) = c.rule.strip_prefix(ANOMALY_PREFIX) {
            by_device
                .entry(c.device.to_string())
                .or_default()
                .insert(metric.to_string(), c.count);
        }
    }
    let items: Vec<Value> = by_device
        .into_iter()
        .map(|(device, by_metric)| {
            json!({"device_id": device, "count": by_metric.values().sum::<u64>(), "by_metric": by_metric})
        })
        .collect();
    Ok(Json(json!({
        "since": rfc3339(since),
        "until": rfc3339(until),
        "items": items,
    })))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::{HeaderMap, Request};
    use messina_config::{Anonymous, ApiKey, ApiRole};
    use messina_storage::embedded::{EmbeddedOptions, EmbeddedStorage};
    use tower::ServiceExt;

    async fn call(app: &Router, uri: &str, key: Option<&str>) -> (StatusCode, String, Value) {
        let mut req = Request::get(uri);
        if let Some(k) = key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        let res = app
            .clone()
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = res.status();
        let ctype = res
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let body = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .unwrap();
        (
            status,
            ctype,
            serde_json::from_slice(&body).unwrap_or(Value::Null),
        )
    }

    /// An answer as a test looks at it.
    #[derive(Debug)]
    pub(crate) struct Answer {
        pub status: StatusCode,
        pub headers: HeaderMap,
        pub body: Value,
    }

    /// Sends one request; `authorization` is the whole header value (`Bearer …`, `Basic …`).
    pub(crate) async fn send(
        app: &Router,
        method: Method,
        uri: &str,
        authorization: Option<&str>,
        body: Option<Value>,
    ) -> Answer {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(a) = authorization {
            req = req.header(header::AUTHORIZATION, a);
        }
        let req = match body {
            Some(b) => req
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(serde_json::to_vec(&b).unwrap())),
            None => req.body(Body::empty()),
        };
        let res = app.clone().oneshot(req.unwrap()).await.unwrap();
        let status = res.status();
        let headers = res.headers().clone();
        let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .unwrap();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        if status.is_client_error() || status.is_server_error() {
            assert_eq!(
                headers[header::CONTENT_TYPE],
                "application/problem+json",
                "{status}: {body}"
            );
        }
        Answer {
            status,
            headers,
            body,
        }
    }

    /// `Authorization` for an API key.
    pub(crate) fn bearer(key: &str) -> String {
        format!("Bearer {key}")
    }

    /// `Authorization` for a device's own credentials, as HTTP Basic.
    pub(crate) fn basic(id: &str, secret: &str) -> String {
        format!("Basic {}", STANDARD.encode(format!("{id}:{secret}")))
    }

    /// What a test builds the app from.
    #[derive(Default)]
    pub(crate) struct Setup<'a> {
        pub keys: &'a [(&'a str, ApiRole)],
        /// An ingest log in the directory, so device data over HTTP is accepted.
        pub ingest: bool,
        pub cors_origins: &'a [&'a str],
        /// Requests per second of each key and device (0: no limit).
        pub rate: u32,
    }

    pub(crate) fn state_with(dir: &std::path::Path, setup: Setup<'_>) -> Arc<AppState> {
        let storage: Arc<dyn Storage> =
            Arc::new(EmbeddedStorage::open(&EmbeddedOptions::new(dir.join("db"))).unwrap());
        let keys: Vec<ApiKey> = setup
            .keys
            .iter()
            .map(|(key, role)| ApiKey {
                name: format!("{role}-key"),
                role: *role,
                key: key.to_string(),
                max_request_rate: setup.rate,
            })
            .collect();
        let devices = Arc::new(crate::security::Authenticator::new(
            Arc::clone(&storage),
            Anonymous::Loopback,
            1000,
        ));
        let ingest = setup.ingest.then(|| {
            let (log, _) = messina_log::Log::open(messina_log::Options {
                dir: dir.join("log"),
                segment_bytes: 1 << 20,
                max_bytes: 16 << 20,
                max_batch_bytes: 1 << 20,
                memory_bytes: 1 << 20,
                durability: messina_log::Durability::Fsync,
            })
            .unwrap();
            ingest::Ingest {
                log,
                limits: messina_bridge::Settings::from_config(
                    &messina_config::BridgeConfig::default(),
                )
                .limits,
            }
        });
        Arc::new(AppState {
            storage,
            metrics: Some(
                metrics_exporter_prometheus::PrometheusBuilder::new()
                    .build_recorder()
                    .handle(),
            ),
            access: auth::Access::new(&keys, devices, setup.rate, 0),
            sessions: Arc::new(crate::edge::session::Registry::default()),
            cors_origins: setup.cors_origins.iter().map(|o| o.to_string()).collect(),
            default_page_size: 100,
            max_page_size: 1000,
            low_battery_percent: 20.0,
            alerts: None,
            uploads: None,
            ingest,
            max_body_bytes: 1 << 20,
            request_timeout: std::time::Duration::from_secs(30),
            max_concurrent_requests: 64,
        })
    }

    fn state(dir: &std::path::Path, api_key: Option<&str>) -> Arc<AppState> {
        let keys = api_key.map(|k| [(k, ApiRole::Admin)]);
        state_with(
            dir,
            Setup {
                keys: keys.as_ref().map_or(&[][..], |k| &k[..]),
                ..Setup::default()
            },
        )
    }

    #[tokio::test]
    async fn slow_requests_time_out_and_requests_over_the_limit_are_shed() {
        use std::time::Duration;
        let slow = || {
            Router::new().route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_millis(400)).await;
                    "done"
                }),
            )
        };
        let get_slow = || {
            axum::http::Request::get("/slow")
                .body(axum::body::Body::empty())
                .unwrap()
        };
        // Over the timeout: 503 problem with Retry-After.
        let app = with_limits(slow(), Duration::from_millis(50), 10);
        let r = app.oneshot(get_slow()).await.unwrap();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(r.headers().contains_key(header::RETRY_AFTER));
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        // One at a time: a second request while the first runs is shed at once, not queued.
        let app = with_limits(slow(), Duration::from_secs(5), 1);
        let first = tokio::spawn(app.clone().oneshot(get_slow()));
        tokio::time::sleep(Duration::from_millis(50)).await;
        // A queued request would get 200 once the first ends, well inside the 5 s timeout.
        let second = app.clone().oneshot(get_slow()).await.unwrap();
        assert_eq!(second.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(first.await.unwrap().unwrap().status(), StatusCode::OK);
        // Once the first is done, the next is served.
        let third = app.oneshot(get_slow()).await.unwrap();
        assert_eq!(third.status(), StatusCode::OK);
    }

    /// Asserts a 400 problem naming `parameter`.
    async fn check_bad(app: &Router, uri: &str, parameter: &str) {
        let (status, ctype, body) = call(app, uri, None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}: {body}");
        assert_eq!(ctype, "application/problem+json");
        assert_eq!(body["parameter"], parameter, "{uri}: {body}");
        assert!(
            body["detail"].as_str().unwrap().contains(parameter),
            "{body}"
        );
    }

    #[tokio::test]
    async fn bad_parameters_are_400_problems_naming_the_parameter() {
        let dir = tempfile::tempdir().unwrap();
        let app = app(state(dir.path(), None));
        for (uri, parameter) in [
            ("/v1/devices/d1/telemetry?limit=0", "limit"),
            ("/v1/devices/d1/telemetry?limit=abc", "limit"),
            ("/v1/devices/d1/telemetry?limit=1001", "limit"),
            ("/v1/devices/d1/telemetry?since=yesterday", "since"),
            (
                "/v1/devices/d1/telemetry?since=2026-01-02T00:00:00Z&until=2026-01-01T00:00:00Z",
                "until",
            ),
            ("/v1/devices/d1/telemetry?order=up", "order"),
            ("/v1/devices/d1/telemetry?cursor=%%%", "cursor"),
            ("/v1/devices/d1/telemetry?cursor=AAAA", "cursor"),
            ("/v1/devices/d1/telemetry?limt=5", "limt"),
            ("/v1/devices/d1/events?kind=x&sort=1", "sort"),
            ("/v1/devices?limit=-1", "limit"),
            ("/v1/dead-letters?device=a%20b", "device"),
            ("/v1/devices/bad%20id/telemetry", "id"),
        ] {
            check_bad(&app, uri, parameter).await;
        }
    }

    #[tokio::test]
    async fn unknown_device_and_endpoint_are_404_problems() {
        let dir = tempfile::tempdir().unwrap();
        let app = app(state(dir.path(), None));
        let (status, ctype, body) = call(&app, "/v1/devices/nobody", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(ctype, "application/problem+json");
        assert!(body["detail"].as_str().unwrap().contains("nobody"));
        let (status, _, _) = call(&app, "/v1/nothing", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn api_key_is_required_when_configured() {
        let dir = tempfile::tempdir().unwrap();
        let key = "0123456789abcdef-key";
        let app = app(state(dir.path(), Some(key)));
        let (status, ctype, _) = call(&app, "/v1/devices", None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(ctype, "application/problem+json");
        let (status, _, _) = call(&app, "/v1/devices", Some("wrong-key-wrong-key")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, _, body) = call(&app, "/v1/devices", Some(key)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["total"], 0);
        let (status, _, _) = call(&app, "/healthz", None).await;
        assert_eq!(status, StatusCode::OK, "health needs no key");
    }
}
