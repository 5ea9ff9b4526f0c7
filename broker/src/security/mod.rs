//! Who a client is and what it may do.
//!
//! - [`secret`]: generated device secrets and their argon2id hashes;
//! - [`acl`]: the publish and subscribe rules of each role, compiled per connection;
//! - [`provision`]: adding, rotating, revoking and importing identities ([`cli`] is its command);
//! - [`watch`]: following the registry's changes, so revocations and rotations made elsewhere
//!   end the live connections here;
//! - [`Authenticator`]: the edge's CONNECT check against the device registry, with a cache of
//!   verified credentials and at most one hash verification per core at a time; the HTTP
//!   side-port checks a device's own credentials through it too (`verify_device_secret`).

pub mod acl;
pub mod cli;
pub mod provision;
pub mod secret;
pub mod watch;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use messina_config::{Anonymous, Config};
use messina_storage::{
    Credential, DeviceId, DeviceQuery, DeviceStatus, PageRequest, RegisteredDevice, Role, Storage,
    StorageError,
};
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;

use crate::edge::codec::{Connect, ReasonCode};
use crate::tls::PeerCertificate;

/// Who a connection is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The registered identity it proved (its `username`); `None` for an anonymous client.
    pub identity: Option<DeviceId>,
    /// The device it speaks for: an authenticated device, or for an anonymous client on
    /// loopback the device its client id names (if it is a valid id).
    pub device: Option<DeviceId>,
    pub role: Role,
    /// The registry credential it proved (`None`: anonymous): a rotation ends the connections
    /// that proved the old one.
    pub credential: Option<Credential>,
}

/// The identity a connection authenticated as, when it did: its session is kept apart from
/// those of other identities with the same client id, so nobody takes over a session without
/// the credentials of its identity.
pub fn session_key(identity: Option<&str>, client_id: &str) -> String {
    format!("{}\0{client_id}", identity.unwrap_or(""))
}

/// The principal of an authenticated registry entry; a device's client id must be its id.
fn principal(connect: &Connect, device: RegisteredDevice) -> Result<Principal, ReasonCode> {
    if device.role == Role::Device
        && !connect.client_id.is_empty()
        && &*connect.client_id != device.id.as_str()
    {
        return Err(ReasonCode::ClientIdentifierNotValid);
    }
    Ok(Principal {
        device: (device.role == Role::Device).then(|| device.id.clone()),
        identity: Some(device.id),
        role: device.role,
        credential: Some(device.credential),
    })
}

/// Refuses to serve MQTT to the network when nobody could connect from there, as Mosquitto 2
/// does: a non-loopback listener with anonymous clients kept to loopback (or denied) and no
/// active identity in the registry. Opting in to anonymous network clients is allowed, loudly.
pub async fn check_exposure(config: &Config, storage: &Arc<dyn Storage>) -> anyhow::Result<()> {
    let exposed: Vec<SocketAddr> = [config.mqtt.listen, config.mqtt.listen_v5]
        .into_iter()
        .chain(config.mqtt.tls_addr())
        .filter(|a| !a.ip().is_loopback())
        .collect();
    let Some(first) = exposed.first() else {
        return Ok(());
    };
    if config.mqtt.anonymous == Anonymous::Allow {
        tracing::warn!(listen = %first, "MQTT is open to the network without authentication (`mqtt.anonymous = \"allow\"`): anyone who reaches it may publish as any device");
        return Ok(());
    }
    let query = DeviceQuery {
        status: Some(DeviceStatus::Active),
        page: PageRequest::first(1),
        ..DeviceQuery::default()
    };
    let any = !storage
        .registered_devices(&query)
        .await
        .context("reading the device registry")?
        .items
        .is_empty();
    if !any {
        anyhow::bail!(
            "`mqtt.listen` {first} is reachable from the network, but no device is registered, so \
             none could connect from there. Provision devices first (`messina devices add <id>`, \
             or `messina devices import devices.csv`), or accept unauthenticated clients from the \
             network with `mqtt.anonymous = \"allow\"` (only on a closed network), or listen on \
             127.0.0.1"
        );
    }
    Ok(())
}

/// Checks CONNECTs against the device registry.
pub struct Authenticator {
    storage: Arc<dyn Storage>,
    anonymous: Anonymous,
    /// Device id → digest of (process key, stored hash, secret) of the last secret verified for
    /// it. A rotated hash no longer matches its digest, so rotation needs no invalidation.
    verified: Mutex<HashMap<String, [u8; 32]>>,
    capacity: usize,
    key: [u8; 32],
    /// One argon2 verification per core at a time; the rest wait.
    verifiers: Arc<Semaphore>,
}

impl Authenticator {
    pub fn new(storage: Arc<dyn Storage>, anonymous: Anonymous, capacity: usize) -> Authenticator {
        let mut key = [0u8; 32];
        rand::rng().fill_bytes(&mut key);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Authenticator {
            storage,
            anonymous,
            verified: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
            key,
            verifiers: Arc::new(Semaphore::new(cores)),
        }
    }

    /// Decides a CONNECT from `peer`, with the client certificate a TLS listener verified:
    /// `Err` is the MQTT 5 reason to refuse with (mapped to the 3.1.1 return code for 3.1.1
    /// clients).
    ///
    /// A verified certificate authenticates its Common Name (a username, if given, must be the
    /// same); a registry entry that pins a certificate fingerprint accepts only that
    /// certificate. Otherwise the username is the registry id and the password its secret.
    pub async fn authenticate(
        &self,
        connect: &Connect,
        peer: SocketAddr,
        certificate: Option<&PeerCertificate>,
    ) -> Result<Principal, ReasonCode> {
        if let Some(cert) = certificate {
            return self.by_certificate(connect, cert).await;
        }
        let Some(username) = connect.username.as_deref() else {
            return self.anonymous(connect, peer);
        };
        let Ok(id) = DeviceId::new(username) else {
            return Err(ReasonCode::NotAuthorized);
        };
        let device = self.active_device(&id).await?;
        let Credential::Secret { hash } = &device.credential else {
            // A certificate identity authenticates only with its certificate, over mutual TLS.
            return Err(ReasonCode::NotAuthorized);
        };
        let password = connect.password.as_deref().unwrap_or_default();
        if !self.verify(&id, hash, password).await? {
            return Err(ReasonCode::BadUserNameOrPassword);
        }
        principal(connect, device)
    }

    /// The active registry entry `id`; unknown or revoked is "not authorized", an unreadable
    /// registry "server unavailable".
    async fn active_device(&self, id: &DeviceId) -> Result<RegisteredDevice, ReasonCode> {
        match self.storage.registered_device(id).await {
            Ok(Some(d)) if d.status == DeviceStatus::Active => Ok(d),
            Ok(_) => Err(ReasonCode::NotAuthorized),
            Err(e) => {
                tracing::warn!(device = %id, error = %e, "cannot read the device registry; the connection is refused as server unavailable");
                Err(ReasonCode::ServerUnavailable)
            }
        }
    }

    async fn by_certificate(
        &self,
        connect: &Connect,
        cert: &PeerCertificate,
    ) -> Result<Principal, ReasonCode> {
        let device = self.certified(cert).await?;
        if connect
            .username
            .as_deref()
            .is_some_and(|u| u != device.id.as_str())
        {
            return Err(ReasonCode::NotAuthorized);
        }
        principal(connect, device)
    }

    /// The active registry entry a verified certificate names by its Common Name, when the
    /// entry pins no other certificate.
    async fn certified(&self, cert: &PeerCertificate) -> Result<RegisteredDevice, ReasonCode> {
        let Some(id) = cert
            .common_name
            .as_deref()
            .and_then(|cn| DeviceId::new(cn).ok())
        else {
            return Err(ReasonCode::NotAuthorized);
        };
        let device = self.active_device(&id).await?;
        if let Credential::Certificate { sha256 } = &device.credential {
            if !bool::from(sha256.as_bytes().ct_eq(cert.sha256.as_bytes())) {
                return Err(ReasonCode::NotAuthorized);
            }
        }
        Ok(device)
    }

    /// Checks a client certificate an HTTPS connection verified, as a CONNECT over mutual TLS
    /// would: the active registry entry it names, `None` when it names none (or the entry
    /// pins another certificate). `Err` only when the registry cannot be read.
    pub async fn verify_device_certificate(
        &self,
        cert: &PeerCertificate,
    ) -> Result<Option<RegisteredDevice>, StorageError> {
        match self.certified(cert).await {
            Ok(device) => Ok(Some(device)),
            Err(ReasonCode::ServerUnavailable) => Err(StorageError::Unavailable(
                "the device registry cannot be read".into(),
            )),
            Err(_) => Ok(None),
        }
    }

    fn anonymous(&self, connect: &Connect, peer: SocketAddr) -> Result<Principal, ReasonCode> {
        let allowed = match self.anonymous {
            Anonymous::Allow => true,
            Anonymous::Loopback => peer.ip().is_loopback(),
            Anonymous::Deny => false,
        };
        if !allowed {
            return Err(ReasonCode::NotAuthorized);
        }
        Ok(Principal {
            identity: None,
            device: DeviceId::new(&*connect.client_id).ok(),
            role: Role::Service,
            credential: None,
        })
    }

    async fn verify(&self, id: &DeviceId, hash: &str, secret: &[u8]) -> Result<bool, ReasonCode> {
        let mut digest = Sha256::new();
        digest.update(self.key);
        digest.update(hash.as_bytes());
        digest.update([0xff]);
        digest.update(secret);
        let digest: [u8; 32] = digest.finalize().into();
        let cached = self
            .verified
            .lock()
            .expect("credential cache")
            .get(id.as_str())
            .is_some_and(|d| bool::from(d.ct_eq(&digest)));
        if cached {
            return Ok(true);
        }
        let permit = Arc::clone(&self.verifiers)
            .acquire_owned()
            .await
            .map_err(|_| ReasonCode::ServerUnavailable)?;
        let (hash_owned, secret_owned) = (hash.to_string(), secret.to_vec());
        let verdict = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            secret::verify(&secret_owned, &hash_owned)
        })
        .await
        .map_err(|_| ReasonCode::ServerUnavailable)?;
        match verdict {
            Ok(true) => {
                let mut verified = self.verified.lock().expect("credential cache");
                if verified.len() >= self.capacity && !verified.contains_key(id.as_str()) {
                    // Any entry makes room: the cache only saves work.
                    if let Some(k) = verified.keys().next().cloned() {
                        verified.remove(&k);
                    }
                }
                verified.insert(id.as_str().to_string(), digest);
                Ok(true)
            }
            Ok(false) => Ok(false),
            Err(e) => {
                tracing::error!(device = %id, error = %e, "the registry holds a credential that cannot be checked; rotate the device's secret with `messina devices rotate`");
                Err(ReasonCode::NotAuthorized)
            }
        }
    }

    /// Checks a device's own credentials given over HTTP (its id and secret), with the same
    /// registry, cache and hash limit as a CONNECT: the active registry entry when the secret
    /// is its own, `None` for an unknown or revoked id, a certificate identity or a wrong
    /// secret. `Err` only when the registry cannot be read (retry later).
    pub async fn verify_device_secret(
        &self,
        id: &DeviceId,
        secret: &[u8],
    ) -> Result<Option<RegisteredDevice>, StorageError> {
        let device = match self.active_device(id).await {
            Ok(device) => device,
            Err(ReasonCode::ServerUnavailable) => {
                return Err(StorageError::Unavailable(
                    "the device registry cannot be read".into(),
                ))
            }
            Err(_) => return Ok(None),
        };
        let Credential::Secret { hash } = &device.credential else {
            return Ok(None);
        };
        match self.verify(id, hash, secret).await {
            Ok(true) => Ok(Some(device)),
            Ok(false) => Ok(None),
            Err(ReasonCode::ServerUnavailable) => Err(StorageError::Unavailable(
                "the credential check was interrupted".into(),
            )),
            // A stored credential that cannot be checked is logged by `verify`.
            Err(_) => Ok(None),
        }
    }

    /// Forgets what was verified for `id` (its secret was rotated or it was revoked).
    pub fn forget(&self, id: &DeviceId) {
        self.verified
            .lock()
            .expect("credential cache")
            .remove(id.as_str());
    }
}
