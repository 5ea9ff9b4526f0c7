//! TLS for the MQTT edge and the HTTP side-port (rustls): the server certificate and key from
//! PEM files, optional client certificates verified against a CA (mutual TLS, the
//! certificate's CN being the device id), and reloading when the files change, without a
//! restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// Where the TLS material is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server's certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates (PEM) that sign device certificates; `None`: no client certificates.
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    /// The files of one `[section]`'s `tls_cert_file`, `tls_key_file` and `tls_client_ca_file`
    /// (empty: no client certificates).
    pub fn new(cert: &str, key: &str, client_ca: &str) -> TlsFiles {
        TlsFiles {
            cert: cert.into(),
            key: key.into(),
            client_ca: (!client_ca.is_empty()).then(|| client_ca.into()),
        }
    }
}

/// What a verified client certificate says about its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCertificate {
    /// The subject's Common Name: the device id.
    pub common_name: Option<String>,
    /// SHA-256 of the leaf certificate's DER, lowercase hex (what the registry pins).
    pub sha256: String,
}

impl PeerCertificate {
    pub fn from_der(der: &[u8]) -> PeerCertificate {
        let common_name = x509_parser::parse_x509_certificate(der)
            .ok()
            .and_then(|(_, cert)| {
                cert.subject()
                    .iter_common_name()
                    .next()
                    .and_then(|cn| cn.as_str().ok())
                    .map(str::to_string)
            });
        PeerCertificate {
            common_name,
            sha256: hex::encode(Sha256::digest(der)),
        }
    }
}

/// The current TLS acceptor, replaced when the files change.
pub struct Tls {
    files: TlsFiles,
    current: RwLock<(TlsAcceptor, Stamp)>,
}

/// The modification times of the files, to notice a change.
type Stamp = Vec<Option<SystemTime>>;

fn stamp(files: &TlsFiles) -> Stamp {
    [
        Some(&files.cert),
        Some(&files.key),
        files.client_ca.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
    .collect()
}

fn read_certs(path: &Path, what: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .with_context(|| {
            format!(
                "cannot read the {what} from {} (PEM expected)",
                path.display()
            )
        })?;
    if certs.is_empty() {
        anyhow::bail!("{} holds no PEM certificate (the {what})", path.display());
    }
    Ok(certs)
}

fn server_config(files: &TlsFiles) -> anyhow::Result<ServerConfig> {
    let certs = read_certs(&files.cert, "server certificate")?;
    let key = PrivateKeyDer::from_pem_file(&files.key).with_context(|| {
        format!(
            "cannot read the private key from {} (PEM: PKCS#8, PKCS#1 or SEC1)",
            files.key.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs(ca, "client CA")? {
                roots
                    .add(cert)
                    .with_context(|| format!("a certificate in {} is not a CA", ca.display()))?;
            }
            // Certificates are optional: a device may authenticate with its secret instead.
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .context("building the client certificate verifier")?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    builder.with_single_cert(certs, key).with_context(|| {
        format!(
            "the key in {} does not match the certificate in {}",
            files.key.display(),
            files.cert.display()
        )
    })
}

impl Tls {
    /// Loads the files, failing with a message that names the one at fault.
    pub fn load(files: TlsFiles) -> anyhow::Result<Arc<Tls>> {
        let config = server_config(&files)?;
        let current = RwLock::new((TlsAcceptor::from(Arc::new(config)), stamp(&files)));
        Ok(Arc::new(Tls { files, current }))
    }

    /// Loads the files of `[section]` and checks them for changes every `reload` until
    /// `shutdown`.
    pub fn start(
        section: &str,
        files: TlsFiles,
        reload: Duration,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Arc<Tls>> {
        let tls = Tls::load(files).with_context(|| format!("`{section}.tls_*`"))?;
        tls.watch(reload, shutdown.clone());
        Ok(tls)
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        self.current.read().expect("tls acceptor").0.clone()
    }

    /// Reloads the files when they changed; a bad new set is logged and the old one kept.
    pub fn reload_if_changed(&self) -> bool {
        let now = stamp(&self.files);
        if self.current.read().expect("tls acceptor").1 == now {
            return false;
        }
        match server_config(&self.files) {
            Ok(config) => {
                *self.current.write().expect("tls acceptor") =
                    (TlsAcceptor::from(Arc::new(config)), now);
                tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded; new connections use it");
                true
            }
            Err(e) => {
                // Remember the stamp so a half-written file is not retried in a loop; the next
                // change retries.
                self.current.write().expect("tls acceptor").1 = now;
                tracing::warn!(error = format!("{e:#}"), "TLS files changed but cannot be loaded; still serving the previous certificate");
                false
            }
        }
    }

    /// Checks the files every `every` until `shutdown`.
    pub fn watch(self: &Arc<Self>, every: Duration, shutdown: CancellationToken) {
        let tls = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => {
                        let tls = Arc::clone(&tls);
                        let _ = tokio::task::spawn_blocking(move || tls.reload_if_changed()).await;
                    }
                }
            }
        });
    }
}
