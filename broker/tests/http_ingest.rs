//! Device data over HTTP against the real binary: JSON and MessagePack bodies, one item or many,
//! RFC 3339 or millisecond timestamps, the MQTT validation with the field named per item, dead
//! letters for invalid items, the refusals (media type, size, device id), idempotence, and a 202
//! that survives kill -9 right after it.

use messina_mosquitto_tests::{all_pages, mp, now_ms, wait_for, Server};
use serde_json::{json, Value};

async fn post(server: &Server, path: &str, content_type: &str, body: Vec<u8>) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(server.url(path))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let problem = r
        .headers()
        .get("content-type")
        .is_some_and(|v| v == "application/problem+json");
    let body: Value = r.json().await.unwrap_or(Value::Null);
    if status >= 400 {
        assert!(problem, "{status} without problem+json: {body}");
    }
    (status, body)
}

fn json_body(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap()
}

async fn readings(server: &Server, device: &str) -> Vec<Value> {
    all_pages(
        server,
        &format!("/v1/devices/{device}/telemetry?order=oldest"),
        1000,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_and_events_over_http_are_validated_durable_and_stored() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_with_env(
        &dir.path().join("data"),
        "",
        &[("MESSINA__HTTP__MAX_BODY_KIB", "4")],
    )
    .await;
    let t0 = now_ms() - 60_000;
    let tel = "/v1/devices/http-a/telemetry";

    // One JSON item with an RFC 3339 timestamp.
    let ts = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(t0) * 1_000_000)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let (status, body) = post(
        &server,
        tel,
        "application/json",
        json_body(&json!({"ts": ts, "seq": 1, "battery": 80, "metrics": {"temp_c": 21.5}})),
    )
    .await;
    assert_eq!((status, body), (202, json!({"accepted": 1})));

    // A MessagePack array of three, millisecond timestamps.
    let items: Vec<Value> = (2..5)
        .map(|i| json!({"ts": t0 + i, "seq": i, "battery": 70}))
        .collect();
    let (status, body) = post(&server, tel, "application/msgpack", mp(&json!(items))).await;
    assert_eq!((status, body), (202, json!({"accepted": 3})));

    // The same item again is stored once (idempotent by device, ts, seq).
    let (status, _) = post(
        &server,
        tel,
        "application/json",
        json_body(&json!({"ts": t0 + 2, "seq": 2, "battery": 70})),
    )
    .await;
    assert_eq!(status, 202);

    // One bad item among good ones: 400 naming it; the others are stored, it is a dead letter.
    let (status, body) = post(
        &server,
        tel,
        "application/json",
        json_body(&json!([
            {"ts": t0 + 10, "seq": 10, "battery": 60},
            {"ts": t0 + 11, "seq": 11, "battery": 150},
            {"ts": "not a time", "seq": 12, "battery": 60},
            {"ts": t0 + 13, "seq": 13, "battery": 60},
        ])),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["accepted"], 2, "{body}");
    let fields: Vec<&str> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["[1].battery", "[2].ts"], "{body}");

    wait_for("the posted readings stored", || async {
        readings(&server, "http-a").await.len() == 6
    })
    .await;
    let seqs: Vec<u64> = readings(&server, "http-a")
        .await
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [1, 2, 3, 4, 10, 13]);
    wait_for("two dead letters", || async {
        server.json("/v1/dead-letters?device=http-a").await["items"]
            .as_array()
            .is_some_and(|a| a.len() == 2)
    })
    .await;

    // Events, JSON.
    let (status, body) = post(
        &server,
        "/v1/devices/http-a/events",
        "application/json",
        json_body(&json!({"ts": t0 + 20, "kind": "button", "press": "long"})),
    )
    .await;
    assert_eq!((status, body), (202, json!({"accepted": 1})));
    wait_for("the posted event stored", || async {
        server.json("/v1/devices/http-a/events").await["items"]
            .as_array()
            .is_some_and(|a| a.len() == 1)
    })
    .await;

    // Refusals, each naming the problem.
    let (status, body) = post(&server, tel, "text/plain", b"battery=5".to_vec()).await;
    assert_eq!(status, 415, "{body}");
    let (status, body) = post(&server, tel, "application/json", b"{\"ts\":".to_vec()).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("not valid"),
        "{body}"
    );
    let (status, body) = post(&server, tel, "application/json", b"[]".to_vec()).await;
    assert_eq!(status, 400, "{body}");
    let big: Vec<Value> = (0..200)
        .map(|i| json!({"ts": t0 + i, "seq": i, "battery": 50}))
        .collect();
    let (status, _) = post(&server, tel, "application/json", json_body(&json!(big))).await;
    assert_eq!(status, 413, "a body over http.max_body_kib");
    let (status, body) = post(
        &server,
        "/v1/devices/bad%20id/telemetry",
        "application/json",
        json_body(&json!({"ts": t0, "battery": 5})),
    )
    .await;
    assert_eq!(status, 400, "{body}");

    // A 202 is a promise: what it acknowledged survives kill -9 right after it.
    let items: Vec<Value> = (100..150)
        .map(|i| json!({"ts": t0 + i, "seq": i, "battery": 40}))
        .collect();
    let (status, _) = post(
        &server,
        "/v1/devices/http-k/telemetry",
        "application/msgpack",
        mp(&json!(items)),
    )
    .await;
    assert_eq!(status, 202);
    server.kill();
    server.restart().await;
    wait_for("the acknowledged readings after kill -9", || async {
        readings(&server, "http-k").await.len() == 50
    })
    .await;
}
