//! Uploads over HTTP: a presigned upload URL on a device's behalf, completing an upload, a
//! device's uploads, and one upload with a short-lived download URL once it is complete.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use messina_storage::{Millis, UploadQuery};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{device_id, ApiError, ApiResult, AppState, PageParams, Params};
use crate::clock::{now_millis, rfc3339};
use crate::json::{page_json, ticket_json, upload_json, PageJson, TicketJson, UploadJson};
use crate::uploads::{UploadError, UploadRequest, UploadService};

/// The routes, to nest under `/v1`.
pub fn routes() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new()
        .routes(routes!(list_uploads, request_upload))
        .routes(routes!(complete_upload))
        .routes(routes!(one_upload))
}

impl From<UploadError> for ApiError {
    fn from(e: UploadError) -> Self {
        let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let (title, parameter) = match &e {
            UploadError::Invalid { field, .. } => {
                ("Invalid upload request", Some(field.to_string()))
            }
            UploadError::NotFound(_) => ("Not found", None),
            UploadError::Conflict(_) => ("Upload not ready", None),
            UploadError::Rejected(_) => ("Upload rejected", None),
            UploadError::Unavailable(_) => {
                tracing::warn!(error = %e, "upload request failed");
                ("Object storage unavailable", None)
            }
            UploadError::Fatal(_) => {
                tracing::error!(error = %e, "upload request failed");
                return ApiError {
                    status,
                    title: "Internal error",
                    detail: "the upload request failed; see the server log".into(),
                    parameter: None,
                };
            }
        };
        ApiError {
            status,
            title,
            detail: e.to_string(),
            parameter,
        }
    }
}

fn uploads_service(state: &AppState) -> ApiResult<&Arc<UploadService>> {
    state
        .uploads
        .as_ref()
        .ok_or_else(|| ApiError::not_found("uploads are disabled (`uploads.enabled = false`)"))
}

/// Asks for a presigned upload URL on behalf of a device.
///
/// Any top-level key besides those listed is kept as device metadata too.
#[utoipa::path(
    post,
    path = "/devices/{id}/uploads",
    tag = "uploads",
    params(("id" = String, Path, description = "The device id")),
    request_body(content = UploadRequest, description = "JSON (or MessagePack)"),
    responses(
        (status = 201, description = "The presigned `PUT`", body = TicketJson),
        (status = 400, description = "A field is invalid or over the kind's limit, named in `parameter`"),
        (status = 404, description = "Uploads are disabled"),
        (status = 413, description = "A body over `http.max_body_kib`"),
    )
)]
pub async fn request_upload(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
    body: axum::body::Bytes,
) -> ApiResult<(StatusCode, Json<TicketJson>)> {
    Params::new(params, &[])?;
    let device = device_id(id)?;
    let service = uploads_service(&state)?;
    let request = UploadRequest::parse(&body)?;
    let ticket = service.request(&device, request, now_millis()).await?;
    Ok((
        StatusCode::CREATED,
        Json(ticket_json(&ticket.upload, &ticket.url, &ticket.headers)),
    ))
}

/// Checks an uploaded object and records its metadata.
#[utoipa::path(
    post,
    path = "/devices/{id}/uploads/{upload}/complete",
    tag = "uploads",
    params(
        ("id" = String, Path, description = "The device id"),
        ("upload" = String, Path, description = "The upload id"),
    ),
    responses(
        (status = 200, description = "The completed upload, with a download URL", body = UploadJson),
        (status = 400, description = "An invalid device id or an unknown parameter"),
        (status = 404, description = "No such upload of this device, or uploads are disabled"),
        (status = 409, description = "Nothing was uploaded yet, or the upload was rejected"),
        (status = 422, description = "The object fails a check (size, type, format, SHA-256)"),
    )
)]
pub async fn complete_upload(
    State(state): State<Arc<AppState>>,
    Path((id, upload)): Path<(String, String)>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Json<UploadJson>> {
    Params::new(params, &[])?;
    let device = device_id(id)?;
    let service = uploads_service(&state)?;
    let now = now_millis();
    let done = service.complete(&device, &upload, now).await?;
    Ok(Json(with_download(service, &done, now).await))
}

async fn with_download(
    service: &UploadService,
    u: &messina_storage::Upload,
    now: Millis,
) -> UploadJson {
    let mut v = upload_json(u);
    if let Some((url, expires)) = service.download_url(u, now).await {
        v.download_url = Some(url);
        v.download_expires_at = Some(rfc3339(expires));
    }
    v
}

/// The device's uploads, newest first.
#[utoipa::path(
    get,
    path = "/devices/{id}/uploads",
    tag = "uploads",
    params(("id" = String, Path, description = "The device id"), PageParams),
    responses(
        (status = 200, description = "A page of uploads", body = PageJson<UploadJson>),
        (status = 400, description = "An invalid parameter, named in `parameter`"),
    )
)]
pub async fn list_uploads(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Json<PageJson<UploadJson>>> {
    let p = Params::of::<PageParams>(params)?;
    let query = UploadQuery {
        device: device_id(id)?,
        page: p.page(&state)?,
    };
    Ok(Json(page_json(
        state.storage.uploads(&query).await?,
        upload_json,
    )))
}

/// One upload with its metadata and, once completed, a short-lived download URL.
///
/// The URL is valid `uploads.download_url_expiry_s`.
#[utoipa::path(
    get,
    path = "/uploads/{upload}",
    tag = "uploads",
    params(("upload" = String, Path, description = "The upload id")),
    responses(
        (status = 200, description = "The upload", body = UploadJson),
        (status = 400, description = "An unknown parameter"),
        (status = 404, description = "No such upload, or uploads are disabled"),
    )
)]
pub async fn one_upload(
    State(state): State<Arc<AppState>>,
    Path(upload): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Json<UploadJson>> {
    Params::new(params, &[])?;
    let service = uploads_service(&state)?;
    match state.storage.upload(&upload).await? {
        Some(u) => Ok(Json(with_download(service, &u, now_millis()).await)),
        None => Err(ApiError::not_found(format!("no upload `{upload}`"))),
    }
}
