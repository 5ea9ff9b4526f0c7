//! A retained message acknowledged before a SUBSCRIBE reaches the new subscriber exactly once,
//! as retained, even while the router's feeder is busy with other traffic.
//!
//! The PUBACK means "durable in the ingest log"; the copy for subscribers may still be on its way
//! to the router. A SUBSCRIBE that overtook it used to get it twice: once retained and once live.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use messina_mosquitto_tests::raw::{Client, Publish, Version};
use messina_mosquitto_tests::Server;

const ROUNDS: usize = 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_message_acknowledged_before_a_subscribe_arrives_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"), "").await;
    let port = server.mqtt;

    // Background traffic through the feeder: retained messages always go to the router.
    let stop = Arc::new(AtomicBool::new(false));
    let mut noise = Vec::new();
    for n in 0..2 {
        let stop = Arc::clone(&stop);
        let mut c = Client::start(port, Version::V311, &format!("race-noise-{n}"))
            .await
            .unwrap();
        noise.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let t = format!("race/noise/{n}/{}", i % 64);
                c.publish(Publish::new(&t, &[b'n'; 512]).retain(true))
                    .await
                    .unwrap();
                i += 1;
                if i.is_multiple_of(256) {
                    tokio::task::yield_now().await;
                }
            }
        }));
    }

    let mut p = Client::start(port, Version::V311, "race-pub")
        .await
        .unwrap();
    let mut doubled = Vec::new();
    for round in 0..ROUNDS {
        let t = format!("race/kept/{round}");
        p.publish(Publish::new(&t, b"keep").qos(1).retain(true))
            .await
            .unwrap();
        let mut sub = Client::start(port, Version::V311, &format!("race-sub-{round}"))
            .await
            .unwrap();
        sub.subscribe(&t, 1).await.unwrap();
        p.publish(Publish::new(&t, b"marker").qos(1)).await.unwrap();
        let got = sub.until_marker("marker").await.unwrap();
        let texts: Vec<String> = got.iter().map(Publish::payload_str).collect();
        if texts != ["keep"] || !got[0].retain {
            doubled.push(format!(
                "round {round}: {texts:?} (retain flags {:?})",
                got.iter().map(|p| p.retain).collect::<Vec<_>>()
            ));
        }
    }
    stop.store(true, Ordering::Relaxed);
    for task in noise {
        task.await.unwrap();
    }
    assert!(
        doubled.is_empty(),
        "{} of {ROUNDS} new subscribers did not get the retained \"keep\" exactly once; the first: {:?}",
        doubled.len(),
        &doubled[..doubled.len().min(5)]
    );
}
