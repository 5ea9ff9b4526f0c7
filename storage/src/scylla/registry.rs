//! The device registry (`devices`, `devices_by_label`, `registry_changes`).

use super::*;

pub(super) const DEVICE_COLS: &str =
    "device_id, role, status, credential_kind, credential, created_at, \
    updated_at, name, model, labels, profile, photo_upload";

pub(super) type DeviceRow = (
    String,
    String,
    String,
    String,
    String,
    CqlTimestamp,
    CqlTimestamp,
    Option<String>,
    Option<String>,
    Option<BTreeSet<String>>,
    Option<BTreeMap<String, String>>,
    Option<String>,
);

pub(super) type DeviceValues<'a> = (
    &'a str,
    &'a str,
    &'a str,
    &'static str,
    &'a str,
    CqlTimestamp,
    CqlTimestamp,
    Option<&'a str>,
    Option<&'a str>,
    &'a BTreeSet<String>,
    BTreeMap<String, String>,
    Option<&'a str>,
);

pub(super) fn device_values(d: &RegisteredDevice) -> Result<DeviceValues<'_>> {
    Ok((
        d.id.as_str(),
        d.role.as_str(),
        d.status.as_str(),
        d.credential.kind(),
        d.credential.value(),
        ts(d.created_at),
        ts(d.updated_at),
        d.name.as_deref(),
        d.model.as_deref(),
        &d.labels,
        attrs_to_cql(&d.profile)?,
        d.photo_upload.as_deref(),
    ))
}

pub(super) fn device_from_row(r: DeviceRow) -> Result<RegisteredDevice> {
    let bad = |e: crate::registry::UnknownName| {
        StorageError::Fatal(Cause::new(format!("devices row {:?}", r.0), e))
    };
    Ok(RegisteredDevice {
        role: r.1.parse().map_err(bad)?,
        status: r.2.parse().map_err(bad)?,
        credential: Credential::from_parts(&r.3, r.4.clone()).map_err(bad)?,
        created_at: r.5 .0,
        updated_at: r.6 .0,
        name: r.7,
        model: r.8,
        labels: r.9.unwrap_or_default(),
        profile: attrs_from_cql(r.10)?,
        photo_upload: r.11,
        id: device_id(r.0)?,
    })
}

pub(super) async fn register_device(store: &ScyllaStorage, d: &RegisteredDevice) -> Result<bool> {
    store.check_open()?;
    // A lightweight transaction answers with `[applied]` first, then the existing row.
    let applied = store
        .inner
        .first_row::<scylla::value::Row>(&store.inner.st.register_device, device_values(d)?)
        .await?
        .and_then(|row| row.columns.into_iter().next().flatten());
    match applied {
        Some(scylla::value::CqlValue::Boolean(applied)) => Ok(applied),
        other => Err(StorageError::Fatal(
            format!("registering a device: unexpected answer {other:?} to IF NOT EXISTS").into(),
        )),
    }
}

pub(super) async fn update_device(store: &ScyllaStorage, d: &RegisteredDevice) -> Result<()> {
    store.check_open()?;
    let session = &store.inner.session;
    // The change first: if the record's write then fails, nodes look at an unchanged
    // record, which is harmless; the other order could hide a revocation.
    let st = &store.inner.st.insert_registry_change;
    session
        .execute_unpaged(
            st,
            (
                d.updated_at.div_euclid(HOUR_MS),
                ts(d.updated_at),
                d.id.as_str(),
            ),
        )
        .await
        .map_err(|e| classify(st.get_statement(), e))?;
    let st = &store.inner.st.insert_device;
    session
        .execute_unpaged(st, device_values(d)?)
        .await
        .map_err(|e| classify(st.get_statement(), e))?;
    Ok(())
}

pub(super) async fn registry_changes(
    store: &ScyllaStorage,
    since: Millis,
    limit: usize,
) -> Result<Vec<RegistryChange>> {
    store.check_open()?;
    let st = &store.inner.st.registry_changes;
    let now = crate::model::now_millis();
    let oldest = since.max(now - RegistryChange::KEPT_MS);
    let mut found = Vec::new();
    // One partition per hour, from the one `since` falls in to the current one (and the
    // next, for a writer whose clock is a little ahead).
    for hour in oldest.div_euclid(HOUR_MS)..=(now + 60_000).div_euclid(HOUR_MS) {
        if found.len() >= limit {
            break;
        }
        let left = i32::try_from(limit - found.len()).unwrap_or(i32::MAX);
        let rows = store
            .inner
            .session
            .execute_unpaged(st, (hour, ts(since), left))
            .await
            .map_err(|e| classify(st.get_statement(), e))?
            .into_rows_result()
            .map_err(|e| StorageError::Fatal(Cause::new("registry_changes", e)))?;
        for row in rows
            .rows::<(CqlTimestamp, String)>()
            .map_err(|e| StorageError::Fatal(Cause::new("registry_changes", e)))?
        {
            let (at, device) =
                row.map_err(|e| StorageError::Fatal(Cause::new("registry_changes", e)))?;
            let device = DeviceId::new(device).map_err(|e| {
                StorageError::Fatal(Cause::new("registry_changes holds a bad device id", e))
            })?;
            found.push(RegistryChange { at: at.0, device });
        }
    }
    Ok(found)
}

pub(super) async fn registered_device(
    store: &ScyllaStorage,
    id: &DeviceId,
) -> Result<Option<RegisteredDevice>> {
    store.check_open()?;
    store
        .inner
        .first_row::<DeviceRow>(&store.inner.st.registered_device, (id.as_str(),))
        .await?
        .map(device_from_row)
        .transpose()
}

pub(super) async fn registered_devices(
    store: &ScyllaStorage,
    q: &DeviceQuery,
) -> Result<Page<RegisteredDevice>> {
    store.check_open()?;
    let inner = &store.inner;
    inner
        .token_scan(
            &inner.st.registered_devices,
            b'R',
            "the device registry listing",
            &q.page,
            |row: DeviceRow| {
                let d = device_from_row(row)?;
                Ok(q.accepts(&d).then_some(d))
            },
        )
        .await
}
