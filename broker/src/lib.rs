//! The composition root of Messina: starts storage, the embedded broker, the bridge and the HTTP
//! side-port from one `Config`, and shuts them down in order. `messina serve` is a thin wrapper
//! around [`serve`].

pub mod clock;
pub mod edge;
pub mod http;
pub mod http_server;
pub mod ingest;
pub mod inspect;
pub mod json;
pub mod limit;
pub mod mqtt;
pub mod security;
pub mod simulate;
pub mod tls;
pub mod uploads;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use messina_bridge::alerts::AlertService;
use messina_bridge::meter::names;
use messina_config::{Config, Consistency as CqlConsistency, StorageBackend};
use messina_storage::embedded::{EmbeddedOptions, EmbeddedStorage};
use messina_storage::scylla::{Consistency, ScyllaOptions, ScyllaStorage};
use messina_storage::Storage;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

/// How long shutdown waits for the bridge to write what it holds before giving up.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long shutdown waits for in-flight HTTP requests.
const HTTP_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Installs the process-wide Prometheus recorder and describes Messina's metrics.
pub fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(names::WRITE_SECONDS.into()),
            &[
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ],
        )?
        .set_buckets_for_metric(
            Matcher::Full("messina_log_fsync_seconds".into()),
            &[
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0,
            ],
        )?
        .set_buckets_for_metric(
            Matcher::Full(names::BATCH_ROWS.into()),
            &[
                1.0, 5.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 5000.0, 10000.0,
            ],
        )?
        .install_recorder()
        .context("installing the metrics recorder")?;
    for (name, help) in [
        (
            names::RECEIVED,
            "Device messages the bridge received, by kind.",
        ),
        (names::RECEIVED_BYTES, "Payload bytes the bridge received."),
        (names::DECODED, "Rows decoded from valid messages, by kind."),
        (
            names::REJECTED,
            "Messages rejected and stored as dead letters, by kind.",
        ),
        (names::WRITTEN, "Rows written to storage, by table."),
        (
            names::WRITE_ERRORS,
            "Failed storage writes (each is retried or given up).",
        ),
        (
            names::ROWS_DEFERRED,
            "Rows not stored at shutdown because storage kept failing; they stay in the ingest log and are written at the next start.",
        ),
        (
            names::REFUSED,
            "Messages storage refused for good (not an outage), stored as dead letters with the reason.",
        ),
        (
            names::UNTRACKED_METRICS,
            "Metric values the anomaly rule did not judge: their device has alerts.anomaly_max_metrics_per_device windows already.",
        ),
        (
            "messina_mqtt_publishes_total",
            "PUBLISH packets the edge accepted, by QoS.",
        ),
    ] {
        metrics::describe_counter!(name, help);
    }
    metrics::describe_counter!(
        "messina_http_refused_total",
        "HTTP requests refused for their credentials: 401 (none or unknown) and 403 (not allowed there), by status."
    );
    metrics::describe_counter!(
        "messina_uploads_requested_total",
        "Upload URLs handed out, by kind."
    );
    metrics::describe_counter!(
        "messina_uploads_finished_total",
        "Uploads completed, rejected or expired, by kind and state."
    );
    metrics::describe_counter!(
        "messina_upload_requests_dropped_total",
        "Upload requests over MQTT dropped because the upload worker was busy."
    );
    messina_log::describe();
    metrics::describe_histogram!(names::BATCH_ROWS, "Rows per batch written to storage.");
    metrics::describe_histogram!(
        names::WRITE_SECONDS,
        metrics::Unit::Seconds,
        "Time to write one batch to storage."
    );
    metrics::describe_gauge!(
        names::QUEUE_DEPTH,
        "Messages waiting between broker and bridge."
    );
    metrics::describe_gauge!("messina_mqtt_connections", "Open MQTT connections.");
    metrics::describe_gauge!(
        names::ALERT_COMMITS_PENDING,
        "Groups of alert transitions waiting to be stored and published (alert storage is off the ingest path)."
    );
    Ok(handle)
}

/// Runs `f` every `period` (the first time at once; late ticks are delayed, not bunched) until
/// `shutdown`. The one periodic-task loop of the process: alert ticks, metrics upkeep, the upload
/// expiry sweep.
pub(crate) fn spawn_every<F, Fut>(
    period: Duration,
    shutdown: CancellationToken,
    mut f: F,
) -> tokio::task::JoinHandle<()>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => f().await,
            }
        }
    })
}

/// Opens the configured storage backend.
pub async fn open_storage(config: &Config) -> anyhow::Result<Arc<dyn Storage>> {
    match config.storage.backend {
        StorageBackend::Embedded => {
            let e = &config.storage.embedded;
            let storage = EmbeddedStorage::open(&EmbeddedOptions {
                path: e.path.clone(),
                fsync: e.fsync,
                cache_bytes: e.cache_mib << 20,
                low_battery_percent: f64::from(config.http.low_battery_percent),
            })?;
            Ok(Arc::new(storage))
        }
        StorageBackend::Scylla => {
            let sc = &config.storage.scylla;
            let password = config.scylla_password()?;
            let options = ScyllaOptions {
                nodes: sc.nodes.clone(),
                keyspace: sc.keyspace.clone(),
                replication: sc.replication.clone(),
                consistency: match sc.consistency {
                    CqlConsistency::One => Consistency::One,
                    CqlConsistency::Two => Consistency::Two,
                    CqlConsistency::Three => Consistency::Three,
                    CqlConsistency::Quorum => Consistency::Quorum,
                    CqlConsistency::All => Consistency::All,
                    CqlConsistency::LocalQuorum => Consistency::LocalQuorum,
                    CqlConsistency::EachQuorum => Consistency::EachQuorum,
                    CqlConsistency::LocalOne => Consistency::LocalOne,
                },
                local_datacenter: (!sc.local_datacenter.is_empty())
                    .then(|| sc.local_datacenter.clone()),
                ttl_seconds: (i64::from(sc.ttl_days) * 86_400).min(i64::from(i32::MAX)) as i32,
                max_in_flight: sc.max_in_flight,
                request_timeout: Duration::from_millis(sc.request_timeout_ms),
                write_attempts: sc.write_attempts,
                credentials: (!sc.username.is_empty())
                    .then(|| (sc.username.clone(), password.unwrap_or_default())),
                low_battery_percent: f64::from(config.http.low_battery_percent),
            };
            tracing::info!(nodes = ?sc.nodes, keyspace = %sc.keyspace, "connecting to ScyllaDB");
            Ok(Arc::new(ScyllaStorage::connect(&options).await?))
        }
    }
}

/// Runs Messina until `shutdown` is cancelled, then stops accepting queries, drains the bridge
/// (every message it received is written), and closes storage.
pub async fn serve(
    config: Config,
    metrics: Option<PrometheusHandle>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let api_keys = config.api_keys()?;
    check_http_exposure(&config, &api_keys)?;
    let storage = open_storage(&config).await?;
    security::check_exposure(&config, &storage).await?;
    let (log, recovered) = open_log(&config)?;
    let router = edge::router::Router::start(mqtt::router_config(&config.mqtt))?;
    let mut addresses = vec![edge::Listener {
        key: "mqtt.listen",
        addr: config.mqtt.listen,
        tls: None,
    }];
    if config.mqtt.listen_v5 != config.mqtt.listen {
        addresses.push(edge::Listener {
            key: "mqtt.listen_v5",
            addr: config.mqtt.listen_v5,
            tls: None,
        });
    }
    if let Some(addr) = config.mqtt.tls_addr() {
        let m = &config.mqtt;
        let tls = tls::Tls::start(
            "mqtt",
            tls::TlsFiles::new(&m.tls_cert_file, &m.tls_key_file, &m.tls_client_ca_file),
            Duration::from_secs(m.tls_reload_secs),
            &shutdown,
        )?;
        addresses.push(edge::Listener {
            key: "mqtt.tls_listen",
            addr,
            tls: Some(tls),
        });
    }
    let edge = edge::Edge::start(
        addresses,
        edge::Settings::from_config(&config.mqtt),
        log.clone(),
        std::sync::Arc::clone(&router),
        std::sync::Arc::new(security::Authenticator::new(
            Arc::clone(&storage),
            config.mqtt.anonymous,
            config.mqtt.credential_cache_entries,
        )),
        shutdown.clone(),
    )
    .await?;
    let presence = edge.shared.presence.spawn(
        Arc::clone(&storage),
        Arc::clone(&edge.shared.sessions),
        shutdown.clone(),
    );
    tracing::info!(
        node = edge.shared.presence.node(),
        "this node's id in `nodes` and `device_connections`"
    );
    let registry_watch = (config.mqtt.registry_poll_secs > 0).then(|| {
        security::watch::spawn(
            Arc::clone(&storage),
            Arc::clone(&edge.shared.sessions),
            Arc::clone(&edge.shared.auth),
            Duration::from_secs(config.mqtt.registry_poll_secs),
            shutdown.clone(),
        )
    });
    let listener = tokio::net::TcpListener::bind(config.http.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (`http.listen`); is another process using it?",
                config.http.listen
            )
        })?;

    // Alert transitions go from the alert service to the publisher over a bounded channel; the
    // publisher ends when the service (its last sender) is dropped at shutdown.
    let (notices_tx, notices_rx) = tokio::sync::mpsc::channel(4096);
    // Replies to devices (upload URLs) share the publisher link, on their own bounded channel.
    let (replies_tx, replies_rx) = tokio::sync::mpsc::channel(1024);
    let publisher = mqtt::spawn_publisher(router.feeder(), notices_rx, replies_rx);
    // The log's checkpoint: the position through which everything is stored, and what the alert
    // rules remember of it is saved (the bridge tells it, or the alert service once it has saved).
    let on_stored: messina_bridge::OnStored = {
        let log = log.clone();
        Arc::new(move |through| {
            if let Err(e) = log.checkpoint(through) {
                tracing::error!(error = %e, "cannot record the ingest log checkpoint; check the disk");
            }
        })
    };
    let alerts = if config.alerts.enabled {
        let rules = messina_bridge::alerts::Rules::from_config(&config.alerts);
        let service =
            AlertService::start(rules, Arc::clone(&storage), notices_tx, on_stored.clone())
                .await
                .context("restoring alert state from storage")?;
        service.republish_active();
        Some(service)
    } else {
        drop(notices_tx);
        None
    };
    let ticker = alerts.clone().map(|service| {
        spawn_every(Duration::from_secs(1), shutdown.clone(), move || {
            let service = Arc::clone(&service);
            async move { service.tick(clock::now_millis()).await }
        })
    });
    let (uploads, embedded_s3) = start_uploads(&config, &storage, &shutdown).await?;
    let sweep = uploads
        .clone()
        .map(|service| service.spawn_sweep(shutdown.clone()));
    let (bridge, bridge_task) = messina_bridge::spawn(
        Arc::clone(&storage),
        messina_bridge::Settings::from_config(&config.bridge),
        match &alerts {
            Some(service) => messina_bridge::AfterWrite::Alerts(Arc::clone(service)),
            None => messina_bridge::AfterWrite::Checkpoint(on_stored),
        },
        shutdown.clone(),
    );
    let (upload_jobs, upload_worker) = match &uploads {
        Some(service) => {
            let (tx, rx) = tokio::sync::mpsc::channel(mqtt::UPLOAD_QUEUE);
            let worker = mqtt::spawn_upload_worker(Arc::clone(service), rx, replies_tx);
            (Some(tx), Some(worker))
        }
        None => {
            drop(replies_tx);
            (None, None)
        }
    };
    let consumer = ingest::spawn_consumer(
        &log,
        recovered.checkpoint,
        recovered.end,
        ingest::Dispatch {
            bridge,
            alerts: alerts.clone(),
            uploads: upload_jobs,
        },
    );
    let upkeep = metrics.clone().map(|handle| {
        spawn_every(Duration::from_secs(5), shutdown.clone(), move || {
            handle.run_upkeep();
            std::future::ready(())
        })
    });
    let state = Arc::new(http::AppState {
        storage: Arc::clone(&storage),
        metrics,
        access: http::auth::Access::new(
            &api_keys,
            Arc::clone(&edge.shared.auth),
            config.http.max_request_rate,
            config.http.request_burst,
        ),
        sessions: Arc::clone(&edge.shared.sessions),
        cors_origins: config.http.cors_origins.clone(),
        default_page_size: config.http.default_page_size,
        max_page_size: config.http.max_page_size,
        low_battery_percent: f64::from(config.http.low_battery_percent),
        alerts: alerts.clone(),
        uploads: uploads.clone(),
        ingest: Some(http::ingest::Ingest {
            log: log.clone(),
            limits: messina_bridge::Settings::from_config(&config.bridge).limits,
        }),
        max_body_bytes: config.http.max_body_kib << 10,
        request_timeout: Duration::from_millis(config.http.request_timeout_ms),
        max_concurrent_requests: config.http.max_concurrent_requests,
        streams: Arc::new(tokio::sync::Semaphore::new(config.http.max_event_streams)),
        shutdown: shutdown.clone(),
    });
    // Kept to save the alert rules' state once the bridge has drained.
    let alerts_at_shutdown = alerts;
    let https = (!config.http.tls_cert_file.is_empty())
        .then(|| {
            let h = &config.http;
            tls::Tls::start(
                "http",
                tls::TlsFiles::new(&h.tls_cert_file, &h.tls_key_file, &h.tls_client_ca_file),
                Duration::from_secs(h.tls_reload_secs),
                &shutdown,
            )
        })
        .transpose()?;
    let scheme = if https.is_some() { "https" } else { "http" };
    let key_watch = (config.http.key_reload_secs > 0 && config.http.has_key_files()).then(|| {
        http::auth::watch_keys(
            Arc::clone(&state),
            config.clone(),
            Duration::from_secs(config.http.key_reload_secs),
            shutdown.clone(),
        )
    });
    let app = http::app(state);
    let http = tokio::spawn(http_server::serve(
        listener,
        https,
        move |certificate| http::connection_service(app.clone(), certificate),
        shutdown.clone(),
        HTTP_DRAIN_TIMEOUT,
        "http.listen",
    ));
    tracing::info!(
        mqtt = %config.mqtt.listen,
        mqtt_alias = %config.mqtt.listen_v5,
        http = %config.http.listen,
        scheme,
        http_api_keys = api_keys.len(),
        storage = ?config.storage.backend,
        s3 = embedded_s3.as_ref().map(|s| s.endpoint.as_str()).unwrap_or(config.uploads.endpoint.as_str()),
        "messina is serving"
    );

    shutdown.cancelled().await;
    tracing::info!("shutting down: draining the ingest log into storage");
    // The edge stops reading sockets and sends the acknowledgements the log allows; nothing more
    // is appended once it has stopped. Closing the log syncs what it holds, the consumer reads
    // it to the end and drops the last bridge handle, and the bridge then drains.
    let shared = Arc::clone(&edge.shared);
    edge.stopped().await;
    let _ = presence.await;
    shared.presence.finish(&storage, &shared.sessions).await;
    log.close();
    let _ = consumer.await;
    // The consumer held the only job sender; the worker answers what it has and ends.
    if let Some(worker) = upload_worker {
        let _ = tokio::time::timeout(HTTP_DRAIN_TIMEOUT, worker).await;
    }
    match tokio::time::timeout(DRAIN_TIMEOUT, bridge_task).await {
        Ok(_) => {}
        Err(_) => tracing::error!("the bridge did not drain within {DRAIN_TIMEOUT:?}"),
    }
    if tokio::time::timeout(HTTP_DRAIN_TIMEOUT, http)
        .await
        .is_err()
    {
        tracing::warn!("HTTP requests still running after {HTTP_DRAIN_TIMEOUT:?}; closing anyway");
    }
    if let Some(sweep) = sweep {
        let _ = sweep.await;
    }
    if let Some(s3) = embedded_s3 {
        let _ = s3.task.await;
    }
    if let Some(ticker) = ticker {
        let _ = ticker.await;
    }
    if let Some(watch) = registry_watch {
        let _ = watch.await;
    }
    if let Some(watch) = key_watch {
        let _ = watch.await;
    }
    // The bridge has fed its last batch to the rules: save their state, which moves the checkpoint
    // to the bridge's last stored position, so a restart resumes streaks, holding times and
    // anomaly windows exactly.
    if let Some(service) = alerts_at_shutdown {
        service.flush().await;
    }
    // Every holder of the alert service is gone now, so the publisher drains and ends.
    let _ = tokio::time::timeout(HTTP_DRAIN_TIMEOUT, publisher).await;
    if let Some(upkeep) = upkeep {
        let _ = upkeep.await;
    }
    // The last position stored (and remembered by the rules) is the final checkpoint: persist it,
    // so the next start replays nothing that is already stored.
    log.closed().await;
    log.persist_checkpoint()
        .context("writing the ingest log checkpoint")?;
    let unstored = log.used_bytes();
    storage.close().await.context("closing storage")?;
    if unstored > 0 {
        tracing::warn!(
            bytes = unstored,
            "stopped; part of the ingest log is not stored yet and is written at the next start"
        );
    } else {
        tracing::info!("stopped cleanly");
    }
    Ok(())
}

/// Refuses to serve the HTTP API to the network without any API key, as Mosquitto 2 refuses
/// anonymous network listeners: anyone who reached it could read the fleet's data, post as any
/// device and manage the registry. Opting in (`http.open = true`) is allowed, loudly.
fn check_http_exposure(config: &Config, api_keys: &[messina_config::ApiKey]) -> anyhow::Result<()> {
    let listen = config.http.listen;
    if !api_keys.is_empty() || listen.ip().is_loopback() {
        return Ok(());
    }
    if config.http.open {
        tracing::warn!(%listen, "the HTTP API is open to the network without an API key (`http.open = true`): anyone who reaches it may read all data, post as any device and manage the device registry");
        return Ok(());
    }
    anyhow::bail!(
        "`http.listen` {listen} is reachable from the network, but no API key is configured, so \
         anyone could read the fleet's data and manage its devices. Configure a key, e.g. \
         `api_keys = [{{ key_file = \"/run/secrets/messina-admin\", role = \"admin\" }}]` in \
         `[http]` (`http.api_keys`; or set MESSINA__HTTP__API_KEY), or serve it open on a closed \
         network with `http.open = true`, or listen on 127.0.0.1"
    )
}

/// Opens (recovering when needed) the ingest log.
fn open_log(config: &Config) -> anyhow::Result<(messina_log::Log, messina_log::Recovered)> {
    let c = &config.ingest_log;
    let dir = config.ingest_log_dir();
    let options = messina_log::Options {
        dir: dir.clone(),
        segment_bytes: c.segment_mib << 20,
        max_bytes: c.max_mib << 20,
        max_batch_bytes: (c.max_batch_kib << 10) as usize,
        memory_bytes: (c.memory_mib << 20) as usize,
        durability: match c.durability {
            messina_config::Durability::Fsync => messina_log::Durability::Fsync,
            messina_config::Durability::OsBuffer => {
                tracing::warn!(
                    "ingest_log.durability = \"os-buffer\": messages are acknowledged before \
                     they are on disk; a power loss or kernel crash loses acknowledged messages"
                );
                messina_log::Durability::OsBuffer
            }
        },
    };
    let (log, recovered) = messina_log::Log::open(options).with_context(|| {
        format!(
            "opening the ingest log in {} (`ingest_log.path`)",
            dir.display()
        )
    })?;
    tracing::info!(
        dir = %dir.display(),
        segments = recovered.segments,
        replay_records = recovered.replay_records,
        truncated_bytes = recovered.truncated_bytes,
        corrupt_bytes = recovered.corrupt_bytes,
        "ingest log opened"
    );
    Ok((log, recovered))
}

/// Starts the upload service, and the embedded S3 endpoint when no external one is configured.
async fn start_uploads(
    config: &Config,
    storage: &Arc<dyn Storage>,
    shutdown: &CancellationToken,
) -> anyhow::Result<(
    Option<Arc<uploads::UploadService>>,
    Option<uploads::EmbeddedS3>,
)> {
    let u = &config.uploads;
    if !u.enabled {
        return Ok((None, None));
    }
    let (store, embedded) = if u.endpoint.is_empty() {
        let dir = if u.s3_path.is_empty() {
            config.storage.embedded.path.join("objects")
        } else {
            std::path::PathBuf::from(&u.s3_path)
        };
        let s3 = uploads::EmbeddedS3::start(&dir, u.s3_listen, &u.bucket, shutdown.clone())
            .await
            .context("starting the embedded S3 endpoint")?;
        tracing::info!(endpoint = %s3.endpoint, dir = %dir.display(), "embedded S3 endpoint is serving");
        (s3.store(u)?, Some(s3))
    } else {
        let secret = config.s3_secret_key()?.unwrap_or_default();
        let store = uploads::ObjectStore::new(
            &u.endpoint,
            &u.region,
            &u.bucket,
            &u.access_key_id,
            &secret,
            u.path_style,
        )?;
        (store, None)
    };
    let service = uploads::UploadService::new(store, Arc::clone(storage), u);
    Ok((Some(Arc::new(service)), embedded))
}
