//! Rows/s of Messina's ScyllaDB backend against a plain driver insert loop of the same rows, in one
//! run against the same node: the loop is the storage's own limit, and the ratio is what Messina's
//! batching, latest-state updates and partition index cost on top.
//!
//! `cargo run --release -p messina-benches --bin scylla-rows -- [ROWS] [DEVICES]`
//! (defaults 200000 and 100; the node is `$MESSINA_SCYLLA_NODES`, default 127.0.0.1:9042).

use std::collections::BTreeMap;
use std::time::Instant;

use futures::StreamExt;
use messina_storage::scylla::{ScyllaOptions, ScyllaStorage};
use messina_storage::{Batch, DeviceId, Reading, Storage};
use scylla::value::{CqlDate, CqlTimestamp};

const DAY_MS: i64 = 86_400_000;

fn readings(rows: usize, devices: usize, t0: i64) -> Vec<Reading> {
    (0..rows)
        .map(|i| Reading {
            device: DeviceId::new(format!("bench-{}", i % devices)).unwrap(),
            ts: t0 + (i / devices) as i64 * 10,
            seq: i as u64,
            received_at: t0 + (i / devices) as i64 * 10 + 3,
            battery: Some(50.0 + (i % 50) as f64),
            rssi: Some(-60),
            online: Some(true),
            metrics: BTreeMap::from([("temp_c".to_string(), 21.5), ("humidity".to_string(), 40.0)]),
            attrs: BTreeMap::new(),
        })
        .collect()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let rows: usize = args.get(1).map_or(Ok(200_000), |a| a.parse())?;
    let devices: usize = args.get(2).map_or(Ok(100), |a| a.parse())?;
    let nodes = messina_storage::scylla::test_node::nodes();
    let t0 = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64
        / DAY_MS)
        * DAY_MS;
    let data = readings(rows, devices, t0);
    let concurrency = 64;
    println!(
        "{rows} readings of {devices} devices; node {}",
        nodes.join(",")
    );

    // Messina's backend, in batches of 1000 as the bridge writes them.
    let mut options = ScyllaOptions::local("messina_bench_backend");
    options.nodes = nodes.clone();
    options.max_in_flight = concurrency;
    let storage = ScyllaStorage::connect(&options).await?;
    // The plain loop: one prepared INSERT per row into the same table shape, `concurrency` in
    // flight.
    let mut plain = ScyllaOptions::local("messina_bench_plain");
    plain.nodes = nodes;
    let plain_storage = ScyllaStorage::connect(&plain).await?;
    let insert = plain_storage
        .session()
        .prepare(
            "INSERT INTO messina_bench_plain.telemetry (device_id, day, ts, seq, received_at, battery, rssi, online, metrics) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .await?;

    // A node that has just started (or just absorbed another load) runs several times slower
    // until its JIT, caches and memtables settle: both paths first write a quarter of the rows
    // untimed, then each is timed twice, alternating, so both meet the same conditions.
    let warm = &data[..data.len() / 4];
    backend_run(&storage, warm).await?;
    plain_run(&plain_storage, &insert, warm, concurrency).await?;
    let (mut backend, mut loop_rate) = (Vec::new(), Vec::new());
    for round in 1..=2 {
        let b = backend_run(&storage, &data).await?;
        let l = plain_run(&plain_storage, &insert, &data, concurrency).await?;
        eprintln!("  round {round}: backend {b:.0} rows/s, plain loop {l:.0} rows/s");
        backend.push(b);
        loop_rate.push(l);
    }
    let backend = backend.iter().sum::<f64>() / backend.len() as f64;
    let loop_rate = loop_rate.iter().sum::<f64>() / loop_rate.len() as f64;
    println!("messina ScyllaDB backend: {backend:.0} rows/s");
    println!("plain driver insert loop ({concurrency} in flight): {loop_rate:.0} rows/s");
    println!("ratio messina / plain loop: {:.2}", backend / loop_rate);
    Ok(())
}

/// Writes `data` through Messina's backend into an emptied table; rows/s.
async fn backend_run(
    storage: &ScyllaStorage,
    data: &[Reading],
) -> Result<f64, Box<dyn std::error::Error>> {
    storage
        .session()
        .query_unpaged("TRUNCATE messina_bench_backend.telemetry", ())
        .await?;
    let started = Instant::now();
    for (n, chunk) in data.chunks(1000).enumerate() {
        let batch = Batch {
            readings: chunk.to_vec(),
            ..Batch::default()
        };
        storage.write_batch(&batch).await?;
        if n % 50 == 49 {
            eprintln!("  messina backend: {} rows", (n + 1) * 1000);
        }
    }
    Ok(data.len() as f64 / started.elapsed().as_secs_f64())
}

/// Writes `data` with one prepared INSERT per row, `concurrency` in flight, into an emptied
/// table; rows/s.
async fn plain_run(
    storage: &ScyllaStorage,
    insert: &scylla::statement::prepared::PreparedStatement,
    data: &[Reading],
    concurrency: usize,
) -> Result<f64, Box<dyn std::error::Error>> {
    let session = storage.session();
    session
        .query_unpaged("TRUNCATE messina_bench_plain.telemetry", ())
        .await?;
    let started = Instant::now();
    let mut results = futures::stream::iter(data.iter().map(|r| async move {
        let day = CqlDate((r.ts.div_euclid(DAY_MS) + (1 << 31)) as u32);
        session
            .execute_unpaged(
                insert,
                (
                    r.device.as_str(),
                    day,
                    CqlTimestamp(r.ts),
                    r.seq as i64,
                    CqlTimestamp(r.received_at),
                    r.battery,
                    r.rssi,
                    r.online,
                    &r.metrics,
                ),
            )
            .await
    }))
    .buffer_unordered(concurrency);
    while let Some(result) = results.next().await {
        result?;
    }
    Ok(data.len() as f64 / started.elapsed().as_secs_f64())
}
