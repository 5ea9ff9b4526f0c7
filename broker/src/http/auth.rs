//! Who calls the HTTP side-port and whether they may: API keys with a role each (`read` ⊆
//! `write` ⊆ `admin`), and registered devices with their own credentials on the routes a device
//! uses. [`need`] is the one table of what each route requires; [`authorize`] applies it to
//! every route but the open ones: `/healthz`, `/readyz`, `/openapi.json` and the dashboard.
//!
//! API keys are compared as SHA-256 digests in constant time, against every configured key, so
//! neither a key's length nor which key matched shows in the answer's timing. Device secrets
//! go through the edge's [`Authenticator`], so a device that posts often costs one argon2
//! verification per process lifetime, as over MQTT.

use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::{FromRequestParts, MatchedPath, RawPathParams, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use messina_config::{ApiKey, ApiRole};
use messina_storage::{DeviceId, RegisteredDevice, Role};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{ApiError, AppState};
use crate::limit::Rates;
use crate::security::Authenticator;
use crate::tls::PeerCertificate;

/// The configured API keys, the check of device credentials, and each caller's request rate.
pub struct Access {
    /// Replaced whole when the key files change.
    keys: RwLock<Arc<[Key]>>,
    /// Shared with the MQTT edge: one cache of verified secrets, one hash limit.
    pub devices: Arc<Authenticator>,
    /// Requests per second a device may make (0: no limit).
    device_rate: u32,
    /// Requests any caller may make at once above its rate (0: one second's worth).
    burst: u32,
    rates: Rates<String>,
}

#[derive(Clone, PartialEq, Eq)]
struct Key {
    digest: [u8; 32],
    role: ApiRole,
    name: String,
    /// Requests per second (0: no limit).
    rate: u32,
}

fn digest_keys(keys: &[ApiKey]) -> Arc<[Key]> {
    keys.iter()
        .map(|k| Key {
            digest: Sha256::digest(k.key.as_bytes()).into(),
            role: k.role,
            name: k.name.clone(),
            rate: k.max_request_rate,
        })
        .collect()
}

impl Access {
    /// `device_rate` and `burst` are `http.max_request_rate` and `http.request_burst`.
    pub fn new(
        keys: &[ApiKey],
        devices: Arc<Authenticator>,
        device_rate: u32,
        burst: u32,
    ) -> Access {
        Access {
            keys: RwLock::new(digest_keys(keys)),
            devices,
            device_rate,
            burst,
            rates: Rates::default(),
        }
    }

    /// True when no key is configured: every route is open and nothing is checked (allowed
    /// only on a loopback listener, or with `http.open = true`).
    pub fn is_open(&self) -> bool {
        self.current().is_empty()
    }

    fn current(&self) -> Arc<[Key]> {
        Arc::clone(&self.keys.read().expect("API keys"))
    }

    /// Puts `keys` in force from the next request on; `false` when they are the keys in force.
    pub fn replace_keys(&self, keys: &[ApiKey]) -> bool {
        let new = digest_keys(keys);
        let mut current = self.keys.write().expect("API keys");
        if *current == new {
            return false;
        }
        *current = new;
        true
    }

    /// The configured key `given` is, if any.
    fn key(&self, given: &str) -> Option<Key> {
        let digest: [u8; 32] = Sha256::digest(given.as_bytes()).into();
        // Every key is compared, so the time taken does not say which one matched.
        let mut found = None;
        for k in self.current().iter() {
            if bool::from(k.digest.ct_eq(&digest)) {
                found = Some(k.clone());
            }
        }
        found
    }

    /// Takes one request from the caller's rate: `Err` is how long until it may make another.
    fn admit(&self, caller: &Caller) -> Result<(), Duration> {
        match caller {
            Caller::Open => Ok(()),
            Caller::Key { name, .. } => {
                let rate = self
                    .current()
                    .iter()
                    .find(|k| &k.name == name)
                    .map_or(0, |k| k.rate);
                self.rates.take(format!("key {name}"), rate, self.burst)
            }
            Caller::Device(id) => {
                self.rates
                    .take(format!("device {id}"), self.device_rate, self.burst)
            }
        }
    }
}

/// Reads the key files of `config` again every `every` until `shutdown`, putting changed keys
/// in force; a set that does not resolve (a file gone, a bad key) is logged once and the keys
/// in force kept.
pub fn watch_keys(
    state: Arc<AppState>,
    config: messina_config::Config,
    every: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut last_error = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let config = config.clone();
            let Ok(resolved) = tokio::task::spawn_blocking(move || config.api_keys()).await else {
                continue;
            };
            match resolved {
                Ok(keys) => {
                    last_error = None;
                    if state.access.replace_keys(&keys) {
                        let names: std::collections::BTreeSet<&str> =
                            keys.iter().map(|k| k.name.as_str()).collect();
                        tracing::info!(keys = keys.len(), names = ?names, "API keys reloaded from their files");
                    }
                }
                Err(e) => {
                    let text = e.to_string();
                    if last_error.as_ref() != Some(&text) {
                        tracing::warn!(error = %text, "the API key files changed but do not resolve; the keys in force stay");
                        last_error = Some(text);
                    }
                }
            }
        }
    })
}

/// Who a request authenticated as; handlers read it from the request extensions (for logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// No key is configured: the API is open.
    Open,
    /// An API key, by its configured name.
    Key { name: String, role: ApiRole },
    /// A registered device with its own credentials.
    Device(DeviceId),
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Open => f.write_str("open API"),
            Caller::Key { name, .. } => write!(f, "API key `{name}`"),
            Caller::Device(id) => write!(f, "device `{id}`"),
        }
    }
}

/// What a route requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Need {
    /// The least API key role that may call it.
    pub role: ApiRole,
    /// Whether the device its `{id}` names may call it with its own credentials.
    pub device: bool,
}

/// The routes a device calls for itself, with its own credentials.
const DEVICE_ROUTES: [&str; 4] = [
    "/v1/devices/{id}/telemetry",
    "/v1/devices/{id}/events",
    "/v1/devices/{id}/uploads",
    "/v1/devices/{id}/uploads/{upload}/complete",
];

/// What calling `method` on the route `path` (its template, e.g. `/v1/devices/{id}`) requires:
/// the registry under `/v1/admin/` needs admin; reading (`GET`) needs read; everything else
/// (device data, alert acknowledgements, upload URLs) needs write, and the routes a device
/// calls for itself accept that device's own credentials too.
pub fn need(method: &Method, path: &str) -> Need {
    if path == "/v1/admin" || path.starts_with("/v1/admin/") {
        return Need {
            role: ApiRole::Admin,
            device: false,
        };
    }
    if method == Method::GET || method == Method::HEAD {
        return Need {
            role: ApiRole::Read,
            device: false,
        };
    }
    Need {
        role: ApiRole::Write,
        device: method == Method::POST && DEVICE_ROUTES.contains(&path),
    }
}

/// Credentials as sent.
enum Credentials<'a> {
    /// `Bearer <token>`: an API key, or `<device-id>:<secret>`.
    Bearer(&'a str),
    /// `Basic base64(<device-id>:<secret>)`.
    Basic(String, String),
    /// An `Authorization` header this API cannot read.
    Unreadable(&'static str),
}

fn credentials(headers: &HeaderMap) -> Option<Credentials<'_>> {
    let value = headers.get(header::AUTHORIZATION)?;
    let Ok(value) = value.to_str() else {
        return Some(Credentials::Unreadable(
            "the `Authorization` header is not ASCII",
        ));
    };
    let (scheme, rest) = value.trim().split_once(' ').unwrap_or((value, ""));
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(Credentials::Bearer(rest));
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = STANDARD
            .decode(rest)
            .ok()
            .and_then(|b| String::from_utf8(b).ok());
        return Some(match decoded.as_deref().and_then(|d| d.split_once(':')) {
            Some((user, password)) => Credentials::Basic(user.to_string(), password.to_string()),
            None => Credentials::Unreadable(
                "HTTP Basic credentials must be base64 of `<device-id>:<secret>`",
            ),
        });
    }
    Some(Credentials::Unreadable(
        "the `Authorization` scheme must be `Bearer` (an API key) or, for a device, `Basic`",
    ))
}

/// How to authenticate on a route, for the 401 answers.
fn how(need: Need) -> String {
    let key = format!(
        "send an API key with role `{}` or higher as `Authorization: Bearer <key>`",
        need.role
    );
    if need.device {
        format!(
            "{key}, or, as the device itself, its id and secret as HTTP Basic (user name = \
             device id, password = secret) or `Authorization: Bearer <device-id>:<secret>`"
        )
    } else {
        key
    }
}

fn unauthorized(need: Need, detail: String) -> Response {
    metrics::counter!("messina_http_refused_total", "status" => "401").increment(1);
    let mut response = ApiError {
        status: StatusCode::UNAUTHORIZED,
        title: "Unauthorized",
        detail,
        parameter: None,
    }
    .into_response();
    let headers = response.headers_mut();
    headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    if need.device {
        headers.append(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"messina\", charset=\"UTF-8\""),
        );
    }
    response
}

/// 429 with `Retry-After` (whole seconds, at least 1).
fn too_many(caller: &Caller, wait: Duration) -> Response {
    metrics::counter!("messina_http_refused_total", "status" => "429").increment(1);
    let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
    tracing::debug!(%caller, retry_after = seconds, "request over its rate");
    let mut response = ApiError {
        status: StatusCode::TOO_MANY_REQUESTS,
        title: "Too Many Requests",
        detail: format!(
            "{caller} is over its request rate (`http.max_request_rate`, or the key's own \
             `max_request_rate`); retry after {seconds} s"
        ),
        parameter: None,
    }
    .into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    response
}

fn forbidden(detail: String) -> Response {
    metrics::counter!("messina_http_refused_total", "status" => "403").increment(1);
    ApiError {
        status: StatusCode::FORBIDDEN,
        title: "Forbidden",
        detail,
        parameter: None,
    }
    .into_response()
}

/// The middleware: answers 401 (no or unknown credentials) or 403 (known, but not allowed
/// here) as problems that say what to send instead, 429 when the caller is over its request
/// rate, or passes the request on with its [`Caller`].
pub async fn authorize(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let (mut parts, body) = request.into_parts();
    let caller = match check(&state, &mut parts).await {
        Ok(caller) => caller,
        Err(refusal) => return refusal,
    };
    if let Err(wait) = state.access.admit(&caller) {
        return too_many(&caller, wait);
    }
    parts.extensions.insert(caller);
    next.run(Request::from_parts(parts, body)).await
}

async fn check(state: &AppState, parts: &mut Parts) -> Result<Caller, Response> {
    if state.access.is_open() {
        return Ok(Caller::Open);
    }
    let path = match parts.extensions.get::<MatchedPath>() {
        Some(m) => m.as_str().to_string(),
        None => parts.uri.path().to_string(),
    };
    let need = need(&parts.method, &path);
    let what = format!("{} {}", parts.method, parts.uri.path());
    // The device a device route is for (its `{id}`).
    let target = match RawPathParams::from_request_parts(parts, state).await {
        Ok(params) => params
            .iter()
            .find(|(name, _)| *name == "id")
            .map(|(_, v)| v.to_string()),
        Err(_) => None,
    };
    match credentials(&parts.headers) {
        None => match parts.extensions.get::<PeerCertificate>().cloned() {
            Some(certificate) => {
                device_by_certificate(state, need, &what, target, &certificate).await
            }
            None => Err(unauthorized(
                need,
                format!("{what} needs credentials: {}", how(need)),
            )),
        },
        Some(Credentials::Unreadable(why)) => {
            Err(unauthorized(need, format!("{why}; {}", how(need))))
        }
        Some(Credentials::Bearer(token)) => match state.access.key(token) {
            Some(key) if key.role >= need.role => Ok(Caller::Key {
                name: key.name.clone(),
                role: key.role,
            }),
            Some(key) => Err(forbidden(format!(
                "the API key `{}` has role `{}`, and {what} needs `{}`; use a key with that role \
                 (`http.api_keys`)",
                key.name, key.role, need.role
            ))),
            None => match token.split_once(':') {
                Some((id, secret)) => device(state, need, &what, target, id, secret).await,
                None => Err(unauthorized(
                    need,
                    format!(
                        "the API key is not one this server knows (`http.api_keys`; key files \
                         are read again every `http.key_reload_secs`); {}",
                        how(need)
                    ),
                )),
            },
        },
        Some(Credentials::Basic(id, secret)) => {
            device(state, need, &what, target, &id, &secret).await
        }
    }
}

/// Checks a device's own credentials, and that this route is one it may call for itself.
async fn device(
    state: &AppState,
    need: Need,
    what: &str,
    target: Option<String>,
    id: &str,
    secret: &str,
) -> Result<Caller, Response> {
    let refused = || {
        unauthorized(
            need,
            format!(
                "`{id}` with that secret is not an active registered device; use the secret \
                 `messina devices add` (or `rotate`, or the admin API) gave it, or {}",
                how(need)
            ),
        )
    };
    let Ok(id) = DeviceId::new(id) else {
        return Err(refused());
    };
    let device = match state
        .access
        .devices
        .verify_device_secret(&id, secret.as_bytes())
        .await
    {
        Ok(Some(d)) => d,
        Ok(None) => return Err(refused()),
        Err(e) => return Err(ApiError::from(e).into_response()),
    };
    device_may(need, what, target, device).map_err(forbidden)
}

/// Checks the client certificate an HTTPS connection verified, as a CONNECT over mutual TLS
/// would, and that this route is one its device may call for itself.
async fn device_by_certificate(
    state: &AppState,
    need: Need,
    what: &str,
    target: Option<String>,
    certificate: &PeerCertificate,
) -> Result<Caller, Response> {
    match state
        .access
        .devices
        .verify_device_certificate(certificate)
        .await
    {
        Ok(Some(device)) => device_may(need, what, target, device).map_err(forbidden),
        Ok(None) => Err(unauthorized(
            need,
            format!(
                "the client certificate (CN {:?}) names no active registered device that                  accepts it; register the device with its certificate (`messina devices add                  ID --certificate-sha256 ...`), or {}",
                certificate.common_name.as_deref().unwrap_or(""),
                how(need)
            ),
        )),
        Err(e) => Err(ApiError::from(e).into_response()),
    }
}

/// Whether an authenticated device may call this route: only a device identity, only the
/// routes a device calls for itself, only for its own id; otherwise why not (for a 403).
fn device_may(
    need: Need,
    what: &str,
    target: Option<String>,
    device: RegisteredDevice,
) -> Result<Caller, String> {
    let id = device.id;
    if device.role != Role::Device {
        return Err(format!(
            "`{id}` is a {} identity; its credentials are for MQTT, and {what} needs an API key \
             with role `{}`",
            device.role, need.role
        ));
    }
    if !need.device {
        return Err(format!(
            "device credentials may only post the device's own data and ask for its own upload \
             URLs; {what} needs an API key with role `{}`",
            need.role
        ));
    }
    if target.as_deref() != Some(id.as_str()) {
        return Err(format!(
            "device `{id}` may post only for itself, not for `{}`; each device uses its own \
             credentials",
            target.unwrap_or_default()
        ));
    }
    Ok(Caller::Device(id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::tests::{basic, bearer, send, state_with, Answer, Setup};
    use crate::security::provision::{self, NewDevice};
    use serde_json::{json, Value};

    const READ: &str = "read-key-0123456789";
    const WRITE: &str = "write-key-0123456789";
    const ADMIN: &str = "admin-key-0123456789";
    const KEYS: [(&str, ApiRole); 3] = [
        (READ, ApiRole::Read),
        (WRITE, ApiRole::Write),
        (ADMIN, ApiRole::Admin),
    ];

    fn reading() -> Option<Value> {
        Some(json!({"ts": crate::clock::now_millis(), "seq": 1, "battery": 80}))
    }

    /// Asserts a 401 problem with its `Bearer` challenge.
    fn check_401(a: &Answer, what: &str) {
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{what}: {:?}", a.body);
        assert_eq!(a.headers[header::WWW_AUTHENTICATE], "Bearer", "{what}");
        assert!(
            a.body["detail"].as_str().unwrap().contains("Bearer"),
            "{what}: says what to send: {}",
            a.body
        );
    }

    #[tokio::test]
    async fn each_key_role_may_call_its_routes_and_no_more() {
        let dir = tempfile::tempdir().unwrap();
        let app = crate::http::app(state_with(
            dir.path(),
            Setup {
                keys: &KEYS,
                ingest: true,
                ..Setup::default()
            },
        ));
        // (method, uri, body, the least role that may, the status past the check)
        let routes: [(Method, &str, Option<Value>, ApiRole, StatusCode); 9] = [
            (
                Method::GET,
                "/v1/devices",
                None,
                ApiRole::Read,
                StatusCode::OK,
            ),
            (
                Method::GET,
                "/v1/devices/d1/telemetry",
                None,
                ApiRole::Read,
                StatusCode::OK,
            ),
            (Method::GET, "/metrics", None, ApiRole::Read, StatusCode::OK),
            (
                Method::GET,
                "/v1/registry/devices",
                None,
                ApiRole::Read,
                StatusCode::OK,
            ),
            (
                Method::POST,
                "/v1/devices/d1/telemetry",
                reading(),
                ApiRole::Write,
                StatusCode::ACCEPTED,
            ),
            // Alerts and uploads are off in this app: past the check, they are 404.
            (
                Method::POST,
                "/v1/alerts/a1/ack",
                None,
                ApiRole::Write,
                StatusCode::NOT_FOUND,
            ),
            (
                Method::POST,
                "/v1/devices/d1/uploads",
                Some(json!({"kind": "log", "content_type": "text/plain", "size": 10})),
                ApiRole::Write,
                StatusCode::NOT_FOUND,
            ),
            (
                Method::GET,
                "/v1/admin/devices",
                None,
                ApiRole::Admin,
                StatusCode::OK,
            ),
            (
                Method::POST,
                "/v1/admin/devices/d1/revoke",
                None,
                ApiRole::Admin,
                StatusCode::NOT_FOUND,
            ),
        ];
        for (method, uri, body, least, past) in routes {
            let what = format!("{method} {uri}");
            let a = send(&app, method.clone(), uri, None, body.clone()).await;
            check_401(&a, &format!("{what} without a key"));
            let a = send(
                &app,
                method.clone(),
                uri,
                Some(&bearer("not-a-key-of-this-server")),
                body.clone(),
            )
            .await;
            check_401(&a, &format!("{what} with an unknown key"));
            for (key, role) in KEYS {
                let a = send(&app, method.clone(), uri, Some(&bearer(key)), body.clone()).await;
                if role >= least {
                    assert_eq!(a.status, past, "{what} with {role}: {}", a.body);
                } else {
                    assert_eq!(a.status, StatusCode::FORBIDDEN, "{what} with {role}");
                    let detail = a.body["detail"].as_str().unwrap();
                    assert!(
                        detail.contains(&format!("`{least}`")) && detail.contains("http.api_keys"),
                        "{what} with {role}: says which role to use: {detail}"
                    );
                }
            }
        }
        // Probes need nothing.
        for uri in ["/healthz", "/readyz"] {
            let a = send(&app, Method::GET, uri, None, None).await;
            assert_eq!(a.status, StatusCode::OK, "{uri}");
        }
    }

    #[tokio::test]
    async fn each_key_and_device_has_its_own_request_rate() {
        let dir = tempfile::tempdir().unwrap();
        let state = state_with(
            dir.path(),
            Setup {
                keys: &KEYS,
                ingest: true,
                rate: 2,
                ..Setup::default()
            },
        );
        let app = crate::http::app(Arc::clone(&state));
        let secret = provision::add(&state.storage, &NewDevice::new("d1"))
            .await
            .unwrap()
            .secret
            .unwrap();
        let get = |auth: String| {
            let app = app.clone();
            async move { send(&app, Method::GET, "/v1/devices", Some(&auth), None).await }
        };
        // The burst (one second's worth), then 429 with when to retry.
        for _ in 0..2 {
            assert_eq!(get(bearer(READ)).await.status, StatusCode::OK);
        }
        let over = get(bearer(READ)).await;
        assert_eq!(over.status, StatusCode::TOO_MANY_REQUESTS, "{}", over.body);
        assert_eq!(over.headers[header::RETRY_AFTER], "1");
        assert_eq!(
            over.headers[header::CONTENT_TYPE],
            "application/problem+json"
        );
        assert!(
            over.body["detail"]
                .as_str()
                .unwrap()
                .contains("max_request_rate"),
            "{}",
            over.body
        );
        // Another key, and a device, are not slowed by it.
        assert_eq!(get(bearer(WRITE)).await.status, StatusCode::OK);
        let post = || {
            let app = app.clone();
            let auth = basic("d1", &secret);
            async move {
                send(
                    &app,
                    Method::POST,
                    "/v1/devices/d1/telemetry",
                    Some(&auth),
                    reading(),
                )
                .await
            }
        };
        for _ in 0..2 {
            assert_eq!(post().await.status, StatusCode::ACCEPTED);
        }
        assert_eq!(post().await.status, StatusCode::TOO_MANY_REQUESTS);
        // Probes have no rate.
        for _ in 0..5 {
            let a = send(&app, Method::GET, "/healthz", None, None).await;
            assert_eq!(a.status, StatusCode::OK);
        }
    }

    #[tokio::test]
    async fn replaced_keys_are_in_force_from_the_next_request() {
        let dir = tempfile::tempdir().unwrap();
        let state = state_with(
            dir.path(),
            Setup {
                keys: &KEYS,
                ..Setup::default()
            },
        );
        let app = crate::http::app(Arc::clone(&state));
        let status = |key: &'static str| {
            let app = app.clone();
            async move {
                send(&app, Method::GET, "/v1/devices", Some(&bearer(key)), None)
                    .await
                    .status
            }
        };
        const NEW: &str = "rotated-read-key-0123456789";
        assert_eq!(status(NEW).await, StatusCode::UNAUTHORIZED);
        let key = |key: &str| ApiKey {
            name: "analytics".into(),
            role: ApiRole::Read,
            key: key.into(),
            max_request_rate: 0,
        };
        // Old and new side by side while callers move, then the new one alone.
        assert!(state.access.replace_keys(&[key(READ), key(NEW)]));
        assert!(
            !state.access.replace_keys(&[key(READ), key(NEW)]),
            "unchanged"
        );
        assert_eq!(status(READ).await, StatusCode::OK);
        assert_eq!(status(NEW).await, StatusCode::OK);
        assert!(state.access.replace_keys(&[key(NEW)]));
        assert_eq!(status(READ).await, StatusCode::UNAUTHORIZED);
        assert_eq!(status(NEW).await, StatusCode::OK);
        assert_eq!(
            status(ADMIN).await,
            StatusCode::UNAUTHORIZED,
            "gone with the old set"
        );
    }

    #[tokio::test]
    async fn without_keys_everything_is_open() {
        let dir = tempfile::tempdir().unwrap();
        let app = crate::http::app(state_with(
            dir.path(),
            Setup {
                ingest: true,
                ..Setup::default()
            },
        ));
        for (method, uri, body, status) in [
            (Method::GET, "/v1/devices", None, StatusCode::OK),
            (Method::GET, "/metrics", None, StatusCode::OK),
            (Method::GET, "/v1/admin/devices", None, StatusCode::OK),
            (
                Method::POST,
                "/v1/devices/d1/telemetry",
                reading(),
                StatusCode::ACCEPTED,
            ),
        ] {
            let a = send(&app, method.clone(), uri, None, body).await;
            assert_eq!(a.status, status, "{method} {uri}: {}", a.body);
        }
    }

    #[tokio::test]
    async fn a_device_posts_its_own_data_with_its_own_credentials_only() {
        let dir = tempfile::tempdir().unwrap();
        let state = state_with(
            dir.path(),
            Setup {
                keys: &KEYS,
                ingest: true,
                ..Setup::default()
            },
        );
        let app = crate::http::app(Arc::clone(&state));
        let add = |id: &str, role: &str| {
            let mut new = NewDevice::new(id);
            new.role = role.into();
            let storage = Arc::clone(&state.storage);
            async move {
                provision::add(&storage, &new)
                    .await
                    .unwrap()
                    .secret
                    .unwrap()
            }
        };
        let s1 = add("d1", "device").await;
        let s2 = add("d2", "device").await;
        let manager = add("mgr-1", "fleet_manager").await;
        let post = |uri: &'static str, auth: String| {
            let app = app.clone();
            async move { send(&app, Method::POST, uri, Some(&auth), reading()).await }
        };
        // Its own data, both ways of sending the credentials, again and again (cached).
        for _ in 0..3 {
            let a = post("/v1/devices/d1/telemetry", basic("d1", &s1)).await;
            assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
        }
        let a = post("/v1/devices/d1/events", format!("Bearer d1:{s1}")).await;
        // Past the check: an event without `kind` is refused by validation, not by auth.
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.body);
        let a = post("/v1/devices/d2/telemetry", format!("Bearer d2:{s2}")).await;
        assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
        // Upload URLs for itself pass the check (uploads are off here: 404).
        let a = post("/v1/devices/d1/uploads", basic("d1", &s1)).await;
        assert_eq!(a.status, StatusCode::NOT_FOUND, "{}", a.body);

        // Another device's data, or its uploads: 403, even with valid credentials.
        for uri in ["/v1/devices/d2/telemetry", "/v1/devices/d2/uploads"] {
            let a = post(uri, basic("d1", &s1)).await;
            assert_eq!(a.status, StatusCode::FORBIDDEN, "{uri}: {}", a.body);
            assert!(a.body["detail"]
                .as_str()
                .unwrap()
                .contains("only for itself"));
        }
        // A wrong secret, another device's secret, an unknown device: 401 with both challenges.
        for auth in [
            basic("d1", "not-the-secret"),
            basic("d1", &s2),
            format!("Bearer d1:{s2}"),
            basic("nobody", &s1),
            basic("bad id", &s1),
        ] {
            let a = post("/v1/devices/d1/telemetry", auth.clone()).await;
            check_401(&a, &auth);
            let challenges: Vec<_> = a.headers.get_all(header::WWW_AUTHENTICATE).iter().collect();
            assert_eq!(challenges.len(), 2, "Bearer and Basic: {challenges:?}");
        }
        // Device credentials are not API keys: queries and the registry need a key.
        for (method, uri) in [
            (Method::GET, "/v1/devices/d1/telemetry"),
            (Method::GET, "/v1/admin/devices"),
            (Method::POST, "/v1/alerts/a1/ack"),
        ] {
            let a = send(&app, method, uri, Some(&basic("d1", &s1)), None).await;
            assert_eq!(a.status, StatusCode::FORBIDDEN, "{uri}: {}", a.body);
        }
        // Only devices post for themselves; a fleet manager needs an API key.
        let a = post("/v1/devices/mgr-1/telemetry", basic("mgr-1", &manager)).await;
        assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.body);
        // An unreadable header is a 401 that says so.
        let a = post("/v1/devices/d1/telemetry", "Digest x=1".into()).await;
        check_401(&a, "Digest");
        assert!(a.body["detail"].as_str().unwrap().contains("scheme"));
    }

    #[test]
    fn every_route_class_needs_its_role() {
        // (method, route, role, whether the device's own credentials also do)
        let table = [
            (Method::GET, "/v1/devices", ApiRole::Read, false),
            (
                Method::GET,
                "/v1/devices/{id}/telemetry",
                ApiRole::Read,
                false,
            ),
            (Method::GET, "/metrics", ApiRole::Read, false),
            (Method::GET, "/v1/registry/devices", ApiRole::Read, false),
            (
                Method::POST,
                "/v1/devices/{id}/telemetry",
                ApiRole::Write,
                true,
            ),
            (
                Method::POST,
                "/v1/devices/{id}/events",
                ApiRole::Write,
                true,
            ),
            (
                Method::POST,
                "/v1/devices/{id}/uploads",
                ApiRole::Write,
                true,
            ),
            (
                Method::POST,
                "/v1/devices/{id}/uploads/{upload}/complete",
                ApiRole::Write,
                true,
            ),
            (Method::POST, "/v1/alerts/{id}/ack", ApiRole::Write, false),
            (Method::GET, "/v1/admin/devices", ApiRole::Admin, false),
            (Method::POST, "/v1/admin/devices", ApiRole::Admin, false),
            (
                Method::PATCH,
                "/v1/admin/devices/{id}",
                ApiRole::Admin,
                false,
            ),
            (
                Method::POST,
                "/v1/admin/devices/{id}/revoke",
                ApiRole::Admin,
                false,
            ),
        ];
        for (method, path, role, device) in table {
            assert_eq!(
                need(&method, path),
                Need { role, device },
                "{method} {path}"
            );
        }
    }
}
