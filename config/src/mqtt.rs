//! `[mqtt]`: the MQTT edge.

use super::*;

/// Who may connect to the MQTT edge without a username.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Anonymous {
    /// Only clients connecting from a loopback address (the safe default).
    Loopback,
    /// Anyone who can reach a listener: an explicit opt-in for closed networks.
    Allow,
    /// Nobody: every client authenticates.
    Deny,
}

section! {
    /// The MQTT edge: Messina's own listener, serving MQTT 3.1.1 and 5 on one port, in front of
    /// the embedded rumqttd router. Devices publish to `devices/{id}/telemetry` and
    /// `devices/{id}/events`; fleet managers subscribe to `alerts/#`. A QoS 1 PUBACK (QoS 2
    /// PUBREC) is sent only once the message is durable in the ingest log.
    pub struct MqttConfig at "mqtt" {
        /// Address of the MQTT listener (3.1.1 and 5; the version is in the CONNECT).
        pub listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 1883)),
        /// A second address served exactly like `listen`, for clients configured for the former
        /// separate MQTT 5 port; the same address as `listen` serves only that one.
        pub listen_v5: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 1884)),
        /// Most simultaneous client connections; past it a CONNECT is refused with "server busy"
        /// (3.1.1: 0x03, 5: 0x89).
        pub max_connections: usize = 20_000,
        /// Largest PUBLISH payload accepted, in bytes. The largest packet is this plus 64 KiB for
        /// topic and properties, announced to MQTT 5 clients as Maximum Packet Size; a larger
        /// payload closes the connection (MQTT 5: DISCONNECT 0x95).
        pub max_payload_bytes: usize = 256 * 1024,
        /// Most unacknowledged QoS 1/2 messages per connection in each direction. Inbound it is
        /// announced to MQTT 5 clients as Receive Maximum, and the socket is not read while that
        /// many acknowledgements wait for the ingest log; outbound it caps the client's own
        /// Receive Maximum.
        pub max_inflight: usize = 1_024,
        /// Outbound QoS 1/2 messages a session holds beyond those in flight (a slow or offline
        /// subscriber); past it the router buffers for the session, up to `commit_log_*`.
        pub max_queued_messages: usize = 1_000,
        /// Longest a session outlives its connection, in seconds: caps the MQTT 5 Session Expiry
        /// Interval and is the expiry of MQTT 3.1.1 sessions with clean session 0.
        pub max_session_expiry_secs: u64 = 86_400,
        /// Topic aliases an MQTT 5 client may set on its publishes (Topic Alias Maximum); 0
        /// turns inbound aliases off.
        pub topic_alias_maximum: u16 = 64,
        /// Who may connect without a username: "loopback" (clients on this machine only; the
        /// default), "allow" (anyone who reaches a listener: only on a closed network) or "deny".
        /// An anonymous client may do what the service role may, and its client id stands for its
        /// device. Everyone else authenticates with a registered identity: username = device id
        /// (= client id for a device), password = its secret (`messina devices add`). Serving a
        /// non-loopback address with "loopback" or "deny" and no registered identity refuses to
        /// start, since nobody could connect.
        pub anonymous: Anonymous = Anonymous::Loopback,
        /// Verified credentials kept in memory, so a reconnecting fleet costs one hash
        /// verification per device per process lifetime, not one per connection.
        pub credential_cache_entries: usize = 100_000,
        /// Seconds between reads of the registry's recent changes (0: never): a device revoked
        /// or given a new secret anywhere else (another node sharing the ScyllaDB registry,
        /// `messina devices` on the command line) is disconnected here within this time, with
        /// 0x87 "not authorized". Changes made through this node's admin API act at once.
        pub registry_poll_secs: u64 = 2,
        /// Publishes per second one connection may send (0: no limit). An MQTT 5 client over it
        /// (after its burst) is disconnected with 0x96 "message rate too high", without the
        /// message being accepted; a 3.1.1 client, which has no such code, has its socket paused
        /// until it is back within the rate. Other connections are not slowed.
        pub max_publish_rate: u32 = 0,
        /// Publishes a connection may send at once above `max_publish_rate` (0: one second's
        /// worth).
        pub publish_burst: u32 = 0,
        /// New connections per second from one source address (0: no limit); past it (and its
        /// burst) a CONNECT is refused with "connection rate exceeded" (3.1.1: 0x03, 5: 0x9F).
        /// Behind a load balancer every client has its address: leave it 0 there.
        pub max_connect_rate_per_ip: u32 = 0,
        /// New connections one source address may open at once above the rate (0: one
        /// second's worth).
        pub connect_burst_per_ip: u32 = 0,
        /// Address of the MQTT-over-TLS listener (conventionally port 8883), e.g.
        /// "0.0.0.0:8883"; empty for none. It serves 3.1.1 and 5 like `listen`, and needs
        /// `tls_cert_file` and `tls_key_file`.
        pub tls_listen: String = String::new(),
        /// The server's certificate chain, PEM, leaf first.
        pub tls_cert_file: String = String::new(),
        /// The server certificate's private key, PEM (PKCS#8, PKCS#1 or SEC1).
        pub tls_key_file: String = String::new(),
        /// CA certificates (PEM) that sign device certificates, for mutual TLS: a device that
        /// presents a certificate signed by one of them authenticates as the certificate's
        /// Common Name (its device id; a registry entry with a pinned fingerprint accepts only
        /// that certificate). Devices without a certificate still authenticate with their secret.
        /// Empty: no client certificates are asked for.
        pub tls_client_ca_file: String = String::new(),
        /// Seconds between checks of the TLS files; changed files are loaded for new
        /// connections without a restart (a set that does not load is logged and the previous
        /// one kept).
        pub tls_reload_secs: u64 = 60,
        /// Milliseconds a new TCP connection has to send CONNECT (and finish a TLS handshake)
        /// before it is dropped.
        pub connect_timeout_ms: u16 = 5_000,
        /// Size in MiB of one segment of the router's in-memory log. Each subscription filter has
        /// its own log of up to `commit_log_segments` segments: how far a subscriber may fall
        /// behind before the oldest messages for it are dropped, and what that costs in memory
        /// at most. Device data never depends on it: the bridge reads the ingest log.
        pub commit_log_segment_mib: usize = 16,
        /// Segments kept per subscription filter; see `commit_log_segment_mib`.
        pub commit_log_segments: usize = 8,
    }
}

impl MqttConfig {
    /// `tls_listen` as an address, when set and valid (validation reports it otherwise).
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_listen.parse().ok()
    }

    /// Checks values that parse but make no sense; each problem names its key.
    pub(crate) fn validate(&self, check: &mut impl FnMut(bool, &str, String)) {
        let m = self;
        check(
            m.max_connections >= 1,
            "mqtt.max_connections",
            "must be at least 1".into(),
        );
        check(
            (64..=256 * 1024 * 1024).contains(&m.max_payload_bytes),
            "mqtt.max_payload_bytes",
            format!(
                "must be between 64 and 268435456 (the MQTT limit), got {}",
                m.max_payload_bytes
            ),
        );
        check(
            m.tls_listen.is_empty() || m.tls_addr().is_some(),
            "mqtt.tls_listen",
            format!(
                "must be an address like \"0.0.0.0:8883\", got {:?}",
                m.tls_listen
            ),
        );
        check(
            m.tls_listen.is_empty() || (!m.tls_cert_file.is_empty() && !m.tls_key_file.is_empty()),
            "mqtt.tls_listen",
            "needs `mqtt.tls_cert_file` and `mqtt.tls_key_file` (PEM files)".into(),
        );
        check(
            m.tls_reload_secs >= 1,
            "mqtt.tls_reload_secs",
            "must be at least 1".into(),
        );
        check(
            (1..=65_535).contains(&m.max_inflight),
            "mqtt.max_inflight",
            format!("must be between 1 and 65535, got {}", m.max_inflight),
        );
        check(
            m.max_queued_messages >= 1,
            "mqtt.max_queued_messages",
            "must be at least 1".into(),
        );
        check(
            m.max_session_expiry_secs <= u64::from(u32::MAX),
            "mqtt.max_session_expiry_secs",
            format!(
                "must be at most 4294967295 (the MQTT limit), got {}",
                m.max_session_expiry_secs
            ),
        );
        check(
            (1..=1024).contains(&m.commit_log_segment_mib),
            "mqtt.commit_log_segment_mib",
            format!(
                "must be between 1 and 1024, got {}",
                m.commit_log_segment_mib
            ),
        );
        check(
            (2..=1024).contains(&m.commit_log_segments),
            "mqtt.commit_log_segments",
            format!("must be between 2 and 1024, got {}", m.commit_log_segments),
        );
    }
}
