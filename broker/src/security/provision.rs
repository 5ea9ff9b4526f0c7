//! Provisioning the device registry: add (with a generated secret, shown once), rotate, revoke,
//! change attributes, and bulk import from CSV or JSON. Used by the `messina devices` command
//! and the admin HTTP API alike.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use messina_storage::{
    AttrValue, Credential, DeviceId, DeviceStatus, RegisteredDevice, Role, Storage,
};
use serde::Deserialize;
use serde_json::{json, Value};

use super::secret;
use crate::clock::now_millis;

/// What a provisioning step can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("device `{0}` is registered already; use `rotate` for a new secret or `set` to change its attributes")]
    Exists(DeviceId),
    #[error("device `{0}` is not registered; add it with `messina devices add {0}`")]
    NotFound(DeviceId),
    #[error("invalid {field}: {message}")]
    Invalid { field: String, message: String },
    #[error("device registry: {0}")]
    Storage(#[from] messina_storage::StorageError),
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ProvisionError {
    ProvisionError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// An identity to register.
#[derive(Debug, Clone, PartialEq, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewDevice {
    pub id: String,
    /// `device` (the default), `fleet_manager` or `service`.
    #[serde(default = "device_role")]
    pub role: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub labels: BTreeSet<String>,
    #[serde(default)]
    pub profile: BTreeMap<String, Value>,
    /// Authenticate with a client certificate (mutual TLS) of this SHA-256 fingerprint instead of
    /// a generated secret.
    #[serde(default)]
    pub certificate_sha256: Option<String>,
}

fn device_role() -> String {
    Role::Device.as_str().to_string()
}

impl NewDevice {
    pub fn new(id: impl Into<String>) -> NewDevice {
        NewDevice {
            id: id.into(),
            role: device_role(),
            name: None,
            model: None,
            labels: BTreeSet::new(),
            profile: BTreeMap::new(),
            certificate_sha256: None,
        }
    }
}

/// A registered identity and, when one was generated, its secret (shown once, stored only as a
/// hash).
#[derive(Debug, Clone)]
pub struct Provisioned {
    pub device: RegisteredDevice,
    pub secret: Option<String>,
}

/// Parses a profile value given on a command line: an integer, a number, `true`/`false`, or
/// text.
pub fn parse_profile_value(text: &str) -> AttrValue {
    if let Ok(i) = text.parse::<i64>() {
        AttrValue::Int(i)
    } else if let Ok(f) =
        text.parse::<f64>().map_err(|_| ()).and_then(
            |f| {
                if f.is_finite() {
                    Ok(f)
                } else {
                    Err(())
                }
            },
        )
    {
        AttrValue::Float(f)
    } else if let Ok(b) = text.parse::<bool>() {
        AttrValue::Bool(b)
    } else {
        AttrValue::Text(text.to_string())
    }
}

/// [`parse_profile_value`] as the JSON a [`NewDevice`] or [`Changes`] carries.
pub fn profile_json(text: &str) -> Value {
    json!(parse_profile_value(text))
}

/// A profile value from JSON: a string, number or boolean.
pub fn profile_value(field: &str, v: &Value) -> Result<AttrValue, ProvisionError> {
    match v {
        Value::Bool(b) => Ok(AttrValue::Bool(*b)),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Ok(AttrValue::Int(i)),
            None => n
                .as_f64()
                .map(AttrValue::Float)
                .ok_or_else(|| invalid(field, "a number out of range")),
        },
        Value::String(s) => Ok(AttrValue::Text(s.clone())),
        other => Err(invalid(
            field,
            format!("must be a string, number or boolean, got {other}"),
        )),
    }
}

fn check_label(label: &str) -> Result<(), ProvisionError> {
    if label.is_empty() || label.len() > 64 || label.contains([',', ';']) {
        return Err(invalid(
            "labels",
            format!("`{label}`: a label is 1 to 64 characters without `,` or `;`"),
        ));
    }
    Ok(())
}

fn check_fingerprint(hex_digest: &str) -> Result<String, ProvisionError> {
    let clean: String = hex_digest
        .chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_ascii_lowercase();
    if clean.len() != 64 || !clean.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(invalid(
            "certificate_sha256",
            "must be the 64 hex digits of the certificate's SHA-256 (`openssl x509 -noout -fingerprint -sha256`)",
        ));
    }
    Ok(clean)
}

/// Checks `new` and builds its record, with a generated secret unless it has a certificate.
pub fn prepare(new: &NewDevice) -> Result<Provisioned, ProvisionError> {
    let id = DeviceId::new(new.id.clone()).map_err(|e| invalid("id", e.to_string()))?;
    let role: Role = new
        .role
        .parse()
        .map_err(|e: messina_storage::UnknownName| invalid("role", e.to_string()))?;
    for label in &new.labels {
        check_label(label)?;
    }
    let mut profile = BTreeMap::new();
    for (k, v) in &new.profile {
        profile.insert(k.clone(), profile_value(&format!("profile.{k}"), v)?);
    }
    let (credential, secret) = match &new.certificate_sha256 {
        Some(fp) => (
            Credential::Certificate {
                sha256: check_fingerprint(fp)?,
            },
            None,
        ),
        None => {
            let s = secret::generate();
            (
                Credential::Secret {
                    hash: secret::hash(&s),
                },
                Some(s),
            )
        }
    };
    let now = now_millis();
    Ok(Provisioned {
        device: RegisteredDevice {
            id,
            credential,
            role,
            status: DeviceStatus::Active,
            created_at: now,
            updated_at: now,
            name: new.name.clone().filter(|n| !n.is_empty()),
            model: new.model.clone().filter(|m| !m.is_empty()),
            labels: new.labels.clone(),
            profile,
            photo_upload: None,
        },
        secret,
    })
}

/// Runs `f` (argon2 hashing) on the blocking pool: a running server must not hash on the
/// threads that serve its connections.
async fn off_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

/// Registers `new`; fails when the id is taken.
pub async fn add(
    storage: &Arc<dyn Storage>,
    new: &NewDevice,
) -> Result<Provisioned, ProvisionError> {
    let new = new.clone();
    let provisioned = off_thread(move || prepare(&new)).await?;
    if !storage.register_device(&provisioned.device).await? {
        return Err(ProvisionError::Exists(provisioned.device.id));
    }
    Ok(provisioned)
}

async fn existing(
    storage: &Arc<dyn Storage>,
    id: &DeviceId,
) -> Result<RegisteredDevice, ProvisionError> {
    storage
        .registered_device(id)
        .await?
        .ok_or_else(|| ProvisionError::NotFound(id.clone()))
}

/// Gives a device a new secret (the old one stops working at once) and makes it active again.
pub async fn rotate(
    storage: &Arc<dyn Storage>,
    id: &DeviceId,
) -> Result<Provisioned, ProvisionError> {
    let mut device = existing(storage, id).await?;
    let s = secret::generate();
    let plain = s.clone();
    device.credential = Credential::Secret {
        hash: off_thread(move || secret::hash(&plain)).await,
    };
    device.status = DeviceStatus::Active;
    device.updated_at = now_millis();
    storage.update_device(&device).await?;
    Ok(Provisioned {
        device,
        secret: Some(s),
    })
}

/// Revokes a device: it can no longer connect (connected sessions are ended by the server
/// that revokes it).
pub async fn revoke(
    storage: &Arc<dyn Storage>,
    id: &DeviceId,
) -> Result<RegisteredDevice, ProvisionError> {
    let mut device = existing(storage, id).await?;
    device.status = DeviceStatus::Revoked;
    device.updated_at = now_millis();
    storage.update_device(&device).await?;
    Ok(device)
}

/// Changes to a device's attributes; `None` leaves a field as it is, an empty name or model
/// clears it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Changes {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub add_labels: Vec<String>,
    #[serde(default)]
    pub remove_labels: Vec<String>,
    /// Fields set (a JSON `null` removes one).
    #[serde(default)]
    pub profile: BTreeMap<String, Value>,
    /// The upload id of the profile photo (empty clears it).
    #[serde(default)]
    pub photo_upload: Option<String>,
}

/// Applies `changes` to a registered device.
pub async fn set(
    storage: &Arc<dyn Storage>,
    id: &DeviceId,
    changes: &Changes,
) -> Result<RegisteredDevice, ProvisionError> {
    let mut device = existing(storage, id).await?;
    if let Some(n) = &changes.name {
        device.name = (!n.is_empty()).then(|| n.clone());
    }
    if let Some(m) = &changes.model {
        device.model = (!m.is_empty()).then(|| m.clone());
    }
    for l in &changes.add_labels {
        check_label(l)?;
        device.labels.insert(l.clone());
    }
    for l in &changes.remove_labels {
        device.labels.remove(l);
    }
    for (k, v) in &changes.profile {
        if v.is_null() {
            device.profile.remove(k);
        } else {
            device
                .profile
                .insert(k.clone(), profile_value(&format!("profile.{k}"), v)?);
        }
    }
    if let Some(p) = &changes.photo_upload {
        if !p.is_empty() {
            let upload = storage.upload(p).await?;
            match upload {
                Some(u) if u.device == device.id => {}
                Some(_) => {
                    return Err(invalid(
                        "photo_upload",
                        format!("upload `{p}` belongs to another device"),
                    ))
                }
                None => return Err(invalid("photo_upload", format!("no upload `{p}`"))),
            }
        }
        device.photo_upload = (!p.is_empty()).then(|| p.clone());
    }
    device.updated_at = now_millis();
    storage.update_device(&device).await?;
    Ok(device)
}

/// The devices of an import file: a JSON array of objects like `{"id": "btn-1", "labels":
/// ["beta"], "profile": {"pet_name": "Rex"}}`, or CSV with a header row whose columns are `id`
/// (required), `role`, `name`, `model`, `labels` (separated by `;`), `certificate_sha256`, and
/// any other column a profile field (typed as on the command line; an empty cell is no value).
pub fn parse_import(text: &str, json_format: bool) -> Result<Vec<NewDevice>, ProvisionError> {
    if json_format {
        let items: Vec<NewDevice> = serde_json::from_str(text)
            .map_err(|e| invalid("import file", format!("not a JSON array of devices: {e}")))?;
        return Ok(items);
    }
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let headers = reader
        .headers()
        .map_err(|e| invalid("import file", format!("CSV header: {e}")))?
        .clone();
    if !headers.iter().any(|h| h == "id") {
        return Err(invalid("import file", "the CSV header has no `id` column"));
    }
    let mut out = Vec::new();
    for (n, row) in reader.records().enumerate() {
        let line = n + 2;
        let row = row.map_err(|e| invalid(format!("line {line}"), e.to_string()))?;
        let mut device = NewDevice::new("");
        for (column, cell) in headers.iter().zip(row.iter()) {
            if cell.is_empty() {
                continue;
            }
            match column {
                "id" => device.id = cell.to_string(),
                "role" => device.role = cell.to_string(),
                "name" => device.name = Some(cell.to_string()),
                "model" => device.model = Some(cell.to_string()),
                "labels" => {
                    device.labels = cell
                        .split(';')
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                        .map(String::from)
                        .collect()
                }
                "certificate_sha256" => device.certificate_sha256 = Some(cell.to_string()),
                field => {
                    device.profile.insert(field.to_string(), profile_json(cell));
                }
            }
        }
        if device.id.is_empty() {
            return Err(invalid(format!("line {line}"), "no `id`"));
        }
        out.push(device);
    }
    Ok(out)
}

/// Checks every device of an import before any is written, so a file with one bad row changes
/// nothing; ids that appear twice are refused too.
pub fn prepare_import(items: &[NewDevice]) -> Result<Vec<Provisioned>, ProvisionError> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        if !seen.insert(item.id.as_str()) {
            return Err(invalid(
                format!("item {}", i + 1),
                format!("`{}` appears twice", item.id),
            ));
        }
        out.push(prepare(item).map_err(|e| match e {
            ProvisionError::Invalid { field, message } => {
                invalid(format!("item {} (`{}`) {field}", i + 1, item.id), message)
            }
            other => other,
        })?);
    }
    Ok(out)
}

/// What an import did: the identities it registered, each with its secret, and the ids that
/// were registered already (left as they are, so an import can be run again).
#[derive(Debug)]
pub struct Imported {
    pub registered: Vec<Provisioned>,
    pub existing: Vec<DeviceId>,
}

/// Registers every device of `items`, all checked first (see [`prepare_import`]).
pub async fn import(
    storage: &Arc<dyn Storage>,
    items: &[NewDevice],
) -> Result<Imported, ProvisionError> {
    let items = items.to_vec();
    let prepared = off_thread(move || prepare_import(&items)).await?;
    let mut imported = Imported {
        registered: Vec::with_capacity(prepared.len()),
        existing: Vec::new(),
    };
    for p in prepared {
        if storage.register_device(&p.device).await? {
            imported.registered.push(p);
        } else {
            imported.existing.push(p.device.id);
        }
    }
    Ok(imported)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_and_json_imports_read_the_same_devices() {
        let csv = "id,name,labels,pet_name,age,role\n\
                   btn-1,Kitchen,beta; site-a,Rex,3,\n\
                   mgr-1,,,,,fleet_manager\n";
        let from_csv = parse_import(csv, false).unwrap();
        let from_json = parse_import(
            r#"[{"id": "btn-1", "name": "Kitchen", "labels": ["beta", "site-a"],
                 "profile": {"pet_name": "Rex", "age": 3}},
                {"id": "mgr-1", "role": "fleet_manager"}]"#,
            true,
        )
        .unwrap();
        assert_eq!(from_csv, from_json);
        let prepared = prepare_import(&from_csv).unwrap();
        assert_eq!(prepared[0].device.profile["age"], AttrValue::Int(3));
        assert_eq!(prepared[1].device.role, Role::FleetManager);
        assert!(prepared.iter().all(|p| p.secret.is_some()));
    }

    #[test]
    fn a_bad_row_is_named_and_nothing_is_prepared() {
        let err = parse_import("name\nx\n", false).unwrap_err().to_string();
        assert!(err.contains("no `id` column"), "{err}");
        let items = parse_import("id,role\nok-1,device\nbad id,device\n", false).unwrap();
        let err = prepare_import(&items).unwrap_err().to_string();
        assert!(err.contains("item 2 (`bad id`) id"), "{err}");
        let items = parse_import("id,role\nd-1,robot\n", false).unwrap();
        let err = prepare_import(&items).unwrap_err().to_string();
        assert!(err.contains("role") && err.contains("robot"), "{err}");
        let items = parse_import("id\nd-1\nd-1\n", false).unwrap();
        assert!(prepare_import(&items)
            .unwrap_err()
            .to_string()
            .contains("twice"));
        let err = parse_import(r#"[{"id": "d", "profile": {"x": [1]}}]"#, true)
            .map(|i| prepare_import(&i))
            .unwrap()
            .unwrap_err()
            .to_string();
        assert!(err.contains("profile.x"), "{err}");
    }

    #[test]
    fn command_line_profile_values_are_typed() {
        assert_eq!(parse_profile_value("3"), AttrValue::Int(3));
        assert_eq!(parse_profile_value("2.5"), AttrValue::Float(2.5));
        assert_eq!(parse_profile_value("true"), AttrValue::Bool(true));
        assert_eq!(parse_profile_value("Rex"), AttrValue::Text("Rex".into()));
        assert_eq!(parse_profile_value("inf"), AttrValue::Text("inf".into()));
    }
}
