//! The bridge task end to end with the embedded backend: batching by size and by time, retries
//! while storage fails, dead letters, and draining on shutdown.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use messina_bridge::alerts::{AlertService, Notice};
use messina_bridge::{spawn, AfterWrite, BridgeHandle, Inbound, OnStored, Settings};
use messina_storage::embedded::{EmbeddedOptions, EmbeddedStorage};
use messina_storage::*;
use serde_json::json;
use tokio_util::sync::CancellationToken;

const NOW: i64 = 1_760_000_000_000;

/// Delegates to the embedded backend, records batch sizes, fails the first `fail` writes, and
/// refuses for good (not an outage) any batch holding a reading of device `poison`.
struct Recording {
    inner: EmbeddedStorage,
    batches: Mutex<Vec<usize>>,
    fail: AtomicUsize,
    /// Fails every write while set (an outage that outlasts shutdown).
    down: std::sync::atomic::AtomicBool,
    /// Alert writes hang while set (alert storage that stopped answering).
    alerts_stuck: std::sync::atomic::AtomicBool,
    /// Alert writes fail for good while set.
    alerts_refused: std::sync::atomic::AtomicBool,
    /// Saves of the rules' memory fail (retryably) while set; each failed attempt is counted.
    states_down: std::sync::atomic::AtomicBool,
    states_failed: AtomicUsize,
}

#[async_trait]
impl Storage for Recording {
    async fn write_batch(&self, batch: &Batch) -> Result<()> {
        if self
            .fail
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(StorageError::Unavailable("injected outage".into()));
        }
        if self.down.load(Ordering::SeqCst) {
            return Err(StorageError::Unavailable("storage is down".into()));
        }
        if batch.readings.iter().any(|r| r.device.as_str() == "poison") {
            return Err(StorageError::InvalidRequest(
                "value out of range for column".into(),
            ));
        }
        self.batches.lock().unwrap().push(batch.len());
        self.inner.write_batch(batch).await
    }
    async fn device(&self, d: &DeviceId) -> Result<Option<DeviceState>> {
        self.inner.device(d).await
    }
    async fn fleet(&self, q: &FleetQuery) -> Result<Page<DeviceState>> {
        self.inner.fleet(q).await
    }
    async fn alert_counts(&self, q: &AlertCountQuery) -> Result<Vec<AlertCount>> {
        self.inner.alert_counts(q).await
    }
    async fn fleet_counts(&self) -> Result<FleetCounts> {
        self.inner.fleet_counts().await
    }
    async fn report_node(&self, node: &str, connected: u64, ttl_ms: Millis) -> Result<()> {
        self.inner.report_node(node, connected, ttl_ms).await
    }
    async fn connected_devices(&self) -> Result<u64> {
        self.inner.connected_devices().await
    }
    async fn put_connections(&self, c: &[Connection]) -> Result<()> {
        self.inner.put_connections(c).await
    }
    async fn connections(&self, d: &[DeviceId]) -> Result<Vec<Connection>> {
        self.inner.connections(d).await
    }
    async fn telemetry(&self, q: &TelemetryQuery) -> Result<Page<Reading>> {
        self.inner.telemetry(q).await
    }
    async fn aggregates(&self, d: &DeviceId, q: &AggregateQuery) -> Result<Vec<Aggregate>> {
        self.inner.aggregates(d, q).await
    }
    async fn fleet_aggregates(&self, q: &AggregateQuery) -> Result<Vec<Aggregate>> {
        self.inner.fleet_aggregates(q).await
    }
    async fn events(&self, q: &EventQuery) -> Result<Page<Event>> {
        self.inner.events(q).await
    }
    async fn dead_letters(&self, q: &DeadLetterQuery) -> Result<Page<DeadLetter>> {
        self.inner.dead_letters(q).await
    }
    async fn put_alerts(&self, alerts: &[Alert]) -> Result<()> {
        while self.alerts_stuck.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if self.alerts_refused.load(Ordering::SeqCst) {
            return Err(StorageError::Fatal("alert table is read-only".into()));
        }
        self.inner.put_alerts(alerts).await
    }
    async fn alert(&self, id: &str) -> Result<Option<Alert>> {
        self.inner.alert(id).await
    }
    async fn alerts(&self, q: &AlertQuery) -> Result<Page<Alert>> {
        self.inner.alerts(q).await
    }
    async fn put_alert_states(&self, states: &[(DeviceId, Vec<u8>)]) -> Result<()> {
        if self.states_down.load(Ordering::SeqCst) {
            self.states_failed.fetch_add(1, Ordering::SeqCst);
            return Err(StorageError::Unavailable("alert state is down".into()));
        }
        self.inner.put_alert_states(states).await
    }
    async fn alert_states(&self) -> Result<Vec<(DeviceId, Vec<u8>)>> {
        self.inner.alert_states().await
    }
    async fn register_device(&self, d: &RegisteredDevice) -> Result<bool> {
        self.inner.register_device(d).await
    }
    async fn update_device(&self, d: &RegisteredDevice) -> Result<()> {
        self.inner.update_device(d).await
    }
    async fn registry_changes(&self, since: Millis, limit: usize) -> Result<Vec<RegistryChange>> {
        self.inner.registry_changes(since, limit).await
    }
    async fn registered_device(&self, id: &DeviceId) -> Result<Option<RegisteredDevice>> {
        self.inner.registered_device(id).await
    }
    async fn registered_devices(&self, q: &DeviceQuery) -> Result<Page<RegisteredDevice>> {
        self.inner.registered_devices(q).await
    }
    async fn put_upload(&self, upload: &Upload) -> Result<()> {
        self.inner.put_upload(upload).await
    }
    async fn upload(&self, id: &str) -> Result<Option<Upload>> {
        self.inner.upload(id).await
    }
    async fn uploads(&self, q: &UploadQuery) -> Result<Page<Upload>> {
        self.inner.uploads(q).await
    }
    async fn expired_uploads(&self, before: Millis, limit: usize) -> Result<Vec<Upload>> {
        self.inner.expired_uploads(before, limit).await
    }
    async fn health(&self) -> Result<()> {
        self.inner.health().await
    }
    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    storage: Arc<Recording>,
    /// Every position the bridge reported stored, in order.
    stored_through: Arc<Mutex<Vec<u64>>>,
    shutdown: CancellationToken,
    handle: Option<BridgeHandle>,
    task: tokio::task::JoinHandle<()>,
}

/// Recording storage over a new embedded store in `dir`, failing its first `fail` writes.
fn recording(dir: &std::path::Path, fail: usize) -> Arc<Recording> {
    Arc::new(Recording {
        inner: EmbeddedStorage::open(&EmbeddedOptions::new(dir)).unwrap(),
        batches: Mutex::new(Vec::new()),
        fail: AtomicUsize::new(fail),
        down: Default::default(),
        alerts_stuck: Default::default(),
        alerts_refused: Default::default(),
        states_down: Default::default(),
        states_failed: Default::default(),
    })
}

fn fixture(rows: usize, delay_ms: u64, fail: usize) -> Fixture {
    fixture_with(rows, delay_ms, fail, Arc::default(), None)
}

/// A checkpoint that records each position it is told into `stored_through`.
fn checkpoint_into(stored_through: &Arc<Mutex<Vec<u64>>>) -> OnStored {
    let stored_through = Arc::clone(stored_through);
    Arc::new(move |p| stored_through.lock().unwrap().push(p))
}

/// A fixture whose checkpoint records into `stored_through`, and whose bridge hands its batches to
/// `alerts` when there is one (which then reports to the checkpoint).
fn fixture_with(
    rows: usize,
    delay_ms: u64,
    fail: usize,
    stored_through: Arc<Mutex<Vec<u64>>>,
    alerts: Option<Arc<AlertService>>,
) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let storage = recording(dir.path(), fail);
    let settings = Settings {
        batch_max_rows: rows,
        batch_max_delay: Duration::from_millis(delay_ms),
        retry_initial_delay: Duration::from_millis(5),
        retry_max_delay: Duration::from_millis(20),
        ..Settings::default()
    };
    let after = match alerts {
        Some(service) => AfterWrite::Alerts(service),
        None => AfterWrite::Checkpoint(checkpoint_into(&stored_through)),
    };
    let shutdown = CancellationToken::new();
    let (handle, task) = spawn(storage.clone(), settings, after, shutdown.clone());
    Fixture {
        _dir: dir,
        storage,
        stored_through,
        shutdown,
        handle: Some(handle),
        task,
    }
}

/// A message at log position `1000 + 10 * i` (ten bytes long), so tests can name positions.
fn at(i: i64, topic: &str, payload: Bytes, received_at: i64) -> Inbound {
    let pos = 1000 + 10 * i as u64;
    Inbound {
        pos,
        end: pos + 10,
        topic: topic.into(),
        payload,
        received_at,
    }
}

fn telemetry(device: &str, i: i64) -> Inbound {
    let pos = 1000 + 10 * i as u64;
    Inbound {
        pos,
        end: pos + 10,
        topic: format!("devices/{device}/telemetry"),
        payload: Bytes::from(rmp_serde::to_vec(&json!({"ts": NOW + i, "battery": 50})).unwrap()),
        received_at: NOW + 10_000,
    }
}

impl Fixture {
    async fn send(&self, inbound: Inbound) {
        self.handle.as_ref().unwrap().send(inbound).await.unwrap();
    }

    /// Drops the last handle and waits for the bridge to drain.
    async fn close(&mut self) {
        self.handle.take();
        (&mut self.task).await.unwrap();
    }

    async fn stored(&self, device: &str) -> usize {
        self.storage
            .telemetry(&TelemetryQuery {
                device: DeviceId::new(device).unwrap(),
                range: TimeRange::default(),
                order: Order::OldestFirst,
                page: PageRequest::first(10_000),
            })
            .await
            .unwrap()
            .items
            .len()
    }

    /// Every dead letter stored, newest first.
    async fn dead_letters(&self) -> Vec<DeadLetter> {
        self.storage
            .dead_letters(&DeadLetterQuery {
                device: None,
                range: TimeRange::default(),
                page: PageRequest::first(10),
            })
            .await
            .unwrap()
            .items
    }

    async fn wait_stored(&self, device: &str, n: usize) {
        for _ in 0..500 {
            if self.stored(device).await == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{n} readings of {device} were never stored");
    }
}

#[tokio::test]
async fn batches_by_size_then_drains_the_rest_on_close() {
    let mut f = fixture(10, 60_000, 0);
    for i in 0..25 {
        f.send(telemetry("d1", i)).await;
    }
    f.wait_stored("d1", 20).await;
    assert_eq!(*f.storage.batches.lock().unwrap(), vec![10, 10]);
    f.close().await;
    assert_eq!(f.stored("d1").await, 25);
    assert_eq!(*f.storage.batches.lock().unwrap(), vec![10, 10, 5]);
}

#[tokio::test]
async fn batches_by_time() {
    let f = fixture(1000, 30, 0);
    for i in 0..3 {
        f.send(telemetry("d1", i)).await;
    }
    f.wait_stored("d1", 3).await;
    assert_eq!(*f.storage.batches.lock().unwrap(), vec![3]);
}

#[tokio::test]
async fn retries_while_storage_fails_and_loses_nothing() {
    let mut f = fixture(5, 10, 4);
    for i in 0..12 {
        f.send(telemetry("d1", i)).await;
    }
    f.close().await;
    assert_eq!(f.stored("d1").await, 12);
    assert_eq!(
        f.storage.fail.load(Ordering::SeqCst),
        0,
        "all injected failures were hit"
    );
}

#[tokio::test]
async fn bad_messages_become_dead_letters_beside_good_ones() {
    let mut f = fixture(100, 10, 0);
    f.send(telemetry("d1", 1)).await;
    f.send(at(
        2,
        "devices/d1/telemetry",
        Bytes::from_static(&[0x81, 0xa2, b't']),
        NOW,
    ))
    .await;
    f.send(at(
        3,
        "devices/bad id/events",
        Bytes::from_static(b"{}"),
        NOW + 1,
    ))
    .await;
    f.send(telemetry("d1", 4)).await;
    f.close().await;
    assert_eq!(f.stored("d1").await, 2);
    let dead = f.dead_letters().await;
    assert_eq!(dead.len(), 2);
    assert_eq!(dead[0].topic, "devices/bad id/events");
    assert_eq!(dead[0].device, None);
    assert!(
        dead[0].reason.contains("device id contains ' '"),
        "{}",
        dead[0].reason
    );
    assert_eq!(dead[1].device, Some(DeviceId::new("d1").unwrap()));
    assert_eq!(dead[1].payload, vec![0x81, 0xa2, b't'], "raw bytes kept");
    assert!(
        dead[1].reason.contains("not valid MessagePack"),
        "{}",
        dead[1].reason
    );
    // Dead-letter ids are log positions, so a replay overwrites instead of duplicating.
    assert_eq!((dead[0].id, dead[1].id), (1030, 1020));
}

#[tokio::test]
async fn stored_positions_advance_in_order_over_passed_records() {
    let mut f = fixture(2, 10, 0);
    let handle = f.handle.clone().unwrap();
    f.send(telemetry("d1", 0)).await;
    // A will or an upload request handled elsewhere: only its end is reported.
    handle.pass(1020).await.unwrap();
    f.send(telemetry("d1", 2)).await;
    f.send(telemetry("d1", 3)).await;
    handle.pass(1050).await.unwrap();
    drop(handle);
    f.close().await;
    assert_eq!(f.stored("d1").await, 3);
    let through = f.stored_through.lock().unwrap().clone();
    assert!(through.windows(2).all(|w| w[0] < w[1]), "{through:?}");
    assert_eq!(through.last(), Some(&1050), "{through:?}");
}

#[tokio::test]
async fn a_refused_batch_is_split_and_only_the_message_at_fault_becomes_a_dead_letter() {
    let mut f = fixture(100, 10, 0);
    for i in 0..9 {
        let device = if i == 5 { "poison" } else { "d1" };
        f.send(telemetry(device, i)).await;
    }
    f.close().await;
    assert_eq!(f.stored("d1").await, 8, "every other message is stored");
    let dead = f.dead_letters().await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].id, 1050);
    assert_eq!(dead[0].topic, "devices/poison/telemetry");
    assert!(
        dead[0].reason.contains("storage refused") && dead[0].reason.contains("out of range"),
        "{}",
        dead[0].reason
    );
    assert_eq!(*f.stored_through.lock().unwrap(), vec![1090]);
}

#[tokio::test]
async fn a_batch_given_up_at_shutdown_is_not_reported_stored() {
    let mut f = fixture(2, 10, 0);
    f.send(telemetry("d1", 0)).await;
    f.send(telemetry("d1", 1)).await;
    f.wait_stored("d1", 2).await;
    f.storage.down.store(true, Ordering::SeqCst);
    f.send(telemetry("d1", 2)).await;
    f.send(telemetry("d1", 3)).await;
    f.send(telemetry("d1", 4)).await;
    f.shutdown.cancel();
    f.close().await;
    // Only the first batch is stored; the log keeps the rest for the next start.
    assert_eq!(*f.stored_through.lock().unwrap(), vec![1020]);
}

/// A bridge that evaluates alerts with a service over `alert_storage` (the readings go to the
/// fixture's own storage), the channel the service publishes on, and the service.
async fn with_alerts(
    alert_storage: &Arc<Recording>,
) -> (
    Fixture,
    tokio::sync::mpsc::Receiver<Notice>,
    Arc<AlertService>,
) {
    let (notices_tx, notices) = tokio::sync::mpsc::channel(1024);
    let rules = messina_bridge::alerts::Rules::from_config(&Default::default());
    let stored_through = Arc::default();
    let service = AlertService::start(
        rules,
        alert_storage.clone(),
        notices_tx,
        checkpoint_into(&stored_through),
    )
    .await
    .unwrap();
    (
        fixture_with(10, 5, 0, stored_through, Some(service.clone())),
        notices,
        service,
    )
}

/// Sends a low-battery reading from each of `n` devices named `{prefix}-{i}` and waits until
/// each is stored.
async fn low_batteries(f: &Fixture, prefix: &str, n: i64) {
    for i in 0..n {
        let low = Inbound {
            payload: Bytes::from(rmp_serde::to_vec(&json!({"ts": NOW + i, "battery": 5})).unwrap()),
            ..telemetry(&format!("{prefix}-{i}"), i)
        };
        f.send(low).await;
    }
    for i in 0..n {
        f.wait_stored(&format!("{prefix}-{i}"), 1).await;
    }
}

/// Waits for `n` published `battery_low` alerts (presence notices are skipped).
async fn raised(notices: &mut tokio::sync::mpsc::Receiver<Notice>, n: usize, what: &str) {
    let mut raised = 0;
    while raised < n {
        let notice = tokio::time::timeout(Duration::from_secs(10), notices.recv())
            .await
            .expect(what)
            .unwrap();
        if let Notice::Alert(a) = notice {
            assert_eq!(a.rule, "battery_low");
            raised += 1;
        }
    }
}

async fn alerts_stored(storage: &Recording) -> usize {
    storage
        .alerts(&AlertQuery::all(100))
        .await
        .unwrap()
        .items
        .len()
}

#[tokio::test]
async fn alert_storage_that_hangs_does_not_hold_up_ingestion() {
    let dir = tempfile::tempdir().unwrap();
    let alert_storage = recording(dir.path(), 0);
    // The service starts (restoring state) before alert storage hangs.
    let (mut f, mut notices, _) = with_alerts(&alert_storage).await;
    alert_storage.alerts_stuck.store(true, Ordering::SeqCst);
    low_batteries(&f, "low", 40).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(100), notices.recv())
            .await
            .is_err(),
        "an alert was published before it was stored"
    );
    // Alert storage answers again: every raised alert is stored, then published, in order.
    alert_storage.alerts_stuck.store(false, Ordering::SeqCst);
    raised(&mut notices, 40, "alerts published once stored").await;
    assert_eq!(alerts_stored(&alert_storage).await, 40);
    f.close().await;
}

#[tokio::test]
async fn alert_storage_that_refuses_still_publishes_and_ingestion_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let alert_storage = recording(dir.path(), 0);
    let (mut f, mut notices, _) = with_alerts(&alert_storage).await;
    alert_storage.alerts_refused.store(true, Ordering::SeqCst);
    low_batteries(&f, "refused", 5).await;
    // Fleet managers still hear of every alert, though none could be stored.
    raised(
        &mut notices,
        5,
        "alerts published although their storage refused them",
    )
    .await;
    assert_eq!(alerts_stored(&alert_storage).await, 0);
    f.close().await;
}

/// With alert rules, a position reaches the checkpoint only once the rules' memory of everything
/// before it is saved: not when its batch is stored, not while saving that memory fails, and at
/// the first save that succeeds. So a crash replays what the saved memory has not seen.
#[tokio::test]
async fn with_alert_rules_the_checkpoint_waits_until_their_memory_is_saved() {
    let dir = tempfile::tempdir().unwrap();
    let alert_storage = recording(dir.path(), 0);
    let (mut f, _notices, service) = with_alerts(&alert_storage).await;
    let saved = |device: &'static str| {
        let alert_storage = Arc::clone(&alert_storage);
        async move {
            alert_storage
                .alert_states()
                .await
                .unwrap()
                .iter()
                .any(|(d, _)| d.as_str() == device)
        }
    };
    // Saves until the writer, which hands a batch to the rules just after storing it, has.
    let save_until = |what: &'static str, done: Box<dyn Fn() -> bool + Send>| {
        let service = Arc::clone(&service);
        async move {
            for _ in 0..200 {
                service.flush().await;
                if done() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("{what}");
        }
    };

    f.send(telemetry("mem-1", 0)).await;
    f.wait_stored("mem-1", 1).await;
    assert!(
        f.stored_through.lock().unwrap().is_empty(),
        "the checkpoint moved before the rules' memory was saved"
    );
    let stored_through = Arc::clone(&f.stored_through);
    save_until(
        "the first save never reported the batch",
        Box::new(move || !stored_through.lock().unwrap().is_empty()),
    )
    .await;
    assert_eq!(*f.stored_through.lock().unwrap(), vec![1010]);
    assert!(saved("mem-1").await);

    // Saving fails: the batch is stored, its position is held back.
    alert_storage.states_down.store(true, Ordering::SeqCst);
    f.send(telemetry("mem-2", 1)).await;
    f.wait_stored("mem-2", 1).await;
    let storage = Arc::clone(&alert_storage);
    save_until(
        "the rules' memory of mem-2 was never saved",
        Box::new(move || storage.states_failed.load(Ordering::SeqCst) > 0),
    )
    .await;
    assert_eq!(*f.stored_through.lock().unwrap(), vec![1010]);
    assert!(!saved("mem-2").await);

    // It works again: the memory kept from the failed save is saved, then the position reported.
    alert_storage.states_down.store(false, Ordering::SeqCst);
    service.flush().await;
    assert_eq!(*f.stored_through.lock().unwrap(), vec![1010, 1020]);
    assert!(saved("mem-2").await);
    f.close().await;
}
