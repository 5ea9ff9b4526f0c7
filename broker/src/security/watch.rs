//! Every node follows the registry's recent changes, so a device revoked or given a new
//! credential anywhere else (another node sharing the registry, `messina devices` on the
//! command line) loses its live connections here within `mqtt.registry_poll_secs`.
//!
//! Each poll reads the changes since the last one, less an overlap for writers whose clocks
//! lag or whose writes became visible late, and skips the changes it already applied. Only
//! devices connected to this node cost a registry read.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use messina_storage::{DeviceId, DeviceStatus, Millis, Storage};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::Authenticator;
use crate::clock::now_millis;
use crate::edge::session::Registry;

/// How far before the last poll each poll reads again.
const OVERLAP_MS: Millis = 10_000;
/// Changes read per query.
const PAGE: usize = 1_000;

/// Follows the registry every `every` until `shutdown`.
pub fn spawn(
    storage: Arc<dyn Storage>,
    sessions: Arc<Registry>,
    auth: Arc<Authenticator>,
    every: Duration,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut watch = Watch {
            storage,
            sessions,
            auth,
            since: now_millis(),
            applied: HashSet::new(),
            failing: false,
        };
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => watch.poll().await,
            }
        }
    })
}

struct Watch {
    storage: Arc<dyn Storage>,
    sessions: Arc<Registry>,
    auth: Arc<Authenticator>,
    /// When the last successful poll started.
    since: Millis,
    /// Changes applied within the overlap, by (time, device).
    applied: HashSet<(Millis, DeviceId)>,
    /// Whether the last poll failed (logged once per outage).
    failing: bool,
}

impl Watch {
    async fn poll(&mut self) {
        let started = now_millis();
        match self.apply_since(self.since - OVERLAP_MS).await {
            Ok(()) => {
                if self.failing {
                    tracing::info!("reading the registry's changes again");
                }
                self.failing = false;
                self.since = started;
                let oldest = started - 2 * OVERLAP_MS;
                self.applied.retain(|(at, _)| *at >= oldest);
            }
            Err(e) => {
                if !self.failing {
                    tracing::warn!(error = %e, "cannot read the registry's changes; revocations and rotations made elsewhere wait until it can be read (new connections are still checked)");
                }
                self.failing = true;
            }
        }
    }

    async fn apply_since(&mut self, from: Millis) -> messina_storage::Result<()> {
        let mut cursor = from;
        let mut live: Option<HashSet<String>> = None;
        loop {
            let page = self.storage.registry_changes(cursor, PAGE).await?;
            for change in &page {
                let key = (change.at, change.device.clone());
                if self.applied.contains(&key) {
                    continue;
                }
                let live = live.get_or_insert_with(|| self.sessions.live_identities());
                if live.contains(change.device.as_str()) {
                    self.apply(&change.device).await?;
                }
                self.applied.insert(key);
            }
            match page.last() {
                // More than a page in one millisecond: the rest waits for the next poll.
                Some(last) if page.len() == PAGE && last.at > cursor => cursor = last.at,
                _ => return Ok(()),
            }
        }
    }

    /// Ends what the device's current record no longer allows.
    async fn apply(&self, id: &DeviceId) -> messina_storage::Result<()> {
        let (ended, why) = match self.storage.registered_device(id).await? {
            Some(d) if d.status == DeviceStatus::Active => (
                self.sessions.end_stale(id.as_str(), &d.credential),
                "rotated",
            ),
            _ => (self.sessions.revoke(id.as_str()), "revoked"),
        };
        self.auth.forget(id);
        if ended > 0 {
            tracing::info!(device = %id, connections = ended, "disconnected: the device was {why} elsewhere");
        }
        Ok(())
    }
}
