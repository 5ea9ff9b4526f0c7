//! Readings and events (`telemetry`, `events`, `events_by_kind`) in day partitions, the
//! `partitions` index of days, and the cursors that page through them.

use super::*;

/// A cursor over a day-partitioned stream: which query, which day, and where in that day.
pub(super) struct DayCursor {
    day: i64,
    paging: PagingState,
}

pub(super) const CURSOR_MAGIC: u8 = b'S';

pub(super) fn encode_day_cursor(query: u64, c: &DayCursor) -> Cursor {
    let mut bytes = vec![CURSOR_MAGIC];
    bytes.extend_from_slice(&query.to_be_bytes());
    bytes.extend_from_slice(&c.day.to_be_bytes());
    if let Some(state) = c.paging.as_bytes_slice() {
        bytes.extend_from_slice(state);
    }
    Cursor(bytes)
}

pub(super) fn decode_day_cursor(query: u64, cursor: &Cursor) -> Result<DayCursor> {
    let b = &cursor.0;
    if b.len() < 17 || b[0] != CURSOR_MAGIC || b[1..9] != query.to_be_bytes() {
        return Err(StorageError::InvalidRequest(
            "cursor does not belong to this query; start again without a cursor".into(),
        ));
    }
    let day = i64::from_be_bytes(b[9..17].try_into().expect("8 bytes"));
    let paging = if b.len() > 17 {
        PagingState::new_from_raw_bytes(&b[17..])
    } else {
        PagingState::start()
    };
    Ok(DayCursor { day, paging })
}

/// Columns read for a reading.
pub(super) type ReadingRow = (
    String,
    CqlTimestamp,
    i64,
    CqlTimestamp,
    Option<f64>,
    Option<i32>,
    Option<bool>,
    Option<BTreeMap<String, f64>>,
    Option<BTreeMap<String, String>>,
);

pub(super) fn reading_from_row(r: ReadingRow) -> Result<Reading> {
    Ok(Reading {
        device: device_id(r.0)?,
        ts: r.1 .0,
        seq: r.2 as u64,
        received_at: r.3 .0,
        battery: r.4,
        rssi: r.5,
        online: r.6,
        metrics: r.7.unwrap_or_default(),
        attrs: attrs_from_cql(r.8)?,
    })
}

pub(super) type EventRow = (
    String,
    CqlTimestamp,
    i64,
    CqlTimestamp,
    String,
    Option<BTreeMap<String, String>>,
);

pub(super) fn event_from_row(r: EventRow) -> Result<Event> {
    Ok(Event {
        device: device_id(r.0)?,
        ts: r.1 .0,
        seq: r.2 as u64,
        received_at: r.3 .0,
        kind: r.4,
        attrs: attrs_from_cql(r.5)?,
    })
}

pub(super) type ReadingValues = (
    String,
    CqlDate,
    CqlTimestamp,
    i64,
    CqlTimestamp,
    MaybeUnset<f64>,
    MaybeUnset<i32>,
    MaybeUnset<bool>,
    BTreeMap<String, f64>,
    BTreeMap<String, String>,
    i32,
);

pub(super) type EventValues = (
    String,
    CqlDate,
    CqlTimestamp,
    i64,
    CqlTimestamp,
    String,
    BTreeMap<String, String>,
    i32,
);

pub(super) type EventByKindValues = (
    String,
    String,
    CqlDate,
    CqlTimestamp,
    i64,
    CqlTimestamp,
    BTreeMap<String, String>,
    i32,
);

pub(super) type PartitionValues = (String, String, CqlDate, i32);

/// A page of one device stream keyed by nothing else (`telemetry`, or `events` of every kind):
/// the days `partitions` lists for the stream, then each day's rows in the order asked. The
/// stream's name is also its cursor's tag.
#[allow(clippy::too_many_arguments)]
async fn device_stream<R, T>(
    inner: &Inner,
    stream: &str,
    device: &str,
    (newest_first, oldest_first): (&PreparedStatement, &PreparedStatement),
    range: &TimeRange,
    order: Order,
    page: &PageRequest,
    decode: impl Fn(R) -> Result<T>,
) -> Result<Page<T>>
where
    R: for<'f, 'm> DeserializeRow<'f, 'm>,
{
    let days = inner.days(device, stream, range, order).await?;
    let stmt = match order {
        Order::NewestFirst => newest_first,
        Order::OldestFirst => oldest_first,
    };
    let id = fingerprint(&[stream.as_bytes(), device.as_bytes(), order_byte(order)]);
    let (since, until) = bounds(range);
    inner
        .page_days(
            id,
            days,
            stmt,
            |day| (device, day, since, until),
            page,
            decode,
            |_| true,
        )
        .await
}

pub(super) async fn telemetry(store: &ScyllaStorage, q: &TelemetryQuery) -> Result<Page<Reading>> {
    store.check_open()?;
    let st = &store.inner.st;
    device_stream(
        &store.inner,
        "telemetry",
        q.device.as_str(),
        (&st.telemetry_desc, &st.telemetry_asc),
        &q.range,
        q.order,
        &q.page,
        reading_from_row,
    )
    .await
}

pub(super) async fn events(store: &ScyllaStorage, q: &EventQuery) -> Result<Page<Event>> {
    store.check_open()?;
    let inner = &store.inner;
    let (since, until) = bounds(&q.range);
    let device = q.device.as_str();
    match &q.kind {
        None => {
            device_stream(
                inner,
                "events",
                device,
                (&inner.st.events_desc, &inner.st.events_asc),
                &q.range,
                q.order,
                &q.page,
                event_from_row,
            )
            .await
        }
        Some(kind) => {
            let days = inner
                .days(device, &format!("events:{kind}"), &q.range, q.order)
                .await?;
            let stmt = match q.order {
                Order::NewestFirst => &inner.st.events_kind_desc,
                Order::OldestFirst => &inner.st.events_kind_asc,
            };
            let id = fingerprint(&[
                b"events",
                device.as_bytes(),
                kind.as_bytes(),
                order_byte(q.order),
            ]);
            let kind = kind.as_str();
            inner
                .page_days(
                    id,
                    days,
                    stmt,
                    |day| (device, kind, day, since, until),
                    &q.page,
                    event_from_row,
                    |_| true,
                )
                .await
        }
    }
}

impl Inner {
    /// Partition index entries not yet written by this process.
    pub(super) fn new_partitions(
        &self,
        entries: HashSet<(String, String, i64)>,
    ) -> Vec<PartitionValues> {
        let mut known = self
            .known_partitions
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if known.len() > 100_000 {
            known.clear();
        }
        // The index outlives its rows by a day so a range query never misses a live partition.
        let ttl = if self.ttl() == 0 {
            0
        } else {
            self.ttl().saturating_add(86_400)
        };
        entries
            .into_iter()
            .filter(|e| known.insert(e.clone()))
            .map(|(owner, stream, day)| (owner, stream, cql_date(day), ttl))
            .collect()
    }

    pub(super) fn forget_partitions(&self) {
        self.known_partitions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Days holding rows of `(owner, stream)` within a range, in query order.
    pub(super) async fn days(
        &self,
        owner: &str,
        stream: &str,
        range: &TimeRange,
        order: Order,
    ) -> Result<Vec<i64>> {
        let lo = range.since.map_or(i64::from(i32::MIN), day_of);
        let hi = range.until.map_or(i64::from(i32::MAX), |u| day_of(u - 1));
        let stmt = match order {
            Order::NewestFirst => &self.st.days_desc,
            Order::OldestFirst => &self.st.days_asc,
        };
        let values = (owner, stream, cql_date(lo), cql_date(hi));
        self.session
            .execute_iter(stmt.clone(), values)
            .await
            .map_err(|e| StorageError::Unavailable(Cause::new("SELECT day FROM partitions", e)))?
            .rows_stream::<(CqlDate,)>()
            .map_err(|e| StorageError::Fatal(Cause::new("SELECT day FROM partitions", e)))?
            .map_ok(|(d,)| from_cql_date(d))
            .try_collect()
            .await
            .map_err(|e| StorageError::Unavailable(Cause::new("SELECT day FROM partitions", e)))
    }

    /// Pages through day partitions in order, resuming at a cursor, with the driver's paging state
    /// inside a day. Only rows `keep` accepts count towards the page.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn page_days<R, T, V>(
        &self,
        query: u64,
        days: Vec<i64>,
        stmt: &PreparedStatement,
        values: impl Fn(CqlDate) -> V,
        page: &PageRequest,
        decode: impl Fn(R) -> Result<T>,
        keep: impl Fn(&T) -> bool,
    ) -> Result<Page<T>>
    where
        R: for<'f, 'm> DeserializeRow<'f, 'm>,
        V: SerializeRow,
    {
        if page.limit == 0 {
            return Err(StorageError::InvalidRequest(
                "limit must be at least 1".into(),
            ));
        }
        let (mut index, mut paging) = match &page.cursor {
            None => (0, PagingState::start()),
            Some(c) => {
                let c = decode_day_cursor(query, c)?;
                // Days newer (or older) than the cursor's were already returned.
                match days.iter().position(|d| *d == c.day) {
                    Some(i) => (i, c.paging),
                    None => (days.len(), PagingState::start()),
                }
            }
        };
        let mut items = Vec::new();
        while index < days.len() {
            let mut stmt = stmt.clone();
            stmt.set_page_size((page.limit - items.len()).clamp(1, 5000) as i32);
            let (result, next) = self
                .session
                .execute_single_page(&stmt, values(cql_date(days[index])), paging)
                .await
                .map_err(|e| classify(stmt.get_statement(), e))?;
            let rows = result
                .into_rows_result()
                .map_err(|e| StorageError::Fatal(Cause::new(stmt.get_statement(), e)))?;
            for row in rows
                .rows::<R>()
                .map_err(|e| StorageError::Fatal(Cause::new(stmt.get_statement(), e)))?
            {
                let row =
                    row.map_err(|e| StorageError::Fatal(Cause::new(stmt.get_statement(), e)))?;
                let item = decode(row)?;
                if keep(&item) {
                    items.push(item);
                }
            }
            match next {
                PagingStateResponse::HasMorePages { state } => {
                    if items.len() >= page.limit {
                        let cursor = DayCursor {
                            day: days[index],
                            paging: state,
                        };
                        return Ok(Page {
                            items,
                            next_cursor: Some(encode_day_cursor(query, &cursor)),
                        });
                    }
                    paging = state;
                }
                PagingStateResponse::NoMorePages => {
                    index += 1;
                    paging = PagingState::start();
                    if items.len() >= page.limit {
                        let next_cursor = days.get(index).map(|&day| {
                            encode_day_cursor(
                                query,
                                &DayCursor {
                                    day,
                                    paging: PagingState::start(),
                                },
                            )
                        });
                        return Ok(Page { items, next_cursor });
                    }
                }
            }
        }
        Ok(Page {
            items,
            next_cursor: None,
        })
    }
}
