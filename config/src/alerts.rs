//! `[alerts]`: the alert rules.

use super::*;

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

impl AlertsConfig {
    /// Checks values that parse but make no sense; each problem names its key.
    pub(crate) fn validate(&self, outer: &mut impl FnMut(bool, &str, String)) {
        let a = self;
        let mut check = |ok: bool, key: String, message: String| outer(ok, &key, message);
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
}
