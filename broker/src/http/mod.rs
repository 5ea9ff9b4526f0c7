//! The HTTP side-port: JSON queries under `/v1`, device data posted over HTTP (`ingest`), the
//! device registry (`admin`), health, readiness and Prometheus metrics. Every route but
//! `/healthz` and `/readyz` passes `auth` (API keys with roles, or a device's own
//! credentials). Handlers read through the storage trait; every error is
//! `application/problem+json` that names the problem.
//!
//! This file holds what every handler shares (the state, the router, the error type, the
//! query parameters and the limits around the port); the handlers are in a file per resource
//! (`devices`, `aggregates`, `alerts`, `uploads`, `admin`, `ingest`, `live`, `health`,
//! `dashboard`), each with its `routes()`.
//!
//! A route is added in one place: its handler, annotated with `#[utoipa::path(...)]` (method,
//! path relative to `/v1`, parameters, body, answers; the body types are the `json` shapes
//! it returns), registered with `.routes(routes!(handler))` in its resource's `routes()`. The
//! router and the OpenAPI document (`openapi`) are both built from those registrations, and
//! `openapi::tests` checks that every route is documented and that the document is valid.

pub mod admin;
pub mod aggregates;
pub mod alerts;
pub mod auth;
pub mod dashboard;
pub mod devices;
pub mod health;
pub mod ingest;
pub mod live;
pub mod openapi;
pub mod uploads;

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::Request;
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use messina_bridge::alerts::AlertService;
use messina_storage::{
    Cursor, DeviceId, Millis, Order, PageRequest, Storage, StorageError, TimeRange,
};
use metrics_exporter_prometheus::PrometheusHandle;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;

use crate::json::Problem;
use crate::tls::PeerCertificate;
use crate::uploads::UploadService;

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
    /// Places for live streams (`http.max_event_streams`).
    pub streams: Arc<tokio::sync::Semaphore>,
    /// Cancelled at shutdown: live streams end.
    pub shutdown: tokio_util::sync::CancellationToken,
}

/// The routes under `/v1`, each with its documentation, by resource.
fn v1_routes() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new()
        .merge(devices::routes())
        .merge(aggregates::routes())
        .merge(alerts::routes())
        .merge(uploads::routes())
        .merge(admin::routes())
        .merge(live::routes())
}

/// The routes served without credentials: the probes and the API's description (load
/// balancers, orchestrators and API tools read them without credentials) and the dashboard's
/// page, which holds no data and asks its user for a key.
fn open_routes() -> OpenApiRouter<Arc<AppState>> {
    health::open_routes().merge(dashboard::routes())
}

/// The whole HTTP API as a router, testable without a socket.
pub fn app(state: Arc<AppState>) -> Router {
    let authorize = middleware::from_fn_with_state(state.clone(), auth::authorize);
    let (v1, _) = v1_routes().split_for_parts();
    let v1 = v1
        .fallback(not_found)
        .route_layer(authorize.clone())
        .layer(axum::extract::DefaultBodyLimit::max(state.max_body_bytes));
    let (guarded, _) = health::guarded_routes().split_for_parts();
    let (open, _) = open_routes().split_for_parts();
    let (timeout, max_concurrent) = (state.request_timeout, state.max_concurrent_requests);
    let cors = cors(&state.cors_origins);
    let router = Router::new()
        .nest("/v1", v1)
        .merge(guarded.route_layer(authorize))
        .merge(open)
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

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Problem {
            detail: self.detail,
            parameter: self.parameter,
            status: self.status.as_u16(),
            title: self.title.to_string(),
            kind: "about:blank".to_string(),
        };
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

/// Query parameters, checked against the names an endpoint accepts, so a typo is an error rather
/// than a silently ignored filter.
struct Params {
    map: HashMap<String, String>,
}

/// A page of a listing.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // Read as documentation and as the names `Params` accepts.
pub struct PageParams {
    /// Items per page, 1 to `http.max_page_size` (default `http.default_page_size`).
    limit: Option<usize>,
    /// The `next_cursor` of the previous page, unchanged.
    cursor: Option<String>,
}

/// A half-open time range `[since, until)` ([`Params::range`]).
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // Read as documentation and as the names `Params` accepts.
pub struct RangeParams {
    /// From this time on: RFC 3339 or milliseconds since the epoch.
    since: Option<String>,
    /// Before this time: RFC 3339 or milliseconds since the epoch.
    until: Option<String>,
}

/// The order of a time-ordered listing ([`Params::order`]).
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // Read as documentation and as the names `Params` accepts.
pub struct OrderParams {
    /// `newest` (or `desc`, the default) or `oldest` (or `asc`) first.
    #[param(pattern = "^(newest|desc|oldest|asc)$")]
    order: Option<String>,
}

/// Declares an endpoint's query parameters as the concatenation of parameter groups, so that a
/// group (a page, a time range) is documented once and the endpoint's document and the names
/// [`Params::of`] accepts stay one list.
macro_rules! query_params {
    ($(#[$doc:meta])* $vis:vis struct $name:ident = $($group:ty),+ $(,)?) => {
        $(#[$doc])*
        $vis struct $name;

        impl utoipa::IntoParams for $name {
            fn into_params(
                parameter_in: impl Fn() -> Option<utoipa::openapi::path::ParameterIn>,
            ) -> Vec<utoipa::openapi::path::Parameter> {
                let mut all = Vec::new();
                $(all.extend(<$group as utoipa::IntoParams>::into_params(&parameter_in));)+
                all
            }
        }
    };
}
use query_params;

impl Params {
    /// The query, checked against the parameters `Q` documents: the document and the check are
    /// one list.
    fn of<Q: IntoParams>(map: HashMap<String, String>) -> ApiResult<Self> {
        let names: Vec<String> = Q::into_params(|| None)
            .into_iter()
            .map(|p| p.name)
            .collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        Params::new(map, &names)
    }

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
        crate::clock::parse_rfc3339(v)
            .map(Some)
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::{HeaderMap, Request};
    use axum::routing::get;
    use base64::engine::general_purpose::STANDARD;
    use messina_config::{Anonymous, ApiKey, ApiRole};
    use messina_storage::embedded::{EmbeddedOptions, EmbeddedStorage};
    use serde_json::Value;
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
        let live = headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|t| t.as_bytes().starts_with(b"text/event-stream"));
        let bytes = if live {
            // A live stream never ends: its first event is the answer.
            first_event(res.into_body()).await
        } else {
            axum::body::to_bytes(res.into_body(), 1 << 20)
                .await
                .unwrap()
        };
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

    /// The first event of a server-sent-event body (up to its blank line), within 5 s.
    pub(crate) async fn first_event(body: Body) -> bytes::Bytes {
        use futures::StreamExt;
        let mut data = body.into_data_stream();
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while !got.windows(2).any(|w| w == b"\n\n") {
            let chunk = tokio::time::timeout_at(deadline, data.next())
                .await
                .expect("an event within 5 s")
                .expect("the stream goes on")
                .unwrap();
            got.extend_from_slice(&chunk);
        }
        got.into()
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
            streams: Arc::new(tokio::sync::Semaphore::new(4)),
            shutdown: tokio_util::sync::CancellationToken::new(),
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
            ("/v1/devices/d1/telemetry/aggregate?bucket=1h&since=0", "metric"),
            (
                "/v1/devices/d1/telemetry/aggregate?metric=battery&since=0",
                "bucket",
            ),
            (
                "/v1/devices/d1/telemetry/aggregate?metric=battery&bucket=2h&since=0",
                "bucket",
            ),
            ("/v1/fleet/aggregate?metric=battery&bucket=1h", "since"),
            (
                "/v1/fleet/aggregate?metric=battery&bucket=1h&since=yesterday",
                "since",
            ),
            (
                "/v1/fleet/aggregate?metric=battery&bucket=1h&since=9999999999999",
                "since",
            ),
            (
                "/v1/fleet/aggregate?metric=rssi&bucket=1m&since=2026-01-02T00:00:00Z&until=2026-01-01T00:00:00Z",
                "until",
            ),
            // Ten days of minutes: 14,400 buckets.
            (
                "/v1/fleet/aggregate?metric=rssi&bucket=1m&since=0&until=864000000",
                "since",
            ),
            ("/v1/fleet/aggregate?metric=rssi&bucket=1h&since=0&limit=5", "limit"),
            (
                "/v1/devices/bad%20id/telemetry/aggregate?metric=rssi&bucket=1h&since=0",
                "id",
            ),
        ] {
            check_bad(&app, uri, parameter).await;
        }
    }

    #[tokio::test]
    async fn aggregates_per_bucket_of_a_device_and_of_the_fleet() {
        let dir = tempfile::tempdir().unwrap();
        let key = "read-only-key-0123456789";
        let state = state_with(
            dir.path(),
            Setup {
                keys: &[(key, ApiRole::Read)],
                ..Setup::default()
            },
        );
        // 2026-01-01T00:00:00Z
        const T: Millis = 1_767_225_600_000;
        let reading = |device: &str, s: i64, seq: u64, battery: f64| messina_storage::Reading {
            device: DeviceId::new(device).unwrap(),
            ts: T + s * 1000,
            seq,
            received_at: T + s * 1000,
            battery: Some(battery),
            rssi: None,
            online: None,
            metrics: std::collections::BTreeMap::new(),
            attrs: std::collections::BTreeMap::new(),
        };
        let batch = messina_storage::Batch {
            readings: vec![
                reading("d1", 10, 1, 50.0),
                reading("d1", 40, 2, 70.0),
                reading("d1", 65, 3, 60.0),
                reading("d2", 20, 1, 10.0),
            ],
            ..Default::default()
        };
        state.storage.write_batch(&batch).await.unwrap();
        // Redelivered: counted once.
        state.storage.write_batch(&batch).await.unwrap();
        let app = app(state);
        let range = "since=2026-01-01T00:00:00Z&until=2026-01-01T00:02:00Z";
        let uri = format!("/v1/devices/d1/telemetry/aggregate?metric=battery&bucket=1m&{range}");
        let (status, _, body) = call(&app, &uri, Some(key)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(
            body,
            serde_json::json!({
                "device_id": "d1",
                "metric": "battery",
                "bucket": "1m",
                "since": "2026-01-01T00:00:00Z",
                "until": "2026-01-01T00:02:00Z",
                "buckets": [
                    {"start": "2026-01-01T00:00:00Z", "start_ms": T, "count": 2, "min": 50.0,
                     "max": 70.0, "avg": 60.0, "sum": 120.0, "first": 50.0, "last": 70.0},
                    {"start": "2026-01-01T00:01:00Z", "start_ms": T + 60_000, "count": 1,
                     "min": 60.0, "max": 60.0, "avg": 60.0, "sum": 60.0, "first": 60.0,
                     "last": 60.0},
                ],
            })
        );
        // The fleet, in one hour bucket; `since` cuts off d1's first reading.
        let uri = "/v1/fleet/aggregate?metric=battery&bucket=1h&since=2026-01-01T00:00:15Z&until=2026-01-01T01:00:00Z";
        let (status, _, body) = call(&app, uri, Some(key)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["since"], "2026-01-01T00:00:15Z");
        assert!(body.get("device_id").is_none(), "{body}");
        let buckets = body["buckets"].as_array().unwrap();
        assert_eq!(buckets.len(), 1, "{body}");
        let b = &buckets[0];
        assert_eq!(b["start"], "2026-01-01T00:00:00Z");
        assert_eq!(
            (&b["count"], &b["min"], &b["max"], &b["first"], &b["last"]),
            (
                &serde_json::json!(3),
                &serde_json::json!(10.0),
                &serde_json::json!(70.0),
                &serde_json::json!(10.0),
                &serde_json::json!(60.0)
            )
        );
        // A metric nobody sent has no buckets.
        let uri = format!("/v1/fleet/aggregate?metric=temp_c&bucket=1d&{range}");
        let (status, _, body) = call(&app, &uri, Some(key)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["buckets"], serde_json::json!([]));
        let (status, _, _) = call(&app, &uri, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "the read role is needed");
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
