//! Black-box test harness: starts the built `messina` binary on free loopback ports with a
//! generated config and its own data directory, and talks to it only over real sockets. Used by the
//! Mosquitto interop suite here and by the broker's end-to-end tests.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod clients;
pub mod load;
pub mod mosquitto;
pub mod pki;
pub mod raw;

/// The `messina` binary under test: `$MESSINA_BIN`, or the one cargo built beside the running test
/// executable (`target/<profile>/messina`).
pub fn messina_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("MESSINA_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("messina"))
        .expect("target directory");
    assert!(
        bin.is_file(),
        "{} not found: build it first with `cargo build -p messina-broker` \
         (`cargo test --workspace` does), or set MESSINA_BIN",
        bin.display()
    );
    bin
}

/// A free TCP port on 127.0.0.1 (bound, then released for the server to take).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

pub struct Server {
    pub child: Option<Child>,
    pub mqtt: u16,
    pub mqtt_v5: u16,
    pub http: u16,
    pub data: PathBuf,
    pub log: PathBuf,
    pub config: PathBuf,
    env: Vec<(String, String)>,
    /// `http` or `https`.
    scheme: &'static str,
    client: reqwest::Client,
}

impl Server {
    /// Starts a server on new ports over `data`, with extra TOML appended to its config.
    pub async fn start(data: &Path, extra_toml: &str) -> Server {
        Server::start_with_env(data, extra_toml, &[]).await
    }

    /// Like [`Server::start`], with `MESSINA__...` environment variables for the process. They set
    /// keys of sections the generated config already opens (`[mqtt]`, `[http]`), which extra TOML
    /// cannot repeat.
    pub async fn start_with_env(data: &Path, extra_toml: &str, env: &[(&str, &str)]) -> Server {
        Server::launch(data, extra_toml, env, None).await
    }

    /// Like [`Server::start_with_env`] for a server whose HTTP side-port serves HTTPS with a
    /// certificate signed by the CA in `ca_pem` (the env sets `MESSINA__HTTP__TLS_*`).
    pub async fn start_https(
        data: &Path,
        extra_toml: &str,
        env: &[(&str, &str)],
        ca_pem: &Path,
    ) -> Server {
        Server::launch(data, extra_toml, env, Some(ca_pem)).await
    }

    async fn launch(
        data: &Path,
        extra_toml: &str,
        env: &[(&str, &str)],
        ca_pem: Option<&Path>,
    ) -> Server {
        let client = match ca_pem {
            None => reqwest::Client::new(),
            Some(ca) => reqwest::Client::builder()
                .add_root_certificate(
                    reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap(),
                )
                .build()
                .unwrap(),
        };
        let (mqtt, mqtt_v5, http) = (free_port(), free_port(), free_port());
        let config = data.with_extension("toml");
        let toml = format!(
            "[mqtt]\nlisten = \"127.0.0.1:{mqtt}\"\nlisten_v5 = \"127.0.0.1:{mqtt_v5}\"\n\
             [http]\nlisten = \"127.0.0.1:{http}\"\n\
             [storage.embedded]\npath = \"{}\"\n{extra_toml}",
            data.display()
        );
        std::fs::write(&config, toml).unwrap();
        let mut server = Server {
            child: None,
            mqtt,
            mqtt_v5,
            http,
            data: data.to_path_buf(),
            log: data.with_extension("log"),
            config,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            scheme: if ca_pem.is_some() { "https" } else { "http" },
            client,
        };
        server.spawn().await;
        server
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(messina_bin())
            .args(["serve", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info,rumqttd=warn,fjall=warn,lsm_tree=warn")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn messina");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "messina exited with {status} while starting:\n{}",
                    self.log_text()
                );
            }
            if let Ok(r) = self.client.get(self.url("/readyz")).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "messina not ready after 30 s:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The HTTP client that trusts this server (its CA, for HTTPS).
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}://127.0.0.1:{}{path}", self.scheme, self.http)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .client
            .get(self.url(path))
            .send()
            .await
            .expect("HTTP request");
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// GETs a path that must answer 200, returning its JSON.
    pub async fn json(&self, path: &str) -> Value {
        let (status, body) = self.get(path).await;
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    /// Sum of a Prometheus counter over all its label sets.
    pub async fn counter(&self, name: &str) -> f64 {
        let text = self
            .client
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Sends SIGTERM and waits (without blocking the runtime) for the process to exit.
    pub async fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let ok = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM failed");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "messina did not stop after SIGTERM:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Resident memory of the running process in MiB (VmRSS), if it runs.
    pub fn rss_mib(&self) -> Option<u64> {
        let pid = self.child.as_ref()?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kib: u64 = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        Some(kib / 1024)
    }

    /// Kills the process with SIGKILL (no shutdown at all) and waits for it.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("SIGKILL");
        child.wait().expect("wait after SIGKILL");
    }

    /// Starts the same configuration again (same ports and data).
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "terminate first");
        self.spawn().await;
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The config that puts a server on the ScyllaDB backend: `keyspace` on `nodes`.
pub fn scylla_backend_toml(keyspace: &str, nodes: &[String]) -> String {
    let nodes: Vec<String> = nodes.iter().map(|n| format!("\"{n}\"")).collect();
    format!(
        "[storage]\nbackend = \"scylla\"\n[storage.scylla]\nnodes = [{}]\nkeyspace = \"{keyspace}\"\n",
        nodes.join(", ")
    )
}

/// Polls `f` until it returns true, failing after 20 s with `what`.
pub async fn wait_for<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// MessagePack of a JSON value, integers kept as integers.
pub fn mp(v: &Value) -> Vec<u8> {
    rmp_serde::to_vec(v).unwrap()
}

/// Publishes each `(topic, payload)` at QoS 1 with `$client`, polls `$eventloop` until every
/// PUBACK arrived (within 20 s), then disconnects. The MQTT 3.1.1 and 5 clients of rumqttc have
/// the same methods on different types, hence a macro: `QoS`, `Event` and `Packet` are the ones
/// the calling function imports.
macro_rules! publish_all_acked {
    ($client:ident, $eventloop:ident, $messages:ident, $connection:literal) => {{
        let n = $messages.len();
        for (topic, payload) in $messages {
            $client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
                .unwrap();
        }
        let mut acked = 0;
        tokio::time::timeout(Duration::from_secs(20), async {
            while acked < n {
                if let Event::Incoming(Packet::PubAck(_)) =
                    $eventloop.poll().await.expect($connection)
                {
                    acked += 1;
                }
            }
        })
        .await
        .expect("all PUBACKs within 20 s");
        $client.disconnect().await.unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(2), $eventloop.poll()).await;
    }};
}

/// Publishes each `(topic, payload)` at QoS 1 over MQTT 3.1.1 and waits for every PUBACK.
pub async fn publish_v4(port: u16, client_id: &str, messages: Vec<(String, Vec<u8>)>) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(options, 1000);
    publish_all_acked!(client, eventloop, messages, "MQTT 3.1.1 connection");
}

/// Publishes each `(topic, payload)` at QoS 1 over MQTT 5 and waits for every PUBACK.
pub async fn publish_v5(port: u16, client_id: &str, messages: Vec<(String, Vec<u8>)>) {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let options = MqttOptions::new(client_id, "127.0.0.1", port);
    let (client, mut eventloop) = AsyncClient::new(options, 1000);
    publish_all_acked!(client, eventloop, messages, "MQTT 5 connection");
}

/// The `seq` of every row in `rows` (a page's `items`, or all of a listing's pages).
pub fn seqs(rows: &[Value]) -> Vec<u64> {
    rows.iter()
        .map(|r| r["seq"].as_u64().expect("a row with a `seq`"))
        .collect()
}

/// The `seq` of every row of one page (`{"items": [...]}`).
pub fn page_seqs(page: &Value) -> Vec<u64> {
    seqs(page["items"].as_array().expect("a page with `items`"))
}

pub async fn wait_rows(server: &Server, n: f64) {
    wait_for(&format!("{n} rows written"), || async {
        server.counter("messina_rows_written_total").await >= n
    })
    .await;
}

/// Every item of a paged listing, following `next_cursor` with page size `limit`.
pub async fn all_pages(server: &Server, path: &str, limit: usize) -> Vec<Value> {
    let mut items = Vec::new();
    let sep = if path.contains('?') { '&' } else { '?' };
    let mut url = format!("{path}{sep}limit={limit}");
    loop {
        let page = server.json(&url).await;
        let got = page["items"].as_array().unwrap();
        assert!(got.len() <= limit);
        items.extend(got.iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => url = format!("{path}{sep}limit={limit}&cursor={c}"),
            None => return items,
        }
    }
}
