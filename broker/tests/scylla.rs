//! End to end on the ScyllaDB backend with a real Cassandra node: MQTT publish → bridge → CQL
//! tables → HTTP answers, and the same rows read back with plain CQL as an analyst would.
//! `scripts/cassandra start` starts the node (scripts/test does); `$MESSINA_SCYLLA_NODES` points
//! elsewhere; only `MESSINA_SKIP_SCYLLA_TESTS=1` skips this test.

use std::time::Duration;

use messina_mosquitto_tests::clients::{
    add_device, connect_device_v5, disconnect_reason, ended_v5, messina_devices, v5,
};
use messina_mosquitto_tests::{
    mp, now_ms, publish_v4, publish_v5, scylla_backend_toml, wait_for, wait_rows, Server,
};
use messina_storage::scylla::test_node;
use scylla::client::session::Session;
use scylla::value::CqlTimestamp;
use serde_json::json;

/// Rows of a plain CQL query.
async fn cql<R>(session: &Session, query: &str) -> Vec<R>
where
    R: for<'f, 'm> scylla::deserialize::row::DeserializeRow<'f, 'm>,
{
    session
        .query_unpaged(query, ())
        .await
        .unwrap_or_else(|e| panic!("{query}: {e}"))
        .into_rows_result()
        .unwrap()
        .rows::<R>()
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(messina_skip_scylla, ignore = "MESSINA_SKIP_SCYLLA_TESTS=1")]
async fn mqtt_to_cassandra_to_http_and_plain_cql() {
    let analyst = test_node::analyst().await;
    let ks = test_node::fresh_keyspace("e2e").await;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        &dir.path().join("data"),
        &scylla_backend_toml(&ks, &test_node::nodes()),
    )
    .await;

    // A fixed day well inside the accepted window, so the analyst's queries can name it.
    let t0 = (now_ms() / 86_400_000 - 1) * 86_400_000 + 3_600_000;
    let readings: Vec<(String, Vec<u8>)> = (0..30)
        .map(|i| {
            let payload = json!({"ts": t0 + i * 1000, "seq": i, "battery": 100 - i, "rssi": -50 - i,
                                 "online": i % 2 == 0, "metrics": {"temp_c": 20.0 + i as f64 / 10.0}});
            ("devices/dev-q/telemetry".to_string(), mp(&payload))
        })
        .collect();
    publish_v4(server.mqtt, "dev-q", readings).await;
    publish_v5(
        server.mqtt_v5,
        "dev-r",
        vec![
            (
                "devices/dev-r/telemetry".into(),
                mp(&json!({"ts": t0, "battery": 12.5, "online": true})),
            ),
            (
                "devices/dev-r/events".into(),
                mp(&json!({"ts": t0 + 1, "kind": "sync", "files_synced": 3, "errors": 2})),
            ),
            (
                "devices/dev-r/events".into(),
                mp(&json!({"ts": t0 + 2, "kind": "button", "attrs": {"button_id": 1}})),
            ),
            (
                "devices/dev-r/telemetry".into(),
                mp(&json!({"ts": t0, "battery": 300})),
            ),
        ],
    )
    .await;
    wait_rows(&server, 34.0).await;

    // HTTP answers from Cassandra.
    let latest = server.json("/v1/devices/dev-q").await;
    assert_eq!(
        (latest["seq"].as_u64(), latest["battery"].as_f64()),
        (Some(29), Some(71.0))
    );
    assert_eq!(latest["rssi"], -79);
    assert_eq!(latest["online"], false);
    let mut seqs = Vec::new();
    let mut url = "/v1/devices/dev-q/telemetry?order=oldest&limit=7".to_string();
    loop {
        let page = server.json(&url).await;
        seqs.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["seq"].as_u64().unwrap()),
        );
        match page["next_cursor"].as_str() {
            Some(c) => url = format!("/v1/devices/dev-q/telemetry?order=oldest&limit=7&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(
        seqs,
        (0..30).collect::<Vec<u64>>(),
        "paging over Cassandra returns every row once"
    );
    let sync = server.json("/v1/devices/dev-r/events?kind=sync").await;
    assert_eq!(sync["items"][0]["attrs"]["errors"], 2);
    // The fleet's counts are recounted per shard within a second or two of a write.
    wait_for("the fleet counted", || async {
        let fleet = server.json("/v1/devices").await;
        (fleet["total"].as_u64(), fleet["low_battery"].as_u64()) == (Some(2), Some(1))
    })
    .await;
    let dead = server.json("/v1/dead-letters?device=dev-r").await;
    assert!(dead["items"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("field `battery`"));

    // The analyst's view: plain CQL on the documented schema.
    let day = time::OffsetDateTime::from_unix_timestamp(t0 / 1000)
        .unwrap()
        .date();
    let rows: Vec<(CqlTimestamp, i64, Option<f64>)> = cql(
        &analyst,
        &format!("SELECT ts, seq, battery FROM {ks}.telemetry WHERE device_id = 'dev-q' AND day = '{day}' LIMIT 3"),
    )
    .await;
    assert_eq!(
        rows,
        vec![
            (CqlTimestamp(t0 + 29_000), 29, Some(71.0)),
            (CqlTimestamp(t0 + 28_000), 28, Some(72.0)),
            (CqlTimestamp(t0 + 27_000), 27, Some(73.0)),
        ],
        "newest first within the device-day partition"
    );
    let mut fleet: Vec<(String, Option<f64>, Option<bool>)> = cql(
        &analyst,
        &format!("SELECT device_id, battery, online FROM {ks}.device_latest"),
    )
    .await;
    fleet.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        fleet,
        vec![
            ("dev-q".into(), Some(71.0), Some(false)),
            ("dev-r".into(), Some(12.5), Some(true))
        ]
    );
    let events: Vec<(String, Option<std::collections::BTreeMap<String, String>>)> = cql(
        &analyst,
        &format!("SELECT kind, attrs FROM {ks}.events_by_kind WHERE device_id = 'dev-r' AND kind = 'sync' AND day = '{day}'"),
    )
    .await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].1.as_ref().unwrap()["files_synced"], "3");
    let versions: Vec<(i32,)> = cql(
        &analyst,
        &format!("SELECT version FROM {ks}.schema_version WHERE component = 'messina'"),
    )
    .await;
    assert_eq!(versions, vec![(1,)]);

    drop(server);
    let _ = analyst
        .query_unpaged(format!("DROP KEYSPACE IF EXISTS {ks}"), ())
        .await;
}

/// A device rotated or revoked on the command line, in the ScyllaDB registry a running server
/// shares (as every node of a cluster does), loses its live connections there within
/// `mqtt.registry_poll_secs`; the other devices keep theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(messina_skip_scylla, ignore = "MESSINA_SKIP_SCYLLA_TESTS=1")]
async fn the_command_line_rotates_and_revokes_devices_a_running_server_serves() {
    let analyst = test_node::analyst().await;
    let ks = test_node::fresh_keyspace("registry").await;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_env(
        &dir.path().join("data"),
        &scylla_backend_toml(&ks, &test_node::nodes()),
        &[
            ("MESSINA__MQTT__ANONYMOUS", "deny"),
            ("MESSINA__MQTT__REGISTRY_POLL_SECS", "1"),
        ],
    )
    .await;
    let (port, cli) = (server.mqtt, &server.config);
    let s1 = add_device(cli, "cli-1", &[]);
    let s2 = add_device(cli, "cli-2", &[]);
    let s3 = add_device(cli, "cli-3", &[]);
    let (_c1, mut l1) = connect_device_v5(port, "cli-1", &s1).await.unwrap();
    let (_c2, mut l2) = connect_device_v5(port, "cli-2", &s2).await.unwrap();
    let (_c3, mut l3) = connect_device_v5(port, "cli-3", &s3).await.unwrap();
    let not_authorized = Some(v5::DisconnectReasonCode::NotAuthorized);

    let new1 = messina_devices(cli, &["rotate", "cli-1"])
        .trim()
        .to_string();
    let ended = ended_v5(&mut l1, Duration::from_secs(15)).await;
    assert_eq!(disconnect_reason(&ended), not_authorized, "{ended:?}");
    assert_eq!(
        connect_device_v5(port, "cli-1", &s1).await.err(),
        Some(v5::ConnectReturnCode::BadUserNamePassword)
    );
    let (_c1, mut l1) = connect_device_v5(port, "cli-1", &new1).await.unwrap();

    messina_devices(cli, &["revoke", "cli-2"]);
    let ended = ended_v5(&mut l2, Duration::from_secs(15)).await;
    assert_eq!(disconnect_reason(&ended), not_authorized, "{ended:?}");
    assert_eq!(
        connect_device_v5(port, "cli-2", &s2).await.err(),
        Some(v5::ConnectReturnCode::NotAuthorized)
    );

    // Two more polls: the reconnected device with its new secret and the untouched one stay.
    for l in [&mut l1, &mut l3] {
        let alive = tokio::time::timeout(Duration::from_millis(1500), l.poll()).await;
        assert!(
            alive.is_err() || alive.unwrap().is_ok(),
            "a device whose credential holds stays connected"
        );
    }

    drop(server);
    let _ = analyst
        .query_unpaged(format!("DROP KEYSPACE IF EXISTS {ks}"), ())
        .await;
}
