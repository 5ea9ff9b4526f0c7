//! The alert rules and lifecycle, driven by batches as the bridge stores them.

use std::collections::BTreeMap;

use messina_bridge::alerts::{AckError, AlertEngine, Notice, Rules};
use messina_config::{AlertsConfig, ThresholdRule};
use messina_storage::{Alert, AlertState, AttrValue, Batch, DeviceId, Event, Reading};

const T0: i64 = 1_760_000_000_000;

fn dev(id: &str) -> DeviceId {
    DeviceId::new(id).unwrap()
}

fn engine(f: impl FnOnce(&mut AlertsConfig)) -> AlertEngine {
    let mut c = AlertsConfig::default();
    f(&mut c);
    AlertEngine::new(Rules::from_config(&c))
}

fn reading(device: &str, s: i64, battery: Option<f64>, temp: Option<f64>) -> Reading {
    Reading {
        device: dev(device),
        ts: T0 + s * 1000,
        seq: s as u64,
        received_at: T0 + s * 1000,
        battery,
        rssi: None,
        online: None,
        metrics: temp
            .map(|t| BTreeMap::from([("temp_c".to_string(), t)]))
            .unwrap_or_default(),
        attrs: BTreeMap::new(),
    }
}

fn sync(device: &str, s: i64, errors: i64) -> Event {
    Event {
        device: dev(device),
        ts: T0 + s * 1000,
        seq: s as u64,
        received_at: T0 + s * 1000,
        kind: "sync".into(),
        attrs: BTreeMap::from([("errors".to_string(), AttrValue::Int(errors))]),
    }
}

fn readings(rs: Vec<Reading>) -> Batch {
    Batch {
        readings: rs,
        ..Batch::default()
    }
}

/// The alert transitions among notices, as (rule, state).
fn alerts(notices: &[Notice]) -> Vec<(String, AlertState)> {
    notices
        .iter()
        .filter_map(|n| match n {
            Notice::Alert(a) => Some((a.rule.clone(), a.state)),
            Notice::Presence { .. } => None,
        })
        .collect()
}

fn check(notices: Vec<Notice>, expected: &[(&str, AlertState)]) -> Vec<Notice> {
    let got = alerts(&notices);
    let expected: Vec<(String, AlertState)> =
        expected.iter().map(|(r, s)| (r.to_string(), *s)).collect();
    assert_eq!(got, expected);
    notices
}

use AlertState::{Acknowledged, Cleared, Raised};

#[test]
fn battery_low_has_hysteresis() {
    let mut e = engine(|_| {});
    check(
        e.observe(&readings(vec![reading("d1", 0, Some(20.0), None)])),
        &[],
    );
    let raised = check(
        e.observe(&readings(vec![reading("d1", 1, Some(10.0), None)])),
        &[("battery_low", Raised)],
    );
    check(
        e.observe(&readings(vec![reading("d1", 2, Some(9.0), None)])),
        &[],
    );
    check(
        e.observe(&readings(vec![reading("d1", 3, Some(20.0), None)])),
        &[],
    );
    let cleared = check(
        e.observe(&readings(vec![reading("d1", 4, Some(30.0), None)])),
        &[("battery_low", Cleared)],
    );
    let (Notice::Alert(r), Notice::Alert(c)) = (&raised[0], &cleared[0]) else {
        panic!()
    };
    assert_eq!(r.id, c.id, "one alert from raise to clear");
    assert_eq!((r.value, r.threshold), (Some(10.0), Some(15.0)));
    assert_eq!(c.cleared_at, Some(T0 + 4000));
    let again = check(
        e.observe(&readings(vec![reading("d1", 5, Some(5.0), None)])),
        &[("battery_low", Raised)],
    );
    let Notice::Alert(a) = &again[0] else {
        panic!()
    };
    assert_ne!(a.id, r.id, "a condition that returns is a new alert");
}

#[test]
fn repeated_sync_failures_raise_and_a_success_clears() {
    let mut e = engine(|_| {});
    let batch = |events| Batch {
        events,
        ..Batch::default()
    };
    check(
        e.observe(&batch(vec![sync("d1", 0, 2), sync("d1", 1, 1)])),
        &[],
    );
    let n = check(
        e.observe(&batch(vec![sync("d1", 2, 5)])),
        &[("sync_failures", Raised)],
    );
    let Notice::Alert(a) = &n[0] else { panic!() };
    assert_eq!(a.value, Some(3.0));
    check(e.observe(&batch(vec![sync("d1", 3, 1)])), &[]);
    check(
        e.observe(&batch(vec![sync("d1", 4, 0)])),
        &[("sync_failures", Cleared)],
    );
    check(
        e.observe(&batch(vec![sync("d1", 5, 1), sync("d1", 6, 1)])),
        &[],
    );
}

#[test]
fn thresholds_hold_for_their_duration() {
    let mut e = engine(|c| {
        c.thresholds = vec![ThresholdRule {
            name: "overheat".into(),
            metric: "metrics.temp_c".into(),
            op: ">".into(),
            value: 60.0,
            for_s: 60,
            severity: "critical".into(),
        }];
        c.anomaly_sensitivity = 0.0;
    });
    check(
        e.observe(&readings(vec![reading("d1", 0, None, Some(70.0))])),
        &[],
    );
    check(
        e.observe(&readings(vec![reading("d1", 30, None, Some(71.0))])),
        &[],
    );
    let n = check(
        e.observe(&readings(vec![reading("d1", 61, None, Some(72.0))])),
        &[("overheat", Raised)],
    );
    let Notice::Alert(a) = &n[0] else { panic!() };
    assert_eq!(a.severity, "critical");
    check(
        e.observe(&readings(vec![reading("d1", 62, None, Some(50.0))])),
        &[("overheat", Cleared)],
    );
    // The clock restarts after the condition lapses.
    check(
        e.observe(&readings(vec![reading("d1", 63, None, Some(70.0))])),
        &[],
    );
}

#[test]
fn anomalies_are_far_from_the_recent_mean() {
    let mut e = engine(|c| c.battery_low_percent = 0.0);
    let normal: Vec<Reading> = (0..30)
        .map(|i| reading("d1", i, None, Some(20.0 + (i % 5) as f64 * 0.2)))
        .collect();
    check(e.observe(&readings(normal)), &[]);
    check(
        e.observe(&readings(vec![reading("d1", 31, None, Some(45.0))])),
        &[("anomaly.temp_c", Raised)],
    );
    // The spike did not enter the window, so the next normal value clears it.
    check(
        e.observe(&readings(vec![reading("d1", 32, None, Some(20.4))])),
        &[("anomaly.temp_c", Cleared)],
    );
}

#[test]
fn anomaly_state_per_device_is_bounded_by_the_metric_cap() {
    let mut e = engine(|c| {
        c.battery_low_percent = 0.0;
        c.anomaly_max_metrics_per_device = 3;
    });
    // A device naming 50 metrics per reading: windows for the first three only.
    let wide = |s: i64, spike: f64| {
        let mut r = reading("d1", s, None, None);
        r.metrics = (0..50)
            .map(|m| {
                (
                    format!("m{m:02}"),
                    if m == 49 {
                        spike
                    } else {
                        20.0 + (s % 5) as f64 * 0.2
                    },
                )
            })
            .collect();
        r
    };
    let normal: Vec<Reading> = (0..30)
        .map(|i| wide(i, 20.0 + (i % 5) as f64 * 0.2))
        .collect();
    check(e.observe(&readings(normal)), &[]);
    // m49 is past the cap: a spike on it is not judged (and not remembered).
    check(e.observe(&readings(vec![wide(31, 900.0)])), &[]);
    // m00 is tracked: its spike is an anomaly.
    let mut spike = wide(32, 20.0);
    spike.metrics.insert("m00".into(), 500.0);
    check(
        e.observe(&readings(vec![spike])),
        &[("anomaly.m00", Raised)],
    );
}

#[test]
fn the_rules_memory_is_saved_and_restored_exactly() {
    let mut e = engine(|c| c.battery_low_percent = 0.0);
    let normal: Vec<Reading> = (0..30)
        .map(|i| reading("d1", i, None, Some(20.0 + (i % 5) as f64 * 0.2)))
        .collect();
    e.observe(&readings(normal));
    e.observe(&Batch {
        events: vec![sync("d2", 1, 1), sync("d2", 2, 1)],
        ..Batch::default()
    });
    let saved = e.take_changed();
    assert_eq!(saved.len(), 2);
    assert!(e.take_changed().is_empty(), "nothing changed since");
    // A new engine (a restart) with the saved memory continues the streak and the window.
    let mut after = engine(|c| c.battery_low_percent = 0.0);
    assert_eq!(after.restore_memory(saved), 0);
    check(
        after.observe(&Batch {
            events: vec![sync("d2", 3, 1)],
            ..Batch::default()
        }),
        &[("sync_failures", Raised)],
    );
    check(
        after.observe(&readings(vec![reading("d1", 31, None, Some(45.0))])),
        &[("anomaly.temp_c", Raised)],
    );
    // State of another format is skipped, not misread.
    assert_eq!(after.restore_memory(vec![(dev("d3"), b"{}".to_vec())]), 1);
}

#[test]
fn offline_by_silence_or_will_and_online_when_heard_again() {
    let mut e = engine(|c| c.offline_after_s = 60);
    let first = e.observe(&readings(vec![
        reading("d1", 0, None, None),
        reading("d2", 0, None, None),
    ]));
    assert_eq!(
        first
            .iter()
            .filter(|n| matches!(n, Notice::Presence { online: true, .. }))
            .count(),
        2,
        "first contact publishes presence"
    );
    check(e.tick(T0 + 59_000), &[]);
    let n = check(
        e.tick(T0 + 61_000),
        &[("offline", Raised), ("offline", Raised)],
    );
    assert!(n
        .iter()
        .any(|n| matches!(n, Notice::Presence { online: false, .. })));
    check(e.tick(T0 + 120_000), &[]);
    let back = check(
        e.observe(&readings(vec![reading("d1", 130, None, None)])),
        &[("offline", Cleared)],
    );
    assert!(back.iter().any(
        |n| matches!(n, Notice::Presence { online: true, device, .. } if *device == dev("d1"))
    ));
    check(
        e.connection_lost(&dev("d1"), T0 + 131_000),
        &[("offline", Raised)],
    );
    check(e.connection_lost(&dev("d1"), T0 + 132_000), &[]);
}

#[test]
fn acknowledge_then_clear() {
    let mut e = engine(|_| {});
    let n = e.observe(&readings(vec![reading("d1", 0, Some(5.0), None)]));
    let Notice::Alert(raised) = &n.last().unwrap() else {
        panic!()
    };
    let acked = e.ack(&raised.id, "ops", T0 + 5000).unwrap();
    assert_eq!(
        (acked.state, acked.acked_by.as_deref(), acked.acked_at),
        (Acknowledged, Some("ops"), Some(T0 + 5000))
    );
    let n = check(
        e.observe(&readings(vec![reading("d1", 10, Some(90.0), None)])),
        &[("battery_low", Cleared)],
    );
    let Notice::Alert(cleared) = &n[0] else {
        panic!()
    };
    assert_eq!(
        cleared.acked_by.as_deref(),
        Some("ops"),
        "the acknowledgement stays on the record"
    );
    assert_eq!(
        e.ack(&raised.id, "ops", T0 + 11_000),
        Err(AckError::NotActive(raised.id.clone()))
    );
    // Raised again: the new alert is acknowledged by its own id, not by the old one's.
    let n = e.observe(&readings(vec![reading("d1", 20, Some(5.0), None)]));
    let Notice::Alert(again) = &n.last().unwrap() else {
        panic!()
    };
    assert_ne!(again.id, raised.id);
    assert!(e.ack(&raised.id, "ops", T0 + 21_000).is_err());
    assert!(e.ack("not-an-alert-id", "ops", T0 + 21_000).is_err());
    assert_eq!(
        e.ack(&again.id, "ops", T0 + 21_000).unwrap().state,
        Acknowledged
    );
}

#[test]
fn restored_state_continues_after_a_restart() {
    let mut e = engine(|c| c.offline_after_s = 60);
    let active = Alert {
        id: Alert::id_for(&dev("d1"), "battery_low", T0),
        device: dev("d1"),
        rule: "battery_low".into(),
        state: Raised,
        severity: "warning".into(),
        message: "low".into(),
        value: Some(5.0),
        threshold: Some(15.0),
        raised_at: T0,
        acked_at: None,
        acked_by: None,
        cleared_at: None,
    };
    e.restore(
        vec![active.clone()],
        vec![(dev("d1"), T0), (dev("d2"), T0 + 100_000)],
    );
    check(
        e.observe(&readings(vec![reading("d1", 1, Some(4.0), None)])),
        &[],
    );
    check(e.tick(T0 + 150_000), &[("offline", Raised)]);
    assert_eq!(e.active_id(&dev("d1"), "battery_low"), Some(active.id));
}

#[test]
fn the_offline_rule_judges_each_silence_once_across_a_large_fleet() {
    let mut e = engine(|c| c.offline_after_s = 60);
    let fleet: Vec<Reading> = (0..10_000)
        .map(|i| reading(&format!("d{i}"), 0, None, None))
        .collect();
    e.observe(&readings(fleet));
    // One device is heard again 50 s later (mid-second): it is not silent at 61 s.
    let mut late = reading("d7", 50, None, None);
    late.received_at += 400;
    e.observe(&readings(vec![late]));
    let raised = alerts(&e.tick(T0 + 61_000));
    assert_eq!(raised.len(), 9_999);
    assert!(raised
        .iter()
        .all(|(rule, state)| rule == "offline" && *state == Raised));
    assert!(
        alerts(&e.tick(T0 + 70_000)).is_empty(),
        "each silence is judged once"
    );
    // d7 was last heard at 50.4 s: silent for more than 60 s from 110.4 s on.
    assert!(alerts(&e.tick(T0 + 110_000)).is_empty());
    check(e.tick(T0 + 112_000), &[("offline", Raised)]);
}
