//! `[log]`: logging.

use super::*;

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
    /// Logging.
    pub struct LogConfig at "log" {
        /// Filter in `tracing` syntax, e.g. "info" or "messina=debug,rumqttd=warn"; the RUST_LOG
        /// environment variable overrides it.
        pub level: String = String::from("info,rumqttd=warn,fjall=warn,lsm_tree=warn"),
        /// "text" or "json".
        pub format: LogFormat = LogFormat::Text,
    }
}
