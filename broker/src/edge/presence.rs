//! What the edge tells storage about connections, so the fleet summary knows which devices are
//! connected on every node (apart from the `online` field a device reports itself): each
//! device's connection changes on this node, coalesced and written every half second, and how
//! many devices this node has connected, reported every few seconds with a TTL so that a node
//! that dies drops out of the count.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use messina_storage::{Connection, DeviceId, Millis, Storage};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::session::Registry;
use crate::clock::now_millis;

/// How often changes are written.
const FLUSH_EVERY: Duration = Duration::from_millis(500);
/// How often this node reports its count, and how long a report holds.
const REPORT_EVERY: Duration = Duration::from_secs(5);
const REPORT_HOLDS_MS: Millis = 15_000;

/// This node's connection changes waiting to be written.
pub struct Presence {
    node: String,
    /// Devices whose connection changed, with when it last did.
    pending: Mutex<HashMap<DeviceId, Millis>>,
}

impl Presence {
    pub fn new() -> Arc<Presence> {
        Arc::new(Presence {
            node: format!("messina-{:08x}", rand::random::<u32>()),
            pending: Mutex::new(HashMap::new()),
        })
    }

    /// This process's node id, as `nodes` and `device_connections` hold it.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// A connection of `device` began or ended now.
    pub fn changed(&self, device: &DeviceId) {
        self.pending
            .lock()
            .expect("presence")
            .insert(device.clone(), now_millis());
    }

    /// Writes what changed: each device as the session registry has it now (so a takeover's
    /// old connection ending after the new one began leaves the device connected).
    async fn flush(&self, storage: &Arc<dyn Storage>, sessions: &Registry) {
        let pending = std::mem::take(&mut *self.pending.lock().expect("presence"));
        if pending.is_empty() {
            return;
        }
        let changes: Vec<Connection> = pending
            .iter()
            .map(|(device, at)| Connection {
                device: device.clone(),
                node: self.node.clone(),
                connected: sessions.is_connected(device.as_str()),
                at: *at,
            })
            .collect();
        if let Err(e) = storage.put_connections(&changes).await {
            tracing::debug!(error = %e, devices = changes.len(), "cannot record connection changes yet; retrying");
            let mut waiting = self.pending.lock().expect("presence");
            for (device, at) in pending {
                let slot = waiting.entry(device).or_insert(at);
                *slot = (*slot).max(at);
            }
        }
    }

    async fn report(&self, storage: &Arc<dyn Storage>, connected: u64, holds_ms: Millis) {
        if let Err(e) = storage.report_node(&self.node, connected, holds_ms).await {
            tracing::debug!(error = %e, "cannot report this node's connections yet");
        }
    }

    /// Writes changes and reports the count until `shutdown`.
    pub fn spawn(
        self: &Arc<Self>,
        storage: Arc<dyn Storage>,
        sessions: Arc<Registry>,
        shutdown: CancellationToken,
    ) -> JoinHandle<()> {
        let presence = Arc::clone(self);
        tokio::spawn(async move {
            let mut flush = tokio::time::interval(FLUSH_EVERY);
            let mut report = tokio::time::interval(REPORT_EVERY);
            flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = flush.tick() => presence.flush(&storage, &sessions).await,
                    _ = report.tick() => {
                        presence.report(&storage, sessions.connected_devices(), REPORT_HOLDS_MS).await;
                    }
                }
            }
        })
    }

    /// At shutdown, once the edge has stopped: the last changes (every connection ended), and
    /// a report of none that holds only a moment.
    pub async fn finish(&self, storage: &Arc<dyn Storage>, sessions: &Registry) {
        self.flush(storage, sessions).await;
        self.report(storage, 0, 1_000).await;
    }
}
