//! Load generator for MQTT ingestion: N device connections (each its own client id and topic)
//! publishing MessagePack readings at a target rate or as fast as acknowledged, QoS 0 or 1, MQTT
//! 3.1.1 or 5, for a duration or a message count. Reports messages/s acknowledged, PUBACK latency
//! percentiles and, when given Messina's HTTP address, end-to-end latency from publish to queryable,
//! sampled by a probe device. Prints a progress line each second; bounded in time and count;
//! loopback only. The last line of output is a JSON summary for `benches/compare`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::FutureExt;
use hdrhistogram::Histogram;

#[derive(Debug, Clone)]
struct Args {
    broker: String,
    connections: usize,
    rate: f64,
    payload_bytes: usize,
    qos: u8,
    v5: bool,
    duration: Duration,
    count: u64,
    http: Option<String>,
    prefix: String,
}

const USAGE: &str = "usage: loadgen [--broker 127.0.0.1:1883] [--connections 50] [--rate 0 (msg/s total; 0 = as fast as acknowledged)] \
[--payload-bytes 64] [--qos 1] [--protocol 3.1.1|5] [--duration 15] [--count 0] [--http 127.0.0.1:8080] [--prefix lg]";

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        broker: "127.0.0.1:1883".into(),
        connections: 50,
        rate: 0.0,
        payload_bytes: 64,
        qos: 1,
        v5: false,
        duration: Duration::from_secs(15),
        count: 0,
        http: None,
        prefix: "lg".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value\n{USAGE}"));
        let bad = |f: &str, v: &str| format!("{f}: {v:?} is not valid\n{USAGE}");
        match flag.as_str() {
            "--broker" => a.broker = value()?,
            "--connections" => {
                a.connections = value()?.parse().map_err(|_| bad(&flag, "connections"))?
            }
            "--rate" => a.rate = value()?.parse().map_err(|_| bad(&flag, "rate"))?,
            "--payload-bytes" => {
                a.payload_bytes = value()?.parse().map_err(|_| bad(&flag, "payload-bytes"))?
            }
            "--qos" => {
                a.qos = match value()?.as_str() {
                    "0" => 0,
                    "1" => 1,
                    v => return Err(bad(&flag, v)),
                }
            }
            "--protocol" => {
                a.v5 = match value()?.as_str() {
                    "3.1.1" | "4" => false,
                    "5" => true,
                    v => return Err(bad(&flag, v)),
                }
            }
            "--duration" => {
                a.duration =
                    Duration::from_secs(value()?.parse().map_err(|_| bad(&flag, "duration"))?)
            }
            "--count" => a.count = value()?.parse().map_err(|_| bad(&flag, "count"))?,
            "--http" => a.http = Some(value()?),
            "--prefix" => a.prefix = value()?,
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    if a.connections == 0 || a.duration.is_zero() || a.duration > Duration::from_secs(3600) {
        return Err(format!(
            "--connections must be ≥ 1 and --duration 1..3600 s\n{USAGE}"
        ));
    }
    if !a.broker.starts_with("127.") && !a.broker.starts_with("localhost") {
        return Err("--broker must be a loopback address".into());
    }
    Ok(a)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A MessagePack reading padded to about `size` bytes with a filler attribute.
fn payload(seq: u64, size: usize) -> Vec<u8> {
    let mut v = rmpv::Value::Map(vec![
        ("ts".into(), rmpv::Value::from(now_ms())),
        ("seq".into(), rmpv::Value::from(seq)),
        ("battery".into(), rmpv::Value::from(87)),
        ("rssi".into(), rmpv::Value::from(-61)),
    ]);
    let mut out = Vec::with_capacity(size + 16);
    rmpv::encode::write_value(&mut out, &v).expect("encode into a Vec");
    if out.len() + 6 < size {
        if let rmpv::Value::Map(m) = &mut v {
            m.push((
                "pad".into(),
                rmpv::Value::from("x".repeat(size - out.len() - 6)),
            ));
        }
        out.clear();
        rmpv::encode::write_value(&mut out, &v).expect("encode into a Vec");
    }
    out
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    acked: AtomicU64,
    errors: AtomicU64,
}

type Hist = Arc<Mutex<Histogram<u64>>>;

fn hist() -> Hist {
    Arc::new(Mutex::new(
        Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds"),
    ))
}

fn record(h: &Hist, d: Duration) {
    let _ = h
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .record((d.as_micros() as u64).max(1));
}

/// Where one connection stands: what it publishes and until when.
struct Plan {
    topic: String,
    payload_bytes: usize,
    qos: u8,
    interval: Option<Duration>,
    limit: u64,
    deadline: Instant,
    /// When the first publish is due; connections are spread over the interval.
    first: tokio::time::Instant,
}

/// One device connection: publishes and measures PUBACK latency, until its deadline or limit.
async fn device(
    n: usize,
    args: Args,
    host: String,
    port: u16,
    plan: Plan,
    counters: Arc<Counters>,
    latency: Hist,
) {
    let id = format!("{}-{n}", args.prefix);
    if args.v5 {
        let mut o = rumqttc::v5::MqttOptions::new(id, host, port);
        o.set_keep_alive(Duration::from_secs(30));
        let (client, eventloop) = rumqttc::v5::AsyncClient::new(o, 200);
        run_v5(client, eventloop, plan, &counters, &latency).await;
    } else {
        let mut o = rumqttc::MqttOptions::new(id, host, port);
        o.set_keep_alive(Duration::from_secs(30));
        o.set_inflight(100);
        let (client, eventloop) = rumqttc::AsyncClient::new(o, 200);
        run_v4(client, eventloop, plan, &counters, &latency).await;
    }
}

/// Counts an acknowledgement of `pkid` and records its latency.
fn acked(inflight: &Mutex<HashMap<u16, Instant>>, pkid: u16, counters: &Counters, latency: &Hist) {
    if let Some(sent) = inflight
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&pkid)
    {
        record(latency, sent.elapsed());
    }
    counters.acked.fetch_add(1, Ordering::Relaxed);
}

fn sent(inflight: &Mutex<HashMap<u16, Instant>>, pkid: u16) {
    if pkid != 0 {
        inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(pkid, Instant::now());
    }
}

/// The publishing loop shared by both protocol versions; `publish` sends one message.
async fn publish_loop<F, Fut>(plan: &Plan, counters: &Counters, mut publish: F)
where
    F: FnMut(Vec<u8>) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let mut next = plan.first;
    tokio::time::sleep_until(next).await;
    let mut seq = 0u64;
    while seq < plan.limit && Instant::now() < plan.deadline {
        if !publish(payload(seq, plan.payload_bytes)).await {
            break;
        }
        counters.sent.fetch_add(1, Ordering::Relaxed);
        if plan.qos == 0 {
            counters.acked.fetch_add(1, Ordering::Relaxed);
        }
        seq += 1;
        if let Some(i) = plan.interval {
            next += i;
            tokio::time::sleep_until(next).await;
        }
    }
}

async fn run_v4(
    client: rumqttc::AsyncClient,
    mut eventloop: rumqttc::EventLoop,
    plan: Plan,
    counters: &Arc<Counters>,
    latency: &Hist,
) {
    use rumqttc::{Event, Outgoing, Packet, QoS};
    let inflight: Arc<Mutex<HashMap<u16, Instant>>> = Arc::default();
    let (i, c, l) = (
        Arc::clone(&inflight),
        Arc::clone(counters),
        Arc::clone(latency),
    );
    let poller = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => sent(&i, pkid),
                Ok(Event::Incoming(Packet::PubAck(ack))) => acked(&i, ack.pkid, &c, &l),
                Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
                Ok(_) => {}
                Err(_) => {
                    c.errors.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
    });
    let qos = if plan.qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    publish_loop(&plan, counters, |bytes| {
        client
            .publish(plan.topic.clone(), qos, false, bytes)
            .map(|r| r.is_ok())
    })
    .await;
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), poller).await;
}

async fn run_v5(
    client: rumqttc::v5::AsyncClient,
    mut eventloop: rumqttc::v5::EventLoop,
    plan: Plan,
    counters: &Arc<Counters>,
    latency: &Hist,
) {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::Event;
    use rumqttc::Outgoing;
    let inflight: Arc<Mutex<HashMap<u16, Instant>>> = Arc::default();
    let (i, c, l) = (
        Arc::clone(&inflight),
        Arc::clone(counters),
        Arc::clone(latency),
    );
    let poller = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => sent(&i, pkid),
                Ok(Event::Incoming(Packet::PubAck(ack))) => acked(&i, ack.pkid, &c, &l),
                Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
                Ok(_) => {}
                Err(_) => {
                    c.errors.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
    });
    let qos = if plan.qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    publish_loop(&plan, counters, |bytes| {
        client
            .publish(plan.topic.clone(), qos, false, bytes)
            .map(|r| r.is_ok())
    })
    .await;
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), poller).await;
}

/// Publishes a probe reading every 100 ms and polls Messina's HTTP API until it is queryable.
async fn probe(
    args: Args,
    host: String,
    port: u16,
    http: String,
    deadline: Instant,
    latency: Hist,
) {
    use rumqttc::{AsyncClient, MqttOptions, QoS};
    let device = format!("{}-probe", args.prefix);
    let (client, mut eventloop) =
        AsyncClient::new(MqttOptions::new(device.clone(), host, port), 10);
    tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    let http_client = reqwest::Client::new();
    let url = format!("http://{http}/v1/devices/{device}/telemetry?limit=1");
    let mut seq = 0u64;
    while Instant::now() < deadline {
        seq += 1;
        let started = Instant::now();
        if client
            .publish(
                format!("devices/{device}/telemetry"),
                QoS::AtLeastOnce,
                false,
                payload(seq, 32),
            )
            .await
            .is_err()
        {
            return;
        }
        // Poll until the reading is visible, for at most 5 s.
        while started.elapsed() < Duration::from_secs(5) {
            let visible = match http_client.get(&url).send().await {
                Ok(r) => r
                    .json::<serde_json::Value>()
                    .await
                    .ok()
                    .and_then(|v| v["items"][0]["seq"].as_u64())
                    .is_some_and(|s| s >= seq),
                Err(_) => false,
            };
            if visible {
                record(&latency, started.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn percentiles(h: &Hist) -> (u64, f64, f64, f64) {
    let h = h.lock().unwrap_or_else(|p| p.into_inner());
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    (h.len(), ms(0.5), ms(0.99), ms(0.999))
}

#[tokio::main]
async fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let (host, port) = match args
        .broker
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.to_string(), p.parse::<u16>().ok()?)))
    {
        Some(hp) => hp,
        None => {
            eprintln!("--broker must be HOST:PORT");
            std::process::exit(2);
        }
    };
    let started = Instant::now();
    let deadline = started + args.duration;
    let limit = if args.count == 0 {
        u64::MAX
    } else {
        args.count.div_ceil(args.connections as u64)
    };
    let interval =
        (args.rate > 0.0).then(|| Duration::from_secs_f64(args.connections as f64 / args.rate));
    let counters = Arc::new(Counters::default());
    let puback = hist();
    let e2e = hist();
    eprintln!(
        "loadgen: {} connection(s) → {} ({}), QoS {}, {}-byte payloads, rate {}, {} s",
        args.connections,
        args.broker,
        if args.v5 { "MQTT 5" } else { "MQTT 3.1.1" },
        args.qos,
        payload(0, args.payload_bytes).len(),
        if args.rate > 0.0 {
            format!("{} msg/s", args.rate)
        } else {
            "as fast as acknowledged".into()
        },
        args.duration.as_secs()
    );
    let mut tasks = Vec::new();
    for n in 0..args.connections {
        let plan = Plan {
            topic: format!("devices/{}-{n}/telemetry", args.prefix),
            payload_bytes: args.payload_bytes,
            qos: args.qos,
            interval,
            limit,
            deadline,
            first: tokio::time::Instant::now()
                + interval.map_or(Duration::ZERO, |i| i.mul_f64((n % 1000) as f64 / 1000.0)),
        };
        tasks.push(tokio::spawn(device(
            n,
            args.clone(),
            host.clone(),
            port,
            plan,
            Arc::clone(&counters),
            Arc::clone(&puback),
        )));
    }
    if let Some(http) = args.http.clone() {
        tasks.push(tokio::spawn(probe(
            args.clone(),
            host.clone(),
            port,
            http,
            deadline,
            Arc::clone(&e2e),
        )));
    }
    let progress = {
        let counters = Arc::clone(&counters);
        tokio::spawn(async move {
            let mut last = 0;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                let acked = counters.acked.load(Ordering::Relaxed);
                eprintln!(
                    "[{:>3}s] sent {} acknowledged {} ({} msg/s) errors {}",
                    started.elapsed().as_secs(),
                    counters.sent.load(Ordering::Relaxed),
                    acked,
                    acked - last,
                    counters.errors.load(Ordering::Relaxed)
                );
                last = acked;
            }
        })
    };
    for t in tasks {
        let _ = t.await;
    }
    progress.abort();
    let secs = args
        .duration
        .as_secs_f64()
        .min(started.elapsed().as_secs_f64());
    let acked = counters.acked.load(Ordering::Relaxed);
    let (n, p50, p99, p999) = percentiles(&puback);
    let (en, e50, e99, _) = percentiles(&e2e);
    println!(
        "acknowledged {acked} of {} in {secs:.1} s: {:.0} msg/s; PUBACK latency p50 {p50:.2} ms, p99 {p99:.2} ms, p99.9 {p999:.2} ms ({n} samples)",
        counters.sent.load(Ordering::Relaxed),
        acked as f64 / secs
    );
    if en > 0 {
        println!("publish → queryable: p50 {e50:.1} ms, p99 {e99:.1} ms ({en} samples)");
    }
    println!(
        "{}",
        serde_json::json!({
            "sent": counters.sent.load(Ordering::Relaxed), "acked": acked, "seconds": secs,
            "msgs_per_s": acked as f64 / secs, "puback_p50_ms": p50, "puback_p99_ms": p99,
            "e2e_samples": en, "e2e_p50_ms": e50, "e2e_p99_ms": e99,
            "errors": counters.errors.load(Ordering::Relaxed),
        })
    );
}
