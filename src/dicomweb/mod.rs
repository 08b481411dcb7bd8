//! The DICOMweb edge (PS3.18) at `/dicomweb`: STOW-RS into the ingest
//! pipeline, QIDO-RS from the index, WADO-RS streamed from the blob store.
//! Errors of the layers below are mapped to HTTP statuses here, once
//! ([`WebError`]).

mod dataset;
pub(crate) mod media;
mod metadata;
mod multipart;
mod qido;
pub(crate) mod stow;
mod wado;

use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::app::App;
use crate::audit::{Actor, AuditRecord, Entity, Kind, Outcome};
use crate::auth::{authorize, Action, CallerError, Denied};
use crate::ids::{TransferId, Uid};
use crate::metrics::label;
use crate::store::{BlobError, MetaError};

/// The routes under `/dicomweb`.
pub fn routes(app: &Arc<App>) -> Router<Arc<App>> {
    let studies = "/dicomweb/studies/{study}";
    let series = "/dicomweb/studies/{study}/series/{series}";
    let instance = "/dicomweb/studies/{study}/series/{series}/instances/{instance}";
    let router = Router::new()
        .route("/dicomweb/studies", get(qido::studies).post(stow::store))
        .route("/dicomweb/series", get(qido::series))
        .route("/dicomweb/instances", get(qido::instances))
        .route(
            studies,
            get(wado::retrieve_instances).post(stow::store_in_study),
        )
        .route(&format!("{studies}/metadata"), get(wado::metadata))
        .route(&format!("{studies}/series"), get(qido::series))
        .route(&format!("{studies}/instances"), get(qido::instances))
        .route(series, get(wado::retrieve_instances))
        .route(&format!("{series}/metadata"), get(wado::metadata))
        .route(&format!("{series}/instances"), get(qido::instances))
        .route(instance, get(wado::retrieve_instances))
        .route(&format!("{instance}/metadata"), get(wado::metadata))
        .route(&format!("{instance}/frames/{{frames}}"), get(wado::frames))
        .route(&format!("{instance}/bulkdata/{{tag}}"), get(wado::bulkdata));
    let router = router
        .layer(axum::middleware::from_fn_with_state(Arc::clone(app), gate))
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(app),
            count_request,
        ));
    match cors(&app.config.dicomweb.cors_origins) {
        Some(layer) => router.layer(layer),
        None => router,
    }
}

/// Authenticate every DICOMweb request and authorise it as a store (POST),
/// a search (QIDO-RS: the route ends in `studies`, `series` or
/// `instances`) or a retrieve (WADO-RS).
async fn gate(
    State(app): State<Arc<App>>,
    matched: Option<MatchedPath>,
    mut request: Request,
    next: Next,
) -> Response {
    let caller = match crate::auth::authenticate(
        &app,
        request.headers(),
        request.extensions(),
        request.uri(),
    )
    .await
    {
        Ok(caller) => caller,
        Err(crate::auth::GateError::Caller(e)) => return WebError::from(e).into_response(),
        Err(crate::auth::GateError::Store(e)) => return WebError::from(e).into_response(),
    };
    let searches = matched.as_ref().is_some_and(|m| {
        m.as_str()
            .rsplit('/')
            .next()
            .is_some_and(|last| matches!(last, "studies" | "series" | "instances"))
    });
    let action = if request.method() == Method::POST {
        Action::StoreImages
    } else if searches {
        Action::SearchImages
    } else {
        Action::RetrieveImages
    };
    let refusal = match authorize(&caller, action) {
        Err(denied) => Some(WebError::Forbidden(denied.0)),
        Ok(()) => outside_cases(&caller, action, request.uri()),
    };
    if let Some(refusal) = refusal {
        let response = refusal.into_response();
        app.auditor
            .record(transfer_audit(
                action,
                request.uri(),
                caller,
                response.status(),
            ))
            .await;
        return response;
    }
    let uri = request.uri().clone();
    request.extensions_mut().insert(caller.clone());
    // A store is one transfer (see crate::audit). Its record is stored even
    // when the request is dropped before its response (the client went
    // away): then the index's notes name what it stored.
    let transfer = (action == Action::StoreImages).then(TransferId::new);
    let mut unanswered = None;
    if let Some(transfer) = transfer {
        request.extensions_mut().insert(transfer);
        unanswered = Some(UnansweredStore {
            auditor: app.auditor.clone(),
            record: Some(
                transfer_audit(action, &uri, caller.clone(), StatusCode::BAD_REQUEST)
                    .outcome(
                        Outcome::MinorFailure,
                        Some("the request ended before its response (the client went away)".into()),
                    )
                    .transfer(transfer),
            ),
        });
    }
    let response = next.run(request).await;
    if let Some(unanswered) = unanswered {
        unanswered.answered();
    }
    let mut record = transfer_audit(action, &uri, caller, response.status());
    record.transfer = transfer;
    // STOW-RS names what it stored (the URL names at most one study).
    if let Some(stored) = response.extensions().get::<stow::StoredStudies>() {
        record.entities.clear();
        for (uid, instances) in &stored.0 {
            record = record.entity(Entity::Study {
                uid: uid.clone(),
                instances: Some(*instances),
            });
        }
    }
    app.auditor.record(record).await;
    response
}

/// The audit record of a store request that is dropped before it answers.
struct UnansweredStore {
    auditor: crate::audit::Auditor,
    record: Option<AuditRecord>,
}

impl UnansweredStore {
    /// The request answered: the gate stores its record.
    fn answered(mut self) {
        self.record = None;
    }
}

impl Drop for UnansweredStore {
    fn drop(&mut self) {
        if let (Some(record), Ok(runtime)) =
            (self.record.take(), tokio::runtime::Handle::try_current())
        {
            let auditor = self.auditor.clone();
            runtime.spawn(async move { auditor.record(record).await });
        }
    }
}

/// The audit record of a DICOMweb request: a store, a query or a retrieve,
/// with the study its path names (a query: its level and parameters).
fn transfer_audit(
    action: Action<'_>,
    uri: &axum::http::Uri,
    caller: crate::auth::Caller,
    status: StatusCode,
) -> AuditRecord {
    let path = uri.path().strip_prefix("/dicomweb/").unwrap_or("");
    let study = path
        .strip_prefix("studies/")
        .and_then(|rest| rest.split('/').next())
        .filter(|uid| Uid::parse(uid).is_ok())
        .map(|uid| Entity::Study {
            uid: uid.to_owned(),
            instances: None,
        });
    let (kind, code) = match action {
        Action::StoreImages => (Kind::DicomStore, "C"),
        Action::SearchImages => (Kind::DicomQuery, "E"),
        _ => (Kind::DicomRetrieve, "R"),
    };
    // 202: some instances of a STOW-RS request failed.
    let outcome = match status.as_u16() {
        202 => Outcome::MinorFailure,
        s => Outcome::of_status(s),
    };
    let description = (outcome != Outcome::Success).then(|| format!("HTTP {}", status.as_u16()));
    let mut record =
        AuditRecord::new(kind, code, Actor::Caller(caller)).outcome(outcome, description);
    if action == Action::SearchImages {
        record = record.entity(Entity::Query {
            target: path.to_owned(),
            query: uri.query().unwrap_or("").to_owned(),
        });
    } else if let Some(study) = study {
        record = record.entity(study);
    }
    record
}

/// A case-restricted specialist retrieves the studies of the assigned cases
/// only; another study is unknown to them (404, as another partner's is).
fn outside_cases(
    caller: &crate::auth::Caller,
    action: Action<'_>,
    uri: &axum::http::Uri,
) -> Option<WebError> {
    let cases = caller.case_scope()?;
    if action != Action::RetrieveImages {
        return None;
    }
    let study = uri
        .path()
        .strip_prefix("/dicomweb/studies/")
        .and_then(|rest| rest.split('/').next())
        .unwrap_or("");
    (!cases.studies.contains(study)).then(|| WebError::NotFound(format!("study {study} not found")))
}

/// Count each request by the resource its route names (the last literal
/// segment: `studies`, `metadata`, `frames`, …), method and status.
async fn count_request(
    State(app): State<Arc<App>>,
    matched: Option<MatchedPath>,
    request: Request,
    next: Next,
) -> Response {
    let resource = matched
        .as_ref()
        .and_then(|m| {
            m.as_str()
                .rsplit('/')
                .find(|segment| !segment.is_empty() && !segment.starts_with('{'))
        })
        .unwrap_or("other")
        .to_owned();
    let method = request.method().as_str().to_owned();
    let response = next.run(request).await;
    app.metrics
        .dicomweb_requests
        .get_or_create(&vec![
            label("resource", resource),
            label("method", method),
            label("status", response.status().as_u16().to_string()),
        ])
        .inc();
    response
}

/// CORS for web viewers (OHIF): off unless origins are configured.
fn cors(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok())
                .collect::<Vec<_>>(),
        )
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
            .allow_headers([
                header::ACCEPT,
                header::CONTENT_TYPE,
                header::AUTHORIZATION,
                HeaderName::from_static(crate::auth::PARTNER_HEADER),
            ])
            .expose_headers([header::WARNING, header::CONTENT_LENGTH, header::ETAG])
            .max_age(std::time::Duration::from_secs(600)),
    )
}

/// A failed DICOMweb request. The body is a plain-text reason a client's
/// operator can act on (an OperationOutcome when the caller is refused);
/// storage internals go to our log only.
#[derive(Debug, thiserror::Error)]
pub enum WebError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthenticated(CallerError),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    NotAcceptable(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("index unavailable: {0}")]
    Index(#[from] MetaError),
    #[error("blob store unavailable: {0}")]
    Blob(#[from] BlobError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl IntoResponse for WebError {
    fn into_response(self) -> Response {
        let (status, text) = match &self {
            // Refusals of the caller read as they do on the FHIR side (one
            // token, one answer): an OperationOutcome.
            WebError::Unauthenticated(e) => return crate::fhir::unauthenticated(e),
            WebError::Forbidden(m) => {
                return crate::fhir::forbidden(Denied(m.clone())).into_response()
            }
            WebError::BadRequest(m) => (StatusCode::BAD_REQUEST, m.clone()),
            WebError::NotFound(m) => (StatusCode::NOT_FOUND, m.clone()),
            WebError::NotAcceptable(m) => (StatusCode::NOT_ACCEPTABLE, m.clone()),
            WebError::UnsupportedMediaType(m) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, m.clone()),
            WebError::PayloadTooLarge(m) => (StatusCode::PAYLOAD_TOO_LARGE, m.clone()),
            WebError::Index(_) | WebError::Blob(_) | WebError::Internal(_) => {
                tracing::error!(error = %self, "DICOMweb request failed");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "storage temporarily unavailable; retry later".to_owned(),
                )
            }
        };
        (
            status,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("{text}\n"),
        )
            .into_response()
    }
}

impl From<CallerError> for WebError {
    fn from(e: CallerError) -> Self {
        WebError::Unauthenticated(e)
    }
}

/// A handler's answer: the response, or the error's.
fn reply(result: Result<Response, WebError>) -> Response {
    result.unwrap_or_else(IntoResponse::into_response)
}

/// A UID from the request path, validated before any use.
fn path_uid(name: &str, raw: &str) -> Result<Uid, WebError> {
    Uid::parse(raw).map_err(|e| WebError::BadRequest(format!("{name} in the path: {e}")))
}

/// A whole stored object as a streamed body, with its length (the FHIR
/// edge's raw Binary reads use the same streaming as WADO-RS).
pub fn stream_blob(
    blobs: Arc<dyn crate::store::BlobStore>,
    location: crate::store::BlobLocation,
) -> (axum::body::Body, u64) {
    multipart::single(blobs, multipart::Part::whole(String::new(), location))
}

/// The DICOMweb base URL clients use, for RetrieveURL and BulkDataURI.
fn base_url(app: &App, headers: &HeaderMap) -> String {
    app.public_base(
        app.config.dicomweb.public_url.as_deref(),
        headers,
        "/dicomweb",
    )
}
