//! `[ingest_log]`: the ingest log.

use super::*;

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

impl IngestLogConfig {
    /// Checks values that parse but make no sense; each problem names its key.
    pub(crate) fn validate(&self, check: &mut impl FnMut(bool, &str, String)) {
        let l = self;
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
    }
}
