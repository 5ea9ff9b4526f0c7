//! A PUBACK is a promise: every message the edge acknowledged is stored exactly once, whether the
//! server is killed with SIGKILL or stopped with SIGTERM in the middle of sustained QoS 1 load.
//! Real sockets against the real binary; on the embedded store (read back over HTTP) and on a
//! real Cassandra node (read back with plain CQL).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use messina_mosquitto_tests::load::{check_device, publish, Acked};
use messina_mosquitto_tests::{all_pages, now_ms, scylla_backend_toml, wait_for, Server};
use messina_storage::scylla::test_node;

/// Publishers at once, each its own device.
const PUBLISHERS: usize = 8;
/// How long the load runs before each stop.
const LOAD: Duration = Duration::from_millis(1500);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Stop {
    Kill,
    Terminate,
}

/// Runs `rounds` rounds of load from `PUBLISHERS` devices, each ended by `how`, restarting the
/// server after each; returns what was acknowledged.
async fn load_and_stop(server: &mut Server, how: Stop, rounds: usize, t0: i64) -> Arc<Acked> {
    let acked = Arc::new(Acked::default());
    let mut next: Vec<u64> = vec![0; PUBLISHERS];
    for round in 0..rounds {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks: Vec<_> = (0..PUBLISHERS)
            .map(|i| {
                tokio::spawn(publish(
                    server.mqtt,
                    format!("dur-{i}"),
                    next[i],
                    t0,
                    Arc::clone(&acked),
                    Arc::clone(&stop),
                ))
            })
            .collect();
        tokio::time::sleep(LOAD).await;
        let before = acked.total();
        match how {
            Stop::Kill => server.kill(),
            Stop::Terminate => {
                let status = server.terminate().await;
                assert!(status.success(), "{}", server.log_text());
            }
        }
        stop.store(true, Ordering::Relaxed);
        for (i, t) in tasks.into_iter().enumerate() {
            next[i] = t.await.unwrap();
        }
        assert!(
            acked.total() > before || before > 0,
            "round {round}: no load was acknowledged"
        );
        eprintln!(
            "round {round} ({how:?}): {} acknowledged so far, {} sent",
            acked.total(),
            next.iter().sum::<u64>()
        );
        server.restart().await;
    }
    acked
}

async fn embedded(how: Stop) {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(&dir.path().join("data"), "").await;
    let t0 = now_ms() - 3_600_000;
    let acked = load_and_stop(&mut server, how, 3, t0).await;
    assert!(acked.total() > 0);
    check_stored_over_http(&server, &acked, Duration::from_secs(20)).await;
}

/// Waits, at most `within`, until each device has every reading acknowledged to it stored,
/// then checks that every acknowledged one is stored, and once (read over HTTP).
async fn check_stored_over_http(server: &Server, acked: &Acked, within: Duration) {
    for (device, seqs) in &acked.snapshot() {
        let path = format!("/v1/devices/{device}/telemetry?order=oldest");
        let stored = || async {
            all_pages(server, &path, 1000)
                .await
                .iter()
                .map(|r| r["seq"].as_u64().unwrap())
                .collect::<Vec<u64>>()
        };
        let deadline = std::time::Instant::now() + within;
        loop {
            // Every acknowledged one, not as many: stored messages that were never acknowledged
            // count too, and the bridge may still be writing acknowledged ones.
            let now: std::collections::BTreeSet<u64> = stored().await.into_iter().collect();
            let n = seqs.intersection(&now).count();
            if n == seqs.len() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{device}: {n} of {} acknowledged readings stored after {within:?}",
                seqs.len()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        check_device(device, seqs, &stored().await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_acknowledged_message_survives_kill_9_under_load() {
    embedded(Stop::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_acknowledged_message_survives_sigterm_under_load() {
    embedded(Stop::Terminate).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(messina_skip_scylla, ignore = "MESSINA_SKIP_SCYLLA_TESTS=1")]
async fn every_acknowledged_message_survives_kill_9_on_cassandra() {
    let analyst = test_node::analyst().await;
    let ks = test_node::fresh_keyspace("durability").await;
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(
        &dir.path().join("data"),
        &scylla_backend_toml(&ks, &test_node::nodes()),
    )
    .await;
    // Well inside one day, so one partition per device holds every reading.
    let t0 = (now_ms() / 86_400_000 - 1) * 86_400_000 + 3_600_000;
    let day = time::OffsetDateTime::from_unix_timestamp(t0 / 1000)
        .unwrap()
        .date();
    let acked = load_and_stop(&mut server, Stop::Kill, 2, t0).await;
    let acked = acked.snapshot();
    assert!(!acked.is_empty());
    for (device, seqs) in &acked {
        let day = day.to_string();
        let read = || async {
            test_node::telemetry_seqs(&analyst, &ks, device, &day)
                .await
                .unwrap_or_else(|e| panic!("{e}"))
        };
        // Every acknowledged one, not as many: messages stored but never acknowledged count too,
        // and replay after the kill may still be writing the acknowledged ones.
        wait_for(
            &format!("{device}: every acknowledged reading in CQL"),
            || async {
                let stored: std::collections::BTreeSet<u64> = read().await.into_iter().collect();
                seqs.is_subset(&stored)
            },
        )
        .await;
        check_device(device, seqs, &read().await);
    }
    drop(server);
    let _ = analyst
        .query_unpaged(format!("DROP KEYSPACE IF EXISTS {ks}"), ())
        .await;
}

/// Publishers far faster than storage, with an ingest log of 2 MiB: the log fills, appends wait,
/// so the edge stops reading the sockets and the publishers are slowed; every acknowledged
/// message is stored once storage catches up, and nothing is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_ingest_log_slows_publishers_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // Storage made slow: one fsynced batch per 10 rows.
    let server = Server::start(
        &dir.path().join("data"),
        "[ingest_log]\nsegment_mib = 1\nmax_mib = 2\n[bridge]\nbatch_max_rows = 10\n",
    )
    .await;
    let t0 = now_ms() - 3_600_000;
    let acked = Arc::new(Acked::default());
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..4)
        .map(|i| {
            tokio::spawn(publish(
                server.mqtt,
                format!("full-{i}"),
                0,
                t0,
                Arc::clone(&acked),
                Arc::clone(&stop),
            ))
        })
        .collect();
    wait_for("the ingest log to fill and hold back appends", || async {
        server.counter("messina_log_append_waits_total").await > 0.0
    })
    .await;
    // Held back, not refused: the connections stay open and acknowledgements keep coming as
    // storage frees the log.
    let during = acked.total();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut sent = 0;
    for t in tasks {
        sent += t.await.unwrap();
    }
    assert!(
        acked.total() > during,
        "acknowledgements stopped while the log was full"
    );
    let stored = server.counter("messina_rows_written_total").await;
    eprintln!(
        "{sent} sent, {} acknowledged, {stored} stored when the publishers stopped",
        acked.total()
    );
    check_stored_over_http(&server, &acked, Duration::from_secs(60)).await;
}
