//! Cassandra stops for 60 s under sustained QoS 1 load and starts again: while it is down the
//! ingest log grows, the publishers are slowed once it is full, and memory stays bounded; once
//! it is back, every acknowledged message is stored exactly once (read back with plain CQL).
//!
//! This stops and starts the node `scripts/cassandra` runs, so it is a test binary of its own
//! (cargo runs test binaries one at a time, so no other test sees the outage). It fails when
//! the node is not one `scripts/cassandra` manages; `MESSINA_SKIP_SCYLLA_TESTS=1` compiles it as
//! ignored.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use messina_mosquitto_tests::load::{check_device, publish, Acked};
use messina_mosquitto_tests::{now_ms, scylla_backend_toml, wait_for, Server};
use messina_storage::scylla::test_node;

const OUTAGE: Duration = Duration::from_secs(60);
const PUBLISHERS: usize = 4;

fn cassandra(command: &str) -> bool {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/cassandra");
    Command::new(script)
        .arg(command)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(messina_skip_scylla, ignore = "MESSINA_SKIP_SCYLLA_TESTS=1")]
async fn every_acknowledged_message_survives_a_cassandra_outage() {
    assert!(
        cassandra("status"),
        "this test stops and starts the node, so it needs one `scripts/cassandra start` runs \
         (the node at {:?} is not); build the tests with MESSINA_SKIP_SCYLLA_TESTS=1 to skip it",
        test_node::nodes()
    );
    let analyst = test_node::analyst().await;
    let ks = test_node::fresh_keyspace("outage").await;
    let dir = tempfile::tempdir().unwrap();
    // A small log, so the outage fills it: 4 MiB is some 40,000 readings.
    let server = Server::start(
        &dir.path().join("data"),
        &format!(
            "{}request_timeout_ms = 1000\n[ingest_log]\nsegment_mib = 1\nmax_mib = 4\n",
            scylla_backend_toml(&ks, &test_node::nodes())
        ),
    )
    .await;
    let t0 = (now_ms() / 86_400_000 - 1) * 86_400_000 + 3_600_000;
    let day = time::OffsetDateTime::from_unix_timestamp(t0 / 1000)
        .unwrap()
        .date();
    let acked = Arc::new(Acked::default());
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..PUBLISHERS)
        .map(|i| {
            tokio::spawn(publish(
                server.mqtt,
                format!("outage-{i}"),
                0,
                t0,
                Arc::clone(&acked),
                Arc::clone(&stop),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_before = server.rss_mib().unwrap();
    assert!(
        tokio::task::block_in_place(|| cassandra("stop")),
        "scripts/cassandra stop failed"
    );
    let down = Instant::now();
    let acked_at_stop = acked.total();
    wait_for("the ingest log to fill while Cassandra is down", || async {
        server.counter("messina_log_append_waits_total").await > 0.0
    })
    .await;
    let full_at = acked.total();
    let mut rss_max = rss_before;
    while down.elapsed() < OUTAGE {
        rss_max = rss_max.max(server.rss_mib().unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let acked_during = acked.total();
    eprintln!(
        "outage: {acked_at_stop} acknowledged at the stop, {full_at} when the log was full, \
         {acked_during} after {OUTAGE:?}; RSS {rss_before} MiB before, at most {rss_max} MiB"
    );
    // Slowed, not just buffered: a full log holds acknowledgements back.
    assert!(
        acked_during - full_at < 5_000,
        "{} messages acknowledged after the log was full while storage was down",
        acked_during - full_at
    );
    assert!(
        rss_max < rss_before + 256,
        "RSS grew from {rss_before} MiB to {rss_max} MiB during the outage"
    );
    assert!(
        tokio::task::block_in_place(|| cassandra("start")),
        "scripts/cassandra start failed"
    );
    // Storage is back: the log drains and acknowledgements flow again.
    wait_for("acknowledgements after Cassandra is back", || async {
        acked.total() > acked_during + 1_000
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let analyst_reconnected = Instant::now();
    let acked = acked.snapshot();
    for (device, seqs) in &acked {
        let day = day.to_string();
        // The driver may still be reconnecting to the restarted node: an error is "not yet".
        let read = || async {
            test_node::telemetry_seqs(&analyst, &ks, device, &day)
                .await
                .unwrap_or_default()
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let n = read().await.len();
            if n >= seqs.len() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{device}: {n} of {} acknowledged readings in Cassandra {:?} after it came back",
                seqs.len(),
                analyst_reconnected.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        check_device(device, seqs, &read().await);
    }
    drop(server);
    let _ = analyst
        .query_unpaged(format!("DROP KEYSPACE IF EXISTS {ks}"), ())
        .await;
}
