//! Aggregates of a metric per time bucket: of one device, and over the fleet. Answered from the
//! rollups storage keeps at ingest, so a month of minutes costs about what an hour does.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::Json;
use messina_storage::{AggregateQuery, Bucket};
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{device_id, ApiError, ApiResult, AppState, Params};
use crate::json::{aggregates_json, AggregatesJson};

/// The routes, to nest under `/v1`.
pub fn routes() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new()
        .routes(routes!(device_aggregate))
        .routes(routes!(fleet_aggregate))
}

/// The query of an aggregate: a metric, a bucket size and a half-open range `[since, until)` of
/// device time. A bucket cut by `since` or `until` aggregates only the readings inside.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // Read as documentation and as the names `Params` accepts.
pub struct AggregateParams {
    /// `battery`, `rssi` or any numeric metric the readings carry in `metrics`.
    metric: String,
    /// Bucket size: `1m`, `5m`, `15m`, `1h`, `6h` or `1d`; buckets start on multiples of their
    /// size since the epoch (UTC).
    #[param(pattern = "^(1m|5m|15m|1h|6h|1d)$")]
    bucket: String,
    /// From this time on: RFC 3339 or milliseconds since the epoch.
    since: String,
    /// Before this time (default: now): RFC 3339 or milliseconds since the epoch. At most
    /// 10,000 buckets between `since` and `until`.
    until: Option<String>,
}

/// The aggregate query the parameters ask for, checked, naming the parameter at fault.
fn aggregate_query(p: &Params) -> ApiResult<AggregateQuery> {
    let metric = p.get("metric").ok_or_else(|| {
        ApiError::bad_parameter(
            "metric",
            "missing; name a metric: battery, rssi or one the readings carry in `metrics`",
        )
    })?;
    let buckets = Bucket::ALL.map(Bucket::as_str).join(", ");
    let bucket = match p.get("bucket") {
        None => Err(format!("missing; one of {buckets}")),
        Some(v) => Bucket::parse(v).ok_or_else(|| format!("{v:?} is not one of {buckets}")),
    }
    .map_err(|why| ApiError::bad_parameter("bucket", why))?;
    let range = p.range()?;
    let since = range.since.ok_or_else(|| {
        ApiError::bad_parameter(
            "since",
            "missing; the start of the range, RFC 3339 or milliseconds since the epoch",
        )
    })?;
    let until = match range.until {
        Some(until) => until,
        None => {
            let now = crate::clock::now_millis();
            if since > now {
                return Err(ApiError::bad_parameter(
                    "since",
                    "is in the future and `until` defaults to now",
                ));
            }
            now
        }
    };
    let query = AggregateQuery {
        metric: metric.to_string(),
        bucket,
        since,
        until,
    };
    query
        .check()
        .map_err(|(field, why)| ApiError::bad_parameter(field, why))?;
    Ok(query)
}

/// Aggregates of one metric of one device per time bucket.
///
/// Per non-empty bucket, oldest first: `count`, `min`, `max`, `avg`, `sum`, and the `first` and
/// `last` value by device time. Exact, redelivered readings counted once.
#[utoipa::path(
    get,
    path = "/devices/{id}/telemetry/aggregate",
    tag = "devices",
    params(("id" = String, Path, description = "The device id"), AggregateParams),
    responses(
        (status = 200, description = "The buckets", body = AggregatesJson),
        (status = 400, description = "An invalid parameter, named in `parameter`"),
    )
)]
pub async fn device_aggregate(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Json<AggregatesJson>> {
    let p = Params::of::<AggregateParams>(params)?;
    let device = device_id(id)?;
    let query = aggregate_query(&p)?;
    let buckets = state.storage.aggregates(&device, &query).await?;
    Ok(Json(aggregates_json(Some(&device), &query, &buckets)))
}

/// Aggregates of one metric over every device per time bucket.
///
/// As the device form, over the readings of all devices: sensor statistics of the fleet.
#[utoipa::path(
    get,
    path = "/fleet/aggregate",
    tag = "devices",
    params(AggregateParams),
    responses(
        (status = 200, description = "The buckets", body = AggregatesJson),
        (status = 400, description = "An invalid parameter, named in `parameter`"),
    )
)]
pub async fn fleet_aggregate(
    State(state): State<Arc<AppState>>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Json<AggregatesJson>> {
    let p = Params::of::<AggregateParams>(params)?;
    let query = aggregate_query(&p)?;
    let buckets = state.storage.fleet_aggregates(&query).await?;
    Ok(Json(aggregates_json(None, &query, &buckets)))
}
