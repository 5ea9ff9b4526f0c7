//! Restart cost of the alert engine: a fleet of N devices, each heard from a few times (battery,
//! RSSI and two sensor metrics, so each has anomaly windows; one device in ten with a low battery,
//! so an active alert; a sync failure each, so a streak), stored in the embedded backend through
//! the same `write_batch` the bridge uses, with the alert service's saved rule state. Then the
//! store is reopened, as after a restart, and `AlertService::start` is timed: it reads the active
//! alerts and every device's saved state once. The peer, measured in the same run on a copy of the
//! fleet without saved state: the start of a store written before rule state was saved, which
//! pages through the fleet's latest state for last-seen times (what every start did before).
//! Two fleet sizes show whether the cost per device stays flat.
//!
//! `cargo run --release -p messina-benches --bin alert-restore -- [devices]`

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use messina_bridge::alerts::{AlertService, Rules};
use messina_config::AlertsConfig;
use messina_storage::embedded::EmbeddedOptions;
use messina_storage::{AttrValue, Batch, DeviceId, EmbeddedStorage, Event, Reading, Storage};

const READINGS_PER_DEVICE: i64 = 4;
const DEVICES_PER_BATCH: usize = 2_000;
const T0: i64 = 1_780_000_000_000;

fn open(dir: &Path) -> Arc<dyn Storage> {
    Arc::new(EmbeddedStorage::open(&EmbeddedOptions::new(dir)).expect("embedded storage"))
}

/// Closes the store once the alert service's committer has let go of it, so it can be reopened.
async fn close(storage: Arc<dyn Storage>) {
    storage.close().await.expect("close");
    while Arc::strong_count(&storage) > 1 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

fn fleet_batch(devices: std::ops::Range<usize>) -> Batch {
    let mut batch = Batch::default();
    for i in devices {
        let device = DeviceId::new(format!("restore-{i:07}")).unwrap();
        for s in 0..READINGS_PER_DEVICE {
            let at = T0 + s * 10_000;
            batch.readings.push(Reading {
                device: device.clone(),
                ts: at,
                seq: s as u64,
                received_at: at,
                battery: Some(if i % 10 == 0 { 5.0 } else { 80.0 - s as f64 }),
                rssi: Some(-60 - s as i32),
                online: Some(true),
                metrics: BTreeMap::from([
                    (
                        "temp_c".to_string(),
                        20.0 + (i % 7) as f64 + s as f64 / 10.0,
                    ),
                    (
                        "humidity".to_string(),
                        40.0 + (i % 5) as f64 - s as f64 / 10.0,
                    ),
                ]),
                attrs: BTreeMap::new(),
            });
        }
        let at = T0 + READINGS_PER_DEVICE * 10_000;
        batch.events.push(Event {
            device,
            ts: at,
            seq: READINGS_PER_DEVICE as u64,
            received_at: at,
            kind: "sync".into(),
            attrs: BTreeMap::from([("errors".to_string(), AttrValue::Int(1))]),
        });
    }
    batch
}

/// An alert service over `storage` whose notices are read and dropped.
async fn start(storage: &Arc<dyn Storage>, rules: &Rules) -> Arc<AlertService> {
    let (notices, mut drain) = tokio::sync::mpsc::channel(1024);
    tokio::spawn(async move { while drain.recv().await.is_some() {} });
    AlertService::start(rules.clone(), storage.clone(), notices, Arc::new(|_| {}))
        .await
        .expect("alert service starts")
}

/// Times `AlertService::start` on the store in `dir`, reopened; returns seconds.
async fn restart(dir: &Path, rules: &Rules) -> f64 {
    let storage = open(dir);
    let started = Instant::now();
    let service = start(&storage, rules).await;
    let took = started.elapsed().as_secs_f64();
    drop(service);
    close(storage).await;
    took
}

/// One fleet of `n` devices in `root/{saved,peer}`; prints and returns (saved, peer) seconds.
async fn measure(root: &Path, n: usize, rules: &Rules) -> (f64, f64) {
    let (saved_dir, peer_dir) = (
        root.join(format!("saved-{n}")),
        root.join(format!("peer-{n}")),
    );
    let (saved, peer) = (open(&saved_dir), open(&peer_dir));
    let service = start(&saved, rules).await;
    eprintln!("writing {n} devices ({READINGS_PER_DEVICE} readings and a failed sync each)...");
    let started = Instant::now();
    for from in (0..n).step_by(DEVICES_PER_BATCH) {
        let batch = fleet_batch(from..(from + DEVICES_PER_BATCH).min(n));
        saved.write_batch(&batch).await.expect("write");
        peer.write_batch(&batch).await.expect("write");
        service.on_batch(&batch, None).await;
    }
    service.flush().await;
    drop(service);
    let saved_states = saved.alert_states().await.expect("alert states").len();
    assert_eq!(saved_states, n, "every device's rule state is saved");
    close(saved).await;
    close(peer).await;
    eprintln!("  written in {:.1} s", started.elapsed().as_secs_f64());

    let saved = restart(&saved_dir, rules).await;
    let peer = restart(&peer_dir, rules).await;
    println!(
        "{n:>9} devices: restore from saved state {:>7.3} s ({:>5.1} µs/device)   peer, last-seen from the fleet pages {:>7.3} s ({:>5.1} µs/device)   ratio {:.2}",
        saved,
        saved * 1e6 / n as f64,
        peer,
        peer * 1e6 / n as f64,
        peer / saved
    );
    (saved, peer)
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("devices: a number"))
        .unwrap_or(100_000);
    let root = std::env::temp_dir().join(format!("messina-alert-restore-{}", std::process::id()));
    let rules = Rules::from_config(&AlertsConfig::default());
    let small = measure(&root, (n / 10).max(1), &rules).await;
    let large = measure(&root, n, &rules).await;
    println!(
        "10x the devices: restore from saved state takes {:.1}x as long, the peer {:.1}x (linear = 10x)",
        large.0 / small.0,
        large.1 / small.1
    );
    let _ = std::fs::remove_dir_all(&root);
}
