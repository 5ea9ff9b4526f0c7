//! Sustained QoS 1 load that records what the server acknowledged, for the durability tests:
//! each publisher is one device with a window of unacknowledged messages, and every PUBACK is
//! written down so a test can check that exactly those messages were stored.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;

use crate::mp;
use crate::raw::{self, AckKind, Client, Packet, Publish, Version};

/// QoS 1 messages each publisher keeps unacknowledged.
pub const WINDOW: usize = 64;

/// What the publishers saw: per device, the sequence numbers the server acknowledged.
#[derive(Default)]
pub struct Acked(pub Mutex<HashMap<String, BTreeSet<u64>>>);

impl Acked {
    pub fn total(&self) -> usize {
        self.0.lock().unwrap().values().map(BTreeSet::len).sum()
    }

    pub fn snapshot(&self) -> HashMap<String, BTreeSet<u64>> {
        self.0.lock().unwrap().clone()
    }
}

/// Publishes QoS 1 readings `seq, seq+1, ...` (at `t0 + seq` ms) as `device` until `stop`, or
/// until the server goes away, recording each PUBACK; returns the next unused sequence number.
pub async fn publish(
    port: u16,
    device: String,
    mut seq: u64,
    t0: i64,
    acked: Arc<Acked>,
    stop: Arc<AtomicBool>,
) -> u64 {
    let Ok(mut c) = Client::start(port, Version::V311, &device).await else {
        return seq;
    };
    let topic = format!("devices/{device}/telemetry");
    let mut in_flight: HashMap<u16, u64> = HashMap::new();
    loop {
        while in_flight.len() < WINDOW && !stop.load(Ordering::Relaxed) {
            let pkid = c.pkid();
            let payload = mp(&json!({"ts": t0 + seq as i64, "seq": seq, "battery": 50}));
            let packet = Publish::new(&topic, &payload).qos(1).pkid(pkid);
            if c.send(&packet.encode(Version::V311)).await.is_err() {
                return seq;
            }
            in_flight.insert(pkid, seq);
            seq += 1;
        }
        if in_flight.is_empty() {
            let _ = c.send(&raw::disconnect(Version::V311, 0)).await;
            return seq;
        }
        // Long enough to ride out a full ingest log.
        match c.recv(Duration::from_secs(120)).await {
            Ok(Packet::Ack {
                kind: AckKind::PubAck,
                pkid,
                ..
            }) => {
                if let Some(s) = in_flight.remove(&pkid) {
                    acked
                        .0
                        .lock()
                        .unwrap()
                        .entry(device.clone())
                        .or_default()
                        .insert(s);
                }
            }
            Ok(_) => {}
            // Killed or stopped: what is still in flight was never promised.
            Err(_) => return seq,
        }
    }
}

/// Checks that every acknowledged sequence number is among `stored` and that `stored` holds
/// each at most once.
pub fn check_device(device: &str, acked: &BTreeSet<u64>, stored: &[u64]) {
    let unique: BTreeSet<u64> = stored.iter().copied().collect();
    assert_eq!(
        unique.len(),
        stored.len(),
        "{device}: a message stored twice"
    );
    let missing: Vec<&u64> = acked.difference(&unique).collect();
    assert!(
        missing.is_empty(),
        "{device}: {} acknowledged messages not stored, first {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
}
