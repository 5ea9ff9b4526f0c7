//! Interop with Debian's Mosquitto clients: `mosquitto_pub` publishes MessagePack that Messina
//! stores, and `mosquitto_sub` receives what another client publishes, over MQTT 3.1.1 and 5.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use messina_mosquitto_tests::{mosquitto, mp, now_ms, wait_for, Server};
use serde_json::json;

/// The path of a Mosquitto client, or a failure that says how to install it.
fn tool(name: &str) -> &str {
    mosquitto::tool(name).unwrap_or_else(|e| panic!("{e}"))
}

/// `mosquitto_pub` to the broker on `port` over `version`, at QoS 1 (it exits 0 only after the
/// PUBACK).
fn mosquitto_pub(port: u16, version: &str) -> Command {
    let mut command = Command::new(tool("mosquitto_pub"));
    command.args(mosquitto::client_args(port, version));
    command
}

const VERSIONS: [(&str, bool); 2] = [("mqttv311", false), ("mqttv5", true)];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_pub_messagepack_is_stored_over_311_and_5() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), "").await;
    let t0 = now_ms() - 1000;
    for (i, (version, _)) in VERSIONS.iter().enumerate() {
        let file = dir.path().join(format!("reading-{i}.msgpack"));
        std::fs::write(
            &file,
            mp(&json!({"ts": t0 + i as i64, "seq": i, "battery": 50 + i})),
        )
        .unwrap();
        // One listener serves both versions: `mqtt.listen` takes -V mqttv311 and -V mqttv5.
        let port = server.mqtt;
        let status = mosquitto_pub(port, version)
            .args([
                "-i",
                &format!("mq-pub-{i}"),
                "-t",
                "devices/mq-1/telemetry",
                "-f",
            ])
            .arg(&file)
            .status()
            .unwrap();
        assert!(
            status.success(),
            "mosquitto_pub -V {version} failed: {status}"
        );
    }
    wait_for("both readings stored", || async {
        server.counter("messina_rows_written_total").await >= 2.0
    })
    .await;
    let page = server.json("/v1/devices/mq-1/telemetry?order=oldest").await;
    let batteries: Vec<f64> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["battery"].as_f64().unwrap())
        .collect();
    assert_eq!(batteries, vec![50.0, 51.0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_sub_receives_what_mosquitto_pub_publishes() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), "").await;
    for (version, v5) in VERSIONS {
        // MQTT 5 through `mqtt.listen_v5`, the alias of the former MQTT 5 port.
        let port = if v5 { server.mqtt_v5 } else { server.mqtt };
        // Line-buffered, so the SUBACK line arrives while mosquitto_sub runs, not at exit.
        let mut sub = Command::new("stdbuf")
            .args(["-oL", tool("mosquitto_sub")])
            .args(mosquitto::client_args(port, version))
            .args(["-t", "fleet/+/note", "-v", "-d", "-C", "1", "-W", "20"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(sub.stdout.take().unwrap()).lines();
        // -d prints the SUBACK; only then is the subscription in place.
        let reader = tokio::task::spawn_blocking(move || {
            let mut seen = Vec::new();
            for line in lines.by_ref() {
                let line = line.unwrap();
                let subscribed = line.contains("SUBACK");
                seen.push(line);
                if subscribed {
                    break;
                }
            }
            (lines, seen)
        });
        let (lines, seen) = tokio::time::timeout(Duration::from_secs(20), reader)
            .await
            .expect("SUBACK within 20 s")
            .unwrap();
        assert!(seen.iter().any(|l| l.contains("SUBACK")), "{seen:?}");
        let status = mosquitto_pub(port, version)
            .args(["-t", "fleet/x1/note", "-m", &format!("hello {version}")])
            .status()
            .unwrap();
        assert!(status.success());
        let got = tokio::task::spawn_blocking(move || {
            lines.map(Result::unwrap).find(|l| l.starts_with("fleet/"))
        })
        .await
        .unwrap();
        assert_eq!(
            got.as_deref(),
            Some(format!("fleet/x1/note hello {version}").as_str())
        );
        assert!(sub.wait().unwrap().success());
    }
}
