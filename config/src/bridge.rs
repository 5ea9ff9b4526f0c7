//! `[bridge]`: decoding, validation and batching.

use super::*;

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

impl BridgeConfig {
    /// Checks values that parse but make no sense; each problem names its key.
    pub(crate) fn validate(&self, check: &mut impl FnMut(bool, &str, String)) {
        let b = self;
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
}
