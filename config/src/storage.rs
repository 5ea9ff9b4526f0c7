//! `[storage]`, `[storage.embedded]`, `[storage.scylla]`: where data is stored.

use super::*;

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

impl StorageConfig {
    /// Checks values that parse but make no sense; each problem names its key.
    pub(crate) fn validate(&self, check: &mut impl FnMut(bool, &str, String)) {
        let sc = &self.scylla;
        check(
            self.embedded.path != Path::new(""),
            "storage.embedded.path",
            "must not be empty".into(),
        );
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
    }
}

impl Config {
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
}
