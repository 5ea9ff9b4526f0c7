//! Every prepared statement of the backend, prepared once at connect.

use super::*;

pub(super) struct Statements {
    pub(super) insert_reading: PreparedStatement,
    pub(super) insert_event: PreparedStatement,
    pub(super) insert_event_by_kind: PreparedStatement,
    pub(super) insert_partition: PreparedStatement,
    pub(super) insert_dead_letter: PreparedStatement,
    pub(super) update_latest: PreparedStatement,
    pub(super) update_last_seen: PreparedStatement,
    pub(super) days_desc: PreparedStatement,
    pub(super) days_asc: PreparedStatement,
    pub(super) telemetry_desc: PreparedStatement,
    pub(super) telemetry_asc: PreparedStatement,
    pub(super) events_desc: PreparedStatement,
    pub(super) events_asc: PreparedStatement,
    pub(super) events_kind_desc: PreparedStatement,
    pub(super) events_kind_asc: PreparedStatement,
    pub(super) dead_letters: PreparedStatement,
    pub(super) latest: PreparedStatement,
    pub(super) fleet: PreparedStatement,
    pub(super) fleet_member: PreparedStatement,
    pub(super) insert_alert_family: PreparedStatement,
    pub(super) alerts_of_family: PreparedStatement,
    pub(super) fleet_flag: PreparedStatement,
    pub(super) fleet_shard: PreparedStatement,
    pub(super) put_shard_counts: PreparedStatement,
    pub(super) fleet_counts: PreparedStatement,
    pub(super) latest_batteries: PreparedStatement,
    pub(super) report_node: PreparedStatement,
    pub(super) nodes: PreparedStatement,
    pub(super) put_connection: PreparedStatement,
    pub(super) connections: PreparedStatement,
    pub(super) insert_alert: PreparedStatement,
    pub(super) alert: PreparedStatement,
    pub(super) alerts: PreparedStatement,
    pub(super) insert_upload: PreparedStatement,
    pub(super) upload: PreparedStatement,
    pub(super) uploads: PreparedStatement,
    pub(super) insert_pending_upload: PreparedStatement,
    pub(super) delete_pending_upload: PreparedStatement,
    pub(super) expired_uploads: PreparedStatement,
    pub(super) insert_alert_state: PreparedStatement,
    pub(super) delete_alert_state: PreparedStatement,
    pub(super) alert_states: PreparedStatement,
    pub(super) insert_device: PreparedStatement,
    pub(super) insert_registry_change: PreparedStatement,
    pub(super) registry_changes: PreparedStatement,
    pub(super) register_device: PreparedStatement,
    pub(super) registered_device: PreparedStatement,
    pub(super) registered_devices: PreparedStatement,
    pub(super) rollups: RollupStatements,
}

/// Prepares one statement; a failure is fatal (the schema or the statement is wrong).
pub(super) async fn prepare_statement(session: &Session, cql: String) -> Result<PreparedStatement> {
    session
        .prepare(cql.as_str())
        .await
        .map_err(|e| StorageError::Fatal(Cause::new(format!("preparing {cql}"), e)))
}

impl Statements {
    pub(super) async fn prepare(session: &Session, ks: &str) -> Result<Self> {
        let prepare = |cql: String| prepare_statement(session, cql);
        let reading_cols = "device_id, ts, seq, received_at, battery, rssi, online, metrics, attrs";
        let event_cols = "device_id, ts, seq, received_at, kind, attrs";
        let range = "WHERE device_id = ? AND day = ? AND ts >= ? AND ts < ?";
        let kind_range = "WHERE device_id = ? AND kind = ? AND day = ? AND ts >= ? AND ts < ?";
        let asc = "ORDER BY ts ASC, seq ASC";
        Ok(Statements {
            insert_reading: prepare(format!(
                "INSERT INTO {ks}.telemetry (device_id, day, ts, seq, received_at, battery, rssi, online, metrics, attrs) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) USING TTL ?"
            ))
            .await?,
            insert_event: prepare(format!(
                "INSERT INTO {ks}.events (device_id, day, ts, seq, received_at, kind, attrs) VALUES (?, ?, ?, ?, ?, ?, ?) USING TTL ?"
            ))
            .await?,
            insert_event_by_kind: prepare(format!(
                "INSERT INTO {ks}.events_by_kind (device_id, kind, day, ts, seq, received_at, attrs) VALUES (?, ?, ?, ?, ?, ?, ?) USING TTL ?"
            ))
            .await?,
            insert_partition: prepare(format!(
                "INSERT INTO {ks}.partitions (owner, stream, day) VALUES (?, ?, ?) USING TTL ?"
            ))
            .await?,
            insert_dead_letter: prepare(format!(
                "INSERT INTO {ks}.dead_letters (day, received_at, id, topic, device_id, payload, reason) VALUES (?, ?, ?, ?, ?, ?, ?) USING TTL ?"
            ))
            .await?,
            update_latest: prepare(format!(
                "UPDATE {ks}.device_latest USING TIMESTAMP ? SET ts = ?, seq = ?, battery = ?, rssi = ?, online = ?, metrics = metrics + ? WHERE device_id = ?"
            ))
            .await?,
            update_last_seen: prepare(format!(
                "UPDATE {ks}.device_latest USING TIMESTAMP ? SET last_seen = ? WHERE device_id = ?"
            ))
            .await?,
            days_desc: prepare(format!(
                "SELECT day FROM {ks}.partitions WHERE owner = ? AND stream = ? AND day >= ? AND day <= ?"
            ))
            .await?,
            days_asc: prepare(format!(
                "SELECT day FROM {ks}.partitions WHERE owner = ? AND stream = ? AND day >= ? AND day <= ? ORDER BY day ASC"
            ))
            .await?,
            telemetry_desc: prepare(format!("SELECT {reading_cols} FROM {ks}.telemetry {range}")).await?,
            telemetry_asc: prepare(format!("SELECT {reading_cols} FROM {ks}.telemetry {range} {asc}")).await?,
            events_desc: prepare(format!("SELECT {event_cols} FROM {ks}.events {range}")).await?,
            events_asc: prepare(format!("SELECT {event_cols} FROM {ks}.events {range} {asc}")).await?,
            events_kind_desc: prepare(format!("SELECT {event_cols} FROM {ks}.events_by_kind {kind_range}")).await?,
            events_kind_asc: prepare(format!("SELECT {event_cols} FROM {ks}.events_by_kind {kind_range} {asc}")).await?,
            dead_letters: prepare(format!(
                "SELECT received_at, id, topic, device_id, payload, reason FROM {ks}.dead_letters WHERE day = ? AND received_at >= ? AND received_at < ?"
            ))
            .await?,
            latest: prepare(format!("SELECT {LATEST_COLUMNS} FROM {ks}.device_latest WHERE device_id = ?")).await?,
            fleet: prepare(format!("SELECT {LATEST_COLUMNS} FROM {ks}.device_latest")).await?,
            insert_alert_family: prepare(format!(
                "INSERT INTO {ks}.alerts_by_family (family, day, raised_at, id) VALUES (?, ?, ?, ?)"
            ))
            .await?,
            alerts_of_family: prepare(format!(
                "SELECT id FROM {ks}.alerts_by_family WHERE family = ? AND day = ? AND raised_at >= ? AND raised_at < ?"
            ))
            .await?,
            fleet_member: prepare(format!(
                "INSERT INTO {ks}.fleet_devices (shard, device_id) VALUES (?, ?)"
            ))
            .await?,
            fleet_flag: prepare(format!(
                "UPDATE {ks}.fleet_devices USING TIMESTAMP ? SET low_battery = ? WHERE shard = ? AND device_id = ?"
            ))
            .await?,
            fleet_shard: prepare(format!(
                "SELECT low_battery FROM {ks}.fleet_devices WHERE shard = ?"
            ))
            .await?,
            put_shard_counts: prepare(format!(
                "INSERT INTO {ks}.fleet_counts (fleet, shard, devices, low_battery, low_battery_percent) \
                 VALUES ('fleet', ?, ?, ?, ?) USING TIMESTAMP ?"
            ))
            .await?,
            fleet_counts: prepare(format!(
                "SELECT devices, low_battery, low_battery_percent FROM {ks}.fleet_counts WHERE fleet = 'fleet'"
            ))
            .await?,
            latest_batteries: prepare(format!(
                "SELECT device_id, ts, battery, WRITETIME(battery) FROM {ks}.device_latest"
            ))
            .await?,
            report_node: prepare(format!(
                "INSERT INTO {ks}.nodes (cluster, node_id, connected) VALUES ('messina', ?, ?) USING TTL ?"
            ))
            .await?,
            nodes: prepare(format!(
                "SELECT node_id, connected FROM {ks}.nodes WHERE cluster = 'messina'"
            ))
            .await?,
            put_connection: prepare(format!(
                "INSERT INTO {ks}.device_connections (device_id, node, connected, at) VALUES (?, ?, ?, ?) USING TIMESTAMP ?"
            ))
            .await?,
            connections: prepare(format!(
                "SELECT device_id, node, connected, at FROM {ks}.device_connections WHERE device_id IN ?"
            ))
            .await?,
            insert_alert: prepare(format!(
                "INSERT INTO {ks}.alerts (day, raised_at, id, {ALERT_DATA_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            ))
            .await?,
            alert: prepare(format!(
                "SELECT raised_at, id, {ALERT_DATA_COLUMNS} FROM {ks}.alerts WHERE day = ? AND raised_at = ? AND id = ?"
            ))
            .await?,
            alerts: prepare(format!(
                "SELECT raised_at, id, {ALERT_DATA_COLUMNS} FROM {ks}.alerts WHERE day = ? AND raised_at >= ? AND raised_at < ?"
            ))
            .await?,
            insert_upload: prepare(format!(
                "INSERT INTO {ks}.uploads ({UPLOAD_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            ))
            .await?,
            upload: prepare(format!(
                "SELECT {UPLOAD_COLUMNS} FROM {ks}.uploads WHERE device_id = ? AND created_at = ? AND id = ?"
            ))
            .await?,
            uploads: prepare(format!("SELECT {UPLOAD_COLUMNS} FROM {ks}.uploads WHERE device_id = ?")).await?,
            insert_pending_upload: prepare(format!(
                "INSERT INTO {ks}.uploads_pending (shard, expires_at, id) VALUES (?, ?, ?)"
            ))
            .await?,
            delete_pending_upload: prepare(format!(
                "DELETE FROM {ks}.uploads_pending WHERE shard = ? AND expires_at = ? AND id = ?"
            ))
            .await?,
            expired_uploads: prepare(format!(
                "SELECT id FROM {ks}.uploads_pending WHERE shard = ? AND expires_at < ? LIMIT ?"
            ))
            .await?,
            insert_alert_state: prepare(format!(
                "INSERT INTO {ks}.alert_states (device_id, state) VALUES (?, ?)"
            ))
            .await?,
            delete_alert_state: prepare(format!(
                "DELETE FROM {ks}.alert_states WHERE device_id = ?"
            ))
            .await?,
            alert_states: prepare(format!("SELECT device_id, state FROM {ks}.alert_states"))
                .await?,
            insert_device: prepare(format!(
                "INSERT INTO {ks}.devices ({DEVICE_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            ))
            .await?,
            insert_registry_change: prepare(format!(
                "INSERT INTO {ks}.registry_changes (hour, at, device_id) VALUES (?, ?, ?)"
            ))
            .await?,
            registry_changes: prepare(format!(
                "SELECT at, device_id FROM {ks}.registry_changes WHERE hour = ? AND at >= ? LIMIT ?"
            ))
            .await?,
            register_device: prepare(format!(
                "INSERT INTO {ks}.devices ({DEVICE_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) IF NOT EXISTS"
            ))
            .await?,
            registered_device: prepare(format!(
                "SELECT {DEVICE_COLS} FROM {ks}.devices WHERE device_id = ?"
            ))
            .await?,
            registered_devices: prepare(format!("SELECT {DEVICE_COLS} FROM {ks}.devices")).await?,
            rollups: RollupStatements::prepare(session, ks).await?,
        })
    }
}
