//! `[http]`: the HTTP side-port and its API keys.

use super::*;

/// What an HTTP API key may do; each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApiRole {
    /// Every `GET` under `/v1/...` (queries, the registry without credentials) and `/metrics`.
    Read,
    /// Read, and device data posted for any device, alert acknowledgements and upload URLs.
    Write,
    /// Write, and the device registry under `/v1/admin/...`.
    Admin,
}

impl ApiRole {
    pub fn as_str(self) -> &'static str {
        match self {
            ApiRole::Read => "read",
            ApiRole::Write => "write",
            ApiRole::Admin => "admin",
        }
    }
}

impl fmt::Display for ApiRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One entry of `http.api_keys`: a key from exactly one source, and its role.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// The key itself (at least 16 printable ASCII characters without spaces).
    #[serde(default)]
    pub key: String,
    /// A file whose first line is the key (e.g. a mounted secret).
    #[serde(default)]
    pub key_file: String,
    /// An environment variable holding the key.
    #[serde(default)]
    pub key_env: String,
    /// `read`, `write` or `admin`.
    pub role: ApiRole,
    /// A name for the logs (never the key); by default its place, `http.api_keys[N]`.
    #[serde(default)]
    pub name: String,
    /// Requests per second this key may make, instead of `http.max_request_rate` (0: no
    /// limit).
    #[serde(default)]
    pub max_request_rate: Option<u32>,
}

/// An HTTP API key resolved from its source. `Debug` does not show the key.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey {
    /// What the logs call it: the entry's `name`, or the key that configured it.
    pub name: String,
    pub role: ApiRole,
    pub key: String,
    /// Requests per second it may make (0: no limit).
    pub max_request_rate: u32,
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKey")
            .field("name", &self.name)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// The shortest API key accepted.
pub const MIN_API_KEY_LEN: usize = 16;

section! {
    /// The HTTP side-port: queries and device data (`/v1/...`), the device registry
    /// (`/v1/admin/devices`), `/healthz`, `/readyz` and Prometheus `/metrics`.
    ///
    /// Callers send an API key as `Authorization: Bearer <key>`. A `read` key may `GET`
    /// everything under `/v1/...` and `/metrics`; a `write` key may also post device data for
    /// any device, acknowledge alerts and ask for upload URLs; an `admin` key may also manage
    /// the device registry under `/v1/admin/...`. A registered device may post its own data
    /// and ask for its own upload URLs with its own credentials instead: HTTP Basic with the
    /// device id as user name and its secret as password, or `Authorization: Bearer
    /// <device-id>:<secret>`. `/healthz` and `/readyz` are always open. With no key at all
    /// every route is open and nothing is checked, which Messina allows only on a loopback
    /// `listen` unless `open = true`.
    pub struct HttpConfig at "http" {
        /// Address of the HTTP listener. Without any API key, a non-loopback address refuses
        /// to start unless `open = true`.
        pub listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 8080)),
        /// The server's certificate chain (PEM, leaf first): with `tls_key_file`, `listen`
        /// serves HTTPS only (rustls, TLS 1.2 and 1.3). Empty: plain HTTP.
        pub tls_cert_file: String = String::new(),
        /// The certificate's private key, PEM (PKCS#8, PKCS#1 or SEC1).
        pub tls_key_file: String = String::new(),
        /// CA certificates (PEM) that sign device certificates: over HTTPS, a device that
        /// presents one authenticates its own ingest and upload routes as the certificate's
        /// Common Name, as over MQTT (a pinned fingerprint must match). Empty: none asked for.
        pub tls_client_ca_file: String = String::new(),
        /// Seconds between checks of the TLS files; changed files are loaded for new
        /// connections without a restart (a set that does not load is logged and the previous
        /// one kept).
        pub tls_reload_secs: u64 = 60,
        /// API keys and their roles, e.g. `api_keys = [{ key_file = "/run/secrets/admin",
        /// role = "admin" }, { key_env = "ANALYTICS_KEY", role = "read", name = "analytics" }]`.
        /// Each entry gives exactly one of `key` (the key itself), `key_file` (a file whose
        /// first line is the key) or `key_env` (an environment variable holding it), a `role`
        /// ("read", "write" or "admin"; each includes the ones before it) and optionally a
        /// `name` for the logs and optionally its own `max_request_rate`. Keys are at least 16
        /// printable ASCII characters without spaces. Every non-empty line of a `key_file` is
        /// a key with the entry's role, and key files are read again every `key_reload_secs`:
        /// to rotate a key without a restart, add the new key as a second line, move the
        /// callers to it, then remove the old line.
        pub api_keys: Vec<ApiKeyConfig> = Vec::new(),
        /// One more API key, with the admin role (the single key of earlier versions; kept
        /// working). Prefer `api_key_file` or the environment variable `MESSINA__HTTP__API_KEY`
        /// over writing the key here.
        pub api_key: String = String::new(),
        /// File whose non-empty lines are admin keys, like a `key_file` of `api_keys`; used
        /// when `api_key` is empty. Empty for none.
        pub api_key_file: String = String::new(),
        /// Seconds between re-reads of the key files (`api_keys[].key_file`, `api_key_file`):
        /// a changed file takes effect within this time, without a restart; a file that no
        /// longer reads (or holds a bad key) is logged and the keys in force kept. 0: read at
        /// start only.
        pub key_reload_secs: u64 = 10,
        /// Requests per second each API key and each device may make (0: no limit); over it,
        /// requests are answered 429 with `Retry-After`, and nobody else is slowed. An
        /// `api_keys` entry's own `max_request_rate` overrides it for that key.
        pub max_request_rate: u32 = 0,
        /// Requests a caller may make at once above the rate (0: one second's worth).
        pub request_burst: u32 = 0,
        /// Serve the API with no API key on a non-loopback `listen` (anyone who reaches it may
        /// read, post and manage devices): an explicit opt-in for closed networks, logged as a
        /// warning. No effect once a key is configured.
        pub open: bool = false,
        /// Origins allowed to call the API from a browser (CORS), e.g.
        /// `["https://console.example.com"]`, or `["*"]` for any; empty sends no CORS headers.
        /// Browsers still need an API key; CORS only lets their pages read the answers.
        pub cors_origins: Vec<String> = Vec::new(),
        /// Largest `limit` a query may ask for; also the page size when `limit` is not given is
        /// `default_page_size`.
        pub max_page_size: usize = 1_000,
        /// Page size of queries that give no `limit`.
        pub default_page_size: usize = 100,
        /// Battery percentage below which the fleet summary counts a device as low on battery.
        pub low_battery_percent: u8 = 20,
        /// Largest request body in KiB (device data posted to `/v1/devices/{id}/telemetry` or
        /// `/events`); a larger one is answered 413.
        pub max_body_kib: usize = 1_024,
        /// Milliseconds a request may take before it is answered 503 (device data posted over
        /// HTTP waits for the ingest log's fsync, and up to 10 s for room in a full log).
        pub request_timeout_ms: u64 = 30_000,
        /// Requests served at once; more are answered 503 with `Retry-After` at once instead of
        /// queueing.
        pub max_concurrent_requests: usize = 1_024,
        /// Live streams (`/v1/alerts/stream`, `/v1/ingest/stream`, which the dashboard at `/`
        /// reads) open at once; more are answered 503. A stream is not a request in
        /// `max_concurrent_requests` once it has started.
        pub max_event_streams: usize = 64,
    }
}

impl HttpConfig {
    /// Whether any API key comes from a file (which `key_reload_secs` reads again).
    pub fn has_key_files(&self) -> bool {
        (self.api_key.is_empty() && !self.api_key_file.is_empty())
            || self.api_keys.iter().any(|k| !k.key_file.is_empty())
    }

    /// Checks values that parse but make no sense; each problem names its key.
    pub(crate) fn validate(&self, check: &mut impl FnMut(bool, &str, String)) {
        let h = self;
        check(
            h.tls_cert_file.is_empty() == h.tls_key_file.is_empty(),
            "http.tls_cert_file",
            "HTTPS needs both `http.tls_cert_file` and `http.tls_key_file` (PEM files); give both or neither".into(),
        );
        check(
            h.tls_client_ca_file.is_empty() || !h.tls_cert_file.is_empty(),
            "http.tls_client_ca_file",
            "client certificates need HTTPS: set `http.tls_cert_file` and `http.tls_key_file`"
                .into(),
        );
        check(
            h.tls_reload_secs >= 1,
            "http.tls_reload_secs",
            "must be at least 1".into(),
        );
        check(
            (100..=600_000).contains(&h.request_timeout_ms),
            "http.request_timeout_ms",
            format!(
                "must be between 100 and 600000, got {}",
                h.request_timeout_ms
            ),
        );
        check(
            h.max_concurrent_requests >= 1,
            "http.max_concurrent_requests",
            "must be at least 1".into(),
        );
        check(
            (1..=100_000).contains(&h.max_event_streams),
            "http.max_event_streams",
            format!("must be between 1 and 100000, got {}", h.max_event_streams),
        );
        check(
            (1..=262_144).contains(&h.max_body_kib),
            "http.max_body_kib",
            format!(
                "must be between 1 and 262144 (256 MiB), got {}",
                h.max_body_kib
            ),
        );
        check(
            h.max_page_size >= 1,
            "http.max_page_size",
            "must be at least 1".into(),
        );
        check(
            (1..=h.max_page_size).contains(&h.default_page_size),
            "http.default_page_size",
            format!(
                "must be between 1 and `http.max_page_size` ({}), got {}",
                h.max_page_size, h.default_page_size
            ),
        );
        check(
            h.low_battery_percent <= 100,
            "http.low_battery_percent",
            format!("must be between 0 and 100, got {}", h.low_battery_percent),
        );
        for (i, origin) in h.cors_origins.iter().enumerate() {
            check(
                valid_origin(origin),
                &format!("http.cors_origins[{i}]"),
                format!(
                    "{origin:?} is not an origin like \"https://console.example.com\" (scheme, \
                     host and optional port, no path) or \"*\""
                ),
            );
        }
    }
}

impl Config {
    /// Every HTTP API key with its role: `http.api_keys`, and `http.api_key` (or
    /// `http.api_key_file`) as one admin key. Key files and environment variables are read
    /// now (loading checks only what the configuration itself holds); every problem is
    /// reported, each naming its key.
    pub fn api_keys(&self) -> Result<Vec<ApiKey>, ConfigErrors> {
        let mut errors = Vec::new();
        let keys = self.resolve_api_keys(true, &mut errors);
        if errors.is_empty() {
            Ok(keys)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// The keys, checked; with `read` false, key files and environment variables are not read
    /// and their keys are left out.
    pub(crate) fn resolve_api_keys(
        &self,
        read: bool,
        errors: &mut Vec<ConfigError>,
    ) -> Vec<ApiKey> {
        let h = &self.http;
        // Each source in order: the config key that names it in errors, and the key's name,
        // role, rate and values (or why they could not be read).
        let mut sources: Vec<(String, String, ApiRole, u32, KeyValues)> = Vec::new();
        let rate = h.max_request_rate;
        if !h.api_key.is_empty() {
            let key = "http.api_key".to_string();
            sources.push((
                key.clone(),
                key,
                ApiRole::Admin,
                rate,
                Ok(vec![h.api_key.clone()]),
            ));
        } else if !h.api_key_file.is_empty() && read {
            let key = "http.api_key_file".to_string();
            let value = key_lines(&h.api_key_file);
            sources.push((key.clone(), key, ApiRole::Admin, rate, value));
        }
        for (i, entry) in h.api_keys.iter().enumerate() {
            let at = format!("http.api_keys[{i}]");
            let given: Vec<&str> = [
                ("key", &entry.key),
                ("key_file", &entry.key_file),
                ("key_env", &entry.key_env),
            ]
            .into_iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, _)| k)
            .collect();
            let value = match given[..] {
                ["key"] => Ok(vec![entry.key.clone()]),
                [_] if !read => continue,
                ["key_file"] => key_lines(&entry.key_file),
                ["key_env"] => std::env::var(&entry.key_env)
                    .map(|k| vec![k.trim().to_string()])
                    .map_err(|_| {
                        format!(
                            "the environment variable {} is not set (or not UTF-8)",
                            entry.key_env
                        )
                    }),
                _ => {
                    errors.push(ConfigError {
                        key: at,
                        message: format!(
                            "give exactly one of `key`, `key_file` or `key_env`, got {}",
                            if given.is_empty() {
                                "none".to_string()
                            } else {
                                given.join(" and ")
                            }
                        ),
                        source: None,
                    });
                    continue;
                }
            };
            let source = format!("{at}.{}", given[0]);
            let name = if entry.name.is_empty() {
                at
            } else {
                entry.name.clone()
            };
            let rate = entry.max_request_rate.unwrap_or(rate);
            sources.push((source, name, entry.role, rate, value));
        }
        let mut keys: Vec<(String, ApiKey)> = Vec::with_capacity(sources.len());
        for (source, name, role, rate, values) in sources {
            let values = match values {
                Ok(values) if values.is_empty() => vec![Err("holds no key".to_string())],
                Ok(values) => values.into_iter().map(Ok).collect(),
                Err(why) => vec![Err(why)],
            };
            for value in values {
                let problem = match &value {
                Err(why) => Some(why.clone()),
                Ok(k) if k.len() < MIN_API_KEY_LEN => Some(format!(
                    "the key must be at least {MIN_API_KEY_LEN} characters long"
                )),
                Ok(k) if !k.bytes().all(|b| b.is_ascii_graphic()) => Some(
                    "the key must be printable ASCII without spaces (it is sent in an HTTP header)"
                        .to_string(),
                ),
                Ok(k) => keys
                    .iter()
                    .find(|(_, other)| &other.key == k)
                    .map(|(first, _)| {
                        format!("the same key as `{first}`; give each key one entry and one role")
                    }),
            };
                match (problem, value) {
                    (Some(message), _) => errors.push(ConfigError {
                        key: source.clone(),
                        message,
                        source: None,
                    }),
                    (None, Ok(key)) => keys.push((
                        source.clone(),
                        ApiKey {
                            name: name.clone(),
                            role,
                            key,
                            max_request_rate: rate,
                        },
                    )),
                    (None, Err(_)) => unreachable!("an unreadable key is a problem"),
                }
            }
        }
        keys.into_iter().map(|(_, k)| k).collect()
    }
}

/// The keys one source gives, or why it gives none.
type KeyValues = Result<Vec<String>, String>;

/// The keys of a key file: its non-empty lines, trimmed.
fn key_lines(path: &str) -> KeyValues {
    std::fs::read_to_string(path)
        .map(|text| {
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect()
        })
        .map_err(|e| format!("cannot read {path}: {e}"))
}

/// `*`, or `scheme://host[:port]` as a browser sends it in `Origin`.
fn valid_origin(origin: &str) -> bool {
    if origin == "*" {
        return true;
    }
    let Some((scheme, rest)) = origin.split_once("://") else {
        return false;
    };
    matches!(scheme, "http" | "https")
        && !rest.is_empty()
        && !rest.contains(['/', '?', '#', '*'])
        && rest.bytes().all(|b| b.is_ascii_graphic())
}
