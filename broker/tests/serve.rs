//! End to end through the real `messina` binary: MQTT 3.1.1 and 5 publishes of MessagePack land in
//! storage and read back over HTTP with exact values, order and paging; bad payloads become dead
//! letters; a clean shutdown keeps every message the bridge received.

use messina_mosquitto_tests::{
    all_pages, messina_bin, mp, now_ms, page_seqs, publish_v4, publish_v5, seqs, wait_for,
    wait_rows, Server,
};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_311_and_5_publishes_read_back_exactly_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), "").await;
    let t0 = now_ms() - 60_000;

    // MQTT 3.1.1: five single readings (out of order) and one batch-form message of two.
    let mut v4: Vec<(String, Vec<u8>)> = [3, 0, 4, 1, 2]
        .iter()
        .map(|&i| {
            let payload = json!({
                "ts": t0 + i * 1000, "seq": i, "battery": 90 - i, "rssi": -60 - i,
                "online": true, "metrics": {"temp_c": 20.5 + i as f64}, "fw": "1.0.0"
            });
            ("devices/dev-a/telemetry".to_string(), mp(&payload))
        })
        .collect();
    v4.push((
        "devices/dev-a/telemetry".into(),
        mp(&json!([{"ts": t0 + 5000, "seq": 5, "battery": 80}, {"ts": t0 + 6000, "seq": 6, "online": false}])),
    ));
    publish_v4(server.mqtt, "dev-a", v4).await;

    // MQTT 5: two readings and two events of another device.
    publish_v5(
        server.mqtt_v5,
        "dev-b",
        vec![
            ("devices/dev-b/telemetry".into(), mp(&json!({"ts": t0, "battery": 15.5, "online": true}))),
            ("devices/dev-b/telemetry".into(), mp(&json!({"ts": t0 + 10, "metrics": {"lux": 300}}))),
            (
                "devices/dev-b/events".into(),
                mp(&json!({"ts": t0 + 20, "kind": "sync", "files_synced": 12, "errors": 0, "speed_mbps": 8.5})),
            ),
            ("devices/dev-b/events".into(), mp(&json!({"ts": t0 + 30, "kind": "button", "attrs": {"button_id": 2}}))),
        ],
    )
    .await;
    wait_rows(&server, 11.0).await;

    // Exact values, newest first by default.
    let page = server.json("/v1/devices/dev-a/telemetry").await;
    let items = page["items"].as_array().unwrap();
    assert_eq!(seqs(items), vec![6, 5, 4, 3, 2, 1, 0]);
    let r3 = &items[3];
    assert_eq!(r3["battery"], 87.0);
    assert_eq!(r3["rssi"], -63);
    assert_eq!(r3["online"], true);
    assert_eq!(r3["metrics"]["temp_c"], 23.5);
    assert_eq!(r3["attrs"]["fw"], "1.0.0");
    assert_eq!(r3["device_id"], "dev-a");
    let ts = time::OffsetDateTime::parse(
        r3["ts"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert_eq!(
        (ts.unix_timestamp_nanos() / 1_000_000) as i64,
        t0 + 3000,
        "RFC 3339 UTC timestamps"
    );
    assert!(r3["ts"].as_str().unwrap().ends_with('Z'));

    // Oldest first, a half-open range, and paging that returns every row exactly once.
    let since = t0 + 1000;
    let until = t0 + 5000;
    let page = server
        .json(&format!(
            "/v1/devices/dev-a/telemetry?order=oldest&since={since}&until={until}"
        ))
        .await;
    assert_eq!(page_seqs(&page), vec![1, 2, 3, 4]);
    for limit in [1, 2, 3, 7] {
        let all = all_pages(&server, "/v1/devices/dev-a/telemetry?order=oldest", limit).await;
        assert_eq!(seqs(&all), (0..7).collect::<Vec<u64>>(), "limit {limit}");
    }

    // Latest state merges fields by device time.
    let a = server.json("/v1/devices/dev-a").await;
    assert_eq!(a["seq"], 6);
    assert_eq!(a["online"], false);
    assert_eq!(a["battery"], 80.0);
    assert_eq!(a["rssi"], -64);
    let b = server.json("/v1/devices/dev-b").await;
    assert_eq!(b["battery"], 15.5);
    assert_eq!(b["metrics"]["lux"], 300.0);

    // Fleet summary: counts maintained as readings arrive; connected is the edge's, apart from
    // the `online` field each device reports (dev-a said false, dev-b true).
    let fleet = server.json("/v1/devices?limit=1").await;
    assert_eq!(fleet["total"], 2);
    assert_eq!(fleet["low_battery"], 1);
    assert_eq!(
        fleet["connected"].as_u64().unwrap() + fleet["not_connected"].as_u64().unwrap(),
        2,
        "{fleet}"
    );
    assert_eq!(fleet["items"][0]["device_id"], "dev-a");
    let cursor = fleet["next_cursor"].as_str().unwrap();
    let fleet = server
        .json(&format!("/v1/devices?limit=1&cursor={cursor}"))
        .await;
    assert_eq!(fleet["items"][0]["device_id"], "dev-b");
    assert!(fleet["next_cursor"].is_null());

    // Events, all and by kind.
    let events = server.json("/v1/devices/dev-b/events").await;
    let kinds: Vec<&str> = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, vec!["button", "sync"]);
    let sync = server.json("/v1/devices/dev-b/events?kind=sync").await;
    let items = sync["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["attrs"]["files_synced"], 12);
    assert_eq!(items[0]["attrs"]["speed_mbps"], 8.5);

    // Unknown device and bad parameters.
    let (status, body) = server.get("/v1/devices/nobody").await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = server.get("/v1/devices/dev-a/telemetry?limit=0").await;
    assert_eq!(status, 400);
    assert_eq!(body["parameter"], "limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_mistyped_and_out_of_range_payloads_become_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), "").await;
    let now = now_ms();
    let messages = vec![
        (
            "devices/dev-c/telemetry".to_string(),
            vec![0x81, 0xa2, b't'],
        ),
        (
            "devices/dev-c/telemetry".to_string(),
            mp(&json!({"ts": now, "battery": "full"})),
        ),
        (
            "devices/dev-c/telemetry".to_string(),
            mp(&json!({"ts": now, "battery": 140})),
        ),
        ("devices/dev-c/events".to_string(), mp(&json!({"ts": now}))),
        (
            "devices/dev-c/telemetry".to_string(),
            mp(&json!({"ts": now, "battery": 40})),
        ),
    ];
    publish_v4(server.mqtt, "dev-c", messages).await;
    wait_rows(&server, 5.0).await;

    let dead = server.json("/v1/dead-letters?device=dev-c").await;
    let items = dead["items"].as_array().unwrap();
    let mut reasons: Vec<&str> = items
        .iter()
        .map(|d| d["reason"].as_str().unwrap())
        .collect();
    reasons.sort();
    assert_eq!(reasons.len(), 4, "{reasons:?}");
    assert!(
        reasons.iter().any(|r| r.contains("not valid MessagePack")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("field `battery`: expected a number, got string")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("field `battery`: 140 is outside 0 to 100")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("field `kind`: missing")),
        "{reasons:?}"
    );
    let malformed = items.iter().find(|d| d["payload_size"] == 3).unwrap();
    assert_eq!(malformed["payload_base64"], "gaJ0", "raw bytes kept");
    assert_eq!(malformed["topic"], "devices/dev-c/telemetry");
    assert_eq!(server.counter("messina_messages_rejected_total").await, 4.0);

    // The good message beside them is stored.
    let page = server.json("/v1/devices/dev-c/telemetry").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    assert_eq!(page["items"][0]["battery"], 40.0);
}

/// A server whose batches neither fill nor time out during a test: only a shutdown drain (or a
/// replay of the ingest log) writes what it received.
async fn start_never_flushing(data: &std::path::Path) -> Server {
    Server::start(
        data,
        "[bridge]\nbatch_max_rows = 100000\nbatch_max_delay_ms = 60000\n",
    )
    .await
}

/// Telemetry messages of `device` for each `seq` in `range`, at `t0 + seq` ms.
fn readings(device: &str, t0: i64, range: std::ops::Range<i64>) -> Vec<(String, Vec<u8>)> {
    range
        .map(|i| {
            (
                format!("devices/{device}/telemetry"),
                mp(&json!({"ts": t0 + i, "seq": i, "battery": 50})),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_shutdown_keeps_every_message_the_bridge_received() {
    let dir = tempfile::tempdir().unwrap();
    // Batches that neither fill nor time out before the shutdown: the last batch is only written
    // by the shutdown drain.
    let mut server = start_never_flushing(&dir.path().join("data")).await;
    let t0 = now_ms() - 10_000;
    publish_v4(server.mqtt, "dev-s", readings("dev-s", t0, 0..200)).await;
    wait_for("200 messages received by the bridge", || async {
        server.counter("messina_messages_received_total").await >= 200.0
    })
    .await;
    assert_eq!(
        server.counter("messina_rows_written_total").await,
        0.0,
        "nothing flushed yet"
    );

    let status = server.terminate().await;
    assert!(
        status.success(),
        "clean exit, got {status}:\n{}",
        server.log_text()
    );
    assert!(server.log_text().contains("stopped cleanly"));

    server.restart().await;
    let all = all_pages(&server, "/v1/devices/dev-s/telemetry?order=oldest", 1000).await;
    assert_eq!(seqs(&all), (0..200).collect::<Vec<u64>>());
}

/// Log text without terminal colours.
fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The segment files of a server's ingest log, oldest first.
fn log_segments(server: &Server) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(server.data.join("log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    files.sort();
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ingest_log_survives_kill_9_and_a_torn_tail_and_stores_each_message_once() {
    let dir = tempfile::tempdir().unwrap();
    // Batches that never fill nor time out: at the kill, every message is in the ingest log and
    // none is in storage.
    let mut server = start_never_flushing(&dir.path().join("data")).await;
    let t0 = now_ms() - 10_000;
    let telemetry = |from: i64, to: i64| readings("dev-k", t0, from..to);
    publish_v4(server.mqtt, "dev-k", telemetry(0, 300)).await;
    // A message that can never be stored, so a dead letter is replayed too.
    publish_v4(
        server.mqtt,
        "dev-k",
        vec![("devices/dev-k/telemetry".into(), b"not msgpack".to_vec())],
    )
    .await;
    wait_for("301 messages in the ingest log", || async {
        server.counter("messina_log_appended_total").await >= 301.0
    })
    .await;
    assert_eq!(server.counter("messina_rows_written_total").await, 0.0);
    server.kill();

    // The restart replays the log; a clean stop then writes what it replayed.
    server.restart().await;
    assert!(
        plain(&server.log_text()).contains("replay_records=301"),
        "{}",
        server.log_text()
    );
    let status = server.terminate().await;
    assert!(status.success(), "{}", server.log_text());

    // A torn last record (a crash in the middle of a write) is cut off at the next start.
    let last = log_segments(&server).pop().expect("a segment");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&last)
        .unwrap();
    std::io::Write::write_all(&mut f, &[0x40, 0, 0, 0, 0xde, 0xad]).unwrap();
    drop(f);
    server.restart().await;
    assert!(
        server.log_text().contains("torn tail in the ingest log"),
        "{}",
        server.log_text()
    );
    let all = all_pages(&server, "/v1/devices/dev-k/telemetry?order=oldest", 1000).await;
    assert_eq!(
        seqs(&all),
        (0..300).collect::<Vec<u64>>(),
        "each message exactly once"
    );
    let dead = server.json("/v1/dead-letters?limit=100").await;
    assert_eq!(
        dead["items"].as_array().unwrap().len(),
        1,
        "the replayed dead letter is not doubled: {dead}"
    );

    // The log goes on after the truncation.
    publish_v4(server.mqtt, "dev-k", telemetry(300, 310)).await;
    let status = server.terminate().await;
    assert!(status.success(), "{}", server.log_text());
    server.restart().await;
    let all = all_pages(&server, "/v1/devices/dev-k/telemetry?order=oldest", 1000).await;
    assert_eq!(all.len(), 310);
}

#[test]
fn bad_config_is_refused_naming_every_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[mqtt]\nlisten = \"nowhere\"\n[bridge]\nbatch_max_rows = 0\nbatch_size = 5\n",
    )
    .unwrap();
    let out = std::process::Command::new(messina_bin())
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for key in [
        "`mqtt.listen`",
        "`bridge.batch_max_rows`",
        "`bridge.batch_size`",
    ] {
        assert!(err.contains(key), "{key} missing from:\n{err}");
    }
}

#[test]
fn print_config_output_is_a_valid_config() {
    let out = std::process::Command::new(messina_bin())
        .arg("print-config")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text, include_str!("../../messina.example.toml"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.toml");
    std::fs::write(&path, text).unwrap();
    let out = std::process::Command::new(messina_bin())
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether a device is connected comes from the edge, on the device and in the fleet summary,
/// and is kept apart from the `online` field the device reports itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_state_comes_from_the_edge_not_from_the_device() {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), "").await;
    // dev-c says it is offline, over a connection that stays open.
    let (client, mut eventloop) =
        AsyncClient::new(MqttOptions::new("dev-c", "127.0.0.1", server.mqtt), 10);
    client
        .publish(
            "devices/dev-c/telemetry",
            QoS::AtLeastOnce,
            false,
            mp(&json!({"ts": now_ms(), "battery": 50, "online": false})),
        )
        .await
        .unwrap();
    let poller = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Disconnect)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    });
    wait_for("dev-c connected and stored", || async {
        let (status, d) = server.get("/v1/devices/dev-c").await;
        status == 200 && d["connection"]["connected"] == true
    })
    .await;
    let d = server.json("/v1/devices/dev-c").await;
    assert_eq!(d["online"], false, "what the device said stays its own");
    assert!(d["connection"]["node"]
        .as_str()
        .unwrap()
        .starts_with("messina-"));
    wait_for("the fleet counts it connected", || async {
        let f = server.json("/v1/devices").await;
        f["connected"] == 1
            && f["not_connected"] == 0
            && f["items"][0]["connection"]["connected"] == true
    })
    .await;

    client.disconnect().await.unwrap();
    let _ = poller.await;
    wait_for("dev-c disconnected", || async {
        let d = server.json("/v1/devices/dev-c").await;
        d["connection"]["connected"] == false && d["connection"]["changed_at"].is_string()
    })
    .await;
    wait_for("the fleet counts it not connected", || async {
        let f = server.json("/v1/devices").await;
        f["connected"] == 0 && f["not_connected"] == 1
    })
    .await;
}

/// `messina simulate`, the one load generator: over each MQTT version, every message it sends
/// is acknowledged and stored, its JSON summary says so, and the probe measures publish to
/// queryable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulator_publishes_what_it_reports_over_both_versions() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), "").await;
    for (protocol, prefix) in [("3.1.1", "sim4"), ("5", "sim5")] {
        let out = std::process::Command::new(messina_bin())
            .args(["simulate", "--broker"])
            .arg(format!("127.0.0.1:{}", server.mqtt))
            .args([
                "--devices",
                "5",
                "--count",
                "100",
                "--rate",
                "0",
                "--duration",
                "3",
            ])
            .args([
                "--protocol",
                protocol,
                "--prefix",
                prefix,
                "--json",
                "--http",
            ])
            .arg(format!("127.0.0.1:{}", server.http))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let summary: serde_json::Value =
            serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        assert_eq!(summary["sent"], 100, "{stdout}");
        assert_eq!(summary["acked"], 100, "{stdout}");
        assert!(summary["e2e_samples"].as_u64().unwrap() >= 1, "{stdout}");
        assert!(stdout.contains("PUBACK latency p50"), "{stdout}");
        for n in 0..5 {
            let (status, _) = server.get(&format!("/v1/devices/{prefix}-{n}")).await;
            assert_eq!(status, 200, "{prefix}-{n} stored");
        }
    }
}
