//! The topic catalogue: every topic of the MQTT contract, parsed in one place (without allocating:
//! this runs for every message) and built in one place. The ingest filter, the bridge's routing,
//! the alert service's control messages and the edge's access lists all read topics through
//! [`Topic::parse`].

/// A topic of the MQTT contract, borrowing its device id and rule segments. Segments are not
/// validated here (one may even be empty): a device id that is not a valid
/// [`DeviceId`](messina_storage::DeviceId) is the consumer's to reject, with a reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic<'a> {
    /// `devices/{id}/telemetry`: readings from the device.
    Telemetry(&'a str),
    /// `devices/{id}/events`: discrete events from the device.
    Events(&'a str),
    /// `devices/{id}/presence`: Messina's retained presence, or the device's will.
    Presence(&'a str),
    /// `devices/{id}/uploads/request`: the device asks for an upload URL.
    UploadRequest(&'a str),
    /// `devices/{id}/uploads/done`: the device says an upload finished.
    UploadDone(&'a str),
    /// `devices/{id}/uploads/response`: Messina's reply to an upload request.
    UploadResponse(&'a str),
    /// `devices/{id}/commands` and anything below it: messages to the device.
    Command(&'a str),
    /// `devices/{id}/replies` and anything below it: replies to the device's requests (MQTT 5
    /// Response Topics).
    Reply(&'a str),
    /// Any other topic under `devices/{id}/`.
    DeviceOther(&'a str),
    /// `alerts/{id}/{rule}`: Messina's retained alert state.
    AlertState { device: &'a str, rule: &'a str },
    /// `alerts/{id}/{rule}/ack`: a fleet manager acknowledges an alert.
    AlertAck { device: &'a str, rule: &'a str },
    /// Not a topic of the contract.
    Other,
}

impl<'a> Topic<'a> {
    pub fn parse(topic: &'a str) -> Topic<'a> {
        if let Some(rest) = topic.strip_prefix("devices/") {
            let Some((id, leaf)) = rest.split_once('/') else {
                return Topic::Other;
            };
            return match leaf {
                "telemetry" => Topic::Telemetry(id),
                "events" => Topic::Events(id),
                "presence" => Topic::Presence(id),
                "uploads/request" => Topic::UploadRequest(id),
                "uploads/done" => Topic::UploadDone(id),
                "uploads/response" => Topic::UploadResponse(id),
                _ if leaf == "commands" || leaf.starts_with("commands/") => Topic::Command(id),
                _ if leaf == "replies" || leaf.starts_with("replies/") => Topic::Reply(id),
                _ => Topic::DeviceOther(id),
            };
        }
        if let Some(rest) = topic.strip_prefix("alerts/") {
            let mut parts = rest.split('/');
            return match (parts.next(), parts.next(), parts.next(), parts.next()) {
                (Some(device), Some(rule), None, None) => Topic::AlertState { device, rule },
                (Some(device), Some(rule), Some("ack"), None) => Topic::AlertAck { device, rule },
                _ => Topic::Other,
            };
        }
        Topic::Other
    }

    /// The device the topic belongs to.
    pub fn device(&self) -> Option<&'a str> {
        match *self {
            Topic::Telemetry(d)
            | Topic::Events(d)
            | Topic::Presence(d)
            | Topic::UploadRequest(d)
            | Topic::UploadDone(d)
            | Topic::UploadResponse(d)
            | Topic::Command(d)
            | Topic::Reply(d)
            | Topic::DeviceOther(d) => Some(d),
            Topic::AlertState { device, .. } | Topic::AlertAck { device, .. } => Some(device),
            Topic::Other => None,
        }
    }

    /// Whether messages on it go into the ingest log: device data for the bridge, wills and
    /// acknowledgements for the alert service, upload requests and completions.
    pub fn is_ingest(&self) -> bool {
        matches!(
            self,
            Topic::Telemetry(_)
                | Topic::Events(_)
                | Topic::Presence(_)
                | Topic::UploadRequest(_)
                | Topic::UploadDone(_)
                | Topic::AlertAck { .. }
        )
    }

    /// Whether only Messina may publish on it: presence, alert state and upload replies are
    /// Messina's own voice, so a client publishing there would forge it.
    pub fn is_messina_owned(&self) -> bool {
        matches!(
            self,
            Topic::Presence(_) | Topic::AlertState { .. } | Topic::UploadResponse(_)
        )
    }
}

/// Whether `topic` is one the device `device` may read: its upload replies, commands and replies
/// (a topic with a wildcard is none of them).
pub fn readable_by(topic: &str, device: &str) -> bool {
    !topic.contains(['+', '#'])
        && matches!(
            Topic::parse(topic),
            Topic::UploadResponse(d) | Topic::Command(d) | Topic::Reply(d) if d == device
        )
}

/// The subscription filters that cover every ingest topic (see [`Topic::is_ingest`]).
pub const INGEST_FILTERS: [&str; 6] = [
    "devices/+/telemetry",
    "devices/+/events",
    "devices/+/presence",
    "alerts/+/+/ack",
    "devices/+/uploads/request",
    "devices/+/uploads/done",
];

/// `devices/{id}/presence`.
pub fn presence(device: &str) -> String {
    format!("devices/{device}/presence")
}

/// `alerts/{id}/{rule}`.
pub fn alert(device: &str, rule: &str) -> String {
    format!("alerts/{device}/{rule}")
}

/// `devices/{id}/uploads/response`.
pub fn upload_response(device: &str) -> String {
    format!("devices/{device}/uploads/response")
}

/// `devices/{id}/{telemetry|events}`.
pub fn device_data(device: &str, kind: crate::Kind) -> String {
    format!("devices/{device}/{}", kind.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_topic_of_the_contract() {
        let cases = [
            ("devices/d1/telemetry", Topic::Telemetry("d1")),
            ("devices/d1/events", Topic::Events("d1")),
            ("devices/d1/presence", Topic::Presence("d1")),
            ("devices/d1/uploads/request", Topic::UploadRequest("d1")),
            ("devices/d1/uploads/done", Topic::UploadDone("d1")),
            ("devices/d1/uploads/response", Topic::UploadResponse("d1")),
            ("devices/d1/commands", Topic::Command("d1")),
            ("devices/d1/commands/reboot", Topic::Command("d1")),
            ("devices/d1/commandsx", Topic::DeviceOther("d1")),
            ("devices/d1/replies/7", Topic::Reply("d1")),
            ("devices/d1/telemetry/x", Topic::DeviceOther("d1")),
            ("devices/d1/other", Topic::DeviceOther("d1")),
            (
                "alerts/d1/battery_low",
                Topic::AlertState {
                    device: "d1",
                    rule: "battery_low",
                },
            ),
            (
                "alerts/d1/battery_low/ack",
                Topic::AlertAck {
                    device: "d1",
                    rule: "battery_low",
                },
            ),
            ("alerts/d1", Topic::Other),
            ("alerts/d1/a/b/ack", Topic::Other),
            ("devices/d1", Topic::Other),
            ("devices//telemetry", Topic::Telemetry("")),
            ("telemetry", Topic::Other),
            ("$SYS/x", Topic::Other),
        ];
        for (topic, want) in cases {
            assert_eq!(Topic::parse(topic), want, "{topic}");
        }
    }

    #[test]
    fn ingest_topics_are_those_the_ingest_filters_cover() {
        let covered = |t: &str| {
            INGEST_FILTERS.iter().any(|f| {
                let (f, t): (Vec<_>, Vec<_>) = (f.split('/').collect(), t.split('/').collect());
                f.len() == t.len() && f.iter().zip(&t).all(|(f, t)| *f == "+" || f == t)
            })
        };
        for t in [
            "devices/d1/telemetry",
            "devices/d1/events",
            "devices/d1/presence",
            "alerts/d1/battery_low/ack",
            "devices/d1/uploads/request",
            "devices/d1/uploads/done",
            "devices/d1/uploads/response",
            "devices/d1/commands/x",
            "devices/d1/other",
            "alerts/d1/battery_low",
            "alerts/d1/a/b/ack",
            "other/topic",
        ] {
            assert_eq!(Topic::parse(t).is_ingest(), covered(t), "{t}");
        }
    }
}
