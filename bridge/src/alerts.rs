//! Alert rules on the ingest stream and the alert lifecycle: raised → acknowledged → cleared, at
//! most one active alert per (device, rule).
//!
//! [`AlertEngine`] is the pure state machine (no I/O, tested alone). [`AlertService`] wraps it for
//! the running process: it stores every transition and hands it to the broker as a [`Notice`] to
//! publish on `alerts/{device}/{rule}` and `devices/{id}/presence`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use messina_config::{AlertsConfig, ThresholdRule};
use messina_storage::backoff::Backoff;
use messina_storage::{
    Alert, AlertQuery, AlertState, AlertStateFilter, AttrValue, Batch, DeviceId, FleetQuery,
    Millis, PageRequest, Reading, Storage, StorageError,
};
use tokio::sync::{broadcast, mpsc};

use crate::meter;
use crate::OnStored;

/// Transitions kept for live watchers ([`AlertService::watch`]) that fall behind; one that falls
/// further is told to read the active alerts again.
const WATCH_BACKLOG: usize = 1024;

pub const BATTERY_LOW: &str = "battery_low";
pub const OFFLINE: &str = "offline";
pub const SYNC_FAILURES: &str = "sync_failures";
pub const ANOMALY_PREFIX: &str = "anomaly.";

/// A value a threshold rule looks at.
#[derive(Debug, Clone, PartialEq)]
enum Metric {
    Battery,
    Rssi,
    Named(String),
}

impl Metric {
    fn parse(s: &str) -> Option<Metric> {
        match s {
            "battery" => Some(Metric::Battery),
            "rssi" => Some(Metric::Rssi),
            _ => s
                .strip_prefix("metrics.")
                .map(|m| Metric::Named(m.to_string())),
        }
    }

    fn of(&self, r: &Reading) -> Option<f64> {
        match self {
            Metric::Battery => r.battery,
            Metric::Rssi => r.rssi.map(f64::from),
            Metric::Named(name) => r.metrics.get(name).copied(),
        }
    }
}

#[derive(Debug, Clone)]
struct Threshold {
    name: String,
    metric: Metric,
    op: String,
    value: f64,
    for_ms: i64,
    severity: String,
    label: String,
}

impl Threshold {
    fn holds(&self, v: f64) -> bool {
        match self.op.as_str() {
            ">" => v > self.value,
            ">=" => v >= self.value,
            "<" => v < self.value,
            _ => v <= self.value,
        }
    }
}

/// The rules, from `[alerts]` (already validated by the config loader).
#[derive(Debug, Clone)]
pub struct Rules {
    pub enabled: bool,
    battery_low: f64,
    battery_clear: f64,
    offline_after_ms: i64,
    sync_failures: u32,
    anomaly_z: f64,
    anomaly_window: usize,
    anomaly_min: usize,
    anomaly_max_metrics: usize,
    thresholds: Vec<Threshold>,
}

impl Rules {
    pub fn from_config(c: &AlertsConfig) -> Self {
        let threshold = |t: &ThresholdRule| Threshold {
            name: t.name.clone(),
            metric: Metric::parse(&t.metric).unwrap_or(Metric::Named(t.metric.clone())),
            op: t.op.clone(),
            value: t.value,
            for_ms: (t.for_s as i64).saturating_mul(1000),
            severity: t.severity.clone(),
            label: t.metric.clone(),
        };
        Rules {
            enabled: c.enabled,
            battery_low: c.battery_low_percent,
            battery_clear: c.battery_clear_percent,
            offline_after_ms: (c.offline_after_s as i64).saturating_mul(1000),
            sync_failures: c.sync_failures,
            anomaly_z: c.anomaly_sensitivity,
            anomaly_window: c.anomaly_window,
            anomaly_min: c.anomaly_min_samples,
            anomaly_max_metrics: c.anomaly_max_metrics_per_device,
            thresholds: c.thresholds.iter().map(threshold).collect(),
        }
    }
}

/// Something the broker publishes.
#[derive(Debug, Clone, PartialEq)]
pub enum Notice {
    /// A transition of an alert: retained on `alerts/{device}/{rule}`.
    Alert(Alert),
    /// A device came online or went offline: retained on `devices/{id}/presence`.
    Presence {
        device: DeviceId,
        online: bool,
        at: Millis,
    },
}

/// Why an acknowledgement was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    #[error("no active alert {0}")]
    NotActive(String),
}

/// Recent values of one metric of one device, for the rolling z-score.
#[derive(Debug, Default)]
struct Window {
    values: VecDeque<f64>,
}

impl Window {
    /// Mean and standard deviation, once the window holds `min` values.
    fn stats(&self, min: usize) -> Option<(f64, f64)> {
        let n = self.values.len();
        if n < min {
            return None;
        }
        let mean = self.values.iter().sum::<f64>() / n as f64;
        let var = self.values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        Some((mean, var.sqrt()))
    }
}

/// What a rule found: the alert it raises, unless one of the rule is already active.
struct Condition<'a> {
    rule: &'a str,
    severity: &'a str,
    message: String,
    value: Option<f64>,
    threshold: Option<f64>,
}

/// The alert state machine. Every method returns the notices its transitions produce.
pub struct AlertEngine {
    rules: Rules,
    active: HashMap<(DeviceId, String), Alert>,
    /// Server time each device was last heard from.
    last_seen: HashMap<DeviceId, Millis>,
    /// Each device by when it was last heard from, rounded up to the second (so it changes at
    /// most once a second per device): the offline rule's tick reads only the devices that fell
    /// silent, not the whole fleet. An entry leaves when it is judged.
    silence: BTreeSet<(Millis, DeviceId)>,
    sync_failures: HashMap<DeviceId, u32>,
    /// When each threshold condition started holding (device time).
    holding_since: HashMap<(DeviceId, String), Millis>,
    /// Per device, per metric name.
    windows: HashMap<DeviceId, HashMap<String, Window>>,
    /// How many alerts are active per device: the hot path asks this (a borrowed lookup, no
    /// allocation) before building the keys and messages a clear needs.
    active_count: HashMap<DeviceId, u32>,
    /// Devices whose state changed since it was last saved ([`AlertEngine::take_changed`]).
    changed: HashSet<DeviceId>,
}

/// What the engine remembers of one device besides its active alerts, as saved in storage so a
/// restart resumes where the rules stood: JSON behind a version byte.
#[derive(Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
struct Memory {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_seen: Option<Millis>,
    #[serde(default, skip_serializing_if = "is_zero")]
    sync_failures: u32,
    /// Threshold rule → when its condition started holding.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    holding_since: BTreeMap<String, Millis>,
    /// Metric → the anomaly window's values, oldest first.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    windows: BTreeMap<String, Vec<f64>>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

const MEMORY_VERSION: u8 = 1;

impl AlertEngine {
    pub fn new(rules: Rules) -> Self {
        AlertEngine {
            rules,
            active: HashMap::new(),
            last_seen: HashMap::new(),
            silence: BTreeSet::new(),
            sync_failures: HashMap::new(),
            holding_since: HashMap::new(),
            windows: HashMap::new(),
            active_count: HashMap::new(),
            changed: HashSet::new(),
        }
    }

    /// The saved state of every device whose state changed since the last call: what the
    /// service writes to storage (an empty value: nothing left to remember).
    pub fn take_changed(&mut self) -> Vec<(DeviceId, Vec<u8>)> {
        if self.changed.is_empty() {
            return Vec::new();
        }
        let changed = std::mem::take(&mut self.changed);
        let mut memories: HashMap<&DeviceId, Memory> = changed
            .iter()
            .map(|d| {
                let m = Memory {
                    last_seen: self.last_seen.get(d).copied(),
                    sync_failures: self.sync_failures.get(d).copied().unwrap_or(0),
                    holding_since: BTreeMap::new(),
                    windows: self
                        .windows
                        .get(d)
                        .map(|w| {
                            w.iter()
                                .map(|(k, v)| (k.clone(), v.values.iter().copied().collect()))
                                .collect()
                        })
                        .unwrap_or_default(),
                };
                (d, m)
            })
            .collect();
        for ((d, rule), since) in &self.holding_since {
            if let Some(m) = memories.get_mut(d) {
                m.holding_since.insert(rule.clone(), *since);
            }
        }
        memories
            .into_iter()
            .map(|(d, m)| {
                let bytes = if m == Memory::default() {
                    Vec::new()
                } else {
                    let mut b = vec![MEMORY_VERSION];
                    b.extend(serde_json::to_vec(&m).expect("the memory serialises"));
                    b
                };
                (d.clone(), bytes)
            })
            .collect()
    }

    /// Takes back what [`take_changed`](Self::take_changed) saved before a restart. Returns how
    /// many states could not be read (a newer Messina wrote them); those devices start afresh.
    pub fn restore_memory(&mut self, saved: Vec<(DeviceId, Vec<u8>)>) -> usize {
        let mut unreadable = 0;
        for (device, bytes) in saved {
            let memory = match bytes.split_first() {
                Some((&MEMORY_VERSION, json)) => serde_json::from_slice::<Memory>(json).ok(),
                _ => None,
            };
            let Some(m) = memory else {
                unreadable += 1;
                continue;
            };
            if let Some(at) = m.last_seen {
                self.seen(&device, at);
            }
            if m.sync_failures > 0 {
                self.sync_failures.insert(device.clone(), m.sync_failures);
            }
            for (rule, since) in m.holding_since {
                self.holding_since.insert((device.clone(), rule), since);
            }
            if !m.windows.is_empty() {
                let windows = self.windows.entry(device.clone()).or_default();
                for (metric, values) in m.windows {
                    windows.insert(
                        metric,
                        Window {
                            values: values.into_iter().collect(),
                        },
                    );
                }
            }
        }
        unreadable
    }

    /// Takes back the active alerts and last-seen times stored before a restart, so offline
    /// detection and the one-active-alert rule continue across restarts.
    pub fn restore(&mut self, active: Vec<Alert>, last_seen: Vec<(DeviceId, Millis)>) {
        for a in active.into_iter().filter(|a| a.state.is_active()) {
            let key = (a.device.clone(), a.rule.clone());
            if self.active.insert(key, a.clone()).is_none() {
                *self.active_count.entry(a.device).or_default() += 1;
            }
        }
        for (device, at) in last_seen {
            self.seen(&device, at);
        }
    }

    /// Records that `device` was heard from at `at` (an earlier time changes nothing); `false`
    /// when it was never heard from before.
    fn seen(&mut self, device: &DeviceId, at: Millis) -> bool {
        let second = |t: Millis| (t + 999).div_euclid(1000) * 1000;
        let before = self.last_seen.get(device).copied();
        let after = before.map_or(at, |b| b.max(at));
        if before == Some(after) {
            return true;
        }
        self.last_seen.insert(device.clone(), after);
        let (old, new) = (before.map(second), second(after));
        if old != Some(new) {
            if let Some(old) = old {
                self.silence.remove(&(old, device.clone()));
            }
            self.silence.insert((new, device.clone()));
        }
        before.is_some()
    }

    pub fn active(&self) -> impl Iterator<Item = &Alert> {
        self.active.values()
    }

    fn raise(&mut self, device: &DeviceId, c: Condition<'_>, at: Millis, out: &mut Vec<Notice>) {
        let Condition {
            rule,
            severity,
            message,
            value,
            threshold,
        } = c;
        let key = (device.clone(), rule.to_string());
        if self.active.contains_key(&key) {
            return;
        }
        let alert = Alert {
            id: Alert::id_for(device, rule, at),
            device: device.clone(),
            rule: rule.to_string(),
            state: AlertState::Raised,
            severity: severity.to_string(),
            message,
            value,
            threshold,
            raised_at: at,
            acked_at: None,
            acked_by: None,
            cleared_at: None,
        };
        self.active.insert(key, alert.clone());
        *self.active_count.entry(device.clone()).or_default() += 1;
        if rule == OFFLINE {
            out.push(Notice::Presence {
                device: device.clone(),
                online: false,
                at,
            });
        }
        out.push(Notice::Alert(alert));
    }

    /// True when the device has any active alert; cheap, for the hot path.
    fn has_active(&self, device: &DeviceId) -> bool {
        self.active_count.contains_key(device)
    }

    /// Clears the active alert of `rule` on `device`, if any; the message is built only then.
    fn clear(
        &mut self,
        device: &DeviceId,
        rule: &str,
        message: impl FnOnce() -> String,
        value: Option<f64>,
        at: Millis,
        out: &mut Vec<Notice>,
    ) {
        if !self.has_active(device) {
            return;
        }
        if let Some(mut alert) = self.active.remove(&(device.clone(), rule.to_string())) {
            match self.active_count.get_mut(device) {
                Some(n) if *n > 1 => *n -= 1,
                _ => {
                    self.active_count.remove(device);
                }
            }
            alert.state = AlertState::Cleared;
            alert.cleared_at = Some(at);
            alert.message = message();
            if value.is_some() {
                alert.value = value;
            }
            if rule == OFFLINE {
                out.push(Notice::Presence {
                    device: device.clone(),
                    online: true,
                    at,
                });
            }
            out.push(Notice::Alert(alert));
        }
    }

    /// The device was heard from at server time `at`.
    fn heard(&mut self, device: &DeviceId, at: Millis, out: &mut Vec<Notice>) {
        // Everything the engine remembers of a device changes only when it is heard from.
        if !self.changed.contains(device) {
            self.changed.insert(device.clone());
        }
        if !self.seen(device, at)
            && !self
                .active
                .contains_key(&(device.clone(), OFFLINE.to_string()))
        {
            out.push(Notice::Presence {
                device: device.clone(),
                online: true,
                at,
            });
        }
        self.clear(
            device,
            OFFLINE,
            || format!("{device} is online again"),
            None,
            at,
            out,
        );
    }

    /// Evaluates the rules on a batch that was just stored.
    pub fn observe(&mut self, batch: &Batch) -> Vec<Notice> {
        let mut out = Vec::new();
        if !self.rules.enabled {
            return out;
        }
        for r in &batch.readings {
            self.heard(&r.device, r.received_at, &mut out);
            self.reading(r, &mut out);
        }
        for e in &batch.events {
            self.heard(&e.device, e.received_at, &mut out);
            if e.kind == "sync" && self.rules.sync_failures > 0 {
                let errors = match e.attrs.get("errors") {
                    Some(AttrValue::Int(n)) => *n,
                    _ => 0,
                };
                let at = e.received_at;
                if errors > 0 {
                    let n = self.sync_failures.entry(e.device.clone()).or_insert(0);
                    *n += 1;
                    let n = *n;
                    if n >= self.rules.sync_failures {
                        let message = format!("{}: {n} consecutive syncs failed", e.device);
                        self.raise(
                            &e.device,
                            Condition {
                                rule: SYNC_FAILURES,
                                severity: "warning",
                                message,
                                value: Some(f64::from(n)),
                                threshold: Some(f64::from(self.rules.sync_failures)),
                            },
                            at,
                            &mut out,
                        );
                    }
                } else {
                    self.sync_failures.remove(&e.device);
                    self.clear(
                        &e.device,
                        SYNC_FAILURES,
                        || format!("{}: sync succeeded", e.device),
                        Some(0.0),
                        at,
                        &mut out,
                    );
                }
            }
        }
        for d in &batch.dead_letters {
            if let Some(device) = &d.device {
                self.heard(device, d.received_at, &mut out);
            }
        }
        out
    }

    fn reading(&mut self, r: &Reading, out: &mut Vec<Notice>) {
        let at = r.received_at;
        let device = &r.device;
        if let Some(b) = r.battery {
            if b < self.rules.battery_low {
                let message = format!(
                    "{device}: battery at {b}%, below {}%",
                    self.rules.battery_low
                );
                self.raise(
                    device,
                    Condition {
                        rule: BATTERY_LOW,
                        severity: "warning",
                        message,
                        value: Some(b),
                        threshold: Some(self.rules.battery_low),
                    },
                    at,
                    out,
                );
            } else if b > self.rules.battery_clear {
                let message = || format!("{device}: battery back at {b}%");
                self.clear(device, BATTERY_LOW, message, Some(b), at, out);
            }
        }
        for i in 0..self.rules.thresholds.len() {
            // Cloned only for a reading that carries the rule's metric.
            let Some(v) = self.rules.thresholds[i].metric.of(r) else {
                continue;
            };
            let t = self.rules.thresholds[i].clone();
            let key = (device.clone(), t.name.clone());
            if t.holds(v) {
                let since = *self.holding_since.entry(key).or_insert(r.ts);
                if r.ts - since >= t.for_ms {
                    let message = format!("{device}: {} is {v}, {} {}", t.label, t.op, t.value);
                    self.raise(
                        device,
                        Condition {
                            rule: &t.name,
                            severity: &t.severity,
                            message,
                            value: Some(v),
                            threshold: Some(t.value),
                        },
                        at,
                        out,
                    );
                }
            } else {
                self.holding_since.remove(&key);
                let message = || format!("{device}: {} back at {v}", t.label);
                self.clear(device, &t.name, message, Some(v), at, out);
            }
        }
        if self.rules.anomaly_z > 0.0 {
            let values = r
                .battery
                .map(|b| ("battery", b))
                .into_iter()
                .chain(r.rssi.map(|x| ("rssi", f64::from(x))))
                .chain(r.metrics.iter().map(|(k, v)| (k.as_str(), *v)));
            for (name, v) in values {
                let windows = match self.windows.get_mut(device) {
                    Some(w) => w,
                    None => self.windows.entry(device.clone()).or_default(),
                };
                // A device may name any number of metrics; beyond the cap they are stored but
                // not judged, so one device cannot grow the server's memory at will.
                if !windows.contains_key(name) && windows.len() >= self.rules.anomaly_max_metrics {
                    meter::untracked_metric();
                    continue;
                }
                let window = match windows.get_mut(name) {
                    Some(w) => w,
                    None => windows.entry(name.to_string()).or_default(),
                };
                let z = window
                    .stats(self.rules.anomaly_min)
                    .filter(|(_, sd)| *sd > 0.0)
                    .map(|(mean, sd)| ((v - mean) / sd, mean));
                let anomalous = z.is_some_and(|(z, _)| z.abs() > self.rules.anomaly_z);
                // Outliers stay out of the window, so one spike does not widen what counts as normal.
                if !anomalous {
                    window.values.push_back(v);
                    if window.values.len() > self.rules.anomaly_window {
                        window.values.pop_front();
                    }
                }
                match z {
                    Some((z, mean)) if anomalous => {
                        let rule = format!("{ANOMALY_PREFIX}{name}");
                        let message = format!("{device}: {name} is {v}, {z:.1} standard deviations from its recent mean {mean:.2}");
                        self.raise(
                            device,
                            Condition {
                                rule: &rule,
                                severity: "info",
                                message,
                                value: Some(v),
                                threshold: Some(self.rules.anomaly_z),
                            },
                            at,
                            out,
                        );
                    }
                    _ if self.has_active(device) => {
                        let rule = format!("{ANOMALY_PREFIX}{name}");
                        let message = || format!("{device}: {name} back to normal at {v}");
                        self.clear(device, &rule, message, Some(v), at, out);
                    }
                    _ => {}
                }
            }
        }
    }

    /// A device's will message arrived: its connection was lost without DISCONNECT.
    pub fn connection_lost(&mut self, device: &DeviceId, at: Millis) -> Vec<Notice> {
        let mut out = Vec::new();
        if self.rules.enabled {
            let message = format!("{device}: connection lost without DISCONNECT (will message)");
            self.raise(
                device,
                Condition {
                    rule: OFFLINE,
                    severity: "critical",
                    message,
                    value: None,
                    threshold: None,
                },
                at,
                &mut out,
            );
        }
        out
    }

    /// Raises `offline` for devices silent longer than the configured interval.
    pub fn tick(&mut self, now: Millis) -> Vec<Notice> {
        let mut out = Vec::new();
        if !self.rules.enabled || self.rules.offline_after_ms <= 0 {
            return out;
        }
        // Entries are rounded up, so one before the cutoff is a device silent for longer than
        // the rule allows; each is judged once and leaves (hearing from the device puts it back).
        let cutoff = now - self.rules.offline_after_ms;
        let mut silent = Vec::new();
        while let Some((at, _)) = self.silence.first() {
            if *at >= cutoff {
                break;
            }
            let Some((_, device)) = self.silence.pop_first() else {
                break;
            };
            let Some(seen) = self.last_seen.get(&device).copied() else {
                continue;
            };
            if now - seen > self.rules.offline_after_ms
                && !self
                    .active
                    .contains_key(&(device.clone(), OFFLINE.to_string()))
            {
                silent.push((device, seen));
            }
        }
        for (device, seen) in silent {
            let secs = (now - seen) / 1000;
            let message = format!("{device}: silent for {secs} s");
            self.raise(
                &device,
                Condition {
                    rule: OFFLINE,
                    severity: "critical",
                    message,
                    value: Some(secs as f64),
                    threshold: Some((self.rules.offline_after_ms / 1000) as f64),
                },
                now,
                &mut out,
            );
        }
        out
    }

    /// Acknowledges an active alert by id (again acknowledging one is a no-op that returns it).
    pub fn ack(&mut self, id: &str, by: &str, at: Millis) -> Result<Alert, AckError> {
        // The id names its device and rule, so the active alert is one lookup away; it must
        // also be the same raise (an older alert of that rule is no longer active).
        let alert = Alert::parse_id(id)
            .and_then(|(device, rule, _)| self.active.get_mut(&(device, rule.to_string())))
            .filter(|a| a.id == id)
            .ok_or_else(|| AckError::NotActive(id.to_string()))?;
        if alert.state == AlertState::Raised {
            alert.state = AlertState::Acknowledged;
            alert.acked_at = Some(at);
            alert.acked_by = Some(by.to_string());
        }
        Ok(alert.clone())
    }

    /// The id of the active alert of `rule` on `device`, for acknowledgements by topic.
    pub fn active_id(&self, device: &DeviceId, rule: &str) -> Option<String> {
        self.active
            .get(&(device.clone(), rule.to_string()))
            .map(|a| a.id.clone())
    }
}

/// The engine in a running process: rules are evaluated in memory where the data arrives (the
/// bridge's writer, the edge's wills, the ticker), and transitions go, in order, to a committer
/// task of their own that stores them, counts them and hands them to the broker. Slow or failing
/// alert storage therefore never holds up ingestion.
///
/// What the rules remember is saved each tick for the devices that changed, with the log position
/// through which the engine had seen everything; only once that is saved does the position go on
/// to the checkpoint. A crash therefore replays what the saved memory has not seen, and a restart
/// resumes exactly where the rules stopped.
pub struct AlertService {
    engine: Mutex<AlertEngine>,
    /// The log position through which the engine has seen every stored batch, not yet handed to
    /// the committer; locked only while `engine` is, so it always matches the engine's memory.
    seen_through: Mutex<Option<u64>>,
    commits: mpsc::UnboundedSender<Commit>,
    /// Every stored transition, for live watchers (the dashboard's alert stream).
    changes: broadcast::Sender<Alert>,
}

/// Notices for the committer: transitions to store (`store`), or active alerts to publish again;
/// `done` is told once they are stored (or given up).
struct Commit {
    notices: Vec<Notice>,
    store: bool,
    /// Devices' engine state to save, after the transitions, and the log position through which
    /// it has seen everything, told to `on_saved` once it is saved.
    memory: Option<Memories>,
    done: Option<tokio::sync::oneshot::Sender<()>>,
}

/// What the rules remember of the devices that changed, and the log position it covers.
type Memories = (Vec<(DeviceId, Vec<u8>)>, Option<u64>);

impl Commit {
    /// Notices to publish, stored first when `store`; nothing else.
    fn of(notices: Vec<Notice>, store: bool) -> Self {
        Commit {
            notices,
            store,
            memory: None,
            done: None,
        }
    }
}

impl AlertService {
    /// Creates the service and restores active alerts and the rules' memory from storage.
    /// `on_saved` is told, in log order, the positions through which the memory is saved.
    pub async fn start(
        rules: Rules,
        storage: Arc<dyn Storage>,
        notices: mpsc::Sender<Notice>,
        on_saved: OnStored,
    ) -> Result<Arc<Self>, StorageError> {
        let mut active = Vec::new();
        let mut q = AlertQuery::all(1000);
        q.state = Some(AlertStateFilter::Active);
        loop {
            let page = storage.alerts(&q).await?;
            active.extend(page.items);
            match page.next_cursor {
                Some(c) => q.page.cursor = Some(c),
                None => break,
            }
        }
        // One read of the saved per-device state (O(devices)). A store written before that state
        // was saved has none: the fleet's last-seen times stand in, once.
        let memory = storage.alert_states().await?;
        let devices = memory.len();
        let mut engine = AlertEngine::new(rules);
        let last_seen = if memory.is_empty() {
            let mut last_seen = Vec::new();
            let mut page = PageRequest::first(1000);
            loop {
                let fleet = storage.fleet(&FleetQuery { page: page.clone() }).await?;
                last_seen.extend(fleet.items.iter().map(|d| (d.device.clone(), d.last_seen)));
                match fleet.next_cursor {
                    Some(c) => page.cursor = Some(c),
                    None => break,
                }
            }
            last_seen
        } else {
            let unreadable = engine.restore_memory(memory);
            if unreadable > 0 {
                tracing::warn!(
                    devices = unreadable,
                    "saved alert rule state of another format; those devices start afresh"
                );
            }
            Vec::new()
        };
        tracing::info!(
            active = active.len(),
            devices = devices.max(last_seen.len()),
            "alert state restored"
        );
        engine.restore(active, last_seen);
        meter::active_alerts(engine.active().count());
        let (commits, queue) = mpsc::unbounded_channel();
        let (changes, _) = broadcast::channel(WATCH_BACKLOG);
        tokio::spawn(committer(
            queue,
            storage,
            notices,
            changes.clone(),
            on_saved,
        ));
        Ok(Arc::new(AlertService {
            engine: Mutex::new(engine),
            seen_through: Mutex::new(None),
            commits,
            changes,
        }))
    }

    fn engine(&self) -> std::sync::MutexGuard<'_, AlertEngine> {
        self.engine.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What changed in the rules' memory since the last save, and the log position it covers.
    fn take_changed(&self) -> Memories {
        let mut engine = self.engine();
        let through = self
            .seen_through
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        (engine.take_changed(), through)
    }

    /// Hands a commit to the committer, in order; false once the committer is gone.
    fn hand_over(&self, commit: Commit) -> bool {
        meter::alert_commits_pending(1.0);
        self.commits.send(commit).is_ok()
    }

    /// Hands the memory to save (and the position it covers) to the committer; `done` is told
    /// once it and everything handed over before it are stored.
    fn save(&self, memory: Memories, done: Option<tokio::sync::oneshot::Sender<()>>) -> bool {
        if memory.0.is_empty() && memory.1.is_none() && done.is_none() {
            return true;
        }
        self.hand_over(Commit {
            memory: Some(memory),
            done,
            ..Commit::of(Vec::new(), false)
        })
    }

    /// Hands transitions to the committer, in the order they happened.
    fn commit(&self, notices: Vec<Notice>) {
        if notices.is_empty() {
            return;
        }
        meter::active_alerts(self.engine().active().count());
        self.hand_over(Commit::of(notices, true));
    }

    /// Like [`commit`](Self::commit), and waits until the transitions are stored.
    async fn commit_and_wait(&self, notices: Vec<Notice>) {
        let (done, stored) = tokio::sync::oneshot::channel();
        let commit = Commit {
            done: Some(done),
            ..Commit::of(notices, true)
        };
        if self.hand_over(commit) {
            let _ = stored.await;
        }
    }

    /// Publishes every active alert again (retained messages do not survive a broker restart).
    pub fn republish_active(&self) {
        let active: Vec<Notice> = self.engine().active().cloned().map(Notice::Alert).collect();
        if !active.is_empty() {
            self.hand_over(Commit::of(active, false));
        }
    }

    /// The active alerts now, newest raised first, and every transition stored from now on, in
    /// order. A transition of an alert in the snapshot may come again; a watcher that lags more
    /// than [`WATCH_BACKLOG`] transitions gets `Lagged` and calls this again.
    pub fn watch(&self) -> (Vec<Alert>, broadcast::Receiver<Alert>) {
        // Subscribed first, so nothing between the snapshot and the first transition is missed.
        let changes = self.changes.subscribe();
        let mut active: Vec<Alert> = self.engine().active().cloned().collect();
        active.sort_by(|a, b| b.raised_at.cmp(&a.raised_at).then(b.id.cmp(&a.id)));
        (active, changes)
    }

    /// Active alerts of one rule, e.g. the devices with repeated sync failures.
    pub fn active_of(&self, rule: &str) -> Vec<Alert> {
        let mut alerts: Vec<Alert> = self
            .engine()
            .active()
            .filter(|a| a.rule == rule)
            .cloned()
            .collect();
        alerts.sort_by(|a, b| a.device.cmp(&b.device));
        alerts
    }

    /// Judges a stored batch; `through` is the log position through which everything is stored
    /// with it, reported on once the memory that judging leaves is saved.
    pub async fn on_batch(&self, batch: &Batch, through: Option<u64>) {
        let notices = {
            let mut engine = self.engine();
            let notices = engine.observe(batch);
            if through.is_some() {
                *self.seen_through.lock().unwrap_or_else(|p| p.into_inner()) = through;
            }
            notices
        };
        self.commit(notices);
    }

    pub async fn connection_lost(&self, device: &DeviceId, at: Millis) {
        let notices = self.engine().connection_lost(device, at);
        self.commit(notices);
    }

    /// The one-second tick: silence, and saving the state of the devices heard from since.
    pub async fn tick(&self, now: Millis) {
        let notices = self.engine().tick(now);
        self.commit(notices);
        self.save(self.take_changed(), None);
    }

    /// Saves what changed since the last tick and waits until everything handed to the
    /// committer is stored: the last step of a clean shutdown, so a restart resumes exactly.
    pub async fn flush(&self) {
        let (done, stored) = tokio::sync::oneshot::channel();
        if self.save(self.take_changed(), Some(done)) {
            let _ = stored.await;
        }
    }

    /// Acknowledges an active alert by id, returning it once stored.
    pub async fn ack(&self, id: &str, by: &str, at: Millis) -> Result<Alert, AckError> {
        let alert = self.engine().ack(id, by, at)?;
        self.commit_and_wait(vec![Notice::Alert(alert.clone())])
            .await;
        Ok(alert)
    }

    /// Acknowledges the active alert of `rule` on `device` (the `alerts/{device}/{rule}/ack` topic).
    pub async fn ack_rule(
        &self,
        device: &DeviceId,
        rule: &str,
        by: &str,
        at: Millis,
    ) -> Result<Alert, AckError> {
        let id = self
            .engine()
            .active_id(device, rule)
            .ok_or_else(|| AckError::NotActive(format!("{device}/{rule}")))?;
        self.ack(&id, by, at).await
    }
}

/// Stores, counts and forwards transitions in order until every [`AlertService`] is gone.
/// Storing is retried a few times; a transition that cannot be stored is still published, and
/// logged. The broker's publisher ends after this task, when `notices` closes.
async fn committer(
    mut queue: mpsc::UnboundedReceiver<Commit>,
    storage: Arc<dyn Storage>,
    notices: mpsc::Sender<Notice>,
    changes: broadcast::Sender<Alert>,
    on_saved: OnStored,
) {
    // Memory a failed save left (one row per device) and the position it covers.
    let mut unsaved: Vec<(DeviceId, Vec<u8>)> = Vec::new();
    let mut unsaved_through: Option<u64> = None;
    while let Some(commit) = queue.recv().await {
        meter::alert_commits_pending(-1.0);
        let alerts: Vec<Alert> = commit
            .notices
            .iter()
            .filter_map(|n| match n {
                Notice::Alert(a) => Some(a.clone()),
                Notice::Presence { .. } => None,
            })
            .collect();
        // A republished alert is already stored; only transitions are written and counted.
        if commit.store {
            store(&*storage, &alerts).await;
            for a in alerts {
                meter::alert_transition(&a);
                // No watcher is no error.
                let _ = changes.send(a);
            }
        }
        if let Some((memory, through)) = commit.memory {
            unsaved = newest_per_device(std::mem::take(&mut unsaved), memory);
            unsaved_through = unsaved_through.max(through);
            if save_memory(&*storage, &mut unsaved).await {
                if let Some(through) = unsaved_through.take() {
                    on_saved(through);
                }
            }
        }
        if let Some(done) = commit.done {
            let _ = done.send(());
        }
        for notice in commit.notices {
            if notices.send(notice).await.is_err() {
                tracing::warn!("alert publisher stopped; notice not published");
            }
        }
    }
}

/// Runs a storage write up to five times while it fails for a retryable reason, with backoff;
/// the last error when it never succeeds.
async fn retried<F, Fut>(mut write: F) -> Result<(), StorageError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), StorageError>>,
{
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
    let mut attempt = 1;
    loop {
        match write().await {
            Err(e) if e.is_retryable() && attempt < 5 => {
                attempt += 1;
                tokio::time::sleep(backoff.next_delay()).await;
            }
            done => return done,
        }
    }
}

/// The rows of `older` a failed save left, with `newer` (one row per device, as `take_changed`
/// makes them) in place of those of the same devices. Without a failed save, `newer` as it is.
fn newest_per_device(
    older: Vec<(DeviceId, Vec<u8>)>,
    newer: Vec<(DeviceId, Vec<u8>)>,
) -> Vec<(DeviceId, Vec<u8>)> {
    if older.is_empty() {
        return newer;
    }
    let mut rows: HashMap<DeviceId, Vec<u8>> = older.into_iter().collect();
    rows.extend(newer);
    rows.into_iter().collect()
}

/// Saves the rules' memory in `unsaved`. True when nothing is left to save: saved, or refused for
/// a reason retrying cannot fix (then those devices start afresh after a restart). While storage
/// is unavailable the rows stay in `unsaved` for the next save and nothing after them is reported
/// saved, so the ingest log keeps what a crash would have to replay.
async fn save_memory(storage: &dyn Storage, unsaved: &mut Vec<(DeviceId, Vec<u8>)>) -> bool {
    if unsaved.is_empty() {
        return true;
    }
    let rows = std::mem::take(unsaved);
    match retried(|| storage.put_alert_states(&rows)).await {
        Ok(()) => true,
        Err(e) if e.is_retryable() => {
            tracing::warn!(error = %e, devices = rows.len(), "cannot save alert rule state now; trying again with the next save, and the ingest log keeps what came since");
            *unsaved = rows;
            false
        }
        Err(e) => {
            tracing::error!(error = %e, devices = rows.len(), "storage refused alert rule state; a restart starts those devices' streaks and windows afresh");
            true
        }
    }
}

async fn store(storage: &dyn Storage, alerts: &[Alert]) {
    if alerts.is_empty() {
        return;
    }
    if let Err(e) = retried(|| storage.put_alerts(alerts)).await {
        tracing::error!(error = %e, alerts = alerts.len(), "could not store alert transitions; check storage");
    }
}
