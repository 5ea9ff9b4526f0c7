//! Alerts (`alerts`, `alerts_by_device`, `alerts_by_family`, `open_alerts`) and the alert
//! engine's state (`alert_states`).

use super::*;

pub(super) const ALERT_DATA_COLUMNS: &str =
    "device_id, rule, state, severity, message, value, threshold, acked_at, acked_by, cleared_at";

pub(super) type AlertRow = (
    CqlTimestamp,
    String,
    String,
    String,
    String,
    String,
    String,
    Option<f64>,
    Option<f64>,
    Option<CqlTimestamp>,
    Option<String>,
    Option<CqlTimestamp>,
);

pub(super) fn alert_from_row(r: AlertRow) -> Result<Alert> {
    let state = match r.4.as_str() {
        "raised" => AlertState::Raised,
        "acknowledged" => AlertState::Acknowledged,
        "cleared" => AlertState::Cleared,
        other => {
            return Err(StorageError::Fatal(
                format!("stored alert state {other:?} is unknown").into(),
            ))
        }
    };
    Ok(Alert {
        raised_at: r.0 .0,
        id: r.1,
        device: device_id(r.2)?,
        rule: r.3,
        state,
        severity: r.5,
        message: r.6,
        value: r.7,
        threshold: r.8,
        acked_at: r.9.map(|t| t.0),
        acked_by: r.10,
        cleared_at: r.11.map(|t| t.0),
    })
}

/// `alerts_by_family`: family, day, raised_at, id.
type FamilyValues = (String, CqlDate, CqlTimestamp, String);

pub(super) type AlertValues = (
    CqlDate,
    CqlTimestamp,
    String,
    String,
    String,
    &'static str,
    String,
    String,
    Option<f64>,
    Option<f64>,
    Option<CqlTimestamp>,
    Option<String>,
    Option<CqlTimestamp>,
);

pub(super) async fn put_alerts(store: &ScyllaStorage, alerts: &[Alert]) -> Result<()> {
    store.check_open()?;
    let inner = &store.inner;
    let mut by_day: HashMap<i64, Vec<AlertValues>> = HashMap::new();
    let mut index = HashSet::new();
    for a in alerts {
        let day = day_of(a.raised_at);
        index.insert((DEAD_LETTER_OWNER.to_string(), "alerts".to_string(), day));
        by_day.entry(day).or_default().push((
            cql_date(day),
            ts(a.raised_at),
            a.id.clone(),
            a.device.to_string(),
            a.rule.clone(),
            a.state.as_str(),
            a.severity.clone(),
            a.message.clone(),
            a.value,
            a.threshold,
            a.acked_at.map(ts),
            a.acked_by.clone(),
            a.cleared_at.map(ts),
        ));
    }
    let mut families: HashMap<(&str, i64), Vec<FamilyValues>> = HashMap::new();
    for a in alerts {
        let (family, day) = (Alert::family(&a.rule), day_of(a.raised_at));
        families.entry((family, day)).or_default().push((
            family.to_string(),
            cql_date(day),
            ts(a.raised_at),
            a.id.clone(),
        ));
    }
    let mut jobs = Vec::new();
    batches(
        &inner.st.insert_alert,
        "INSERT INTO alerts",
        by_day.into_values(),
        JobValues::Alerts,
        &mut jobs,
    );
    batches(
        &inner.st.insert_alert_family,
        "INSERT INTO alerts_by_family",
        families.into_values(),
        JobValues::AlertFamilies,
        &mut jobs,
    );
    let entries: Vec<Vec<PartitionValues>> = inner
        .new_partitions(index)
        .into_iter()
        .map(|p| vec![p])
        .collect();
    batches(
        &inner.st.insert_partition,
        "INSERT INTO partitions",
        entries,
        JobValues::Partitions,
        &mut jobs,
    );
    for job in &jobs {
        if let Err(e) = inner.run_job(job).await {
            inner.forget_partitions();
            return Err(e);
        }
    }
    Ok(())
}

pub(super) async fn alert_counts(
    store: &ScyllaStorage,
    q: &AlertCountQuery,
) -> Result<Vec<AlertCount>> {
    store.check_open()?;
    if q.until <= q.since {
        return Ok(Vec::new());
    }
    let inner = &store.inner;
    let mut tally = AlertTally::default();
    for day in day_of(q.since)..=day_of(q.until - 1) {
        let mut rows = inner
            .session
            .execute_iter(
                inner.st.alerts_of_family.clone(),
                (q.family.as_str(), cql_date(day), ts(q.since), ts(q.until)),
            )
            .await
            .map_err(|e| StorageError::Unavailable(Cause::new("alerts_by_family", e)))?
            .rows_stream::<(String,)>()
            .map_err(|e| StorageError::Fatal(Cause::new("alerts_by_family", e)))?;
        while let Some(row) = rows.next().await {
            let (id,) =
                row.map_err(|e| StorageError::Unavailable(Cause::new("alerts_by_family", e)))?;
            tally.add(q, &id)?;
        }
    }
    Ok(tally.counts())
}

pub(super) async fn alert(store: &ScyllaStorage, id: &str) -> Result<Option<Alert>> {
    store.check_open()?;
    let Some((_, _, raised_at)) = Alert::parse_id(id) else {
        return Ok(None);
    };
    let key = (cql_date(day_of(raised_at)), ts(raised_at), id);
    store
        .inner
        .first_row::<AlertRow>(&store.inner.st.alert, key)
        .await?
        .map(alert_from_row)
        .transpose()
}

pub(super) async fn alerts(store: &ScyllaStorage, q: &AlertQuery) -> Result<Page<Alert>> {
    store.check_open()?;
    let inner = &store.inner;
    let days = inner
        .days(DEAD_LETTER_OWNER, "alerts", &q.range, Order::NewestFirst)
        .await?;
    let filters = format!("{:?}{:?}{:?}", q.state, q.device, q.rule);
    let id = fingerprint(&[b"alerts", filters.as_bytes()]);
    let (since, until) = bounds(&q.range);
    inner
        .page_days(
            id,
            days,
            &inner.st.alerts,
            |day| (day, since, until),
            &q.page,
            alert_from_row,
            |a| q.accepts(a),
        )
        .await
}

pub(super) async fn put_alert_states(
    store: &ScyllaStorage,
    states: &[(DeviceId, Vec<u8>)],
) -> Result<()> {
    store.check_open()?;
    let st = &store.inner.st;
    let session = &store.inner.session;
    // Built in a loop, not a closure: the futures borrow `states` for the whole call.
    let mut writes: Vec<futures::future::BoxFuture<'_, Result<()>>> = Vec::new();
    for (device, state) in states {
        writes.push(if state.is_empty() {
            Box::pin(async move {
                session
                    .execute_unpaged(&st.delete_alert_state, (device.as_str(),))
                    .await
                    .map(|_| ())
                    .map_err(|e| classify(st.delete_alert_state.get_statement(), e))
            })
        } else {
            Box::pin(async move {
                session
                    .execute_unpaged(&st.insert_alert_state, (device.as_str(), state.as_slice()))
                    .await
                    .map(|_| ())
                    .map_err(|e| classify(st.insert_alert_state.get_statement(), e))
            })
        });
    }
    let mut results = futures::stream::iter(writes).buffer_unordered(32);
    while let Some(r) = results.next().await {
        r?;
    }
    Ok(())
}

pub(super) async fn alert_states(store: &ScyllaStorage) -> Result<Vec<(DeviceId, Vec<u8>)>> {
    store.check_open()?;
    let failed = |e: BoxError| StorageError::Unavailable(Cause::new("reading alert_states", e));
    let mut rows = store
        .inner
        .session
        .execute_iter(store.inner.st.alert_states.clone(), ())
        .await
        .map_err(|e| failed(e.into()))?
        .rows_stream::<(String, Vec<u8>)>()
        .map_err(|e| StorageError::Fatal(Cause::new("alert_states", e)))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().await {
        let (id, state) = row.map_err(|e| failed(e.into()))?;
        let device =
            DeviceId::new(id).map_err(|e| StorageError::Fatal(Cause::new("alert_states", e)))?;
        out.push((device, state));
    }
    Ok(out)
}
