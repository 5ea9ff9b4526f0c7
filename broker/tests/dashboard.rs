//! The dashboard in a real browser: Debian's Chromium, headless, driven over WebDriver
//! (chromedriver), against the real binary fed by `messina simulate` and by a device with a day
//! of history. It signs in with an API key, finds the simulated devices in the fleet table,
//! draws a device's charts with one point per bucket the aggregate endpoint returns, shows a
//! low-battery alert as it is raised (no reload) and acknowledges it from the page. Screenshots
//! of each page are saved under `target/tmp/dashboard/`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use messina_mosquitto_tests::{free_port, messina_bin, mp, now_ms, publish_v4, wait_for, Server};
use serde_json::{json, Value};

const KEY: &str = "dashboard-test-key-0123456789";
const SIMULATED: usize = 4;
/// Readings of the device with history: one every 20 minutes over the last day.
const HISTORY: i64 = 72;
const WAIT: Duration = Duration::from_secs(20);

/// chromedriver on a free port, ended when dropped.
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    fn start() -> Driver {
        let port = free_port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start chromedriver ({e}): install Debian's `chromium` and \
                     `chromium-driver` (scripts/test does)"
                )
            });
        Driver { child, port }
    }

    async fn browser(&self) -> Client {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,900"],
            }),
        );
        let url = format!("http://127.0.0.1:{}", self.port);
        let mut last = None;
        for _ in 0..100 {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(caps.clone())
                .connect(&url)
                .await
            {
                Ok(client) => return client,
                Err(e) => last = Some(e.to_string()),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no browser session from chromedriver: {last:?}");
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn screenshots() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn screenshot(browser: &Client, name: &str) {
    // Charts and streams settle before the picture.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let png = browser.screenshot().await.unwrap();
    let path = screenshots().join(format!("{name}.png"));
    std::fs::write(&path, png).unwrap();
    println!("screenshot: {}", path.display());
}

async fn api(server: &Server, path: &str) -> Value {
    let r = server
        .client()
        .get(server.url(path))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "GET {path}");
    r.json().await.unwrap()
}

/// The number of elements matching `css`.
async fn count(browser: &Client, css: &str) -> usize {
    browser.find_all(Locator::Css(css)).await.unwrap().len()
}

/// Waits until an element matches `css`, failing with the page's error banner, if any.
async fn element(browser: &Client, css: &str) -> fantoccini::elements::Element {
    match browser
        .wait()
        .at_most(WAIT)
        .for_element(Locator::Css(css))
        .await
    {
        Ok(e) => e,
        Err(e) => {
            let banner = match browser.find(Locator::Css("#error")).await {
                Ok(b) => b.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            panic!("no `{css}` on the page within {WAIT:?} ({e}); error banner: {banner:?}");
        }
    }
}

/// Publishes readings of `device`: its last day, one every 20 minutes, battery falling.
async fn history(server: &Server, device: &str) {
    let now = now_ms();
    let messages = (0..HISTORY)
        .map(|i| {
            let ts = now - (HISTORY - i) * 20 * 60_000;
            let reading = json!({
                "ts": ts, "seq": i, "battery": 95.0 - i as f64 * 0.5, "rssi": -60 - i % 15,
                "metrics": {"temp_c": 20.0 + (i % 12) as f64 / 2.0},
            });
            (format!("devices/{device}/telemetry"), mp(&reading))
        })
        .collect();
    publish_v4(server.mqtt, &format!("{device}-history"), messages).await;
}

/// `messina simulate` of `devices` devices named `{prefix}-N` publishing to `server` at `rate`
/// messages a second in all, for `seconds`.
fn simulate(server: &Server, devices: usize, rate: u32, seconds: u32, prefix: &str) -> Command {
    let mut command = Command::new(messina_bin());
    command
        .args([
            "simulate",
            "--broker",
            &format!("127.0.0.1:{}", server.mqtt),
        ])
        .args([
            "--devices",
            &devices.to_string(),
            "--rate",
            &rate.to_string(),
        ])
        .args(["--duration", &seconds.to_string(), "--prefix", prefix])
        .stdout(Stdio::null());
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_fleet_devices_charts_and_live_alerts() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_with_env(
        &dir.path().join("data"),
        "",
        &[("MESSINA__HTTP__API_KEY", KEY)],
    )
    .await;
    history(&server, "garden-1").await;
    let simulated = simulate(&server, SIMULATED, 40, 3, "sim")
        .args(["--event-every", "4"])
        .status()
        .expect("messina simulate");
    assert!(simulated.success(), "messina simulate failed");
    wait_for("every device in the fleet", || async {
        api(&server, "/v1/devices?limit=50").await["total"] == SIMULATED as u64 + 1
    })
    .await;

    let driver = Driver::start();
    let browser = driver.browser().await;
    browser.goto(&server.url("/")).await.unwrap();

    // With API keys configured, the page asks for one.
    element(&browser, "form#login").await;
    screenshot(&browser, "0-login").await;
    element(&browser, "input#api-key")
        .await
        .send_keys(KEY)
        .await
        .unwrap();
    element(&browser, "#login-submit")
        .await
        .click()
        .await
        .unwrap();

    // Fleet: every simulated device has its row; the counts are the API's.
    for n in 0..SIMULATED {
        element(
            &browser,
            &format!("#fleet-table tr[data-device=\"sim-{n}\"]"),
        )
        .await;
    }
    element(&browser, "#fleet-table tr[data-device=\"garden-1\"]").await;
    let total = element(&browser, "#fleet-counts [data-count=\"total\"]")
        .await
        .text()
        .await
        .unwrap();
    assert!(total.contains(&(SIMULATED + 1).to_string()), "{total:?}");
    // The key is kept for the session only.
    let kept = browser
        .execute(
            "return [sessionStorage.getItem('messina.api_key'), localStorage.length]",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(kept, json!([KEY, 0]));
    screenshot(&browser, "1-fleet").await;

    // Device: each chart has one point per bucket of the aggregate endpoint over the same range.
    browser
        .goto(&server.url("/#/devices/garden-1"))
        .await
        .unwrap();
    for metric in ["battery", "rssi", "temp_c"] {
        let chart = element(
            &browser,
            &format!("svg.chart[data-metric=\"{metric}\"][data-loaded=\"true\"]"),
        )
        .await;
        let since = chart.attr("data-since").await.unwrap().expect("data-since");
        let until = chart.attr("data-until").await.unwrap().expect("data-until");
        let bucket = chart
            .attr("data-bucket")
            .await
            .unwrap()
            .expect("data-bucket");
        let answer = api(
            &server,
            &format!(
                "/v1/devices/garden-1/telemetry/aggregate?metric={metric}&bucket={bucket}\
                 &since={since}&until={until}"
            ),
        )
        .await;
        let buckets = answer["buckets"].as_array().unwrap().len();
        // A day of readings every 20 minutes in 15-minute buckets.
        assert!(
            buckets >= HISTORY as usize - 2,
            "{metric}: {buckets} buckets"
        );
        let points = count(
            &browser,
            &format!("svg.chart[data-metric=\"{metric}\"] circle.point"),
        )
        .await;
        assert_eq!(
            points, buckets,
            "{metric}: points drawn vs buckets answered"
        );
    }
    screenshot(&browser, "2-device").await;

    // Alerts: a low-battery reading raises an alert that appears without a reload.
    browser.goto(&server.url("/#/alerts")).await.unwrap();
    element(&browser, "ul#alerts-list").await;
    browser
        .execute("window.notReloaded = true", vec![])
        .await
        .unwrap();
    let low = json!({"ts": now_ms(), "seq": 1_000_000, "battery": 4.0});
    publish_v4(
        server.mqtt,
        "sim-1-low",
        vec![("devices/sim-1/telemetry".into(), mp(&low))],
    )
    .await;
    let row = "li[data-device=\"sim-1\"][data-rule=\"battery_low\"]";
    let raised = element(&browser, &format!("{row}[data-state=\"raised\"]")).await;
    let id = raised.attr("data-alert-id").await.unwrap().expect("id");
    screenshot(&browser, "3-alerts").await;
    element(&browser, &format!("{row} button.ack"))
        .await
        .click()
        .await
        .unwrap();
    element(&browser, &format!("{row}[data-state=\"acknowledged\"]")).await;
    assert_eq!(
        browser
            .execute("return window.notReloaded === true", vec![])
            .await
            .unwrap(),
        json!(true),
        "the page was reloaded"
    );
    assert_eq!(
        count(
            &browser,
            "li[data-device=\"sim-1\"][data-rule=\"battery_low\"]"
        )
        .await,
        1,
        "one row per alert"
    );
    let stored = api(&server, &format!("/v1/alerts/{id}")).await;
    assert_eq!(stored["state"], "acknowledged", "{stored}");
    assert_eq!(stored["acked_by"], "dashboard", "{stored}");

    // Ingest: the rates of devices publishing now arrive, live.
    let mut publishing = simulate(&server, 2, 100, 8, "live")
        .spawn()
        .expect("messina simulate");
    browser.goto(&server.url("/#/ingest")).await.unwrap();
    let received = element(&browser, "[data-rate=\"received\"]").await;
    wait_for("a non-zero received rate on the page", || async {
        let text = received.text().await.unwrap();
        text.split_whitespace()
            .next()
            .and_then(|n| n.replace(',', "").parse::<f64>().ok())
            .is_some_and(|rate| rate > 0.0)
    })
    .await;
    screenshot(&browser, "4-ingest").await;
    assert!(publishing.wait().unwrap().success());

    browser.close().await.unwrap();
    assert!(server.terminate().await.success());
}
