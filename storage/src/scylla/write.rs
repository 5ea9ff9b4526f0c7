//! The write path: a batch becomes jobs (unlogged batches that stay inside one partition), run
//! with a bounded number in flight and retried with backoff.

use super::*;

/// One request of a batch write: an unlogged batch inside one partition, or a single statement.
pub(super) enum Job {
    Batch {
        batch: CqlBatch,
        values: JobValues,
        statement: &'static str,
    },
}

/// The bound values of a job's statements; all rows of one job use one statement.
pub(super) enum JobValues {
    Readings(Vec<ReadingValues>),
    Events(Vec<EventValues>),
    EventsByKind(Vec<EventByKindValues>),
    Latest(Vec<LatestValues>),
    LastSeen(Vec<LastSeenValues>),
    Partitions(Vec<PartitionValues>),
    DeadLetters(Vec<DeadLetterValues>),
    Alerts(Vec<AlertValues>),
    FleetMembers(Vec<(i32, String)>),
    AlertFamilies(Vec<(String, CqlDate, CqlTimestamp, String)>),
    FleetFlags(Vec<(i64, bool, i32, String)>),
}

/// Makes unlogged batches of at most `ROWS_PER_BATCH` rows of one statement, one partition each.
pub(super) fn batches<V>(
    statement: &PreparedStatement,
    name: &'static str,
    partitions: impl IntoIterator<Item = Vec<V>>,
    wrap: impl Fn(Vec<V>) -> JobValues,
    jobs: &mut Vec<Job>,
) {
    for rows in partitions {
        let mut rows = rows.into_iter().peekable();
        while rows.peek().is_some() {
            let chunk: Vec<V> = rows.by_ref().take(ROWS_PER_BATCH).collect();
            let mut batch = CqlBatch::new(BatchType::Unlogged);
            for _ in 0..chunk.len() {
                batch.append_statement(statement.clone());
            }
            jobs.push(Job::Batch {
                batch,
                values: wrap(chunk),
                statement: name,
            });
        }
    }
}

pub(super) async fn write_batch(store: &ScyllaStorage, batch: &Batch) -> Result<()> {
    store.check_open()?;
    if batch.is_empty() {
        return Ok(());
    }
    let inner = &store.inner;
    // Before the rows are written: the rollup cache loads the store without the batch.
    inner.prepare_rollups(&batch.readings).await?;
    let mut jobs = inner.jobs(batch)?;
    let changed_shards = inner.fleet_jobs(batch, &mut jobs);
    let requests: Vec<futures::future::BoxFuture<'_, Result<()>>> = jobs
        .iter()
        .map(|job| Box::pin(inner.run_job(job)) as _)
        .collect();
    let result = futures::stream::iter(requests)
        .buffer_unordered(inner.options.max_in_flight)
        .try_collect::<Vec<()>>()
        .await;
    if result.is_err() {
        // Index entries and fleet rows of a failed batch may not have been written; write
        // them again next time.
        inner.forget_partitions();
        inner.forget_fleet_flags();
    } else if !changed_shards.is_empty() {
        lock(&inner.dirty_shards).extend(changed_shards);
    }
    result?;
    // After the rows are stored; a failure here fails the batch, which is written again.
    inner.write_rollups(&batch.readings).await
}

impl Inner {
    pub(super) async fn run_jobs(&self, jobs: Vec<Job>) -> Result<()> {
        let requests: Vec<futures::future::BoxFuture<'_, Result<()>>> = jobs
            .iter()
            .map(|job| Box::pin(self.run_job(job)) as _)
            .collect();
        futures::stream::iter(requests)
            .buffer_unordered(self.options.max_in_flight)
            .try_collect::<Vec<()>>()
            .await
            .map(|_| ())
    }

    pub(super) fn jobs(&self, batch: &Batch) -> Result<Vec<Job>> {
        let st = &self.st;
        let ttl = self.ttl();
        let mut index = HashSet::new();
        let mut jobs = Vec::new();

        let mut by_partition: HashMap<(&DeviceId, i64), Vec<ReadingValues>> = HashMap::new();
        let mut latest: HashMap<&DeviceId, Vec<LatestValues>> = HashMap::new();
        let mut last_seen: HashMap<&DeviceId, Millis> = HashMap::new();
        for r in &batch.readings {
            let day = day_of(r.ts);
            index.insert((r.device.to_string(), "telemetry".to_string(), day));
            by_partition.entry((&r.device, day)).or_default().push((
                r.device.to_string(),
                cql_date(day),
                ts(r.ts),
                r.seq as i64,
                ts(r.received_at),
                unset(r.battery),
                unset(r.rssi),
                unset(r.online),
                r.metrics.clone(),
                attrs_to_cql(&r.attrs)?,
                ttl,
            ));
            let metrics: BTreeMap<String, (f64, CqlTimestamp)> = r
                .metrics
                .iter()
                .map(|(k, v)| (k.clone(), (*v, ts(r.ts))))
                .collect();
            latest.entry(&r.device).or_default().push((
                r.ts.saturating_mul(1000),
                ts(r.ts),
                r.seq as i64,
                unset(r.battery),
                unset(r.rssi),
                unset(r.online),
                if metrics.is_empty() {
                    MaybeUnset::Unset
                } else {
                    MaybeUnset::Set(metrics)
                },
                r.device.to_string(),
            ));
            let seen = last_seen.entry(&r.device).or_insert(r.received_at);
            *seen = (*seen).max(r.received_at);
        }
        batches(
            &st.insert_reading,
            "INSERT INTO telemetry",
            by_partition.into_values(),
            JobValues::Readings,
            &mut jobs,
        );
        batches(
            &st.update_latest,
            "UPDATE device_latest",
            latest.into_values(),
            JobValues::Latest,
            &mut jobs,
        );
        let seen: Vec<Vec<LastSeenValues>> = last_seen
            .into_iter()
            .map(|(d, at)| vec![(at.saturating_mul(1000), ts(at), d.to_string())])
            .collect();
        batches(
            &st.update_last_seen,
            "UPDATE device_latest SET last_seen",
            seen,
            JobValues::LastSeen,
            &mut jobs,
        );

        let mut events: HashMap<(&DeviceId, i64), Vec<EventValues>> = HashMap::new();
        let mut by_kind: HashMap<(&DeviceId, &str, i64), Vec<EventByKindValues>> = HashMap::new();
        for e in &batch.events {
            let day = day_of(e.ts);
            let attrs = attrs_to_cql(&e.attrs)?;
            index.insert((e.device.to_string(), "events".to_string(), day));
            index.insert((e.device.to_string(), format!("events:{}", e.kind), day));
            events.entry((&e.device, day)).or_default().push((
                e.device.to_string(),
                cql_date(day),
                ts(e.ts),
                e.seq as i64,
                ts(e.received_at),
                e.kind.clone(),
                attrs.clone(),
                ttl,
            ));
            by_kind.entry((&e.device, &e.kind, day)).or_default().push((
                e.device.to_string(),
                e.kind.clone(),
                cql_date(day),
                ts(e.ts),
                e.seq as i64,
                ts(e.received_at),
                attrs,
                ttl,
            ));
        }
        batches(
            &st.insert_event,
            "INSERT INTO events",
            events.into_values(),
            JobValues::Events,
            &mut jobs,
        );
        batches(
            &st.insert_event_by_kind,
            "INSERT INTO events_by_kind",
            by_kind.into_values(),
            JobValues::EventsByKind,
            &mut jobs,
        );

        let mut dead: HashMap<i64, Vec<DeadLetterValues>> = HashMap::new();
        for d in &batch.dead_letters {
            let day = day_of(d.received_at);
            index.insert((
                DEAD_LETTER_OWNER.to_string(),
                "dead_letters".to_string(),
                day,
            ));
            dead.entry(day).or_default().push((
                cql_date(day),
                ts(d.received_at),
                d.id as i64,
                d.topic.clone(),
                d.device.as_ref().map(DeviceId::to_string),
                d.payload.clone(),
                d.reason.clone(),
                ttl,
            ));
        }
        batches(
            &st.insert_dead_letter,
            "INSERT INTO dead_letters",
            dead.into_values(),
            JobValues::DeadLetters,
            &mut jobs,
        );

        // Each index entry is its own partition, so each is its own request.
        let entries: Vec<Vec<PartitionValues>> = self
            .new_partitions(index)
            .into_iter()
            .map(|p| vec![p])
            .collect();
        batches(
            &st.insert_partition,
            "INSERT INTO partitions",
            entries,
            JobValues::Partitions,
            &mut jobs,
        );
        Ok(jobs)
    }

    pub(super) async fn run_job(&self, job: &Job) -> Result<()> {
        let Job::Batch {
            batch,
            values,
            statement,
        } = job;
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        let mut attempt = 1;
        loop {
            let result = match values {
                JobValues::Readings(v) => self.session.batch(batch, v).await,
                JobValues::Events(v) => self.session.batch(batch, v).await,
                JobValues::EventsByKind(v) => self.session.batch(batch, v).await,
                JobValues::Latest(v) => self.session.batch(batch, v).await,
                JobValues::LastSeen(v) => self.session.batch(batch, v).await,
                JobValues::Partitions(v) => self.session.batch(batch, v).await,
                JobValues::DeadLetters(v) => self.session.batch(batch, v).await,
                JobValues::Alerts(v) => self.session.batch(batch, v).await,
                JobValues::FleetMembers(v) => self.session.batch(batch, v).await,
                JobValues::AlertFamilies(v) => self.session.batch(batch, v).await,
                JobValues::FleetFlags(v) => self.session.batch(batch, v).await,
            };
            match result.map_err(|e| classify(statement, e)) {
                Ok(_) => return Ok(()),
                Err(e) if e.is_retryable() && attempt < self.options.write_attempts => {
                    tracing::debug!(error = %e, attempt, "retrying a ScyllaDB write");
                    tokio::time::sleep(backoff.next_delay()).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }
}
