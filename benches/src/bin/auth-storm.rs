//! Reconnect storm of a provisioned fleet: N registered devices (generated secrets, argon2id
//! hashes in the embedded registry) all authenticate at once, through the edge's
//! `Authenticator`: cold (the first connection of each since the process started: one hash
//! verification each, at most one per core at a time) and warm (a reconnect: answered from the
//! cache of verified credentials). The peer, measured in the same run: one verification of a
//! password-grade argon2id hash (19 MiB, 2 passes: the OWASP minimum) per device, which is what
//! a storm would cost with password parameters and no cache.
//!
//! `cargo run --release -p messina-benches --bin auth-storm -- [devices]`

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use argon2::password_hash::{PasswordHasher, SaltString};
use messina_broker::edge::codec::{Connect, ProtocolVersion};
use messina_broker::security::{provision, Authenticator};
use messina_config::Anonymous;
use messina_storage::embedded::EmbeddedOptions;
use messina_storage::{EmbeddedStorage, Storage};

async fn storm(auth: &Arc<Authenticator>, fleet: &[(String, String)]) -> f64 {
    let peer: SocketAddr = "10.0.0.1:40000".parse().unwrap();
    let started = Instant::now();
    let tasks: Vec<_> = fleet
        .iter()
        .map(|(id, secret)| {
            let auth = Arc::clone(auth);
            let mut connect = Connect::new(ProtocolVersion::V5, id.as_str());
            connect.username = Some(id.as_str().into());
            connect.password = Some(secret.clone().into_bytes().into());
            tokio::spawn(async move { auth.authenticate(&connect, peer, None).await.is_ok() })
        })
        .collect();
    for t in tasks {
        assert!(t.await.unwrap(), "every device authenticates");
    }
    started.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("devices: a number"))
        .unwrap_or(10_000);
    let dir = std::env::temp_dir().join(format!("messina-auth-storm-{}", std::process::id()));
    let storage: Arc<dyn Storage> =
        Arc::new(EmbeddedStorage::open(&EmbeddedOptions::new(&dir)).expect("embedded storage"));

    eprintln!("provisioning {n} devices (one argon2id hash each)...");
    let started = Instant::now();
    let prepared: Vec<_> = futures::future::join_all((0..n).map(|i| {
        tokio::task::spawn_blocking(move || {
            provision::prepare(&provision::NewDevice::new(format!("storm-{i:05}"))).unwrap()
        })
    }))
    .await;
    let mut fleet = Vec::with_capacity(n);
    for p in prepared {
        let p = p.unwrap();
        assert!(storage.register_device(&p.device).await.unwrap());
        fleet.push((p.device.id.to_string(), p.secret.unwrap()));
    }
    let provision_s = started.elapsed().as_secs_f64();

    let auth = Arc::new(Authenticator::new(Arc::clone(&storage), Anonymous::Deny, n));
    let cold = storm(&auth, &fleet).await;
    let warm = storm(&auth, &fleet).await;

    // The peer: password-grade parameters, one verification per device, on every core.
    let sample = 64.min(n);
    let params = argon2::Params::new(19 * 1024, 2, 1, None).unwrap();
    let hasher = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let salt = SaltString::encode_b64(&[7u8; 16]).unwrap();
    let hash = hasher.hash_password(b"secret", &salt).unwrap().to_string();
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let started = Instant::now();
    let verifies: Vec<_> = (0..sample)
        .map(|_| {
            let hash = hash.clone();
            tokio::task::spawn_blocking(move || {
                messina_broker::security::secret::verify(b"secret", &hash).unwrap()
            })
        })
        .collect();
    for v in verifies {
        assert!(v.await.unwrap());
    }
    let password_grade = started.elapsed().as_secs_f64() / sample as f64 * n as f64;

    println!("devices                      {n}");
    println!("cores                        {cores}");
    println!("provisioning                 {provision_s:.1} s");
    println!(
        "storm, cold (hash each)      {cold:.2} s ({:.0} connects/s)",
        n as f64 / cold
    );
    println!(
        "storm, warm (cache)          {warm:.2} s ({:.0} connects/s)",
        n as f64 / warm
    );
    println!("peer: password-grade hashes  {password_grade:.1} s (extrapolated from {sample})");
    println!(
        "ratios                       cold {:.1}x faster than the peer, warm {:.0}x faster than cold",
        password_grade / cold,
        cold / warm
    );
    let _ = storage.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}
