//! `messina devices …`: the device registry from the command line, on the storage the
//! configuration names. A generated secret is printed once; only its hash is stored.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Subcommand};
use messina_config::{Config, StorageBackend};
use messina_storage::{
    DeviceId, DeviceQuery, DeviceStatus, PageRequest, RegisteredDevice, Role, Storage,
};
use serde_json::Value;

use super::provision::{self, Changes, NewDevice, Provisioned};

#[derive(Args)]
pub struct DevicesArgs {
    /// TOML configuration file naming the storage; without it, the embedded defaults.
    #[arg(long, short, global = true)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub action: Action,
}

#[derive(Subcommand)]
pub enum Action {
    /// Register a device (or a fleet manager or service) and print its secret, once.
    Add {
        id: String,
        /// device, fleet_manager or service.
        #[arg(long, default_value = "device")]
        role: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        model: Option<String>,
        /// A label (repeat for several).
        #[arg(long = "label")]
        labels: Vec<String>,
        /// A profile field as `key=value` (repeat for several); numbers and true/false are typed.
        #[arg(long = "profile", value_parser = key_value)]
        profile: Vec<(String, String)>,
        /// Authenticate with this client certificate (SHA-256 fingerprint) instead of a secret.
        #[arg(long)]
        certificate_sha256: Option<String>,
    },
    /// List registered identities, filtered.
    List {
        #[arg(long)]
        label: Option<String>,
        /// Only devices whose profile field has this value, as `key=value`.
        #[arg(long, value_parser = key_value)]
        profile: Option<(String, String)>,
        #[arg(long)]
        role: Option<String>,
        /// active or revoked.
        #[arg(long)]
        status: Option<String>,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one identity as JSON.
    Show { id: String },
    /// Change attributes.
    Set {
        id: String,
        /// A new name (empty clears it).
        #[arg(long)]
        name: Option<String>,
        /// A new model (empty clears it).
        #[arg(long)]
        model: Option<String>,
        #[arg(long = "add-label")]
        add_labels: Vec<String>,
        #[arg(long = "remove-label")]
        remove_labels: Vec<String>,
        /// A profile field as `key=value`.
        #[arg(long = "profile", value_parser = key_value)]
        profile: Vec<(String, String)>,
        /// Remove a profile field.
        #[arg(long = "remove-profile")]
        remove_profile: Vec<String>,
        /// The upload id of the profile photo (empty clears it).
        #[arg(long)]
        photo_upload: Option<String>,
    },
    /// Give an identity a new secret (printed once); the old one stops working.
    Rotate { id: String },
    /// Revoke an identity: it can no longer connect.
    Revoke { id: String },
    /// Register every device of a CSV or JSON file (checked whole first) and print `id,secret`
    /// lines as CSV.
    Import {
        file: PathBuf,
        /// csv or json; by default from the file's extension.
        #[arg(long)]
        format: Option<String>,
    },
}

fn key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("`{s}` is not key=value"))
}

async fn open(config: &Config) -> anyhow::Result<Arc<dyn Storage>> {
    crate::open_storage(config).await.with_context(|| {
        if config.storage.backend == StorageBackend::Embedded {
            format!(
                "cannot open the embedded store at {}; while `messina serve` runs on it, manage \
                 devices through its admin HTTP API (`/v1/admin/devices`) instead",
                config.storage.embedded.path.display()
            )
        } else {
            "cannot open the storage named by the configuration".to_string()
        }
    })
}

fn print_secret(p: &Provisioned) {
    match &p.secret {
        Some(s) => {
            println!("{}", s);
            eprintln!(
                "messina: the secret of `{}` is printed above and is not stored: give it to the \
                 device now (MQTT username `{}`, password the secret)",
                p.device.id, p.device.id
            );
        }
        None => eprintln!(
            "messina: `{}` authenticates with its client certificate",
            p.device.id
        ),
    }
}

fn device_id(id: &str) -> anyhow::Result<DeviceId> {
    DeviceId::new(id).map_err(|e| anyhow::anyhow!("invalid device id `{id}`: {e}"))
}

/// Runs one `messina devices` action.
pub async fn run(config: Config, action: Action) -> anyhow::Result<()> {
    let storage = open(&config).await?;
    let result = act(&storage, action).await;
    let closed = storage.close().await;
    result?;
    closed.context("closing storage")
}

async fn act(storage: &Arc<dyn Storage>, action: Action) -> anyhow::Result<()> {
    match action {
        Action::Add {
            id,
            role,
            name,
            model,
            labels,
            profile,
            certificate_sha256,
        } => {
            let new = NewDevice {
                id,
                role,
                name,
                model,
                labels: labels.into_iter().collect(),
                profile: profile
                    .iter()
                    .map(|(k, v)| (k.clone(), provision::profile_json(v)))
                    .collect(),
                certificate_sha256,
            };
            print_secret(&provision::add(storage, &new).await?);
        }
        Action::List {
            label,
            profile,
            role,
            status,
            json,
        } => {
            let mut query = DeviceQuery {
                label,
                profile: profile.map(|(k, v)| (k, provision::parse_profile_value(&v))),
                role: role
                    .map(|r| r.parse::<Role>())
                    .transpose()
                    .map_err(|e| anyhow::anyhow!("--role: {e}"))?,
                status: status
                    .map(|s| s.parse::<DeviceStatus>())
                    .transpose()
                    .map_err(|e| anyhow::anyhow!("--status: {e}"))?,
                page: PageRequest::first(500),
            };
            if !json {
                println!(
                    "{:<32} {:<14} {:<8} {:<20} labels",
                    "id", "role", "status", "name"
                );
            }
            loop {
                let page = storage.registered_devices(&query).await?;
                for d in &page.items {
                    print_row(d, json);
                }
                match page.next_cursor {
                    Some(c) => query.page.cursor = Some(c),
                    None => break,
                }
            }
        }
        Action::Show { id } => {
            let id = device_id(&id)?;
            let d = storage
                .registered_device(&id)
                .await?
                .ok_or(provision::ProvisionError::NotFound(id))?;
            println!("{:#}", crate::json::to_value(crate::json::device_json(&d)));
        }
        Action::Set {
            id,
            name,
            model,
            add_labels,
            remove_labels,
            profile,
            remove_profile,
            photo_upload,
        } => {
            let mut changes = Changes {
                name,
                model,
                add_labels,
                remove_labels,
                photo_upload,
                ..Changes::default()
            };
            for (k, v) in &profile {
                changes
                    .profile
                    .insert(k.clone(), provision::profile_json(v));
            }
            for k in remove_profile {
                changes.profile.insert(k, Value::Null);
            }
            let d = provision::set(storage, &device_id(&id)?, &changes).await?;
            println!("{:#}", crate::json::to_value(crate::json::device_json(&d)));
        }
        Action::Rotate { id } => {
            print_secret(&provision::rotate(storage, &device_id(&id)?).await?);
            eprintln!("messina: running servers refuse the old secret from now on and end the connections made with it within `mqtt.registry_poll_secs`");
        }
        Action::Revoke { id } => {
            provision::revoke(storage, &device_id(&id)?).await?;
            eprintln!("messina: `{id}` is revoked; running servers refuse new connections and end its live ones within `mqtt.registry_poll_secs`");
        }
        Action::Import { file, format } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let json = match format.as_deref() {
                Some("json") => true,
                Some("csv") => false,
                Some(other) => anyhow::bail!("--format must be csv or json, got `{other}`"),
                None => file.extension().is_some_and(|e| e == "json"),
            };
            let items = provision::parse_import(&text, json)?;
            let prepared = provision::prepare_import(&items)?;
            println!("id,secret");
            let total = prepared.len();
            let mut skipped = 0;
            for (n, p) in prepared.iter().enumerate() {
                if storage.register_device(&p.device).await? {
                    println!("{},{}", p.device.id, p.secret.as_deref().unwrap_or(""));
                } else {
                    skipped += 1;
                    eprintln!(
                        "messina: `{}` is registered already; left as it is",
                        p.device.id
                    );
                }
                if (n + 1) % 1000 == 0 {
                    eprintln!("messina: {}/{total} imported", n + 1);
                }
            }
            eprintln!(
                "messina: {} registered, {skipped} already there; the secrets above are not stored anywhere else",
                total - skipped
            );
        }
    }
    Ok(())
}

fn print_row(d: &RegisteredDevice, json: bool) {
    if json {
        println!("{}", crate::json::to_value(crate::json::device_json(d)));
        return;
    }
    let labels: Vec<&str> = d.labels.iter().map(String::as_str).collect();
    println!(
        "{:<32} {:<14} {:<8} {:<20} {}",
        d.id.as_str(),
        d.role.as_str(),
        d.status.as_str(),
        d.name.as_deref().unwrap_or("-"),
        labels.join(",")
    );
}
