//! The device registry's types: who may connect (a device, a fleet manager, a service), how it
//! proves it (a hashed secret or a client certificate), whether it may still connect, and the
//! attributes a product team keeps about each device (name, model, labels, profile fields, photo).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::model::{AttrValue, DeviceId, Millis};
use crate::query::PageRequest;

/// What a registered identity may do; the edge compiles it into an access list per connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Publishes only under `devices/{own id}/`, reads only its own reply and command topics.
    Device,
    /// Reads alerts and presence of the whole fleet and acknowledges alerts.
    FleetManager,
    /// A backend service: publishes and reads anything but Messina's own presence and alert state.
    Service,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Device, Role::FleetManager, Role::Service];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Device => "device",
            Role::FleetManager => "fleet_manager",
            Role::Service => "service",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that is not a role, a status or a credential kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not a valid {what}; expected one of: {expected}")]
pub struct UnknownName {
    pub what: &'static str,
    pub value: String,
    pub expected: &'static str,
}

impl FromStr for Role {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownName {
                what: "role",
                value: s.to_string(),
                expected: "device, fleet_manager, service",
            })
    }
}

/// Whether a registered identity may connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceStatus {
    Active,
    /// Refused at CONNECT (and disconnected when revoked while connected); kept for its history.
    Revoked,
}

impl DeviceStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceStatus::Active => "active",
            DeviceStatus::Revoked => "revoked",
        }
    }
}

impl FromStr for DeviceStatus {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "active" => Ok(DeviceStatus::Active),
            "revoked" => Ok(DeviceStatus::Revoked),
            _ => Err(UnknownName {
                what: "status",
                value: s.to_string(),
                expected: "active, revoked",
            }),
        }
    }
}

/// How a registered identity proves who it is. Secrets are never stored, only their hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Credential {
    /// A generated secret, sent as the MQTT password or HTTP bearer token; stored as an argon2id
    /// hash in PHC string format (`$argon2id$v=19$m=...`).
    Secret { hash: String },
    /// A client certificate (mutual TLS), by the SHA-256 of its DER encoding, lowercase hex.
    Certificate { sha256: String },
}

impl Credential {
    pub fn kind(&self) -> &'static str {
        match self {
            Credential::Secret { .. } => "secret",
            Credential::Certificate { .. } => "certificate",
        }
    }

    /// The stored value: the hash or the fingerprint.
    pub fn value(&self) -> &str {
        match self {
            Credential::Secret { hash } => hash,
            Credential::Certificate { sha256 } => sha256,
        }
    }

    /// Rebuilds a credential from its kind and stored value.
    pub fn from_parts(kind: &str, value: String) -> Result<Credential, UnknownName> {
        match kind {
            "secret" => Ok(Credential::Secret { hash: value }),
            "certificate" => Ok(Credential::Certificate { sha256: value }),
            _ => Err(UnknownName {
                what: "credential kind",
                value: kind.to_string(),
                expected: "secret, certificate",
            }),
        }
    }
}

/// One identity in the registry: a device, or a fleet manager or service that connects like one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegisteredDevice {
    pub id: DeviceId,
    pub credential: Credential,
    pub role: Role,
    pub status: DeviceStatus,
    pub created_at: Millis,
    pub updated_at: Millis,
    /// A display name.
    pub name: Option<String>,
    /// The hardware or product model.
    pub model: Option<String>,
    /// Free labels to group and filter devices by (`site-berlin`, `beta`).
    pub labels: BTreeSet<String>,
    /// Product fields, free-form (for a pet button: `pet_name`, `breed`, `age`).
    pub profile: BTreeMap<String, AttrValue>,
    /// The upload id of the device's profile photo.
    pub photo_upload: Option<String>,
}

/// Registered devices, filtered; pages come in an order stable across pages (by id in the
/// embedded backend, by token in ScyllaDB).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DeviceQuery {
    /// Only devices carrying this label.
    pub label: Option<String>,
    /// Only devices whose profile field has this value.
    pub profile: Option<(String, AttrValue)>,
    pub role: Option<Role>,
    pub status: Option<DeviceStatus>,
    pub page: PageRequest,
}

impl Default for PageRequest {
    fn default() -> Self {
        PageRequest::first(100)
    }
}

impl DeviceQuery {
    /// True when a device passes every filter.
    pub fn accepts(&self, d: &RegisteredDevice) -> bool {
        self.label.as_ref().is_none_or(|l| d.labels.contains(l))
            && self
                .profile
                .as_ref()
                .is_none_or(|(k, v)| d.profile.get(k) == Some(v))
            && self.role.is_none_or(|r| d.role == r)
            && self.status.is_none_or(|s| d.status == s)
    }
}

/// A record in the registry changed: written by every update, so each node learns within seconds
/// that a device was revoked or given a new credential elsewhere (another node, the command
/// line) and ends the sessions that no longer hold. Kept for [`RegistryChange::KEPT_MS`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryChange {
    /// The record's `updated_at`.
    pub at: Millis,
    pub device: DeviceId,
}

impl RegistryChange {
    /// How long changes are kept: a node that cannot read them for longer than this misses
    /// some (its sessions are then checked again at their next CONNECT only).
    pub const KEPT_MS: Millis = 7 * 86_400_000;
}
