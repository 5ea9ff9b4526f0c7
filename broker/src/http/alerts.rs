//! Alerts: the list and one alert, acknowledging one, the devices failing to sync (an active
//! `sync_failures` alert) and the anomaly report.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use messina_bridge::alerts::{AckError, AlertService, ANOMALY_PREFIX, SYNC_FAILURES};
use messina_storage::{AlertCountQuery, AlertQuery, AlertState, AlertStateFilter, DeviceId};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{auth, query_params, ApiError, ApiResult, AppState, PageParams, Params, RangeParams};
use crate::clock::{now_millis, rfc3339};
use crate::json::{
    alert_json, page_json, AlertJson, AnomaliesJson, AnomalyCountJson, FailingDeviceJson,
    FailingJson, PageJson,
};

/// The routes, to nest under `/v1`.
pub fn routes() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new()
        .routes(routes!(failing))
        .routes(routes!(list_alerts))
        .routes(routes!(one_alert))
        .routes(routes!(ack_alert))
        .routes(routes!(anomalies))
}

pub(super) fn alerts_service(state: &AppState) -> ApiResult<&Arc<AlertService>> {
    state.alerts.as_ref().ok_or_else(|| ApiError {
        status: StatusCode::NOT_FOUND,
        title: "Alerts disabled",
        detail: "alerts are disabled on this server (`alerts.enabled = false`)".into(),
        parameter: None,
    })
}

/// Alerts by state, device and rule.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // Read as documentation and as the names `Params` accepts.
pub struct AlertFilterParams {
    /// `active` (raised or acknowledged), `raised`, `acknowledged`, `cleared` or `all` (the
    /// default).
    #[param(pattern = "^(active|raised|acknowledged|cleared|all)$")]
    state: Option<String>,
    /// Only this device's alerts.
    device: Option<String>,
    /// Only this rule's alerts, e.g. `battery_low`.
    rule: Option<String>,
}

query_params! {
    /// The query of alerts: by state, device and rule, a range of raise times and a page.
    pub struct AlertParams = AlertFilterParams, RangeParams, PageParams
}

/// Alerts, newest raised first; `since` and `until` bound the time each was raised.
#[utoipa::path(
    get,
    path = "/alerts",
    tag = "alerts",
    params(AlertParams),
    responses(
        (status = 200, description = "A page of alerts", body = PageJson<AlertJson>),
        (status = 400, description = "An invalid parameter, named in `parameter`"),
    )
)]
pub async fn list_alerts(
    State(state): State<Arc<AppState>>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Json<PageJson<AlertJson>>> {
    let p = Params::of::<AlertParams>(params)?;
    let filter = match p.get("state") {
        None | Some("all") => None,
        Some("active") => Some(AlertStateFilter::Active),
        Some("raised") => Some(AlertStateFilter::Only(AlertState::Raised)),
        Some("acknowledged") => Some(AlertStateFilter::Only(AlertState::Acknowledged)),
        Some("cleared") => Some(AlertStateFilter::Only(AlertState::Cleared)),
        Some(v) => {
            return Err(ApiError::bad_parameter(
                "state",
                format!("{v:?} is not active, raised, acknowledged, cleared or all"),
            ))
        }
    };
    let device = match p.get("device") {
        Some(d) => {
            Some(DeviceId::new(d).map_err(|e| ApiError::bad_parameter("device", e.to_string()))?)
        }
        None => None,
    };
    let query = AlertQuery {
        state: filter,
        device,
        rule: p.get("rule").map(str::to_string),
        range: p.range()?,
        page: p.page(&state)?,
    };
    Ok(Json(page_json(
        state.storage.alerts(&query).await?,
        alert_json,
    )))
}

/// One alert.
#[utoipa::path(
    get,
    path = "/alerts/{id}",
    tag = "alerts",
    params(("id" = String, Path, description = "The alert id, `{device}~{rule}~{raised_at}`")),
    responses(
        (status = 200, description = "The alert", body = AlertJson),
        (status = 404, description = "No such alert"),
    )
)]
pub async fn one_alert(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<AlertJson>> {
    match state.storage.alert(&id).await? {
        Some(a) => Ok(Json(alert_json(&a))),
        None => Err(ApiError::not_found(format!("no alert `{id}`"))),
    }
}

/// The optional body of an acknowledgement.
#[derive(ToSchema)]
#[allow(dead_code)] // Its schema documents the body `ack_alert` reads.
pub struct AckBody {
    /// Who acknowledges, 1 to 128 characters; by default the API key's name (`api` on an open
    /// API).
    #[schema(min_length = 1, max_length = 128)]
    by: Option<String>,
}

/// Acknowledges an active alert; it stays active until its condition clears.
#[utoipa::path(
    post,
    path = "/alerts/{id}/ack",
    tag = "alerts",
    params(("id" = String, Path, description = "The alert id")),
    request_body(content = Option<AckBody>, description = "Optional: who acknowledges"),
    responses(
        (status = 200, description = "The acknowledged alert", body = AlertJson),
        (status = 400, description = "A body that is not `{\"by\": \"name\"}`"),
        (status = 404, description = "No such alert, or alerts are disabled"),
        (status = 409, description = "The alert is not raised (acknowledged or cleared)"),
        (status = 413, description = "A body over `http.max_body_kib`"),
    )
)]
pub async fn ack_alert(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    axum::Extension(caller): axum::Extension<auth::Caller>,
    body: axum::body::Bytes,
) -> ApiResult<Json<AlertJson>> {
    let service = alerts_service(&state)?;
    // The body is optional: `{"by": "name"}` records who acknowledged; without it, the
    // caller's API key name (or "api" on an open API).
    let by_caller = match &caller {
        auth::Caller::Open => "api".to_string(),
        auth::Caller::Key { name, .. } => name.clone(),
        auth::Caller::Device(id) => id.to_string(),
    };
    let by = if body.is_empty() {
        by_caller
    } else {
        let v: Value = serde_json::from_slice(&body).map_err(|e| ApiError {
            status: StatusCode::BAD_REQUEST,
            title: "Invalid body",
            detail: format!("the body must be JSON like {{\"by\": \"name\"}}: {e}"),
            parameter: Some("by".into()),
        })?;
        match &v["by"] {
            Value::String(s) if !s.is_empty() && s.len() <= 128 => s.clone(),
            Value::Null => by_caller,
            _ => {
                return Err(ApiError {
                    status: StatusCode::BAD_REQUEST,
                    title: "Invalid body",
                    detail: "`by` must be a string of 1 to 128 characters".into(),
                    parameter: Some("by".into()),
                })
            }
        }
    };
    match service.ack(&id, &by, now_millis()).await {
        Ok(alert) => {
            tracing::info!(%caller, alert = %id, by, "alert acknowledged");
            Ok(Json(alert_json(&alert)))
        }
        Err(AckError::NotActive(_)) => match state.storage.alert(&id).await? {
            Some(a) => Err(ApiError {
                status: StatusCode::CONFLICT,
                title: "Alert not active",
                detail: format!(
                    "alert `{id}` is {}; only raised alerts can be acknowledged",
                    a.state.as_str()
                ),
                parameter: None,
            }),
            None => Err(ApiError::not_found(format!("no alert `{id}`"))),
        },
    }
}

/// Devices with repeated failed syncs (an active `sync_failures` alert).
#[utoipa::path(
    get,
    path = "/devices/failing",
    tag = "alerts",
    responses(
        (status = 200, description = "The failing devices", body = FailingJson),
        (status = 400, description = "An unknown parameter"),
        (status = 404, description = "Alerts are disabled"),
    )
)]
pub async fn failing(
    State(state): State<Arc<AppState>>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Json<FailingJson>> {
    Params::new(params, &[])?;
    let service = alerts_service(&state)?;
    let items: Vec<FailingDeviceJson> = service
        .active_of(SYNC_FAILURES)
        .iter()
        .map(|a| FailingDeviceJson {
            alert: alert_json(a),
            consecutive_failures: a.value,
            device_id: a.device.to_string(),
            failing_since: rfc3339(a.raised_at),
        })
        .collect();
    Ok(Json(FailingJson {
        total: items.len(),
        items,
    }))
}

/// Longest range the anomaly report reads (one index partition per day).
const ANOMALY_MAX_DAYS: i64 = 366;
/// Its range when `since` is not given: the 30 days before `until`.
const ANOMALY_DEFAULT_DAYS: i64 = 30;

/// The query of the anomaly report: one device or all, and a range of raise times.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // Read as documentation and as the names `Params` accepts.
pub struct AnomalyParams {
    /// Only this device.
    device: Option<String>,
    /// Raised from this time on (default: 30 days before `until`); at most 366 days before
    /// `until`.
    since: Option<String>,
    /// Raised before this time (default: now).
    until: Option<String>,
}

/// How many anomaly alerts each device raised in a time range, by metric.
///
/// Read from the alert index by rule family: it reads the anomalies it counts, not every alert.
#[utoipa::path(
    get,
    path = "/anomalies",
    tag = "alerts",
    params(AnomalyParams),
    responses(
        (status = 200, description = "Counts per device and metric", body = AnomaliesJson),
        (status = 400, description = "An invalid parameter, or a range over 366 days"),
    )
)]
pub async fn anomalies(
    State(state): State<Arc<AppState>>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Json<AnomaliesJson>> {
    let p = Params::of::<AnomalyParams>(params)?;
    let device = match p.get("device") {
        Some(d) => {
            Some(DeviceId::new(d).map_err(|e| ApiError::bad_parameter("device", e.to_string()))?)
        }
        None => None,
    };
    let range = p.range()?;
    let until = range.until.unwrap_or_else(|| now_millis() + 1);
    let since = range
        .since
        .unwrap_or(until - ANOMALY_DEFAULT_DAYS * 86_400_000);
    if until - since > ANOMALY_MAX_DAYS * 86_400_000 {
        return Err(ApiError::bad_parameter(
            "since",
            format!("the range may cover at most {ANOMALY_MAX_DAYS} days"),
        ));
    }
    let counts = state
        .storage
        .alert_counts(&AlertCountQuery {
            family: ANOMALY_PREFIX.trim_end_matches('.').to_string(),
            device,
            since,
            until,
        })
        .await?;
    let mut by_device: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for c in counts {
        if let Some(metric) = c.rule.strip_prefix(ANOMALY_PREFIX) {
            by_device
                .entry(c.device.to_string())
                .or_default()
                .insert(metric.to_string(), c.count);
        }
    }
    let items: Vec<AnomalyCountJson> = by_device
        .into_iter()
        .map(|(device, by_metric)| AnomalyCountJson {
            count: by_metric.values().sum::<u64>(),
            by_metric,
            device_id: device,
        })
        .collect();
    Ok(Json(AnomaliesJson {
        items,
        since: rfc3339(since),
        until: rfc3339(until),
    }))
}
