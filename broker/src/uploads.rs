//! Device uploads: presigned S3 URLs for blobs devices PUT straight to object storage, the
//! completion check (the object exists, its size, type and format match, its metadata is
//! recorded), the sweep that marks never-completed uploads expired, and the embedded
//! S3-compatible endpoint (s3s over the file system) that is the default object store.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::presigning::PresigningConfig;
use messina_config::UploadsConfig;
use messina_storage::{
    AttrValue, Cause, DeviceId, Millis, Storage, StorageError, Upload, UploadState,
};
use rand::Rng;
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::inspect;

/// The kinds of upload a device may ask for.
pub const KINDS: [&str; 3] = ["audio", "photo", "log"];
/// Most device metadata keys kept per upload, and their sizes; metadata is for search and
/// display, not a second payload.
const MAX_ATTRS: usize = 32;
const MAX_ATTR_KEY: usize = 64;
const MAX_ATTR_TEXT: usize = 256;
/// Uploads the sweep marks expired per round; the rest wait for the next round.
const SWEEP_BATCH: usize = 500;

/// Why an upload request or completion failed; each variant says what the caller should do.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// The request is wrong (a field, a limit); fix it and ask again.
    #[error("`{field}`: {detail}")]
    Invalid { field: &'static str, detail: String },
    /// No such upload for this device.
    #[error("{0}")]
    NotFound(String),
    /// The upload is not in a state that allows this (nothing uploaded yet, already rejected).
    #[error("{0}")]
    Conflict(String),
    /// The object failed its checks; the upload is now `rejected`. Ask for a new upload.
    #[error("{0}")]
    Rejected(String),
    /// Object storage or the database could not answer now; retry later.
    #[error("{0}")]
    Unavailable(#[source] Cause),
    /// Stored data is broken; an operator must look.
    #[error("{0}")]
    Fatal(#[source] Cause),
}

impl From<StorageError> for UploadError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::Unavailable(m) => UploadError::Unavailable(m),
            StorageError::InvalidRequest(m) => UploadError::Invalid {
                field: "cursor",
                detail: m,
            },
            StorageError::Fatal(m) => UploadError::Fatal(m),
        }
    }
}

impl UploadError {
    fn invalid(field: &'static str, detail: impl Into<String>) -> Self {
        UploadError::Invalid {
            field,
            detail: detail.into(),
        }
    }

    /// The HTTP status that tells a client what to do.
    pub fn status(&self) -> u16 {
        match self {
            UploadError::Invalid { .. } => 400,
            UploadError::NotFound(_) => 404,
            UploadError::Conflict(_) => 409,
            UploadError::Rejected(_) => 422,
            UploadError::Unavailable(_) => 503,
            UploadError::Fatal(_) => 500,
        }
    }
}

/// What a device sends to ask for an upload URL (JSON over HTTP; JSON or MessagePack over MQTT).
/// Any other top-level key is kept as device metadata, as are the keys of `metadata`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct UploadRequest {
    /// `audio`, `photo` or `log`.
    pub kind: String,
    /// The MIME type the object will be `PUT` with; one the kind allows.
    pub content_type: String,
    /// The object's exact size in bytes, within the kind's limit.
    pub size: u64,
    /// The object's SHA-256, lowercase hex, checked on completion.
    #[serde(default)]
    pub sha256: Option<String>,
    /// Device metadata kept with the upload: scalars only.
    #[serde(default)]
    #[schema(value_type = BTreeMap<String, crate::json::Attr>)]
    pub metadata: BTreeMap<String, Value>,
    #[serde(flatten)]
    #[schema(ignore)]
    pub extra: BTreeMap<String, Value>,
}

impl UploadRequest {
    /// Parses a JSON or MessagePack body (MessagePack never starts with `{`).
    pub fn parse(body: &[u8]) -> Result<Self, UploadError> {
        let parsed = if body.first() == Some(&b'{') {
            serde_json::from_slice(body).map_err(|e| e.to_string())
        } else {
            rmp_serde::from_slice(body).map_err(|e| e.to_string())
        };
        parsed.map_err(|e| {
            UploadError::invalid(
                "body",
                format!(
                    "must be a JSON or MessagePack map with `kind`, `content_type` and `size`: {e}"
                ),
            )
        })
    }
}

/// What a device needs to upload: where, how, and until when.
#[derive(Debug, Clone)]
pub struct Ticket {
    pub upload: Upload,
    pub url: String,
    pub headers: BTreeMap<String, String>,
}

/// Presigns requests against one bucket of an S3-compatible endpoint, and makes the few requests
/// the server itself needs (HEAD, GET) through its own presigned URLs, so any endpoint that
/// accepts the devices' URLs accepts the server's too.
pub struct ObjectStore {
    client: aws_sdk_s3::Client,
    bucket: String,
    http: reqwest::Client,
}

/// The object as HEAD describes it.
#[derive(Debug)]
struct Head {
    size: u64,
    content_type: Option<String>,
}

impl ObjectStore {
    pub fn new(
        endpoint: &str,
        region: &str,
        bucket: &str,
        access_key_id: &str,
        secret_access_key: &str,
        path_style: bool,
    ) -> Result<Self, UploadError> {
        let credentials = Credentials::new(
            access_key_id,
            secret_access_key,
            None,
            None,
            "messina-config",
        );
        let config = aws_sdk_s3::config::Builder::new()
            .behavior_version(BehaviorVersion::latest())
            .credentials_provider(credentials)
            .region(Region::new(region.to_string()))
            .endpoint_url(endpoint)
            .force_path_style(path_style)
            .build();
        // The client's own HEAD and GET must not hang on a stuck endpoint, so a client without
        // the timeout is not an option.
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| {
                UploadError::Fatal(Cause::new("building the HTTP client for object storage", e))
            })?;
        Ok(ObjectStore {
            client: aws_sdk_s3::Client::from_conf(config),
            bucket: bucket.to_string(),
            http,
        })
    }

    fn presigning(expires: Duration) -> Result<PresigningConfig, UploadError> {
        PresigningConfig::expires_in(expires)
            .map_err(|e| UploadError::Fatal(Cause::new("presigning", e)))
    }

    /// A URL for `PUT key` whose signature covers the content type and length, and the headers
    /// the device must send with it.
    pub async fn presign_put(
        &self,
        key: &str,
        content_type: &str,
        size: u64,
        expires: Duration,
    ) -> Result<(String, BTreeMap<String, String>), UploadError> {
        let presigned = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .content_length(i64::try_from(size).unwrap_or(i64::MAX))
            .presigned(Self::presigning(expires)?)
            .await
            .map_err(|e| UploadError::Fatal(Cause::new(format!("presigning PUT {key}"), e)))?;
        let mut headers: BTreeMap<String, String> = presigned
            .headers()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
            .collect();
        // Both are in the signature whether or not the SDK lists them; say so to the device.
        headers.insert("content-type".into(), content_type.to_string());
        headers.insert("content-length".into(), size.to_string());
        Ok((presigned.uri().to_string(), headers))
    }

    /// A URL for `GET key`.
    pub async fn presign_get(&self, key: &str, expires: Duration) -> Result<String, UploadError> {
        let presigned = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .presigned(Self::presigning(expires)?)
            .await
            .map_err(|e| UploadError::Fatal(Cause::new(format!("presigning GET {key}"), e)))?;
        Ok(presigned.uri().to_string())
    }

    async fn head(&self, key: &str) -> Result<Option<Head>, UploadError> {
        let presigned = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .presigned(Self::presigning(Duration::from_secs(60))?)
            .await
            .map_err(|e| UploadError::Fatal(Cause::new(format!("presigning HEAD {key}"), e)))?;
        let r = self.http.head(presigned.uri()).send().await.map_err(|e| {
            UploadError::Unavailable(Cause::new(format!("object storage: HEAD {key}"), e))
        })?;
        match r.status().as_u16() {
            200 => {}
            404 => return Ok(None),
            s => {
                return Err(UploadError::Unavailable(
                    format!("object storage answered HEAD {key} with {s}").into(),
                ))
            }
        }
        let header = |name| {
            r.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        // A missing or unreadable length must not pass as an empty object.
        let size = header("content-length")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| {
                UploadError::Unavailable(
                    format!("object storage answered HEAD {key} without a valid Content-Length")
                        .into(),
                )
            })?;
        Ok(Some(Head {
            size,
            content_type: header("content-type"),
        }))
    }

    /// Streams the object into an anonymous temporary file (never all of it in memory), hashing
    /// it on the way; refuses an object longer than `expected` bytes. Returns the file, rewound,
    /// and the SHA-256 in hex.
    async fn download(
        &self,
        key: &str,
        expected: u64,
    ) -> Result<(std::fs::File, String), UploadError> {
        use tokio::io::AsyncWriteExt;
        let url = self.presign_get(key, Duration::from_secs(60)).await?;
        let failed = |e: reqwest::Error| {
            UploadError::Unavailable(Cause::new(format!("object storage: GET {key}"), e))
        };
        let mut r = self.http.get(url).send().await.map_err(failed)?;
        if !r.status().is_success() {
            return Err(UploadError::Unavailable(
                format!("object storage answered GET {key} with {}", r.status()).into(),
            ));
        }
        let spool = |e: std::io::Error| {
            UploadError::Fatal(Cause::new("spooling an upload to a temporary file", e))
        };
        let mut file = tokio::fs::File::from_std(tempfile::tempfile().map_err(spool)?);
        let mut hash = Sha256::new();
        let mut got = 0u64;
        while let Some(chunk) = r.chunk().await.map_err(failed)? {
            got += chunk.len() as u64;
            if got > expected {
                return Err(UploadError::Rejected(format!(
                    "the object holds more than the {expected} bytes declared"
                )));
            }
            hash.update(&chunk);
            file.write_all(&chunk).await.map_err(spool)?;
        }
        file.flush().await.map_err(spool)?;
        let mut file = file.into_std().await;
        std::io::Seek::rewind(&mut file).map_err(spool)?;
        Ok((file, hex::encode(hash.finalize())))
    }
}

/// Per-kind limits from `[uploads]`.
#[derive(Debug, Clone)]
struct Limits {
    max_bytes: u64,
    content_types: Vec<String>,
}

/// Hands out upload URLs, completes and expires uploads.
pub struct UploadService {
    store: ObjectStore,
    storage: Arc<dyn Storage>,
    limits: BTreeMap<&'static str, Limits>,
    url_expiry: Duration,
    download_expiry: Duration,
    sweep_interval: Duration,
    /// Completions checked at once, over HTTP and MQTT alike: each reads its object back.
    completions: tokio::sync::Semaphore,
}

/// Uploads checked on completion at once (each streams its object to a temporary file).
const COMPLETIONS: usize = 8;

impl UploadService {
    pub fn new(store: ObjectStore, storage: Arc<dyn Storage>, c: &UploadsConfig) -> Self {
        let limits = BTreeMap::from([
            (
                "audio",
                Limits {
                    max_bytes: c.audio_max_bytes,
                    content_types: c.audio_content_types.clone(),
                },
            ),
            (
                "photo",
                Limits {
                    max_bytes: c.photo_max_bytes,
                    content_types: c.photo_content_types.clone(),
                },
            ),
            (
                "log",
                Limits {
                    max_bytes: c.log_max_bytes,
                    content_types: c.log_content_types.clone(),
                },
            ),
        ]);
        UploadService {
            store,
            storage,
            limits,
            url_expiry: Duration::from_secs(c.url_expiry_s),
            download_expiry: Duration::from_secs(c.download_url_expiry_s),
            sweep_interval: Duration::from_secs(c.sweep_interval_s),
            completions: tokio::sync::Semaphore::new(COMPLETIONS),
        }
    }

    /// Checks a request against the kind's limits, records a pending upload and presigns its URL.
    pub async fn request(
        &self,
        device: &DeviceId,
        req: UploadRequest,
        now: Millis,
    ) -> Result<Ticket, UploadError> {
        let Some((kind, limits)) = self.limits.get_key_value(req.kind.as_str()) else {
            return Err(UploadError::invalid(
                "kind",
                format!("{:?} is not one of {}", req.kind, KINDS.join(", ")),
            ));
        };
        let content_type = req.content_type.trim().to_ascii_lowercase();
        if !limits.content_types.contains(&content_type) {
            return Err(UploadError::invalid(
                "content_type",
                format!(
                    "{:?} is not allowed for {kind} uploads; allowed: {}",
                    req.content_type,
                    limits.content_types.join(", ")
                ),
            ));
        }
        if req.size == 0 || req.size > limits.max_bytes {
            return Err(UploadError::invalid(
                "size",
                format!(
                    "{} bytes is outside 1 to {} bytes, the limit for {kind} uploads",
                    req.size, limits.max_bytes
                ),
            ));
        }
        let sha256 = match req.sha256 {
            None => None,
            Some(h) if h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()) => {
                Some(h.to_ascii_lowercase())
            }
            Some(h) => {
                return Err(UploadError::invalid(
                    "sha256",
                    format!("{h:?} is not 64 hexadecimal digits"),
                ))
            }
        };
        let mut attrs = BTreeMap::new();
        for (key, value) in req.metadata.into_iter().chain(req.extra) {
            attrs.insert(key.clone(), attr(&key, value)?);
        }
        if attrs.len() > MAX_ATTRS {
            return Err(UploadError::invalid(
                "metadata",
                format!("{} keys; at most {MAX_ATTRS} are kept", attrs.len()),
            ));
        }
        let nonce: String = {
            let mut rng = rand::rng();
            (0..16)
                .map(|_| char::from(b"0123456789abcdef"[rng.random_range(0..16)]))
                .collect()
        };
        let id = Upload::id_for(device, now, &nonce);
        let object_key = format!("devices/{device}/{kind}/{id}");
        let (url, headers) = self
            .store
            .presign_put(&object_key, &content_type, req.size, self.url_expiry)
            .await?;
        let upload = Upload {
            id,
            device: device.clone(),
            kind: kind.to_string(),
            content_type,
            size: req.size,
            sha256,
            object_key,
            state: UploadState::Pending,
            created_at: now,
            expires_at: now + self.url_expiry.as_millis() as i64,
            finished_at: None,
            attrs,
            meta: BTreeMap::new(),
            error: None,
        };
        self.storage.put_upload(&upload).await?;
        metrics::counter!("messina_uploads_requested_total", "kind" => upload.kind.clone())
            .increment(1);
        Ok(Ticket {
            upload,
            url,
            headers,
        })
    }

    /// One upload of a device; `NotFound` when it does not exist or belongs to another device.
    pub async fn get_for(&self, device: &DeviceId, id: &str) -> Result<Upload, UploadError> {
        match self.storage.upload(id).await? {
            Some(u) if u.device == *device => Ok(u),
            _ => Err(UploadError::NotFound(format!(
                "device `{device}` has no upload `{id}`"
            ))),
        }
    }

    /// Checks the uploaded object and records its metadata. Completing a completed upload answers
    /// it again, so a device may safely repeat `done`.
    pub async fn complete(
        &self,
        device: &DeviceId,
        id: &str,
        now: Millis,
    ) -> Result<Upload, UploadError> {
        let mut upload = self.get_for(device, id).await?;
        let _turn = self
            .completions
            .acquire()
            .await
            .map_err(|_| UploadError::Unavailable("the upload service is stopping".into()))?;
        match upload.state {
            UploadState::Completed => return Ok(upload),
            UploadState::Rejected => {
                return Err(UploadError::Conflict(format!(
                    "upload `{id}` was rejected ({}); ask for a new upload",
                    upload.error.as_deref().unwrap_or("no reason recorded")
                )))
            }
            // An expired upload whose object did arrive in time (S3 checked the URL's expiry)
            // may still complete.
            UploadState::Pending | UploadState::Expired => {}
        }
        let Some(head) = self.store.head(&upload.object_key).await? else {
            let hint = if now > upload.expires_at {
                "its upload URL has expired; ask for a new upload"
            } else {
                "PUT the file to the upload URL first"
            };
            return Err(UploadError::Conflict(format!(
                "nothing was uploaded for upload `{id}`; {hint}"
            )));
        };
        let checked = self.check(&upload, head).await;
        upload.finished_at = Some(now);
        let result = match checked {
            Ok(meta) => {
                upload.state = UploadState::Completed;
                upload.meta = meta;
                Ok(())
            }
            Err(UploadError::Rejected(reason)) => {
                upload.state = UploadState::Rejected;
                upload.error = Some(reason.clone());
                Err(UploadError::Rejected(reason))
            }
            Err(other) => return Err(other),
        };
        self.storage.put_upload(&upload).await?;
        metrics::counter!(
            "messina_uploads_finished_total",
            "kind" => upload.kind.clone(),
            "state" => upload.state.as_str()
        )
        .increment(1);
        result.map(|()| upload)
    }

    async fn check(
        &self,
        upload: &Upload,
        head: Head,
    ) -> Result<BTreeMap<String, AttrValue>, UploadError> {
        if head.size != upload.size {
            return Err(UploadError::Rejected(format!(
                "the object holds {} bytes, not the {} declared",
                head.size, upload.size
            )));
        }
        let stored_type = head.content_type.unwrap_or_default();
        if stored_type != upload.content_type {
            return Err(UploadError::Rejected(format!(
                "the object's content type is {stored_type:?}, not the {:?} declared",
                upload.content_type
            )));
        }
        let (file, got) = self.store.download(&upload.object_key, upload.size).await?;
        if let Some(expected) = &upload.sha256 {
            if got != *expected {
                return Err(UploadError::Rejected(format!(
                    "the object's SHA-256 is {got}, not the {expected} declared"
                )));
            }
        }
        let (content_type, size) = (upload.content_type.clone(), upload.size);
        // Parsing reads the file: blocking work, off the runtime.
        tokio::task::spawn_blocking(move || {
            inspect::inspect_source(&content_type, file, size).map_err(UploadError::Rejected)
        })
        .await
        .map_err(|e| UploadError::Fatal(Cause::new("inspecting an upload", e)))?
    }

    /// A short-lived download URL of a completed upload's object.
    pub async fn download_url(&self, upload: &Upload, now: Millis) -> Option<(String, Millis)> {
        if upload.state != UploadState::Completed {
            return None;
        }
        match self
            .store
            .presign_get(&upload.object_key, self.download_expiry)
            .await
        {
            Ok(url) => Some((url, now + self.download_expiry.as_millis() as i64)),
            Err(e) => {
                tracing::error!(error = %e, upload = %upload.id, "cannot presign a download");
                None
            }
        }
    }

    /// Marks pending uploads whose URL expired as expired, once per `sweep_interval`, until
    /// `shutdown`.
    pub fn spawn_sweep(
        self: Arc<Self>,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let period = self.sweep_interval;
        crate::spawn_every(period, shutdown, move || {
            let service = Arc::clone(&self);
            async move {
                if let Err(e) = service.sweep(crate::clock::now_millis()).await {
                    tracing::warn!(error = %e, "upload expiry sweep failed; retrying next round");
                }
            }
        })
    }

    /// One round of the sweep; returns how many uploads it expired.
    pub async fn sweep(&self, now: Millis) -> Result<usize, UploadError> {
        let expired = self.storage.expired_uploads(now, SWEEP_BATCH).await?;
        for mut upload in expired.iter().cloned() {
            upload.state = UploadState::Expired;
            upload.finished_at = Some(now);
            self.storage.put_upload(&upload).await?;
            metrics::counter!(
                "messina_uploads_finished_total",
                "kind" => upload.kind.clone(),
                "state" => "expired"
            )
            .increment(1);
        }
        Ok(expired.len())
    }
}

/// A device metadata value as a stored attribute: scalars only, of bounded size.
fn attr(key: &str, value: Value) -> Result<AttrValue, UploadError> {
    if key.is_empty()
        || key.len() > MAX_ATTR_KEY
        || !key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        return Err(UploadError::invalid(
            "metadata",
            format!("key {key:?} must be 1 to {MAX_ATTR_KEY} characters of [A-Za-z0-9_.-]"),
        ));
    }
    Ok(match value {
        Value::Bool(b) => AttrValue::Bool(b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => AttrValue::Int(i),
            None => AttrValue::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) if s.len() <= MAX_ATTR_TEXT => AttrValue::Text(s),
        _ => {
            return Err(UploadError::invalid(
                "metadata",
                format!(
                    "`{key}` must be a number, a bool or a string of at most {MAX_ATTR_TEXT} bytes"
                ),
            ))
        }
    })
}

/// The key pair of the embedded endpoint, generated once and kept in its directory so URLs and
/// objects survive restarts.
#[derive(Debug, Clone, serde::Serialize, Deserialize)]
struct EmbeddedCredentials {
    access_key_id: String,
    secret_access_key: String,
}

fn random_token(len: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..len)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

fn load_or_create_credentials(dir: &Path) -> anyhow::Result<EmbeddedCredentials> {
    let path = dir.join("credentials.json");
    if path.exists() {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        return serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not the embedded S3 endpoint's credentials; remove it to generate new ones",
                path.display()
            )
        });
    }
    let creds = EmbeddedCredentials {
        access_key_id: format!("MESSINA{}", random_token(13).to_ascii_uppercase()),
        secret_access_key: random_token(40),
    };
    let tmp = dir.join("credentials.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&creds)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    }
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(creds)
}

/// The embedded S3-compatible endpoint, serving until shutdown.
pub struct EmbeddedS3 {
    pub endpoint: String,
    pub addr: SocketAddr,
    access_key_id: String,
    secret_access_key: String,
    pub task: tokio::task::JoinHandle<()>,
}

impl EmbeddedS3 {
    /// Serves `dir/buckets` (creating `bucket`) on `listen`, with a key pair kept in `dir`.
    pub async fn start(
        dir: &Path,
        listen: SocketAddr,
        bucket: &str,
        shutdown: CancellationToken,
    ) -> anyhow::Result<EmbeddedS3> {
        let root: PathBuf = dir.join("buckets");
        std::fs::create_dir_all(root.join(bucket))
            .with_context(|| format!("creating the object directory {}", root.display()))?;
        let creds = load_or_create_credentials(dir)?;
        let fs = s3s_fs::FileSystem::new(&root)
            .map_err(|e| anyhow::anyhow!("opening {} for objects: {e:?}", root.display()))?;
        let service = {
            let mut b = s3s::service::S3ServiceBuilder::new(fs);
            b.set_auth(s3s::auth::SimpleAuth::from_single(
                creds.access_key_id.clone(),
                creds.secret_access_key.clone(),
            ));
            b.build()
        };
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {listen} (`uploads.s3_listen`); is another process using it?"
                )
            })?;
        let addr = listener.local_addr()?;
        // Transfers in progress get a moment to finish at shutdown; a device retries the rest.
        let task = tokio::spawn(crate::http_server::serve(
            listener,
            None,
            move |_| service.clone(),
            shutdown,
            Duration::from_secs(5),
            "uploads.s3_listen",
        ));
        Ok(EmbeddedS3 {
            endpoint: format!("http://{addr}"),
            addr,
            access_key_id: creds.access_key_id,
            secret_access_key: creds.secret_access_key,
            task,
        })
    }

    /// An object store signing with this endpoint's key pair.
    pub fn store(&self, c: &UploadsConfig) -> Result<ObjectStore, UploadError> {
        ObjectStore::new(
            &self.endpoint,
            &c.region,
            &c.bucket,
            &self.access_key_id,
            &self.secret_access_key,
            true,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_put_url_signs_the_content_type_and_length() {
        let store = ObjectStore::new(
            "http://127.0.0.1:9",
            "us-east-1",
            "b",
            "AKID",
            "SECRET",
            true,
        )
        .unwrap();
        let (url, headers) = store
            .presign_put(
                "devices/d1/photo/x",
                "image/png",
                1234,
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        assert!(
            url.starts_with("http://127.0.0.1:9/b/devices/d1/photo/x?"),
            "{url}"
        );
        assert!(
            url.contains("X-Amz-SignedHeaders=content-length%3Bcontent-type%3Bhost"),
            "{url}"
        );
        assert!(url.contains("X-Amz-Expires=60"), "{url}");
        assert_eq!(headers["content-type"], "image/png");
        assert_eq!(headers["content-length"], "1234");
    }

    #[test]
    fn upload_ids_split_back_into_device_and_time() {
        let d = DeviceId::new("cam-1").unwrap();
        let id = Upload::id_for(&d, 1_700_000_000_000, "0af3");
        assert_eq!(Upload::parse_id(&id), Some((d, 1_700_000_000_000)));
        assert_eq!(Upload::parse_id("cam-1~x~0af3"), None);
        assert_eq!(Upload::parse_id("cam-1~1~"), None);
        assert_eq!(Upload::parse_id("../etc~1~a"), None);
    }
}
