//! The embedded rumqttd broker: its configuration built in code (no console, no rumqttd Prometheus
//! listener, whose default port is the CQL port 9042), the local link that feeds device messages to
//! the bridge, and the broker's own meters re-exported to our metrics recorder.

use std::collections::HashMap;
use std::thread;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use messina_bridge::{BridgeHandle, Inbound};
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::{Broker, ConnectionSettings, Meter, Notification, RouterConfig, ServerSettings};
use tokio_util::sync::CancellationToken;

/// Topic filters the bridge consumes.
pub const DEVICE_FILTERS: [&str; 2] = ["devices/+/telemetry", "devices/+/events"];

/// Client id of the bridge's local link; it counts as one connection in the router.
const BRIDGE_CLIENT_ID: &str = "messina-bridge";

fn rumqttd_config(c: &messina_config::MqttConfig) -> anyhow::Result<rumqttd::Config> {
    let connections = ConnectionSettings {
        connection_timeout_ms: c.connect_timeout_ms,
        max_payload_size: c.max_payload_bytes,
        max_inflight_count: c.max_inflight,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = |name: &str, listen| ServerSettings {
        name: name.to_string(),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections: connections.clone(),
    };
    // `MetricSettings` has private fields, so that one part goes through serde. rumqttd 0.20's
    // timer thread panics unless both intervals are set.
    let metrics = serde_json::from_value(serde_json::json!({
        "meters": {"push_interval": 1},
        "alerts": {"push_interval": 60},
    }))
    .context("building the broker's meter settings")?;
    Ok(rumqttd::Config {
        id: 0,
        router: RouterConfig {
            // One more for the bridge's own local link.
            max_connections: c.max_connections + 1,
            max_outgoing_packet_count: 1_000,
            // The commit log holds what subscribers (the bridge among them) have not read yet.
            max_segment_size: c.commit_log_segment_mib << 20,
            max_segment_count: c.commit_log_segments,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("v4".to_string(), server("v4", c.listen))])),
        v5: Some(HashMap::from([(
            "v5".to_string(),
            server("v5", c.listen_v5),
        )])),
        ws: None,
        cluster: None,
        console: None,
        bridge: None,
        prometheus: None,
        metrics: Some(metrics),
    })
}

/// The running embedded broker. rumqttd has no shutdown: its listener threads end with the process.
pub struct EmbeddedBroker {
    link: Option<(LinkTx, LinkRx)>,
    meters: Option<rumqttd::meters::MetersLink>,
}

impl EmbeddedBroker {
    /// Starts the router and the listeners; fails when a listener address cannot be bound.
    pub fn start(c: &messina_config::MqttConfig) -> anyhow::Result<Self> {
        // rumqttd logs a bind failure in its own thread and carries on, so check the addresses
        // first to fail with a clear message instead.
        for (key, addr) in [("mqtt.listen", c.listen), ("mqtt.listen_v5", c.listen_v5)] {
            std::net::TcpListener::bind(addr).with_context(|| {
                format!("cannot listen on {addr} (`{key}`); is another broker running there?")
            })?;
        }
        let mut broker = Broker::new(rumqttd_config(c)?);
        let mut link = broker
            .link(BRIDGE_CLIENT_ID)
            .context("connecting the bridge link to the broker")?;
        for filter in DEVICE_FILTERS {
            link.0
                .subscribe(filter)
                .with_context(|| format!("subscribing the bridge to {filter}"))?;
        }
        let meters = broker.meters().context("connecting the broker meters")?;
        thread::Builder::new()
            .name("rumqttd".into())
            .spawn(move || {
                if let Err(e) = broker.start() {
                    tracing::error!(error = %e, "embedded MQTT broker stopped");
                }
            })
            .context("starting the broker thread")?;
        Ok(EmbeddedBroker {
            link: Some(link),
            meters: Some(meters),
        })
    }

    /// Moves device messages from the broker to the bridge until `shutdown`. Waiting on the bridge
    /// queue holds back the link, so a slow bridge is never outrun inside this process.
    pub fn spawn_ingest(
        &mut self,
        bridge: BridgeHandle,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let (link_tx, mut link_rx) = self.link.take().expect("ingest started once");
        tokio::spawn(async move {
            // The sending half must live as long as the link, or the router drops the connection.
            let _link_tx = link_tx;
            loop {
                let next = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => break,
                    next = link_rx.next() => next,
                };
                match next {
                    Ok(Some(Notification::Forward(forward))) => {
                        let inbound = Inbound {
                            topic: String::from_utf8_lossy(&forward.publish.topic).into_owned(),
                            payload: forward.publish.payload,
                            received_at: now_millis(),
                        };
                        if bridge.send(inbound).await.is_err() {
                            tracing::error!("bridge stopped; no longer consuming device messages");
                            break;
                        }
                    }
                    // After a burst the router unschedules the link until it says it is ready.
                    Ok(Some(Notification::Unschedule)) => {
                        if let Err(e) = link_rx.wake().await {
                            tracing::error!(error = %e, "broker link closed");
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "broker link closed");
                        break;
                    }
                }
            }
        })
    }

    /// Re-exports the broker's router meters (rumqttd records to its own `metrics` version, which
    /// does not reach our recorder).
    pub fn spawn_meters(&mut self, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        let meters = self.meters.take().expect("meters started once");
        tokio::spawn(async move {
            let connections = metrics::gauge!("messina_mqtt_connections");
            let publishes = metrics::counter!("messina_mqtt_publishes_total");
            let failed = metrics::counter!("messina_mqtt_failed_publishes_total");
            loop {
                let batch = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    batch = meters.next() => batch,
                };
                let Ok(batch) = batch else { break };
                for meter in batch {
                    if let Meter::Router(_, r) = meter {
                        connections.set(r.total_connections.saturating_sub(1) as f64);
                        publishes.increment(r.total_publishes as u64);
                        failed.increment(r.failed_publishes as u64);
                    }
                }
            }
        })
    }
}

pub fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
