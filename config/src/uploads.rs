//! `[uploads]`: presigned uploads and the embedded S3 endpoint.

use super::*;

section! {
    /// Device uploads: devices ask (over HTTP or MQTT) for a presigned URL and PUT blobs (audio,
    /// photos, logs) straight to S3-compatible object storage, never through the broker. With no
    /// `endpoint`, Messina serves an S3-compatible endpoint itself, storing objects on disk.
    pub struct UploadsConfig at "uploads" {
        /// Hand out upload URLs at all (and run the embedded endpoint when `endpoint` is empty).
        pub enabled: bool = true,
        /// URL of an external S3-compatible endpoint (AWS S3, MinIO, Garage, ...), e.g.
        /// "https://s3.eu-west-1.amazonaws.com"; empty serves the embedded endpoint.
        pub endpoint: String = String::new(),
        /// Address of the embedded endpoint; port 0 picks a free port at each start (the URLs
        /// handed out carry it). Devices must reach this address.
        pub s3_listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 0)),
        /// Directory of the embedded endpoint's objects and generated credentials; empty means
        /// `objects` under `storage.embedded.path`.
        pub s3_path: String = String::new(),
        /// Region the URLs are signed for.
        pub region: String = String::from("us-east-1"),
        /// Bucket holding the uploads; the embedded endpoint creates it.
        pub bucket: String = String::from("messina-uploads"),
        /// Address buckets as `endpoint/bucket/key` (path style) rather than `bucket.endpoint/key`.
        pub path_style: bool = true,
        /// Access key id for `endpoint`; prefer `MESSINA__UPLOADS__ACCESS_KEY_ID`. The embedded
        /// endpoint generates its own.
        pub access_key_id: String = String::new(),
        /// Secret key for `endpoint`; prefer `secret_access_key_file` or
        /// `MESSINA__UPLOADS__SECRET_ACCESS_KEY`.
        pub secret_access_key: String = String::new(),
        /// File whose first line is the secret key; used when `secret_access_key` is empty.
        pub secret_access_key_file: String = String::new(),
        /// Seconds an upload URL stays valid; an upload not completed by then is marked expired.
        pub url_expiry_s: u64 = 300,
        /// Seconds a download URL (in `GET /v1/uploads/{id}`) stays valid.
        pub download_url_expiry_s: u64 = 300,
        /// Seconds between sweeps that mark never-completed uploads expired.
        pub sweep_interval_s: u64 = 30,
        /// Largest audio clip in bytes.
        pub audio_max_bytes: u64 = 20 * 1024 * 1024,
        /// Content types an audio upload may declare.
        pub audio_content_types: Vec<String> = vec![
            String::from("audio/wav"),
            String::from("audio/x-wav"),
            String::from("audio/mpeg"),
            String::from("audio/ogg"),
        ],
        /// Largest photo in bytes.
        pub photo_max_bytes: u64 = 10 * 1024 * 1024,
        /// Content types a photo upload may declare.
        pub photo_content_types: Vec<String> = vec![String::from("image/jpeg"), String::from("image/png")],
        /// Largest log in bytes.
        pub log_max_bytes: u64 = 5 * 1024 * 1024,
        /// Content types a log upload may declare.
        pub log_content_types: Vec<String> = vec![String::from("text/plain")],
    }
}

impl UploadsConfig {
    /// Checks values that parse but make no sense; each problem names its key.
    pub(crate) fn validate(&self, check: &mut impl FnMut(bool, &str, String)) {
        let u = self;
        check(
            u.endpoint.is_empty()
                || u.endpoint.starts_with("http://")
                || u.endpoint.starts_with("https://"),
            "uploads.endpoint",
            format!("must start with http:// or https://, got {:?}", u.endpoint),
        );
        check(
            !u.enabled
                || u.endpoint.is_empty()
                || !u.access_key_id.is_empty(),
            "uploads.access_key_id",
            "is required with an external `uploads.endpoint` (or set MESSINA__UPLOADS__ACCESS_KEY_ID)"
                .into(),
        );
        check(
            !u.enabled
                || u.endpoint.is_empty()
                || !u.secret_access_key.is_empty()
                || !u.secret_access_key_file.is_empty(),
            "uploads.secret_access_key",
            "is required with an external `uploads.endpoint` (or `secret_access_key_file`)".into(),
        );
        check(
            (3..=63).contains(&u.bucket.len())
                && u.bucket
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.'),
            "uploads.bucket",
            format!(
                "{:?} is not a bucket name: 3 to 63 characters of a-z, 0-9, '-' and '.'",
                u.bucket
            ),
        );
        // SigV4 presigned URLs are valid for at most 7 days.
        for (key, v) in [
            ("uploads.url_expiry_s", u.url_expiry_s),
            ("uploads.download_url_expiry_s", u.download_url_expiry_s),
        ] {
            check(
                (1..=604_800).contains(&v),
                key,
                format!("must be between 1 and 604800 (7 days), got {v}"),
            );
        }
        check(
            u.sweep_interval_s >= 1,
            "uploads.sweep_interval_s",
            "must be at least 1".into(),
        );
        // S3 takes at most 5 GiB in one PUT, and a presigned URL is one PUT.
        const MAX_PUT: u64 = 5 << 30;
        for (key, bytes) in [
            ("uploads.audio_max_bytes", u.audio_max_bytes),
            ("uploads.photo_max_bytes", u.photo_max_bytes),
            ("uploads.log_max_bytes", u.log_max_bytes),
        ] {
            check(
                (1..=MAX_PUT).contains(&bytes),
                key,
                format!("must be between 1 and {MAX_PUT} (5 GiB, the largest single S3 PUT), got {bytes}"),
            );
        }
        for (key, types) in [
            ("uploads.audio_content_types", &u.audio_content_types),
            ("uploads.photo_content_types", &u.photo_content_types),
            ("uploads.log_content_types", &u.log_content_types),
        ] {
            if let Some(bad) = types.iter().find(|t| {
                !t.contains('/') || t.chars().any(|c| c.is_ascii_whitespace() || c == ';')
            }) {
                check(
                    false,
                    key,
                    format!("{bad:?} is not a media type like \"image/png\""),
                );
            }
        }
    }
}

impl Config {
    /// The secret key of the external S3 endpoint, from `uploads.secret_access_key` or
    /// `uploads.secret_access_key_file`.
    pub fn s3_secret_key(&self) -> Result<Option<String>, ConfigErrors> {
        let u = &self.uploads;
        if !u.secret_access_key.is_empty() {
            return Ok(Some(u.secret_access_key.clone()));
        }
        if u.secret_access_key_file.is_empty() {
            return Ok(None);
        }
        std::fs::read_to_string(&u.secret_access_key_file)
            .map(|text| Some(text.lines().next().unwrap_or("").trim().to_string()))
            .map_err(|e| {
                ConfigErrors(vec![ConfigError {
                    key: "uploads.secret_access_key_file".into(),
                    message: format!("cannot read {}: {e}", u.secret_access_key_file),
                    source: None,
                }])
            })
    }
}
