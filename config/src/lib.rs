//! The one typed configuration of Messina: defaults, then a TOML file, then `MESSINA__SECTION__KEY`
//! environment variables, validated so that every problem is reported at once, each naming its key.
//!
//! Every key is declared once, with its doc comment, type and default, in a `section!` block of
//! its section's module (`mqtt`, `http`, `storage`, `ingest`, `bridge`, `alerts`, `uploads`,
//! `logging`), beside that section's checks. That single declaration produces the struct, its
//! defaults, the per-key extraction (so a bad value in one key does not hide a bad value in
//! another) and the commented TOML printed by `messina print-config`, so the documentation
//! cannot drift from the code. This file holds what is common: the macro, errors, loading.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Value};
use figment::Figment;
use serde::{Deserialize, Serialize};

/// The prefix of environment variables that override configuration keys, e.g.
/// `MESSINA__MQTT__LISTEN=0.0.0.0:1883` or `MESSINA__STORAGE__EMBEDDED__PATH=/var/lib/messina`.
pub const ENV_PREFIX: &str = "MESSINA__";

/// One problem with one configuration key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The dotted key, e.g. `mqtt.listen`; empty when the problem is the file itself.
    pub key: String,
    /// What is wrong and, where it helps, what is accepted.
    pub message: String,
    /// Where the offending value came from (a file path or an environment variable), if known.
    pub source: Option<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}", self.message)?;
        } else {
            write!(f, "`{}`: {}", self.key, self.message)?;
        }
        if let Some(source) = &self.source {
            write!(f, " (from {source})")?;
        }
        Ok(())
    }
}

/// Every problem found while loading a configuration. Loading never stops at the first one, so an
/// operator fixes the file in one pass.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration ({} problem(s)):", self.0.len())?;
        for error in &self.0 {
            writeln!(f, "  - {error}")?;
        }
        write!(
            f,
            "run `messina print-config` for every key with its documentation and default"
        )
    }
}

impl ConfigErrors {
    /// True when a problem names exactly this key; used by tests and by callers that branch.
    pub fn mentions(&self, key: &str) -> bool {
        self.0.iter().any(|e| e.key == key)
    }
}

/// Renders one default value as TOML, for the documented default configuration.
fn toml_value<T: Serialize>(value: &T) -> String {
    match toml::Value::try_from(value) {
        Ok(v) => v.to_string(),
        Err(_) => String::from("\"\""),
    }
}

fn figment_error(key: &str, error: figment::Error) -> ConfigError {
    let source = error.metadata.as_ref().map(|m| match &m.source {
        Some(src) => format!("{} {}", m.name, src),
        None => m.name.to_string(),
    });
    ConfigError {
        key: key.to_string(),
        message: error.kind.to_string(),
        source,
    }
}

/// Declares one configuration section: its struct, defaults, per-key extraction, known keys and
/// documentation. Doc comments on the section and on each key become the comments of
/// `messina print-config`.
macro_rules! section {
    (
        $(#[doc = $doc:literal])*
        pub struct $name:ident at $path:literal {
            $( $(#[doc = $fdoc:literal])* pub $field:ident : $ty:ty = $default:expr, )*
        }
        $( children { $( $(#[doc = $cdoc:literal])* pub $child:ident : $cty:ty ),* $(,)? } )?
    ) => {
        $(#[doc = $doc])*
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            $( $(#[doc = $fdoc])* pub $field: $ty, )*
            $( $( $(#[doc = $cdoc])* pub $child: $cty, )* )?
        }

        impl Default for $name {
            fn default() -> Self {
                Self {
                    $( $field: $default, )*
                    $( $( $child: <$cty>::default(), )* )?
                }
            }
        }

        impl $name {
            /// The dotted path of this section in the TOML file.
            pub const PATH: &'static str = $path;

            pub(crate) fn extract(figment: &Figment, errors: &mut Vec<ConfigError>) -> Self {
                let defaults = Self::default();
                Self {
                    $( $field: {
                        let key = concat!($path, ".", stringify!($field));
                        match figment.extract_inner::<$ty>(key) {
                            Ok(v) => v,
                            Err(e) => { errors.push(figment_error(key, e)); defaults.$field }
                        }
                    }, )*
                    $( $( $child: <$cty>::extract(figment, errors), )* )?
                }
            }

            pub(crate) fn known_keys(keys: &mut Vec<String>) {
                $( keys.push(concat!($path, ".", stringify!($field)).to_string()); )*
                $( $( <$cty>::known_keys(keys); )* )?
            }

            pub(crate) fn document(&self, out: &mut String) {
                out.push('\n');
                $( out.push_str(concat!("#", $doc, "\n")); )*
                out.push_str(concat!("[", $path, "]\n"));
                $(
                    $( out.push_str(concat!("#", $fdoc, "\n")); )*
                    out.push_str(concat!(stringify!($field), " = "));
                    out.push_str(&toml_value(&self.$field));
                    out.push('\n');
                )*
                $( $( self.$child.document(out); )* )?
            }
        }
    };
}

mod alerts;
mod bridge;
mod http;
mod ingest;
mod logging;
mod mqtt;
mod storage;
mod uploads;

pub use alerts::*;
pub use bridge::*;
pub use http::*;
pub use ingest::*;
pub use logging::*;
pub use mqtt::*;
pub use storage::*;
pub use uploads::*;

/// The whole configuration of one Messina process.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub mqtt: MqttConfig,
    pub http: HttpConfig,
    pub storage: StorageConfig,
    pub ingest_log: IngestLogConfig,
    pub bridge: BridgeConfig,
    pub alerts: AlertsConfig,
    pub uploads: UploadsConfig,
    pub log: LogConfig,
}

impl Config {
    /// The ingest log's directory: `ingest_log.path`, or `log` inside `storage.embedded.path`.
    pub fn ingest_log_dir(&self) -> PathBuf {
        if self.ingest_log.path.is_empty() {
            self.storage.embedded.path.join("log")
        } else {
            PathBuf::from(&self.ingest_log.path)
        }
    }

    /// Loads defaults, then `file` (when given), then `MESSINA__...` environment variables, and
    /// validates the result. Every problem is returned at once.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigErrors> {
        Self::load_from(file, Env::prefixed(ENV_PREFIX).split("__"))
    }

    /// Loads defaults and a TOML text, without the environment; for tests and `check-config`.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigErrors> {
        let figment =
            Figment::from(Serialized::defaults(Config::default())).merge(Toml::string(text));
        Self::extract(figment)
    }

    fn load_from(file: Option<&Path>, env: Env) -> Result<Config, ConfigErrors> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigErrors(vec![ConfigError {
                    key: String::new(),
                    message: format!(
                        "config file {} does not exist or is not a file; \
                         `messina print-config > {}` writes a documented one",
                        path.display(),
                        path.display()
                    ),
                    source: None,
                }]));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        Self::extract(figment.merge(env))
    }

    fn extract(figment: Figment) -> Result<Config, ConfigErrors> {
        let mut errors = Vec::new();
        // A file that does not parse at all yields no data; report that alone, since every other
        // message would be noise.
        let data = match figment.extract::<Value>() {
            Ok(Value::Dict(_, dict)) => dict,
            Ok(_) => Dict::new(),
            Err(e) => return Err(ConfigErrors(vec![figment_error("", e)])),
        };
        let mut known = Vec::new();
        Self::known_keys(&mut known);
        let mut leaves = Vec::new();
        collect_leaves("", &data, &mut leaves);
        for key in leaves.into_iter().filter(|k| !known.contains(k)) {
            let source = figment.find_metadata(&key).map(|m| match &m.source {
                Some(src) => format!("{} {}", m.name, src),
                None => m.name.to_string(),
            });
            let hint = closest(&key, &known)
                .map(|k| format!("; did you mean `{k}`?"))
                .unwrap_or_default();
            errors.push(ConfigError {
                key,
                message: format!("unknown key{hint}"),
                source,
            });
        }
        let config = Config {
            mqtt: MqttConfig::extract(&figment, &mut errors),
            http: HttpConfig::extract(&figment, &mut errors),
            storage: StorageConfig::extract(&figment, &mut errors),
            ingest_log: IngestLogConfig::extract(&figment, &mut errors),
            bridge: BridgeConfig::extract(&figment, &mut errors),
            alerts: AlertsConfig::extract(&figment, &mut errors),
            uploads: UploadsConfig::extract(&figment, &mut errors),
            log: LogConfig::extract(&figment, &mut errors),
        };
        config.validate(&mut errors);
        // Key files and variables are read by `api_keys`, when a server starts: other commands
        // (`messina devices`) need not be able to read them.
        config.resolve_api_keys(false, &mut errors);
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    fn known_keys(keys: &mut Vec<String>) {
        MqttConfig::known_keys(keys);
        HttpConfig::known_keys(keys);
        StorageConfig::known_keys(keys);
        IngestLogConfig::known_keys(keys);
        BridgeConfig::known_keys(keys);
        AlertsConfig::known_keys(keys);
        UploadsConfig::known_keys(keys);
        LogConfig::known_keys(keys);
    }

    /// Checks values that parse but make no sense, section by section; each problem names its
    /// key.
    fn validate(&self, errors: &mut Vec<ConfigError>) {
        let mut check = |ok: bool, key: &str, message: String| {
            if !ok {
                errors.push(ConfigError {
                    key: key.to_string(),
                    message,
                    source: None,
                });
            }
        };
        self.mqtt.validate(&mut check);
        self.http.validate(&mut check);
        self.ingest_log.validate(&mut check);
        self.storage.validate(&mut check);
        self.bridge.validate(&mut check);
        self.alerts.validate(&mut check);
        self.uploads.validate(&mut check);
    }

    /// The full default configuration as TOML, with every key documented; what
    /// `messina print-config` prints and what `messina.example.toml` holds.
    pub fn documented_defaults() -> String {
        Config::default().documented()
    }

    /// This configuration as TOML with every key documented.
    pub fn documented(&self) -> String {
        let mut out = String::from(
            "# Messina configuration. Every key is optional; shown are the defaults.\n\
             # Any key can be overridden by an environment variable MESSINA__SECTION__KEY,\n\
             # e.g. MESSINA__MQTT__LISTEN=0.0.0.0:1883 or MESSINA__STORAGE__EMBEDDED__PATH=/var/lib/messina.\n",
        );
        self.mqtt.document(&mut out);
        self.http.document(&mut out);
        self.storage.document(&mut out);
        self.ingest_log.document(&mut out);
        self.bridge.document(&mut out);
        self.alerts.document(&mut out);
        self.uploads.document(&mut out);
        self.log.document(&mut out);
        out
    }
}

fn collect_leaves(prefix: &str, dict: &Dict, out: &mut Vec<String>) {
    for (k, v) in dict {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            Value::Dict(_, inner) => collect_leaves(&key, inner, out),
            _ => out.push(key),
        }
    }
}

/// The known key closest to a misspelt one, when it is close enough to be a useful hint.
fn closest<'a>(key: &str, known: &'a [String]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (edit_distance(key, k), k))
        .filter(|(d, _)| *d <= 3)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k.as_str())
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> ConfigErrors {
        Config::from_toml_str(text).expect_err("config should be rejected")
    }

    #[test]
    fn example_config_in_repo_parses_to_the_defaults() {
        let text = include_str!("../../messina.example.toml");
        assert_eq!(Config::from_toml_str(text).unwrap(), Config::default());
    }

    #[test]
    fn example_config_in_repo_is_the_printed_default() {
        let text = include_str!("../../messina.example.toml");
        assert_eq!(text, Config::documented_defaults());
    }

    #[test]
    fn documented_defaults_comment_every_key() {
        let text = Config::documented_defaults();
        let mut keys = Vec::new();
        Config::known_keys(&mut keys);
        let lines: Vec<&str> = text.lines().collect();
        for key in keys {
            let field = key.rsplit('.').next().unwrap();
            let at = lines
                .iter()
                .position(|l| l.starts_with(&format!("{field} = ")))
                .unwrap_or_else(|| panic!("{key} is not printed"));
            assert!(
                lines[at - 1].starts_with('#'),
                "{key} has no comment above it"
            );
        }
    }

    #[test]
    fn file_values_override_defaults() {
        let c = Config::from_toml_str(
            "[mqtt]\nlisten = \"0.0.0.0:1999\"\n[bridge]\nbatch_max_rows = 5\n[storage.embedded]\npath = \"/tmp/x\"\n",
        )
        .unwrap();
        assert_eq!(c.mqtt.listen, "0.0.0.0:1999".parse().unwrap());
        assert_eq!(c.bridge.batch_max_rows, 5);
        assert_eq!(c.storage.embedded.path, PathBuf::from("/tmp/x"));
        assert_eq!(c.http, HttpConfig::default());
    }

    #[test]
    fn every_error_is_reported_at_once_and_names_its_key() {
        let e = errors(
            "[mqtt]\nlisen = \"x\"\nlisten = \"not an address\"\n\
             [bridge]\nbatch_max_rows = 0\nbatch_max_delay_ms = \"soon\"\n\
             [storage]\nbackend = \"mysql\"\n[nope]\nx = 1\n",
        );
        for key in [
            "mqtt.lisen",
            "mqtt.listen",
            "bridge.batch_max_rows",
            "bridge.batch_max_delay_ms",
            "storage.backend",
            "nope.x",
        ] {
            assert!(e.mentions(key), "{key} not reported in:\n{e}");
        }
        let text = e.to_string();
        assert!(text.contains("did you mean `mqtt.listen`?"), "{text}");
        assert!(
            text.contains("embedded"),
            "valid backends are named: {text}"
        );
    }

    #[test]
    fn bad_alert_rules_are_refused_naming_the_key() {
        let e = errors(
            "[alerts]\nbattery_low_percent = 30\nbattery_clear_percent = 20\n\
             thresholds = [{ name = \"hot\", metric = \"temperature\", op = \"=>\", value = 1.0 },\
                           { name = \"offline\", metric = \"metrics.t\", op = \">\", value = 1.0, severity = \"loud\" }]\n",
        );
        for key in [
            "alerts.battery_clear_percent",
            "alerts.thresholds[0].metric",
            "alerts.thresholds[0].op",
            "alerts.thresholds[1].name",
            "alerts.thresholds[1].severity",
        ] {
            assert!(e.mentions(key), "{key} not reported in:\n{e}");
        }
        let ok = Config::from_toml_str(
            "[alerts]\nthresholds = [{ name = \"hot\", metric = \"metrics.temp_c\", op = \">\", value = 60.0, for_s = 30 }]\n",
        )
        .unwrap();
        assert_eq!(ok.alerts.thresholds[0].severity, "warning");
    }

    #[test]
    fn a_file_that_does_not_parse_says_so() {
        let e = errors("[mqtt\nlisten = ");
        assert_eq!(e.0.len(), 1);
        assert!(e.to_string().contains("TOML"), "{e}");
    }

    #[test]
    fn inconsistent_values_are_rejected() {
        let e = errors(
            "[http]\ndefault_page_size = 5000\nlow_battery_percent = 150\napi_key = \"short\"\n\
             tls_key_file = \"key.pem\"\ntls_client_ca_file = \"ca.pem\"\ntls_reload_secs = 0\n\
             [uploads]\nphoto_max_bytes = 0\nlog_max_bytes = 6000000000\n",
        );
        for key in [
            "uploads.photo_max_bytes",
            "uploads.log_max_bytes",
            "http.default_page_size",
            "http.low_battery_percent",
            "http.api_key",
            "http.tls_cert_file",
            "http.tls_client_ca_file",
            "http.tls_reload_secs",
        ] {
            assert!(e.mentions(key), "{key} not reported in:\n{e}");
        }
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API returns its own large error type.
    fn environment_overrides_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("m.toml", "[mqtt]\nlisten = \"127.0.0.1:2000\"\n")?;
            jail.set_env("MESSINA__MQTT__LISTEN", "127.0.0.1:3000");
            jail.set_env("MESSINA__STORAGE__EMBEDDED__PATH", "/srv/messina");
            jail.set_env("MESSINA__BRIDGE__BATCH_MAX_ROWS", "42");
            let c = Config::load(Some(Path::new("m.toml"))).unwrap();
            assert_eq!(c.mqtt.listen, "127.0.0.1:3000".parse().unwrap());
            assert_eq!(c.storage.embedded.path, PathBuf::from("/srv/messina"));
            assert_eq!(c.bridge.batch_max_rows, 42);
            jail.set_env("MESSINA__BRIDGE__BATCH_MAX_ROWZ", "1");
            let e = Config::load(None).unwrap_err();
            assert!(e.mentions("bridge.batch_max_rowz"), "{e}");
            assert!(e.to_string().contains("MESSINA__"), "{e}");
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API returns its own large error type.
    fn api_keys_come_from_config_files_and_the_environment_with_their_roles() {
        figment::Jail::expect_with(|jail| {
            // Every line is a key (two while a rotation moves callers), blank lines aside.
            jail.create_file(
                "admin.key",
                "admin-key-from-a-file-0001\n\n  admin-key-from-a-file-0002  \n",
            )?;
            jail.set_env("ANALYTICS_KEY", "read-key-from-the-env-0001");
            jail.create_file(
                "m.toml",
                "[http]\napi_key = \"legacy-admin-key-00001\"\napi_keys = [\
                 { key = \"write-key-inline-000001\", role = \"write\" },\
                 { key_file = \"admin.key\", role = \"admin\", name = \"ops\" },\
                 { key_env = \"ANALYTICS_KEY\", role = \"read\" }]\n",
            )?;
            let c = Config::load(Some(Path::new("m.toml"))).unwrap();
            let keys: Vec<(String, ApiRole, String)> = c
                .api_keys()
                .unwrap()
                .into_iter()
                .map(|k| (k.name, k.role, k.key))
                .collect();
            let expected = [
                ("http.api_key", ApiRole::Admin, "legacy-admin-key-00001"),
                (
                    "http.api_keys[0]",
                    ApiRole::Write,
                    "write-key-inline-000001",
                ),
                ("ops", ApiRole::Admin, "admin-key-from-a-file-0001"),
                ("ops", ApiRole::Admin, "admin-key-from-a-file-0002"),
                (
                    "http.api_keys[2]",
                    ApiRole::Read,
                    "read-key-from-the-env-0001",
                ),
            ]
            .map(|(n, r, k)| (n.to_string(), r, k.to_string()));
            assert_eq!(keys, expected);
            assert!(ApiRole::Admin > ApiRole::Write && ApiRole::Write > ApiRole::Read);
            let shown = format!("{:?}", c.api_keys().unwrap());
            assert!(!shown.contains("key-from"), "Debug hides keys: {shown}");

            // The whole list from one environment variable.
            jail.set_env(
                "MESSINA__HTTP__API_KEYS",
                "[{key_env=\"ANALYTICS_KEY\",role=\"write\",max_request_rate=5},\
                  {key=\"another-key-inline-0001\",role=\"read\"}]",
            );
            jail.set_env("MESSINA__HTTP__MAX_REQUEST_RATE", "100");
            let c = Config::load(None).unwrap();
            let keys = c.api_keys().unwrap();
            assert_eq!(keys.len(), 2);
            assert_eq!(keys[0].role, ApiRole::Write);
            assert_eq!(keys[0].key, "read-key-from-the-env-0001");
            assert_eq!(
                (keys[0].max_request_rate, keys[1].max_request_rate),
                (5, 100),
                "a key's own rate, else `http.max_request_rate`"
            );
            Ok(())
        });
    }

    #[test]
    fn bad_api_keys_and_origins_are_refused_naming_the_key() {
        let text = "[http]\napi_key_file = \"/nonexistent/admin.key\"\napi_keys = [\
             { key = \"short\", role = \"read\" },\
             { key_file = \"/nonexistent/k\", role = \"admin\" },\
             { key_env = \"MESSINA_TEST_UNSET_KEY_VARIABLE\", role = \"read\" },\
             { role = \"read\" },\
             { key = \"with a space in it 0001\", role = \"read\" },\
             { key = \"abcdefghijklmnop\", key_env = \"X\", role = \"read\" },\
             { key = \"same-key-twice-000001\", role = \"read\" },\
             { key = \"same-key-twice-000001\", role = \"admin\" }]\n\
             cors_origins = [\"https://ok.example.com:8443\", \"https://x.example.com/path\", \"ftp://x\"]\n";
        // Loading checks what the configuration holds...
        let e = errors(text);
        for key in [
            "http.api_keys[0].key",
            "http.api_keys[3]",
            "http.api_keys[4].key",
            "http.api_keys[5]",
            "http.api_keys[7].key",
            "http.cors_origins[1]",
            "http.cors_origins[2]",
        ] {
            assert!(e.mentions(key), "{key} not reported in:\n{e}");
        }
        for key in [
            "http.api_key_file",
            "http.api_keys[1].key_file",
            "http.api_keys[2].key_env",
        ] {
            assert!(!e.mentions(key), "{key} is read only at start:\n{e}");
        }
        assert!(!e.mentions("http.cors_origins[0]"), "{e}");
        // ...and a server, at start, reads the files and variables it names too.
        let parsed: toml::Value = toml::from_str(text).unwrap();
        let mut config = Config::default();
        config.http.api_key_file = "/nonexistent/admin.key".into();
        config.http.api_keys = parsed["http"]["api_keys"].clone().try_into().unwrap();
        let e = config.api_keys().unwrap_err();
        for key in [
            "http.api_key_file",
            "http.api_keys[0].key",
            "http.api_keys[1].key_file",
            "http.api_keys[2].key_env",
            "http.api_keys[3]",
            "http.api_keys[4].key",
            "http.api_keys[5]",
            "http.api_keys[7].key",
        ] {
            assert!(e.mentions(key), "{key} not reported in:\n{e}");
        }
        let text = e.to_string();
        assert!(text.contains("/nonexistent/k"), "the file is named: {text}");
        assert!(
            !text.contains("same-key-twice"),
            "keys are never shown: {text}"
        );
        let e = errors("[http]\napi_keys = [{ key = \"abcdefghijklmnopq\", role = \"root\" }]\n");
        assert!(e.mentions("http.api_keys"), "{e}");
        assert!(e.to_string().contains("admin"), "the roles are named: {e}");
    }

    #[test]
    fn a_missing_file_says_how_to_make_one() {
        let e = Config::load(Some(Path::new("/nonexistent/messina.toml"))).unwrap_err();
        assert!(e.to_string().contains("print-config"), "{e}");
    }
}
