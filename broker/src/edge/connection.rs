//! One MQTT connection, as one task: CONNECT (with its timeout and the authentication hook),
//! then a loop over the socket, the ingest log's durable watermark, the session's subscriber
//! link, keep-alive, takeover and shutdown.
//!
//! The promise kept here: a QoS 1 PUBACK or QoS 2 PUBREC goes out only once the ingest log holds
//! the message durably, and acknowledgements go out in the order the messages came. While the
//! acknowledgements owed reach the Receive Maximum, or while the log is full, the socket is not
//! read, so TCP slows the client down; nothing is dropped.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::sync::Arc;
use std::time::Duration;

use bytestring::ByteString;
use futures::{SinkExt, StreamExt};
use messina_log::LogError;
use rumqttd::protocol::PublishProperties as RouterProperties;
use rumqttd::{Forward, Notification};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::codec::Framed;

use super::codec::{
    Ack, CodecError, ConnAck, Disconnect, EdgeCodec, Frame, ProtocolVersion, Publish,
    PublishProperties, QoS, ReasonCode, RetainHandling, SubAck, UnsubAck, Will,
};
use super::router::Tag;
use super::session::{InFlight, Kick, PendingWill, Session};
use super::Shared;
use crate::security::acl::Acl;
use crate::security::session_key;
use crate::tls::PeerCertificate;
use messina_storage::{DeviceId, Role};

/// How long shutdown and takeover wait for the log to make owed acknowledgements durable.
const ACK_DRAIN: Duration = Duration::from_secs(10);

/// A client's byte stream: TCP, or TLS over TCP.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Io for T {}

type Stream = Framed<Box<dyn Io>, EdgeCodec>;

/// Why the established loop ended.
enum End {
    /// DISCONNECT from the client; `keep_will` for reason 0x04.
    Disconnected { keep_will: bool },
    /// The socket closed or failed, or the client broke the protocol, or keep-alive ran out:
    /// the will is published.
    Lost,
    /// A new connection took the client id.
    TakenOver(oneshot::Sender<(Option<Session>, Option<Will>)>),
    /// The identity was revoked: no will, no session kept.
    Revoked,
    /// The identity's credential was rotated: the will is published, the session kept.
    CredentialChanged,
    /// The server is stopping.
    Shutdown,
}

/// Whether a new connection may proceed past its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Admitted,
    /// `mqtt.max_connections` reached: CONNACK "server busy".
    Busy,
    /// Its source address connects faster than `mqtt.max_connect_rate_per_ip`: CONNACK
    /// "connection rate exceeded".
    RateExceeded,
}

/// Serves one accepted socket to its end. `certificate` is the client certificate a TLS
/// listener verified.
pub async fn run(
    shared: Arc<Shared>,
    stream: Box<dyn Io>,
    peer: SocketAddr,
    admission: Admission,
    certificate: Option<PeerCertificate>,
) {
    let mut framed = Framed::new(stream, EdgeCodec::new(shared.settings.max_packet()));
    let first = tokio::select! {
        _ = shared.shutdown.cancelled() => return,
        first = tokio::time::timeout(shared.settings.connect_timeout, framed.next()) => first,
    };
    let connect = match first {
        Err(_) => {
            tracing::debug!(%peer, "no CONNECT within mqtt.connect_timeout_ms; closed");
            return;
        }
        Ok(None) => return,
        Ok(Some(Err(e))) => {
            tracing::debug!(%peer, error = %e, "refused a bad CONNECT");
            if let Some(reply) = e.reply() {
                let _ = framed.send(reply).await;
            }
            return;
        }
        Ok(Some(Ok(Frame::Connect(connect)))) => connect,
        // The codec lets nothing but CONNECT through first.
        Ok(Some(Ok(_))) => return,
    };
    let refuse = |reason| Frame::ConnAck(Box::new(ConnAck::refused(reason)));
    match admission {
        Admission::Admitted => {}
        Admission::Busy => {
            tracing::warn!(%peer, "connection refused: mqtt.max_connections reached");
            let _ = framed.send(refuse(ReasonCode::ServerBusy)).await;
            return;
        }
        Admission::RateExceeded => {
            shared.refused.rate.increment(1);
            tracing::debug!(%peer, "connection refused: over mqtt.max_connect_rate_per_ip");
            let _ = framed
                .send(refuse(ReasonCode::ConnectionRateExceeded))
                .await;
            return;
        }
    }
    if connect.authentication_method.is_some() {
        let _ = framed
            .send(refuse(ReasonCode::BadAuthenticationMethod))
            .await;
        return;
    }
    let principal = match shared
        .auth
        .authenticate(&connect, peer, certificate.as_ref())
        .await
    {
        Ok(p) => p,
        Err(reason) => {
            shared.refused.connect.increment(1);
            tracing::info!(%peer, client_id = %connect.client_id, username = connect.username.as_deref().unwrap_or(""), ?reason, "connection refused by authentication");
            let _ = framed.send(refuse(reason)).await;
            return;
        }
    };
    let acl = Acl::new(&principal);
    if let Some(will) = connect.will.as_ref().filter(|w| !acl.may_will(&w.topic)) {
        shared.refused.will.increment(1);
        tracing::info!(%peer, client_id = %connect.client_id, device = ?principal.device, topic = %will.topic, "connection refused: the will's topic is not the client's to publish");
        let _ = framed.send(refuse(ReasonCode::NotAuthorized)).await;
        return;
    }
    let v5 = connect.version == ProtocolVersion::V5;
    let (client_id, assigned) = if connect.client_id.is_empty() {
        match principal
            .identity
            .as_ref()
            .filter(|_| principal.role == Role::Device)
        {
            // A device's client id is its device id.
            Some(id) => (
                id.as_str().to_string(),
                v5.then(|| ByteString::from(id.as_str())),
            ),
            None => {
                // The codec refuses an empty id without clean start on 3.1.1.
                let id = format!("messina-{:016x}", rand::random::<u64>());
                (id.clone(), v5.then(|| ByteString::from(id)))
            }
        }
    } else {
        (connect.client_id.to_string(), None)
    };
    let key = session_key(principal.identity.as_ref().map(|i| i.as_str()), &client_id);
    let max_expiry = shared.settings.max_session_expiry;
    let asked = if v5 {
        Duration::from_secs(u64::from(connect.session_expiry_interval))
    } else if connect.clean_start {
        Duration::ZERO
    } else {
        max_expiry
    };
    let expiry = asked.min(max_expiry);

    let claim = shared
        .sessions
        .claim(&key, connect.clean_start, principal.credential.clone())
        .await;
    if let Some(will) = claim.will_to_publish {
        publish_will(&shared, will).await;
    }
    let present = claim.session.is_some();
    let session = claim
        .session
        .unwrap_or_else(|| Session::new(client_id.clone(), Arc::clone(&shared.router)));

    let mut ack = ConnAck::accepted(present);
    if v5 {
        ack.receive_maximum = shared.settings.max_inflight;
        ack.maximum_packet_size = Some(shared.settings.max_packet());
        ack.topic_alias_maximum = shared.settings.topic_alias_max;
        ack.assigned_client_identifier = assigned;
        if asked > max_expiry {
            ack.session_expiry_interval =
                Some(max_expiry.as_secs().min(u64::from(u32::MAX)) as u32);
        }
    }
    if framed.send(Frame::ConnAck(Box::new(ack))).await.is_err() {
        shared
            .sessions
            .release(&key, claim.epoch, session, expiry, None);
        return;
    }
    tracing::debug!(%peer, client_id, version = ?connect.version, present, "client connected");

    let mut conn = Connection {
        shared: Arc::clone(&shared),
        v5,
        keep_alive: connect.keep_alive,
        client_receive_maximum: connect.receive_maximum.max(1),
        connect_expiry_zero: v5 && connect.session_expiry_interval == 0,
        expiry,
        will: connect.will.clone(),
        session,
        owed: VecDeque::new(),
        last_need: 0,
        subacks_owed: 0,
        aliases: HashMap::new(),
        interest_cache: None,
        acl,
        device: principal.device,
        refusals: 0,
        publish_rate: crate::limit::Bucket::new(
            shared.settings.publish_rate.0,
            shared.settings.publish_rate.1,
        ),
        paused_until: None,
        framed,
    };
    let device = conn.device.clone();
    if let Some(d) = &device {
        shared.presence.changed(d);
    }
    let end = conn.established(claim.kicks).await;
    conn.finish(end, &key, claim.epoch).await;
    if let Some(d) = &device {
        shared.presence.changed(d);
    }
}

struct Connection {
    shared: Arc<Shared>,
    framed: Stream,
    v5: bool,
    keep_alive: u16,
    client_receive_maximum: u16,
    /// MQTT-3.14.2-2: a session that began with expiry 0 cannot get one at DISCONNECT.
    connect_expiry_zero: bool,
    expiry: Duration,
    will: Option<Will>,
    session: Session,
    /// Acknowledgements owed, each with the log position that must be durable first.
    owed: VecDeque<(Frame, u64)>,
    last_need: u64,
    /// SUBACKs among `owed`: while one is owed the link is not read, so that retained messages
    /// never overtake the SUBACK of their subscription.
    subacks_owed: usize,
    /// Inbound topic aliases (MQTT 5).
    aliases: HashMap<u16, ByteString>,
    /// The last topic asked of the interest index: (topic, index version, answer).
    interest_cache: Option<(ByteString, u64, bool)>,
    /// What this client may publish and subscribe to.
    acl: Acl,
    /// The device it speaks for, for the log.
    device: Option<DeviceId>,
    /// Publishes and subscriptions refused so far (the first is logged at INFO, the rest at
    /// DEBUG, so a client that keeps trying does not flood the log; all are counted).
    refusals: u64,
    /// Publishes this connection may still send (`mqtt.max_publish_rate`).
    publish_rate: Option<crate::limit::Bucket>,
    /// A 3.1.1 client over its rate: its socket is not read until then.
    paused_until: Option<Instant>,
}

impl Connection {
    async fn established(&mut self, mut kicks: mpsc::Receiver<Kick>) -> End {
        let mut durable = self.shared.log.watch_durable();
        let keep_alive =
            (self.keep_alive > 0).then(|| Duration::from_millis(u64::from(self.keep_alive) * 1500));
        let mut deadline = keep_alive.map(|k| Instant::now() + k);
        let mut link = self.session.link.take();
        // Made once: a new `cancelled()` future per iteration would lock the token each time.
        let token = self.shared.shutdown.clone();
        let cancelled = token.cancelled();
        tokio::pin!(cancelled);
        if let Err(end) = self.resume().await {
            self.session.link = link;
            return end;
        }
        let end = loop {
            // Whatever the watermark already covers goes out before the loop waits: the log may
            // have synced while the last packet was handled, and a client whose window is full
            // sends nothing more until it gets these.
            let now_durable = *durable.borrow();
            if self.send_owed(now_durable).await.is_err() {
                break End::Lost;
            }
            if !self.framed.write_buffer().is_empty() && self.framed.flush().await.is_err() {
                break End::Lost;
            }
            // `borrow` does not mark the value seen, so a sync after it still wakes `changed`.
            let owed_pending = !self.owed.is_empty();
            let read_socket = self.owed.len() + self.session.inbound_qos2.len()
                < usize::from(self.shared.settings.max_inflight)
                && self.paused_until.is_none();
            let paused_until = self.paused_until;
            let pause_over = async {
                match paused_until {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            let read_link = link.is_some()
                && self.subacks_owed == 0
                && self.session.queued.len() < self.shared.settings.max_queued;
            let keep_alive_expired = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = &mut cancelled => break End::Shutdown,
                // The registry holds the sender as long as this connection owns the client id.
                Some(kick) = kicks.recv() => match kick {
                    Kick::TakeOver { reply } => break End::TakenOver(reply),
                    Kick::Revoke => break End::Revoked,
                    Kick::CredentialChanged => break End::CredentialChanged,
                },
                changed = durable.changed(), if owed_pending => {
                    if changed.is_err() {
                        break End::Shutdown;
                    }
                }
                frame = self.framed.next(), if read_socket => {
                    deadline = keep_alive.map(|k| Instant::now() + k);
                    match frame {
                        None => break End::Lost,
                        Some(Err(e)) => {
                            self.protocol_error(e).await;
                            break End::Lost;
                        }
                        Some(Ok(frame)) => {
                            match self.inbound(frame, &mut link).await {
                                Ok(None) => {}
                                Ok(Some(end)) => break end,
                                Err(()) => break End::Lost,
                            }
                        }
                    }
                }
                n = next_notification(&mut link), if read_link => match n {
                    Ok(Some(Notification::Forward(forward))) => {
                        if self.forward(forward).await.is_err() {
                            break End::Lost;
                        }
                    }
                    Ok(Some(Notification::Unschedule)) => {
                        if let Some((_, rx)) = &link {
                            if rx.wake().await.is_err() {
                                break End::Shutdown;
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "the router dropped a subscriber link; the client is disconnected");
                        break End::Lost;
                    }
                },
                _ = pause_over => self.paused_until = None,
                _ = keep_alive_expired => {
                    tracing::debug!(client_id = %self.session.client_id, "keep-alive expired");
                    if self.v5 {
                        let _ = self.framed.send(Frame::Disconnect(Disconnect::new(ReasonCode::KeepAliveTimeout))).await;
                    }
                    break End::Lost;
                }
            }
        };
        self.session.link = link;
        end
    }

    /// Re-sends what was in flight when the session's last connection ended (MQTT-4.4.0-1).
    async fn resume(&mut self) -> Result<(), End> {
        let resend: Vec<Frame> = self
            .session
            .in_flight
            .iter()
            .map(|(id, m)| match m {
                InFlight::Publish(p) => {
                    let mut p = (**p).clone();
                    p.dup = true;
                    Frame::Publish(p)
                }
                InFlight::Released => Frame::PubRel(Ack::new(*id)),
            })
            .collect();
        for frame in resend {
            self.write(frame).await.map_err(|_| End::Lost)?;
        }
        self.fill_window().await.map_err(|_| End::Lost)?;
        self.framed.flush().await.map_err(|_| End::Lost)
    }

    /// Sends the owed acknowledgements whose messages are durable, in order.
    async fn send_owed(&mut self, durable: u64) -> Result<(), ()> {
        while self.owed.front().is_some_and(|(_, need)| *need <= durable) {
            let (frame, _) = self.owed.pop_front().expect("checked");
            if matches!(frame, Frame::SubAck(_)) {
                self.subacks_owed -= 1;
            }
            self.framed.feed(frame).await.map_err(|_| ())?;
        }
        Ok(())
    }

    fn owe(&mut self, frame: Frame, need: Option<u64>) {
        if matches!(frame, Frame::SubAck(_)) {
            self.subacks_owed += 1;
        }
        if let Some(n) = need {
            self.last_need = self.last_need.max(n);
        }
        self.owed.push_back((frame, self.last_need));
    }

    async fn protocol_error(&mut self, e: CodecError) {
        tracing::debug!(client_id = %self.session.client_id, error = %e, "protocol error; connection closed");
        if let Some(reply) = e.reply() {
            let _ = self.framed.send(reply).await;
        }
    }

    async fn disconnect_with(&mut self, reason: ReasonCode, why: &str) {
        tracing::debug!(client_id = %self.session.client_id, ?reason, why, "closing the connection");
        if self.v5 {
            let _ = self
                .framed
                .send(Frame::Disconnect(Disconnect::new(reason)))
                .await;
        }
    }

    /// Handles one packet from the client. `Ok(Some(end))` ends the connection normally,
    /// `Err(())` abnormally (the will is published).
    async fn inbound(
        &mut self,
        frame: Frame,
        link: &mut Option<(rumqttd::local::LinkTx, rumqttd::local::LinkRx)>,
    ) -> Result<Option<End>, ()> {
        match frame {
            Frame::Publish(p) => self.publish(p).await?,
            Frame::PubAck(a) => {
                if let Some(at) = self.in_flight_at(a.packet_id, false) {
                    self.session.in_flight.remove(at);
                    self.fill_window().await?;
                }
            }
            Frame::PubRec(a) => {
                if let Some(at) = self.in_flight_at(a.packet_id, false) {
                    if a.reason.is_error() {
                        self.session.in_flight.remove(at);
                        self.fill_window().await?;
                    } else {
                        self.session.in_flight[at].1 = InFlight::Released;
                        self.write(Frame::PubRel(Ack::new(a.packet_id))).await?;
                    }
                } else if self.v5 {
                    let reply = Ack::with_reason(a.packet_id, ReasonCode::PacketIdentifierNotFound);
                    self.write(Frame::PubRel(reply)).await?;
                } else {
                    self.write(Frame::PubRel(Ack::new(a.packet_id))).await?;
                }
            }
            Frame::PubComp(a) => {
                if let Some(at) = self.in_flight_at(a.packet_id, true) {
                    self.session.in_flight.remove(at);
                    self.fill_window().await?;
                }
            }
            Frame::PubRel(a) => {
                let known = self.session.inbound_qos2.remove(&a.packet_id);
                let reply = if known || !self.v5 {
                    Ack::new(a.packet_id)
                } else {
                    Ack::with_reason(a.packet_id, ReasonCode::PacketIdentifierNotFound)
                };
                self.owe(Frame::PubComp(reply), None);
            }
            Frame::Subscribe(s) => {
                if link.is_none() {
                    match self.shared.router.link().await {
                        Ok(l) => *link = Some(l),
                        Err(e) => {
                            tracing::error!(error = %e, "cannot open a subscriber link to the router");
                            self.disconnect_with(ReasonCode::ServerUnavailable, "no router link")
                                .await;
                            return Err(());
                        }
                    }
                }
                // Messages already acknowledged reach the router before this subscription does.
                self.shared.router.barrier().await;
                // The session routes through the link it holds while connected.
                self.session.link = link.take();
                let mut codes = Vec::with_capacity(s.filters.len());
                let mut failed = false;
                for (filter, options) in &s.filters {
                    if !self.acl.may_subscribe(filter) {
                        self.shared.refused.subscribe.increment(1);
                        self.refusal("subscription", filter);
                        codes.push(if self.v5 {
                            ReasonCode::NotAuthorized
                        } else {
                            ReasonCode::UnspecifiedError
                        });
                        continue;
                    }
                    let r = self
                        .session
                        .subscribe(filter, *options, s.subscription_identifier);
                    failed |= r.is_err();
                    codes.push(match r {
                        Ok(()) => match options.qos {
                            QoS::AtMostOnce => ReasonCode::GrantedQoS0,
                            QoS::AtLeastOnce => ReasonCode::GrantedQoS1,
                            QoS::ExactlyOnce => ReasonCode::GrantedQoS2,
                        },
                        Err(_) => ReasonCode::UnspecifiedError,
                    });
                }
                *link = self.session.link.take();
                let ack = SubAck {
                    packet_id: s.packet_id,
                    reason_codes: codes,
                    reason_string: None,
                    user_properties: Vec::new(),
                };
                self.owe(Frame::SubAck(ack), None);
                if failed {
                    tracing::error!(
                        "the router refused a subscription; the client is disconnected"
                    );
                    return Err(());
                }
            }
            Frame::Unsubscribe(u) => {
                self.session.link = link.take();
                let mut codes = Vec::with_capacity(u.filters.len());
                for filter in &u.filters {
                    codes.push(match self.session.unsubscribe(filter) {
                        Ok(true) => ReasonCode::Success,
                        Ok(false) => ReasonCode::NoSubscriptionExisted,
                        Err(_) => ReasonCode::UnspecifiedError,
                    });
                }
                *link = self.session.link.take();
                let ack = UnsubAck {
                    packet_id: u.packet_id,
                    reason_codes: codes,
                    reason_string: None,
                    user_properties: Vec::new(),
                };
                self.owe(Frame::UnsubAck(ack), None);
            }
            Frame::PingReq => self.owe(Frame::PingResp, None),
            Frame::Disconnect(d) => {
                if let Some(secs) = d.session_expiry_interval {
                    if self.connect_expiry_zero && secs != 0 {
                        self.disconnect_with(
                            ReasonCode::ProtocolError,
                            "session expiry set at DISCONNECT after 0 at CONNECT",
                        )
                        .await;
                        return Err(());
                    }
                    self.expiry = Duration::from_secs(u64::from(secs))
                        .min(self.shared.settings.max_session_expiry);
                }
                return Ok(Some(End::Disconnected {
                    keep_will: d.reason == ReasonCode::DisconnectWithWillMessage,
                }));
            }
            Frame::Connect(_) => {
                self.disconnect_with(ReasonCode::ProtocolError, "second CONNECT (MQTT-3.1.0-2)")
                    .await;
                return Err(());
            }
            Frame::Auth(_) => {
                self.disconnect_with(
                    ReasonCode::ProtocolError,
                    "AUTH without an authentication method",
                )
                .await;
                return Err(());
            }
            // The codec only decodes what a client may send.
            other => {
                tracing::debug!(frame = ?other, "unexpected packet from a client");
                return Err(());
            }
        }
        Ok(None)
    }

    /// Closes the sending side and discards what the client still sends for a moment, so that
    /// a DISCONNECT just sent reaches a client that is busy writing (closing at once would
    /// reset the connection and lose it).
    async fn linger(&mut self) {
        let _ = self.framed.flush().await;
        let _ = tokio::io::AsyncWriteExt::shutdown(self.framed.get_mut()).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while let Some(Ok(_)) = self.framed.next().await {}
        })
        .await;
    }

    fn refusal(&mut self, what: &str, topic: &str) {
        self.refusals += 1;
        let (client_id, device) = (
            &self.session.client_id,
            self.device.as_ref().map(|d| d.as_str()),
        );
        if self.refusals == 1 {
            tracing::info!(client_id, device, what, topic, "refused: not the client's topic (further refusals on this connection are logged at DEBUG)");
        } else {
            tracing::debug!(
                client_id,
                device,
                what,
                topic,
                "refused: not the client's topic"
            );
        }
    }

    fn in_flight_at(&self, id: NonZeroU16, released: bool) -> Option<usize> {
        self.session
            .in_flight
            .iter()
            .position(|(p, m)| *p == id && matches!(m, InFlight::Released) == released)
    }

    async fn publish(&mut self, mut p: Publish) -> Result<(), ()> {
        if let Some(alias) = p.properties.topic_alias.take() {
            if alias.get() > self.shared.settings.topic_alias_max {
                self.disconnect_with(
                    ReasonCode::TopicAliasInvalid,
                    "topic alias above the maximum",
                )
                .await;
                return Err(());
            }
            if p.topic.is_empty() {
                match self.aliases.get(&alias.get()) {
                    Some(t) => p.topic = t.clone(),
                    None => {
                        self.disconnect_with(ReasonCode::ProtocolError, "unknown topic alias")
                            .await;
                        return Err(());
                    }
                }
            } else {
                self.aliases.insert(alias.get(), p.topic.clone());
            }
        }
        if p.payload.len() > self.shared.settings.max_payload {
            self.disconnect_with(
                ReasonCode::PacketTooLarge,
                "payload over mqtt.max_payload_bytes",
            )
            .await;
            return Err(());
        }
        if let Some(bucket) = self.publish_rate.as_mut() {
            let now = Instant::now();
            if self.v5 {
                if bucket.take(now).is_err() {
                    self.shared.refused.rate.increment(1);
                    // Not accepted: the client learns why (after the acknowledgements it is
                    // owed), and resends it after reconnecting.
                    self.drain_owed().await;
                    self.disconnect_with(
                        ReasonCode::MessageRateTooHigh,
                        "publishing faster than mqtt.max_publish_rate",
                    )
                    .await;
                    self.linger().await;
                    return Err(());
                }
            } else if let Some(wait) = bucket.take_owing(now) {
                // 3.1.1 has no code for it: this message is taken, and the socket is not read
                // until the rate allows the next, so TCP slows the client down.
                self.shared.refused.rate.increment(1);
                self.paused_until = Some(now + wait);
            }
        }
        if !self.acl.may_publish(&p.topic) {
            self.shared.refused.publish.increment(1);
            self.refusal("publish", &p.topic);
            if !self.v5 {
                // 3.1.1 has no way to refuse a message: a PUBACK would claim it was stored.
                return Err(());
            }
            match (p.qos, p.packet_id) {
                (QoS::AtLeastOnce, Some(id)) => self.owe(
                    Frame::PubAck(Ack::with_reason(id, ReasonCode::NotAuthorized)),
                    None,
                ),
                (QoS::ExactlyOnce, Some(id)) => self.owe(
                    Frame::PubRec(Ack::with_reason(id, ReasonCode::NotAuthorized)),
                    None,
                ),
                _ => {}
            }
            return Ok(());
        }
        let pending = self.owed.len() + self.session.inbound_qos2.len();
        if p.qos != QoS::AtMostOnce
            && self.v5
            && pending >= usize::from(self.shared.settings.max_inflight)
        {
            self.disconnect_with(
                ReasonCode::ReceiveMaximumExceeded,
                "more unacknowledged messages than Receive Maximum",
            )
            .await;
            return Err(());
        }
        if p.qos == QoS::ExactlyOnce {
            let id = p.packet_id.expect("QoS 2 has a packet id");
            if self.session.inbound_qos2.contains(&id) {
                // A re-sent QoS 2 message already accepted: answer again, deliver once.
                self.owe(Frame::PubRec(Ack::new(id)), None);
                return Ok(());
            }
        }
        let wanted = self.wanted(&p.topic);
        let end = match self.shared.accept(&p, self.session.number, wanted).await {
            Ok(end) => end,
            Err(LogError::Closed) => return Err(()),
            Err(LogError::TooLarge { .. }) => {
                self.disconnect_with(
                    ReasonCode::PacketTooLarge,
                    "message larger than the ingest log",
                )
                .await;
                return Err(());
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot append to the ingest log; device messages are refused: check the disk of `ingest_log.path`");
                self.disconnect_with(ReasonCode::UnspecifiedError, "ingest log failed")
                    .await;
                return Err(());
            }
        };
        self.shared.publishes[usize::from(p.qos.as_u8())].increment(1);
        match (p.qos, p.packet_id) {
            (QoS::AtLeastOnce, Some(id)) => self.owe(Frame::PubAck(Ack::new(id)), end),
            (QoS::ExactlyOnce, Some(id)) => {
                self.session.inbound_qos2.insert(id);
                self.owe(Frame::PubRec(Ack::new(id)), end);
            }
            _ => {}
        }
        Ok(())
    }

    fn wanted(&mut self, topic: &ByteString) -> bool {
        let version = self.shared.router.interest.version();
        if let Some((t, v, answer)) = &self.interest_cache {
            if t == topic && *v == version {
                return *answer;
            }
        }
        let answer = self.shared.router.interest.wanted(topic);
        self.interest_cache = Some((topic.clone(), version, answer));
        answer
    }

    /// Turns a message from the router into what this client receives, then sends or queues it.
    async fn forward(&mut self, mut forward: Forward) -> Result<(), ()> {
        let tag = Tag::take(&mut forward.properties);
        let props = forward.properties.take().unwrap_or_default();
        let retained = forward.cursor.is_none();
        let now = crate::clock::now_millis();
        for internal in &props.subscription_identifiers {
            let Some(sub) = self
                .session
                .by_internal
                .get(internal)
                .and_then(|f| self.session.subscriptions.get(f))
            else {
                continue;
            };
            let tag = tag.unwrap_or(Tag {
                qos: 0,
                retain: false,
                empty: false,
                origin: 0,
                received_at: now,
                expiry: None,
            });
            if retained && sub.options.retain_handling == RetainHandling::DoNotSend {
                continue;
            }
            if sub.options.no_local && tag.origin == self.session.number {
                continue;
            }
            let expiry = match tag.expiry {
                Some(x) => {
                    let elapsed =
                        u32::try_from((now - tag.received_at).max(0) / 1000).unwrap_or(u32::MAX);
                    if elapsed >= x {
                        continue;
                    }
                    Some(x - elapsed)
                }
                None => None,
            };
            let qos = QoS::from_u8(tag.qos.min(sub.options.qos.as_u8())).unwrap_or(QoS::AtMostOnce);
            let publish = Publish {
                dup: false,
                qos,
                retain: retained || (sub.options.retain_as_published && tag.retain),
                topic: ByteString::try_from(forward.publish.topic.clone()).unwrap_or_default(),
                packet_id: None,
                payload: if tag.empty {
                    bytes::Bytes::new()
                } else {
                    forward.publish.payload.clone()
                },
                properties: PublishProperties {
                    topic_alias: None,
                    message_expiry_interval: expiry,
                    payload_format_utf8: props.payload_format_indicator == Some(1),
                    content_type: props.content_type.clone().map(ByteString::from),
                    response_topic: props.response_topic.clone().map(ByteString::from),
                    correlation_data: props.correlation_data.clone(),
                    subscription_identifiers: sub.id.into_iter().collect(),
                    user_properties: props
                        .user_properties
                        .iter()
                        .map(|(k, v)| (ByteString::from(k.as_str()), ByteString::from(v.as_str())))
                        .collect(),
                },
            };
            if qos == QoS::AtMostOnce {
                self.write(Frame::Publish(publish)).await?;
            } else {
                self.session.queued.push_back(publish);
            }
        }
        self.fill_window().await
    }

    /// Moves queued messages into flight while the client's Receive Maximum allows.
    async fn fill_window(&mut self) -> Result<(), ()> {
        let window = usize::from(
            self.client_receive_maximum
                .min(self.shared.settings.max_inflight),
        );
        while self.session.in_flight.len() < window {
            let Some(mut p) = self.session.queued.pop_front() else {
                break;
            };
            let Some(id) = self.session.packet_id() else {
                self.session.queued.push_front(p);
                break;
            };
            p.packet_id = Some(id);
            match self.framed.feed(Frame::Publish(p.clone())).await {
                Ok(()) => self
                    .session
                    .in_flight
                    .push_back((id, InFlight::Publish(Box::new(p)))),
                // Over the client's Maximum Packet Size: dropped for this client (MQTT-3.1.2-25).
                Err(CodecError::OutboundTooLarge { .. }) => {}
                Err(_) => return Err(()),
            }
        }
        Ok(())
    }

    async fn write(&mut self, frame: Frame) -> Result<(), ()> {
        match self.framed.feed(frame).await {
            Ok(()) | Err(CodecError::OutboundTooLarge { .. }) => Ok(()),
            Err(_) => Err(()),
        }
    }

    /// Ends the connection: owed acknowledgements the log allows, the DISCONNECT a v5 client
    /// gets from the server, the will, and the session back to the registry.
    async fn finish(mut self, end: End, key: &str, epoch: u64) {
        let shared = Arc::clone(&self.shared);
        let client_id = self.session.client_id.clone();
        let client_id = client_id.as_str();
        let will_due;
        match end {
            End::Shutdown => {
                self.drain_owed().await;
                self.disconnect_with(ReasonCode::ServerShuttingDown, "server shutting down")
                    .await;
                tracing::debug!(client_id, "connection closed for shutdown");
                // Stopping the server is not the device going away: no will.
                will_due = false;
            }
            End::TakenOver(reply) => {
                let durable = shared.log.durable();
                let _ = self.send_owed(durable).await;
                self.disconnect_with(
                    ReasonCode::SessionTakenOver,
                    "another connection took the client id",
                )
                .await;
                tracing::info!(client_id, "session taken over by a new connection");
                // A will without a delay goes out now; one with a delay goes to the new
                // connection, which drops it if it resumes the session.
                let handed_over = match self.will.take() {
                    Some(w) if w.delay_interval > 0 => Some(w),
                    Some(w) => {
                        publish_will(&shared, w).await;
                        None
                    }
                    None => None,
                };
                let session = (!self.expiry.is_zero()).then_some(self.session);
                let _ = reply.send((session, handed_over));
                return;
            }
            End::Revoked => {
                let durable = shared.log.durable();
                let _ = self.send_owed(durable).await;
                self.disconnect_with(ReasonCode::NotAuthorized, "the identity was revoked")
                    .await;
                tracing::info!(client_id, device = ?self.device, "disconnected: the identity was revoked");
                self.expiry = Duration::ZERO;
                will_due = false;
            }
            End::CredentialChanged => {
                let durable = shared.log.durable();
                let _ = self.send_owed(durable).await;
                self.disconnect_with(
                    ReasonCode::NotAuthorized,
                    "the credential was rotated; connect with the new one",
                )
                .await;
                tracing::info!(client_id, device = ?self.device, "disconnected: the credential it connected with was rotated");
                will_due = true;
            }
            End::Disconnected { keep_will } => {
                self.drain_owed().await;
                tracing::debug!(client_id, "client disconnected");
                will_due = keep_will;
            }
            End::Lost => {
                let durable = shared.log.durable();
                let _ = self.send_owed(durable).await;
                let _ = self.framed.flush().await;
                tracing::debug!(client_id, "connection lost");
                will_due = true;
            }
        }
        let will = if will_due { self.will.take() } else { None };
        let pending = match will {
            Some(w) => {
                let delay = Duration::from_secs(u64::from(w.delay_interval)).min(self.expiry);
                if delay.is_zero() {
                    publish_will(&shared, w).await;
                    None
                } else {
                    Some(delayed_will(&shared, w, delay))
                }
            }
            None => None,
        };
        let _ = self.framed.close().await;
        shared
            .sessions
            .release(key, epoch, self.session, self.expiry, pending);
    }

    /// Waits (bounded) until the log has made every owed acknowledgement sendable, and sends.
    async fn drain_owed(&mut self) {
        let mut durable = self.shared.log.watch_durable();
        let deadline = Instant::now() + ACK_DRAIN;
        loop {
            let now = *durable.borrow();
            if self.send_owed(now).await.is_err() || self.owed.is_empty() {
                break;
            }
            match tokio::time::timeout_at(deadline, durable.changed()).await {
                Ok(Ok(())) => {}
                _ => break,
            }
        }
        let _ = self.framed.flush().await;
    }
}

async fn next_notification(
    link: &mut Option<(rumqttd::local::LinkTx, rumqttd::local::LinkRx)>,
) -> Result<Option<Notification>, rumqttd::local::LinkError> {
    match link {
        Some((_, rx)) => rx.next().await,
        None => std::future::pending().await,
    }
}

/// Publishes a will as if its client had sent it.
pub async fn publish_will(shared: &Shared, will: Will) {
    let topic = will.topic.clone();
    let publish = Publish {
        dup: false,
        qos: will.qos,
        retain: will.retain,
        topic: will.topic,
        packet_id: None,
        payload: will.payload,
        properties: PublishProperties {
            topic_alias: None,
            message_expiry_interval: will.message_expiry,
            payload_format_utf8: will.payload_format_utf8,
            content_type: will.content_type,
            response_topic: will.response_topic,
            correlation_data: will.correlation_data,
            subscription_identifiers: Vec::new(),
            user_properties: will.user_properties,
        },
    };
    let wanted = shared.router.interest.wanted(&topic);
    match shared.accept(&publish, 0, wanted).await {
        Ok(_) => tracing::debug!(topic = %topic, "will published"),
        Err(e) => tracing::warn!(topic = %topic, error = %e, "will not published"),
    }
}

/// Publishes `will` after `delay`, or at once when the session ends first; not at all when the
/// session resumes.
fn delayed_will(shared: &Arc<Shared>, will: Will, delay: Duration) -> PendingWill {
    let (fire, fired) = oneshot::channel();
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        let publish = tokio::select! {
            _ = tokio::time::sleep(delay) => true,
            r = fired => r.unwrap_or(false),
            _ = shared.shutdown.cancelled() => false,
        };
        if publish {
            publish_will(&shared, will).await;
        }
    });
    PendingWill { fire }
}

/// The properties a message keeps on its way through the router.
pub fn to_router_properties(p: &PublishProperties) -> RouterProperties {
    RouterProperties {
        payload_format_indicator: p.payload_format_utf8.then_some(1),
        message_expiry_interval: p.message_expiry_interval,
        topic_alias: None,
        response_topic: p.response_topic.as_ref().map(|t| t.to_string()),
        correlation_data: p.correlation_data.clone(),
        user_properties: p
            .user_properties
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        subscription_identifiers: Vec::new(),
        content_type: p.content_type.as_ref().map(|t| t.to_string()),
    }
}
