//! The device registry over HTTP: `/v1/admin/devices` (admin keys) adds, imports, lists,
//! changes, rotates and revokes identities through [`provision`], the same code as
//! `messina devices`; `/v1/registry/devices` (read keys) lists and shows them. A generated
//! secret is in the answer that created it and nowhere else; no answer holds a hash.
//!
//! Revoking ends the identity's live MQTT connections at once (DISCONNECT 0x87) and forgets its
//! cached credentials; rotating forgets them too, so the old secret is refused from then on.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use messina_storage::{DeviceQuery, DeviceStatus, Role};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::Caller;
use super::{device_id, query_params, ApiError, ApiResult, AppState, PageParams, Params};
use crate::json::{device_json, page_json, DeviceJson, ImportJson, PageJson};
use crate::security::provision::{self, Changes, NewDevice, ProvisionError, Provisioned};

/// Most devices one import request may register (each costs a hash); send more in several.
pub const MAX_IMPORT: usize = 1_000;

/// The routes, to nest under `/v1`.
pub fn routes() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new()
        .routes(routes!(list, create))
        .routes(routes!(show, change))
        .routes(routes!(rotate))
        .routes(routes!(revoke))
        .routes(routes!(registry_list))
        .routes(routes!(registry_show))
}

impl From<ProvisionError> for ApiError {
    fn from(e: ProvisionError) -> Self {
        match e {
            ProvisionError::Exists(id) => ApiError {
                status: StatusCode::CONFLICT,
                title: "Device exists",
                detail: format!(
                    "device `{id}` is registered already; POST /v1/admin/devices/{id}/rotate \
                     for a new secret, or PATCH /v1/admin/devices/{id} to change its attributes"
                ),
                parameter: Some("id".into()),
            },
            ProvisionError::NotFound(id) => ApiError::not_found(format!(
                "device `{id}` is not registered; POST /v1/admin/devices adds it"
            )),
            ProvisionError::Invalid { field, message } => ApiError {
                status: StatusCode::BAD_REQUEST,
                title: "Invalid device",
                detail: format!("`{field}`: {message}"),
                parameter: Some(field),
            },
            ProvisionError::Storage(e) => e.into(),
        }
    }
}

/// A JSON body as `T`; a problem names the field at fault (`labels[0]`, `[2].role`).
fn body<T: DeserializeOwned>(headers: &HeaderMap, body: &Bytes, example: &str) -> ApiResult<T> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
        .unwrap_or_default();
    if !content_type.is_empty() && content_type != "application/json" {
        return Err(ApiError {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            title: "Unsupported media type",
            detail: format!("Content-Type `{content_type}`: send application/json"),
            parameter: None,
        });
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let mut field = match e.path().to_string() {
            p if p == "." => String::new(),
            p => p,
        };
        let message = e.inner().to_string();
        // serde names a missing or unknown field only in its message.
        for lead in ["missing field `", "unknown field `"] {
            if let Some(name) = message
                .strip_prefix(lead)
                .and_then(|rest| rest.split('`').next())
            {
                if !field.ends_with(name) {
                    field = if field.is_empty() {
                        name.to_string()
                    } else {
                        format!("{field}.{name}")
                    };
                }
            }
        }
        if field.is_empty() {
            field = "body".into();
        }
        ApiError {
            status: StatusCode::BAD_REQUEST,
            title: "Invalid body",
            detail: format!("`{field}`: {message}; send JSON like {example}"),
            parameter: Some(field),
        }
    })
}

/// A device as the admin API answers it after creating or rotating it: with its secret, once.
fn with_secret(p: &Provisioned) -> DeviceJson {
    let mut v = device_json(&p.device);
    v.secret = Some(p.secret.clone());
    v
}

/// What `POST /v1/admin/devices` takes: one device, or an array of them to import.
#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)] // Its schema documents the body `create` reads.
pub enum CreateBody {
    One(NewDevice),
    Many(Vec<NewDevice>),
}

/// What `POST /v1/admin/devices` answers: the device with its secret, or the import.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)] // Its schema documents the answers of `create`.
pub enum Created {
    One(Box<DeviceJson>),
    Many(ImportJson),
}

/// Devices by label, profile field, role and status.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // Read as documentation and as the names `Params` accepts.
pub struct RegistryFilterParams {
    /// Only devices with this label.
    label: Option<String>,
    /// Only devices whose profile field has this value: `key:value`, e.g. `pet_name:Rex`.
    profile: Option<String>,
    /// `device`, `fleet_manager` or `service`.
    role: Option<String>,
    /// `active` or `revoked`.
    status: Option<String>,
}

query_params! {
    /// The query of the registry: by label, profile field, role and status, and a page.
    pub struct RegistryParams = RegistryFilterParams, PageParams
}

/// Registers a device, or imports several.
///
/// The new device as one object, or an array of them to import (checked whole first: one bad
/// item registers none; ids registered already are left as they are and listed). A generated
/// secret is in this answer and nowhere else.
#[utoipa::path(
    post,
    path = "/admin/devices",
    tag = "registry",
    request_body(content = CreateBody),
    responses(
        (status = 201, description = "Registered: the device with its secret, or the import with each new device's", body = Created),
        (status = 200, description = "An import that registered none (every id exists)", body = ImportJson),
        (status = 400, description = "An invalid field, named in `parameter` (`[2].role`)"),
        (status = 409, description = "The device is registered already"),
        (status = 413, description = "More than 1000 devices in one import, or a body over `http.max_body_kib`"),
        (status = 415, description = "A body that is not `application/json`"),
    )
)]
async fn create(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
    bytes: Bytes,
) -> ApiResult<Response> {
    Params::new(params, &[])?;
    let example = r#"{"id": "btn-1", "labels": ["beta"], "profile": {"pet_name": "Rex"}}"#;
    let value: Value = body(&headers, &bytes, example)?;
    if value.is_array() {
        let items: Vec<NewDevice> = body(&headers, &bytes, &format!("[{example}]"))?;
        if items.len() > MAX_IMPORT {
            return Err(ApiError {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                title: "Too many devices",
                detail: format!(
                    "{} devices in one request; at most {MAX_IMPORT}, send the rest in another",
                    items.len()
                ),
                parameter: None,
            });
        }
        let imported = provision::import(&state.storage, &items).await?;
        tracing::info!(by = %caller, registered = imported.registered.len(), existing = imported.existing.len(), "devices imported");
        let status = if imported.registered.is_empty() {
            StatusCode::OK
        } else {
            StatusCode::CREATED
        };
        let existing: Vec<&str> = imported.existing.iter().map(|id| id.as_str()).collect();
        let items: Vec<DeviceJson> = imported.registered.iter().map(with_secret).collect();
        let existing = existing.into_iter().map(str::to_string).collect();
        return Ok((status, Json(ImportJson { existing, items })).into_response());
    }
    let new: NewDevice = body(&headers, &bytes, example)?;
    let added = provision::add(&state.storage, &new).await?;
    tracing::info!(by = %caller, device = %added.device.id, role = %added.device.role, "device registered");
    let mut response = (StatusCode::CREATED, Json(with_secret(&added))).into_response();
    if let Ok(location) = HeaderValue::from_str(&format!("/v1/admin/devices/{}", added.device.id)) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

/// Registered identities, filtered by `label`, `profile=key:value`, `role` and `status`.
#[utoipa::path(
    get,
    path = "/admin/devices",
    tag = "registry",
    params(RegistryParams),
    responses(
        (status = 200, description = "A page of identities", body = PageJson<DeviceJson>),
        (status = 400, description = "An invalid parameter, named in `parameter`"),
    )
)]
async fn list(
    state: State<Arc<AppState>>,
    params: Query<HashMap<String, String>>,
) -> ApiResult<Json<PageJson<DeviceJson>>> {
    registry_list(state, params).await
}

/// Registered identities, read-only (read keys): as `GET /v1/admin/devices`.
#[utoipa::path(
    get,
    path = "/registry/devices",
    tag = "registry",
    params(RegistryParams),
    responses(
        (status = 200, description = "A page of identities", body = PageJson<DeviceJson>),
        (status = 400, description = "An invalid parameter, named in `parameter`"),
    )
)]
async fn registry_list(
    State(state): State<Arc<AppState>>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Json<PageJson<DeviceJson>>> {
    let p = Params::of::<RegistryParams>(params)?;
    let profile = match p.get("profile") {
        None => None,
        Some(v) => match v.split_once(':') {
            Some((k, value)) if !k.is_empty() => {
                Some((k.to_string(), provision::parse_profile_value(value)))
            }
            _ => {
                return Err(ApiError::bad_parameter(
                    "profile",
                    format!("{v:?} is not `key:value`, e.g. `profile=pet_name:Rex`"),
                ))
            }
        },
    };
    let query = DeviceQuery {
        label: p.get("label").map(str::to_string),
        profile,
        role: p
            .get("role")
            .map(str::parse::<Role>)
            .transpose()
            .map_err(|e| ApiError::bad_parameter("role", e.to_string()))?,
        status: p
            .get("status")
            .map(str::parse::<DeviceStatus>)
            .transpose()
            .map_err(|e| ApiError::bad_parameter("status", e.to_string()))?,
        page: p.page(&state)?,
    };
    Ok(Json(page_json(
        state.storage.registered_devices(&query).await?,
        device_json,
    )))
}

/// One registered identity.
#[utoipa::path(
    get,
    path = "/admin/devices/{id}",
    tag = "registry",
    params(("id" = String, Path, description = "The device id")),
    responses(
        (status = 200, description = "The identity", body = DeviceJson),
        (status = 400, description = "An invalid device id or an unknown parameter"),
        (status = 404, description = "The device is not registered"),
    )
)]
async fn show(
    state: State<Arc<AppState>>,
    id: Path<String>,
    params: Query<HashMap<String, String>>,
) -> ApiResult<Json<DeviceJson>> {
    registry_show(state, id, params).await
}

/// One registered identity, read-only (read keys): as `GET /v1/admin/devices/{id}`.
#[utoipa::path(
    get,
    path = "/registry/devices/{id}",
    tag = "registry",
    params(("id" = String, Path, description = "The device id")),
    responses(
        (status = 200, description = "The identity", body = DeviceJson),
        (status = 400, description = "An invalid device id or an unknown parameter"),
        (status = 404, description = "The device is not registered"),
    )
)]
async fn registry_show(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Json<DeviceJson>> {
    Params::new(params, &[])?;
    let id = device_id(id)?;
    match state.storage.registered_device(&id).await? {
        Some(d) => Ok(Json(device_json(&d))),
        None => Err(ProvisionError::NotFound(id).into()),
    }
}

/// Changes attributes (`provision::Changes`: name, model, labels added and removed, profile
/// fields set or removed with `null`, photo).
#[utoipa::path(
    patch,
    path = "/admin/devices/{id}",
    tag = "registry",
    params(("id" = String, Path, description = "The device id")),
    request_body(content = Changes),
    responses(
        (status = 200, description = "The changed identity", body = DeviceJson),
        (status = 400, description = "An invalid field, named in `parameter`"),
        (status = 404, description = "The device is not registered"),
        (status = 413, description = "A body over `http.max_body_kib`"),
        (status = 415, description = "A body that is not `application/json`"),
    )
)]
async fn change(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    headers: HeaderMap,
    bytes: Bytes,
) -> ApiResult<Json<DeviceJson>> {
    let id = device_id(id)?;
    let changes: Changes = body(
        &headers,
        &bytes,
        r#"{"name": "Kitchen", "add_labels": ["beta"], "profile": {"age": 3, "old": null}}"#,
    )?;
    let device = provision::set(&state.storage, &id, &changes).await?;
    tracing::info!(by = %caller, device = %id, "device changed");
    Ok(Json(device_json(&device)))
}

/// A new secret, in this answer only; the old one is refused from now on, and the live MQTT
/// connections that authenticated with it end now (their sessions stay, for the device to
/// resume with the new secret; other nodes end theirs within `mqtt.registry_poll_secs`).
#[utoipa::path(
    post,
    path = "/admin/devices/{id}/rotate",
    tag = "registry",
    params(("id" = String, Path, description = "The device id")),
    responses(
        (status = 200, description = "The identity with its new `secret` and the connections ended (`disconnected`)", body = DeviceJson),
        (status = 400, description = "An invalid device id"),
        (status = 404, description = "The device is not registered"),
    )
)]
async fn rotate(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Json<DeviceJson>> {
    let id = device_id(id)?;
    let rotated = provision::rotate(&state.storage, &id).await?;
    state.access.devices.forget(&id);
    let disconnected = state
        .sessions
        .end_stale(id.as_str(), &rotated.device.credential);
    tracing::info!(by = %caller, device = %id, disconnected, "device secret rotated");
    let mut v = with_secret(&rotated);
    v.disconnected = Some(disconnected);
    Ok(Json(v))
}

/// Revokes an identity: new connections and requests are refused, and its live MQTT
/// connections end now.
#[utoipa::path(
    post,
    path = "/admin/devices/{id}/revoke",
    tag = "registry",
    params(("id" = String, Path, description = "The device id")),
    responses(
        (status = 200, description = "The revoked identity and the connections ended (`disconnected`)", body = DeviceJson),
        (status = 400, description = "An invalid device id"),
        (status = 404, description = "The device is not registered"),
    )
)]
async fn revoke(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Json<DeviceJson>> {
    let id = device_id(id)?;
    let device = provision::revoke(&state.storage, &id).await?;
    // Stored first, so a reconnect is refused; then nothing cached admits it, then its
    // connections are told to end.
    state.access.devices.forget(&id);
    let disconnected = state.sessions.revoke(id.as_str());
    tracing::info!(by = %caller, device = %id, disconnected, "device revoked");
    let mut v = device_json(&device);
    v.disconnected = Some(disconnected);
    Ok(Json(v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::tests::{basic, bearer, send, state_with, Answer, Setup};
    use axum::http::Method;
    use axum::Router;
    use messina_config::ApiRole;
    use serde_json::json;

    const READ: &str = "read-key-0123456789";
    const ADMIN: &str = "admin-key-0123456789";

    fn app(dir: &std::path::Path) -> Router {
        crate::http::app(state_with(
            dir,
            Setup {
                keys: &[(READ, ApiRole::Read), (ADMIN, ApiRole::Admin)],
                ingest: true,
                ..Setup::default()
            },
        ))
    }

    async fn admin(app: &Router, method: Method, uri: &str, body: Option<Value>) -> Answer {
        send(app, method, uri, Some(&bearer(ADMIN)), body).await
    }

    /// Posts a reading as the device itself.
    async fn ingest(app: &Router, id: &str, secret: &str) -> StatusCode {
        let reading = json!({"ts": crate::clock::now_millis(), "battery": 50});
        send(
            app,
            Method::POST,
            &format!("/v1/devices/{id}/telemetry"),
            Some(&basic(id, secret)),
            Some(reading),
        )
        .await
        .status
    }

    /// Asserts a 400 problem naming `field`.
    async fn check_invalid(app: &Router, method: Method, uri: &str, body: Value, field: &str) {
        let a = admin(app, method, uri, Some(body.clone())).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{body}: {}", a.body);
        assert_eq!(a.body["parameter"], field, "{body}: {}", a.body);
        assert!(
            a.body["detail"].as_str().unwrap().contains(field),
            "{}",
            a.body
        );
    }

    #[tokio::test]
    async fn an_added_device_posts_with_its_secret_until_rotated_or_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let app = app(dir.path());
        let a = admin(
            &app,
            Method::POST,
            "/v1/admin/devices",
            Some(json!({"id": "btn-1", "name": "Kitchen", "labels": ["beta"], "profile": {"pet_name": "Rex"}})),
        )
        .await;
        assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
        assert_eq!(a.headers[header::LOCATION], "/v1/admin/devices/btn-1");
        let secret = a.body["secret"].as_str().unwrap().to_string();
        assert_eq!(secret.len(), 43);
        assert_eq!(a.body["credential"], json!({"kind": "secret"}));
        assert_eq!(a.body["status"], "active");
        assert_eq!(ingest(&app, "btn-1", &secret).await, StatusCode::ACCEPTED);

        // Shown without the secret and without any hash, to admin and read keys alike.
        for (uri, key) in [
            ("/v1/admin/devices/btn-1", ADMIN),
            ("/v1/registry/devices/btn-1", READ),
        ] {
            let a = send(&app, Method::GET, uri, Some(&bearer(key)), None).await;
            assert_eq!(a.status, StatusCode::OK, "{uri}");
            assert_eq!(a.body["name"], "Kitchen");
            let text = a.body.to_string();
            assert!(
                !text.contains("argon2")
                    && !text.contains(&secret)
                    && a.body.get("secret").is_none(),
                "{text}"
            );
        }

        // Registered once.
        let a = admin(
            &app,
            Method::POST,
            "/v1/admin/devices",
            Some(json!({"id": "btn-1"})),
        )
        .await;
        assert_eq!(a.status, StatusCode::CONFLICT, "{}", a.body);
        assert_eq!(a.body["parameter"], "id");
        assert!(a.body["detail"].as_str().unwrap().contains("rotate"));

        // Rotation: the old secret is refused at once, the new one works.
        let a = admin(&app, Method::POST, "/v1/admin/devices/btn-1/rotate", None).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
        let rotated = a.body["secret"].as_str().unwrap().to_string();
        assert_ne!(rotated, secret);
        assert_eq!(
            ingest(&app, "btn-1", &secret).await,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(ingest(&app, "btn-1", &rotated).await, StatusCode::ACCEPTED);

        // Changes.
        let a = admin(
            &app,
            Method::PATCH,
            "/v1/admin/devices/btn-1",
            Some(json!({"add_labels": ["site-a"], "remove_labels": ["beta"], "profile": {"age": 3, "pet_name": null}})),
        )
        .await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
        assert_eq!(a.body["labels"], json!(["site-a"]));
        assert_eq!(a.body["profile"], json!({"age": 3}));

        // Revocation: refused from now on, and shown as revoked.
        let a = admin(&app, Method::POST, "/v1/admin/devices/btn-1/revoke", None).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
        assert_eq!(a.body["status"], "revoked");
        assert_eq!(a.body["disconnected"], 0, "no MQTT session in this test");
        assert_eq!(
            ingest(&app, "btn-1", &rotated).await,
            StatusCode::UNAUTHORIZED
        );

        // Unknown devices are 404 problems that say how to add one.
        for (method, uri) in [
            (Method::GET, "/v1/admin/devices/nobody"),
            (Method::POST, "/v1/admin/devices/nobody/rotate"),
            (Method::POST, "/v1/admin/devices/nobody/revoke"),
        ] {
            let a = admin(&app, method, uri, None).await;
            assert_eq!(a.status, StatusCode::NOT_FOUND, "{uri}");
            assert!(a.body["detail"]
                .as_str()
                .unwrap()
                .contains("POST /v1/admin/devices"));
        }
        let a = admin(
            &app,
            Method::PATCH,
            "/v1/admin/devices/nobody",
            Some(json!({})),
        )
        .await;
        assert_eq!(a.status, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn invalid_devices_and_changes_are_400_problems_naming_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let app = app(dir.path());
        let add = "/v1/admin/devices";
        for (body, field) in [
            (json!({"id": "bad id"}), "id"),
            (json!({"name": "no id"}), "id"),
            (json!({"id": "d1", "role": "robot"}), "role"),
            (json!({"id": "d1", "labels": [1]}), "labels[0]"),
            (json!({"id": "d1", "labels": ["a,b"]}), "labels"),
            (json!({"id": "d1", "profile": {"x": [1]}}), "profile.x"),
            (json!({"id": "d1", "colour": "red"}), "colour"),
            (
                json!({"id": "d1", "certificate_sha256": "abc"}),
                "certificate_sha256",
            ),
            (json!([{"id": "d1"}, {"id": "d1"}]), "item 2"),
            (json!([{"id": "d1"}, {"id": 2}]), "[1].id"),
        ] {
            check_invalid(&app, Method::POST, add, body, field).await;
        }
        admin(&app, Method::POST, add, Some(json!({"id": "d1"}))).await;
        check_invalid(
            &app,
            Method::PATCH,
            "/v1/admin/devices/d1",
            json!({"nam": "x"}),
            "nam",
        )
        .await;
        check_invalid(
            &app,
            Method::PATCH,
            "/v1/admin/devices/d1",
            json!({"add_labels": "beta"}),
            "add_labels",
        )
        .await;
        // Nothing of a refused import was registered.
        let a = admin(&app, Method::GET, "/v1/admin/devices", None).await;
        assert_eq!(a.body["items"].as_array().unwrap().len(), 1, "{}", a.body);
    }

    #[tokio::test]
    async fn the_registry_is_listed_and_filtered_by_label_profile_role_and_status() {
        let dir = tempfile::tempdir().unwrap();
        let app = app(dir.path());
        let fleet = json!([
            {"id": "btn-1", "labels": ["beta", "site-a"], "profile": {"pet_name": "Rex", "age": 3}},
            {"id": "btn-2", "labels": ["site-a"], "profile": {"pet_name": "Fido", "age": 5}},
            {"id": "btn-3", "labels": ["beta"], "profile": {"pet_name": "Rex"}},
            {"id": "mgr-1", "role": "fleet_manager"},
        ]);
        let a = admin(&app, Method::POST, "/v1/admin/devices", Some(fleet.clone())).await;
        assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
        let items = a.body["items"].as_array().unwrap();
        assert_eq!(items.len(), 4);
        assert!(items
            .iter()
            .all(|d| d["secret"].as_str().unwrap().len() == 43));
        // Importing again registers nothing and says what was there already.
        let a = admin(&app, Method::POST, "/v1/admin/devices", Some(fleet)).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
        assert_eq!(a.body["items"], json!([]));
        assert_eq!(a.body["existing"].as_array().unwrap().len(), 4);
        admin(&app, Method::POST, "/v1/admin/devices/btn-2/revoke", None).await;

        let ids = |query: &'static str| {
            let app = app.clone();
            async move {
                let uri = format!("/v1/registry/devices{query}");
                let a = send(&app, Method::GET, &uri, Some(&bearer(READ)), None).await;
                assert_eq!(a.status, StatusCode::OK, "{uri}: {}", a.body);
                let mut ids: Vec<String> = a.body["items"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d["id"].as_str().unwrap().to_string())
                    .collect();
                ids.sort();
                ids
            }
        };
        assert_eq!(ids("").await, ["btn-1", "btn-2", "btn-3", "mgr-1"]);
        assert_eq!(ids("?label=beta").await, ["btn-1", "btn-3"]);
        assert_eq!(ids("?profile=pet_name:Rex").await, ["btn-1", "btn-3"]);
        assert_eq!(ids("?profile=age:3").await, ["btn-1"]);
        assert_eq!(ids("?label=site-a&profile=pet_name:Rex").await, ["btn-1"]);
        assert_eq!(ids("?role=fleet_manager").await, ["mgr-1"]);
        assert_eq!(ids("?status=revoked").await, ["btn-2"]);
        assert_eq!(ids("?label=nothing").await, Vec::<String>::new());

        // Paged like the other lists.
        let mut seen = Vec::new();
        let mut uri = "/v1/admin/devices?limit=1".to_string();
        loop {
            let a = admin(&app, Method::GET, &uri, None).await;
            let page = a.body["items"].as_array().unwrap();
            assert!(page.len() <= 1);
            seen.extend(page.iter().map(|d| d["id"].as_str().unwrap().to_string()));
            match a.body["next_cursor"].as_str() {
                Some(c) => uri = format!("/v1/admin/devices?limit=1&cursor={c}"),
                None => break,
            }
        }
        seen.sort();
        assert_eq!(seen, ["btn-1", "btn-2", "btn-3", "mgr-1"]);

        for (query, parameter) in [
            ("?profile=pet_name", "profile"),
            ("?role=robot", "role"),
            ("?status=gone", "status"),
            ("?labels=beta", "labels"),
        ] {
            let uri = format!("/v1/registry/devices{query}");
            let a = send(&app, Method::GET, &uri, Some(&bearer(READ)), None).await;
            assert_eq!(a.status, StatusCode::BAD_REQUEST, "{uri}");
            assert_eq!(a.body["parameter"], parameter, "{uri}: {}", a.body);
        }
    }

    #[tokio::test]
    async fn cors_headers_only_for_configured_origins() {
        let dir = tempfile::tempdir().unwrap();
        let preflight = |app: Router, origin: &'static str| async move {
            use tower::ServiceExt;
            let req = axum::http::Request::builder()
                .method(Method::OPTIONS)
                .uri("/v1/devices")
                .header(header::ORIGIN, origin)
                .header(header::ACCESS_CONTROL_REQUEST_METHOD, "GET")
                .header(header::ACCESS_CONTROL_REQUEST_HEADERS, "authorization")
                .body(axum::body::Body::empty())
                .unwrap();
            app.oneshot(req).await.unwrap()
        };
        let with = crate::http::app(state_with(
            &dir.path().join("with"),
            Setup {
                keys: &[(READ, ApiRole::Read)],
                cors_origins: &["https://console.example.com"],
                ..Setup::default()
            },
        ));
        let r = preflight(with.clone(), "https://console.example.com").await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            r.headers()[header::ACCESS_CONTROL_ALLOW_ORIGIN],
            "https://console.example.com"
        );
        assert!(r.headers()[header::ACCESS_CONTROL_ALLOW_HEADERS]
            .to_str()
            .unwrap()
            .contains("authorization"));
        let r = preflight(with.clone(), "https://evil.example.com").await;
        assert!(!r
            .headers()
            .contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN));
        // A refusal carries the header too, so the page can read why.
        let req = axum::http::Request::get("/v1/devices")
            .header(header::ORIGIN, "https://console.example.com")
            .body(axum::body::Body::empty())
            .unwrap();
        let r = tower::ServiceExt::oneshot(with, req).await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert!(r
            .headers()
            .contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN));

        let without = crate::http::app(state_with(&dir.path().join("without"), Setup::default()));
        let r = preflight(without, "https://console.example.com").await;
        assert!(!r
            .headers()
            .contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN));
    }
}
