//! `messina simulate`: Messina's one load generator. A fleet of simulated devices, each its own
//! MQTT connection (3.1.1 or 5), publishes MessagePack telemetry and events at a given total
//! rate or as fast as acknowledged, with a progress line every second and a summary: messages
//! acknowledged per second and PUBACK latency percentiles; with `--http`, the time from publish
//! to queryable, sampled by a probe device; with `--json`, the summary as one JSON line last
//! (what the scripts under `benches/` read). `--payload-bytes` replaces the realistic mix with
//! fixed-size readings, for benchmarks comparable across runs and brokers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::clock::now_millis;

/// What to simulate.
#[derive(Debug, Clone, clap::Args)]
pub struct SimulateArgs {
    /// Broker address, HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:1883")]
    pub broker: String,
    /// Number of devices, each with its own connection.
    #[arg(long, alias = "connections", default_value_t = 10)]
    pub devices: usize,
    /// Total messages per second across all devices; 0 publishes as fast as acknowledged.
    #[arg(long, default_value_t = 50.0)]
    pub rate: f64,
    /// Stop after this many seconds.
    #[arg(long, default_value_t = 60)]
    pub duration: u64,
    /// Stop after this many messages in total (0: no limit).
    #[arg(long, default_value_t = 0)]
    pub count: u64,
    /// QoS of the publishes: 0 or 1.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub qos: u8,
    /// MQTT version: 3.1.1 or 5.
    #[arg(long, default_value = "3.1.1", value_parser = ["3.1.1", "4", "5"])]
    pub protocol: String,
    /// Device ids are `{prefix}-{n}`.
    #[arg(long, default_value = "sim")]
    pub prefix: String,
    /// One message in this many is an event (button press or sync result) instead of telemetry.
    #[arg(long, default_value_t = 10)]
    pub event_every: u64,
    /// Publish fixed-size readings of about this many bytes (padded), no events, instead of
    /// the realistic mix (0): for benchmarks.
    #[arg(long, default_value_t = 0)]
    pub payload_bytes: usize,
    /// Messina's HTTP address, HOST:PORT: a probe device measures the time from publish to
    /// queryable, ten times a second.
    #[arg(long)]
    pub http: Option<String>,
    /// Print the summary as one JSON line last.
    #[arg(long)]
    pub json: bool,
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    acked: AtomicU64,
    errors: AtomicU64,
}

/// Latency samples in microseconds; at most `MAX_SAMPLES` are kept.
#[derive(Default)]
struct Latencies(Mutex<Vec<u32>>);

const MAX_SAMPLES: usize = 4_000_000;

impl Latencies {
    fn record(&self, d: Duration) {
        let mut v = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if v.len() < MAX_SAMPLES {
            v.push(d.as_micros().clamp(1, u128::from(u32::MAX)) as u32);
        }
    }

    /// (samples, p50, p99, p99.9) in milliseconds.
    fn percentiles(&self) -> (usize, f64, f64, f64) {
        let mut v = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        v.sort_unstable();
        let at = |q: f64| {
            v.get(((v.len() as f64 * q) as usize).min(v.len().saturating_sub(1)))
                .map_or(0.0, |&us| f64::from(us) / 1000.0)
        };
        (v.len(), at(0.5), at(0.99), at(0.999))
    }
}

/// Message `seq` of a device: (whether it is an event, MessagePack).
fn payload(seq: u64, args: &SimulateArgs, rng: &mut impl Rng) -> (bool, Vec<u8>) {
    if args.payload_bytes > 0 {
        return (false, fixed_reading(seq, args.payload_bytes));
    }
    let ts = now_millis();
    let every = args.event_every;
    let is_event = every > 0 && seq % every == every - 1;
    let value = if !is_event {
        json!({
            "ts": ts,
            "seq": seq,
            "battery": 100.0 - (seq % 1000) as f64 / 10.0,
            "rssi": rng.random_range(-95..-45),
            "online": true,
            "metrics": {
                "temp_c": 20.0 + rng.random_range(-30..30) as f64 / 10.0,
                "humidity": rng.random_range(30..70),
            }
        })
    } else if rng.random_bool(0.5) {
        json!({"ts": ts, "seq": seq, "kind": "button", "attrs": {"button_id": rng.random_range(1..4)}})
    } else {
        let errors = if rng.random_bool(0.2) {
            rng.random_range(1..5)
        } else {
            0
        };
        json!({
            "ts": ts, "seq": seq, "kind": "sync",
            "files_synced": rng.random_range(0..50), "errors": errors,
            "speed_mbps": rng.random_range(10..500) as f64 / 10.0
        })
    };
    (is_event, msgpack(&value))
}

/// A reading padded to about `size` bytes with a filler attribute.
fn fixed_reading(seq: u64, size: usize) -> Vec<u8> {
    let reading = |pad: Option<String>| {
        let mut v = json!({"ts": now_millis(), "seq": seq, "battery": 87, "rssi": -61});
        if let Some(p) = pad {
            v["pad"] = json!(p);
        }
        msgpack(&v)
    };
    let bare = reading(None);
    if bare.len() + 6 < size {
        reading(Some("x".repeat(size - bare.len() - 6)))
    } else {
        bare
    }
}

/// Encodes JSON as MessagePack, keeping integers as integers (devices send compact types).
fn msgpack(v: &serde_json::Value) -> Vec<u8> {
    use rmpv::Value as M;
    fn convert(v: &serde_json::Value) -> M {
        match v {
            serde_json::Value::Null => M::Nil,
            serde_json::Value::Bool(b) => M::Boolean(*b),
            serde_json::Value::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
                (Some(u), _, _) => M::from(u),
                (_, Some(i), _) => M::from(i),
                (_, _, Some(f)) => M::F64(f),
                _ => M::Nil,
            },
            serde_json::Value::String(s) => M::from(s.as_str()),
            serde_json::Value::Array(a) => M::Array(a.iter().map(convert).collect()),
            serde_json::Value::Object(o) => M::Map(
                o.iter()
                    .map(|(k, v)| (M::from(k.as_str()), convert(v)))
                    .collect(),
            ),
        }
    }
    let mut out = Vec::new();
    // Writing into a Vec cannot fail.
    let _ = rmpv::encode::write_value(&mut out, &convert(v));
    out
}

/// One device's MQTT client, either version.
#[derive(Clone)]
enum Client {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

impl Client {
    async fn publish(&self, topic: String, qos1: bool, payload: Vec<u8>) -> bool {
        match self {
            Client::V4(c) => {
                let qos = if qos1 {
                    rumqttc::QoS::AtLeastOnce
                } else {
                    rumqttc::QoS::AtMostOnce
                };
                c.publish(topic, qos, false, payload).await.is_ok()
            }
            Client::V5(c) => {
                let qos = if qos1 {
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce
                } else {
                    rumqttc::v5::mqttbytes::QoS::AtMostOnce
                };
                c.publish(topic, qos, false, payload).await.is_ok()
            }
        }
    }

    async fn disconnect(&self) {
        match self {
            Client::V4(c) => {
                let _ = c.disconnect().await;
            }
            Client::V5(c) => {
                let _ = c.disconnect().await;
            }
        }
    }
}

/// What a connection's event loop saw.
enum Seen {
    Published(u16),
    Acked(u16),
    Closed,
    Failed(String),
    Other,
}

/// Hands what the event loop saw to `on`; after a failure, waits a second (rumqttc reconnects
/// at the next poll). `false` when the loop should end.
async fn next(on: &impl Fn(Seen) -> bool, seen: Seen) -> bool {
    let failed = matches!(seen, Seen::Failed(_));
    if !on(seen) {
        return false;
    }
    if failed {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    true
}

/// Publish times by packet id, to measure each PUBACK.
type Inflight = Mutex<HashMap<u16, Instant>>;

/// Connects device `n` and drives its event loop, counting acknowledgements, until `stop`.
fn connect(
    n: usize,
    args: &SimulateArgs,
    host: &str,
    port: u16,
    counters: &Arc<Counters>,
    latency: &Arc<Latencies>,
    stop: CancellationToken,
) -> (Client, tokio::task::JoinHandle<()>) {
    let id = format!("{}-{n}", args.prefix);
    let inflight: Arc<Inflight> = Arc::default();
    let (counters, latency) = (Arc::clone(counters), Arc::clone(latency));
    let on = move |seen: Seen| -> bool {
        match seen {
            Seen::Published(pkid) if pkid != 0 => {
                inflight
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(pkid, Instant::now());
            }
            Seen::Acked(pkid) => {
                if let Some(sent) = inflight
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&pkid)
                {
                    latency.record(sent.elapsed());
                }
                counters.acked.fetch_add(1, Ordering::Relaxed);
            }
            Seen::Closed => return false,
            Seen::Failed(e) => {
                counters.errors.fetch_add(1, Ordering::Relaxed);
                eprintln!("connection error: {e}; retrying");
            }
            Seen::Published(_) | Seen::Other => {}
        }
        true
    };
    if args.protocol == "5" {
        let mut o = rumqttc::v5::MqttOptions::new(id, host, port);
        o.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(o, 200);
        let poller = tokio::spawn(async move {
            use rumqttc::v5::mqttbytes::v5::Packet;
            use rumqttc::v5::Event;
            loop {
                let seen = tokio::select! {
                    _ = stop.cancelled() => break,
                    ev = eventloop.poll() => match ev {
                        Ok(Event::Outgoing(rumqttc::Outgoing::Publish(p))) => Seen::Published(p),
                        Ok(Event::Incoming(Packet::PubAck(a))) => Seen::Acked(a.pkid),
                        Ok(Event::Incoming(Packet::Disconnect(_)))
                        | Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => Seen::Closed,
                        Ok(_) => Seen::Other,
                        Err(e) => Seen::Failed(e.to_string()),
                    },
                };
                if !next(&on, seen).await {
                    break;
                }
            }
        });
        (Client::V5(client), poller)
    } else {
        let mut o = rumqttc::MqttOptions::new(id, host, port);
        o.set_keep_alive(Duration::from_secs(30));
        o.set_max_packet_size(1 << 20, 1 << 20);
        o.set_inflight(100);
        let (client, mut eventloop) = rumqttc::AsyncClient::new(o, 200);
        let poller = tokio::spawn(async move {
            use rumqttc::{Event, Outgoing, Packet};
            loop {
                let seen = tokio::select! {
                    _ = stop.cancelled() => break,
                    ev = eventloop.poll() => match ev {
                        Ok(Event::Outgoing(Outgoing::Publish(p))) => Seen::Published(p),
                        Ok(Event::Incoming(Packet::PubAck(a))) => Seen::Acked(a.pkid),
                        Ok(Event::Incoming(Packet::Disconnect))
                        | Ok(Event::Outgoing(Outgoing::Disconnect)) => Seen::Closed,
                        Ok(_) => Seen::Other,
                        Err(e) => Seen::Failed(e.to_string()),
                    },
                };
                if !next(&on, seen).await {
                    break;
                }
            }
        });
        (Client::V4(client), poller)
    }
}

/// Publishes a probe reading every 100 ms and polls the HTTP API until it is queryable.
async fn probe(
    args: SimulateArgs,
    host: String,
    port: u16,
    http: String,
    deadline: Instant,
    latency: Arc<Latencies>,
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
        let topic = format!("devices/{device}/telemetry");
        if client
            .publish(topic, QoS::AtLeastOnce, false, fixed_reading(seq, 32))
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
                latency.record(started.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs the simulation until its duration or count is reached or `stop` is cancelled.
pub async fn run(args: SimulateArgs, stop: CancellationToken) -> anyhow::Result<()> {
    let (host, port) = args
        .broker
        .rsplit_once(':')
        .and_then(|(h, p)| p.parse::<u16>().ok().map(|p| (h.to_string(), p)))
        .context("--broker must be HOST:PORT, e.g. 127.0.0.1:1883")?;
    anyhow::ensure!(args.devices >= 1, "--devices must be at least 1");
    anyhow::ensure!(args.rate >= 0.0, "--rate must not be negative");
    anyhow::ensure!(
        (1..=86_400).contains(&args.duration),
        "--duration must be between 1 and 86400 seconds"
    );
    let counters = Arc::new(Counters::default());
    let puback = Arc::new(Latencies::default());
    let e2e = Arc::new(Latencies::default());
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.duration);
    let per_device_limit = if args.count == 0 {
        u64::MAX
    } else {
        args.count.div_ceil(args.devices as u64)
    };
    let interval =
        (args.rate > 0.0).then(|| Duration::from_secs_f64(args.devices as f64 / args.rate));
    println!(
        "simulating {} device(s) against {} (MQTT {}) at {} msg/s for up to {} s (QoS {}{})",
        args.devices,
        args.broker,
        if args.protocol == "5" { "5" } else { "3.1.1" },
        if args.rate > 0.0 {
            args.rate.to_string()
        } else {
            "max".into()
        },
        args.duration,
        args.qos,
        if args.payload_bytes > 0 {
            format!(
                ", {}-byte readings",
                fixed_reading(0, args.payload_bytes).len()
            )
        } else {
            String::new()
        }
    );

    let mut tasks = Vec::new();
    for n in 0..args.devices {
        let device = format!("{}-{n}", args.prefix);
        // Cancelled by Ctrl-C (the parent) or when this device is done publishing.
        let stop = stop.child_token();
        let (client, poller) = connect(n, &args, &host, port, &counters, &puback, stop.clone());
        let counters = Arc::clone(&counters);
        let args = args.clone();
        let publisher = tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::from_os_rng();
            // Spread devices over the interval so the load is even.
            let mut next = tokio::time::Instant::now()
                + interval.map_or(Duration::ZERO, |i| i.mul_f64((n % 1000) as f64 / 1000.0));
            tokio::time::sleep_until(next).await;
            let mut seq = 0u64;
            while seq < per_device_limit && Instant::now() < deadline && !stop.is_cancelled() {
                let (is_event, bytes) = payload(seq, &args, &mut rng);
                let topic = format!(
                    "devices/{device}/{}",
                    if is_event { "events" } else { "telemetry" }
                );
                if !client.publish(topic, args.qos == 1, bytes).await {
                    break;
                }
                counters.sent.fetch_add(1, Ordering::Relaxed);
                if args.qos == 0 {
                    counters.acked.fetch_add(1, Ordering::Relaxed);
                }
                seq += 1;
                if let Some(i) = interval {
                    next += i;
                    tokio::time::sleep_until(next).await;
                }
            }
            // Give outstanding acknowledgements a moment, then leave cleanly.
            tokio::time::sleep(Duration::from_millis(500)).await;
            client.disconnect().await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            stop.cancel();
        });
        tasks.push((publisher, poller));
    }
    let probe = args.http.clone().map(|http| {
        tokio::spawn(probe(
            args.clone(),
            host.clone(),
            port,
            http,
            deadline,
            Arc::clone(&e2e),
        ))
    });

    let progress = {
        let counters = Arc::clone(&counters);
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            let mut last = 0;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {
                        let acked = counters.acked.load(Ordering::Relaxed);
                        println!(
                            "[{:>4}s] sent {}, acknowledged {acked} ({} msg/s), connection errors {}",
                            started.elapsed().as_secs(),
                            counters.sent.load(Ordering::Relaxed),
                            acked - last,
                            counters.errors.load(Ordering::Relaxed)
                        );
                        last = acked;
                    }
                }
            }
        })
    };
    for (publisher, poller) in tasks {
        let _ = publisher.await;
        let _ = poller.await;
    }
    if let Some(probe) = probe {
        let _ = probe.await;
    }
    stop.cancel();
    let _ = progress.await;
    let secs = started
        .elapsed()
        .as_secs_f64()
        .min(args.duration as f64)
        .max(0.001);
    let sent = counters.sent.load(Ordering::Relaxed);
    let acked = counters.acked.load(Ordering::Relaxed);
    let (n, p50, p99, p999) = puback.percentiles();
    println!(
        "done: sent {sent} message(s) in {secs:.1} s ({:.0} msg/s), acknowledged {acked} ({:.0} msg/s); PUBACK latency p50 {p50:.2} ms, p99 {p99:.2} ms, p99.9 {p999:.2} ms ({n} samples)",
        sent as f64 / secs,
        acked as f64 / secs,
    );
    let (en, e50, e99, _) = e2e.percentiles();
    if en > 0 {
        println!("publish → queryable: p50 {e50:.1} ms, p99 {e99:.1} ms ({en} samples)");
    }
    if args.json {
        println!(
            "{}",
            json!({
                "sent": sent, "acked": acked, "seconds": secs,
                "msgs_per_s": acked as f64 / secs, "puback_p50_ms": p50, "puback_p99_ms": p99,
                "e2e_samples": en, "e2e_p50_ms": e50, "e2e_p99_ms": e99,
                "errors": counters.errors.load(Ordering::Relaxed),
            })
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_readings_are_padded_to_about_their_size_and_decode() {
        for size in [16, 64, 256, 4096] {
            let bytes = fixed_reading(7, size);
            assert!(bytes.len() <= size.max(40) + 8, "{size}: {}", bytes.len());
            let v: serde_json::Value = rmp_serde::from_slice(&bytes).unwrap();
            assert_eq!(v["seq"], 7);
        }
        assert!(fixed_reading(1, 4096).len() >= 4000);
    }

    #[test]
    fn latency_percentiles_come_from_the_samples() {
        let l = Latencies::default();
        for ms in 1..=1000 {
            l.record(Duration::from_millis(ms));
        }
        let (n, p50, p99, _) = l.percentiles();
        assert_eq!(n, 1000);
        assert!((p50 - 501.0).abs() < 1.5, "{p50}");
        assert!((p99 - 991.0).abs() < 1.5, "{p99}");
    }
}
