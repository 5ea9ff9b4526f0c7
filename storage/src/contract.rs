//! The storage contract: one suite of behaviours that every backend must pass, run against each
//! backend by [`contract_suite!`](crate::contract_suite). A storage behaviour is specified here
//! first; a backend is done when it passes all of it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use async_trait::async_trait;

use crate::model::{
    Aggregate, Alert, AlertState, AttrValue, Batch, Connection, DeadLetter, DeviceId, Event,
    Reading, Upload, UploadState,
};
use crate::query::{
    AggregateQuery, AlertCount, AlertCountQuery, AlertQuery, AlertStateFilter, Bucket,
    DeadLetterQuery, EventQuery, FleetCounts, FleetQuery, Order, Page, PageRequest, TelemetryQuery,
    TimeRange, UploadQuery,
};
use crate::registry::{
    Credential, DeviceQuery, DeviceStatus, RegisteredDevice, RegistryChange, Role,
};
use crate::{Storage, StorageError};

/// Opens a backend for the suite. Every call to `open` on one harness opens the *same* data, so
/// the suite can close a backend and reopen it; each harness starts empty.
#[async_trait]
pub trait Harness: Send + Sync {
    async fn open(&self) -> Arc<dyn Storage>;
}

/// Expands to one `#[tokio::test]` per contract behaviour. `$harness` is an expression evaluating
/// to a future of a fresh, empty [`Harness`]; attributes after it go on every test (the ScyllaDB
/// suite uses `#[cfg_attr(messina_skip_scylla, ignore = ...)]`, so an opt-out lists them as
/// ignored).
#[macro_export]
macro_rules! contract_suite {
    ($harness:expr $(, #[$attr:meta])* $(,)?) => {
        $crate::contract_suite!(@each [$(#[$attr])*] $harness;
            idempotent_upsert, newest_and_oldest_first, half_open_ranges, cursors_page_exactly_once,
            latest_is_never_overwritten_by_an_older_reading, empty_batch_and_unknown_device,
            data_survives_close_and_reopen, devices_are_isolated, foreign_cursor_is_rejected,
            events_by_kind_page_exactly_once, fleet_pages_and_counts, dead_letters_newest_first,
            alerts_upsert_by_id_filter_and_page, uploads_upsert_by_id_list_per_device_and_expire,
            alert_states_replace_per_device_and_survive_reopen,
            registry_registers_each_id_once, registry_updates_lists_and_filters,
            registry_changes_are_read_in_order_for_a_week,
            connections_hold_while_their_node_reports, alert_counts_read_one_rule_family,
            aggregates_match_the_raw_readings, aggregates_refuse_bad_ranges);
    };
    (@each $attrs:tt $harness:expr; $($name:ident),* $(,)?) => {
        $( $crate::contract_suite!(@one $attrs $harness, $name); )*
    };
    (@one [$($attr:tt)*] $harness:expr, $name:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        $($attr)*
        async fn $name() {
            $crate::contract::$name(&$harness.await).await
        }
    };
}

const T0: i64 = 1_760_000_000_000;

fn dev(id: &str) -> DeviceId {
    DeviceId::new(id).unwrap()
}

/// A reading with a battery value, at `T0 + offset` seconds.
pub fn reading(device: &str, offset_s: i64, seq: u64, battery: f64) -> Reading {
    Reading {
        device: dev(device),
        ts: T0 + offset_s * 1000,
        seq,
        received_at: T0 + offset_s * 1000 + 5,
        battery: Some(battery),
        rssi: None,
        online: None,
        metrics: BTreeMap::from([("temp_c".to_string(), 20.0 + offset_s as f64)]),
        attrs: BTreeMap::new(),
    }
}

fn event(device: &str, offset_s: i64, seq: u64, kind: &str) -> Event {
    Event {
        device: dev(device),
        ts: T0 + offset_s * 1000,
        seq,
        received_at: T0 + offset_s * 1000 + 5,
        kind: kind.to_string(),
        attrs: BTreeMap::from([("n".to_string(), AttrValue::Int(offset_s))]),
    }
}

async fn write(storage: &dyn Storage, readings: Vec<Reading>) {
    let batch = Batch {
        readings,
        ..Batch::default()
    };
    storage.write_batch(&batch).await.expect("write_batch");
}

fn tq(device: &str, range: TimeRange, order: Order, limit: usize) -> TelemetryQuery {
    TelemetryQuery {
        device: dev(device),
        range,
        order,
        page: PageRequest::first(limit),
    }
}

fn times(page: &Page<Reading>) -> Vec<i64> {
    page.items.iter().map(|r| (r.ts - T0) / 1000).collect()
}

/// Follows cursors to the end, returning every item and checking each page's size.
async fn all_pages<T, F, Fut>(limit: usize, mut fetch: F) -> Vec<T>
where
    F: FnMut(PageRequest) -> Fut,
    Fut: std::future::Future<Output = Result<Page<T>, StorageError>>,
{
    let mut out = Vec::new();
    let mut page = PageRequest::first(limit);
    for _ in 0..1000 {
        let got = fetch(page.clone()).await.expect("page");
        assert!(
            got.items.len() <= limit,
            "a page holds at most `limit` items"
        );
        let n = got.items.len();
        out.extend(got.items);
        match got.next_cursor {
            Some(c) => {
                assert_eq!(n, limit, "only the last page may be short");
                page.cursor = Some(c);
            }
            None => return out,
        }
    }
    panic!("paging did not end after 1000 pages");
}

pub async fn idempotent_upsert(h: &dyn Harness) {
    let s = h.open().await;
    write(&*s, vec![reading("d1", 1, 7, 50.0)]).await;
    // Redelivery of the same (device, ts, seq) replaces the row; a different seq is another row.
    write(
        &*s,
        vec![reading("d1", 1, 7, 60.0), reading("d1", 1, 7, 61.0)],
    )
    .await;
    write(&*s, vec![reading("d1", 1, 8, 70.0)]).await;
    let page = s
        .telemetry(&tq("d1", TimeRange::default(), Order::OldestFirst, 100))
        .await
        .unwrap();
    let got: Vec<(u64, Option<f64>)> = page.items.iter().map(|r| (r.seq, r.battery)).collect();
    assert_eq!(got, vec![(7, Some(61.0)), (8, Some(70.0))]);
}

pub async fn newest_and_oldest_first(h: &dyn Harness) {
    let s = h.open().await;
    // Written out of order, across several days, so partitioning by day must not matter.
    let offsets = [3, 1, 200_000, 5, 86_400 * 2, 2];
    write(
        &*s,
        offsets.iter().map(|&o| reading("d1", o, 0, 1.0)).collect(),
    )
    .await;
    let newest = s
        .telemetry(&tq("d1", TimeRange::default(), Order::NewestFirst, 100))
        .await
        .unwrap();
    assert_eq!(times(&newest), vec![200_000, 172_800, 5, 3, 2, 1]);
    let oldest = s
        .telemetry(&tq("d1", TimeRange::default(), Order::OldestFirst, 100))
        .await
        .unwrap();
    assert_eq!(times(&oldest), vec![1, 2, 3, 5, 172_800, 200_000]);
    let r = &oldest.items[0];
    assert_eq!(
        r,
        &reading("d1", 1, 0, 1.0),
        "every field reads back as written"
    );
}

pub async fn half_open_ranges(h: &dyn Harness) {
    let s = h.open().await;
    write(&*s, (0..10).map(|o| reading("d1", o, 0, 1.0)).collect()).await;
    let at = |o: i64| Some(T0 + o * 1000);
    let check = |since: Option<i64>, until: Option<i64>, expected: Vec<i64>| {
        let s = Arc::clone(&s);
        async move {
            let page = s
                .telemetry(&tq(
                    "d1",
                    TimeRange { since, until },
                    Order::OldestFirst,
                    100,
                ))
                .await
                .unwrap();
            assert_eq!(times(&page), expected, "range [{since:?}, {until:?})");
        }
    };
    check(at(3), at(6), vec![3, 4, 5]).await;
    check(at(3), None, vec![3, 4, 5, 6, 7, 8, 9]).await;
    check(None, at(2), vec![0, 1]).await;
    check(at(4), at(4), vec![]).await;
    check(at(9), at(100), vec![9]).await;
}

pub async fn cursors_page_exactly_once(h: &dyn Harness) {
    let s = h.open().await;
    // Two rows share each time (different seq), so cursors must resume inside a timestamp.
    let rows: Vec<Reading> = (0..23)
        .flat_map(|o| [reading("d1", o, 1, 1.0), reading("d1", o, 2, 1.0)])
        .collect();
    write(&*s, rows).await;
    for order in [Order::NewestFirst, Order::OldestFirst] {
        for limit in [1, 7, 46, 100] {
            let items = all_pages(limit, |page| {
                let s = Arc::clone(&s);
                async move {
                    s.telemetry(&TelemetryQuery {
                        device: dev("d1"),
                        range: TimeRange {
                            since: Some(T0 + 2000),
                            until: Some(T0 + 20_000),
                        },
                        order,
                        page,
                    })
                    .await
                }
            })
            .await;
            let mut got: Vec<(i64, u64)> =
                items.iter().map(|r| ((r.ts - T0) / 1000, r.seq)).collect();
            let mut expected: Vec<(i64, u64)> = (2..20).flat_map(|o| [(o, 1), (o, 2)]).collect();
            if order == Order::NewestFirst {
                expected.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
                got.iter()
                    .zip(&expected)
                    .for_each(|(g, e)| assert_eq!(g.0, e.0));
                got.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
            }
            assert_eq!(got, expected, "order {order:?}, limit {limit}");
        }
    }
}

pub async fn latest_is_never_overwritten_by_an_older_reading(h: &dyn Harness) {
    let s = h.open().await;
    let mut newer = reading("d1", 100, 0, 50.0);
    newer.online = Some(true);
    write(&*s, vec![newer]).await;
    let mut older = reading("d1", 10, 0, 90.0);
    older.rssi = Some(-70);
    older.online = Some(false);
    older.received_at = T0 + 500_000;
    write(&*s, vec![older]).await;
    let state = s.device(&dev("d1")).await.unwrap().expect("device state");
    assert_eq!(state.ts, T0 + 100_000, "newest device time");
    assert_eq!(
        state.battery.map(|b| b.value),
        Some(50.0),
        "older battery ignored"
    );
    assert_eq!(
        state.online.map(|b| b.value),
        Some(true),
        "older online ignored"
    );
    assert_eq!(
        state.rssi.map(|b| b.value),
        Some(-70),
        "a field only the older reading carries is still the newest known value"
    );
    assert_eq!(state.metrics["temp_c"].value, 120.0);
    assert_eq!(state.last_seen, T0 + 500_000, "last_seen is arrival time");
    // Within one batch too.
    write(
        &*s,
        vec![reading("d2", 5, 0, 30.0), reading("d2", 1, 0, 99.0)],
    )
    .await;
    let state = s.device(&dev("d2")).await.unwrap().unwrap();
    assert_eq!(state.battery.map(|b| b.value), Some(30.0));
}

pub async fn empty_batch_and_unknown_device(h: &dyn Harness) {
    let s = h.open().await;
    s.write_batch(&Batch::default()).await.unwrap();
    assert_eq!(s.device(&dev("nobody")).await.unwrap(), None);
    let page = s
        .telemetry(&tq("nobody", TimeRange::default(), Order::NewestFirst, 10))
        .await
        .unwrap();
    assert!(page.items.is_empty() && page.next_cursor.is_none());
    s.health().await.unwrap();
}

pub async fn data_survives_close_and_reopen(h: &dyn Harness) {
    {
        let s = h.open().await;
        write(
            &*s,
            vec![reading("d1", 1, 0, 10.0), reading("d1", 2, 0, 20.0)],
        )
        .await;
        s.write_batch(&Batch {
            events: vec![event("d1", 3, 0, "button")],
            ..Batch::default()
        })
        .await
        .unwrap();
        s.close().await.unwrap();
        assert!(
            s.device(&dev("d1")).await.is_err(),
            "a closed backend refuses calls"
        );
    }
    let s = h.open().await;
    let page = s
        .telemetry(&tq("d1", TimeRange::default(), Order::OldestFirst, 10))
        .await
        .unwrap();
    assert_eq!(times(&page), vec![1, 2]);
    let state = s.device(&dev("d1")).await.unwrap().unwrap();
    assert_eq!(state.battery.map(|b| b.value), Some(20.0));
    let events = s
        .events(&EventQuery {
            device: dev("d1"),
            kind: None,
            range: TimeRange::default(),
            order: Order::NewestFirst,
            page: PageRequest::first(10),
        })
        .await
        .unwrap();
    assert_eq!(events.items, vec![event("d1", 3, 0, "button")]);
}

pub async fn devices_are_isolated(h: &dyn Harness) {
    let s = h.open().await;
    write(
        &*s,
        vec![
            reading("a", 1, 0, 1.0),
            reading("ab", 2, 0, 2.0),
            reading("a.b", 3, 0, 3.0),
            reading("A", 4, 0, 4.0),
        ],
    )
    .await;
    for (device, expected) in [("a", 1), ("ab", 2), ("a.b", 3), ("A", 4)] {
        let page = s
            .telemetry(&tq(device, TimeRange::default(), Order::NewestFirst, 10))
            .await
            .unwrap();
        assert_eq!(times(&page), vec![expected], "device {device}");
    }
}

pub async fn foreign_cursor_is_rejected(h: &dyn Harness) {
    let s = h.open().await;
    write(&*s, (0..3).map(|o| reading("a", o, 0, 1.0)).collect()).await;
    write(&*s, (0..3).map(|o| reading("b", o, 0, 1.0)).collect()).await;
    let first = s
        .telemetry(&tq("a", TimeRange::default(), Order::NewestFirst, 1))
        .await
        .unwrap();
    let cursor = first.next_cursor.expect("more pages");
    let mut q = tq("b", TimeRange::default(), Order::NewestFirst, 1);
    q.page.cursor = Some(cursor.clone());
    let err = s.telemetry(&q).await.expect_err("cursor of another device");
    assert!(matches!(err, StorageError::InvalidRequest(_)), "{err:?}");
    let err = s
        .events(&EventQuery {
            device: dev("a"),
            kind: None,
            range: TimeRange::default(),
            order: Order::NewestFirst,
            page: PageRequest {
                limit: 1,
                cursor: Some(cursor),
            },
        })
        .await
        .expect_err("cursor of another query");
    assert!(matches!(err, StorageError::InvalidRequest(_)), "{err:?}");
}

pub async fn events_by_kind_page_exactly_once(h: &dyn Harness) {
    let s = h.open().await;
    let events: Vec<Event> = (0..30)
        .map(|o| event("d1", o, 0, if o % 3 == 0 { "sync" } else { "button" }))
        .chain((0..5).map(|o| event("d2", o, 0, "sync")))
        .collect();
    s.write_batch(&Batch {
        events,
        ..Batch::default()
    })
    .await
    .unwrap();
    for (kind, expected) in [
        (
            Some("sync"),
            (0..30).filter(|o| o % 3 == 0).rev().collect::<Vec<i64>>(),
        ),
        (None, (0..30).rev().collect()),
    ] {
        let items = all_pages(4, |page| {
            let s = Arc::clone(&s);
            async move {
                s.events(&EventQuery {
                    device: dev("d1"),
                    kind: kind.map(str::to_string),
                    range: TimeRange::default(),
                    order: Order::NewestFirst,
                    page,
                })
                .await
            }
        })
        .await;
        let got: Vec<i64> = items.iter().map(|e| (e.ts - T0) / 1000).collect();
        assert_eq!(got, expected, "kind {kind:?}");
        assert!(items.iter().all(|e| kind.is_none_or(|k| e.kind == k)));
    }
}

/// Waits until the backend's maintained counts are `expected` (ScyllaDB recounts a changed
/// shard within a second or two), failing after 20 s with the last counts seen.
async fn counts_become(s: &dyn Storage, expected: FleetCounts, what: &str) {
    let mut last = None;
    for _ in 0..200 {
        let counts = s.fleet_counts().await.unwrap();
        if counts == expected {
            return;
        }
        last = Some(counts);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("{what}: counts stayed {last:?}, expected {expected:?}");
}

/// Pages of the fleet hold every device once; the counts are maintained as readings arrive,
/// follow each device's latest battery (not a late older one, not a redelivery), and survive a
/// reopen.
pub async fn fleet_pages_and_counts(h: &dyn Harness) {
    let counts = |total, low_battery| FleetCounts { total, low_battery };
    {
        let s = h.open().await;
        counts_become(&*s, counts(0, 0), "an empty fleet").await;
        let rows: Vec<Reading> = (0..9)
            .map(|i| reading(&format!("dev-{i}"), 10, 0, if i < 3 { 5.0 } else { 80.0 }))
            .collect();
        write(&*s, rows.clone()).await;
        let mut ids = Vec::new();
        let mut page = PageRequest::first(4);
        loop {
            let got = s.fleet(&FleetQuery { page: page.clone() }).await.unwrap();
            ids.extend(got.items.iter().map(|d| d.device.to_string()));
            assert!(got.items.len() <= 4);
            match got.next_cursor {
                Some(c) => page.cursor = Some(c),
                None => break,
            }
        }
        // Every device exactly once; the order is the backend's own (by id for the embedded
        // backend, by token for ScyllaDB) but stable across pages.
        ids.sort();
        let expected: Vec<String> = (0..9).map(|i| format!("dev-{i}")).collect();
        assert_eq!(ids, expected);
        counts_become(&*s, counts(9, 3), "nine devices, three low").await;

        // Redelivered: nothing changes. A late, older reading does not lift dev-0 out of low
        // battery; a newer one does; dev-5 drops below the threshold; dev-9 has no battery yet.
        write(&*s, rows).await;
        write(&*s, vec![reading("dev-0", 5, 1, 90.0)]).await;
        counts_become(&*s, counts(9, 3), "a redelivery and a late reading").await;
        let mut no_battery = reading("dev-9", 20, 0, 0.0);
        no_battery.battery = None;
        write(
            &*s,
            vec![
                reading("dev-0", 20, 2, 90.0),
                reading("dev-5", 20, 0, 1.0),
                no_battery,
            ],
        )
        .await;
        counts_become(&*s, counts(10, 3), "dev-0 recharged, dev-5 low, dev-9 new").await;
        write(
            &*s,
            vec![reading("dev-1", 30, 0, 95.0), reading("dev-2", 30, 0, 95.0)],
        )
        .await;
        counts_become(&*s, counts(10, 1), "two more recharged").await;
        s.close().await.unwrap();
    }
    let s = h.open().await;
    counts_become(&*s, counts(10, 1), "after a reopen").await;
    write(&*s, vec![reading("dev-9", 40, 0, 3.0)]).await;
    counts_become(&*s, counts(10, 2), "dev-9's first battery is low").await;
}

/// Node reports hold for their TTL and are summed; a device's later connection change wins,
/// and a connection on a node that stopped reporting is answered as not connected.
pub async fn connections_hold_while_their_node_reports(h: &dyn Harness) {
    let s = h.open().await;
    let now = crate::model::now_millis();
    s.report_node("node-a", 2, 60_000).await.unwrap();
    s.report_node("node-b", 1, 1_000).await.unwrap();
    assert_eq!(s.connected_devices().await.unwrap(), 3);
    s.report_node("node-a", 4, 60_000).await.unwrap();
    assert_eq!(
        s.connected_devices().await.unwrap(),
        5,
        "a node's report replaces its last"
    );
    let c = |device: &str, node: &str, connected: bool, at: i64| Connection {
        device: dev(device),
        node: node.into(),
        connected,
        at,
    };
    s.put_connections(&[
        c("d1", "node-a", true, now),
        c("d2", "node-b", true, now),
        c("d3", "node-a", false, now),
    ])
    .await
    .unwrap();
    // An older change arriving late does not win.
    s.put_connections(&[c("d1", "node-a", false, now - 1_000)])
        .await
        .unwrap();
    let sorted = |mut v: Vec<Connection>| {
        v.sort_by(|a, b| a.device.cmp(&b.device));
        v
    };
    let ids = [dev("d1"), dev("d2"), dev("d3"), dev("nobody")];
    assert_eq!(
        sorted(s.connections(&ids).await.unwrap()),
        [
            c("d1", "node-a", true, now),
            c("d2", "node-b", true, now),
            c("d3", "node-a", false, now)
        ]
    );
    assert!(s.connections(&[]).await.unwrap().is_empty());
    // node-b stops reporting: its device is no longer counted or shown connected.
    tokio::time::sleep(std::time::Duration::from_millis(2_100)).await;
    assert_eq!(s.connected_devices().await.unwrap(), 4);
    assert_eq!(
        sorted(s.connections(&ids).await.unwrap())[1],
        c("d2", "node-b", false, now)
    );
}

pub async fn dead_letters_newest_first(h: &dyn Harness) {
    let s = h.open().await;
    let letters: Vec<DeadLetter> = (0..5u64)
        .map(|i| DeadLetter {
            id: i,
            received_at: T0 + (i as i64 % 3) * 1000,
            topic: format!("devices/d{}/telemetry", i % 2),
            device: Some(dev(&format!("d{}", i % 2))),
            payload: vec![0xc1, i as u8],
            reason: format!("reason {i}"),
        })
        .collect();
    s.write_batch(&Batch {
        dead_letters: letters.clone(),
        ..Batch::default()
    })
    .await
    .unwrap();
    let all = all_pages(2, |page| {
        let s = Arc::clone(&s);
        async move {
            s.dead_letters(&DeadLetterQuery {
                device: None,
                range: TimeRange::default(),
                page,
            })
            .await
        }
    })
    .await;
    let got: Vec<u64> = all.iter().map(|d| d.id).collect();
    assert_eq!(got, vec![2, 4, 1, 3, 0], "newest arrival first");
    assert_eq!(all[4], letters[0], "raw payload and reason kept");
    let d1 = s
        .dead_letters(&DeadLetterQuery {
            device: Some(dev("d1")),
            range: TimeRange::default(),
            page: PageRequest::first(10),
        })
        .await
        .unwrap();
    let got: Vec<u64> = d1.items.iter().map(|d| d.id).collect();
    assert_eq!(got, vec![1, 3]);
}

fn alert(device: &str, rule: &str, offset_s: i64, state: AlertState) -> Alert {
    let raised_at = T0 + offset_s * 1000;
    Alert {
        id: Alert::id_for(&dev(device), rule, raised_at),
        device: dev(device),
        rule: rule.to_string(),
        state,
        severity: "warning".into(),
        message: format!("{rule} on {device}"),
        value: Some(12.5),
        threshold: Some(15.0),
        raised_at,
        acked_at: None,
        acked_by: None,
        cleared_at: (state == AlertState::Cleared).then_some(raised_at + 60_000),
    }
}

pub async fn alerts_upsert_by_id_filter_and_page(h: &dyn Harness) {
    let s = h.open().await;
    let a = alert("d1", "battery_low", 10, AlertState::Raised);
    let b = alert("d2", "offline", 20, AlertState::Raised);
    // A day later, so listings cross day partitions.
    let c = alert("d1", "offline", 86_400 + 30, AlertState::Cleared);
    s.put_alerts(&[a.clone(), b.clone(), c.clone()])
        .await
        .unwrap();
    let mut acked = a.clone();
    acked.state = AlertState::Acknowledged;
    acked.acked_at = Some(T0 + 15_000);
    acked.acked_by = Some("ops@example.com".into());
    s.put_alerts(&[acked.clone()]).await.unwrap();

    assert_eq!(
        s.alert(&a.id).await.unwrap(),
        Some(acked.clone()),
        "a transition replaces the alert"
    );
    assert_eq!(s.alert("not-an-alert-id").await.unwrap(), None);
    assert_eq!(
        s.alert(&Alert::id_for(&dev("d9"), "offline", T0))
            .await
            .unwrap(),
        None
    );

    let ids = |page: Vec<Alert>| page.into_iter().map(|a| a.id).collect::<Vec<_>>();
    let query = |f: &dyn Fn(&mut AlertQuery)| {
        let mut q = AlertQuery::all(100);
        f(&mut q);
        q
    };
    let cases: Vec<(AlertQuery, Vec<String>)> = vec![
        (
            AlertQuery::all(100),
            vec![c.id.clone(), b.id.clone(), a.id.clone()],
        ),
        (
            query(&|q| q.state = Some(AlertStateFilter::Active)),
            vec![b.id.clone(), a.id.clone()],
        ),
        (
            query(&|q| q.state = Some(AlertStateFilter::Only(AlertState::Cleared))),
            vec![c.id.clone()],
        ),
        (
            query(&|q| q.device = Some(dev("d1"))),
            vec![c.id.clone(), a.id.clone()],
        ),
        (
            query(&|q| q.rule = Some("offline".into())),
            vec![c.id.clone(), b.id.clone()],
        ),
        (
            query(&|q| q.range.since = Some(T0 + 20_000)),
            vec![c.id.clone(), b.id.clone()],
        ),
    ];
    for (q, expected) in cases {
        assert_eq!(ids(s.alerts(&q).await.unwrap().items), expected, "{q:?}");
    }
    let paged = all_pages(1, |page| {
        let s = Arc::clone(&s);
        async move {
            let mut q = AlertQuery::all(1);
            q.page = page;
            s.alerts(&q).await
        }
    })
    .await;
    assert_eq!(ids(paged), vec![c.id.clone(), b.id.clone(), a.id.clone()]);
}

fn upload(device: &str, offset_s: i64, kind: &str) -> Upload {
    let created_at = T0 + offset_s * 1000;
    let id = Upload::id_for(&dev(device), created_at, &format!("n{offset_s}"));
    Upload {
        object_key: format!("devices/{device}/{kind}/{id}"),
        id,
        device: dev(device),
        kind: kind.into(),
        content_type: "image/png".into(),
        size: 1234,
        sha256: None,
        state: UploadState::Pending,
        created_at,
        expires_at: created_at + 300_000,
        finished_at: None,
        attrs: BTreeMap::from([("button_id".to_string(), AttrValue::Int(2))]),
        meta: BTreeMap::new(),
        error: None,
    }
}

/// The alert engine's saved state: one value per device, replaced by the next, deleted by an
/// empty one, all read back (after a reopen too).
pub async fn alert_states_replace_per_device_and_survive_reopen(h: &dyn Harness) {
    {
        let s = h.open().await;
        assert!(s.alert_states().await.unwrap().is_empty());
        s.put_alert_states(&[
            (dev("a1"), b"one".to_vec()),
            (dev("a2"), vec![0, 1, 2, 255]),
            (dev("a3"), b"three".to_vec()),
        ])
        .await
        .unwrap();
        s.put_alert_states(&[(dev("a1"), b"uno".to_vec()), (dev("a3"), Vec::new())])
            .await
            .unwrap();
        s.close().await.unwrap();
    }
    let s = h.open().await;
    let mut got = s.alert_states().await.unwrap();
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        got,
        vec![
            (dev("a1"), b"uno".to_vec()),
            (dev("a2"), vec![0, 1, 2, 255])
        ]
    );
    s.close().await.unwrap();
}

pub async fn uploads_upsert_by_id_list_per_device_and_expire(h: &dyn Harness) {
    let s = h.open().await;
    let a = upload("d1", 10, "photo");
    let b = upload("d2", 20, "audio");
    // A day later, so nothing depends on day partitions.
    let c = upload("d1", 86_400 + 30, "log");
    for u in [&a, &b, &c] {
        s.put_upload(u).await.unwrap();
    }
    let mut done = a.clone();
    done.state = UploadState::Completed;
    done.finished_at = Some(T0 + 15_000);
    done.sha256 = Some("ab".repeat(32));
    done.meta = BTreeMap::from([
        ("width".to_string(), AttrValue::Int(640)),
        ("height".to_string(), AttrValue::Int(480)),
        ("format".to_string(), AttrValue::Text("png".into())),
        ("ratio".to_string(), AttrValue::Float(1.5)),
    ]);
    s.put_upload(&done).await.unwrap();

    assert_eq!(
        s.upload(&a.id).await.unwrap(),
        Some(done.clone()),
        "a state change replaces the upload"
    );
    assert_eq!(s.upload(&b.id).await.unwrap(), Some(b.clone()));
    assert_eq!(s.upload("not-an-upload-id").await.unwrap(), None);
    assert_eq!(
        s.upload(&Upload::id_for(&dev("d9"), T0, "x"))
            .await
            .unwrap(),
        None
    );

    let ids = |page: Vec<Upload>| page.into_iter().map(|u| u.id).collect::<Vec<_>>();
    let list = |device: &str, limit: usize| UploadQuery {
        device: dev(device),
        page: PageRequest::first(limit),
    };
    assert_eq!(
        ids(s.uploads(&list("d1", 10)).await.unwrap().items),
        vec![c.id.clone(), a.id.clone()],
        "newest requested first, only the device's own"
    );
    assert!(s.uploads(&list("d9", 10)).await.unwrap().items.is_empty());
    let paged = all_pages(1, |page| {
        let s = Arc::clone(&s);
        async move {
            s.uploads(&UploadQuery {
                device: dev("d1"),
                page,
            })
            .await
        }
    })
    .await;
    assert_eq!(ids(paged), vec![c.id.clone(), a.id.clone()]);

    // Only pending uploads whose URL expired before the given time, soonest expired first.
    let expired = |before: i64, limit: usize| {
        let s = Arc::clone(&s);
        async move { ids(s.expired_uploads(before, limit).await.unwrap()) }
    };
    assert_eq!(expired(T0, 10).await, Vec::<String>::new());
    assert_eq!(
        expired(c.expires_at + 1, 10).await,
        vec![b.id.clone(), c.id.clone()]
    );
    assert_eq!(expired(c.expires_at, 10).await, vec![b.id.clone()]);
    assert_eq!(expired(c.expires_at + 1, 1).await, vec![b.id.clone()]);
    let mut gone = b.clone();
    gone.state = UploadState::Expired;
    gone.finished_at = Some(b.expires_at + 1);
    s.put_upload(&gone).await.unwrap();
    assert_eq!(expired(c.expires_at + 1, 10).await, vec![c.id.clone()]);
    assert_eq!(s.upload(&b.id).await.unwrap(), Some(gone));

    s.close().await.unwrap();
    drop(s);
    let s = h.open().await;
    assert_eq!(
        s.upload(&a.id).await.unwrap(),
        Some(done),
        "uploads survive a reopen"
    );
}

fn registered(
    id: &str,
    role: Role,
    labels: &[&str],
    profile: &[(&str, AttrValue)],
) -> RegisteredDevice {
    RegisteredDevice {
        id: dev(id),
        credential: Credential::Secret {
            hash: format!("$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$hash-of-{id}"),
        },
        role,
        status: DeviceStatus::Active,
        created_at: T0,
        updated_at: T0,
        name: Some(format!("{id} name")),
        model: Some("button-v2".into()),
        labels: labels.iter().map(|l| l.to_string()).collect(),
        profile: profile
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
        photo_upload: None,
    }
}

/// An id is registered once: a second registration, even a concurrent one, writes nothing and
/// says so.
pub async fn registry_registers_each_id_once(h: &dyn Harness) {
    let s = h.open().await;
    let first = registered("d1", Role::Device, &["beta"], &[]);
    assert!(s.register_device(&first).await.unwrap());
    let mut second = first.clone();
    second.name = Some("impostor".into());
    assert!(!s.register_device(&second).await.unwrap());
    assert_eq!(s.registered_device(&dev("d1")).await.unwrap(), Some(first));
    assert_eq!(s.registered_device(&dev("nobody")).await.unwrap(), None);

    let racers = (0..8).map(|i| {
        let s = Arc::clone(&s);
        let mut d = registered("race", Role::Device, &[], &[]);
        d.name = Some(format!("racer {i}"));
        tokio::spawn(async move { (s.register_device(&d).await.unwrap(), d) })
    });
    let mut winners = Vec::new();
    for r in futures::future::join_all(racers).await {
        let (won, d) = r.unwrap();
        if won {
            winners.push(d);
        }
    }
    assert_eq!(winners.len(), 1, "exactly one concurrent registration wins");
    assert_eq!(
        s.registered_device(&dev("race")).await.unwrap().as_ref(),
        winners.first()
    );
}

/// Records are replaced whole, listed a page at a time exactly once, filtered by label, profile
/// field, role and status, and kept across a reopen.
pub async fn registry_updates_lists_and_filters(h: &dyn Harness) {
    let pet = |name: &str| ("pet_name", AttrValue::Text(name.into()));
    {
        let s = h.open().await;
        let devices = [
            registered(
                "a1",
                Role::Device,
                &["beta", "berlin"],
                &[pet("Rex"), ("age", AttrValue::Int(3))],
            ),
            registered("a2", Role::Device, &["berlin"], &[pet("Tom")]),
            registered("a3", Role::Device, &[], &[]),
            registered("ops", Role::FleetManager, &[], &[]),
            registered("etl", Role::Service, &[], &[]),
        ];
        for d in &devices {
            assert!(s.register_device(d).await.unwrap());
        }
        let mut revoked = devices[0].clone();
        revoked.status = DeviceStatus::Revoked;
        revoked.credential = Credential::Certificate {
            sha256: "ab".repeat(32),
        };
        revoked.updated_at = T0 + 1000;
        revoked.name = None;
        revoked.photo_upload = Some("a1~1760000000000~n1".into());
        s.update_device(&revoked).await.unwrap();
        assert_eq!(
            s.registered_device(&dev("a1")).await.unwrap(),
            Some(revoked)
        );
        s.close().await.unwrap();
    }
    let s = h.open().await;
    let list = |q: DeviceQuery, limit: usize| {
        let s = Arc::clone(&s);
        async move {
            let mut ids: Vec<String> = all_pages(limit, |page| {
                let s = Arc::clone(&s);
                let q = DeviceQuery { page, ..q.clone() };
                async move { s.registered_devices(&q).await }
            })
            .await
            .into_iter()
            .map(|d| d.id.to_string())
            .collect();
            ids.sort();
            ids
        }
    };
    assert_eq!(
        list(DeviceQuery::default(), 2).await,
        ["a1", "a2", "a3", "etl", "ops"]
    );
    let by_label = |l: &str| DeviceQuery {
        label: Some(l.into()),
        ..DeviceQuery::default()
    };
    assert_eq!(list(by_label("berlin"), 1).await, ["a1", "a2"]);
    assert_eq!(list(by_label("beta"), 10).await, ["a1"]);
    assert!(list(by_label("nowhere"), 10).await.is_empty());
    let by_pet = DeviceQuery {
        profile: Some(("pet_name".into(), AttrValue::Text("Tom".into()))),
        ..DeviceQuery::default()
    };
    assert_eq!(list(by_pet, 10).await, ["a2"]);
    let by_age = DeviceQuery {
        profile: Some(("age".into(), AttrValue::Int(3))),
        ..DeviceQuery::default()
    };
    assert_eq!(list(by_age, 10).await, ["a1"]);
    let managers = DeviceQuery {
        role: Some(Role::FleetManager),
        ..DeviceQuery::default()
    };
    assert_eq!(list(managers, 10).await, ["ops"]);
    let revoked = DeviceQuery {
        status: Some(DeviceStatus::Revoked),
        ..DeviceQuery::default()
    };
    assert_eq!(list(revoked, 10).await, ["a1"]);

    let first = s
        .registered_devices(&DeviceQuery {
            page: PageRequest::first(1),
            ..DeviceQuery::default()
        })
        .await
        .unwrap();
    let cursor = first.next_cursor.expect("more pages");
    let err = s
        .fleet(&FleetQuery {
            page: PageRequest {
                limit: 1,
                cursor: Some(cursor),
            },
        })
        .await
        .expect_err("a registry cursor is not a fleet cursor");
    assert!(matches!(err, StorageError::InvalidRequest(_)), "{err:?}");
}

/// Every update is a change, read back oldest first (ties by device id) from any time in the
/// last week, across hours; older ones are gone.
pub async fn registry_changes_are_read_in_order_for_a_week(h: &dyn Harness) {
    let s = h.open().await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let hour = 3_600_000;
    for id in ["c1", "c2", "c3"] {
        assert!(s
            .register_device(&registered(id, Role::Device, &[], &[]))
            .await
            .unwrap());
    }
    let change = |id: &str, at: i64| RegistryChange {
        at,
        device: dev(id),
    };
    let updates = [
        change("c3", now - 8 * 24 * hour),
        change("c1", now - 2 * hour),
        change("c2", now - 1000),
        change("c1", now - 1000),
        change("c3", now),
    ];
    for c in &updates {
        let mut d = s.registered_device(&c.device).await.unwrap().unwrap();
        d.updated_at = c.at;
        d.status = DeviceStatus::Revoked;
        s.update_device(&d).await.unwrap();
    }
    assert!(
        s.registry_changes(now - 9 * 24 * hour, 100)
            .await
            .unwrap()
            .iter()
            .all(|c| c.at >= now - RegistryChange::KEPT_MS),
        "changes older than a week are not read"
    );
    assert_eq!(
        s.registry_changes(now - 3 * hour, 100).await.unwrap(),
        [
            change("c1", now - 2 * hour),
            change("c1", now - 1000),
            change("c2", now - 1000),
            change("c3", now),
        ]
    );
    assert_eq!(
        s.registry_changes(now - 1000, 100).await.unwrap(),
        [
            change("c1", now - 1000),
            change("c2", now - 1000),
            change("c3", now)
        ]
    );
    assert_eq!(
        s.registry_changes(now - 3 * hour, 1).await.unwrap(),
        [change("c1", now - 2 * hour)]
    );
    assert!(s.registry_changes(now + 1, 100).await.unwrap().is_empty());
}

/// Alerts are counted per device and rule within one rule family and a range, each once
/// however often it was rewritten (raised, then acknowledged), and only of that family.
pub async fn alert_counts_read_one_rule_family(h: &dyn Harness) {
    let s = h.open().await;
    let day = 86_400;
    let raised = [
        alert("d1", "anomaly.temp_c", 1, AlertState::Raised),
        alert("d1", "anomaly.temp_c", 2, AlertState::Raised),
        alert("d1", "anomaly.rssi", 3, AlertState::Cleared),
        alert("d2", "anomaly.temp_c", day + 5, AlertState::Raised),
        alert("d1", "battery_low", 1, AlertState::Raised),
    ];
    s.put_alerts(&raised).await.unwrap();
    let mut acked = raised[0].clone();
    acked.state = AlertState::Acknowledged;
    s.put_alerts(&[acked]).await.unwrap();
    let count = |device: &str, rule: &str, count: u64| AlertCount {
        device: dev(device),
        rule: rule.into(),
        count,
    };
    let q = |family: &str, device: Option<&str>, since_s: i64, until_s: i64| AlertCountQuery {
        family: family.into(),
        device: device.map(dev),
        since: T0 + since_s * 1000,
        until: T0 + until_s * 1000,
    };
    assert_eq!(
        s.alert_counts(&q("anomaly", None, 0, 2 * day))
            .await
            .unwrap(),
        [
            count("d1", "anomaly.rssi", 1),
            count("d1", "anomaly.temp_c", 2),
            count("d2", "anomaly.temp_c", 1)
        ]
    );
    assert_eq!(
        s.alert_counts(&q("anomaly", Some("d2"), 0, 2 * day))
            .await
            .unwrap(),
        [count("d2", "anomaly.temp_c", 1)]
    );
    assert_eq!(
        s.alert_counts(&q("anomaly", None, 2, day + 5))
            .await
            .unwrap(),
        [
            count("d1", "anomaly.rssi", 1),
            count("d1", "anomaly.temp_c", 1)
        ],
        "half-open: since included, until excluded"
    );
    assert_eq!(
        s.alert_counts(&q("battery_low", None, 0, day))
            .await
            .unwrap(),
        [count("d1", "battery_low", 1)]
    );
    assert!(s
        .alert_counts(&q("anomaly", None, 10, 10))
        .await
        .unwrap()
        .is_empty());
}

const MIN: i64 = 60_000;
const HOUR: i64 = 3_600_000;
const DAY: i64 = 86_400_000;

/// A reading for the aggregate tests at `ts`: battery on most, rssi and `temp_c` on all, a text
/// attribute (not a metric) on all; values vary with the time and the device.
fn sample(device: &str, ts: i64, seq: u64) -> Reading {
    let k = ts.rem_euclid(10 * DAY) / 1000 + device.len() as i64 * 17;
    Reading {
        device: dev(device),
        ts,
        seq,
        received_at: ts + 5,
        battery: (k % 5 != 0).then_some((k * 7 % 1000) as f64 / 10.0),
        rssi: Some(-((k * 13 % 120) as i32)),
        online: None,
        metrics: BTreeMap::from([("temp_c".to_string(), 20.0 + ((k * 37) % 91) as f64 / 7.0)]),
        attrs: BTreeMap::from([("fw".to_string(), AttrValue::Text("1.2".into()))]),
    }
}

/// The buckets computed from every stored reading one by one, the way a user would check them.
fn brute_force(
    stored: &HashMap<(DeviceId, i64, u64), Reading>,
    device: Option<&str>,
    q: &AggregateQuery,
) -> Vec<Aggregate> {
    let mut by_bucket: BTreeMap<i64, Vec<(i64, u64, f64)>> = BTreeMap::new();
    for r in stored.values() {
        if device.is_some_and(|d| r.device.as_str() != d) || r.ts < q.since || r.ts >= q.until {
            continue;
        }
        if let Some(v) = r.metric(&q.metric) {
            by_bucket
                .entry(q.bucket.start_of(r.ts))
                .or_default()
                .push((r.ts, r.seq, v));
        }
    }
    by_bucket
        .into_iter()
        .map(|(start, mut points)| {
            points.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.total_cmp(&b.2)));
            let values: Vec<f64> = points.iter().map(|p| p.2).collect();
            let sum: f64 = values.iter().sum();
            Aggregate {
                start,
                count: values.len() as u64,
                min: values.iter().copied().fold(f64::INFINITY, f64::min),
                max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                avg: sum / values.len() as f64,
                sum,
                first: values[0],
                last: values[values.len() - 1],
            }
        })
        .collect()
}

fn check_aggregates(got: &[Aggregate], expected: &[Aggregate], what: &str) {
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs().max(1.0);
    let starts = |a: &[Aggregate]| a.iter().map(|b| b.start).collect::<Vec<_>>();
    assert_eq!(starts(got), starts(expected), "{what}: bucket starts");
    for (g, e) in got.iter().zip(expected) {
        assert_eq!(
            (g.count, g.min, g.max, g.first, g.last),
            (e.count, e.min, e.max, e.first, e.last),
            "{what}: bucket {}",
            g.start
        );
        assert!(
            close(g.sum, e.sum) && close(g.avg, e.avg),
            "{what}: bucket {}: sum {} avg {}, expected {} {}",
            g.start,
            g.sum,
            g.avg,
            e.sum,
            e.avg
        );
    }
}

pub async fn aggregates_match_the_raw_readings(h: &dyn Harness) {
    let s = h.open().await;
    // 23:00 UTC: the data crosses an hour and a day boundary, and a few readings lie in the
    // months before and after.
    let base = Bucket::Day.start_of(T0) + 23 * HOUR;
    let devices = ["d1", "d2", "d3"];
    let mut on_time = Vec::new();
    let mut late = Vec::new();
    for (i, device) in devices.iter().enumerate() {
        for j in 0..200u64 {
            let r = sample(
                device,
                base - 40 * MIN + j as i64 * 37_000 + i as i64 * 3_000,
                j,
            );
            if j % 7 == 3 {
                late.push(r);
            } else {
                on_time.push(r);
            }
        }
        // On a bucket boundary (the new day) and just before it.
        on_time.push(sample(device, base + HOUR, 1000));
        on_time.push(sample(device, base + HOUR - 1, 1001));
    }
    // Two readings at one device time, told apart by seq.
    on_time.push(sample("d1", base + 10 * MIN + 500, 2000));
    on_time.push(sample("d1", base + 10 * MIN + 500, 2001));
    for (device, days) in [("d1", -20), ("d2", 25), ("d3", 25)] {
        on_time.push(sample(device, base + days * DAY + 7 * MIN, 3000));
    }
    let mut stored: HashMap<(DeviceId, i64, u64), Reading> = HashMap::new();
    let mut store = |rows: &[Reading]| {
        for r in rows {
            stored.insert((r.device.clone(), r.ts, r.seq), r.clone());
        }
    };
    // In batches of 50, so several batches touch each minute and hour.
    for chunk in on_time.chunks(50) {
        write(&*s, chunk.to_vec()).await;
        store(chunk);
    }
    // Redelivered: a fifth of the readings again, some twice within one batch.
    let again: Vec<Reading> = on_time
        .iter()
        .step_by(5)
        .flat_map(|r| [r.clone(), r.clone()])
        .collect();
    write(&*s, again).await;
    // Late: older readings after newer ones, into minutes and hours already rolled up.
    for chunk in late.chunks(40) {
        write(&*s, chunk.to_vec()).await;
        store(chunk);
    }
    // Sent again with other values under the same (device, ts, seq): the new values replace
    // the old ones, in the rollups as in the rows.
    let changed: Vec<Reading> = on_time
        .iter()
        .step_by(11)
        .map(|r| {
            let mut r = r.clone();
            r.battery = r.battery.map(|b| 100.0 - b);
            r.metrics.insert("temp_c".into(), -40.0);
            r
        })
        .collect();
    write(&*s, changed.clone()).await;
    store(&changed);

    let ranges = [
        (base - 40 * MIN, base + 2 * HOUR + 10 * MIN),
        (base - 37 * MIN - 12_345, base + HOUR + 23 * MIN + 4_567),
        (base + 5 * MIN, base + HOUR + 50 * MIN),
        (base + HOUR - 30_000, base + HOUR + 30_000),
        // Inside one minute: the readings of j = 165 (d1 at :45, d3 at :51).
        (base + HOUR + MIN + 44_000, base + HOUR + MIN + 52_000),
        (base - 30 * DAY, base + 30 * DAY),
    ];
    // Fleet rollups may settle after the batch is stored (the ScyllaDB backend settles them
    // each second, answering unsettled minutes from the devices' rollups meanwhile): the
    // answers are checked at once, and again once everything has settled.
    for round in ["at once", "settled"] {
        if round == "settled" {
            tokio::time::sleep(std::time::Duration::from_secs(4)).await;
        }
        for (since, until) in ranges {
            for bucket in Bucket::ALL {
                for metric in ["battery", "rssi", "temp_c"] {
                    let q = AggregateQuery {
                        metric: metric.to_string(),
                        bucket,
                        since,
                        until,
                    };
                    if q.bucket_count() > AggregateQuery::MAX_BUCKETS {
                        continue;
                    }
                    for device in [Some("d1"), Some("d2"), Some("d3"), None] {
                        let got = match device {
                            Some(d) => s.aggregates(&dev(d), &q).await,
                            None => s.fleet_aggregates(&q).await,
                        }
                        .expect("aggregates");
                        let expected = brute_force(&stored, device, &q);
                        let what =
                            format!("{round}: {device:?} {metric} {bucket:?} [{since}, {until})");
                        assert!(
                            device.is_some() || !expected.is_empty(),
                            "{what}: the test data covers it"
                        );
                        check_aggregates(&got, &expected, &what);
                    }
                }
            }
        }
    }
    // A text attribute is not a metric; unknown metrics and devices have no buckets.
    let whole = |metric: &str| AggregateQuery {
        metric: metric.to_string(),
        bucket: Bucket::Hour,
        since: base - DAY,
        until: base + DAY,
    };
    assert_eq!(s.fleet_aggregates(&whole("fw")).await.unwrap(), vec![]);
    assert_eq!(
        s.aggregates(&dev("d1"), &whole("nope")).await.unwrap(),
        vec![]
    );
    assert_eq!(
        s.aggregates(&dev("nobody"), &whole("battery"))
            .await
            .unwrap(),
        vec![]
    );
}

pub async fn aggregates_refuse_bad_ranges(h: &dyn Harness) {
    let s = h.open().await;
    let q = |bucket, since, until| AggregateQuery {
        metric: "battery".into(),
        bucket,
        since,
        until,
    };
    for bad in [
        q(Bucket::Hour, T0, T0 - 1),
        q(Bucket::Minute, T0, T0 + 10_001 * MIN),
    ] {
        let err = s.fleet_aggregates(&bad).await.expect_err("refused");
        assert!(matches!(err, StorageError::InvalidRequest(_)), "{err:?}");
        let err = s.aggregates(&dev("d1"), &bad).await.expect_err("refused");
        assert!(matches!(err, StorageError::InvalidRequest(_)), "{err:?}");
    }
    assert_eq!(
        s.fleet_aggregates(&q(Bucket::Day, T0, T0)).await.unwrap(),
        vec![]
    );
}
