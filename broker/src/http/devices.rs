//! Device data: a device's latest state, its telemetry and events, the dead letters, and the
//! fleet summary with every device's state and connection.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::routing::get;
use axum::{Json, Router};
use messina_storage::{
    Connection, DeadLetterQuery, DeviceId, EventQuery, FleetQuery, TelemetryQuery,
};
use serde_json::{json, Value};

use super::{device_id, ingest, ApiError, ApiResult, AppState, Params};
use crate::json::{
    connection_json, dead_letter_json, event_json, page_json, reading_json, state_json, PageJson,
};

/// The routes, to nest under `/v1`. Device data posted over HTTP shares its paths.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/devices", get(fleet))
        .route("/devices/{id}", get(device))
        .route(
            "/devices/{id}/telemetry",
            get(telemetry).post(ingest::telemetry),
        )
        .route("/devices/{id}/events", get(events).post(ingest::events))
        .route("/dead-letters", get(dead_letters))
}

pub async fn device(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    Params::new(params, &[])?;
    let id = device_id(id)?;
    match state.storage.device(&id).await? {
        Some(s) => {
            let connections = state.storage.connections(std::slice::from_ref(&id)).await?;
            let mut v = state_json(&s);
            v["connection"] = connection_json(connections.first());
            Ok(Json(v))
        }
        None => Err(ApiError::not_found(format!(
            "device `{id}` has sent no telemetry"
        ))),
    }
}

pub async fn telemetry(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Json<PageJson>> {
    let p = Params::new(params, &["since", "until", "limit", "cursor", "order"])?;
    let query = TelemetryQuery {
        device: device_id(id)?,
        range: p.range()?,
        order: p.order()?,
        page: p.page(&state)?,
    };
    Ok(Json(page_json(
        state.storage.telemetry(&query).await?,
        reading_json,
    )))
}

pub async fn events(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Json<PageJson>> {
    let p = Params::new(
        params,
        &["kind", "since", "until", "limit", "cursor", "order"],
    )?;
    let query = EventQuery {
        device: device_id(id)?,
        kind: p.get("kind").map(str::to_string),
        range: p.range()?,
        order: p.order()?,
        page: p.page(&state)?,
    };
    Ok(Json(page_json(
        state.storage.events(&query).await?,
        event_json,
    )))
}

pub async fn dead_letters(
    State(state): State<Arc<AppState>>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Json<PageJson>> {
    let p = Params::new(params, &["device", "since", "until", "limit", "cursor"])?;
    let device = match p.get("device") {
        Some(d) => {
            Some(DeviceId::new(d).map_err(|e| ApiError::bad_parameter("device", e.to_string()))?)
        }
        None => None,
    };
    let query = DeadLetterQuery {
        device,
        range: p.range()?,
        page: p.page(&state)?,
    };
    Ok(Json(page_json(
        state.storage.dead_letters(&query).await?,
        dead_letter_json,
    )))
}

pub async fn fleet(
    State(state): State<Arc<AppState>>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let p = Params::new(params, &["limit", "cursor"])?;
    let storage = &state.storage;
    let query = FleetQuery {
        page: p.page(&state)?,
    };
    let (page, counts, connected) = tokio::try_join!(
        storage.fleet(&query),
        storage.fleet_counts(),
        storage.connected_devices(),
    )?;
    let ids: Vec<DeviceId> = page.items.iter().map(|d| d.device.clone()).collect();
    let connections: HashMap<DeviceId, Connection> = storage
        .connections(&ids)
        .await?
        .into_iter()
        .map(|c| (c.device.clone(), c))
        .collect();
    let devices = page_json(page, |d| {
        let mut v = state_json(d);
        v["connection"] = connection_json(connections.get(&d.device));
        v
    });
    Ok(Json(json!({
        "total": counts.total,
        "connected": connected,
        "not_connected": counts.total.saturating_sub(connected),
        "low_battery": counts.low_battery,
        "low_battery_percent": state.low_battery_percent,
        "items": devices.items,
        "next_cursor": devices.next_cursor,
    })))
}
