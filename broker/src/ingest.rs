//! The ingest consumer: reads the ingest log in order (from memory while it keeps up, from the
//! files after a restart or while it lags) and hands each record to whoever owns it: device data
//! to the bridge, wills and fleet managers' acknowledgements to the alert service, upload requests
//! to the upload worker. The bridge reports how far storage has caught up, and that position
//! becomes the log's checkpoint, so a crash replays exactly what was not stored yet.

use std::sync::Arc;

use bytes::Bytes;
use messina_bridge::alerts::AlertService;
use messina_bridge::topics::{self, Topic};
use messina_bridge::{BridgeHandle, Inbound};
use messina_log::{Entry, Log, Reader};
use messina_storage::DeviceId;
use tokio::sync::mpsc;

/// The record kind of a device PUBLISH (the only kind so far).
pub const KIND_PUBLISH: u8 = 1;
/// Records handed to the consumer's dispatch at once.
const READ_BATCH: usize = 1024;
/// A will or upload request replayed after a restart is acted on only while it is this recent: an
/// older request has timed out on the device, which asks again.
const REPLAY_TTL_MS: i64 = 60_000;

/// What of a PUBLISH the log keeps besides topic and payload: the MQTT 5 properties an upload
/// reply needs. Encoded as `version u8 | len u16 | response topic | correlation data`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Meta {
    pub response_topic: Option<String>,
    pub correlation: Option<Bytes>,
}

impl Meta {
    const VERSION: u8 = 1;

    /// Encodes into `out`; empty when there is nothing to keep (most messages).
    pub fn encode(&self, out: &mut Vec<u8>) {
        if self.response_topic.is_none() && self.correlation.is_none() {
            return;
        }
        out.push(Self::VERSION);
        let topic = self.response_topic.as_deref().unwrap_or("");
        let len = u16::try_from(topic.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&topic.as_bytes()[..usize::from(len)]);
        if let Some(c) = &self.correlation {
            out.extend_from_slice(c);
        }
    }

    /// Decodes what [`Meta::encode`] wrote; anything else (a newer version) reads as no metadata.
    pub fn decode(meta: &Bytes) -> Meta {
        let Some((&Self::VERSION, rest)) = meta.split_first() else {
            return Meta::default();
        };
        if rest.len() < 2 {
            return Meta::default();
        }
        let len = usize::from(u16::from_le_bytes([rest[0], rest[1]]));
        let Some(topic) = rest.get(2..2 + len) else {
            return Meta::default();
        };
        let correlation = meta.slice(3 + len..);
        Meta {
            response_topic: (!topic.is_empty())
                .then(|| String::from_utf8_lossy(topic).into_owned()),
            correlation: (!correlation.is_empty()).then_some(correlation),
        }
    }
}

/// Where the consumer sends what is not the bridge's.
pub struct Dispatch {
    pub bridge: BridgeHandle,
    pub alerts: Option<Arc<AlertService>>,
    pub uploads: Option<mpsc::Sender<UploadJob>>,
}

/// Reads the log from `from` until it is closed and fully read, then drops the bridge handle so
/// the bridge drains and ends. Records before `replay_end` were appended before this start.
pub fn spawn_consumer(
    log: &Log,
    from: u64,
    replay_end: u64,
    dispatch: Dispatch,
) -> tokio::task::JoinHandle<()> {
    let reader = log.reader(from);
    tokio::spawn(consume(reader, replay_end, dispatch))
}

async fn consume(mut reader: Reader, replay_end: u64, dispatch: Dispatch) {
    let mut replayed = 0u64;
    loop {
        let entries = match reader.next_batch(READ_BATCH).await {
            Ok(Some(entries)) => entries,
            Ok(None) => break,
            Err(e) => {
                tracing::error!(
                    error = %e,
                    position = reader.position(),
                    "cannot read the ingest log; device messages are no longer stored: restart \
                     Messina (it replays from the last checkpoint) and check the disk"
                );
                break;
            }
        };
        for entry in entries {
            if entry.pos < replay_end {
                replayed += 1;
                if entry.end >= replay_end {
                    tracing::info!(records = replayed, "ingest log replayed");
                }
            }
            if dispatch.one(entry, replay_end).await.is_err() {
                tracing::error!("the bridge stopped; device messages are no longer stored");
                return;
            }
        }
    }
    tracing::debug!("ingest log read to its end");
}

impl Dispatch {
    async fn one(&self, entry: Entry, replay_end: u64) -> Result<(), messina_bridge::BridgeClosed> {
        if entry.kind != KIND_PUBLISH {
            tracing::warn!(
                kind = entry.kind,
                position = entry.pos,
                "ingest log record of an unknown kind skipped (written by a newer Messina?)"
            );
            return self.bridge.pass(entry.end).await;
        }
        let inbound = Inbound {
            pos: entry.pos,
            end: entry.end,
            topic: String::from_utf8_lossy(&entry.topic).into_owned(),
            payload: entry.payload,
            received_at: entry.received_at,
        };
        let stale = entry.pos < replay_end
            && crate::clock::now_millis() - inbound.received_at > REPLAY_TTL_MS;
        if let Some(job) = UploadJob::parse(&inbound, Meta::decode(&entry.meta)) {
            match &self.uploads {
                Some(_) if stale => {
                    tracing::debug!(topic = %inbound.topic, "replayed upload request too old; skipped");
                }
                Some(uploads) => {
                    if uploads.try_send(job).is_err() {
                        metrics::counter!("messina_upload_requests_dropped_total").increment(1);
                        tracing::warn!(
                            topic = %inbound.topic,
                            "upload worker busy; request dropped (the device retries)"
                        );
                    }
                }
                None => tracing::info!(
                    topic = %inbound.topic,
                    "upload request ignored: uploads are disabled"
                ),
            }
            return self.bridge.pass(inbound.end).await;
        }
        if let Some(control) = Control::parse(&inbound.topic, &inbound.payload) {
            if let Some(alerts) = &self.alerts {
                if !(stale && matches!(control, Control::Will(_))) {
                    control.apply(alerts, inbound.received_at).await;
                }
            }
            return self.bridge.pass(inbound.end).await;
        }
        self.bridge.send(inbound).await
    }
}

/// Marks presence messages Messina publishes, so its own ingest ignores them; any other message
/// on `devices/{id}/presence` is a device's will.
pub const PRESENCE_SOURCE: &str = "messina";

/// A message for the alert service rather than the bridge.
enum Control {
    /// A device's will message on `devices/{id}/presence`: its connection was lost.
    Will(DeviceId),
    /// `alerts/{device}/{rule}/ack`, the payload naming who acknowledges.
    Ack(DeviceId, String, String),
    /// Messina's own presence message, come back on the ingest subscription.
    Own,
}

impl Control {
    fn parse(topic: &str, payload: &[u8]) -> Option<Control> {
        match Topic::parse(topic) {
            Topic::Presence(id) => {
                let ours = serde_json::from_slice::<serde_json::Value>(payload)
                    .is_ok_and(|v| v["source"] == PRESENCE_SOURCE);
                if ours {
                    return Some(Control::Own);
                }
                Some(Control::Will(DeviceId::new(id).ok()?))
            }
            Topic::AlertAck { device, rule } => {
                let by = String::from_utf8_lossy(payload)
                    .trim()
                    .chars()
                    .take(128)
                    .collect::<String>();
                let by = if by.is_empty() {
                    "mqtt".to_string()
                } else {
                    by
                };
                Some(Control::Ack(
                    DeviceId::new(device).ok()?,
                    rule.to_string(),
                    by,
                ))
            }
            // Anything else, including these topics with an invalid device id, goes to the bridge,
            // which stores what it cannot use as a dead letter with the reason.
            _ => None,
        }
    }

    async fn apply(self, alerts: &AlertService, at: i64) {
        match self {
            Control::Will(device) => alerts.connection_lost(&device, at).await,
            Control::Ack(device, rule, by) => {
                if let Err(e) = alerts.ack_rule(&device, &rule, &by, at).await {
                    tracing::info!(error = %e, "acknowledgement over MQTT ignored");
                }
            }
            Control::Own => {}
        }
    }
}

/// A device's upload request or completion, taken off the ingest log for the upload worker.
#[derive(Debug)]
pub struct UploadJob {
    pub device: DeviceId,
    pub done: bool,
    pub payload: Bytes,
    /// MQTT 5 Response Topic and Correlation Data of the request, when given.
    pub response_topic: Option<String>,
    pub correlation: Option<Bytes>,
}

impl UploadJob {
    fn parse(inbound: &Inbound, meta: Meta) -> Option<UploadJob> {
        let parts: Vec<&str> = inbound.topic.split('/').collect();
        let (id, done) = match parts.as_slice() {
            ["devices", id, "uploads", "request"] => (*id, false),
            ["devices", id, "uploads", "done"] => (*id, true),
            _ => return None,
        };
        // A topic with an invalid id goes to the bridge, which keeps it as a dead letter.
        let device = DeviceId::new(id).ok()?;
        Some(UploadJob {
            device,
            done,
            payload: inbound.payload.clone(),
            response_topic: meta.response_topic,
            correlation: meta.correlation,
        })
    }

    /// Where the reply goes: the request's Response Topic when it stays under the device's own
    /// `devices/{id}/` (a device must not make Messina publish elsewhere), else
    /// `devices/{id}/uploads/response`.
    pub fn reply_topic(&self) -> String {
        match &self.response_topic {
            Some(t) if topics::readable_by(t, self.device.as_str()) => t.clone(),
            _ => topics::upload_response(self.device.as_str()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_round_trips_and_is_empty_when_there_is_nothing() {
        let mut out = Vec::new();
        Meta::default().encode(&mut out);
        assert!(out.is_empty());
        assert_eq!(Meta::decode(&Bytes::new()), Meta::default());
        for meta in [
            Meta {
                response_topic: Some("devices/d1/r".into()),
                correlation: Some(Bytes::from_static(b"\x00\x01c")),
            },
            Meta {
                response_topic: None,
                correlation: Some(Bytes::from_static(b"id-7")),
            },
            Meta {
                response_topic: Some("devices/d1/x".into()),
                correlation: None,
            },
        ] {
            let mut out = Vec::new();
            meta.encode(&mut out);
            assert_eq!(Meta::decode(&Bytes::from(out)), meta);
        }
        // A record from a newer format reads as no metadata rather than garbage.
        assert_eq!(
            Meta::decode(&Bytes::from_static(b"\x09abc")),
            Meta::default()
        );
        assert_eq!(
            Meta::decode(&Bytes::from_static(b"\x01\xff")),
            Meta::default()
        );
    }
}
