//! Alerts: the list and one alert, acknowledging one, the devices failing to sync (an active
//! `sync_failures` alert) and the anomaly report.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use messina_bridge::alerts::{AckError, AlertService, ANOMALY_PREFIX, SYNC_FAILURES};
use messina_storage::{AlertCountQuery, AlertQuery, AlertState, AlertStateFilter, DeviceId};
use serde_json::{json, Value};

use super::{auth, ApiError, ApiResult, AppState, Params};
use crate::clock::{now_millis, rfc3339};
use crate::json::{alert_json, page_json, PageJson};

/// The routes, to nest under `/v1`.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/devices/failing", get(failing))
        .route("/alerts", get(list_alerts))
        .route("/alerts/{id}", get(one_alert))
        .route("/alerts/{id}/ack", post(ack_alert))
        .route("/anomalies", get(anomalies))
}

fn alerts_service(state: &AppState) -> ApiResult<&Arc<AlertService>> {
    state.alerts.as_ref().ok_or_else(|| ApiError {
        status: StatusCode::NOT_FOUND,
        title: "Alerts disabled",
        detail: "alerts are disabled on this server (`alerts.enabled = false`)".into(),
        parameter: None,
    })
}

pub async fn list_alerts(
    State(state): State<Arc<AppState>>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Json<PageJson>> {
    let p = Params::new(
        params,
        &[
            "state", "device", "rule", "since", "until", "limit", "cursor",
        ],
    )?;
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

pub async fn one_alert(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    match state.storage.alert(&id).await? {
        Some(a) => Ok(Json(alert_json(&a))),
        None => Err(ApiError::not_found(format!("no alert `{id}`"))),
    }
}

pub async fn ack_alert(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    axum::Extension(caller): axum::Extension<auth::Caller>,
    body: axum::body::Bytes,
) -> ApiResult<Json<Value>> {
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
pub async fn failing(
    State(state): State<Arc<AppState>>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    Params::new(params, &[])?;
    let service = alerts_service(&state)?;
    let items: Vec<Value> = service
        .active_of(SYNC_FAILURES)
        .iter()
        .map(|a| {
            json!({
                "device_id": a.device.as_str(),
                "consecutive_failures": a.value,
                "failing_since": rfc3339(a.raised_at),
                "alert": alert_json(a),
            })
        })
        .collect();
    Ok(Json(json!({ "total": items.len(), "items": items })))
}

/// Longest range the anomaly report reads (one index partition per day).
const ANOMALY_MAX_DAYS: i64 = 366;
/// Its range when `since` is not given: the 30 days before `until`.
const ANOMALY_DEFAULT_DAYS: i64 = 30;

/// How many anomaly alerts each device raised in a time range, by metric, from the alert index
/// by rule family: it reads the anomalies it counts, not every alert.
pub async fn anomalies(
    State(state): State<Arc<AppState>>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let p = Params::new(params, &["device", "since", "until"])?;
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
    let items: Vec<Value> = by_device
        .into_iter()
        .map(|(device, by_metric)| {
            json!({"device_id": device, "count": by_metric.values().sum::<u64>(), "by_metric": by_metric})
        })
        .collect();
    Ok(Json(json!({
        "since": rfc3339(since),
        "until": rfc3339(until),
        "items": items,
    })))
}
