//! What a connected principal may publish and subscribe to, decided before PUBACK and SUBACK.
//!
//! - A **device** publishes only under `devices/{own id}/` (not its presence but as its will,
//!   not its upload replies, commands or replies, which others write to it) and subscribes only
//!   to its own inbox: `devices/{own id}/uploads/response`, `devices/{own id}/commands[/…]` and
//!   `devices/{own id}/replies[/…]` (wildcards only after those).
//! - A **fleet manager** publishes only alert acknowledgements (`alerts/{id}/{rule}/ack`) and
//!   subscribes to alerts (`alerts/…`) and presence (`devices/{id or +}/presence`).
//! - A **service** publishes and subscribes to anything.
//! - Nobody but Messina publishes presence, alert state or upload replies; a client's will on
//!   its own presence topic is how it reports going away, and goes only to the ingest log.
//!
//! A shared subscription (`$share/{group}/{filter}`) is judged by its filter.

use messina_bridge::topics::Topic;
use messina_storage::Role;

use super::Principal;

/// The rules of one connection, compiled at CONNECT.
#[derive(Debug, Clone)]
pub struct Acl {
    role: Role,
    /// `devices/{id}/` for a principal that is (or, anonymous on loopback, claims to be) a
    /// device.
    own_prefix: Option<String>,
    device: Option<String>,
}

impl Acl {
    pub fn new(principal: &Principal) -> Acl {
        let device = principal.device.as_ref().map(|d| d.as_str().to_string());
        Acl {
            role: principal.role,
            own_prefix: device.as_ref().map(|d| format!("devices/{d}/")),
            device,
        }
    }

    fn is_own(&self, device: Option<&str>) -> bool {
        device.is_some() && device == self.device.as_deref()
    }

    /// Whether a PUBLISH on `topic` is allowed.
    pub fn may_publish(&self, topic: &str) -> bool {
        let parsed = Topic::parse(topic);
        if parsed.is_messina_owned() {
            return false;
        }
        match self.role {
            Role::Service => true,
            Role::FleetManager => matches!(parsed, Topic::AlertAck { .. }),
            Role::Device => {
                self.own_prefix
                    .as_deref()
                    .is_some_and(|p| topic.starts_with(p))
                    && !matches!(parsed, Topic::Command(_) | Topic::Reply(_))
            }
        }
    }

    /// Whether a will on `topic` is allowed: whatever may be published, and the principal's own
    /// presence.
    pub fn may_will(&self, topic: &str) -> bool {
        match Topic::parse(topic) {
            Topic::Presence(d) => self.is_own(Some(d)),
            _ => self.may_publish(topic),
        }
    }

    /// Whether a subscription to `filter` is allowed.
    pub fn may_subscribe(&self, filter: &str) -> bool {
        let filter = shared_inner(filter);
        match self.role {
            Role::Service => true,
            Role::FleetManager => {
                filter.starts_with("alerts/")
                    || matches!(
                        filter.strip_prefix("devices/").and_then(|r| r.split_once('/')),
                        Some((id, "presence")) if !id.contains('#')
                    )
            }
            Role::Device => {
                let Some(rest) = self
                    .own_prefix
                    .as_deref()
                    .and_then(|p| filter.strip_prefix(p))
                else {
                    return false;
                };
                rest == "uploads/response" || inbox(rest, "commands") || inbox(rest, "replies")
            }
        }
    }
}

/// `rest` is `{name}` or `{name}/…`.
fn inbox(rest: &str, name: &str) -> bool {
    rest.strip_prefix(name)
        .is_some_and(|r| r.is_empty() || r.starts_with('/'))
}

/// The filter of a shared subscription, or `filter` itself.
fn shared_inner(filter: &str) -> &str {
    filter
        .strip_prefix("$share/")
        .and_then(|r| r.split_once('/'))
        .map_or(filter, |(_group, f)| f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use messina_storage::DeviceId;

    fn acl(device: Option<&str>, role: Role) -> Acl {
        Acl::new(&Principal {
            identity: None,
            device: device.map(|d| DeviceId::new(d).unwrap()),
            role,
            credential: None,
        })
    }

    #[test]
    fn a_device_publishes_only_its_own_data_and_reads_only_its_inbox() {
        let a = acl(Some("dev-A"), Role::Device);
        for t in [
            "devices/dev-A/telemetry",
            "devices/dev-A/events",
            "devices/dev-A/uploads/request",
            "devices/dev-A/uploads/done",
            "devices/dev-A/anything/else",
        ] {
            assert!(a.may_publish(t), "{t}");
        }
        for t in [
            "devices/dev-B/telemetry",
            "devices/dev-AB/telemetry",
            "devices/dev-A/presence",
            "devices/dev-A/uploads/response",
            "devices/dev-A/commands/reboot",
            "devices/dev-A/replies/x",
            "alerts/dev-A/battery_low",
            "alerts/dev-A/battery_low/ack",
            "elsewhere",
            "devices/dev-A",
        ] {
            assert!(!a.may_publish(t), "{t}");
        }
        assert!(a.may_will("devices/dev-A/presence"));
        assert!(a.may_will("devices/dev-A/events"));
        assert!(!a.may_will("devices/dev-P/presence"));
        assert!(!a.may_will("alerts/dev-A/offline"));
        for f in [
            "devices/dev-A/uploads/response",
            "devices/dev-A/commands",
            "devices/dev-A/commands/#",
            "devices/dev-A/replies/+",
            "$share/g/devices/dev-A/commands",
        ] {
            assert!(a.may_subscribe(f), "{f}");
        }
        for f in [
            "#",
            "devices/#",
            "devices/+/commands",
            "devices/dev-A/#",
            "devices/dev-A/+",
            "devices/dev-A/telemetry",
            "devices/dev-B/commands",
            "devices/dev-A/commandsx",
            "alerts/#",
            "$share/g/#",
        ] {
            assert!(!a.may_subscribe(f), "{f}");
        }
    }

    #[test]
    fn a_fleet_manager_reads_alerts_and_presence_and_acknowledges() {
        let m = acl(None, Role::FleetManager);
        assert!(m.may_publish("alerts/dev-A/battery_low/ack"));
        assert!(!m.may_publish("alerts/dev-A/battery_low"));
        assert!(!m.may_publish("devices/dev-A/telemetry"));
        assert!(!m.may_will("devices/dev-A/presence"));
        for f in [
            "alerts/#",
            "alerts/+/battery_low",
            "devices/+/presence",
            "devices/dev-A/presence",
        ] {
            assert!(m.may_subscribe(f), "{f}");
        }
        for f in ["#", "devices/+/telemetry", "devices/#", "devices/+/+"] {
            assert!(!m.may_subscribe(f), "{f}");
        }
    }

    #[test]
    fn a_service_does_anything_but_write_what_messina_owns() {
        let s = acl(None, Role::Service);
        assert!(s.may_publish("devices/dev-B/telemetry"));
        assert!(s.may_publish("devices/dev-B/commands/reboot"));
        assert!(s.may_publish("alerts/dev-B/offline/ack"));
        assert!(!s.may_publish("devices/dev-B/presence"));
        assert!(!s.may_publish("alerts/dev-Q/battery_low"));
        assert!(!s.may_publish("devices/dev-B/uploads/response"));
        assert!(s.may_subscribe("#"));
        // Anonymous on loopback, a client's id stands for its device: its will may report it.
        let local = acl(Some("dev-P"), Role::Service);
        assert!(local.may_will("devices/dev-P/presence"));
        assert!(!local.may_will("devices/dev-Q/presence"));
    }
}
