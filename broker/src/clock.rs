//! The server's clock and its one text form: milliseconds since the epoch (`Millis`, what
//! storage and MQTT payloads hold) and RFC 3339 (what the HTTP API and JSON messages show).

use messina_storage::Millis;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Now, in milliseconds since the epoch: storage's clock, so the process has one.
pub use messina_storage::model::now_millis;

/// RFC 3339 UTC with milliseconds, e.g. `2026-11-23T09:15:22.123Z`; the bare number for a time
/// RFC 3339 cannot write.
pub fn rfc3339(ms: Millis) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| ms.to_string())
}

/// An RFC 3339 time (`2026-01-01T00:00:00Z`, any offset) as milliseconds since the epoch.
pub fn parse_rfc3339(text: &str) -> Result<Millis, time::error::Parse> {
    OffsetDateTime::parse(text, &Rfc3339).map(|t| (t.unix_timestamp_nanos() / 1_000_000) as Millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips_milliseconds() {
        assert_eq!(rfc3339(1_764_000_000_123), "2025-11-24T16:00:00.123Z");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(
            parse_rfc3339("2025-11-24T16:00:00.123Z"),
            Ok(1_764_000_000_123)
        );
        assert_eq!(
            parse_rfc3339("2025-11-24T17:00:00.123+01:00"),
            Ok(1_764_000_000_123)
        );
        assert!(parse_rfc3339("yesterday").is_err());
    }
}
