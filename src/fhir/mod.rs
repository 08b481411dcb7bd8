//! The FHIR R4 (4.0.1) REST edge at `/fhir`: JSON only, every rejection an
//! OperationOutcome. Resources are validated against the core
//! StructureDefinitions ([`validate`]) and stored as submitted, with the
//! server's `id` and `meta` ([`rest`]); search parameters come from one
//! table ([`search`]), which also feeds the CapabilityStatement
//! ([`capability`]). No workflow rules live here.

mod binary;
mod bundle;
mod capability;
pub mod definitions;
mod extensions;
mod invariants;
pub(crate) mod json;
mod operations;
pub use operations::OPERATIONS;
pub mod outcome;
pub mod profiles;
pub mod records;
pub(crate) mod rest;
pub mod search;
mod subset;
pub mod validate;

use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::app::App;
use crate::audit::{Actor, AuditRecord, Entity, Kind, Outcome};
use crate::auth::{authorize, Action, CallerError, Denied, Permission};
use crate::metrics::label;
use crate::store::MetaError;
use outcome::Issue;

pub use rest::SUPPORTED;

/// FHIR JSON.
pub const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";

/// Whether this server serves `resource_type`.
pub fn served(resource_type: &str) -> bool {
    rest::SUPPORTED.contains(&resource_type)
}

/// The routes under `/fhir`.
pub fn routes(app: &Arc<App>) -> Router<Arc<App>> {
    // Bodies are read by `rest::collect`, which applies
    // `fhir.max_resource_bytes` and answers 413 with an OperationOutcome;
    // raw Binary uploads stream without a cap.
    Router::new()
        .route("/fhir/metadata", get(capability::metadata))
        .route("/fhir", post(bundle::transaction_or_batch))
        // Clients that keep the base with a trailing slash post there.
        .route("/fhir/", post(bundle::transaction_or_batch))
        .route("/fhir/_history", get(rest::history_system))
        .route(
            "/fhir/{type}",
            get(rest::search_get)
                .post(rest::create)
                .put(rest::conditional_update)
                .delete(rest::conditional_delete),
        )
        .route("/fhir/{type}/_search", post(rest::search_post))
        .route("/fhir/{type}/$validate", post(rest::validate_operation))
        .route("/fhir/{type}/_history", get(rest::history_type))
        .route(
            "/fhir/{type}/{id}",
            get(rest::read)
                .put(rest::update)
                .patch(rest::patch)
                .delete(rest::delete),
        )
        .route("/fhir/{type}/{id}/_history", get(rest::history_instance))
        .route(
            "/fhir/{type}/{id}/{operation}",
            post(operations::instance_operation),
        )
        .route("/fhir/{type}/{id}/_history/{version}", get(rest::vread))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(Arc::clone(app), gate))
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(app),
            count_request,
        ))
}

/// A FHIR interaction, from the request's method and route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Interaction {
    Capabilities,
    TransactionOrBatch,
    HistorySystem,
    SearchType,
    Create,
    ConditionalUpdate,
    ConditionalDelete,
    HistoryType,
    Read,
    Update,
    Patch,
    Delete,
    HistoryInstance,
    Vread,
    /// `$validate` and instance operations: authorised where they run.
    Other,
}

impl Interaction {
    fn of(method: &str, route: &str) -> Interaction {
        match (method, route) {
            (_, "/fhir/metadata") => Interaction::Capabilities,
            ("POST", "/fhir" | "/fhir/") => Interaction::TransactionOrBatch,
            (_, "/fhir/_history") => Interaction::HistorySystem,
            ("GET", "/fhir/{type}") | ("POST", "/fhir/{type}/_search") => Interaction::SearchType,
            ("POST", "/fhir/{type}") => Interaction::Create,
            ("PUT", "/fhir/{type}") => Interaction::ConditionalUpdate,
            ("DELETE", "/fhir/{type}") => Interaction::ConditionalDelete,
            (_, "/fhir/{type}/_history") => Interaction::HistoryType,
            ("GET", "/fhir/{type}/{id}") => Interaction::Read,
            ("PUT", "/fhir/{type}/{id}") => Interaction::Update,
            ("PATCH", "/fhir/{type}/{id}") => Interaction::Patch,
            ("DELETE", "/fhir/{type}/{id}") => Interaction::Delete,
            (_, "/fhir/{type}/{id}/_history") => Interaction::HistoryInstance,
            (_, "/fhir/{type}/{id}/_history/{version}") => Interaction::Vread,
            _ => Interaction::Other,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Interaction::Capabilities => "capabilities",
            Interaction::TransactionOrBatch => "transaction-or-batch",
            Interaction::HistorySystem => "history-system",
            Interaction::SearchType => "search-type",
            Interaction::Create => "create",
            Interaction::ConditionalUpdate => "conditional-update",
            Interaction::ConditionalDelete => "conditional-delete",
            Interaction::HistoryType => "history-type",
            Interaction::Read => "read",
            Interaction::Update => "update",
            Interaction::Patch => "patch",
            Interaction::Delete => "delete",
            Interaction::HistoryInstance => "history-instance",
            Interaction::Vread => "vread",
            Interaction::Other => "other",
        }
    }

    /// The SMART permission the interaction needs on its type; `None` where
    /// the check happens per entry (transactions) or per operation.
    fn permission(self) -> Option<Permission> {
        match self {
            Interaction::SearchType | Interaction::HistoryType | Interaction::HistorySystem => {
                Some(Permission::Search)
            }
            Interaction::Create => Some(Permission::Create),
            Interaction::ConditionalUpdate | Interaction::Update | Interaction::Patch => {
                Some(Permission::Update)
            }
            Interaction::ConditionalDelete | Interaction::Delete => Some(Permission::Delete),
            Interaction::Read | Interaction::HistoryInstance | Interaction::Vread => {
                Some(Permission::Read)
            }
            Interaction::Capabilities | Interaction::TransactionOrBatch | Interaction::Other => {
                None
            }
        }
    }
}

/// The resource type a request's path names (`/fhir/{type}/…`).
fn path_type(request: &Request) -> Option<String> {
    request
        .uri()
        .path()
        .strip_prefix("/fhir/")
        .and_then(|rest| rest.split('/').next())
        .filter(|t| !t.is_empty() && !t.starts_with('_') && !t.starts_with('$'))
        .map(str::to_owned)
}

/// Authenticate every FHIR request but `metadata`, and authorise the
/// interaction on its type (transactions and operations are authorised
/// where they run, per entry and per operation).
async fn gate(
    State(app): State<Arc<App>>,
    matched: Option<MatchedPath>,
    mut request: Request,
    next: Next,
) -> Response {
    let route = matched.as_ref().map_or("", |m| m.as_str());
    let interaction = Interaction::of(request.method().as_str(), route);
    if interaction == Interaction::Capabilities {
        return next.run(request).await;
    }
    let caller = match crate::auth::authenticate(
        &app,
        request.headers(),
        request.extensions(),
        request.uri(),
    )
    .await
    {
        Ok(caller) => caller,
        Err(crate::auth::GateError::Caller(e)) => return unauthenticated(&e),
        Err(crate::auth::GateError::Store(e)) => return FhirError::from(e).into_response(),
    };
    let resource_type = match interaction {
        Interaction::HistorySystem => None,
        _ => path_type(&request),
    };
    // Writes to what only the server writes (the audit trail) are 405 for
    // everyone, from the handler: the method is wrong, whoever asks.
    let server_written = resource_type.as_deref().is_some_and(rest::read_only);
    if let Some(permission) = interaction
        .permission()
        .filter(|p| !server_written || matches!(p, Permission::Read | Permission::Search))
    {
        if let Err(denied) = authorize(&caller, Action::Fhir(permission, resource_type.as_deref()))
        {
            let response = forbidden(denied).into_response();
            if let Some(record) = read_audit(interaction, request.uri(), caller, response.status())
            {
                app.auditor.record(record).await;
            }
            return response;
        }
    }
    let uri = request.uri().clone();
    request.extensions_mut().insert(caller.clone());
    let response = next.run(request).await;
    if response
        .extensions()
        .get::<operations::AuditedInTransaction>()
        .is_some()
    {
        return response;
    }
    if let Some(record) = read_audit(interaction, &uri, caller, response.status()) {
        app.auditor.record(record).await;
    }
    response
}

/// The audit record of a request whose event no transaction stored:
/// reads, searches, histories, operations, Bundles and refused writes.
fn read_audit(
    interaction: Interaction,
    uri: &axum::http::Uri,
    caller: crate::auth::Caller,
    status: StatusCode,
) -> Option<AuditRecord> {
    let path = uri.path().strip_prefix("/fhir/").unwrap_or("");
    let query = || Entity::Query {
        target: path.split('/').next().unwrap_or("").to_owned(),
        query: uri.query().unwrap_or("").to_owned(),
    };
    let resource = || Entity::Resource(path.split('/').take(2).collect::<Vec<_>>().join("/"));
    let (kind, action, entity) = match interaction {
        Interaction::Capabilities => return None,
        Interaction::Read => (Kind::Rest("read"), "R", resource()),
        Interaction::Vread => (Kind::Rest("vread"), "R", Entity::Resource(path.to_owned())),
        Interaction::HistoryInstance => (Kind::Rest("history-instance"), "R", resource()),
        Interaction::SearchType => (Kind::Rest("search-type"), "E", query()),
        Interaction::HistoryType => (Kind::Rest("history-type"), "E", query()),
        Interaction::HistorySystem => (Kind::Rest("history-system"), "E", query()),
        Interaction::TransactionOrBatch => (Kind::Rest("batch"), "E", query()),
        Interaction::Other => (Kind::Operation, "E", Entity::operation(path)),
        // A committed write's event is in its transaction.
        _ if status.is_success() => return None,
        Interaction::ConditionalUpdate => (Kind::Rest("update"), "U", query()),
        Interaction::ConditionalDelete => (Kind::Rest("delete"), "D", query()),
        Interaction::Create => (Kind::Rest("create"), "C", query()),
        Interaction::Delete => (Kind::Rest("delete"), "D", resource()),
        Interaction::Patch => (Kind::Rest("patch"), "U", resource()),
        Interaction::Update => (Kind::Rest("update"), "U", resource()),
    };
    let outcome = Outcome::of_status(status.as_u16());
    let description = (outcome != Outcome::Success).then(|| format!("HTTP {}", status.as_u16()));
    Some(
        AuditRecord::new(kind, action, Actor::Caller(caller))
            .outcome(outcome, description)
            .entity(entity),
    )
}

/// 401 with the bearer challenge and an OperationOutcome.
pub(crate) fn unauthenticated(e: &CallerError) -> Response {
    e.challenged(unauthenticated_error(e).into_response())
}

/// The OperationOutcome of an unidentified caller (401, or 403 for an
/// unknown development partner).
fn unauthenticated_error(e: &CallerError) -> FhirError {
    let code = match e.status() {
        StatusCode::UNAUTHORIZED => "login",
        StatusCode::TOO_MANY_REQUESTS => "throttled",
        _ => "forbidden",
    };
    FhirError::new(e.status(), Issue::error(code, e.to_string()))
}

/// The policy's refusal as a 403 OperationOutcome.
pub fn forbidden(denied: Denied) -> FhirError {
    FhirError::new(StatusCode::FORBIDDEN, Issue::error("forbidden", denied.0))
}

/// Count each request by FHIR interaction, resource type (a served type, or
/// `other`: the label set stays bounded) and status.
async fn count_request(
    State(app): State<Arc<App>>,
    matched: Option<MatchedPath>,
    request: Request,
    next: Next,
) -> Response {
    let route = matched.as_ref().map_or("", |m| m.as_str()).to_owned();
    let resource_type = path_type(&request)
        .filter(|t| SUPPORTED.contains(&t.as_str()))
        .unwrap_or_else(|| "other".to_owned());
    let interaction = Interaction::of(request.method().as_str(), &route).label();
    let response = next.run(request).await;
    app.metrics
        .fhir_requests
        .get_or_create(&vec![
            label("interaction", interaction),
            label("type", resource_type),
            label("status", response.status().as_u16().to_string()),
        ])
        .inc();
    response
}

async fn not_found() -> Response {
    FhirError::new(
        StatusCode::NOT_FOUND,
        Issue::error(
            "not-found",
            "no such FHIR endpoint: see /fhir/metadata for what this server offers",
        ),
    )
    .into_response()
}

/// A rejected FHIR request: an HTTP status and an OperationOutcome.
#[derive(Debug)]
pub struct FhirError {
    pub status: StatusCode,
    pub issues: Vec<Issue>,
}

impl FhirError {
    pub fn new(status: StatusCode, issue: Issue) -> FhirError {
        FhirError {
            status,
            issues: vec![issue],
        }
    }

    pub fn bad_request(diagnostics: impl Into<String>) -> FhirError {
        FhirError::new(
            StatusCode::BAD_REQUEST,
            Issue::error("invalid", diagnostics),
        )
    }

    pub fn not_found(resource_type: &str, id: &str) -> FhirError {
        FhirError::new(
            StatusCode::NOT_FOUND,
            Issue::error("not-found", format!("{resource_type}/{id} is not known"))
                .at(resource_type.to_owned()),
        )
    }

    pub fn precondition(diagnostics: impl Into<String>) -> FhirError {
        FhirError::new(
            StatusCode::PRECONDITION_FAILED,
            Issue::error("conflict", diagnostics),
        )
    }

    /// Validation failed: 422 with every finding (warnings too).
    pub fn unprocessable(issues: Vec<Issue>) -> FhirError {
        FhirError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            issues,
        }
    }
}

impl FhirError {
    /// A storage fault: the detail goes to our log, the caller learns it
    /// may retry (503).
    pub(crate) fn unavailable(error: &dyn std::fmt::Display, store: &str) -> FhirError {
        tracing::error!(error = %error, store, "FHIR storage failed");
        FhirError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Issue::error(
                "transient",
                format!("the {store} is unavailable; nothing was changed; retry later"),
            ),
        )
    }
}

impl From<MetaError> for FhirError {
    fn from(e: MetaError) -> FhirError {
        FhirError::unavailable(&e, "resource store")
    }
}

impl From<crate::store::BlobError> for FhirError {
    fn from(e: crate::store::BlobError) -> FhirError {
        FhirError::unavailable(&e, "binary store")
    }
}

impl IntoResponse for FhirError {
    fn into_response(self) -> Response {
        let body = outcome::operation_outcome(&self.issues).to_string();
        (
            self.status,
            [(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON))],
            body,
        )
            .into_response()
    }
}

/// The response format a request asks for, by `_format` or `Accept`: JSON
/// is all we write; a request for XML alone is refused with 406.
pub fn negotiate(headers: &HeaderMap, format: Option<&str>) -> Result<(), FhirError> {
    let refuse = |asked: &str| {
        FhirError::new(
            StatusCode::NOT_ACCEPTABLE,
            Issue::error(
                "not-supported",
                format!("this server writes FHIR JSON only (application/fhir+json); {asked} was asked for"),
            ),
        )
    };
    if let Some(format) = format {
        return match format {
            "json" | "application/json" | "application/fhir+json" => Ok(()),
            other => Err(refuse(other)),
        };
    }
    let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) else {
        return Ok(());
    };
    let acceptable = accept.split(',').any(|item| {
        let media = item
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        media.is_empty()
            || media == "*/*"
            || media == "application/*"
            || media == "application/json"
            || media == "application/fhir+json"
            || media == "application/json+fhir"
    });
    if acceptable {
        Ok(())
    } else {
        Err(refuse(accept))
    }
}

/// The request body must be FHIR JSON (or, where `also` allows, another
/// type such as JSON Patch); XML gets 415.
pub fn require_json_body(headers: &HeaderMap, also: &[&str]) -> Result<(), FhirError> {
    let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        // Clients that send no Content-Type send JSON in practice.
        return Ok(());
    };
    let media = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if media == "application/fhir+json"
        || media == "application/json"
        || media == "application/json+fhir"
        || also.contains(&media.as_str())
    {
        return Ok(());
    }
    Err(FhirError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        Issue::error(
            "not-supported",
            format!("request bodies must be FHIR JSON (application/fhir+json), not {media}"),
        ),
    ))
}

/// Parse a request body as JSON, keeping numbers' lexical form.
pub fn parse_json(body: &[u8]) -> Result<serde_json::Value, FhirError> {
    json::parse(body).map_err(|e| {
        FhirError::new(
            StatusCode::BAD_REQUEST,
            Issue::error(
                "structure",
                format!(
                    "the body is not valid JSON: {e} (line {}, column {})",
                    e.line(),
                    e.column()
                ),
            ),
        )
    })
}
