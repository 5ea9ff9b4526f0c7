//! Device data: a device's latest state, its telemetry and events, the dead letters, and the
//! fleet summary with every device's state and connection.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::Json;
use messina_storage::{
    Connection, DeadLetterQuery, DeviceId, EventQuery, FleetQuery, TelemetryQuery,
};
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{
    device_id, ingest, query_params, ApiError, ApiResult, AppState, OrderParams, PageParams,
    Params, RangeParams,
};
use crate::json::{
    dead_letter_json, event_json, page_json, reading_json, state_json, DeadLetterJson, EventJson,
    FleetJson, PageJson, ReadingJson, StateJson,
};

/// The routes, to nest under `/v1`. Device data posted over HTTP shares its paths.
pub fn routes() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new()
        .routes(routes!(fleet))
        .routes(routes!(device))
        .routes(routes!(telemetry, ingest::telemetry))
        .routes(routes!(events, ingest::events))
        .routes(routes!(dead_letters))
}

/// A device's latest state and its connection.
///
/// Each field's newest value by device time (`null` when never reported), `updated` (the device
/// time of each value), `last_seen` (arrival time), and `connection`: whether the device has an
/// MQTT connection now, as the edge sees it, apart from the `online` it reports.
#[utoipa::path(
    get,
    path = "/devices/{id}",
    tag = "devices",
    params(("id" = String, Path, description = "The device id")),
    responses(
        (status = 200, description = "The latest state", body = StateJson),
        (status = 400, description = "An invalid device id or an unknown parameter"),
        (status = 404, description = "The device never sent telemetry"),
    )
)]
pub async fn device(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Json<StateJson>> {
    Params::new(params, &[])?;
    let id = device_id(id)?;
    match state.storage.device(&id).await? {
        Some(s) => {
            let connections = state.storage.connections(std::slice::from_ref(&id)).await?;
            Ok(Json(state_json(&s, connections.first())))
        }
        None => Err(ApiError::not_found(format!(
            "device `{id}` has sent no telemetry"
        ))),
    }
}

query_params! {
    /// The query of a device's telemetry: a half-open time range `[since, until)`, an order and a
    /// page.
    pub struct TelemetryParams = RangeParams, OrderParams, PageParams
}

/// A device's readings.
#[utoipa::path(
    get,
    path = "/devices/{id}/telemetry",
    tag = "devices",
    params(("id" = String, Path, description = "The device id"), TelemetryParams),
    responses(
        (status = 200, description = "A page of readings", body = PageJson<ReadingJson>),
        (status = 400, description = "An invalid parameter, named in `parameter`"),
    )
)]
pub async fn telemetry(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Json<PageJson<ReadingJson>>> {
    let p = Params::of::<TelemetryParams>(params)?;
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

/// Events of one kind.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // Read as documentation and as the names `Params` accepts.
pub struct EventKindParams {
    /// Only events of this kind.
    kind: Option<String>,
}

query_params! {
    /// The query of a device's events: of one kind or all, a time range, an order and a page.
    pub struct EventParams = EventKindParams, RangeParams, OrderParams, PageParams
}

/// A device's events, optionally of one kind.
#[utoipa::path(
    get,
    path = "/devices/{id}/events",
    tag = "devices",
    params(("id" = String, Path, description = "The device id"), EventParams),
    responses(
        (status = 200, description = "A page of events", body = PageJson<EventJson>),
        (status = 400, description = "An invalid parameter, named in `parameter`"),
    )
)]
pub async fn events(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Json<PageJson<EventJson>>> {
    let p = Params::of::<EventParams>(params)?;
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

/// Dead letters of one device.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // Read as documentation and as the names `Params` accepts.
pub struct DeadLetterDeviceParams {
    /// Only messages on this device's topics.
    device: Option<String>,
}

query_params! {
    /// The query of dead letters: of one device or all, a time range and a page.
    pub struct DeadLetterParams = DeadLetterDeviceParams, RangeParams, PageParams
}

/// Messages that could not be stored, newest first, with `reason`, `topic` and `payload_base64`.
#[utoipa::path(
    get,
    path = "/dead-letters",
    tag = "devices",
    params(DeadLetterParams),
    responses(
        (status = 200, description = "A page of dead letters", body = PageJson<DeadLetterJson>),
        (status = 400, description = "An invalid parameter, named in `parameter`"),
    )
)]
pub async fn dead_letters(
    State(state): State<Arc<AppState>>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Json<PageJson<DeadLetterJson>>> {
    let p = Params::of::<DeadLetterParams>(params)?;
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

/// The fleet summary and a page of latest states.
///
/// `total` (devices with a reading), `connected` (devices with an MQTT connection now, over
/// every node), `not_connected`, `low_battery` (latest battery below `low_battery_percent`):
/// counts maintained as data arrives, never a scan of the fleet.
#[utoipa::path(
    get,
    path = "/devices",
    tag = "devices",
    params(PageParams),
    responses(
        (status = 200, description = "The summary and a page of devices", body = FleetJson),
        (status = 400, description = "An invalid parameter, named in `parameter`"),
    )
)]
pub async fn fleet(
    State(state): State<Arc<AppState>>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Json<FleetJson>> {
    let p = Params::of::<PageParams>(params)?;
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
    let devices = page_json(page, |d| state_json(d, connections.get(&d.device)));
    Ok(Json(FleetJson {
        connected,
        items: devices.items,
        low_battery: counts.low_battery,
        low_battery_percent: state.low_battery_percent,
        next_cursor: devices.next_cursor,
        not_connected: counts.total.saturating_sub(connected),
        total: counts.total,
    }))
}
