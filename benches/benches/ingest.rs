//! Micro benchmarks of the ingest path: MessagePack decode + validation per message against a
//! plain serde decode of the same bytes (the floor), and batch building plus an embedded-storage
//! batch write.

use std::collections::BTreeMap;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use messina_bridge::wire::{decode, Kind, Limits};
use messina_storage::embedded::{EmbeddedOptions, EmbeddedStorage};
use messina_storage::{Batch, DeviceId, Storage};
use serde::Deserialize;
use serde_json::json;

const NOW: i64 = 1_760_000_000_000;

fn reading(i: i64) -> Vec<u8> {
    rmp_serde::to_vec(&json!({
        "ts": NOW - 1000 + i, "seq": i, "battery": 87.5, "rssi": -61, "online": true,
        "metrics": {"temp_c": 21.5, "humidity": 40}
    }))
    .unwrap()
}

/// What a decoder that validates nothing would read: the floor for `decode`.
#[derive(Deserialize)]
#[allow(dead_code)]
struct Plain {
    ts: i64,
    seq: u64,
    battery: f64,
    rssi: i32,
    online: bool,
    metrics: BTreeMap<String, f64>,
}

fn decode_benches(c: &mut Criterion) {
    let device = DeviceId::new("dev-1").unwrap();
    let limits = Limits::default();
    let payload = reading(1);
    let mut g = c.benchmark_group("decode_reading");
    g.throughput(Throughput::Elements(1));
    g.bench_function("messina_decode_validate", |b| {
        b.iter(|| decode(&device, Kind::Telemetry, &payload, NOW, &limits).unwrap())
    });
    g.bench_function("peer_rmp_serde_plain_struct", |b| {
        b.iter(|| rmp_serde::from_slice::<Plain>(&payload).unwrap())
    });
    g.finish();
}

fn batch_benches(c: &mut Criterion) {
    let device = DeviceId::new("dev-1").unwrap();
    let limits = Limits::default();
    let payloads: Vec<Vec<u8>> = (0..1000).map(reading).collect();
    let mut g = c.benchmark_group("batch_1000");
    g.throughput(Throughput::Elements(1000));
    g.measurement_time(Duration::from_secs(5));
    g.bench_function("build", |b| {
        b.iter(|| {
            let mut batch = Batch::default();
            for p in &payloads {
                if let Ok(messina_bridge::Decoded::Readings(r)) =
                    decode(&device, Kind::Telemetry, p, NOW, &limits)
                {
                    batch.readings.extend(r);
                }
            }
            batch
        })
    });
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut options = EmbeddedOptions::new(dir.path());
    options.fsync = false;
    let storage = EmbeddedStorage::open(&options).unwrap();
    let mut batch = Batch::default();
    for p in &payloads {
        if let Ok(messina_bridge::Decoded::Readings(r)) =
            decode(&device, Kind::Telemetry, p, NOW, &limits)
        {
            batch.readings.extend(r);
        }
    }
    let mut round = 0i64;
    g.bench_function("embedded_write_no_fsync", |b| {
        b.iter_batched(
            || {
                // New keys each round, so the write is an insert, not an overwrite.
                round += 1;
                let mut next = batch.clone();
                next.readings
                    .iter_mut()
                    .for_each(|r| r.ts += round * 1_000_000);
                next
            },
            |next| runtime.block_on(storage.write_batch(&next)).unwrap(),
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, decode_benches, batch_benches);
criterion_main!(benches);
