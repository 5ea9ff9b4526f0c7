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
use reqwest::Method;
use serde_json::{json, Value};

const READ_KEY: &str = "analytics-read-key-0001";
const WRITE_KEY: &str = "ingest-write-key-00001";
const ADMIN_KEY: &str = "ops-admin-key-from-a-file";
const LEGACY_KEY: &str = "legacy-single-admin-key";

/// Requests to one server with one set of credentials, from one HTTP client.
#[derive(Clone, Copy)]
struct Caller<'a> {
    client: &'a reqwest::Client,
    server: &'a Server,
    auth: Auth<'a>,
}

/// Requests to `server` with `auth`, from the client that trusts it.
fn caller<'a>(server: &'a Server, auth: Auth<'a>) -> Caller<'a> {
    Caller {
        client: server.client(),
        server,
        auth,
    }
}

impl Caller<'_> {
    async fn get(&self, path: &str) -> Answer {
        self.send(Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: Option<Value>) -> Answer {
        self.send(Method::POST, path, body).await
    }

    /// One request; an error answer must be `application/problem+json`.
    async fn send(&self, method: Method, path: &str, body: Option<Value>) -> Answer {
        let request = format!("{method} {path} with {}", self.auth.describe());
        let mut r = self.client.request(method, self.server.url(path));
        r = match self.auth {
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
                "{request}"
            );
        }
        let text = r.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Answer {
            request,
            status,
            body,
            challenge,
        }
    }
}

/// What a request got, and the request, to name it when a check fails.
struct Answer {
    request: String,
    status: u16,
    /// JSON, or the text when it is not JSON.
    body: Value,
    /// `WWW-Authenticate`.
    challenge: Option<String>,
}

impl Answer {
    /// The body, after checking that the status is `expected`.
    fn expect(self, expected: u16) -> Value {
        self.expect_because(expected, "")
    }

    /// [`Answer::expect`], saying why `expected` is right.
    fn expect_because(self, expected: u16, why: &str) -> Value {
        assert_eq!(
            self.status,
            expected,
            "{}{}{why}: {}",
            self.request,
            if why.is_empty() { "" } else { ": " },
            self.body
        );
        self.body
    }
}

#[derive(Clone, Copy)]
enum Auth<'a> {
    None,
    Key(&'a str),
    Device(&'a str, &'a str),
}

impl Auth<'_> {
    fn describe(&self) -> String {
        match self {
            Auth::None => "no credentials".to_string(),
            Auth::Key(k) => format!("key {k:?}"),
            Auth::Device(id, _) => format!("the secret of device {id:?}"),
        }
    }
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

    // No key, or one the server does not know: 401 with the Bearer challenge.
    for auth in [Auth::None, Auth::Key("not-a-key-of-this-server")] {
        for path in ["/v1/devices", "/metrics", "/v1/admin/devices"] {
            let answer = caller(&server, auth).get(path).await;
            let challenge = answer.challenge.clone();
            answer.expect(401);
            assert_eq!(challenge.as_deref(), Some("Bearer"), "{path}");
        }
    }
    // Probes stay open.
    for path in ["/healthz", "/readyz"] {
        caller(&server, Auth::None).get(path).await.expect(200);
    }

    let (admin, read, write) = (
        caller(&server, Auth::Key(ADMIN_KEY)),
        caller(&server, Auth::Key(READ_KEY)),
        caller(&server, Auth::Key(WRITE_KEY)),
    );
    // The admin key from the file, and the old single key, manage the registry.
    for (key, id) in [(ADMIN_KEY, "http-a"), (LEGACY_KEY, "http-b")] {
        let device = json!({"id": id, "labels": ["http"]});
        caller(&server, Auth::Key(key))
            .post("/v1/admin/devices", Some(device))
            .await
            .expect(201);
    }
    // The read key from the environment reads, and nothing more.
    let body = read
        .get("/v1/registry/devices?label=http")
        .await
        .expect(200);
    assert_eq!(body["items"].as_array().unwrap().len(), 2, "{body}");
    let metrics = read.get("/metrics").await.expect(200);
    assert!(
        metrics
            .as_str()
            .unwrap()
            .contains("messina_http_refused_total"),
        "the refusals above are counted"
    );
    let body = read
        .post("/v1/devices/http-a/telemetry", Some(reading(1)))
        .await
        .expect(403);
    assert!(
        body["detail"].as_str().unwrap().contains("`write`"),
        "{body}"
    );
    // The write key posts for any device, but cannot manage the registry.
    write
        .post("/v1/devices/http-a/telemetry", Some(reading(1)))
        .await
        .expect(202);
    write
        .post("/v1/admin/devices/http-a/revoke", None)
        .await
        .expect(403);

    // A device posts its own data with its own secret, and only its own.
    let added = admin
        .post("/v1/admin/devices/http-a/rotate", None)
        .await
        .expect(200);
    let secret = added["secret"].as_str().unwrap().to_string();
    let device = caller(&server, Auth::Device("http-a", &secret));
    device
        .post("/v1/devices/http-a/telemetry", Some(reading(2)))
        .await
        .expect(202);
    device
        .post("/v1/devices/http-b/telemetry", Some(reading(3)))
        .await
        .expect(403);
    caller(&server, Auth::Device("http-a", "not-its-secret"))
        .post("/v1/devices/http-a/telemetry", Some(reading(4)))
        .await
        .expect(401);
    // What was accepted is stored: readings 1 (write key) and 2 (the device itself).
    wait_for("both readings stored", || async {
        let page = read
            .get("/v1/devices/http-a/telemetry?order=oldest")
            .await
            .body;
        let seqs: Vec<u64> = page["items"]
            .as_array()
            .map(|items| items.iter().filter_map(|r| r["seq"].as_u64()).collect())
            .unwrap_or_default();
        seqs == [1, 2]
    })
    .await;

    // An acknowledgement without a body records the name of the key that made it.
    let low = json!({"ts": now_ms() - 1_000, "battery": 3});
    write
        .post("/v1/devices/http-low/telemetry", Some(low))
        .await
        .expect(202);
    let alerts = || async { read.get("/v1/alerts?device=http-low").await.body };
    wait_for("the low-battery alert", || async {
        alerts().await["items"][0].is_object()
    })
    .await;
    let alert = alerts().await["items"][0].clone();
    let path = format!("/v1/alerts/{}/ack", alert["id"].as_str().unwrap());
    let acked = admin.post(&path, None).await.expect(200);
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
    child.kill().unwrap();
    child.wait().unwrap();
    None
}

/// `messina serve -c config` with its output going to `stdout` and `stderr`.
fn serve(config: &std::path::Path, stdout: Stdio, stderr: Stdio) -> Child {
    Command::new(messina_bin())
        .args(["serve", "-c"])
        .arg(config)
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .unwrap()
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
    let mut child = serve(&config(""), Stdio::null(), Stdio::piped());
    let Some(status) = exit_within(&mut child, Duration::from_secs(60)).await else {
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
    let mut child = serve(
        &config("open = true\n"),
        Stdio::from(log_file.try_clone().unwrap()),
        Stdio::from(log_file),
    );
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
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("WARN") && text.contains("http.open = true"),
        "{text}"
    );
    assert!(stopped.is_some_and(|s| s.success()), "{text}");
}

/// POSTs `path` (a revocation or a rotation) to the admin API for a device connected with
/// `eventloop`: it answers 200 saying it disconnected one session, and that session ends within
/// 5 s with DISCONNECT 0x87 (Not authorized). Returns the answer.
async fn ends_the_session(admin: &Caller<'_>, path: &str, eventloop: &mut v5::EventLoop) -> Value {
    let body = admin.post(path, None).await.expect(200);
    assert_eq!(body["disconnected"], 1, "POST {path}: {body}");
    let ended = ended_v5(eventloop, Duration::from_secs(5)).await;
    assert_eq!(
        disconnect_reason(&ended),
        Some(v5::DisconnectReasonCode::NotAuthorized),
        "after POST {path}: {ended:?}"
    );
    body
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
    let admin = caller(&server, Auth::Key(LEGACY_KEY));
    let devices = json!([{"id": "live-1"}, {"id": "live-2"}]);
    let added = admin
        .post("/v1/admin/devices", Some(devices))
        .await
        .expect(201);
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

    // The live session ends now with 0x87, not at its next reconnect.
    let body = ends_the_session(&admin, "/v1/admin/devices/live-1/revoke", &mut eventloop).await;
    assert_eq!(body["status"], "revoked", "{body}");
    // It cannot come back, over MQTT or HTTP; the other device is untouched.
    assert_eq!(
        connect_device_v5(server.mqtt, "live-1", &s1).await.err(),
        Some(v5::ConnectReturnCode::NotAuthorized)
    );
    caller(&server, Auth::Device("live-1", &s1))
        .post("/v1/devices/live-1/telemetry", Some(reading(2)))
        .await
        .expect(401);
    let alive = tokio::time::timeout(Duration::from_millis(500), bystander_loop.poll()).await;
    assert!(
        alive.is_err() || alive.unwrap().is_ok(),
        "the other device stays connected"
    );

    // Rotation over the admin API: the connection made with the old secret ends now, and the
    // old secret is refused at the next CONNECT; the new one resumes.
    let rotated = ends_the_session(
        &admin,
        "/v1/admin/devices/live-2/rotate",
        &mut bystander_loop,
    )
    .await;
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
    let admin = caller(&server, Auth::Key(LEGACY_KEY));
    admin.get("/v1/devices").await.expect(200);
    caller(&server, Auth::None)
        .get("/v1/devices")
        .await
        .expect(401);
    // Plain HTTP on the HTTPS port gets no HTTP answer.
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{}/healthz", server.http))
        .send()
        .await;
    assert!(
        plain.is_err() || !plain.unwrap().status().is_success(),
        "plain HTTP is not served on the HTTPS listener"
    );

    // Each row: the certificate presented, the device posted for, the status, and why.
    let posts = [
        (
            "dev-h",
            "dev-h",
            202,
            "dev-h posts its own data with its certificate",
        ),
        ("dev-h", "dev-p", 403, "and nobody else's"),
        ("dev-p", "dev-p", 202, "the pinned certificate"),
        (
            "dev-p-other",
            "dev-p",
            401,
            "another certificate for a pinned device",
        ),
        (
            "stranger",
            "stranger",
            401,
            "a certificate naming nobody registered",
        ),
    ];
    let mut body = Value::Null;
    for (seq, (certificate, device, status, why)) in (1..).zip(posts) {
        let client = client_with_certificate(&pki, certificate);
        let by_certificate = Caller {
            client: &client,
            server: &server,
            auth: Auth::None,
        };
        body = by_certificate
            .post(
                &format!("/v1/devices/{device}/telemetry"),
                Some(reading(seq)),
            )
            .await
            .expect_because(status, &format!("{certificate}.pem: {why}"));
    }
    // The stranger, last, is told whom its certificate names.
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
            let page = admin.get(&path).await.body;
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
            caller(server, Auth::Key(key))
                .get("/v1/devices")
                .await
                .status
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
