//! Identity and isolation at the MQTT edge, against the real binary with real clients: devices
//! provisioned with `messina devices`, each refusal with the reason code a client sees and
//! nothing stored, sessions that cannot be taken over without the secret, Mosquitto's clients
//! with a username and password, and a network listener nobody could use refusing to start.

use std::process::{Command, Stdio};
use std::time::Duration;

use messina_mosquitto_tests::clients::{
    add_device, connect_v4, connect_v5, embedded_cli_config, messina_devices, puback, suback, v5,
    v5_options,
};
use messina_mosquitto_tests::pki::{fingerprint, issue, CLIENT_EXT, SERVER_EXT};
use messina_mosquitto_tests::{free_port, messina_bin, mp, now_ms, page_seqs, wait_for, Server};
use serde_json::json;

/// Every test here authenticates: anonymous clients are refused even on loopback.
const DENY_ANONYMOUS: [(&str, &str); 1] = [("MESSINA__MQTT__ANONYMOUS", "deny")];

fn reading(seq: u64) -> Vec<u8> {
    mp(&json!({"ts": now_ms(), "seq": seq, "battery": 50}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_registered_devices_with_their_secret_connect() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cli = embedded_cli_config(&data);
    let secret = add_device(&cli, "dev-a", &["--name", "Kitchen button"]);
    let revoked = add_device(&cli, "dev-r", &[]);
    messina_devices(&cli, &["revoke", "dev-r"]);
    let server = Server::start_with_env(&data, "", &DENY_ANONYMOUS).await;
    let (p4, p5) = (server.mqtt, server.mqtt_v5);

    // The right secret: connected; with an empty client id the device id is assigned.
    let (_c, _e, assigned) = connect_v5(v5_options(p5, "dev-a", Some(("dev-a", &secret))))
        .await
        .expect("dev-a connects");
    assert_eq!(assigned, None);
    let (_c2, _e2, assigned) = connect_v5(v5_options(p5, "", Some(("dev-a", &secret))))
        .await
        .expect("dev-a connects with an empty client id");
    assert_eq!(assigned.as_deref(), Some("dev-a"));
    assert!(connect_v4(p4, "dev-a", Some(("dev-a", &secret)))
        .await
        .is_ok());

    use rumqttc::ConnectReturnCode as V4;
    use v5::ConnectReturnCode as V5;
    // (what, client id, credentials, MQTT 5 code, MQTT 3.1.1 code)
    type Case<'a> = (&'a str, &'a str, Option<(&'a str, &'a str)>, V5, V4);
    let cases: [Case; 6] = [
        (
            "wrong secret",
            "dev-a",
            Some(("dev-a", "not-the-secret")),
            V5::BadUserNamePassword,
            V4::BadUserNamePassword,
        ),
        (
            "no password",
            "dev-a",
            Some(("dev-a", "")),
            V5::BadUserNamePassword,
            V4::BadUserNamePassword,
        ),
        (
            "unknown device",
            "dev-x",
            Some(("dev-x", &secret)),
            V5::NotAuthorized,
            V4::NotAuthorized,
        ),
        (
            "revoked device",
            "dev-r",
            Some(("dev-r", &revoked)),
            V5::NotAuthorized,
            V4::NotAuthorized,
        ),
        (
            "another device's client id",
            "dev-b",
            Some(("dev-a", &secret)),
            V5::ClientIdentifierNotValid,
            V4::BadClientId,
        ),
        (
            "anonymous",
            "dev-a",
            None,
            V5::NotAuthorized,
            V4::NotAuthorized,
        ),
    ];
    for (what, client_id, credentials, code5, code4) in cases {
        let r = connect_v5(v5_options(p5, client_id, credentials)).await;
        assert_eq!(r.err(), Some(code5), "MQTT 5, {what}");
        let r = connect_v4(p4, client_id, credentials).await;
        assert_eq!(r.err(), Some(code4), "MQTT 3.1.1, {what}");
    }
    assert!(server.counter("messina_mqtt_refused_total").await >= 12.0);

    // Rotating gives a new secret; the old one stops working at once (the server is running
    // on the embedded store, so rotation goes through the store once it is stopped).
    let mut server = server;
    server.terminate().await;
    let rotated = messina_devices(&cli, &["rotate", "dev-a"])
        .trim()
        .to_string();
    server.restart().await;
    let r = connect_v5(v5_options(
        server.mqtt_v5,
        "dev-a",
        Some(("dev-a", &secret)),
    ))
    .await;
    assert_eq!(r.err(), Some(V5::BadUserNamePassword), "the old secret");
    assert!(
        connect_v5(v5_options(
            server.mqtt_v5,
            "dev-a",
            Some(("dev-a", &rotated))
        ))
        .await
        .is_ok(),
        "the new secret"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_writes_and_reads_only_its_own_topics() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cli = embedded_cli_config(&data);
    let secret = add_device(&cli, "dev-a", &[]);
    let manager = add_device(&cli, "ops", &["--role", "fleet_manager"]);
    let server = Server::start_with_env(&data, "", &DENY_ANONYMOUS).await;
    let creds = Some(("dev-a", secret.as_str()));

    // MQTT 5: a publish to another device's topic, a retained fake alert and a fake presence
    // get PUBACK 0x87; the device's own reading gets PUBACK 0 and is stored.
    let (client, mut el, _) = connect_v5(v5_options(server.mqtt_v5, "dev-a", creds))
        .await
        .unwrap();
    for (topic, retain) in [
        ("devices/dev-b/telemetry", false),
        ("alerts/dev-q/battery_low", true),
        ("devices/dev-a/presence", true),
        ("devices/dev-a/uploads/response", false),
    ] {
        client
            .publish(topic, v5::QoS::AtLeastOnce, retain, reading(1))
            .await
            .unwrap();
        let reason = puback(&mut el).await.expect("still connected");
        assert_eq!(reason, v5::PubAckReason::NotAuthorized, "{topic}");
    }
    client
        .publish(
            "devices/dev-a/telemetry",
            v5::QoS::AtLeastOnce,
            false,
            reading(2),
        )
        .await
        .unwrap();
    let reason = puback(&mut el).await.unwrap();
    assert_eq!(reason, v5::PubAckReason::Success);

    // Subscriptions: the device's inbox is granted, everything else is 0x87.
    client
        .subscribe_many([
            rumqttc::v5::mqttbytes::v5::Filter::new("#", v5::QoS::AtLeastOnce),
            rumqttc::v5::mqttbytes::v5::Filter::new("devices/+/telemetry", v5::QoS::AtLeastOnce),
            rumqttc::v5::mqttbytes::v5::Filter::new(
                "devices/dev-a/commands/#",
                v5::QoS::AtLeastOnce,
            ),
            rumqttc::v5::mqttbytes::v5::Filter::new("alerts/#", v5::QoS::AtLeastOnce),
        ])
        .await
        .unwrap();
    let codes = suback(&mut el).await.unwrap();
    assert_eq!(
        codes,
        vec![
            v5::SubscribeReasonCode::NotAuthorized,
            v5::SubscribeReasonCode::NotAuthorized,
            v5::SubscribeReasonCode::Success(v5::QoS::AtLeastOnce),
            v5::SubscribeReasonCode::NotAuthorized,
        ]
    );

    // A will on another device's presence is refused at CONNECT.
    let mut o = v5_options(server.mqtt_v5, "dev-a", creds);
    o.set_last_will(v5::LastWill::new(
        "devices/dev-p/presence",
        "offline",
        v5::QoS::AtLeastOnce,
        true,
        None,
    ));
    assert_eq!(
        connect_v5(o).await.err(),
        Some(v5::ConnectReturnCode::NotAuthorized)
    );

    // MQTT 3.1.1 has no refusal code for a publish: the connection is closed, no PUBACK.
    let (c4, mut e4) = connect_v4(server.mqtt, "dev-a", creds).await.unwrap();
    c4.publish(
        "devices/dev-b/telemetry",
        rumqttc::QoS::AtLeastOnce,
        false,
        reading(3),
    )
    .await
    .unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match e4.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => return "PUBACK",
                Ok(_) => {}
                Err(_) => return "closed",
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(outcome, "closed");
    // ... and a refused subscription gets 0x80.
    let (c4, mut e4) = connect_v4(server.mqtt, "dev-a", creds).await.unwrap();
    c4.subscribe("devices/#", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    let codes = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let rumqttc::Event::Incoming(rumqttc::Packet::SubAck(s)) = e4.poll().await.unwrap() {
                return s.return_codes;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(codes, vec![rumqttc::SubscribeReasonCode::Failure]);

    // A fleet manager reads alerts and presence but not telemetry, and publishes only acks.
    let (fm, mut fel, _) = connect_v5(v5_options(
        server.mqtt_v5,
        "ops-console",
        Some(("ops", &manager)),
    ))
    .await
    .unwrap();
    fm.subscribe_many([
        rumqttc::v5::mqttbytes::v5::Filter::new("alerts/#", v5::QoS::AtLeastOnce),
        rumqttc::v5::mqttbytes::v5::Filter::new("devices/+/presence", v5::QoS::AtLeastOnce),
        rumqttc::v5::mqttbytes::v5::Filter::new("devices/+/telemetry", v5::QoS::AtLeastOnce),
    ])
    .await
    .unwrap();
    let codes = suback(&mut fel).await.unwrap();
    assert_eq!(
        codes,
        vec![
            v5::SubscribeReasonCode::Success(v5::QoS::AtLeastOnce),
            v5::SubscribeReasonCode::Success(v5::QoS::AtLeastOnce),
            v5::SubscribeReasonCode::NotAuthorized,
        ]
    );
    fm.publish(
        "devices/dev-a/telemetry",
        v5::QoS::AtLeastOnce,
        false,
        reading(4),
    )
    .await
    .unwrap();
    let reason = puback(&mut fel).await.unwrap();
    assert_eq!(reason, v5::PubAckReason::NotAuthorized);

    // Only dev-a's own reading was stored; dev-b has nothing, no fake alert is retained.
    wait_for("dev-a's reading stored", || async {
        server.counter("messina_rows_written_total").await >= 1.0
    })
    .await;
    let page = server.json("/v1/devices/dev-a/telemetry").await;
    assert_eq!(page_seqs(&page), vec![2]);
    let (status, _) = server.get("/v1/devices/dev-b").await;
    assert_eq!(status, 404, "nothing stored for dev-b");
    assert_eq!(server.counter("messina_dead_letters_total").await, 0.0);
    let refused = server.counter("messina_mqtt_refused_total").await;
    assert!(refused >= 11.0, "every refusal counted: {refused}");
    let log = server.log_text();
    assert!(
        log.contains("refused: not the client's topic") && log.contains("dev-a"),
        "refusals are logged with the device"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_without_the_secret_cannot_take_a_session_over() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cli = embedded_cli_config(&data);
    let secret = add_device(&cli, "dev-a", &[]);
    let server = Server::start_with_env(&data, "", &DENY_ANONYMOUS).await;
    let (client, mut el, _) = connect_v5(v5_options(
        server.mqtt_v5,
        "dev-a",
        Some(("dev-a", &secret)),
    ))
    .await
    .unwrap();
    let r = connect_v5(v5_options(
        server.mqtt_v5,
        "dev-a",
        Some(("dev-a", "guess")),
    ))
    .await;
    assert_eq!(r.err(), Some(v5::ConnectReturnCode::BadUserNamePassword));
    // The device is still connected and its publishes still acknowledged.
    client
        .publish(
            "devices/dev-a/telemetry",
            v5::QoS::AtLeastOnce,
            false,
            reading(1),
        )
        .await
        .unwrap();
    let reason = puback(&mut el)
        .await
        .expect("not disconnected by the failed attempt");
    assert_eq!(reason, v5::PubAckReason::Success);
    // With the secret, a second connection does take over (the normal MQTT behaviour).
    let _second = connect_v5(v5_options(
        server.mqtt_v5,
        "dev-a",
        Some(("dev-a", &secret)),
    ))
    .await
    .unwrap();
    // rumqttc reports a server's DISCONNECT as the error that ends its event loop.
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Err(e) = el.poll().await {
                return e;
            }
        }
    })
    .await
    .expect("the first connection ends");
    assert!(
        matches!(
            ended,
            v5::ConnectionError::MqttState(rumqttc::v5::StateError::ServerDisconnect {
                reason_code: rumqttc::v5::mqttbytes::v5::DisconnectReasonCode::SessionTakenOver,
                ..
            })
        ),
        "{ended:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_clients_authenticate_with_username_and_password() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cli = embedded_cli_config(&data);
    let secret = add_device(&cli, "mq-dev", &[]);
    let server = Server::start_with_env(&data, "", &DENY_ANONYMOUS).await;
    let file = dir.path().join("reading.msgpack");
    std::fs::write(&file, reading(7)).unwrap();
    let publish = |version: &str, password: &str| {
        Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &server.mqtt.to_string(),
                "-V",
                version,
            ])
            .args(["-q", "1", "-i", "mq-dev", "-u", "mq-dev", "-P", password])
            .args(["-t", "devices/mq-dev/telemetry", "-f"])
            .arg(&file)
            .stdin(Stdio::null())
            .output()
            .expect("mosquitto_pub (apt-get install mosquitto-clients; scripts/test does)")
    };
    for version in ["mqttv311", "mqttv5"] {
        let out = publish(version, "wrong");
        assert!(!out.status.success(), "{version}: a wrong password fails");
        let said = String::from_utf8_lossy(&out.stderr).to_lowercase();
        assert!(
            said.contains("bad user name or password") || said.contains("not authori"),
            "{version}: {said}"
        );
        let out = publish(version, &secret);
        assert!(
            out.status.success(),
            "{version}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    wait_for("both readings stored", || async {
        server.counter("messina_rows_written_total").await >= 2.0
    })
    .await;
}

#[test]
fn a_network_listener_that_nobody_could_use_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("exposed.toml");
    let port = free_port();
    std::fs::write(
        &config,
        format!(
            "[mqtt]\nlisten = \"0.0.0.0:{port}\"\nlisten_v5 = \"0.0.0.0:{port}\"\n\
             [http]\nlisten = \"127.0.0.1:{}\"\n[storage.embedded]\npath = \"{}\"\n",
            free_port(),
            data.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(messina_bin())
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("messina started on a network listener nobody could use");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success(), "must not start");
    let mut said = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut said).unwrap();
    assert!(
        said.contains("no device is registered")
            && said.contains("messina devices add")
            && said.contains("mqtt.anonymous = \"allow\""),
        "{said}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_over_tls_with_secrets_and_client_certificates_and_reloading() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    std::fs::create_dir(&pki).unwrap();
    issue(&pki, "ca", "server", "localhost", SERVER_EXT);
    issue(&pki, "devices-ca", "dev-t", "dev-t", CLIENT_EXT);
    issue(&pki, "devices-ca", "dev-u", "dev-u", CLIENT_EXT);
    // The copy the server reads, replaced later to show reloading.
    std::fs::copy(pki.join("server.pem"), pki.join("live.pem")).unwrap();
    std::fs::copy(pki.join("server.key"), pki.join("live.key")).unwrap();

    let data = dir.path().join("data");
    let cli = embedded_cli_config(&data);
    let secret = add_device(&cli, "dev-a", &[]);
    // dev-t: any certificate for it from the devices CA; dev-u: only the one pinned here.
    add_device(&cli, "dev-t", &[]);
    let fingerprint = fingerprint(&pki, "dev-u");
    let out = messina_devices(
        &cli,
        &["add", "dev-u", "--certificate-sha256", &fingerprint],
    );
    assert!(
        out.trim().is_empty(),
        "no secret for a certificate identity: {out:?}"
    );

    let tls_port = free_port();
    let tls_listen = format!("127.0.0.1:{tls_port}");
    let p = |f: &str| pki.join(f).display().to_string();
    let (cert, key, client_ca) = (p("live.pem"), p("live.key"), p("devices-ca.pem"));
    let env = [
        ("MESSINA__MQTT__ANONYMOUS", "deny"),
        ("MESSINA__MQTT__TLS_LISTEN", tls_listen.as_str()),
        ("MESSINA__MQTT__TLS_CERT_FILE", cert.as_str()),
        ("MESSINA__MQTT__TLS_KEY_FILE", key.as_str()),
        ("MESSINA__MQTT__TLS_CLIENT_CA_FILE", client_ca.as_str()),
        ("MESSINA__MQTT__TLS_RELOAD_SECS", "1"),
    ];
    let server = Server::start_with_env(&data, "", &env).await;
    let file = dir.path().join("reading.msgpack");
    let publish = |device: &str, tls: &[&str], creds: &[&str]| {
        std::fs::write(&file, reading(1)).unwrap();
        let out = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &tls_port.to_string(), "-q", "1"])
            .args([
                "-i",
                device,
                "-t",
                &format!("devices/{device}/telemetry"),
                "-f",
            ])
            .arg(&file)
            .args(tls)
            .args(creds)
            .stdin(Stdio::null())
            .output()
            .expect("mosquitto_pub (apt-get install mosquitto-clients; scripts/test does)");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let ca = p("ca.pem");
    let with_ca = ["--cafile", ca.as_str()];

    // A secret over TLS, verified against the server's CA.
    let (ok, said) = publish("dev-a", &with_ca, &["-u", "dev-a", "-P", &secret]);
    assert!(ok, "TLS with a secret: {said}");
    // A plain client on the TLS port gets nowhere.
    let (ok, _) = publish("dev-a", &[], &["-u", "dev-a", "-P", &secret]);
    assert!(!ok, "plain MQTT on the TLS port");
    // Client certificates: dev-t by its CN, dev-u by its pinned certificate; dev-u's
    // certificate does not make its holder dev-t, and a CN that is not registered is refused.
    let (t_cert, t_key, u_cert, u_key) = (
        p("dev-t.pem"),
        p("dev-t.key"),
        p("dev-u.pem"),
        p("dev-u.key"),
    );
    let t = [
        "--cafile",
        ca.as_str(),
        "--cert",
        t_cert.as_str(),
        "--key",
        t_key.as_str(),
    ];
    let u = [
        "--cafile",
        ca.as_str(),
        "--cert",
        u_cert.as_str(),
        "--key",
        u_key.as_str(),
    ];
    let (ok, said) = publish("dev-t", &t, &[]);
    assert!(ok, "dev-t's certificate: {said}");
    let (ok, said) = publish("dev-u", &u, &[]);
    assert!(ok, "dev-u's pinned certificate: {said}");
    let (ok, _) = publish("dev-t", &u, &["-u", "dev-t"]);
    assert!(!ok, "dev-u's certificate claiming dev-t");
    wait_for("three readings stored", || async {
        server.counter("messina_rows_written_total").await >= 3.0
    })
    .await;
    for device in ["dev-a", "dev-t", "dev-u"] {
        let page = server
            .json(&format!("/v1/devices/{device}/telemetry"))
            .await;
        assert_eq!(page["items"].as_array().unwrap().len(), 1, "{device}");
    }

    // A new server certificate from another CA is picked up without a restart.
    issue(&pki, "ca2", "server2", "localhost", SERVER_EXT);
    std::fs::copy(pki.join("server2.key"), pki.join("live.key")).unwrap();
    std::fs::copy(pki.join("server2.pem"), pki.join("live.pem")).unwrap();
    let ca2 = p("ca2.pem");
    let with_ca2 = ["--cafile", ca2.as_str()];
    wait_for("the new certificate served", || async {
        publish("dev-a", &with_ca2, &["-u", "dev-a", "-P", &secret]).0
    })
    .await;
    let (ok, _) = publish("dev-a", &with_ca, &["-u", "dev-a", "-P", &secret]);
    assert!(!ok, "the old CA no longer verifies the server");
    assert!(server.log_text().contains("TLS certificate reloaded"));
}

/// A device within its rate: publishes `n` readings at QoS 1, `every` apart, over MQTT 5;
/// returns how many got a successful PUBACK.
async fn paced_device(port: u16, id: String, n: usize, every: Duration) -> usize {
    let (client, mut el, _) = connect_v5(v5_options(port, &id, None)).await.unwrap();
    let topic = format!("devices/{id}/telemetry");
    let sender = tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        for seq in 0..n {
            tick.tick().await;
            client
                .publish(&topic, v5::QoS::AtLeastOnce, false, reading(seq as u64))
                .await
                .unwrap();
        }
        client
    });
    let mut acked = 0;
    while acked < n {
        match puback(&mut el).await {
            Some(v5::PubAckReason::Success) => acked += 1,
            Some(other) => panic!("{id}: PUBACK {other:?}"),
            None => break,
        }
    }
    drop(sender.await);
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_device_is_limited_while_fifty_others_keep_their_throughput() {
    let dir = tempfile::tempdir().unwrap();
    let rate = 20.0;
    let server = Server::start_with_env(
        &dir.path().join("data"),
        "",
        &[
            ("MESSINA__MQTT__MAX_PUBLISH_RATE", "20"),
            ("MESSINA__MQTT__PUBLISH_BURST", "20"),
        ],
    )
    .await;
    // Fifty devices at half the limit (10/s) for 3 s each.
    let (n, every) = (30, Duration::from_millis(100));
    let started = std::time::Instant::now();
    let devices: Vec<_> = (0..50)
        .map(|i| tokio::spawn(paced_device(server.mqtt_v5, format!("calm-{i}"), n, every)))
        .collect();

    // A 3.1.1 flooder publishing 100x the limit: its socket is paused, so its acknowledged
    // messages follow the rate.
    let (c4, mut e4) = connect_v4(server.mqtt, "flood-4", None).await.unwrap();
    let flood = tokio::spawn(async move {
        let pace = Duration::from_secs_f64(1.0 / (100.0 * rate));
        let mut tick = tokio::time::interval(pace);
        for seq in 0.. {
            tick.tick().await;
            if c4
                .publish(
                    "devices/flood-4/telemetry",
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    reading(seq),
                )
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let window = Duration::from_secs(3);
    let flood_start = std::time::Instant::now();
    let mut flood_acks = 0.0;
    let _ = tokio::time::timeout(window, async {
        loop {
            if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) = e4.poll().await {
                flood_acks += 1.0;
            }
        }
    })
    .await;
    let allowed = 20.0 + rate * flood_start.elapsed().as_secs_f64();
    flood.abort();

    // An MQTT 5 flooder is told why and disconnected, with far fewer messages accepted than
    // it sent.
    let (c5, mut e5, _) = connect_v5(v5_options(server.mqtt_v5, "flood-5", None))
        .await
        .unwrap();
    let flood5 = tokio::spawn(async move {
        for seq in 0..2_000u64 {
            if c5
                .publish(
                    "devices/flood-5/telemetry",
                    v5::QoS::AtLeastOnce,
                    false,
                    reading(seq),
                )
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let mut accepted5 = 0;
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match e5.poll().await {
                Ok(v5::Event::Incoming(v5::Packet::PubAck(_))) => accepted5 += 1,
                Ok(_) => {}
                Err(e) => return e,
            }
        }
    })
    .await
    .expect("the MQTT 5 flooder is disconnected");
    flood5.abort();
    assert!(
        matches!(
            ended,
            v5::ConnectionError::MqttState(rumqttc::v5::StateError::ServerDisconnect {
                reason_code: rumqttc::v5::mqttbytes::v5::DisconnectReasonCode::MessageRateTooHigh,
                ..
            })
        ),
        "{ended:?}"
    );

    let mut calm_acked = 0;
    for d in devices {
        calm_acked += d.await.unwrap();
    }
    let calm_elapsed = started.elapsed().as_secs_f64();
    let calm_nominal = n as f64 * every.as_secs_f64();
    // The calm devices: every message accepted, at the pace they asked for.
    assert_eq!(
        calm_acked,
        50 * n,
        "every calm device's message acknowledged"
    );
    let calm_ratio = calm_nominal / calm_elapsed;
    let flood_ratio = flood_acks / allowed;
    eprintln!(
        "calm throughput ratio {calm_ratio:.2}; 3.1.1 flooder accepted {flood_acks} of {allowed:.0} allowed \
         ({flood_ratio:.2}); MQTT 5 flooder accepted {accepted5} before 0x96"
    );
    assert!(
        calm_ratio > 0.5,
        "calm devices kept their throughput: {calm_ratio:.2}"
    );
    assert!(
        (0.3..=1.2).contains(&flood_ratio),
        "the 3.1.1 flooder follows the rate: {flood_ratio:.2}"
    );
    assert!(
        accepted5 <= 40,
        "the MQTT 5 flooder's burst only: {accepted5}"
    );
    assert!(server.counter("messina_mqtt_refused_total").await >= 1.0);
}
