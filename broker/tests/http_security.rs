//! The HTTP side-port's security against the real binary: API keys from a file, the
//! environment and the old single-key setting, each with its role, on every route class;
//! devices posting with their own credentials; a network listener without any key refusing to
//! start (and starting, loudly, with `http.open = true`); and the admin API revoking a device
//! that is connected over MQTT, which ends its session at once; HTTPS, with devices
//! authenticating by their client certificates.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use messina_mosquitto_tests::clients::{
    add_device, connect_device_v5, disconnect_reason, embedded_cli_config, ended_v5,
    messina_devices, v5,
};
use messina_mosquitto_tests::pki::{fingerprint, issue, CLIENT_EXT, SERVER_EXT};
use messina_mosquitto_tests::{free_port, messina_bin, now_ms, wait_for, Server};
use serde_json::{json, Value};

const READ_KEY: &str = "analytics-read-key-0001";
const WRITE_KEY: &str = "ingest-write-key-00001";
const ADMIN_KEY: &str = "ops-admin-key-from-a-file";
const LEGACY_KEY: &str = "legacy-single-admin-key";

/// One request with optional credentials: (status, JSON body or text, `WWW-Authenticate`).
async fn call(
    server: &Server,
    method: reqwest::Method,
    path: &str,
    auth: Auth<'_>,
    body: Option<Value>,
) -> (u16, Value, Option<String>) {
    call_as(server.client(), server, method, path, auth, body).await
}

/// [`call`] with another client (one presenting a client certificate).
async fn call_as(
    client: &reqwest::Client,
    server: &Server,
    method: reqwest::Method,
    path: &str,
    auth: Auth<'_>,
    body: Option<Value>,
) -> (u16, Value, Option<String>) {
    let mut r = client.request(method, server.url(path));
    r = match auth {
        Auth::None => r,
        Auth::Key(k) => r.bearer_auth(k),
        Auth::Device(id, secret) => r.basic_auth(id, Some(secret)),
    };
    if let Some(b) = body {
        r = r.json(&b);
    }
    let r = r.send().await.expect("HTTP request");
    let status = r.status().as_u16();
    let challenge = r
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string());
    if status >= 400 {
        assert_eq!(
            r.headers()["content-type"],
            "application/problem+json",
            "{path}"
        );
    }
    let text = r.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, body, challenge)
}

#[derive(Clone, Copy)]
enum Auth<'a> {
    None,
    Key(&'a str),
    Device(&'a str, &'a str),
}

fn reading(seq: u64) -> Value {
    json!({"ts": now_ms() - 1_000, "seq": seq, "battery": 77})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_from_a_file_the_environment_and_the_old_setting_each_have_their_role() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("admin.key");
    std::fs::write(&key_file, format!("{ADMIN_KEY}\n")).unwrap();
    let keys = format!(
        "[{{key_file=\"{}\",role=\"admin\",name=\"ops\"}},{{key_env=\"ANALYTICS_KEY\",role=\"read\"}},\
         {{key_env=\"INGEST_KEY\",role=\"write\"}}]",
        key_file.display()
    );
    let server = Server::start_with_env(
        &dir.path().join("data"),
        "",
        &[
            ("MESSINA__HTTP__API_KEYS", &keys),
            ("ANALYTICS_KEY", READ_KEY),
            ("INGEST_KEY", WRITE_KEY),
            ("MESSINA__HTTP__API_KEY", LEGACY_KEY),
        ],
    )
    .await;
    use reqwest::Method;

    // No key, or one the server does not know: 401 with the Bearer challenge.
    for auth in [Auth::None, Auth::Key("not-a-key-of-this-server")] {
        for path in ["/v1/devices", "/metrics", "/v1/admin/devices"] {
            let (status, body, challenge) = call(&server, Method::GET, path, auth, None).await;
            assert_eq!(status, 401, "{path}: {body}");
            assert_eq!(challenge.as_deref(), Some("Bearer"), "{path}");
        }
    }
    // Probes stay open.
    for path in ["/healthz", "/readyz"] {
        let (status, _, _) = call(&server, Method::GET, path, Auth::None, None).await;
        assert_eq!(status, 200, "{path}");
    }

    // The admin key from the file, and the old single key, manage the registry.
    for (key, id) in [(ADMIN_KEY, "http-a"), (LEGACY_KEY, "http-b")] {
        let (status, body, _) = call(
            &server,
            Method::POST,
            "/v1/admin/devices",
            Auth::Key(key),
            Some(json!({"id": id, "labels": ["http"]})),
        )
        .await;
        assert_eq!(status, 201, "{body}");
    }
    // The read key from the environment reads, and nothing more.
    let (status, body, _) = call(
        &server,
        Method::GET,
        "/v1/registry/devices?label=http",
        Auth::Key(READ_KEY),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["items"].as_array().unwrap().len(), 2, "{body}");
    let (status, metrics, _) =
        call(&server, Method::GET, "/metrics", Auth::Key(READ_KEY), None).await;
    assert_eq!(status, 200);
    assert!(
        metrics
            .as_str()
            .unwrap()
            .contains("messina_http_refused_total"),
        "the refusals above are counted"
    );
    let (status, body, _) = call(
        &server,
        Method::POST,
        "/v1/devices/http-a/telemetry",
        Auth::Key(READ_KEY),
        Some(reading(1)),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("`write`"),
        "{body}"
    );
    // The write key posts for any device, but cannot manage the registry.
    let (status, body, _) = call(
        &server,
        Method::POST,
        "/v1/devices/http-a/telemetry",
        Auth::Key(WRITE_KEY),
        Some(reading(1)),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let (status, _, _) = call(
        &server,
        Method::POST,
        "/v1/admin/devices/http-a/revoke",
        Auth::Key(WRITE_KEY),
        None,
    )
    .await;
    assert_eq!(status, 403);

    // A device posts its own data with its own secret, and only its own.
    let (_, added, _) = call(
        &server,
        Method::POST,
        "/v1/admin/devices/http-a/rotate",
        Auth::Key(ADMIN_KEY),
        None,
    )
    .await;
    let secret = added["secret"].as_str().unwrap().to_string();
    let (status, body, _) = call(
        &server,
        Method::POST,
        "/v1/devices/http-a/telemetry",
        Auth::Device("http-a", &secret),
        Some(reading(2)),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let (status, _, _) = call(
        &server,
        Method::POST,
        "/v1/devices/http-b/telemetry",
        Auth::Device("http-a", &secret),
        Some(reading(3)),
    )
    .await;
    assert_eq!(status, 403);
    let (status, _, _) = call(
        &server,
        Method::POST,
        "/v1/devices/http-a/telemetry",
        Auth::Device("http-a", "not-its-secret"),
        Some(reading(4)),
    )
    .await;
    assert_eq!(status, 401);
    // What was accepted is stored: readings 1 (write key) and 2 (the device itself).
    wait_for("both readings stored", || async {
        let (_, page, _) = call(
            &server,
            Method::GET,
            "/v1/devices/http-a/telemetry?order=oldest",
            Auth::Key(READ_KEY),
            None,
        )
        .await;
        let seqs: Vec<u64> = page["items"]
            .as_array()
            .map(|items| items.iter().filter_map(|r| r["seq"].as_u64()).collect())
            .unwrap_or_default();
        seqs == [1, 2]
    })
    .await;

    // An acknowledgement without a body records the name of the key that made it.
    let (status, body, _) = call(
        &server,
        Method::POST,
        "/v1/devices/http-low/telemetry",
        Auth::Key(WRITE_KEY),
        Some(json!({"ts": now_ms() - 1_000, "battery": 3})),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let alerts = || async {
        call(
            &server,
            Method::GET,
            "/v1/alerts?device=http-low",
            Auth::Key(READ_KEY),
            None,
        )
        .await
        .1
    };
    wait_for("the low-battery alert", || async {
        alerts().await["items"][0].is_object()
    })
    .await;
    let alert = alerts().await["items"][0].clone();
    let path = format!("/v1/alerts/{}/ack", alert["id"].as_str().unwrap());
    let (status, acked, _) = call(&server, Method::POST, &path, Auth::Key(ADMIN_KEY), None).await;
    assert_eq!(status, 200, "{acked}");
    assert_eq!(acked["acked_by"], "ops", "{acked}");
}

/// Waits for `child` to exit, or kills it after `within`; `None` when it was still running.
async fn exit_within(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_listener_without_any_key_refuses_to_start_unless_opened() {
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let config = |extra: &str| {
        let path = dir.path().join("exposed.toml");
        std::fs::write(
            &path,
            format!(
                "[mqtt]\nlisten = \"127.0.0.1:{}\"\nlisten_v5 = \"127.0.0.1:{}\"\n\
                 [http]\nlisten = \"0.0.0.0:{http}\"\n{extra}\
                 [storage.embedded]\npath = \"{}\"\n",
                free_port(),
                free_port(),
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        path
    };
    let mut child = Command::new(messina_bin())
        .args(["serve", "-c"])
        .arg(config(""))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let Some(status) = exit_within(&mut child, Duration::from_secs(60)).await else {
        child.kill().unwrap();
        child.wait().unwrap();
        panic!("messina served HTTP to the network without any API key");
    };
    assert!(!status.success(), "must not start");
    let mut said = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut said).unwrap();
    assert!(
        said.contains("no API key is configured")
            && said.contains("http.api_keys")
            && said.contains("http.open = true"),
        "says how to configure a key or opt in: {said}"
    );

    // Opting in starts, with a warning.
    let log = dir.path().join("open.log");
    let log_file = std::fs::File::create(&log).unwrap();
    let mut child = Command::new(messina_bin())
        .args(["serve", "-c"])
        .arg(config("open = true\n"))
        .stdout(Stdio::from(log_file.try_clone().unwrap()))
        .stderr(Stdio::from(log_file))
        .spawn()
        .unwrap();
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{http}/v1/devices");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "exited with {status}: {}",
                std::fs::read_to_string(&log).unwrap()
            );
        }
        if let Ok(r) = client.get(&url).send().await {
            assert_eq!(r.status(), 200, "open: no key needed");
            break;
        }
        assert!(Instant::now() < deadline, "not serving after 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let stopped = exit_within(&mut child, Duration::from_secs(30)).await;
    if stopped.is_none() {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("WARN") && text.contains("http.open = true"),
        "{text}"
    );
    assert!(stopped.is_some_and(|s| s.success()), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_over_the_admin_api_disconnects_the_device_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_env(
        &dir.path().join("data"),
        "",
        &[
            ("MESSINA__MQTT__ANONYMOUS", "deny"),
            ("MESSINA__HTTP__API_KEY", LEGACY_KEY),
        ],
    )
    .await;
    use reqwest::Method;
    let admin = |method: Method, path: &'static str, body: Option<Value>| {
        call(&server, method, path, Auth::Key(LEGACY_KEY), body)
    };
    let (status, added, _) = admin(
        Method::POST,
        "/v1/admin/devices",
        Some(json!([{"id": "live-1"}, {"id": "live-2"}])),
    )
    .await;
    assert_eq!(status, 201, "{added}");
    let secret = |id: &str| {
        added["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["id"] == id)
            .unwrap()["secret"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (s1, s2) = (secret("live-1"), secret("live-2"));

    // Connected, and publishing: a QoS 1 reading is acknowledged.
    let (client, mut eventloop) = connect_device_v5(server.mqtt, "live-1", &s1).await.unwrap();
    let (_other, mut bystander_loop) = connect_device_v5(server.mqtt, "live-2", &s2).await.unwrap();
    let payload = rmp_serde::to_vec_named(&reading(1)).unwrap();
    client
        .publish(
            "devices/live-1/telemetry",
            v5::QoS::AtLeastOnce,
            false,
            payload,
        )
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let v5::Event::Incoming(v5::Packet::PubAck(_)) = eventloop.poll().await.unwrap() {
                break;
            }
        }
    })
    .await
    .expect("PUBACK");

    let (status, body, _) = admin(Method::POST, "/v1/admin/devices/live-1/revoke", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "revoked");
    assert_eq!(body["disconnected"], 1, "{body}");
    // The live session ends now with 0x87, not at its next reconnect.
    let ended = ended_v5(&mut eventloop, Duration::from_secs(5)).await;
    assert_eq!(
        disconnect_reason(&ended),
        Some(v5::DisconnectReasonCode::NotAuthorized),
        "{ended:?}"
    );
    // It cannot come back, over MQTT or HTTP; the other device is untouched.
    assert_eq!(
        connect_device_v5(server.mqtt, "live-1", &s1).await.err(),
        Some(v5::ConnectReturnCode::NotAuthorized)
    );
    let (status, _, _) = call(
        &server,
        Method::POST,
        "/v1/devices/live-1/telemetry",
        Auth::Device("live-1", &s1),
        Some(reading(2)),
    )
    .await;
    assert_eq!(status, 401);
    let alive = tokio::time::timeout(Duration::from_millis(500), bystander_loop.poll()).await;
    assert!(
        alive.is_err() || alive.unwrap().is_ok(),
        "the other device stays connected"
    );

    // Rotation over the admin API: the connection made with the old secret ends now, and the
    // old secret is refused at the next CONNECT; the new one resumes.
    let (status, rotated, _) = admin(Method::POST, "/v1/admin/devices/live-2/rotate", None).await;
    assert_eq!(status, 200, "{rotated}");
    assert_eq!(rotated["disconnected"], 1, "{rotated}");
    let ended = ended_v5(&mut bystander_loop, Duration::from_secs(5)).await;
    assert_eq!(
        disconnect_reason(&ended),
        Some(v5::DisconnectReasonCode::NotAuthorized),
        "{ended:?}"
    );
    let new_secret = rotated["secret"].as_str().unwrap();
    assert_eq!(
        connect_device_v5(server.mqtt, "live-2", &s2).await.err(),
        Some(v5::ConnectReturnCode::BadUserNamePassword)
    );
    assert!(connect_device_v5(server.mqtt, "live-2", new_secret)
        .await
        .is_ok());
}

/// An HTTPS client trusting the server's CA and presenting `{name}.pem` from `pki`.
fn client_with_certificate(pki: &std::path::Path, name: &str) -> reqwest::Client {
    let mut pem = std::fs::read(pki.join(format!("{name}.pem"))).unwrap();
    pem.extend(std::fs::read(pki.join(format!("{name}.key"))).unwrap());
    reqwest::Client::builder()
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(pki.join("ca.pem")).unwrap()).unwrap(),
        )
        .identity(reqwest::Identity::from_pem(&pem).unwrap())
        .build()
        .unwrap()
}

/// HTTPS on the side-port: API keys work over it and a plain-HTTP client gets no answer; a
/// device presenting a certificate from `http.tls_client_ca_file` posts its own data with it
/// and nobody else's, a pinned device only with its pinned certificate, and a certificate that
/// names nobody registered, or comes from another CA, authenticates nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_api_keys_and_device_certificates() {
    use reqwest::Method;
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    std::fs::create_dir(&pki).unwrap();
    issue(&pki, "ca", "server", "localhost", SERVER_EXT);
    for (name, cn) in [
        ("dev-h", "dev-h"),
        ("dev-p", "dev-p"),
        ("dev-p-other", "dev-p"),
        ("stranger", "stranger"),
    ] {
        issue(&pki, "devices-ca", name, cn, CLIENT_EXT);
    }
    issue(&pki, "rogue-ca", "rogue", "dev-h", CLIENT_EXT);
    let data = dir.path().join("data");
    let cli = embedded_cli_config(&data);
    // dev-h: any certificate for it from the devices CA; dev-p: only the one pinned here.
    add_device(&cli, "dev-h", &[]);
    messina_devices(
        &cli,
        &[
            "add",
            "dev-p",
            "--certificate-sha256",
            &fingerprint(&pki, "dev-p"),
        ],
    );
    let file = |f: &str| pki.join(f).display().to_string();
    let server = Server::start_https(
        &data,
        "",
        &[
            ("MESSINA__HTTP__API_KEY", LEGACY_KEY),
            ("MESSINA__HTTP__TLS_CERT_FILE", &file("server.pem")),
            ("MESSINA__HTTP__TLS_KEY_FILE", &file("server.key")),
            ("MESSINA__HTTP__TLS_CLIENT_CA_FILE", &file("devices-ca.pem")),
        ],
        &pki.join("ca.pem"),
    )
    .await;

    // API keys over HTTPS; nothing without one.
    let (status, body, _) = call(
        &server,
        Method::GET,
        "/v1/devices",
        Auth::Key(LEGACY_KEY),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, _, _) = call(&server, Method::GET, "/v1/devices", Auth::None, None).await;
    assert_eq!(status, 401);
    // Plain HTTP on the HTTPS port gets no HTTP answer.
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{}/healthz", server.http))
        .send()
        .await;
    assert!(
        plain.is_err() || !plain.unwrap().status().is_success(),
        "plain HTTP is not served on the HTTPS listener"
    );

    let post = |name: &str, device: &str, seq: u64| {
        let client = client_with_certificate(&pki, name);
        let path = format!("/v1/devices/{device}/telemetry");
        let server = &server;
        async move {
            call_as(
                &client,
                server,
                Method::POST,
                &path,
                Auth::None,
                Some(reading(seq)),
            )
            .await
        }
    };
    let (status, body, _) = post("dev-h", "dev-h", 1).await;
    assert_eq!(
        status, 202,
        "dev-h posts its own data with its certificate: {body}"
    );
    let (status, body, _) = post("dev-h", "dev-p", 2).await;
    assert_eq!(status, 403, "and nobody else's: {body}");
    let (status, body, _) = post("dev-p", "dev-p", 3).await;
    assert_eq!(status, 202, "the pinned certificate: {body}");
    let (status, body, _) = post("dev-p-other", "dev-p", 4).await;
    assert_eq!(
        status, 401,
        "another certificate for a pinned device: {body}"
    );
    let (status, body, _) = post("stranger", "stranger", 5).await;
    assert_eq!(
        status, 401,
        "a certificate naming nobody registered: {body}"
    );
    assert!(
        body["detail"].as_str().unwrap().contains("stranger"),
        "{body}"
    );
    // A certificate from a CA the server does not trust fails the handshake.
    let rogue = client_with_certificate(&pki, "rogue")
        .post(server.url("/v1/devices/dev-h/telemetry"))
        .json(&reading(6))
        .send()
        .await;
    assert!(
        rogue.is_err(),
        "an untrusted client certificate is refused: {rogue:?}"
    );

    // What was accepted is stored, under the devices that posted it.
    for device in ["dev-h", "dev-p"] {
        let path = format!("/v1/devices/{device}/telemetry");
        wait_for("the posted readings stored", || async {
            let (_, page, _) = call(&server, Method::GET, &path, Auth::Key(LEGACY_KEY), None).await;
            page["items"].as_array().map(Vec::len) == Some(1)
        })
        .await;
    }
}

/// A key file is read again every `http.key_reload_secs`: a second line adds a key beside the
/// old one while callers move, removing the old line retires it, and a file that no longer
/// holds a key is logged while the keys in force stay. No restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_files_are_read_again_so_keys_rotate_without_a_restart() {
    use reqwest::Method;
    const NEW_KEY: &str = "dashboard-key-rotated-0002";
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("dashboard.key");
    std::fs::write(&key_file, format!("{READ_KEY}\n")).unwrap();
    let keys = format!(
        "[{{key_file=\"{}\",role=\"read\",name=\"dashboard\"}}]",
        key_file.display()
    );
    let server = Server::start_with_env(
        &dir.path().join("data"),
        "",
        &[
            ("MESSINA__HTTP__API_KEYS", &keys),
            ("MESSINA__HTTP__KEY_RELOAD_SECS", "1"),
        ],
    )
    .await;
    let status = |key: &'static str| {
        let server = &server;
        async move {
            call(server, Method::GET, "/v1/devices", Auth::Key(key), None)
                .await
                .0
        }
    };
    assert_eq!(status(READ_KEY).await, 200);
    assert_eq!(status(NEW_KEY).await, 401);

    std::fs::write(&key_file, format!("{READ_KEY}\n{NEW_KEY}\n")).unwrap();
    wait_for("the new key in force", || async {
        status(NEW_KEY).await == 200
    })
    .await;
    assert_eq!(
        status(READ_KEY).await,
        200,
        "the old key works while callers move"
    );

    std::fs::write(&key_file, format!("{NEW_KEY}\n")).unwrap();
    wait_for("the old key retired", || async {
        status(READ_KEY).await == 401
    })
    .await;
    assert_eq!(status(NEW_KEY).await, 200);

    // An emptied file is a mistake, not "no keys": the keys in force stay.
    std::fs::write(&key_file, "").unwrap();
    wait_for("the bad file logged", || async {
        server.log_text().contains("do not resolve")
    })
    .await;
    assert_eq!(status(NEW_KEY).await, 200);
    assert_eq!(status(READ_KEY).await, 401);
}
