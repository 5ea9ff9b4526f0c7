//! `messina simulate`: a fleet of simulated devices, each its own MQTT connection, publishing valid
//! MessagePack telemetry and events at a given total rate, with a progress line every second.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use rand::{Rng, SeedableRng};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// What to simulate.
#[derive(Debug, Clone, clap::Args)]
pub struct SimulateArgs {
    /// MQTT 3.1.1 broker address.
    #[arg(long, default_value = "127.0.0.1:1883")]
    pub broker: String,
    /// Number of devices, each with its own connection.
    #[arg(long, default_value_t = 10)]
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
    /// Device ids are `{prefix}-{n}`.
    #[arg(long, default_value = "sim")]
    pub prefix: String,
    /// One message in this many is an event (button press or sync result) instead of telemetry.
    #[arg(long, default_value_t = 10)]
    pub event_every: u64,
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    acked: AtomicU64,
    errors: AtomicU64,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// One message of device `n`, number `seq`.
fn payload(seq: u64, event_every: u64, rng: &mut impl Rng) -> (bool, Vec<u8>) {
    let ts = now_ms();
    let is_event = event_every > 0 && seq % event_every == event_every - 1;
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
    (is_event, rmp_serde_bytes(&value))
}

fn rmp_serde_bytes(value: &serde_json::Value) -> Vec<u8> {
    let mut out = Vec::new();
    write_json_as_msgpack(&mut out, value);
    out
}

/// Encodes JSON as MessagePack, keeping integers as integers (devices send compact types).
fn write_json_as_msgpack(out: &mut Vec<u8>, v: &serde_json::Value) {
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
    // Writing into a Vec cannot fail.
    let _ = rmpv::encode::write_value(out, &convert(v));
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
    let counters = Arc::new(Counters::default());
    let deadline = Instant::now() + Duration::from_secs(args.duration);
    let per_device_limit = if args.count == 0 {
        u64::MAX
    } else {
        args.count.div_ceil(args.devices as u64)
    };
    let interval =
        (args.rate > 0.0).then(|| Duration::from_secs_f64(args.devices as f64 / args.rate));
    let qos = if args.qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    println!(
        "simulating {} device(s) against {} at {} msg/s for up to {} s (QoS {})",
        args.devices,
        args.broker,
        if args.rate > 0.0 {
            args.rate.to_string()
        } else {
            "max".into()
        },
        args.duration,
        args.qos
    );

    let mut tasks = Vec::new();
    for n in 0..args.devices {
        let device = format!("{}-{n}", args.prefix);
        let mut options = MqttOptions::new(device.clone(), host.clone(), port);
        options.set_keep_alive(Duration::from_secs(30));
        options.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut eventloop) = AsyncClient::new(options, 100);
        let counters = Arc::clone(&counters);
        // Cancelled by Ctrl-C (the parent) or when this device is done publishing.
        let stop = stop.child_token();
        let event_every = args.event_every;
        // Drives the connection and counts acknowledgements.
        let poller = {
            let counters = Arc::clone(&counters);
            let stop = stop.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        ev = eventloop.poll() => match ev {
                            Ok(Event::Incoming(Packet::PubAck(_))) => {
                                counters.acked.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(Event::Incoming(Packet::Disconnect))
                            | Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
                            Ok(_) => {}
                            Err(e) => {
                                counters.errors.fetch_add(1, Ordering::Relaxed);
                                eprintln!("{}: connection error: {e}; retrying", eventloop.mqtt_options.client_id());
                                tokio::time::sleep(Duration::from_secs(1)).await;
                            }
                        }
                    }
                }
            })
        };
        let publisher = tokio::spawn(async move {
            // Spread devices over the interval so the load is even.
            let mut rng = rand::rngs::StdRng::from_os_rng();
            if let Some(i) = interval {
                tokio::time::sleep(i.mul_f64(n as f64 / 1000.0 % 1.0)).await;
            }
            let mut next = tokio::time::Instant::now();
            let mut seq = 0u64;
            while seq < per_device_limit && Instant::now() < deadline && !stop.is_cancelled() {
                let (is_event, bytes) = payload(seq, event_every, &mut rng);
                let topic = format!(
                    "devices/{device}/{}",
                    if is_event { "events" } else { "telemetry" }
                );
                if client.publish(topic, qos, false, bytes).await.is_err() {
                    break;
                }
                counters.sent.fetch_add(1, Ordering::Relaxed);
                seq += 1;
                if let Some(i) = interval {
                    next += i;
                    tokio::time::sleep_until(next).await;
                }
            }
            // Give outstanding acknowledgements a moment, then leave cleanly.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let _ = client.disconnect().await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            stop.cancel();
        });
        tasks.push((publisher, poller));
    }

    let started = Instant::now();
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
                        let sent = counters.sent.load(Ordering::Relaxed);
                        println!(
                            "[{:>4}s] sent {sent} ({} msg/s), acknowledged {}, connection errors {}",
                            started.elapsed().as_secs(),
                            sent - last,
                            counters.acked.load(Ordering::Relaxed),
                            counters.errors.load(Ordering::Relaxed)
                        );
                        last = sent;
                    }
                }
            }
        })
    };
    for (publisher, poller) in tasks {
        let _ = publisher.await;
        let _ = poller.await;
    }
    stop.cancel();
    let _ = progress.await;
    let secs = started.elapsed().as_secs_f64();
    let sent = counters.sent.load(Ordering::Relaxed);
    println!(
        "done: sent {sent} message(s) in {secs:.1} s ({:.0} msg/s), acknowledged {}",
        sent as f64 / secs,
        counters.acked.load(Ordering::Relaxed)
    );
    Ok(())
}
