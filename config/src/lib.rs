//! The one typed configuration of Messina: defaults, then a TOML file, then `MESSINA__SECTION__KEY`
//! environment variables, validated so that every problem is reported at once, each naming its key.
//!
//! Every key is declared once, with its doc comment, type and default, in a `section!` block below.
//! That single declaration produces the struct, its defaults, the per-key extraction (so a bad value
//! in one key does not hide a bad value in another) and the commented TOML printed by
//! `messina print-config`, so the documentation cannot drift from the code.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Value};
use figment::Figment;
use serde::{Deserialize, Serialize};

/// The prefix of environment variables that override configuration keys, e.g.
/// `MESSINA__MQTT__LISTEN=0.0.0.0:1883` or `MESSINA__STORAGE__EMBEDDED__PATH=/var/lib/messina`.
pub const ENV_PREFIX: &str = "MESSINA__";

/// One problem with one configuration key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The dotted key, e.g. `mqtt.listen`; empty when the problem is the file itself.
    pub key: String,
    /// What is wrong and, where it helps, what is accepted.
    pub message: String,
    /// Where the offending value came from (a file path or an environment variable), if known.
    pub source: Option<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}", self.message)?;
        } else {
            write!(f, "`{}`: {}", self.key, self.message)?;
        }
        if let Some(source) = &self.source {
            write!(f, " (from {source})")?;
        }
        Ok(())
    }
}

/// Every problem found while loading a configuration. Loading never stops at the first one, so an
/// operator fixes the file in one pass.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration ({} problem(s)):", self.0.len())?;
        for error in &self.0 {
            writeln!(f, "  - {error}")?;
        }
        write!(
            f,
            "run `messina print-config` for every key with its documentation and default"
        )
    }
}

impl ConfigErrors {
    /// True when a problem names exactly this key; used by tests and by callers that branch.
    pub fn mentions(&self, key: &str) -> bool {
        self.0.iter().any(|e| e.key == key)
    }
}

/// Renders one default value as TOML, for the documented default configuration.
fn toml_value<T: Serialize>(value: &T) -> String {
    match toml::Value::try_from(value) {
        Ok(v) => v.to_string(),
        Err(_) => String::from("\"\""),
    }
}

fn figment_error(key: &str, error: figment::Error) -> ConfigError {
    let source = error.metadata.as_ref().map(|m| match &m.source {
        Some(src) => format!("{} {}", m.name, src),
        None => m.name.to_string(),
    });
    ConfigError {
        key: key.to_string(),
        message: error.kind.to_string(),
        source,
    }
}

/// Declares one configuration section: its struct, defaults, per-key extraction, known keys and
/// documentation. Doc comments on the section and on each key become the comments of
/// `messina print-config`.
macro_rules! section {
    (
        $(#[doc = $doc:literal])*
        pub struct $name:ident at $path:literal {
            $( $(#[doc = $fdoc:literal])* pub $field:ident : $ty:ty = $default:expr, )*
        }
        $( children { $( $(#[doc = $cdoc:literal])* pub $child:ident : $cty:ty ),* $(,)? } )?
    ) => {
        $(#[doc = $doc])*
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            $( $(#[doc = $fdoc])* pub $field: $ty, )*
            $( $( $(#[doc = $cdoc])* pub $child: $cty, )* )?
        }

        impl Default for $name {
            fn default() -> Self {
                Self {
                    $( $field: $default, )*
                    $( $( $child: <$cty>::default(), )* )?
                }
            }
        }

        impl $name {
            /// The dotted path of this section in the TOML file.
            pub const PATH: &'static str = $path;

            fn extract(figment: &Figment, errors: &mut Vec<ConfigError>) -> Self {
                let defaults = Self::default();
                Self {
                    $( $field: {
                        let key = concat!($path, ".", stringify!($field));
                        match figment.extract_inner::<$ty>(key) {
                            Ok(v) => v,
                            Err(e) => { errors.push(figment_error(key, e)); defaults.$field }
                        }
                    }, )*
                    $( $( $child: <$cty>::extract(figment, errors), )* )?
                }
            }

            fn known_keys(keys: &mut Vec<String>) {
                $( keys.push(concat!($path, ".", stringify!($field)).to_string()); )*
                $( $( <$cty>::known_keys(keys); )* )?
            }

            fn document(&self, out: &mut String) {
                out.push('\n');
                $( out.push_str(concat!("#", $doc, "\n")); )*
                out.push_str(concat!("[", $path, "]\n"));
                $(
                    $( out.push_str(concat!("#", $fdoc, "\n")); )*
                    out.push_str(concat!(stringify!($field), " = "));
                    out.push_str(&toml_value(&self.$field));
                    out.push('\n');
                )*
                $( $( self.$child.document(out); )* )?
            }
        }
    };
}

/// Which storage engine holds the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    /// On-disk storage inside the Messina process (fjall); no external server.
    Embedded,
    /// A ScyllaDB (or Apache Cassandra) cluster, `[storage.scylla]`.
    Scylla,
}

/// CQL consistency level of reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Consistency {
    One,
    Two,
    Three,
    Quorum,
    All,
    LocalQuorum,
    EachQuorum,
    LocalOne,
}

/// Who may connect to the MQTT edge without a username.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Anonymous {
    /// Only clients connecting from a loopback address (the safe default).
    Loopback,
    /// Anyone who can reach a listener: an explicit opt-in for closed networks.
    Allow,
    /// Nobody: every client authenticates.
    Deny,
}

impl MqttConfig {
    /// `tls_listen` as an address, when set and valid (validation reports it otherwise).
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_listen.parse().ok()
    }
}

impl HttpConfig {
    /// Whether any API key comes from a file (which `key_reload_secs` reads again).
    pub fn has_key_files(&self) -> bool {
        (self.api_key.is_empty() && !self.api_key_file.is_empty())
            || self.api_keys.iter().any(|k| !k.key_file.is_empty())
    }
}

/// How much the process logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

section! {
    /// The MQTT edge: Messina's own listener, serving MQTT 3.1.1 and 5 on one port, in front of
    /// the embedded rumqttd router. Devices publish to `devices/{id}/telemetry` and
    /// `devices/{id}/events`; fleet managers subscribe to `alerts/#`. A QoS 1 PUBACK (QoS 2
    /// PUBREC) is sent only once the message is durable in the ingest log.
    pub struct MqttConfig at "mqtt" {
        /// Address of the MQTT listener (3.1.1 and 5; the version is in the CONNECT).
        pub listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 1883)),
        /// A second address served exactly like `listen`, for clients configured for the former
        /// separate MQTT 5 port; the same address as `listen` serves only that one.
        pub listen_v5: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 1884)),
        /// Most simultaneous client connections; past it a CONNECT is refused with "server busy"
        /// (3.1.1: 0x03, 5: 0x89).
        pub max_connections: usize = 20_000,
        /// Largest PUBLISH payload accepted, in bytes. The largest packet is this plus 64 KiB for
        /// topic and properties, announced to MQTT 5 clients as Maximum Packet Size; a larger
        /// payload closes the connection (MQTT 5: DISCONNECT 0x95).
        pub max_payload_bytes: usize = 256 * 1024,
        /// Most unacknowledged QoS 1/2 messages per connection in each direction. Inbound it is
        /// announced to MQTT 5 clients as Receive Maximum, and the socket is not read while that
        /// many acknowledgements wait for the ingest log; outbound it caps the client's own
        /// Receive Maximum.
        pub max_inflight: usize = 1_024,
        /// Outbound QoS 1/2 messages a session holds beyond those in flight (a slow or offline
        /// subscriber); past it the router buffers for the session, up to `commit_log_*`.
        pub max_queued_messages: usize = 1_000,
        /// Longest a session outlives its connection, in seconds: caps the MQTT 5 Session Expiry
        /// Interval and is the expiry of MQTT 3.1.1 sessions with clean session 0.
        pub max_session_expiry_secs: u64 = 86_400,
        /// Topic aliases an MQTT 5 client may set on its publishes (Topic Alias Maximum); 0
        /// turns inbound aliases off.
        pub topic_alias_maximum: u16 = 64,
        /// Who may connect without a username: "loopback" (clients on this machine only; the
        /// default), "allow" (anyone who reaches a listener: only on a closed network) or "deny".
        /// An anonymous client may do what the service role may, and its client id stands for its
        /// device. Everyone else authenticates with a registered identity: username = device id
        /// (= client id for a device), password = its secret (`messina devices add`). Serving a
        /// non-loopback address with "loopback" or "deny" and no registered identity refuses to
        /// start, since nobody could connect.
        pub anonymous: Anonymous = Anonymous::Loopback,
        /// Verified credentials kept in memory, so a reconnecting fleet costs one hash
        /// verification per device per process lifetime, not one per connection.
        pub credential_cache_entries: usize = 100_000,
        /// Seconds between reads of the registry's recent changes (0: never): a device revoked
        /// or given a new secret anywhere else (another node sharing the ScyllaDB registry,
        /// `messina devices` on the command line) is disconnected here within this time, with
        /// 0x87 "not authorized". Changes made through this node's admin API act at once.
        pub registry_poll_secs: u64 = 2,
        /// Publishes per second one connection may send (0: no limit). An MQTT 5 client over it
        /// (after its burst) is disconnected with 0x96 "message rate too high", without the
        /// message being accepted; a 3.1.1 client, which has no such code, has its socket paused
        /// until it is back within the rate. Other connections are not slowed.
        pub max_publish_rate: u32 = 0,
        /// Publishes a connection may send at once above `max_publish_rate` (0: one second's
        /// worth).
        pub publish_burst: u32 = 0,
        /// New connections per second from one source address (0: no limit); past it (and its
        /// burst) a CONNECT is refused with "connection rate exceeded" (3.1.1: 0x03, 5: 0x9F).
        /// Behind a load balancer every client has its address: leave it 0 there.
        pub max_connect_rate_per_ip: u32 = 0,
        /// New connections one source address may open at once above the rate (0: one
        /// second's worth).
        pub connect_burst_per_ip: u32 = 0,
        /// Address of the MQTT-over-TLS listener (conventionally port 8883), e.g.
        /// "0.0.0.0:8883"; empty for none. It serves 3.1.1 and 5 like `listen`, and needs
        /// `tls_cert_file` and `tls_key_file`.
        pub tls_listen: String = String::new(),
        /// The server's certificate chain, PEM, leaf first.
        pub tls_cert_file: String = String::new(),
        /// The server certificate's private key, PEM (PKCS#8, PKCS#1 or SEC1).
        pub tls_key_file: String = String::new(),
        /// CA certificates (PEM) that sign device certificates, for mutual TLS: a device that
        /// presents a certificate signed by one of them authenticates as the certificate's
        /// Common Name (its device id; a registry entry with a pinned fingerprint accepts only
        /// that certificate). Devices without a certificate still authenticate with their secret.
        /// Empty: no client certificates are asked for.
        pub tls_client_ca_file: String = String::new(),
        /// Seconds between checks of the TLS files; changed files are loaded for new
        /// connections without a restart (a set that does not load is logged and the previous
        /// one kept).
        pub tls_reload_secs: u64 = 60,
        /// Milliseconds a new TCP connection has to send CONNECT (and finish a TLS handshake)
        /// before it is dropped.
        pub connect_timeout_ms: u16 = 5_000,
        /// Size in MiB of one segment of the router's in-memory log. Each subscription filter has
        /// its own log of up to `commit_log_segments` segments: how far a subscriber may fall
        /// behind before the oldest messages for it are dropped, and what that costs in memory
        /// at most. Device data never depends on it: the bridge reads the ingest log.
        pub commit_log_segment_mib: usize = 16,
        /// Segments kept per subscription filter; see `commit_log_segment_mib`.
        pub commit_log_segments: usize = 8,
    }
}

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
    }
}

section! {
    /// The embedded storage engine (fjall), used when `storage.backend = "embedded"`.
    pub struct EmbeddedStorageConfig at "storage.embedded" {
        /// Directory holding the data; created when missing. Relative paths are relative to the
        /// working directory of the process.
        pub path: PathBuf = PathBuf::from("data"),
        /// Fsync every written batch before it counts as stored. Turning this off trades the last
        /// moments of data on power loss for throughput; a clean shutdown always syncs.
        pub fsync: bool = true,
        /// Block cache size in MiB.
        pub cache_mib: u64 = 64,
    }
}

section! {
    /// The ScyllaDB backend, used when `storage.backend = "scylla"`. Apache Cassandra 4 and 5 work
    /// too. The schema (storage/schema.cql) is applied at start, idempotently.
    pub struct ScyllaStorageConfig at "storage.scylla" {
        /// Contact points, "host:port"; the driver discovers the rest of the cluster from them.
        pub nodes: Vec<String> = vec![String::from("127.0.0.1:9042")],
        /// Keyspace holding Messina's tables; created when missing.
        pub keyspace: String = String::from("messina"),
        /// Replication of the keyspace when Messina creates it, as CQL, e.g.
        /// "{'class': 'NetworkTopologyStrategy', 'dc1': 3}". An existing keyspace is not altered.
        pub replication: String = String::from("{'class': 'SimpleStrategy', 'replication_factor': 1}"),
        /// Consistency level of reads and writes: one, two, three, quorum, all, local_quorum,
        /// each_quorum or local_one.
        pub consistency: Consistency = Consistency::LocalQuorum,
        /// Datacenter whose nodes are preferred (and whose replicas count for LOCAL_* levels);
        /// empty for none.
        pub local_datacenter: String = String::new(),
        /// Days readings, events and dead letters are kept; 0 keeps them forever. The latest state
        /// of a device is kept forever.
        pub ttl_days: u32 = 0,
        /// Most write requests (single-partition batches) in flight at once.
        pub max_in_flight: usize = 64,
        /// Client-side timeout of one request, in milliseconds.
        pub request_timeout_ms: u64 = 5_000,
        /// Attempts of a write that fails with a timeout, overload or unavailability before the
        /// batch is handed back to the bridge (which keeps retrying it).
        pub write_attempts: u32 = 3,
        /// User name for password authentication; empty for none.
        pub username: String = String::new(),
        /// Password for `username`; prefer `password_file` or `MESSINA__STORAGE__SCYLLA__PASSWORD`.
        pub password: String = String::new(),
        /// File whose first line is the password; used when `password` is empty.
        pub password_file: String = String::new(),
    }
}

section! {
    /// Where readings, events and dead letters are stored.
    pub struct StorageConfig at "storage" {
        /// Storage engine: "embedded" (on disk inside the process, no external server) or
        /// "scylla" (a ScyllaDB or Cassandra cluster, see `[storage.scylla]`).
        pub backend: StorageBackend = StorageBackend::Embedded,
    }
    children {
        /// Settings of the embedded engine.
        pub embedded: EmbeddedStorageConfig,
        /// Settings of the ScyllaDB backend.
        pub scylla: ScyllaStorageConfig,
    }
}

/// When an appended message counts as durable (and its PUBACK may be sent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Durability {
    /// After `fdatasync` of the log file: survives a crash of the process, of the kernel and a
    /// power loss.
    Fsync,
    /// UNSAFE, for benchmarks only: after the write reached the kernel's page cache. A kernel
    /// crash or a power loss loses messages that were already acknowledged.
    OsBuffer,
}

section! {
    /// The ingest log: every device message is appended here, checksummed and fsynced; the bridge
    /// writes it to storage from here and replays it after a crash. The MQTT edge acknowledges a
    /// message (QoS 1 PUBACK, QoS 2 PUBREC) only once it is durable here.
    pub struct IngestLogConfig at "ingest_log" {
        /// Directory of the log's segment files and checkpoint; created when missing. Empty means
        /// `log` inside `storage.embedded.path`. Put it on a local disk: every append waits for an
        /// fdatasync here.
        pub path: String = String::new(),
        /// "fsync" (the default: a message counts as durable once it is on disk) or "os-buffer"
        /// (UNSAFE: durable once written to the page cache; a power loss or kernel crash loses
        /// what was already counted durable; for benchmarks only).
        pub durability: Durability = Durability::Fsync,
        /// Size of one segment file in MiB; whole segments are deleted once stored.
        pub segment_mib: u64 = 64,
        /// Most MiB the log holds that are not yet stored. When it is full (storage is down or
        /// slower than the devices), the edge stops reading from device connections until the
        /// bridge catches up: publishers are slowed, nothing is dropped.
        pub max_mib: u64 = 1_024,
        /// Most KiB written by one write and fdatasync (group commit).
        pub max_batch_kib: u64 = 4_096,
        /// MiB of recently written log kept in memory, so a bridge that keeps up never reads the
        /// files; a bridge that lags reads them instead.
        pub memory_mib: u64 = 64,
    }
}

section! {
    /// The bridge between the broker and storage: decoding, validation and batching.
    pub struct BridgeConfig at "bridge" {
        /// A batch is written as soon as it holds this many rows (readings, events and dead letters).
        pub batch_max_rows: usize = 1_000,
        /// A batch is written at the latest this many milliseconds after its first row arrived.
        pub batch_max_delay_ms: u64 = 20,
        /// Messages that may wait between the ingest log consumer and the bridge; when full, the
        /// consumer waits (the log keeps the rest; nothing is dropped).
        pub queue_capacity: usize = 16_384,
        /// Device timestamps more than this many seconds ahead of the server clock are rejected.
        pub max_future_skew_s: u64 = 86_400,
        /// Device timestamps more than this many days behind the server clock are rejected.
        pub max_age_days: u64 = 365,
        /// Most readings accepted in one batch-form telemetry message (an array of maps).
        pub max_readings_per_message: usize = 1_000,
        /// First delay, in milliseconds, before a failed storage write is retried; doubles up to
        /// `retry_max_delay_ms`. The batch is kept (and publishers wait) until it is written.
        pub retry_initial_delay_ms: u64 = 100,
        /// Longest delay between retries of a failed storage write, in milliseconds.
        pub retry_max_delay_ms: u64 = 5_000,
    }
}

/// A threshold rule: raise when `metric op value` holds for `for_s` seconds, clear when it no
/// longer holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThresholdRule {
    /// Rule name: 1 to 64 characters of a-z, 0-9, '_', '.', '-'; the alert topic is
    /// `alerts/{device}/{name}`.
    pub name: String,
    /// `battery`, `rssi` or `metrics.<name>`.
    pub metric: String,
    /// `>`, `>=`, `<` or `<=`.
    pub op: String,
    pub value: f64,
    /// Seconds (of device time) the condition must hold before the alert is raised.
    #[serde(default)]
    pub for_s: u64,
    /// `info`, `warning` or `critical`.
    #[serde(default = "default_severity")]
    pub severity: String,
}

fn default_severity() -> String {
    "warning".into()
}

/// Names of the built-in alert rules; threshold rules may not reuse them.
pub const BUILT_IN_RULES: [&str; 3] = ["battery_low", "offline", "sync_failures"];

section! {
    /// Alert rules, evaluated by the bridge on every batch. Alerts are published retained on
    /// `alerts/{device}/{rule}` and stored; a fleet manager acknowledges one over HTTP or by
    /// publishing to `alerts/{device}/{rule}/ack`.
    pub struct AlertsConfig at "alerts" {
        /// Evaluate alert rules at all.
        pub enabled: bool = true,
        /// `battery_low` is raised when a reading's battery is below this percentage...
        pub battery_low_percent: f64 = 15.0,
        /// ...and cleared when a reading's battery is above this one (hysteresis; must be higher).
        pub battery_clear_percent: f64 = 25.0,
        /// `offline` is raised when a device is silent this many seconds (0 disables), or at once
        /// when its will message arrives on `devices/{id}/presence` (a connection lost without
        /// DISCONNECT); it is cleared when the device is heard from again.
        pub offline_after_s: u64 = 300,
        /// `sync_failures` is raised after this many consecutive `sync` events with `errors` > 0
        /// (0 disables) and cleared by a successful sync.
        pub sync_failures: u32 = 3,
        /// `anomaly.<metric>` is raised for a reading whose value is more than this many standard
        /// deviations from the device's recent mean (a rolling z-score; 0 disables), and cleared
        /// by the next normal reading.
        pub anomaly_sensitivity: f64 = 4.0,
        /// Readings per device and metric in the rolling window of the anomaly rule.
        pub anomaly_window: usize = 60,
        /// Readings the window must hold before the anomaly rule judges a value.
        pub anomaly_min_samples: usize = 20,
        /// Metrics per device the anomaly rule keeps a window for (battery and RSSI count):
        /// metric names are the device's to choose, so this bounds the memory one device can
        /// make the server hold (at most this × `anomaly_window` values). Metrics past it are
        /// stored as usual but not judged, and counted in
        /// `messina_alerts_untracked_metrics_total`.
        pub anomaly_max_metrics_per_device: usize = 32,
        /// Threshold rules, e.g. `thresholds = [{ name = "overheat", metric = "metrics.temp_c",
        /// op = ">", value = 60.0, for_s = 120, severity = "critical" }]`.
        pub thresholds: Vec<ThresholdRule> = Vec::new(),
    }
}

section! {
    /// Device uploads: devices ask (over HTTP or MQTT) for a presigned URL and PUT blobs (audio,
    /// photos, logs) straight to S3-compatible object storage, never through the broker. With no
    /// `endpoint`, Messina serves an S3-compatible endpoint itself, storing objects on disk.
    pub struct UploadsConfig at "uploads" {
        /// Hand out upload URLs at all (and run the embedded endpoint when `endpoint` is empty).
        pub enabled: bool = true,
        /// URL of an external S3-compatible endpoint (AWS S3, MinIO, Garage, ...), e.g.
        /// "https://s3.eu-west-1.amazonaws.com"; empty serves the embedded endpoint.
        pub endpoint: String = String::new(),
        /// Address of the embedded endpoint; port 0 picks a free port at each start (the URLs
        /// handed out carry it). Devices must reach this address.
        pub s3_listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 0)),
        /// Directory of the embedded endpoint's objects and generated credentials; empty means
        /// `objects` under `storage.embedded.path`.
        pub s3_path: String = String::new(),
        /// Region the URLs are signed for.
        pub region: String = String::from("us-east-1"),
        /// Bucket holding the uploads; the embedded endpoint creates it.
        pub bucket: String = String::from("messina-uploads"),
        /// Address buckets as `endpoint/bucket/key` (path style) rather than `bucket.endpoint/key`.
        pub path_style: bool = true,
        /// Access key id for `endpoint`; prefer `MESSINA__UPLOADS__ACCESS_KEY_ID`. The embedded
        /// endpoint generates its own.
        pub access_key_id: String = String::new(),
        /// Secret key for `endpoint`; prefer `secret_access_key_file` or
        /// `MESSINA__UPLOADS__SECRET_ACCESS_KEY`.
        pub secret_access_key: String = String::new(),
        /// File whose first line is the secret key; used when `secret_access_key` is empty.
        pub secret_access_key_file: String = String::new(),
        /// Seconds an upload URL stays valid; an upload not completed by then is marked expired.
        pub url_expiry_s: u64 = 300,
        /// Seconds a download URL (in `GET /v1/uploads/{id}`) stays valid.
        pub download_url_expiry_s: u64 = 300,
        /// Seconds between sweeps that mark never-completed uploads expired.
        pub sweep_interval_s: u64 = 30,
        /// Largest audio clip in bytes.
        pub audio_max_bytes: u64 = 20 * 1024 * 1024,
        /// Content types an audio upload may declare.
        pub audio_content_types: Vec<String> = vec![
            String::from("audio/wav"),
            String::from("audio/x-wav"),
            String::from("audio/mpeg"),
            String::from("audio/ogg"),
        ],
        /// Largest photo in bytes.
        pub photo_max_bytes: u64 = 10 * 1024 * 1024,
        /// Content types a photo upload may declare.
        pub photo_content_types: Vec<String> = vec![String::from("image/jpeg"), String::from("image/png")],
        /// Largest log in bytes.
        pub log_max_bytes: u64 = 5 * 1024 * 1024,
        /// Content types a log upload may declare.
        pub log_content_types: Vec<String> = vec![String::from("text/plain")],
    }
}

section! {
    /// Logging.
    pub struct LogConfig at "log" {
        /// Filter in `tracing` syntax, e.g. "info" or "messina=debug,rumqttd=warn"; the RUST_LOG
        /// environment variable overrides it.
        pub level: String = String::from("info,rumqttd=warn,fjall=warn,lsm_tree=warn"),
        /// "text" or "json".
        pub format: LogFormat = LogFormat::Text,
    }
}

/// The whole configuration of one Messina process.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub mqtt: MqttConfig,
    pub http: HttpConfig,
    pub storage: StorageConfig,
    pub ingest_log: IngestLogConfig,
    pub bridge: BridgeConfig,
    pub alerts: AlertsConfig,
    pub uploads: UploadsConfig,
    pub log: LogConfig,
}

impl Config {
    /// The ingest log's directory: `ingest_log.path`, or `log` inside `storage.embedded.path`.
    pub fn ingest_log_dir(&self) -> PathBuf {
        if self.ingest_log.path.is_empty() {
            self.storage.embedded.path.join("log")
        } else {
            PathBuf::from(&self.ingest_log.path)
        }
    }

    /// Loads defaults, then `file` (when given), then `MESSINA__...` environment variables, and
    /// validates the result. Every problem is returned at once.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigErrors> {
        Self::load_from(file, Env::prefixed(ENV_PREFIX).split("__"))
    }

    /// Loads defaults and a TOML text, without the environment; for tests and `check-config`.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigErrors> {
        let figment =
            Figment::from(Serialized::defaults(Config::default())).merge(Toml::string(text));
        Self::extract(figment)
    }

    fn load_from(file: Option<&Path>, env: Env) -> Result<Config, ConfigErrors> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigErrors(vec![ConfigError {
                    key: String::new(),
                    message: format!(
                        "config file {} does not exist or is not a file; \
                         `messina print-config > {}` writes a documented one",
                        path.display(),
                        path.display()
                    ),
                    source: None,
                }]));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        Self::extract(figment.merge(env))
    }

    fn extract(figment: Figment) -> Result<Config, ConfigErrors> {
        let mut errors = Vec::new();
        // A file that does not parse at all yields no data; report that alone, since every other
        // message would be noise.
        let data = match figment.extract::<Value>() {
            Ok(Value::Dict(_, dict)) => dict,
            Ok(_) => Dict::new(),
            Err(e) => return Err(ConfigErrors(vec![figment_error("", e)])),
        };
        let mut known = Vec::new();
        Self::known_keys(&mut known);
        let mut leaves = Vec::new();
        collect_leaves("", &data, &mut leaves);
        for key in leaves.into_iter().filter(|k| !known.contains(k)) {
            let source = figment.find_metadata(&key).map(|m| match &m.source {
                Some(src) => format!("{} {}", m.name, src),
                None => m.name.to_string(),
            });
            let hint = closest(&key, &known)
                .map(|k| format!("; did you mean `{k}`?"))
                .unwrap_or_default();
            errors.push(ConfigError {
                key,
                message: format!("unknown key{hint}"),
                source,
            });
        }
        let config = Config {
            mqtt: MqttConfig::extract(&figment, &mut errors),
            http: HttpConfig::extract(&figment, &mut errors),
            storage: StorageConfig::extract(&figment, &mut errors),
            ingest_log: IngestLogConfig::extract(&figment, &mut errors),
            bridge: BridgeConfig::extract(&figment, &mut errors),
            alerts: AlertsConfig::extract(&figment, &mut errors),
            uploads: UploadsConfig::extract(&figment, &mut errors),
            log: LogConfig::extract(&figment, &mut errors),
        };
        config.validate(&mut errors);
        // Key files and variables are read by `api_keys`, when a server starts: other commands
        // (`messina devices`) need not be able to read them.
        config.resolve_api_keys(false, &mut errors);
        config.validate_alerts(&mut errors);
        config.validate_uploads(&mut errors);
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    fn known_keys(keys: &mut Vec<String>) {
        MqttConfig::known_keys(keys);
        HttpConfig::known_keys(keys);
        StorageConfig::known_keys(keys);
        IngestLogConfig::known_keys(keys);
        BridgeConfig::known_keys(keys);
        AlertsConfig::known_keys(keys);
        UploadsConfig::known_keys(keys);
        LogConfig::known_keys(keys);
    }

    /// Checks values that parse but make no sense; each problem names its key.
    fn validate(&self, errors: &mut Vec<ConfigError>) {
        let mut check = |ok: bool, key: &str, message: String| {
            if !ok {
                errors.push(ConfigError {
                    key: key.to_string(),
                    message,
                    source: None,
                });
            }
        };
        let m = &self.mqtt;
        check(
            m.max_connections >= 1,
            "mqtt.max_connections",
            "must be at least 1".into(),
        );
        check(
            (64..=256 * 1024 * 1024).contains(&m.max_payload_bytes),
            "mqtt.max_payload_bytes",
            format!(
                "must be between 64 and 268435456 (the MQTT limit), got {}",
                m.max_payload_bytes
            ),
        );
        check(
            m.tls_listen.is_empty() || m.tls_addr().is_some(),
            "mqtt.tls_listen",
            format!(
                "must be an address like \"0.0.0.0:8883\", got {:?}",
                m.tls_listen
            ),
        );
        check(
            m.tls_listen.is_empty() || (!m.tls_cert_file.is_empty() && !m.tls_key_file.is_empty()),
            "mqtt.tls_listen",
            "needs `mqtt.tls_cert_file` and `mqtt.tls_key_file` (PEM files)".into(),
        );
        check(
            m.tls_reload_secs >= 1,
            "mqtt.tls_reload_secs",
            "must be at least 1".into(),
        );
        let h = &self.http;
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
            (1..=65_535).contains(&m.max_inflight),
            "mqtt.max_inflight",
            format!("must be between 1 and 65535, got {}", m.max_inflight),
        );
        check(
            (100..=600_000).contains(&self.http.request_timeout_ms),
            "http.request_timeout_ms",
            format!(
                "must be between 100 and 600000, got {}",
                self.http.request_timeout_ms
            ),
        );
        check(
            self.http.max_concurrent_requests >= 1,
            "http.max_concurrent_requests",
            "must be at least 1".into(),
        );
        check(
            (1..=262_144).contains(&self.http.max_body_kib),
            "http.max_body_kib",
            format!(
                "must be between 1 and 262144 (256 MiB), got {}",
                self.http.max_body_kib
            ),
        );
        check(
            m.max_queued_messages >= 1,
            "mqtt.max_queued_messages",
            "must be at least 1".into(),
        );
        check(
            m.max_session_expiry_secs <= u64::from(u32::MAX),
            "mqtt.max_session_expiry_secs",
            format!(
                "must be at most 4294967295 (the MQTT limit), got {}",
                m.max_session_expiry_secs
            ),
        );
        check(
            (1..=1024).contains(&m.commit_log_segment_mib),
            "mqtt.commit_log_segment_mib",
            format!(
                "must be between 1 and 1024, got {}",
                m.commit_log_segment_mib
            ),
        );
        check(
            (2..=1024).contains(&m.commit_log_segments),
            "mqtt.commit_log_segments",
            format!("must be between 2 and 1024, got {}", m.commit_log_segments),
        );
        let l = &self.ingest_log;
        check(
            (1..=1024).contains(&l.segment_mib),
            "ingest_log.segment_mib",
            format!("must be between 1 and 1024, got {}", l.segment_mib),
        );
        check(
            l.max_mib >= 2 * l.segment_mib.max(1) && l.max_mib <= 1 << 20,
            "ingest_log.max_mib",
            format!(
                "must be at least twice `ingest_log.segment_mib` ({}) and at most 1048576, got {}",
                l.segment_mib, l.max_mib
            ),
        );
        check(
            (64..=65_536).contains(&l.max_batch_kib),
            "ingest_log.max_batch_kib",
            format!("must be between 64 and 65536, got {}", l.max_batch_kib),
        );
        check(
            l.memory_mib <= 4096,
            "ingest_log.memory_mib",
            format!("must be at most 4096, got {}", l.memory_mib),
        );
        let h = &self.http;
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
        check(
            self.storage.embedded.path != Path::new(""),
            "storage.embedded.path",
            "must not be empty".into(),
        );
        let sc = &self.storage.scylla;
        check(
            !sc.nodes.is_empty()
                && sc.nodes.iter().all(|n| {
                    n.rsplit_once(':')
                        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
                }),
            "storage.scylla.nodes",
            format!("must list at least one \"host:port\", got {:?}", sc.nodes),
        );
        check(
            !sc.keyspace.is_empty()
                && sc.keyspace.len() <= 48
                && sc
                    .keyspace
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !sc.keyspace.starts_with('_'),
            "storage.scylla.keyspace",
            format!(
                "must be 1 to 48 characters of a-z, 0-9 and '_', got {:?}",
                sc.keyspace
            ),
        );
        check(
            sc.replication.trim_start().starts_with('{') && sc.replication.contains("'class'"),
            "storage.scylla.replication",
            "must be a CQL replication map such as {'class': 'SimpleStrategy', 'replication_factor': 1}".into(),
        );
        check(
            (1..=4096).contains(&sc.max_in_flight),
            "storage.scylla.max_in_flight",
            format!("must be between 1 and 4096, got {}", sc.max_in_flight),
        );
        check(
            sc.request_timeout_ms >= 10,
            "storage.scylla.request_timeout_ms",
            "must be at least 10".into(),
        );
        check(
            sc.write_attempts >= 1,
            "storage.scylla.write_attempts",
            "must be at least 1".into(),
        );
        let b = &self.bridge;
        check(
            (1..=100_000).contains(&b.batch_max_rows),
            "bridge.batch_max_rows",
            format!("must be between 1 and 100000, got {}", b.batch_max_rows),
        );
        check(
            (1..=60_000).contains(&b.batch_max_delay_ms),
            "bridge.batch_max_delay_ms",
            format!(
                "must be between 1 and 60000 milliseconds, got {}",
                b.batch_max_delay_ms
            ),
        );
        check(
            (1..=10_000_000).contains(&b.queue_capacity),
            "bridge.queue_capacity",
            format!("must be between 1 and 10000000, got {}", b.queue_capacity),
        );
        check(
            b.max_readings_per_message >= 1,
            "bridge.max_readings_per_message",
            "must be at least 1".into(),
        );
        check(
            b.max_age_days >= 1,
            "bridge.max_age_days",
            "must be at least 1".into(),
        );
        check(
            b.retry_initial_delay_ms >= 1 && b.retry_initial_delay_ms <= b.retry_max_delay_ms,
            "bridge.retry_initial_delay_ms",
            format!(
                "must be between 1 and `bridge.retry_max_delay_ms` ({}), got {}",
                b.retry_max_delay_ms, b.retry_initial_delay_ms
            ),
        );
    }

    fn validate_uploads(&self, errors: &mut Vec<ConfigError>) {
        let u = &self.uploads;
        let mut check = |ok: bool, key: &str, message: String| {
            if !ok {
                errors.push(ConfigError {
                    key: key.to_string(),
                    message,
                    source: None,
                });
            }
        };
        check(
            u.endpoint.is_empty()
                || u.endpoint.starts_with("http://")
                || u.endpoint.starts_with("https://"),
            "uploads.endpoint",
            format!("must start with http:// or https://, got {:?}", u.endpoint),
        );
        check(
            !u.enabled
                || u.endpoint.is_empty()
                || !u.access_key_id.is_empty(),
            "uploads.access_key_id",
            "is required with an external `uploads.endpoint` (or set MESSINA__UPLOADS__ACCESS_KEY_ID)"
                .into(),
        );
        check(
            !u.enabled
                || u.endpoint.is_empty()
                || !u.secret_access_key.is_empty()
                || !u.secret_access_key_file.is_empty(),
            "uploads.secret_access_key",
            "is required with an external `uploads.endpoint` (or `secret_access_key_file`)".into(),
        );
        check(
            (3..=63).contains(&u.bucket.len())
                && u.bucket
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.'),
            "uploads.bucket",
            format!(
                "{:?} is not a bucket name: 3 to 63 characters of a-z, 0-9, '-' and '.'",
                u.bucket
            ),
        );
        // SigV4 presigned URLs are valid for at most 7 days.
        for (key, v) in [
            ("uploads.url_expiry_s", u.url_expiry_s),
            ("uploads.download_url_expiry_s", u.download_url_expiry_s),
        ] {
            check(
                (1..=604_800).contains(&v),
                key,
                format!("must be between 1 and 604800 (7 days), got {v}"),
            );
        }
        check(
            u.sweep_interval_s >= 1,
            "uploads.sweep_interval_s",
            "must be at least 1".into(),
        );
        // S3 takes at most 5 GiB in one PUT, and a presigned URL is one PUT.
        const MAX_PUT: u64 = 5 << 30;
        for (key, bytes) in [
            ("uploads.audio_max_bytes", u.audio_max_bytes),
            ("uploads.photo_max_bytes", u.photo_max_bytes),
            ("uploads.log_max_bytes", u.log_max_bytes),
        ] {
            check(
                (1..=MAX_PUT).contains(&bytes),
                key,
                format!("must be between 1 and {MAX_PUT} (5 GiB, the largest single S3 PUT), got {bytes}"),
            );
        }
        for (key, types) in [
            ("uploads.audio_content_types", &u.audio_content_types),
            ("uploads.photo_content_types", &u.photo_content_types),
            ("uploads.log_content_types", &u.log_content_types),
        ] {
            if let Some(bad) = types.iter().find(|t| {
                !t.contains('/') || t.chars().any(|c| c.is_ascii_whitespace() || c == ';')
            }) {
                check(
                    false,
                    key,
                    format!("{bad:?} is not a media type like \"image/png\""),
                );
            }
        }
    }

    /// The secret key of the external S3 endpoint, from `uploads.secret_access_key` or
    /// `uploads.secret_access_key_file`.
    pub fn s3_secret_key(&self) -> Result<Option<String>, ConfigErrors> {
        let u = &self.uploads;
        if !u.secret_access_key.is_empty() {
            return Ok(Some(u.secret_access_key.clone()));
        }
        if u.secret_access_key_file.is_empty() {
            return Ok(None);
        }
        std::fs::read_to_string(&u.secret_access_key_file)
            .map(|text| Some(text.lines().next().unwrap_or("").trim().to_string()))
            .map_err(|e| {
                ConfigErrors(vec![ConfigError {
                    key: "uploads.secret_access_key_file".into(),
                    message: format!("cannot read {}: {e}", u.secret_access_key_file),
                    source: None,
                }])
            })
    }

    fn validate_alerts(&self, errors: &mut Vec<ConfigError>) {
        let a = &self.alerts;
        let mut check = |ok: bool, key: String, message: String| {
            if !ok {
                errors.push(ConfigError {
                    key,
                    message,
                    source: None,
                });
            }
        };
        for (key, v) in [
            ("alerts.battery_low_percent", a.battery_low_percent),
            ("alerts.battery_clear_percent", a.battery_clear_percent),
        ] {
            check(
                (0.0..=100.0).contains(&v),
                key.into(),
                format!("must be between 0 and 100, got {v}"),
            );
        }
        check(
            a.battery_clear_percent > a.battery_low_percent,
            "alerts.battery_clear_percent".into(),
            format!(
                "must be above `alerts.battery_low_percent` ({}), or the alert would flap; got {}",
                a.battery_low_percent, a.battery_clear_percent
            ),
        );
        check(
            a.anomaly_sensitivity >= 0.0 && a.anomaly_sensitivity.is_finite(),
            "alerts.anomaly_sensitivity".into(),
            format!(
                "must be 0 (off) or a positive number of standard deviations, got {}",
                a.anomaly_sensitivity
            ),
        );
        check(
            a.anomaly_min_samples >= 2 && a.anomaly_min_samples <= a.anomaly_window,
            "alerts.anomaly_min_samples".into(),
            format!(
                "must be between 2 and `alerts.anomaly_window` ({}), got {}",
                a.anomaly_window, a.anomaly_min_samples
            ),
        );
        check(
            a.anomaly_window <= 10_000,
            "alerts.anomaly_window".into(),
            format!("must be at most 10000, got {}", a.anomaly_window),
        );
        check(
            (1..=1_000).contains(&a.anomaly_max_metrics_per_device),
            "alerts.anomaly_max_metrics_per_device".into(),
            format!(
                "must be between 1 and 1000, got {}",
                a.anomaly_max_metrics_per_device
            ),
        );
        let mut names = Vec::new();
        for (i, t) in a.thresholds.iter().enumerate() {
            let key = |field: &str| format!("alerts.thresholds[{i}].{field}");
            let name_ok = !t.name.is_empty()
                && t.name.len() <= 64
                && t.name.chars().all(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '.' | '-')
                });
            check(
                name_ok,
                key("name"),
                format!(
                    "{:?} must be 1 to 64 characters of a-z, 0-9, '_', '.', '-'",
                    t.name
                ),
            );
            check(
                !BUILT_IN_RULES.contains(&t.name.as_str()) && !t.name.starts_with("anomaly.") && !names.contains(&&t.name),
                key("name"),
                format!("{:?} is already a rule name; names must be unique and not {BUILT_IN_RULES:?} or anomaly.*", t.name),
            );
            names.push(&t.name);
            let metric_ok = t.metric == "battery"
                || t.metric == "rssi"
                || t.metric
                    .strip_prefix("metrics.")
                    .is_some_and(|m| !m.is_empty() && m.len() <= 128);
            check(
                metric_ok,
                key("metric"),
                format!(
                    "{:?} is not `battery`, `rssi` or `metrics.<name>`",
                    t.metric
                ),
            );
            check(
                [">", ">=", "<", "<="].contains(&t.op.as_str()),
                key("op"),
                format!("{:?} is not one of >, >=, <, <=", t.op),
            );
            check(
                t.value.is_finite(),
                key("value"),
                "must be a finite number".into(),
            );
            check(
                ["info", "warning", "critical"].contains(&t.severity.as_str()),
                key("severity"),
                format!("{:?} is not info, warning or critical", t.severity),
            );
        }
    }

    /// The full default configuration as TOML, with every key documented; what
    /// `messina print-config` prints and what `messina.example.toml` holds.
    pub fn documented_defaults() -> String {
        Config::default().documented()
    }

    /// This configuration as TOML with every key documented.
    pub fn documented(&self) -> String {
        let mut out = String::from(
            "# Messina configuration. Every key is optional; shown are the defaults.\n\
             # Any key can be overridden by an environment variable MESSINA__SECTION__KEY,\n\
             # e.g. MESSINA__MQTT__LISTEN=0.0.0.0:1883 or MESSINA__STORAGE__EMBEDDED__PATH=/var/lib/messina.\n",
        );
        self.mqtt.document(&mut out);
        self.http.document(&mut out);
        self.storage.document(&mut out);
        self.ingest_log.document(&mut out);
        self.bridge.document(&mut out);
        self.alerts.document(&mut out);
        self.uploads.document(&mut out);
        self.log.document(&mut out);
        out
    }

    /// The ScyllaDB password, read from `storage.scylla.password` or `storage.scylla.password_file`.
    pub fn scylla_password(&self) -> Result<Option<String>, ConfigErrors> {
        let sc = &self.storage.scylla;
        if !sc.password.is_empty() {
            return Ok(Some(sc.password.clone()));
        }
        if sc.password_file.is_empty() {
            return Ok(None);
        }
        std::fs::read_to_string(&sc.password_file)
            .map(|text| Some(text.lines().next().unwrap_or("").trim().to_string()))
            .map_err(|e| {
                ConfigErrors(vec![ConfigError {
                    key: "storage.scylla.password_file".into(),
                    message: format!("cannot read {}: {e}", sc.password_file),
                    source: None,
                }])
            })
    }

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
    fn resolve_api_keys(&self, read: bool, errors: &mut Vec<ConfigError>) -> Vec<ApiKey> {
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

fn collect_leaves(prefix: &str, dict: &Dict, out: &mut Vec<String>) {
    for (k, v) in dict {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            Value::Dict(_, inner) => collect_leaves(&key, inner, out),
            _ => out.push(key),
        }
    }
}

/// The known key closest to a misspelt one, when it is close enough to be a useful hint.
fn closest<'a>(key: &str, known: &'a [String]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (edit_distance(key, k), k))
        .filter(|(d, _)| *d <= 3)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k.as_str())
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> ConfigErrors {
        Config::from_toml_str(text).expect_err("config should be rejected")
    }

    #[test]
    fn example_config_in_repo_parses_to_the_defaults() {
        let text = include_str!("../../messina.example.toml");
        assert_eq!(Config::from_toml_str(text).unwrap(), Config::default());
    }

    #[test]
    fn example_config_in_repo_is_the_printed_default() {
        let text = include_str!("../../messina.example.toml");
        assert_eq!(text, Config::documented_defaults());
    }

    #[test]
    fn documented_defaults_comment_every_key() {
        let text = Config::documented_defaults();
        let mut keys = Vec::new();
        Config::known_keys(&mut keys);
        let lines: Vec<&str> = text.lines().collect();
        for key in keys {
            let field = key.rsplit('.').next().unwrap();
            let at = lines
                .iter()
                .position(|l| l.starts_with(&format!("{field} = ")))
                .unwrap_or_else(|| panic!("{key} is not printed"));
            assert!(
                lines[at - 1].starts_with('#'),
                "{key} has no comment above it"
            );
        }
    }

    #[test]
    fn file_values_override_defaults() {
        let c = Config::from_toml_str(
            "[mqtt]\nlisten = \"0.0.0.0:1999\"\n[bridge]\nbatch_max_rows = 5\n[storage.embedded]\npath = \"/tmp/x\"\n",
        )
        .unwrap();
        assert_eq!(c.mqtt.listen, "0.0.0.0:1999".parse().unwrap());
        assert_eq!(c.bridge.batch_max_rows, 5);
        assert_eq!(c.storage.embedded.path, PathBuf::from("/tmp/x"));
        assert_eq!(c.http, HttpConfig::default());
    }

    #[test]
    fn every_error_is_reported_at_once_and_names_its_key() {
        let e = errors(
            "[mqtt]\nlisen = \"x\"\nlisten = \"not an address\"\n\
             [bridge]\nbatch_max_rows = 0\nbatch_max_delay_ms = \"soon\"\n\
             [storage]\nbackend = \"mysql\"\n[nope]\nx = 1\n",
        );
        for key in [
            "mqtt.lisen",
            "mqtt.listen",
            "bridge.batch_max_rows",
            "bridge.batch_max_delay_ms",
            "storage.backend",
            "nope.x",
        ] {
            assert!(e.mentions(key), "{key} not reported in:\n{e}");
        }
        let text = e.to_string();
        assert!(text.contains("did you mean `mqtt.listen`?"), "{text}");
        assert!(
            text.contains("embedded"),
            "valid backends are named: {text}"
        );
    }

    #[test]
    fn bad_alert_rules_are_refused_naming_the_key() {
        let e = errors(
            "[alerts]\nbattery_low_percent = 30\nbattery_clear_percent = 20\n\
             thresholds = [{ name = \"hot\", metric = \"temperature\", op = \"=>\", value = 1.0 },\
                           { name = \"offline\", metric = \"metrics.t\", op = \">\", value = 1.0, severity = \"loud\" }]\n",
        );
        for key in [
            "alerts.battery_clear_percent",
            "alerts.thresholds[0].metric",
            "alerts.thresholds[0].op",
            "alerts.thresholds[1].name",
            "alerts.thresholds[1].severity",
        ] {
            assert!(e.mentions(key), "{key} not reported in:\n{e}");
        }
        let ok = Config::from_toml_str(
            "[alerts]\nthresholds = [{ name = \"hot\", metric = \"metrics.temp_c\", op = \">\", value = 60.0, for_s = 30 }]\n",
        )
        .unwrap();
        assert_eq!(ok.alerts.thresholds[0].severity, "warning");
    }

    #[test]
    fn a_file_that_does_not_parse_says_so() {
        let e = errors("[mqtt\nlisten = ");
        assert_eq!(e.0.len(), 1);
        assert!(e.to_string().contains("TOML"), "{e}");
    }

    #[test]
    fn inconsistent_values_are_rejected() {
        let e = errors(
            "[http]\ndefault_page_size = 5000\nlow_battery_percent = 150\napi_key = \"short\"\n\
             tls_key_file = \"key.pem\"\ntls_client_ca_file = \"ca.pem\"\ntls_reload_secs = 0\n\
             [uploads]\nphoto_max_bytes = 0\nlog_max_bytes = 6000000000\n",
        );
        for key in [
            "uploads.photo_max_bytes",
            "uploads.log_max_bytes",
            "http.default_page_size",
            "http.low_battery_percent",
            "http.api_key",
            "http.tls_cert_file",
            "http.tls_client_ca_file",
            "http.tls_reload_secs",
        ] {
            assert!(e.mentions(key), "{key} not reported in:\n{e}");
        }
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API returns its own large error type.
    fn environment_overrides_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("m.toml", "[mqtt]\nlisten = \"127.0.0.1:2000\"\n")?;
            jail.set_env("MESSINA__MQTT__LISTEN", "127.0.0.1:3000");
            jail.set_env("MESSINA__STORAGE__EMBEDDED__PATH", "/srv/messina");
            jail.set_env("MESSINA__BRIDGE__BATCH_MAX_ROWS", "42");
            let c = Config::load(Some(Path::new("m.toml"))).unwrap();
            assert_eq!(c.mqtt.listen, "127.0.0.1:3000".parse().unwrap());
            assert_eq!(c.storage.embedded.path, PathBuf::from("/srv/messina"));
            assert_eq!(c.bridge.batch_max_rows, 42);
            jail.set_env("MESSINA__BRIDGE__BATCH_MAX_ROWZ", "1");
            let e = Config::load(None).unwrap_err();
            assert!(e.mentions("bridge.batch_max_rowz"), "{e}");
            assert!(e.to_string().contains("MESSINA__"), "{e}");
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API returns its own large error type.
    fn api_keys_come_from_config_files_and_the_environment_with_their_roles() {
        figment::Jail::expect_with(|jail| {
            // Every line is a key (two while a rotation moves callers), blank lines aside.
            jail.create_file(
                "admin.key",
                "admin-key-from-a-file-0001\n\n  admin-key-from-a-file-0002  \n",
            )?;
            jail.set_env("ANALYTICS_KEY", "read-key-from-the-env-0001");
            jail.create_file(
                "m.toml",
                "[http]\napi_key = \"legacy-admin-key-00001\"\napi_keys = [\
                 { key = \"write-key-inline-000001\", role = \"write\" },\
                 { key_file = \"admin.key\", role = \"admin\", name = \"ops\" },\
                 { key_env = \"ANALYTICS_KEY\", role = \"read\" }]\n",
            )?;
            let c = Config::load(Some(Path::new("m.toml"))).unwrap();
            let keys: Vec<(String, ApiRole, String)> = c
                .api_keys()
                .unwrap()
                .into_iter()
                .map(|k| (k.name, k.role, k.key))
                .collect();
            let expected = [
                ("http.api_key", ApiRole::Admin, "legacy-admin-key-00001"),
                (
                    "http.api_keys[0]",
                    ApiRole::Write,
                    "write-key-inline-000001",
                ),
                ("ops", ApiRole::Admin, "admin-key-from-a-file-0001"),
                ("ops", ApiRole::Admin, "admin-key-from-a-file-0002"),
                (
                    "http.api_keys[2]",
                    ApiRole::Read,
                    "read-key-from-the-env-0001",
                ),
            ]
            .map(|(n, r, k)| (n.to_string(), r, k.to_string()));
            assert_eq!(keys, expected);
            assert!(ApiRole::Admin > ApiRole::Write && ApiRole::Write > ApiRole::Read);
            let shown = format!("{:?}", c.api_keys().unwrap());
            assert!(!shown.contains("key-from"), "Debug hides keys: {shown}");

            // The whole list from one environment variable.
            jail.set_env(
                "MESSINA__HTTP__API_KEYS",
                "[{key_env=\"ANALYTICS_KEY\",role=\"write\",max_request_rate=5},\
                  {key=\"another-key-inline-0001\",role=\"read\"}]",
            );
            jail.set_env("MESSINA__HTTP__MAX_REQUEST_RATE", "100");
            let c = Config::load(None).unwrap();
            let keys = c.api_keys().unwrap();
            assert_eq!(keys.len(), 2);
            assert_eq!(keys[0].role, ApiRole::Write);
            assert_eq!(keys[0].key, "read-key-from-the-env-0001");
            assert_eq!(
                (keys[0].max_request_rate, keys[1].max_request_rate),
                (5, 100),
                "a key's own rate, else `http.max_request_rate`"
            );
            Ok(())
        });
    }

    #[test]
    fn bad_api_keys_and_origins_are_refused_naming_the_key() {
        let text = "[http]\napi_key_file = \"/nonexistent/admin.key\"\napi_keys = [\
             { key = \"short\", role = \"read\" },\
             { key_file = \"/nonexistent/k\", role = \"admin\" },\
             { key_env = \"MESSINA_TEST_UNSET_KEY_VARIABLE\", role = \"read\" },\
             { role = \"read\" },\
             { key = \"with a space in it 0001\", role = \"read\" },\
             { key = \"abcdefghijklmnop\", key_env = \"X\", role = \"read\" },\
             { key = \"same-key-twice-000001\", role = \"read\" },\
             { key = \"same-key-twice-000001\", role = \"admin\" }]\n\
             cors_origins = [\"https://ok.example.com:8443\", \"https://x.example.com/path\", \"ftp://x\"]\n";
        // Loading checks what the configuration holds...
        let e = errors(text);
        for key in [
            "http.api_keys[0].key",
            "http.api_keys[3]",
            "http.api_keys[4].key",
            "http.api_keys[5]",
            "http.api_keys[7].key",
            "http.cors_origins[1]",
            "http.cors_origins[2]",
        ] {
            assert!(e.mentions(key), "{key} not reported in:\n{e}");
        }
        for key in [
            "http.api_key_file",
            "http.api_keys[1].key_file",
            "http.api_keys[2].key_env",
        ] {
            assert!(!e.mentions(key), "{key} is read only at start:\n{e}");
        }
        assert!(!e.mentions("http.cors_origins[0]"), "{e}");
        // ...and a server, at start, reads the files and variables it names too.
        let parsed: toml::Value = toml::from_str(text).unwrap();
        let mut config = Config::default();
        config.http.api_key_file = "/nonexistent/admin.key".into();
        config.http.api_keys = parsed["http"]["api_keys"].clone().try_into().unwrap();
        let e = config.api_keys().unwrap_err();
        for key in [
            "http.api_key_file",
            "http.api_keys[0].key",
            "http.api_keys[1].key_file",
            "http.api_keys[2].key_env",
            "http.api_keys[3]",
            "http.api_keys[4].key",
            "http.api_keys[5]",
            "http.api_keys[7].key",
        ] {
            assert!(e.mentions(key), "{key} not reported in:\n{e}");
        }
        let text = e.to_string();
        assert!(text.contains("/nonexistent/k"), "the file is named: {text}");
        assert!(
            !text.contains("same-key-twice"),
            "keys are never shown: {text}"
        );
        let e = errors("[http]\napi_keys = [{ key = \"abcdefghijklmnopq\", role = \"root\" }]\n");
        assert!(e.mentions("http.api_keys"), "{e}");
        assert!(e.to_string().contains("admin"), "the roles are named: {e}");
    }

    #[test]
    fn a_missing_file_says_how_to_make_one() {
        let e = Config::load(Some(Path::new("/nonexistent/messina.toml"))).unwrap_err();
        assert!(e.to_string().contains("print-config"), "{e}");
    }
}
