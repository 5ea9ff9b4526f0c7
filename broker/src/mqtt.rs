//! The embedded rumqttd broker: its configuration built in code (no console, no rumqttd Prometheus
//! listener, whose default port is the CQL port 9042), the local link that feeds device messages to
//! the bridge, and the broker's own meters re-exported to our metrics recorder.

use std::collections::HashMap;
use std::thread;
use std::time::{SystemTime, UNIX_EPOCH};

use std::sync::Arc;

use anyhow::Context;
use messina_bridge::alerts::Notice;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{Packet, Publish, PublishProperties};
use rumqttd::{Broker, ConnectionSettings, Meter, Notification, RouterConfig, ServerSettings};
use tokio::sync::{mpsc, Semaphore};

use crate::ingest::{Meta, UploadJob, KIND_PUBLISH, PRESENCE_SOURCE};
use crate::uploads::{upload_json, UploadError, UploadRequest, UploadService};
use tokio_util::sync::CancellationToken;

/// Topic filters the ingest link consumes: device data for the bridge, device wills (presence) and
/// fleet managers' acknowledgements for the alert service, devices' upload requests and
/// completions for the upload service.
pub const INGEST_FILTERS: [&str; 6] = [
    "devices/+/telemetry",
    "devices/+/events",
    "devices/+/presence",
    "alerts/+/+/ack",
    "devices/+/uploads/request",
    "devices/+/uploads/done",
];

/// Upload requests waiting for the upload worker; past this the ingest link answers "busy" rather
/// than wait, so telemetry never queues behind object storage.
pub const UPLOAD_QUEUE: usize = 256;
/// Upload requests handled at once (each may wait on object storage).
const UPLOAD_WORKERS: usize = 16;

/// Client ids of Messina's local links; each counts as one connection in the router.
const BRIDGE_CLIENT_ID: &str = "messina-bridge";
const PUBLISHER_CLIENT_ID: &str = "messina-publisher";
/// Local links Messina itself holds open (not clients).
const OWN_LINKS: usize = 2;

/// The embedded broker's rumqttd configuration, built in code; also used by the bare-rumqttd
/// benchmark host so both run the same broker settings.
pub fn rumqttd_config(c: &messina_config::MqttConfig) -> anyhow::Result<rumqttd::Config> {
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
            max_connections: c.max_connections + OWN_LINKS,
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
    publisher: Option<(LinkTx, LinkRx)>,
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
        for filter in INGEST_FILTERS {
            link.0
                .subscribe(filter)
                .with_context(|| format!("subscribing the bridge to {filter}"))?;
        }
        let publisher = broker
            .link(PUBLISHER_CLIENT_ID)
            .context("connecting the publisher link to the broker")?;
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
            publisher: Some(publisher),
            meters: Some(meters),
        })
    }

    /// Appends every device message the broker delivers to the ingest log until `shutdown`. An
    /// append waits while the log is full, which holds back the link: the broker's commit log
    /// absorbs the rest (rumqttd has acknowledged it already; the device edge replaces this).
    pub fn spawn_appender(
        &mut self,
        log: messina_log::Log,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let (link_tx, mut link_rx) = self.link.take().expect("appender started once");
        tokio::spawn(async move {
            // The sending half must live as long as the link, or the router drops the connection.
            let _link_tx = link_tx;
            let mut gaps = CommitLogGaps::default();
            let mut meta = Vec::new();
            loop {
                let next = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => break,
                    next = link_rx.next() => next,
                };
                match next {
                    Ok(Some(Notification::Forward(forward))) => {
                        gaps.observe(&forward.publish.topic, forward.cursor);
                        meta.clear();
                        if let Some(p) = forward.properties {
                            Meta {
                                response_topic: p.response_topic,
                                correlation: p.correlation_data,
                            }
                            .encode(&mut meta);
                        }
                        let record = messina_log::Record {
                            kind: KIND_PUBLISH,
                            flags: 0,
                            received_at: now_millis(),
                            topic: &forward.publish.topic,
                            meta: &meta,
                            payload: &forward.publish.payload,
                        };
                        if let Err(e) = log.append(record).await {
                            match e {
                                messina_log::LogError::Closed => {}
                                e => tracing::error!(
                                    error = %e,
                                    "cannot append to the ingest log; device messages are no                                      longer accepted: check the disk of `ingest_log.path`"
                                ),
                            }
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

    /// Publishes alert transitions and presence (retained) and replies to devices (not
    /// retained), until both channels close.
    pub fn spawn_publisher(
        &mut self,
        mut notices: mpsc::Receiver<Notice>,
        mut replies: mpsc::Receiver<Reply>,
    ) -> tokio::task::JoinHandle<()> {
        let (mut link_tx, link_rx) = self.publisher.take().expect("publisher started once");
        tokio::spawn(async move {
            // The receiving half must stay open, or the router drops the link.
            let _link_rx = link_rx;
            let (mut notices_open, mut replies_open) = (true, true);
            while notices_open || replies_open {
                let notice = tokio::select! {
                    n = notices.recv(), if notices_open => match n {
                        Some(n) => n,
                        None => { notices_open = false; continue; }
                    },
                    r = replies.recv(), if replies_open => {
                        let Some(reply) = r else { replies_open = false; continue; };
                        let publish = Publish::new(bytes::Bytes::from(reply.topic), bytes::Bytes::from(reply.payload), false);
                        if let Err(e) = link_tx.send(Packet::Publish(publish, reply.properties)).await {
                            tracing::error!(error = %e, "publisher link closed; replies are no longer published");
                            break;
                        }
                        continue;
                    }
                };
                let (topic, payload) = match &notice {
                    Notice::Alert(a) => (
                        format!("alerts/{}/{}", a.device, a.rule),
                        crate::http::alert_json(a).to_string(),
                    ),
                    Notice::Presence { device, online, at } => (
                        format!("devices/{device}/presence"),
                        serde_json::json!({
                            "device_id": device.as_str(),
                            "online": online,
                            "at": crate::http::rfc3339(*at),
                            "source": PRESENCE_SOURCE,
                        })
                        .to_string(),
                    ),
                };
                let publish = Publish::new(topic, payload, true);
                if let Err(e) = link_tx.send(Packet::Publish(publish, None)).await {
                    tracing::error!(error = %e, "publisher link closed; alerts are no longer published");
                    break;
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

/// Detects messages rumqttd dropped from a filter's commit log before the bridge read them: the
/// log's offsets are consecutive per filter, so a jump between two forwards of one filter is the
/// number of messages lost (acknowledged to their publishers, never stored). This happens when the
/// bridge falls behind by more than `mqtt.commit_log_segments` × `mqtt.commit_log_segment_mib`.
#[derive(Default)]
struct CommitLogGaps {
    last: HashMap<&'static str, u64>,
}

impl CommitLogGaps {
    /// Records a forward's position; returns how many messages of its filter were skipped.
    fn observe(&mut self, topic: &[u8], cursor: Option<(u64, u64)>) -> u64 {
        let Some((_, offset)) = cursor else { return 0 };
        let Some(filter) = filter_of(topic) else {
            return 0;
        };
        if let Some(previous) = self.last.insert(filter, offset) {
            if offset > previous + 1 {
                let lost = offset - previous - 1;
                metrics::counter!("messina_broker_dropped_total", "filter" => filter)
                    .increment(lost);
                tracing::error!(
                    filter,
                    lost,
                    "the broker dropped messages the bridge had not read yet (acknowledged, not stored); \
                     the bridge is behind: raise mqtt.commit_log_segments or reduce the load"
                );
                return lost;
            }
        }
        0
    }
}

/// Which of the ingest filters a topic came through.
fn filter_of(topic: &[u8]) -> Option<&'static str> {
    let topic = std::str::from_utf8(topic).ok()?;
    let parts: Vec<&str> = topic.split('/').collect();
    INGEST_FILTERS.into_iter().find(|f| {
        let f: Vec<&str> = f.split('/').collect();
        f.len() == parts.len() && f.iter().zip(&parts).all(|(a, b)| *a == "+" || a == b)
    })
}

/// A message from Messina to one device, not retained.
#[derive(Debug)]
pub struct Reply {
    pub topic: String,
    pub payload: Vec<u8>,
    pub properties: Option<PublishProperties>,
}

/// Answers upload jobs, at most `UPLOAD_WORKERS` at once, until the job channel closes; each
/// answer goes to the publisher as a reply.
pub fn spawn_upload_worker(
    service: Arc<UploadService>,
    mut jobs: mpsc::Receiver<UploadJob>,
    replies: mpsc::Sender<Reply>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let permits = Arc::new(Semaphore::new(UPLOAD_WORKERS));
        let mut running = tokio::task::JoinSet::new();
        while let Some(job) = jobs.recv().await {
            let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
                break;
            };
            let (service, replies) = (Arc::clone(&service), replies.clone());
            running.spawn(async move {
                let reply = answer(&service, &job).await;
                let _permit = permit;
                let _ = replies.send(reply).await;
            });
            // Reap finished answers so the set stays as small as the work in flight.
            while running.try_join_next().is_some() {}
        }
        while running.join_next().await.is_some() {}
    })
}

async fn answer(service: &UploadService, job: &UploadJob) -> Reply {
    let now = now_millis();
    let result = if job.done {
        let id = upload_id_of(&job.payload);
        match id {
            Ok(id) => service.complete(&job.device, &id, now).await.map(|u| {
                let mut v = upload_json(&u);
                v["status"] = 200.into();
                v
            }),
            Err(e) => Err(e),
        }
    } else {
        match UploadRequest::parse(&job.payload) {
            Ok(request) => service.request(&job.device, request, now).await.map(|t| {
                let mut v = t.json();
                v["status"] = 201.into();
                v
            }),
            Err(e) => Err(e),
        }
    };
    let body = result.unwrap_or_else(|e| {
        if matches!(e, UploadError::Unavailable(_) | UploadError::Fatal(_)) {
            tracing::warn!(error = %e, device = %job.device, "upload request over MQTT failed");
        }
        let mut v = serde_json::json!({"status": e.status(), "detail": e.to_string()});
        if let UploadError::Invalid { field, .. } = &e {
            v["parameter"] = (*field).into();
        }
        v
    });
    let mut body = body;
    body["request"] = if job.done { "done" } else { "request" }.into();
    Reply {
        topic: job.reply_topic(),
        payload: body.to_string().into_bytes(),
        // Properties only answer a request that had them (MQTT 5): rumqttd's 3.1.1 writer cannot
        // encode a PUBLISH with properties and drops the subscriber's connection instead.
        properties: (job.correlation.is_some() || job.response_topic.is_some()).then(|| {
            PublishProperties {
                correlation_data: job.correlation.clone(),
                content_type: Some("application/json".into()),
                ..Default::default()
            }
        }),
    }
}

/// The upload id a `done` message names: `{"upload_id": "..."}` (JSON or MessagePack) or the bare
/// id as text.
fn upload_id_of(payload: &[u8]) -> Result<String, UploadError> {
    #[derive(serde::Deserialize)]
    struct Done {
        upload_id: String,
    }
    let parsed = if payload.first() == Some(&b'{') {
        serde_json::from_slice::<Done>(payload).ok()
    } else {
        rmp_serde::from_slice::<Done>(payload).ok()
    };
    if let Some(d) = parsed {
        return Ok(d.upload_id);
    }
    match std::str::from_utf8(payload) {
        Ok(s) if !s.trim().is_empty() && !s.contains(['{', ' ']) => Ok(s.trim().to_string()),
        _ => Err(UploadError::Invalid {
            field: "upload_id",
            detail: "the body must be {\"upload_id\": \"...\"} or the bare upload id".into(),
        }),
    }
}

pub fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_map_to_their_ingest_filter() {
        assert_eq!(
            filter_of(b"devices/d1/telemetry"),
            Some("devices/+/telemetry")
        );
        assert_eq!(
            filter_of(b"devices/d1/uploads/done"),
            Some("devices/+/uploads/done")
        );
        assert_eq!(
            filter_of(b"alerts/d1/battery_low/ack"),
            Some("alerts/+/+/ack")
        );
        assert_eq!(filter_of(b"devices/d1/other"), None);
    }

    #[test]
    fn offset_jumps_per_filter_are_counted_as_drops() {
        let mut gaps = CommitLogGaps::default();
        let seen = [
            (&b"devices/a/telemetry"[..], (0, 10)),
            (b"devices/b/events", (0, 3)),
            (b"devices/a/telemetry", (0, 11)),
            // 100 telemetry messages were dropped; the events filter has its own offsets.
            (b"devices/c/telemetry", (1, 112)),
            (b"devices/b/events", (0, 4)),
            (b"devices/c/telemetry", (1, 113)),
        ];
        let lost: Vec<u64> = seen
            .iter()
            .map(|(t, c)| gaps.observe(t, Some(*c)))
            .collect();
        assert_eq!(lost, vec![0, 0, 0, 100, 0, 0]);
        assert_eq!(gaps.observe(b"devices/c/telemetry", None), 0);
    }
}
