//! Uploads (`uploads`, `uploads_by_device`, `pending_uploads`).

use super::*;

pub(super) const UPLOAD_COLUMNS: &str = "device_id, created_at, id, kind, content_type, size, sha256, object_key, state, expires_at, finished_at, attrs, meta, error";

pub(super) type UploadRow = (
    String,
    CqlTimestamp,
    String,
    String,
    String,
    i64,
    Option<String>,
    String,
    String,
    CqlTimestamp,
    Option<CqlTimestamp>,
    Option<BTreeMap<String, String>>,
    Option<BTreeMap<String, String>>,
    Option<String>,
);

pub(super) fn upload_from_row(r: UploadRow) -> Result<Upload> {
    let state = UploadState::parse(&r.8).ok_or_else(|| {
        StorageError::Fatal(format!("stored upload state {:?} is unknown", r.8).into())
    })?;
    Ok(Upload {
        device: device_id(r.0)?,
        created_at: r.1 .0,
        id: r.2,
        kind: r.3,
        content_type: r.4,
        size: u64::try_from(r.5).map_err(|_| {
            StorageError::Fatal(format!("stored upload size {} is negative", r.5).into())
        })?,
        sha256: r.6,
        object_key: r.7,
        state,
        expires_at: r.9 .0,
        finished_at: r.10.map(|t| t.0),
        attrs: attrs_from_cql(r.11)?,
        meta: attrs_from_cql(r.12)?,
        error: r.13,
    })
}

/// The pending-uploads index has one partition; see `schema.cql`.
pub(super) const PENDING_SHARD: i32 = 0;

pub(super) async fn put_upload(store: &ScyllaStorage, u: &Upload) -> Result<()> {
    store.check_open()?;
    let session = &store.inner.session;
    let st = &store.inner.st;
    let size = i64::try_from(u.size).map_err(|_| {
        StorageError::InvalidRequest(format!("upload size {} is too large", u.size))
    })?;
    let values = (
        u.device.as_str(),
        ts(u.created_at),
        u.id.as_str(),
        u.kind.as_str(),
        u.content_type.as_str(),
        size,
        u.sha256.as_deref(),
        u.object_key.as_str(),
        u.state.as_str(),
        ts(u.expires_at),
        u.finished_at.map(ts),
        attrs_to_cql(&u.attrs)?,
        attrs_to_cql(&u.meta)?,
        u.error.as_deref(),
    );
    session
        .execute_unpaged(&st.insert_upload, values)
        .await
        .map_err(|e| classify(st.insert_upload.get_statement(), e))?;
    // The row is written before the index changes, so a failure in between leaves at worst
    // an index entry the sweep finds already finished (and deletes) or a pending row the
    // next put indexes again.
    let pending = if u.state == UploadState::Pending {
        &st.insert_pending_upload
    } else {
        &st.delete_pending_upload
    };
    session
        .execute_unpaged(pending, (PENDING_SHARD, ts(u.expires_at), u.id.as_str()))
        .await
        .map_err(|e| classify(pending.get_statement(), e))?;
    Ok(())
}

pub(super) async fn upload(store: &ScyllaStorage, id: &str) -> Result<Option<Upload>> {
    store.check_open()?;
    let Some((device, created_at)) = Upload::parse_id(id) else {
        return Ok(None);
    };
    let key = (device.as_str(), ts(created_at), id);
    store
        .inner
        .first_row::<UploadRow>(&store.inner.st.upload, key)
        .await?
        .map(upload_from_row)
        .transpose()
}

pub(super) async fn uploads(store: &ScyllaStorage, q: &UploadQuery) -> Result<Page<Upload>> {
    store.check_open()?;
    let inner = &store.inner;
    let id = fingerprint(&[b"uploads", q.device.as_str().as_bytes()]);
    let device = q.device.as_str();
    // One partition per device: page through it as a single "day".
    inner
        .page_days(
            id,
            vec![0],
            &inner.st.uploads,
            |_| (device,),
            &q.page,
            upload_from_row,
            |_| true,
        )
        .await
}

pub(super) async fn expired_uploads(
    store: &ScyllaStorage,
    before: Millis,
    limit: usize,
) -> Result<Vec<Upload>> {
    store.check_open()?;
    let st = &store.inner.st.expired_uploads;
    let limit = i32::try_from(limit.max(1)).unwrap_or(i32::MAX);
    let ids: Vec<(String,)> = store
        .inner
        .session
        .execute_unpaged(st, (PENDING_SHARD, ts(before), limit))
        .await
        .map_err(|e| classify(st.get_statement(), e))?
        .into_rows_result()
        .map_err(|e| StorageError::Fatal(Cause::new("uploads_pending", e)))?
        .rows::<(String,)>()
        .map_err(|e| StorageError::Fatal(Cause::new("uploads_pending", e)))?
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| StorageError::Fatal(Cause::new("uploads_pending", e)))?;
    let mut found = Vec::with_capacity(ids.len());
    for (id,) in ids {
        match store.upload(&id).await? {
            Some(u) if u.state == UploadState::Pending => found.push(u),
            // Finished, but the index entry outlived a failed delete: remove it now.
            Some(u) => store.put_upload(&u).await?,
            None => {
                return Err(StorageError::Fatal(
                    format!("pending upload {id} has no upload row").into(),
                ))
            }
        }
    }
    Ok(found)
}
