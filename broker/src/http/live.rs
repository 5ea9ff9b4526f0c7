//! Live streams for the dashboard and any other watcher: alert transitions as they are stored,
//! and the ingest rates once a second, as server-sent events (`text/event-stream`). A stream
//! ends at shutdown; at most `http.max_event_streams` are open at once.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream::{self, Stream, StreamExt};
use messina_storage::Alert;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::OwnedSemaphorePermit;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{alerts::alerts_service, ApiError, ApiResult, AppState};
use crate::clock::{now_millis, rfc3339};
use crate::json::{alert_json, IngestRatesJson, PageJson};

/// How often the ingest stream reports.
const RATES_EVERY: Duration = Duration::from_secs(1);
/// A comment line this often keeps proxies from closing an idle stream.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The routes, to nest under `/v1`.
pub fn routes() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new()
        .routes(routes!(alert_stream))
        .routes(routes!(ingest_stream))
}

/// A place among the open streams, or 503 when `http.max_event_streams` are open.
fn stream_permit(state: &AppState) -> ApiResult<OwnedSemaphorePermit> {
    Arc::clone(&state.streams).try_acquire_owned().map_err(|_| {
        metrics::counter!("messina_http_shed_total").increment(1);
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            title: "Service unavailable",
            detail: "`http.max_event_streams` live streams are open already; retry later".into(),
            parameter: None,
        }
    })
}

/// An SSE answer of `events` that ends at shutdown and holds `permit` while it lasts.
fn sse(
    state: &AppState,
    permit: OwnedSemaphorePermit,
    events: impl Stream<Item = Event> + Send + 'static,
) -> Response {
    let shutdown = state.shutdown.clone().cancelled_owned();
    let events = events.take_until(shutdown).map(move |event| {
        let _held = &permit;
        Ok::<_, Infallible>(event)
    });
    let mut response = Sse::new(events)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response();
    // Proxies such as nginx buffer a response unless told not to; a live stream must not be.
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

fn json_event(name: &'static str, data: &impl serde::Serialize) -> Event {
    Event::default()
        .event(name)
        .json_data(data)
        .unwrap_or_else(|e| Event::default().event("error").data(e.to_string()))
}

fn snapshot(active: &[Alert]) -> Event {
    json_event(
        "snapshot",
        &PageJson {
            items: active.iter().map(alert_json).collect(),
            next_cursor: None,
        },
    )
}

/// Alert transitions, live.
///
/// First an event `snapshot` (`{"items": [alert...], "next_cursor": null}`: every active
/// alert, newest raised first), then an event `alert` (one alert) for each transition
/// (raised, acknowledged, cleared) once it is stored, in order. A watcher that falls more than
/// 1,024 transitions behind gets a new `snapshot` in their place. A comment line every 15 s
/// keeps the connection open.
#[utoipa::path(
    get,
    path = "/alerts/stream",
    tag = "alerts",
    responses(
        (status = 200, description = "Server-sent events `snapshot` and `alert`", body = String, content_type = "text/event-stream"),
        (status = 404, description = "Alerts are disabled"),
        (status = 503, description = "`http.max_event_streams` streams are open already"),
    )
)]
pub async fn alert_stream(State(state): State<Arc<AppState>>) -> ApiResult<Response> {
    let service = Arc::clone(alerts_service(&state)?);
    let permit = stream_permit(&state)?;
    let (active, changes) = service.watch();
    let first = stream::once(std::future::ready(snapshot(&active)));
    let rest = stream::unfold((service, changes), |(service, mut changes)| async move {
        let event = match changes.recv().await {
            Ok(alert) => json_event("alert", &alert_json(&alert)),
            Err(RecvError::Lagged(_)) => {
                let (active, fresh) = service.watch();
                changes = fresh;
                snapshot(&active)
            }
            // The alert service is gone: the process is stopping.
            Err(RecvError::Closed) => return None,
        };
        Some((event, (service, changes)))
    });
    Ok(sse(&state, permit, first.chain(rest)))
}

/// Totals a rate is computed from.
#[derive(Clone, Copy)]
struct Sample {
    at: Instant,
    received: u64,
    stored: u64,
    rejected: u64,
    log_lag_bytes: u64,
}

/// Ingest rates, live.
///
/// An event `rates` every second: device messages accepted into the ingest log (over MQTT and
/// HTTP), rows written to storage and messages rejected (stored as dead letters) per second over
/// the last second, their totals since the process started, and the log's lag (bytes accepted
/// and not yet stored).
#[utoipa::path(
    get,
    path = "/ingest/stream",
    tag = "operations",
    responses(
        (status = 200, description = "Server-sent events `rates`, each an `IngestRatesJson`", body = String, content_type = "text/event-stream"),
        (status = 404, description = "This server takes no device data"),
        (status = 503, description = "`http.max_event_streams` streams are open already"),
    )
)]
pub async fn ingest_stream(State(state): State<Arc<AppState>>) -> ApiResult<Response> {
    let log = state
        .ingest
        .as_ref()
        .map(|i| i.log.clone())
        .ok_or_else(|| ApiError::not_found("this server takes no device data"))?;
    let permit = stream_permit(&state)?;
    let mut ticks = tokio::time::interval(RATES_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let first = Sample::of(&log);
    let events = stream::unfold((log, ticks, first), |(log, mut ticks, last)| async move {
        ticks.tick().await;
        let now = Sample::of(&log);
        Some((json_event("rates", &rates(&last, &now)), (log, ticks, now)))
    });
    Ok(sse(&state, permit, events))
}

impl Sample {
    fn of(log: &messina_log::Log) -> Sample {
        let totals = messina_bridge::meter::totals();
        Sample {
            at: Instant::now(),
            received: log.stats().records_appended,
            stored: totals.stored_rows,
            rejected: totals.rejected,
            log_lag_bytes: log.used_bytes(),
        }
    }
}

fn rates(last: &Sample, now: &Sample) -> IngestRatesJson {
    let secs = now.at.duration_since(last.at).as_secs_f64();
    let per_s = |a: u64, b: u64| {
        if secs > 0.0 {
            b.saturating_sub(a) as f64 / secs
        } else {
            0.0
        }
    };
    IngestRatesJson {
        at: rfc3339(now_millis()),
        log_lag_bytes: now.log_lag_bytes,
        received_per_s: per_s(last.received, now.received),
        received_total: now.received,
        rejected_per_s: per_s(last.rejected, now.rejected),
        rejected_total: now.rejected,
        stored_per_s: per_s(last.stored, now.stored),
        stored_total: now.stored,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_per_second_over_the_time_between_samples() {
        let at = Instant::now();
        let last = Sample {
            at,
            received: 100,
            stored: 50,
            rejected: 1,
            log_lag_bytes: 0,
        };
        let now = Sample {
            at: at + Duration::from_millis(500),
            received: 300,
            stored: 50,
            rejected: 3,
            log_lag_bytes: 4096,
        };
        let r = rates(&last, &now);
        assert_eq!(r.received_per_s, 400.0);
        assert_eq!(r.stored_per_s, 0.0);
        assert_eq!(r.rejected_per_s, 4.0);
        assert_eq!(
            (r.received_total, r.stored_total, r.rejected_total),
            (300, 50, 3)
        );
        assert_eq!(r.log_lag_bytes, 4096);
        // The first event after start, or counters that went back (never): no negative rate.
        let r = rates(&now, &last);
        assert_eq!((r.received_per_s, r.rejected_per_s), (0.0, 0.0));
    }
}
