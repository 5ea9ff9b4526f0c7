//! Dead letters (`dead_letters`): what was rejected, per device and for the fleet.

use super::*;

/// Owner of the fleet-wide (dead letters, alerts) partition index entries; device ids cannot
/// contain '*'.
pub(super) const DEAD_LETTER_OWNER: &str = "*";

pub(super) type DeadLetterRow = (
    CqlTimestamp,
    i64,
    String,
    Option<String>,
    Option<Vec<u8>>,
    String,
);

pub(super) fn dead_letter_from_row(r: DeadLetterRow) -> Result<DeadLetter> {
    Ok(DeadLetter {
        id: r.1 as u64,
        received_at: r.0 .0,
        topic: r.2,
        device: r.3.map(device_id).transpose()?,
        payload: r.4.unwrap_or_default(),
        reason: r.5,
    })
}

pub(super) type DeadLetterValues = (
    CqlDate,
    CqlTimestamp,
    i64,
    String,
    Option<String>,
    Vec<u8>,
    String,
    i32,
);

pub(super) async fn dead_letters(
    store: &ScyllaStorage,
    q: &DeadLetterQuery,
) -> Result<Page<DeadLetter>> {
    store.check_open()?;
    let inner = &store.inner;
    let days = inner
        .days(
            DEAD_LETTER_OWNER,
            "dead_letters",
            &q.range,
            Order::NewestFirst,
        )
        .await?;
    let device = q.device.as_ref().map(DeviceId::as_str).unwrap_or("");
    let id = fingerprint(&[b"dead_letters", device.as_bytes()]);
    let (since, until) = bounds(&q.range);
    inner
        .page_days(
            id,
            days,
            &inner.st.dead_letters,
            |day| (day, since, until),
            &q.page,
            dead_letter_from_row,
            |d: &DeadLetter| q.accepts(d),
        )
        .await
}
