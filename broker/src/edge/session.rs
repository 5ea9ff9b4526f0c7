//! MQTT sessions: what outlives a connection (subscriptions, messages in flight each way, the
//! subscriber link), and the registry that hands a session from one connection to the next.
//!
//! A client id has at most one slot: a live connection, or a parked session waiting for its
//! client to come back until its Session Expiry Interval runs out. A parked session keeps its
//! subscriber link open without reading it, so the router buffers what arrives meanwhile (and
//! holds it back from the router's own per-filter log once that buffer fills). Wills wait here
//! too: published when their delay or the session ends, whichever comes first, unless the client
//! resumes the session before.

use std::collections::{HashMap, HashSet, VecDeque};
use std::num::{NonZeroU16, NonZeroU32};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use messina_storage::Credential;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{Filter, Packet, RetainForwardRule, Subscribe, SubscribeProperties};
use tokio::sync::{mpsc, oneshot};

use super::codec::{Publish, SubscriptionOptions, Will};
use super::router::{complete, Router};

/// One subscription of a session.
#[derive(Debug, Clone)]
pub struct Subscription {
    pub options: SubscriptionOptions,
    /// The client's own Subscription Identifier (MQTT 5), put on what it receives.
    pub id: Option<NonZeroU32>,
    /// The identifier the router knows this subscription by.
    pub internal: usize,
    /// The filter as given to the router (a shared group renamed per filter).
    pub routed: String,
    /// The filter without a `$share/{group}/` prefix, as the interest index holds it.
    pub matching: String,
    /// Whether the router knows it (filters starting with `$` other than `$share` are granted
    /// but never routed: no Messina topic starts with `$`, and rumqttd refuses them).
    pub routed_to_router: bool,
}

/// A message sent to the client and not yet acknowledged.
#[derive(Debug, Clone)]
pub enum InFlight {
    /// Sent, waiting for PUBACK (QoS 1) or PUBREC (QoS 2); re-sent with DUP on resume.
    Publish(Box<Publish>),
    /// PUBREL sent, waiting for PUBCOMP; PUBREL re-sent on resume.
    Released,
}

/// Everything of a session that survives its connection.
pub struct Session {
    pub client_id: String,
    /// Unique per session in this process: the origin mark that No Local compares.
    pub number: u64,
    /// Subscriptions by the filter the client gave.
    pub subscriptions: HashMap<String, Subscription>,
    /// Internal identifier → the client's filter.
    pub by_internal: HashMap<usize, String>,
    next_internal: usize,
    /// The subscriber link, made at the first SUBSCRIBE.
    pub link: Option<(LinkTx, LinkRx)>,
    /// Outbound QoS 1/2 messages in flight, in the order sent.
    pub in_flight: VecDeque<(NonZeroU16, InFlight)>,
    /// Outbound QoS 1/2 messages waiting for a free slot of the client's Receive Maximum.
    pub queued: VecDeque<Publish>,
    next_packet_id: u16,
    /// Inbound QoS 2 packet ids whose PUBREC went out (or is due) and whose PUBREL has not come.
    pub inbound_qos2: HashSet<NonZeroU16>,
    router: Arc<Router>,
}

static SESSIONS: AtomicU64 = AtomicU64::new(1);

impl Session {
    pub fn new(client_id: String, router: Arc<Router>) -> Session {
        Session {
            client_id,
            number: SESSIONS.fetch_add(1, Ordering::Relaxed),
            subscriptions: HashMap::new(),
            by_internal: HashMap::new(),
            next_internal: 1,
            link: None,
            in_flight: VecDeque::new(),
            queued: VecDeque::new(),
            next_packet_id: 0,
            inbound_qos2: HashSet::new(),
            router,
        }
    }

    /// A packet id not in flight; `None` when all 65,535 are (never, with a sane Receive Maximum).
    pub fn packet_id(&mut self) -> Option<NonZeroU16> {
        for _ in 0..u16::MAX {
            self.next_packet_id = self.next_packet_id.wrapping_add(1).max(1);
            let id = NonZeroU16::new(self.next_packet_id)?;
            if !self.in_flight.iter().any(|(p, _)| *p == id) {
                return Some(id);
            }
        }
        None
    }

    /// Adds or replaces a subscription; tells the router when it is new, or when the client asks
    /// for the retained messages again (Retain Handling 0 on a repeated SUBSCRIBE).
    pub fn subscribe(
        &mut self,
        filter: &str,
        options: SubscriptionOptions,
        id: Option<NonZeroU32>,
    ) -> anyhow::Result<()> {
        let existing = self.subscriptions.get(filter).cloned();
        let internal = match &existing {
            Some(s) => s.internal,
            None => {
                let n = self.next_internal;
                self.next_internal += 1;
                n
            }
        };
        let (matching, routed) = match filter.strip_prefix("$share/") {
            Some(rest) => {
                let (group, f) = rest.split_once('/').unwrap_or((rest, ""));
                // rumqttd keys shared groups by name alone; one group per (name, filter).
                (f.to_string(), format!("$share/{group}~{:x}/{f}", fnv(f)))
            }
            None => (filter.to_string(), filter.to_string()),
        };
        let routed_to_router = !filter.starts_with('$') || filter.starts_with("$share/");
        let sub = Subscription {
            options,
            id,
            internal,
            routed: routed.clone(),
            matching: matching.clone(),
            routed_to_router,
        };
        self.subscriptions.insert(filter.to_string(), sub);
        self.by_internal.insert(internal, filter.to_string());
        if !routed_to_router {
            return Ok(());
        }
        let resend_retained =
            options.retain_handling == super::codec::RetainHandling::SendAtSubscribe;
        let Some((tx, _)) = self.link.as_mut() else {
            return Ok(());
        };
        match existing {
            None => {
                self.router.interest.add(&matching);
                router_subscribe(tx, &routed, internal)?;
            }
            Some(_) if resend_retained => {
                // The router sends retained messages only for a filter new to the link.
                router_unsubscribe(tx, &routed)?;
                router_subscribe(tx, &routed, internal)?;
            }
            Some(_) => {}
        }
        Ok(())
    }

    /// Removes a subscription; false when there was none.
    pub fn unsubscribe(&mut self, filter: &str) -> anyhow::Result<bool> {
        let Some(sub) = self.subscriptions.remove(filter) else {
            return Ok(false);
        };
        self.by_internal.remove(&sub.internal);
        if sub.routed_to_router {
            self.router.interest.remove(&sub.matching);
            if let Some((tx, _)) = self.link.as_mut() {
                router_unsubscribe(tx, &sub.routed)?;
            }
        }
        Ok(true)
    }
}

impl Drop for Session {
    // The session ends: its subscriptions leave the interest index and the router.
    fn drop(&mut self) {
        for sub in self.subscriptions.values() {
            if sub.routed_to_router {
                self.router.interest.remove(&sub.matching);
            }
        }
        if let Some((mut tx, _rx)) = self.link.take() {
            let disconnect = rumqttd::protocol::Disconnect {
                reason_code: rumqttd::protocol::DisconnectReasonCode::NormalDisconnection,
            };
            let _ = complete(tx.send(Packet::Disconnect(disconnect, None)));
        }
    }
}

fn router_subscribe(tx: &mut LinkTx, filter: &str, internal: usize) -> anyhow::Result<()> {
    let subscribe = Subscribe {
        pkid: 1,
        filters: vec![Filter {
            path: filter.to_string(),
            // The edge delivers at the right QoS itself; the router's own QoS would need
            // in-order acks with packet ids it keeps private.
            qos: rumqttd::protocol::QoS::AtMostOnce,
            nolocal: false,
            preserve_retain: false,
            retain_forward_rule: RetainForwardRule::OnEverySubscribe,
        }],
    };
    let properties = SubscribeProperties {
        id: Some(internal),
        user_properties: Vec::new(),
    };
    complete(tx.send(Packet::Subscribe(subscribe, Some(properties))))
        .map(|_| ())
        .map_err(|e| anyhow::anyhow!("subscribing on the router: {e}"))
}

fn router_unsubscribe(tx: &mut LinkTx, filter: &str) -> anyhow::Result<()> {
    tx.unsubscribe(filter)
        .map(|_| ())
        .map_err(|e| anyhow::anyhow!("unsubscribing on the router: {e}"))
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A will waiting for its delay.
pub struct PendingWill {
    /// `true`: publish now (the session ended); `false` or dropped: the session resumed.
    pub fire: oneshot::Sender<bool>,
}

/// Asks a live connection to end.
pub enum Kick {
    /// A new connection with the same client id (and identity) takes the session over. The old
    /// connection answers with its session (when it outlives the connection) and its will
    /// (which the new connection publishes unless it resumes the session and the will has a
    /// delay).
    TakeOver {
        reply: oneshot::Sender<(Option<Session>, Option<Will>)>,
    },
    /// The identity was revoked: the connection ends with "not authorized" and its session.
    Revoke,
    /// The identity's credential changed (rotated): the connection ends with "not authorized";
    /// its session stays, for the device to resume with its new credential.
    CredentialChanged,
}

enum Slot {
    Live {
        epoch: u64,
        kick: mpsc::Sender<Kick>,
        /// The registry credential the connection authenticated with (`None`: anonymous).
        credential: Option<Credential>,
    },
    Parked {
        epoch: u64,
        session: Box<Session>,
        will: Option<PendingWill>,
    },
}

/// What a new connection gets from [`Registry::claim`].
pub struct Claim {
    pub epoch: u64,
    /// The session to resume, with Session Present 1.
    pub session: Option<Session>,
    /// Where a later connection with the same id asks for the session.
    pub kicks: mpsc::Receiver<Kick>,
    /// A will the previous connection left that must be published now.
    pub will_to_publish: Option<Will>,
}

/// Every session by its key: the client id, with the identity it authenticated as (see
/// [`crate::security::session_key`]).
#[derive(Default)]
pub struct Registry {
    slots: Mutex<HashMap<String, Slot>>,
    epochs: AtomicU64,
}

impl Registry {
    /// Takes the client id for a new connection that authenticated with `credential`: takes
    /// over a live one (which gets DISCONNECT 0x8E), resumes a parked session unless
    /// `clean_start`, or starts afresh.
    pub async fn claim(
        &self,
        client_id: &str,
        clean_start: bool,
        credential: Option<Credential>,
    ) -> Claim {
        let epoch = self.epochs.fetch_add(1, Ordering::Relaxed) + 1;
        let (kick_tx, kicks) = mpsc::channel(1);
        let previous = {
            let mut slots = self.slots.lock().expect("session registry");
            slots.insert(
                client_id.to_string(),
                Slot::Live {
                    epoch,
                    kick: kick_tx,
                    credential,
                },
            )
        };
        let (session, will) = match previous {
            None => (None, None),
            Some(Slot::Parked { session, will, .. }) => {
                if let Some(w) = will {
                    // Resuming the session cancels its delayed will; a clean start ends the
                    // session, which publishes it now.
                    let _ = w.fire.send(clean_start);
                }
                (Some(*session), None)
            }
            Some(Slot::Live { kick, .. }) => {
                let (reply, answer) = oneshot::channel();
                if kick.send(Kick::TakeOver { reply }).await.is_ok() {
                    match tokio::time::timeout(Duration::from_secs(10), answer).await {
                        Ok(Ok((session, will))) => (session, will),
                        _ => (None, None),
                    }
                } else {
                    (None, None)
                }
            }
        };
        let (session, will_to_publish) = if clean_start {
            (None, will)
        } else {
            // A will with a delay is cancelled by resuming; one without was published by the
            // old connection already (it is only handed over when it has a delay).
            (session, None)
        };
        Claim {
            epoch,
            session,
            kicks,
            will_to_publish,
        }
    }

    /// Gives a session back when its connection ends. A session with an expiry interval is
    /// parked until it runs out (`on_expiry` then runs); `will` (already delayed by the caller
    /// when it has no delay) waits as long as the session or its delay. Nothing happens when a
    /// newer connection has the id already (the session went to it through a [`Kick`]).
    pub fn release(
        self: &Arc<Self>,
        client_id: &str,
        epoch: u64,
        session: Session,
        expiry: Duration,
        will: Option<PendingWill>,
    ) {
        let mut slots = self.slots.lock().expect("session registry");
        match slots.get(client_id) {
            Some(Slot::Live { epoch: e, .. }) if *e == epoch => {}
            _ => return,
        }
        if expiry.is_zero() {
            slots.remove(client_id);
            if let Some(w) = will {
                let _ = w.fire.send(true);
            }
            drop(slots);
            drop(session);
            return;
        }
        slots.insert(
            client_id.to_string(),
            Slot::Parked {
                epoch,
                session: Box::new(session),
                will,
            },
        );
        drop(slots);
        let (registry, client_id) = (Arc::clone(self), client_id.to_string());
        tokio::spawn(async move {
            tokio::time::sleep(expiry).await;
            let expired = {
                let mut slots = registry.slots.lock().expect("session registry");
                match slots.get(&client_id) {
                    Some(Slot::Parked { epoch: e, .. }) if *e == epoch => slots.remove(&client_id),
                    _ => None,
                }
            };
            if let Some(Slot::Parked { will, session, .. }) = expired {
                tracing::debug!(client_id, "session expired");
                if let Some(w) = will {
                    let _ = w.fire.send(true);
                }
                drop(session);
            }
        });
    }

    /// Ends every connection and session of `identity` (whose key starts with it, see
    /// [`crate::security::session_key`]): live connections get [`Kick::Revoke`], parked
    /// sessions are dropped with their pending wills. Returns how many live connections were
    /// asked to end.
    pub fn revoke(&self, identity: &str) -> usize {
        self.kick_live(identity, || Kick::Revoke, true, |_| true)
    }

    /// Ends the live connections of `identity` that authenticated with another credential than
    /// `current` (it was rotated) with [`Kick::CredentialChanged`]; their sessions stay. Returns
    /// how many were asked to end.
    pub fn end_stale(&self, identity: &str, current: &Credential) -> usize {
        self.kick_live(
            identity,
            || Kick::CredentialChanged,
            false,
            |c| c.is_some_and(|c| c != current),
        )
    }

    /// Whether `device` has a live connection here, authenticated as itself or anonymous with
    /// its id as client id.
    pub fn is_connected(&self, device: &str) -> bool {
        let slots = self.slots.lock().expect("session registry");
        [Some(device), None].into_iter().any(|identity| {
            matches!(
                slots.get(&crate::security::session_key(identity, device)),
                Some(Slot::Live { .. })
            )
        })
    }

    /// Devices with a live connection here (a device's client id is its id).
    pub fn connected_devices(&self) -> u64 {
        let slots = self.slots.lock().expect("session registry");
        slots
            .iter()
            .filter(|(_, slot)| matches!(slot, Slot::Live { .. }))
            .filter(|(key, _)| {
                key.split_once('\0').is_some_and(|(identity, client)| {
                    identity == client
                        || (identity.is_empty() && messina_storage::DeviceId::new(client).is_ok())
                })
            })
            .count() as u64
    }

    /// The identities with a live connection here.
    pub fn live_identities(&self) -> HashSet<String> {
        let slots = self.slots.lock().expect("session registry");
        slots
            .iter()
            .filter(|(_, slot)| matches!(slot, Slot::Live { .. }))
            .filter_map(|(key, _)| key.split_once('\0').map(|(id, _)| id.to_string()))
            .filter(|id| !id.is_empty())
            .collect()
    }

    fn kick_live(
        &self,
        identity: &str,
        kick: fn() -> Kick,
        drop_parked: bool,
        stale: impl Fn(Option<&Credential>) -> bool,
    ) -> usize {
        let prefix = format!("{identity}\0");
        let mut kicks = Vec::new();
        {
            let mut slots = self.slots.lock().expect("session registry");
            slots.retain(|key, slot| {
                if !key.starts_with(&prefix) {
                    return true;
                }
                match slot {
                    Slot::Live {
                        kick, credential, ..
                    } => {
                        if stale(credential.as_ref()) {
                            kicks.push(kick.clone());
                        }
                        true
                    }
                    Slot::Parked { .. } => !drop_parked,
                }
            });
        }
        kicks
            .into_iter()
            .filter(|k| k.try_send(kick()).is_ok())
            .count()
    }
}
