//! Alerts seen as a fleet manager sees them: a real MQTT subscriber on `alerts/#` watches rules
//! raise and clear from real device traffic, a late subscriber gets the retained active alerts,
//! acknowledgements work over MQTT and HTTP, and offline detection works for a connection killed
//! without DISCONNECT and across a restart of Messina; the HTTP alert stream sends the active
//! alerts, then each transition, and ends at shutdown.

use std::time::Duration;

use messina_mosquitto_tests::{mp, now_ms, publish_v4, Server};
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// A message seen by a subscriber.
#[derive(Debug, Clone)]
struct Seen {
    topic: String,
    body: Value,
    retain: bool,
}

/// Subscribes to `filter`, waits for the SUBACK, and streams what arrives.
async fn subscribe(port: u16, client_id: &str, filter: &str) -> (AsyncClient, Watch) {
    let (client, mut eventloop) =
        AsyncClient::new(MqttOptions::new(client_id, "127.0.0.1", port), 100);
    client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    let (tx, rx) = mpsc::channel(1000);
    // Messages that arrive with the SUBACK (retained ones) are kept, not lost.
    let mut early = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match eventloop.poll().await.expect("subscriber connection") {
                Event::Incoming(Packet::SubAck(_)) => return,
                Event::Incoming(Packet::Publish(p)) => early.push(p),
                _ => {}
            }
        }
    })
    .await
    .expect("SUBACK within 10 s");
    for p in early {
        let body = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
        tx.send(Seen {
            topic: p.topic.clone(),
            body,
            retain: p.retain,
        })
        .await
        .unwrap();
    }
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let body = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                    let seen = Seen {
                        topic: p.topic.clone(),
                        body,
                        retain: p.retain,
                    };
                    if tx.send(seen).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    (
        client,
        Watch {
            rx,
            unmatched: Vec::new(),
        },
    )
}

/// What a subscriber received, in order; `expect` takes matches out and keeps the rest, so the
/// order in which a test looks for messages does not matter.
struct Watch {
    rx: mpsc::Receiver<Seen>,
    unmatched: Vec<Seen>,
}

impl Watch {
    /// Waits (at most 15 s) for a message on `topic` whose `state` (or `online`) is `value`.
    async fn expect(&mut self, topic: &str, state: &str) -> Seen {
        let matches = |s: &Seen| s.topic == topic && s.body["state"] == state;
        if let Some(i) = self.unmatched.iter().position(matches) {
            return self.unmatched.remove(i);
        }
        let rx = &mut self.rx;
        let unmatched = &mut self.unmatched;
        tokio::time::timeout(Duration::from_secs(15), async {
            loop {
                let seen = rx.recv().await.expect("subscriber still connected");
                if matches(&seen) {
                    return seen;
                }
                unmatched.push(seen);
            }
        })
        .await
        .unwrap_or_else(|_| {
            panic!(
                "no `{state}` message on {topic} within 15 s; got {:?}",
                self.unmatched
            )
        })
    }
}

async fn expect(watch: &mut Watch, topic: &str, state: &str) -> Seen {
    watch.expect(topic, state).await
}

async fn post(server: &Server, path: &str, body: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(server.url(path))
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_raise_and_clear_on_mqtt_with_acks_and_retained_state() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), "[alerts]\noffline_after_s = 0\n").await;
    let (_sub, mut alerts) = subscribe(server.mqtt, "fleet-manager", "alerts/#").await;

    let t = now_ms() - 10_000;
    let sync = |i: i64, errors: i64| {
        (
            "devices/dev-x/events".to_string(),
            mp(&json!({"ts": t + i, "kind": "sync", "files_synced": 4, "errors": errors})),
        )
    };
    publish_v4(
        server.mqtt,
        "dev-x",
        vec![
            (
                "devices/dev-x/telemetry".into(),
                mp(&json!({"ts": t, "battery": 9.5})),
            ),
            sync(1, 1),
            sync(2, 3),
            sync(3, 1),
        ],
    )
    .await;
    let battery = expect(&mut alerts, "alerts/dev-x/battery_low", "raised").await;
    assert_eq!(battery.body["value"], 9.5);
    assert_eq!(battery.body["threshold"], 15.0);
    assert_eq!(battery.body["device_id"], "dev-x");
    assert!(battery.body["message"].as_str().unwrap().contains("9.5"));
    let sync_alert = expect(&mut alerts, "alerts/dev-x/sync_failures", "raised").await;
    assert_eq!(sync_alert.body["value"], 3.0);

    // A subscriber that connects later gets the active alerts, retained.
    let (_late, mut late) = subscribe(server.mqtt, "late-manager", "alerts/#").await;
    let retained = expect(&mut late, "alerts/dev-x/battery_low", "raised").await;
    assert!(retained.retain, "active alerts are retained");

    // Acknowledge over MQTT and over HTTP.
    publish_v4(
        server.mqtt,
        "ops-console",
        vec![("alerts/dev-x/battery_low/ack".into(), b"alice".to_vec())],
    )
    .await;
    let acked = expect(&mut alerts, "alerts/dev-x/battery_low", "acknowledged").await;
    assert_eq!(acked.body["acked_by"], "alice");
    let id = sync_alert.body["id"].as_str().unwrap().to_string();
    let (status, body) = post(&server, &format!("/v1/alerts/{id}/ack"), r#"{"by": "bob"}"#).await;
    assert_eq!(
        (status, body["state"].as_str()),
        (200, Some("acknowledged")),
        "{body}"
    );
    expect(&mut alerts, "alerts/dev-x/sync_failures", "acknowledged").await;

    let failing = server.json("/v1/devices/failing").await;
    assert_eq!(failing["items"][0]["device_id"], "dev-x");
    assert_eq!(failing["items"][0]["consecutive_failures"], 3.0);
    let active = server.json("/v1/alerts?state=active").await;
    assert_eq!(active["items"].as_array().unwrap().len(), 2);

    // Conditions end: both clear, and the retained message says so.
    publish_v4(
        server.mqtt,
        "dev-x",
        vec![
            (
                "devices/dev-x/telemetry".into(),
                mp(&json!({"ts": t + 10, "battery": 80})),
            ),
            sync(11, 0),
        ],
    )
    .await;
    let cleared = expect(&mut alerts, "alerts/dev-x/battery_low", "cleared").await;
    assert_eq!(
        cleared.body["id"], battery.body["id"],
        "the same alert, raised to cleared"
    );
    assert_eq!(cleared.body["acked_by"], "alice");
    expect(&mut alerts, "alerts/dev-x/sync_failures", "cleared").await;
    let (_later, mut later) =
        subscribe(server.mqtt, "later-manager", "alerts/dev-x/battery_low").await;
    assert!(
        expect(&mut later, "alerts/dev-x/battery_low", "cleared")
            .await
            .retain
    );

    assert_eq!(
        server.json("/v1/alerts?state=active").await["items"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    assert_eq!(
        server.json("/v1/alerts?state=cleared").await["items"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(server.json("/v1/devices/failing").await["total"], 0);
    let (status, body) = post(&server, &format!("/v1/alerts/{id}/ack"), "").await;
    assert_eq!(
        status, 409,
        "a cleared alert cannot be acknowledged: {body}"
    );
    let (status, _) = post(&server, "/v1/alerts/nope~x~1/ack", "").await;
    assert_eq!(status, 404);
    // A value far from a device's recent behaviour is an anomaly, counted per device and metric.
    let mut readings: Vec<(String, Vec<u8>)> = (0..25)
        .map(|i| {
            let temp = 20.0 + (i % 5) as f64 * 0.1;
            (
                "devices/dev-a/telemetry".to_string(),
                mp(&json!({"ts": t + i, "metrics": {"temp_c": temp}})),
            )
        })
        .collect();
    readings.push((
        "devices/dev-a/telemetry".into(),
        mp(&json!({"ts": t + 30, "metrics": {"temp_c": 48.0}})),
    ));
    publish_v4(server.mqtt, "dev-a", readings).await;
    let anomaly = expect(&mut alerts, "alerts/dev-a/anomaly.temp_c", "raised").await;
    assert_eq!(anomaly.body["value"], 48.0);
    let counts = server.json("/v1/anomalies?device=dev-a").await;
    assert_eq!(counts["items"][0]["count"], 1, "{counts}");
    assert_eq!(counts["items"][0]["by_metric"]["temp_c"], 1);
    let (status, body) = server.get("/v1/anomalies?since=0").await;
    assert_eq!(
        (status, body["parameter"].as_str()),
        (400, Some("since")),
        "a range over 366 days is refused: {body}"
    );

    let (status, body) = server.get("/v1/alerts?state=open").await;
    assert_eq!((status, body["parameter"].as_str()), (400, Some("state")));
    // battery_low, sync_failures and anomaly.temp_c, each once (replays and retained copies
    // are not transitions).
    assert_eq!(server.counter("messina_alerts_raised_total").await, 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_when_a_connection_dies_without_disconnect_and_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut server =
        Server::start(&dir.path().join("data"), "[alerts]\noffline_after_s = 2\n").await;
    let (_sub, mut alerts) = subscribe(server.mqtt, "fleet-manager", "alerts/#").await;
    let (_presence, mut presence) =
        subscribe(server.mqtt, "presence-watch", "devices/+/presence").await;

    // A device with a will on its presence topic, killed without DISCONNECT.
    let mut options = MqttOptions::new("dev-w", "127.0.0.1", server.mqtt);
    options.set_last_will(LastWill::new(
        "devices/dev-w/presence",
        "offline",
        QoS::AtLeastOnce,
        false,
    ));
    let (client, mut eventloop) = AsyncClient::new(options, 10);
    let payload = mp(&json!({"ts": now_ms(), "battery": 70}));
    client
        .publish("devices/dev-w/telemetry", QoS::AtLeastOnce, false, payload)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Event::Incoming(Packet::PubAck(_)) = eventloop.poll().await.unwrap() {
                break;
            }
        }
    })
    .await
    .unwrap();
    let online = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let seen = presence.rx.recv().await.unwrap();
            if seen.topic == "devices/dev-w/presence" && seen.body["online"] == true {
                return seen;
            }
        }
    })
    .await
    .expect("presence online");
    assert_eq!(online.body["source"], "messina");
    drop(client);
    drop(eventloop); // the TCP connection closes without DISCONNECT: the broker sends the will
    let offline = expect(&mut alerts, "alerts/dev-w/offline", "raised").await;
    assert!(
        offline.body["message"]
            .as_str()
            .unwrap()
            .contains("without DISCONNECT"),
        "{}",
        offline.body
    );

    // Another device falls silent; Messina restarts; the silence is still noticed.
    publish_v4(
        server.mqtt,
        "dev-s",
        vec![(
            "devices/dev-s/telemetry".into(),
            mp(&json!({"ts": now_ms(), "battery": 60})),
        )],
    )
    .await;
    let status = server.terminate().await;
    assert!(status.success());
    server.restart().await;
    let (_sub, mut alerts) = subscribe(server.mqtt, "fleet-manager-2", "alerts/#").await;
    let silent = expect(&mut alerts, "alerts/dev-s/offline", "raised").await;
    assert!(
        silent.body["message"].as_str().unwrap().contains("silent"),
        "{}",
        silent.body
    );
    // The offline alert raised before the restart is active and retained again.
    let again = expect(&mut alerts, "alerts/dev-w/offline", "raised").await;
    assert_eq!(again.body["id"], offline.body["id"]);

    // Heard from again: cleared.
    publish_v4(
        server.mqtt,
        "dev-s",
        vec![(
            "devices/dev-s/telemetry".into(),
            mp(&json!({"ts": now_ms(), "battery": 61})),
        )],
    )
    .await;
    expect(&mut alerts, "alerts/dev-s/offline", "cleared").await;
}

/// The rules' memory survives a restart: two failed syncs, a restart, one more failed sync, and
/// the third raises `sync_failures` as if there had been no restart. A clean stop saves the
/// memory; after a SIGKILL right after the syncs are stored, the ingest log replays what the
/// saved memory had not seen yet, because the checkpoint waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_streak_resumes_after_a_restart_and_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(&dir.path().join("data"), "").await;
    let t = now_ms() - 60_000;
    for (device, crash) in [("dev-stop", false), ("dev-crash", true)] {
        let failed_sync = |i: i64| {
            (
                format!("devices/{device}/events"),
                mp(&json!({"ts": t + i, "seq": i, "kind": "sync", "files_synced": 0, "errors": 2})),
            )
        };
        publish_v4(server.mqtt, device, vec![failed_sync(1), failed_sync(2)]).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let events = server.json(&format!("/v1/devices/{device}/events")).await;
            if events["items"].as_array().map_or(0, Vec::len) == 2 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "two syncs not stored");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let none = server
            .json(&format!("/v1/alerts?device={device}&state=all"))
            .await;
        assert_eq!(none["items"].as_array().unwrap().len(), 0, "{none}");
        if crash {
            // Past the 100 ms within which the checkpoint file follows the checkpoint, so the
            // crash finds on disk whatever position the server let the checkpoint reach.
            tokio::time::sleep(Duration::from_millis(300)).await;
            server.kill();
        } else {
            let status = server.terminate().await;
            assert!(status.success(), "{}", server.log_text());
        }

        server.restart().await;
        publish_v4(server.mqtt, device, vec![failed_sync(3)]).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let alerts = server
                .json(&format!("/v1/alerts?device={device}&rule=sync_failures"))
                .await;
            if let Some(a) = alerts["items"].as_array().and_then(|a| a.first()) {
                assert_eq!(a["state"], "raised", "{alerts}");
                assert_eq!(
                    a["value"], 3.0,
                    "the streak counts the syncs before the restart (crash: {crash}): {alerts}"
                );
                assert_eq!(alerts["items"].as_array().unwrap().len(), 1, "{alerts}");
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no sync_failures alert after the third failed sync (crash: {crash}): {alerts}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A server-sent-event stream read with plain HTTP: `(event, data)` as they arrive.
struct EventStream {
    response: reqwest::Response,
    buffer: String,
}

impl EventStream {
    async fn open(server: &Server, path: &str) -> EventStream {
        let response = reqwest::Client::new()
            .get(server.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "GET {path}");
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        EventStream {
            response,
            buffer: String::new(),
        }
    }

    /// The next event (keep-alive comments skipped), or `None` when the stream ended.
    async fn next(&mut self) -> Option<(String, Value)> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let (mut event, mut data) = (String::new(), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if event.is_empty() && data.is_empty() {
                    continue;
                }
                return Some((event, serde_json::from_str(&data).unwrap()));
            }
            let chunk = tokio::time::timeout(Duration::from_secs(15), self.response.chunk())
                .await
                .expect("an event within 15 s")
                .expect("the stream reads");
            self.buffer.push_str(std::str::from_utf8(&chunk?).unwrap());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_alert_stream_sends_the_active_alerts_then_each_transition_and_ends_at_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let mut server =
        Server::start(&dir.path().join("data"), "[alerts]\noffline_after_s = 0\n").await;
    let t = now_ms() - 10_000;
    let battery = |device: &str, ts: i64, value: f64| {
        (
            format!("devices/{device}/telemetry"),
            mp(&json!({"ts": ts, "battery": value})),
        )
    };
    publish_v4(server.mqtt, "dev-a", vec![battery("dev-a", t, 9.5)]).await;
    messina_mosquitto_tests::wait_for("dev-a's alert", || async {
        let active = server.json("/v1/alerts?state=active").await;
        active["items"].as_array().is_some_and(|a| a.len() == 1)
    })
    .await;

    let mut stream = EventStream::open(&server, "/v1/alerts/stream").await;
    let (event, snapshot) = stream.next().await.unwrap();
    assert_eq!(event, "snapshot");
    let items = snapshot["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{snapshot}");
    assert_eq!(
        (items[0]["device_id"].as_str(), items[0]["state"].as_str()),
        (Some("dev-a"), Some("raised"))
    );

    // Raised, acknowledged, cleared: each transition once it is stored, in order.
    publish_v4(server.mqtt, "dev-b", vec![battery("dev-b", t, 7.0)]).await;
    let (event, raised) = stream.next().await.unwrap();
    assert_eq!(event, "alert");
    assert_eq!(
        (
            raised["device_id"].as_str(),
            raised["rule"].as_str(),
            raised["state"].as_str()
        ),
        (Some("dev-b"), Some("battery_low"), Some("raised")),
        "{raised}"
    );
    let id = raised["id"].as_str().unwrap();
    let (status, _) = post(
        &server,
        &format!("/v1/alerts/{id}/ack"),
        r#"{"by": "carol"}"#,
    )
    .await;
    assert_eq!(status, 200);
    let (_, acked) = stream.next().await.unwrap();
    assert_eq!(
        (
            acked["id"].as_str(),
            acked["state"].as_str(),
            acked["acked_by"].as_str()
        ),
        (Some(id), Some("acknowledged"), Some("carol"))
    );
    publish_v4(server.mqtt, "dev-b", vec![battery("dev-b", t + 1, 80.0)]).await;
    let (_, cleared) = stream.next().await.unwrap();
    assert_eq!(
        (cleared["id"].as_str(), cleared["state"].as_str()),
        (Some(id), Some("cleared"))
    );
    let stored = server.json(&format!("/v1/alerts/{id}")).await;
    assert_eq!(stored["state"], "cleared", "stored before it was streamed");

    // The ingest stream counts what was accepted.
    let mut rates = EventStream::open(&server, "/v1/ingest/stream").await;
    let (event, first) = rates.next().await.unwrap();
    assert_eq!(event, "rates");
    assert_eq!(first["received_total"], 3, "{first}");
    assert!(first["stored_total"].as_u64().unwrap() >= 3, "{first}");
    assert!(first["log_lag_bytes"].is_u64(), "{first}");

    // Shutdown ends the streams cleanly (a stream cut by the process exiting fails to read).
    let ended = tokio::spawn(async move {
        while stream.next().await.is_some() {}
        while rates.next().await.is_some() {}
    });
    assert!(server.terminate().await.success());
    tokio::time::timeout(Duration::from_secs(5), ended)
        .await
        .expect("the streams end at shutdown")
        .unwrap();
}
