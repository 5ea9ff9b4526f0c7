//! The device edge: Messina's own MQTT listener (3.1.1 and 5 on one port) in front of the rumqttd
//! router. It owns every piece of MQTT session state and acknowledges a PUBLISH (PUBACK, PUBREC)
//! only once the ingest log holds it durably; rumqttd only fans messages out to subscribers.
//!
//! - [`codec`]: the packet codec (rmqtt-codec behind a version-neutral model) and validation;
//! - [`connection`]: one task per socket, the protocol state machine;
//! - [`session`]: sessions that outlive connections, takeover, expiry, delayed wills;
//! - [`router`]: the feeder and subscriber links to rumqttd, and the interest index;
//! - [`tls`]: TLS listeners (rustls), client certificates, reloading;
//! - [`limit`]: publish rate per connection, connection rate per source address.

pub mod codec;
pub mod connection;
pub mod presence;
pub mod router;
pub mod session;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use messina_log::{Log, LogError, Record};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use messina_bridge::topics::Topic;

use crate::ingest::{Meta, KIND_PUBLISH};
use crate::security::Authenticator;
use crate::{limit, tls};
use codec::Publish;
use router::{Feed, Router, Tag};
use session::Registry;

/// Room in a packet besides the payload: fixed header, topic and properties. The largest packet
/// accepted (and announced as Maximum Packet Size) is `mqtt.max_payload_bytes` plus this.
pub const PACKET_OVERHEAD: usize = 64 * 1024;

/// The limits a connection works within, from `[mqtt]`.
#[derive(Debug, Clone)]
pub struct Settings {
    pub max_connections: usize,
    pub max_payload: usize,
    pub connect_timeout: Duration,
    /// Unacknowledged QoS 1/2 messages per connection each way (announced as Receive Maximum).
    pub max_inflight: u16,
    /// Outbound messages a session holds beyond those in flight before the router has to wait.
    pub max_queued: usize,
    /// The longest a session outlives its connection (caps what clients ask for).
    pub max_session_expiry: Duration,
    /// Inbound topic aliases a client may use (MQTT 5 Topic Alias Maximum).
    pub topic_alias_max: u16,
    /// Publishes per second per connection, and the burst above it (0: no limit).
    pub publish_rate: (u32, u32),
    /// New connections per second per source address, and the burst (0: no limit).
    pub connect_rate: (u32, u32),
}

impl Settings {
    pub fn from_config(c: &messina_config::MqttConfig) -> Settings {
        Settings {
            max_connections: c.max_connections,
            max_payload: c.max_payload_bytes,
            connect_timeout: Duration::from_millis(u64::from(c.connect_timeout_ms)),
            max_inflight: c.max_inflight.clamp(1, usize::from(u16::MAX)) as u16,
            max_queued: c.max_queued_messages,
            max_session_expiry: Duration::from_secs(c.max_session_expiry_secs),
            topic_alias_max: c.topic_alias_maximum,
            publish_rate: (c.max_publish_rate, c.publish_burst),
            connect_rate: (c.max_connect_rate_per_ip, c.connect_burst_per_ip),
        }
    }

    /// The largest packet accepted.
    pub fn max_packet(&self) -> u32 {
        u32::try_from(self.max_payload + PACKET_OVERHEAD).unwrap_or(u32::MAX)
    }
}

/// What every connection shares.
pub struct Shared {
    pub settings: Settings,
    pub log: Log,
    pub router: Arc<Router>,
    pub sessions: Arc<Registry>,
    /// Decides each CONNECT against the device registry.
    pub auth: Arc<Authenticator>,
    /// Connection changes on their way to storage.
    pub presence: Arc<presence::Presence>,
    pub shutdown: CancellationToken,
    connections: Arc<Semaphore>,
    connect_rate: limit::ConnectRate,
    /// `messina_mqtt_publishes_total` by QoS, looked up once.
    pub publishes: [metrics::Counter; 3],
    /// `messina_mqtt_refused_total` by what was refused: a connect, a will, a publish, a
    /// subscription.
    pub refused: Refused,
}

/// Counters of refusals, looked up once.
pub struct Refused {
    pub connect: metrics::Counter,
    pub will: metrics::Counter,
    pub publish: metrics::Counter,
    pub subscribe: metrics::Counter,
    /// Connections refused or ended for their rate.
    pub rate: metrics::Counter,
}

impl Refused {
    fn new() -> Refused {
        let counter =
            |what: &'static str| metrics::counter!("messina_mqtt_refused_total", "what" => what);
        Refused {
            connect: counter("connect"),
            will: counter("will"),
            publish: counter("publish"),
            subscribe: counter("subscribe"),
            rate: counter("rate"),
        }
    }
}

impl Shared {
    /// Accepts a message into Messina: device data goes into the ingest log (the returned
    /// position is where it ends, for the acknowledgement to wait on), and anything a
    /// subscription matches, or that is retained, goes to the router.
    pub async fn accept(
        &self,
        publish: &Publish,
        origin: u64,
        wanted: bool,
    ) -> Result<Option<u64>, LogError> {
        let topic = &*publish.topic;
        let now = crate::clock::now_millis();
        let mut end = None;
        let parsed = Topic::parse(topic);
        if parsed.is_ingest() {
            let mut meta = Vec::new();
            Meta {
                response_topic: publish
                    .properties
                    .response_topic
                    .as_ref()
                    .map(|t| t.to_string()),
                correlation: publish.properties.correlation_data.clone(),
            }
            .encode(&mut meta);
            let record = Record {
                kind: KIND_PUBLISH,
                flags: 0,
                received_at: now,
                topic: topic.as_bytes(),
                meta: &meta,
                payload: &publish.payload,
            };
            end = Some(self.log.append(record).await?);
        }
        // A client's presence (its will) only tells the alert service that it went away; what
        // subscribers see on presence topics is Messina's own notice.
        if (publish.retain || wanted) && !parsed.is_messina_owned() {
            self.router
                .feed(Feed {
                    topic: Bytes::copy_from_slice(topic.as_bytes()),
                    payload: publish.payload.clone(),
                    retain: publish.retain,
                    properties: connection::to_router_properties(&publish.properties),
                    tag: Tag {
                        qos: publish.qos.as_u8(),
                        retain: publish.retain,
                        empty: false,
                        origin,
                        received_at: now,
                        expiry: publish.properties.message_expiry_interval,
                    },
                })
                .await;
        }
        Ok(end)
    }
}

/// One address the edge serves, with TLS or without.
pub struct Listener {
    /// The configuration key that names the address (for errors).
    pub key: &'static str,
    pub addr: SocketAddr,
    pub tls: Option<Arc<tls::Tls>>,
}

/// The running edge.
pub struct Edge {
    pub shared: Arc<Shared>,
    tasks: TaskTracker,
}

impl Edge {
    /// Binds every address (failing with a message that names the setting) and serves them until
    /// `shutdown`.
    pub async fn start(
        addresses: Vec<Listener>,
        settings: Settings,
        log: Log,
        router: Arc<Router>,
        auth: Arc<Authenticator>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Edge> {
        let mut listeners = Vec::new();
        for l in addresses {
            let listener = TcpListener::bind(l.addr).await.with_context(|| {
                format!(
                    "cannot listen on {} (`{}`); is another broker running there?",
                    l.addr, l.key
                )
            })?;
            listeners.push((listener, l.tls));
        }
        let shared = Arc::new(Shared {
            connections: Arc::new(Semaphore::new(settings.max_connections)),
            connect_rate: limit::ConnectRate::new(settings.connect_rate.0, settings.connect_rate.1),
            settings,
            log,
            router,
            sessions: Arc::new(Registry::default()),
            auth,
            presence: presence::Presence::new(),
            shutdown: shutdown.clone(),
            publishes: ["0", "1", "2"]
                .map(|q| metrics::counter!("messina_mqtt_publishes_total", "qos" => q)),
            refused: Refused::new(),
        });
        let tasks = TaskTracker::new();
        for (listener, tls) in listeners {
            tasks.spawn(accept(listener, tls, Arc::clone(&shared), tasks.clone()));
        }
        Ok(Edge { shared, tasks })
    }

    /// Waits, after `shutdown`, until every connection has sent the acknowledgements the log
    /// allows and closed.
    pub async fn stopped(self) {
        self.tasks.close();
        self.tasks.wait().await;
    }
}

async fn accept(
    listener: TcpListener,
    tls: Option<Arc<tls::Tls>>,
    shared: Arc<Shared>,
    tasks: TaskTracker,
) {
    let connected = metrics::gauge!("messina_mqtt_connections");
    loop {
        let (stream, peer) = tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // Out of file descriptors, mostly: wait a little rather than spin.
                    tracing::warn!(error = %e, "accepting an MQTT connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let permit = Arc::clone(&shared.connections).try_acquire_owned().ok();
        let admission = if permit.is_none() {
            connection::Admission::Busy
        } else if !shared.connect_rate.admit(peer.ip()) {
            connection::Admission::RateExceeded
        } else {
            connection::Admission::Admitted
        };
        let shared = Arc::clone(&shared);
        let connected = connected.clone();
        let acceptor = tls.as_ref().map(|t| t.acceptor());
        tasks.spawn(async move {
            connected.increment(1.0);
            let (stream, certificate): (Box<dyn connection::Io>, _) = match acceptor {
                None => (Box::new(stream), None),
                Some(acceptor) => {
                    let handshake = tokio::time::timeout(
                        shared.settings.connect_timeout,
                        acceptor.accept(stream),
                    );
                    match handshake.await {
                        Ok(Ok(tls)) => {
                            let certificate = tls
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|c| c.first())
                                .map(|c| tls::PeerCertificate::from_der(c));
                            (Box::new(tls), certificate)
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            connected.decrement(1.0);
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "no TLS handshake within mqtt.connect_timeout_ms");
                            connected.decrement(1.0);
                            return;
                        }
                    }
                }
            };
            connection::run(shared, stream, peer, admission, certificate).await;
            connected.decrement(1.0);
            drop(permit);
        });
    }
}
