//! Messina's side of MQTT besides the edge: the rumqttd router's configuration, the publisher of
//! alerts, presence and replies to devices (through the router's feeder, so subscribers get
//! them like any message), and the worker that answers upload requests.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use messina_bridge::alerts::Notice;
use rumqttd::protocol::PublishProperties;
use rumqttd::{ConnectionSettings, RouterConfig, ServerSettings};
use tokio::sync::{mpsc, Semaphore};

use crate::clock::now_millis;
use crate::edge::router::{Feed, FeedSender, Tag};
use crate::ingest::{UploadJob, PRESENCE_SOURCE};
use crate::json::{alert_json, presence_json, ticket_json, to_value, upload_json};
use crate::uploads::{UploadError, UploadRequest, UploadService};

/// Upload requests waiting for the upload worker; past this the ingest consumer answers "busy"
/// rather than wait, so telemetry never queues behind object storage.
pub const UPLOAD_QUEUE: usize = 256;
/// Upload requests handled at once (each may wait on object storage).
const UPLOAD_WORKERS: usize = 16;

/// The router's configuration: the edge's fan-out engine, and the bare-rumqttd benchmark host.
pub fn router_config(c: &messina_config::MqttConfig) -> RouterConfig {
    RouterConfig {
        // One subscriber link per subscribing session, plus the feeder.
        max_connections: c.max_connections + 1,
        max_outgoing_packet_count: 1_000,
        // The router's log holds what subscribers have not read yet, per filter.
        max_segment_size: c.commit_log_segment_mib << 20,
        max_segment_count: c.commit_log_segments,
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    }
}

/// A complete rumqttd configuration with its own listeners on `listen` and `listen_v5`, for the
/// bare-rumqttd benchmark host, so that it runs the router Messina runs.
pub fn rumqttd_config(c: &messina_config::MqttConfig) -> anyhow::Result<rumqttd::Config> {
    let connections = ConnectionSettings {
        connection_timeout_ms: c.connect_timeout_ms,
        max_payload_size: c.max_payload_bytes,
        max_inflight_count: 100,
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
        router: router_config(c),
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

/// Publishes alert transitions and presence (retained) and replies to devices (not retained),
/// at QoS 1, until both channels close.
pub fn spawn_publisher(
    feeder: FeedSender,
    mut notices: mpsc::Receiver<Notice>,
    mut replies: mpsc::Receiver<Reply>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let (mut notices_open, mut replies_open) = (true, true);
        while notices_open || replies_open {
            let (topic, payload, retain, properties) = tokio::select! {
                n = notices.recv(), if notices_open => match n {
                    Some(notice) => {
                        let (topic, payload) = notice_message(&notice);
                        (topic, payload, true, PublishProperties::default())
                    }
                    None => { notices_open = false; continue; }
                },
                r = replies.recv(), if replies_open => match r {
                    Some(reply) => (reply.topic, reply.payload, false, reply.properties.unwrap_or_default()),
                    None => { replies_open = false; continue; }
                },
            };
            let feed = Feed {
                topic: Bytes::from(topic),
                payload: Bytes::from(payload),
                retain,
                properties,
                tag: Tag {
                    qos: 1,
                    retain,
                    empty: false,
                    origin: 0,
                    received_at: now_millis(),
                    expiry: None,
                },
            };
            if feeder.send(feed).await.is_err() {
                tracing::warn!("the router stopped; alerts and replies are no longer published");
                break;
            }
        }
    })
}

/// The topic and JSON body of an alert transition or a presence change.
fn notice_message(notice: &Notice) -> (String, Vec<u8>) {
    let (topic, body) = match notice {
        Notice::Alert(a) => (
            messina_bridge::topics::alert(a.device.as_str(), &a.rule),
            to_value(alert_json(a)),
        ),
        Notice::Presence { device, online, at } => (
            messina_bridge::topics::presence(device.as_str()),
            to_value(presence_json(device, *online, *at, PRESENCE_SOURCE)),
        ),
    };
    (topic, body.to_string().into_bytes())
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
                let mut v = to_value(upload_json(&u));
                v["status"] = 200.into();
                v
            }),
            Err(e) => Err(e),
        }
    } else {
        match UploadRequest::parse(&job.payload) {
            Ok(request) => service.request(&job.device, request, now).await.map(|t| {
                let mut v = to_value(ticket_json(&t.upload, &t.url, &t.headers));
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
        // 3.1.1 subscribers get the message without properties (the edge's codec leaves them out).
        properties: Some(PublishProperties {
            correlation_data: job.correlation.clone(),
            content_type: Some("application/json".into()),
            ..Default::default()
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
