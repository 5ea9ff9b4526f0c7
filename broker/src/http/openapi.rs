//! The OpenAPI 3.1 document of the HTTP API (`GET /openapi.json`), made from the same route
//! registrations that build the router ([`super::v1_routes`], [`health::guarded_routes`],
//! [`health::open_routes`]): each handler's `#[utoipa::path]` says its method, path,
//! parameters, body and answers, and the shapes are the types the handlers return.
//!
//! What every route shares is added here, from the code that does it, rather than repeated on
//! each handler: the credentials and role each guarded route needs (from [`auth::need`]), the
//! refusals of `auth` (401, 403, 429) and of the limits around the port (503), and the problem
//! body of every error.

use axum::http::Method;
use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{Content, OpenApi, Ref, Response};
use utoipa::{Modify, OpenApi as _};
use utoipa_axum::router::OpenApiRouter;

use super::{auth, health};
use crate::json::Problem;

/// The security scheme of API keys (`Authorization: Bearer <key>`).
pub const API_KEY: &str = "api_key";
/// A device's own id and secret as HTTP Basic (`Authorization: Basic base64(id:secret)`).
pub const DEVICE_BASIC: &str = "device_basic";
/// A device's own id and secret as a bearer token (`Authorization: Bearer <id>:<secret>`).
pub const DEVICE_BEARER: &str = "device_bearer";
/// A device's client certificate, over HTTPS with mutual TLS.
pub const DEVICE_CERTIFICATE: &str = "device_certificate";

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "Messina HTTP API",
        description = "Queries of device data, alerts and uploads, device data over HTTP, and \
            the device registry. Times are RFC 3339 UTC; listings are pages with an opaque \
            `next_cursor`; unknown query parameters are errors; every error is \
            `application/problem+json`. When API keys are configured (`http.api_keys`), the \
            routes under `/v1` and `/metrics` need one with the role each states; a device may \
            use its own credentials on its own ingest and upload routes. Without any API key \
            (allowed on a loopback listener, or with `http.open = true`) nothing is checked.",
    ),
    tags(
        (name = "devices", description = "Latest state, telemetry, events, dead letters, the fleet"),
        (name = "ingest", description = "Device data over HTTP, for devices without MQTT"),
        (name = "alerts", description = "Alerts, acknowledgements, failing devices, anomalies"),
        (name = "uploads", description = "Presigned upload URLs and uploaded objects"),
        (name = "registry", description = "Device identities: `/v1/admin` (admin keys) and read-only `/v1/registry`"),
        (name = "operations", description = "Health, readiness, metrics and this document"),
    ),
    components(schemas(Problem)),
    modifiers(&SecuritySchemes),
)]
struct ApiDoc;

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let http = |scheme, description: &str| {
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(scheme)
                    .description(Some(description))
                    .build(),
            )
        };
        components.add_security_scheme(
            API_KEY,
            http(HttpAuthScheme::Bearer, "An API key from `http.api_keys`"),
        );
        components.add_security_scheme(
            DEVICE_BASIC,
            http(
                HttpAuthScheme::Basic,
                "A registered device's id (user name) and secret (password)",
            ),
        );
        components.add_security_scheme(
            DEVICE_BEARER,
            http(
                HttpAuthScheme::Bearer,
                "A registered device's `<id>:<secret>` as the token",
            ),
        );
        components.add_security_scheme(
            DEVICE_CERTIFICATE,
            SecurityScheme::MutualTls {
                description: Some(
                    "A registered device's client certificate (HTTPS with `http.tls_client_ca`)"
                        .into(),
                ),
                extensions: None,
            },
        );
    }
}

/// The whole document: every route the router serves, and nothing else.
pub fn document() -> OpenApi {
    let mut guarded = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .nest("/v1", super::v1_routes())
        .merge(health::guarded_routes())
        .into_openapi();
    for (path, method, operation) in operations(&mut guarded) {
        guard(&method, &path, operation);
    }
    guarded.merge(super::open_routes().into_openapi());
    for (_, _, operation) in operations(&mut guarded) {
        problems(operation);
    }
    guarded
}

/// Every operation of `api`, with its path and method.
fn operations(api: &mut OpenApi) -> Vec<(String, Method, &mut Operation)> {
    let mut all = Vec::new();
    for (path, item) in api.paths.paths.iter_mut() {
        for (method, operation) in [
            (Method::GET, &mut item.get),
            (Method::PUT, &mut item.put),
            (Method::POST, &mut item.post),
            (Method::DELETE, &mut item.delete),
            (Method::OPTIONS, &mut item.options),
            (Method::HEAD, &mut item.head),
            (Method::PATCH, &mut item.patch),
            (Method::TRACE, &mut item.trace),
        ] {
            if let Some(operation) = operation.as_mut() {
                all.push((path.clone(), method, operation));
            }
        }
    }
    all
}

/// What `auth::authorize` asks of a guarded route, and how it refuses.
fn guard(method: &Method, path: &str, operation: &mut Operation) {
    let need = auth::need(method, path);
    let mut schemes = vec![API_KEY];
    if need.device {
        schemes.extend([DEVICE_BASIC, DEVICE_BEARER, DEVICE_CERTIFICATE]);
    }
    operation.security = Some(
        schemes
            .iter()
            .map(|s| SecurityRequirement::new(*s, Vec::<String>::new()))
            .collect(),
    );
    let who = if need.device {
        format!(
            "an API key with role `{}` or higher, or the device's own credentials",
            need.role
        )
    } else {
        format!("an API key with role `{}` or higher", need.role)
    };
    let line = format!("Needs {who} (unless the API is open).");
    operation.description = Some(match operation.description.take() {
        Some(d) if !d.is_empty() => format!("{d}\n\n{line}"),
        _ => line,
    });
    let responses = &mut operation.responses.responses;
    for (status, description) in [
        ("401", "No credentials, or unknown ones"),
        (
            "403",
            "Credentials without the role or device this route needs",
        ),
        (
            "429",
            "The caller is over its request rate; see `Retry-After`",
        ),
    ] {
        responses
            .entry(status.to_string())
            .or_insert_with(|| Response::new(description).into());
    }
    if path.starts_with("/v1/") {
        responses
            .entry("500".to_string())
            .or_insert_with(|| Response::new("Storage failed; see the server log").into());
    }
}

/// The answers every route may give, and the problem body of every error without a body of
/// its own.
fn problems(operation: &mut Operation) {
    let responses = &mut operation.responses.responses;
    responses.entry("503".to_string()).or_insert_with(|| {
        Response::new(
            "Over `http.max_concurrent_requests` or `http.request_timeout_ms`, or storage is \
             unavailable; see `Retry-After`",
        )
        .into()
    });
    for (status, response) in responses.iter_mut() {
        let error = status.starts_with('4') || status.starts_with('5');
        if let (true, utoipa::openapi::RefOr::T(response)) = (error, response) {
            if response.content.is_empty() {
                response.content.insert(
                    "application/problem+json".to_string(),
                    Content::new(Some(Ref::from_schema_name("Problem"))),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::tests::{bearer, send, state_with, Setup};
    use axum::http::StatusCode;
    use messina_config::ApiRole;
    use serde_json::Value;

    const ADMIN: &str = "admin-key-0123456789";

    /// Every (path, method) the document describes.
    fn documented() -> Vec<(String, Method)> {
        operations(&mut document())
            .into_iter()
            .map(|(path, method, _)| (path, method))
            .collect()
    }

    /// A path template with each `{param}` filled in, as a client would send it.
    fn concrete(template: &str) -> String {
        template.replace("{id}", "d1").replace("{upload}", "u1")
    }

    /// A validator of answers against the schema `schema` of `doc` (its `$ref`s resolve in
    /// the document's components).
    fn validator(doc: &Value, schema: &Value) -> jsonschema::Validator {
        let mut root = schema.clone();
        root["$schema"] = "https://json-schema.org/draft/2020-12/schema".into();
        root["components"] = doc["components"].clone();
        jsonschema::draft202012::new(&root).unwrap_or_else(|e| panic!("{schema}: {e}"))
    }

    /// Some data of device `d1`, so the listings answer items.
    async fn some_data(storage: &dyn messina_storage::Storage) {
        use messina_storage::{AttrValue, Batch, DeadLetter, DeviceId, Event, Reading};
        let now = crate::clock::now_millis();
        let d1 = DeviceId::new("d1").unwrap();
        let attrs = std::collections::BTreeMap::from([
            ("fw".to_string(), AttrValue::Text("1.2".into())),
            ("n".to_string(), AttrValue::Int(3)),
        ]);
        let batch = Batch {
            readings: vec![Reading {
                device: d1.clone(),
                ts: now,
                seq: 1,
                received_at: now,
                battery: Some(15.0),
                rssi: Some(-60),
                online: Some(true),
                metrics: [("temp_c".to_string(), 21.5)].into(),
                attrs: attrs.clone(),
            }],
            events: vec![Event {
                device: d1.clone(),
                ts: now,
                seq: 1,
                received_at: now,
                kind: "boot".into(),
                attrs,
            }],
            dead_letters: vec![DeadLetter {
                id: 1,
                received_at: now,
                topic: "devices/d1/telemetry".into(),
                device: Some(d1),
                payload: vec![0xc1],
                reason: "not MessagePack".into(),
            }],
        };
        storage.write_batch(&batch).await.unwrap();
    }

    #[tokio::test]
    async fn every_documented_route_is_served_with_exactly_its_documented_methods() {
        let dir = tempfile::tempdir().unwrap();
        let state = state_with(
            dir.path(),
            Setup {
                keys: &[(ADMIN, ApiRole::Admin)],
                ingest: true,
                ..Setup::default()
            },
        );
        some_data(state.storage.as_ref()).await;
        let app = crate::http::app(state);
        let doc = serde_json::to_value(document()).unwrap();
        let documented = documented();
        assert!(documented.len() >= 28, "{documented:?}");
        let key = bearer(ADMIN);
        let mut validated = 0;
        let mut plain = Vec::new();
        for (template, method) in &documented {
            let uri = concrete(template);
            let a = send(&app, method.clone(), &uri, Some(&key), None).await;
            let fallback = a.status == StatusCode::NOT_FOUND
                && a.body["detail"]
                    .as_str()
                    .is_some_and(|d| d.starts_with("no such endpoint"));
            assert!(
                !fallback && a.status != StatusCode::METHOD_NOT_ALLOWED,
                "{method} {template} is documented but not served: {} {}",
                a.status,
                a.body
            );
            // The answer is one the document lists, in the shape it gives.
            let what = format!("{method} {template} answered {}", a.status);
            let response = &doc["paths"][template][method.as_str().to_lowercase()]["responses"]
                [a.status.as_str()];
            assert!(response.is_object(), "{what}, undocumented: {}", a.body);
            let content_type = a.headers[axum::http::header::CONTENT_TYPE]
                .to_str()
                .unwrap();
            let media = content_type.split(';').next().unwrap();
            assert!(
                response["content"]
                    .as_object()
                    .unwrap()
                    .keys()
                    .any(|k| k.split(';').next() == Some(media)),
                "{what} as {content_type}, not as documented: {}",
                response["content"]
            );
            if !media.ends_with("json") {
                plain.push(template.as_str());
            }
            for (media, content) in response["content"].as_object().unwrap() {
                if media.ends_with("json") && *template != "/openapi.json" {
                    let errors: Vec<String> = validator(&doc, &content["schema"])
                        .iter_errors(&a.body)
                        .map(|e| format!("{}: {e}", e.instance_path))
                        .collect();
                    assert!(errors.is_empty(), "{what}: {errors:?} in {}", a.body);
                    validated += 1;
                }
            }
        }
        // Every answer but the document itself and these was checked against its schema.
        plain.sort();
        assert_eq!(
            plain,
            [
                "/",
                "/dashboard/app.css",
                "/dashboard/app.js",
                "/healthz",
                "/metrics",
                "/readyz",
                "/v1/ingest/stream"
            ]
        );
        assert_eq!(validated, documented.len() - plain.len() - 1);
        // A method the document does not list for a path is one the router does not serve, so
        // the document holds every method of every path.
        let paths: std::collections::BTreeSet<&str> =
            documented.iter().map(|(p, _)| p.as_str()).collect();
        for template in paths {
            for method in [
                Method::GET,
                Method::POST,
                Method::PUT,
                Method::PATCH,
                Method::DELETE,
            ] {
                if documented.contains(&(template.to_string(), method.clone())) {
                    continue;
                }
                // axum's own 405 has no body, so not through `send`, which expects a problem.
                let request = axum::http::Request::builder()
                    .method(method.clone())
                    .uri(concrete(template))
                    .header(axum::http::header::AUTHORIZATION, &key)
                    .body(axum::body::Body::empty())
                    .unwrap();
                let status = tower::ServiceExt::oneshot(app.clone(), request)
                    .await
                    .unwrap()
                    .status();
                assert_eq!(
                    status,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{method} {template} is served but not documented"
                );
            }
        }
    }

    /// The router is built only from the documented registrations (`routes!` in each resource's
    /// `routes()`): no file of the HTTP API registers a route any other way, so no route can be
    /// served without being in the document.
    #[test]
    fn routes_are_registered_only_with_their_documentation() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/http");
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "rs"))
            .collect();
        files.sort();
        assert!(files.len() >= 8, "{files:?}");
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            // Tests build routers of their own.
            let code = text.split("#[cfg(test)]").next().unwrap();
            for undocumented in [
                ".route(",
                ".route_service(",
                ".nest_service(",
                "axum::routing",
            ] {
                assert!(
                    !code.contains(undocumented),
                    "{}: `{undocumented}` adds a route the OpenAPI document does not know; \
                     register the handler with `.routes(routes!(handler))` instead",
                    file.display()
                );
            }
        }
    }

    #[tokio::test]
    async fn the_document_is_served_without_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let app = crate::http::app(state_with(
            dir.path(),
            Setup {
                keys: &[(ADMIN, ApiRole::Admin)],
                ..Setup::default()
            },
        ));
        let a = send(&app, Method::GET, "/openapi.json", None, None).await;
        assert_eq!(a.status, StatusCode::OK);
        assert_eq!(
            a.headers[axum::http::header::CONTENT_TYPE],
            "application/json"
        );
        assert_eq!(a.body["openapi"], "3.1.0");
        assert_eq!(
            a.body,
            serde_json::to_value(document()).unwrap(),
            "the served document is the one the code makes"
        );
    }

    /// Every `$ref` in `value`, with where it is.
    fn refs(value: &Value, at: &str, out: &mut Vec<(String, String)>) {
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("$ref", Value::String(r)) => out.push((at.to_string(), r.clone())),
                        _ => refs(v, &format!("{at}/{k}"), out),
                    }
                }
            }
            Value::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    refs(v, &format!("{at}/{i}"), out);
                }
            }
            _ => {}
        }
    }

    #[test]
    fn the_document_is_valid_openapi_3_1_whose_references_all_resolve() {
        let text = document().to_pretty_json().unwrap();
        let spec = oas3::from_json(&text).expect("an OpenAPI 3.1 document oas3 reads");
        let version = spec.validate_version().expect("a version oas3 supports");
        assert_eq!((version.major, version.minor), (3, 1));

        // Every reference, wherever it is, points at something in the document.
        let value: Value = serde_json::from_str(&text).unwrap();
        let mut all = Vec::new();
        refs(&value, "", &mut all);
        assert!(all.len() > 20, "{all:?}");
        for (at, r) in &all {
            let pointer = r
                .strip_prefix('#')
                .unwrap_or_else(|| panic!("{at}: `{r}` is not local"));
            assert!(
                value.pointer(pointer).is_some(),
                "{at}: `{r}` resolves to nothing"
            );
        }

        let schemes = &value["components"]["securitySchemes"];
        let mut ids = std::collections::BTreeSet::new();
        let operations: Vec<_> = spec.operations().collect();
        assert!(operations.len() >= 28);
        for (path, method, op) in operations {
            let what = format!("{method} {path}");
            // oas3 resolves the references of what a client reads first.
            let parameters = op
                .parameters(&spec)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            op.request_body(&spec)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            let responses = op.responses.as_ref().expect("responses");
            for (status, response) in responses {
                let response = response
                    .resolve(&spec)
                    .unwrap_or_else(|e| panic!("{what} {status}: {e}"));
                for (media, content) in &response.content {
                    content
                        .schema(&spec)
                        .unwrap_or_else(|e| panic!("{what} {status} {media}: {e}"));
                }
            }
            // Each `{param}` of the path is a declared path parameter, and only those.
            let in_template: std::collections::BTreeSet<String> = path
                .split('/')
                .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
                .map(str::to_string)
                .collect();
            let declared: std::collections::BTreeSet<String> = parameters
                .iter()
                .filter(|p| p.location == oas3::spec::ParameterIn::Path)
                .map(|p| p.name.clone())
                .collect();
            assert_eq!(in_template, declared, "{what}");
            // A success, a tag, a unique id, and schemes that exist.
            assert!(
                responses.keys().any(|s| s.starts_with('2')),
                "{what} has no success"
            );
            assert!(!op.tags.is_empty(), "{what} has no tag");
            let id = op.operation_id.clone().expect("operationId");
            assert!(ids.insert(id.clone()), "{what}: operationId `{id}` twice");
            for requirement in &op.security {
                for scheme in requirement.0.keys() {
                    assert!(
                        schemes.get(scheme).is_some(),
                        "{what}: no scheme `{scheme}`"
                    );
                }
            }
            // Guarded routes say what they need; open ones need nothing.
            let open = [
                "/healthz",
                "/readyz",
                "/openapi.json",
                "/",
                "/dashboard/app.js",
                "/dashboard/app.css",
            ]
            .contains(&path.as_str());
            assert_eq!(op.security.is_empty(), open, "{what}");
            for error in responses.keys().filter(|s| !s.starts_with('2')) {
                let r = &value["paths"][&path][method.as_str().to_lowercase()]["responses"][error];
                assert!(r["content"].is_object(), "{what} {error} has no body");
            }
        }
    }

    #[test]
    fn every_schema_is_valid_json_schema_2020_12() {
        let doc = serde_json::to_value(document()).unwrap();
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        assert!(schemas.len() > 20);
        for (name, schema) in schemas {
            jsonschema::draft202012::meta::validate(schema)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            validator(&doc, schema);
        }
        // The validators do refuse what a schema does not allow.
        let alert = validator(
            &doc,
            &serde_json::json!({"$ref": "#/components/schemas/AlertJson"}),
        );
        assert!(!alert.is_valid(&serde_json::json!({"id": "a", "state": "raised"})));
    }

    #[test]
    fn security_follows_what_auth_requires() {
        let doc = serde_json::to_value(document()).unwrap();
        let security = |path: &str, method: &str| doc["paths"][path][method]["security"].clone();
        let api_key_only = serde_json::json!([{ "api_key": [] }]);
        assert_eq!(security("/v1/devices/{id}", "get"), api_key_only);
        assert_eq!(security("/v1/admin/devices", "post"), api_key_only);
        assert_eq!(security("/metrics", "get"), api_key_only);
        assert_eq!(
            security("/v1/devices/{id}/telemetry", "post"),
            serde_json::json!([
                {"api_key": []}, {"device_basic": []}, {"device_bearer": []},
                {"device_certificate": []},
            ])
        );
        assert!(security("/healthz", "get").is_null());
        let description = doc["paths"]["/v1/admin/devices"]["post"]["description"]
            .as_str()
            .unwrap();
        assert!(description.contains("role `admin`"), "{description}");
    }
}
