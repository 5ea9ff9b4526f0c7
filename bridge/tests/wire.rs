//! The device wire contract: what decodes into which rows, and what is rejected with which reason.

use messina_bridge::wire::{decode, route, Decoded, Kind, Limits};
use messina_storage::{AttrValue, DeviceId};
use serde_json::{json, Value};

const NOW: i64 = 1_760_000_000_000;

fn mp(v: Value) -> Vec<u8> {
    rmp_serde::to_vec(&v).unwrap()
}

fn dev() -> DeviceId {
    DeviceId::new("dev-1").unwrap()
}

fn ok(kind: Kind, payload: &[u8]) -> Decoded {
    decode(&dev(), kind, payload, NOW, &Limits::default()).expect("accepted")
}

/// Asserts that a payload is rejected and that the reason contains `expected`.
fn check_rejected(kind: Kind, payload: &[u8], expected: &str) {
    let e = decode(&dev(), kind, payload, NOW, &Limits::default()).expect_err("rejected");
    let reason = e.to_string();
    assert!(
        reason.contains(expected),
        "reason {reason:?} should contain {expected:?}"
    );
}

#[test]
fn topics_route_to_device_and_kind() {
    assert_eq!(
        route("devices/d-1/telemetry").unwrap(),
        (dev_named("d-1"), Kind::Telemetry)
    );
    assert_eq!(
        route("devices/d.2/events").unwrap(),
        (dev_named("d.2"), Kind::Events)
    );
    for (topic, expected) in [
        ("devices/d1/other", "unknown message type `other`"),
        ("devices//telemetry", "device id is empty"),
        ("devices/a b/telemetry", "contains ' '"),
        ("things/d1/telemetry", "is not `devices/{id}/telemetry`"),
        ("devices/d1/telemetry/x", "is not `devices/{id}/telemetry`"),
    ] {
        let e = route(topic).expect_err(topic).to_string();
        assert!(e.contains(expected), "{topic}: {e}");
    }
}

fn dev_named(id: &str) -> DeviceId {
    DeviceId::new(id).unwrap()
}

#[test]
fn a_full_reading_keeps_every_value() {
    let payload = mp(json!({
        "ts": NOW - 1000, "seq": 42, "battery": 87.5, "rssi": -61, "online": true,
        "metrics": {"temp_c": 21.5, "humidity": 40},
        "pressure": 1013, "firmware": "1.2.3", "charging": false, "ignored": null
    }));
    let Decoded::Readings(r) = ok(Kind::Telemetry, &payload) else {
        panic!("readings")
    };
    let r = &r[0];
    assert_eq!((r.ts, r.seq, r.received_at), (NOW - 1000, 42, NOW));
    assert_eq!(
        (r.battery, r.rssi, r.online),
        (Some(87.5), Some(-61), Some(true))
    );
    assert_eq!(r.metrics["temp_c"], 21.5);
    assert_eq!(r.metrics["humidity"], 40.0);
    assert_eq!(
        r.metrics["pressure"], 1013.0,
        "unknown numeric keys become metrics"
    );
    assert_eq!(r.attrs["firmware"], AttrValue::Text("1.2.3".into()));
    assert_eq!(r.attrs["charging"], AttrValue::Bool(false));
    assert!(!r.attrs.contains_key("ignored"));
}

#[test]
fn batch_form_and_timestamp_extension() {
    // MessagePack timestamp 32-bit form: seconds.
    let secs = (NOW / 1000) as u32;
    let mut ts32 = vec![0xd6, 0xff];
    ts32.extend_from_slice(&secs.to_be_bytes());
    // 64-bit form: 250 ms in the nanoseconds field.
    let v = ((250_000_000u64) << 34) | u64::from(secs);
    let mut ts64 = vec![0xd7, 0xff];
    ts64.extend_from_slice(&v.to_be_bytes());
    // Array of two maps, built by hand around the raw extension bytes.
    let mut payload = vec![0x92, 0x81, 0xa2, b't', b's'];
    payload.extend_from_slice(&ts32);
    payload.extend_from_slice(&[0x81, 0xa2, b't', b's']);
    payload.extend_from_slice(&ts64);
    let Decoded::Readings(r) = ok(Kind::Telemetry, &payload) else {
        panic!()
    };
    let times: Vec<i64> = r.iter().map(|r| r.ts).collect();
    assert_eq!(times, vec![NOW, NOW + 250]);
}

#[test]
fn events_keep_attributes() {
    let payload = mp(json!({
        "ts": NOW, "kind": "sync", "files_synced": 12, "errors": 0, "speed_mbps": 4.5,
        "attrs": {"share": "photos", "errors": 1}
    }));
    let Decoded::Event(e) = ok(Kind::Events, &payload) else {
        panic!("event")
    };
    assert_eq!(e.kind, "sync");
    assert_eq!(e.attrs["files_synced"], AttrValue::Int(12));
    assert_eq!(
        e.attrs["errors"],
        AttrValue::Int(1),
        "explicit attrs win over top-level keys"
    );
    assert_eq!(e.attrs["speed_mbps"], AttrValue::Float(4.5));
    assert_eq!(e.attrs["share"], AttrValue::Text("photos".into()));
}

#[test]
fn bad_payloads_are_rejected_naming_the_problem() {
    use Kind::{Events as E, Telemetry as T};
    let cases: Vec<(Kind, Vec<u8>, &str)> = vec![
        (T, vec![], "empty payload"),
        (T, vec![0xcd, 0x01], "not valid MessagePack"),
        (T, vec![0xc1], "must be a map"),
        (T, vec![0x81, 0xa2], "not valid MessagePack"),
        (
            T,
            [mp(json!({"ts": NOW})), vec![0x01]].concat(),
            "trailing byte",
        ),
        (T, mp(json!("hello")), "must be a map"),
        (T, mp(json!({"battery": 50})), "field `ts`: missing"),
        (
            T,
            mp(json!({"ts": "yesterday"})),
            "field `ts`: expected milliseconds",
        ),
        (T, mp(json!({"ts": NOW / 1000})), "not seconds"),
        (
            T,
            mp(json!({"ts": NOW + 2 * 86_400_000})),
            "ahead of the server clock",
        ),
        (
            T,
            mp(json!({"ts": NOW, "seq": -1})),
            "field `seq`: expected a non-negative integer",
        ),
        (
            T,
            mp(json!({"ts": NOW, "battery": 101})),
            "field `battery`: 101 is outside 0 to 100",
        ),
        (
            T,
            mp(json!({"ts": NOW, "battery": "full"})),
            "field `battery`: expected a number, got string",
        ),
        (
            T,
            mp(json!({"ts": NOW, "rssi": 12})),
            "field `rssi`: outside -200 to 0",
        ),
        (
            T,
            mp(json!({"ts": NOW, "rssi": -60.5})),
            "field `rssi`: expected an integer",
        ),
        (
            T,
            mp(json!({"ts": NOW, "online": 1})),
            "field `online`: expected a bool",
        ),
        (
            T,
            mp(json!({"ts": NOW, "metrics": [1, 2]})),
            "field `metrics`: expected a map",
        ),
        (
            T,
            mp(json!({"ts": NOW, "metrics": {"t": "hot"}})),
            "field `metrics.t`: expected a number",
        ),
        (
            T,
            mp(json!({"ts": NOW, "extra": {"nested": 1}})),
            "field `extra`: expected a string, number or bool",
        ),
        (
            T,
            mp(json!([{"ts": NOW}, {"ts": NOW, "battery": -1}])),
            "field `[1].battery`",
        ),
        (T, mp(json!([])), "empty array"),
        (E, mp(json!({"ts": NOW})), "field `kind`: missing"),
        (
            E,
            mp(json!({"ts": NOW, "kind": "a b"})),
            "field `kind`: must be",
        ),
        (
            E,
            mp(json!({"ts": NOW, "kind": "sync", "errors": -2})),
            "field `errors`: a sync event needs a non-negative integer",
        ),
        (
            E,
            mp(json!({"ts": NOW, "kind": "sync", "speed_mbps": "fast"})),
            "field `speed_mbps`",
        ),
        (
            E,
            mp(json!({"ts": NOW, "kind": "b", "attrs": {"x": [1]}})),
            "field `attrs.x`",
        ),
    ];
    for (kind, payload, expected) in cases {
        check_rejected(kind, &payload, expected);
    }
}

#[test]
fn deep_nesting_and_oversized_batches_are_refused() {
    let mut deep = vec![0x91u8; 10_000];
    deep.push(0x01);
    check_rejected(Kind::Telemetry, &deep, "not valid MessagePack");
    let many: Vec<Value> = (0..1001).map(|_| json!({"ts": NOW})).collect();
    check_rejected(
        Kind::Telemetry,
        &mp(json!(many)),
        "1001 readings in one message",
    );
}
