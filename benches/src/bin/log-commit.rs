//! Group-commit benchmark of the ingest log: N appenders (connections), each keeping a window of
//! unacknowledged appends, a consumer that reads and checkpoints as it goes, for `fsync` and the
//! unsafe `os-buffer` mode in the same run. Prints appends/s, MB/s, syncs and the latency from
//! append to durable (what a PUBACK waits for), and the price of fsync as a ratio.
//!
//! `cargo run --release -p messina-benches --bin log-commit -- [appenders] [seconds] [bytes] [window]`

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use messina_log::{Durability, Log, Options, Record};

struct Run {
    appends: u64,
    bytes: u64,
    syncs: u64,
    secs: f64,
    latency: Histogram<u64>,
}

async fn run(
    durability: Durability,
    appenders: usize,
    secs: u64,
    size: usize,
    window: usize,
) -> Run {
    let dir = std::env::temp_dir().join(format!(
        "messina-log-commit-{}-{:?}",
        std::process::id(),
        durability
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let (log, recovered) = Log::open(Options {
        dir: dir.clone(),
        durability,
        ..Options::default()
    })
    .expect("open the log");
    let consumer = {
        let log = log.clone();
        tokio::spawn(async move {
            let mut reader = log.reader(recovered.checkpoint);
            while let Ok(Some(batch)) = reader.next_batch(4096).await {
                if let Some(last) = batch.last() {
                    log.checkpoint(last.end).expect("checkpoint");
                }
            }
        })
    };
    let stop = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for a in 0..appenders {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            let topic = format!("devices/dev-{a}/telemetry");
            let payload = vec![0x5a; size];
            let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
            let mut in_flight: VecDeque<(u64, Instant)> = VecDeque::new();
            let mut n = 0u64;
            while Instant::now() < stop {
                let t = Instant::now();
                let end = log
                    .append(Record {
                        kind: 1,
                        flags: 1,
                        received_at: 0,
                        topic: topic.as_bytes(),
                        meta: &[],
                        payload: &payload,
                    })
                    .await
                    .expect("append");
                in_flight.push_back((end, t));
                n += 1;
                if in_flight.len() >= window {
                    let (end, _) = in_flight[0];
                    log.wait_durable(end).await.expect("durable");
                    let durable = log.durable();
                    while in_flight.front().is_some_and(|(e, _)| *e <= durable) {
                        let (_, t) = in_flight.pop_front().unwrap();
                        let _ = latency.record(t.elapsed().as_micros() as u64);
                    }
                }
            }
            for (end, t) in in_flight {
                log.wait_durable(end).await.expect("durable");
                let _ = latency.record(t.elapsed().as_micros() as u64);
            }
            (n, latency)
        }));
    }
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    let mut appends = 0;
    for t in tasks {
        let (n, h) = t.await.unwrap();
        appends += n;
        latency.add(h).unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    let stats = log.stats();
    log.close();
    let _ = consumer.await;
    log.closed().await;
    drop(log);
    let _ = std::fs::remove_dir_all(&dir);
    Run {
        appends,
        bytes: stats.bytes_written,
        syncs: stats.syncs,
        secs,
        latency,
    }
}

fn arg(i: usize, default: u64) -> u64 {
    std::env::args()
        .nth(i)
        .map(|a| a.parse().expect("numeric argument"))
        .unwrap_or(default)
}

#[tokio::main]
async fn main() {
    let appenders = arg(1, 50) as usize;
    let secs = arg(2, 5);
    let size = arg(3, 64) as usize;
    let window = arg(4, 64) as usize;
    println!(
        "ingest log group commit: {appenders} appenders, window {window}, {size}-byte payloads, {secs} s per mode"
    );
    println!("| mode | appends/s | MB/s | syncs/s | records per sync | durable p50 | p99 | max |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut rates = Vec::new();
    for (name, mode) in [
        ("fsync", Durability::Fsync),
        ("os-buffer (unsafe)", Durability::OsBuffer),
    ] {
        let r = run(mode, appenders, secs, size, window).await;
        let rate = r.appends as f64 / r.secs;
        rates.push(rate);
        println!(
            "| {name} | {:.0} | {:.1} | {:.0} | {:.0} | {:.2} ms | {:.2} ms | {:.2} ms |",
            rate,
            r.bytes as f64 / r.secs / 1e6,
            r.syncs as f64 / r.secs,
            if r.syncs > 0 {
                r.appends as f64 / r.syncs as f64
            } else {
                f64::NAN
            },
            r.latency.value_at_quantile(0.5) as f64 / 1000.0,
            r.latency.value_at_quantile(0.99) as f64 / 1000.0,
            r.latency.max() as f64 / 1000.0,
        );
    }
    println!(
        "price of fsync: {:.2}x the unsafe mode's throughput",
        rates[0] / rates[1]
    );
}
