//! The RESTful interactions on resources: create, read, vread, update,
//! patch, delete, history and search. The write logic runs inside a store
//! transaction (`*_in`), so a transaction Bundle uses exactly the same code
//! as a single request.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::binary;
use super::definitions::Definitions;
use super::outcome::{operation_outcome, Issue};
use super::records::{CaseTx, Finished};
use super::search::{self, ParamKind};
use super::subset::Subset;
use super::validate::{is_valid_id, validate_full};
use super::{negotiate, parse_json, require_json_body, FhirError, FHIR_JSON};
use crate::app::App;
use crate::auth::{Caller, CallerError};
use crate::ids::PartnerId;
use crate::store::fhir::{
    Clause, Cursor, HistoryQuery, IndexEntries, ResourceQuery, ResourceTx, ResourceWrite, Sort,
    StoredResource,
};

/// The resource types this server serves (one source: routes, validation
/// and the CapabilityStatement).
pub const SUPPORTED: &[&str] = &[
    "AuditEvent",
    "Binary",
    "Communication",
    "Consent",
    "DiagnosticReport",
    "DocumentReference",
    "Endpoint",
    "ImagingStudy",
    "List",
    "Organization",
    "Patient",
    "Practitioner",
    "PractitionerRole",
    "ServiceRequest",
    "Subscription",
    "Task",
];

/// Types that clients may only read and search (the server writes them).
pub fn read_only(resource_type: &str) -> bool {
    resource_type == "AuditEvent"
}

/// What `Prefer: return=` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Return {
    Minimal,
    Representation,
    OperationOutcome,
}

/// The request's `Prefer` header.
#[derive(Debug, Clone, Copy)]
pub struct Prefer {
    pub ret: Return,
    /// `handling=strict`: unknown search parameters are errors.
    pub strict: bool,
}

impl Prefer {
    pub fn of(headers: &HeaderMap) -> Prefer {
        let mut prefer = Prefer {
            ret: Return::Representation,
            strict: false,
        };
        for value in headers.get_all("prefer") {
            for item in value.to_str().unwrap_or("").split([',', ';']) {
                match item.trim().replace(' ', "").as_str() {
                    "return=minimal" => prefer.ret = Return::Minimal,
                    "return=representation" => prefer.ret = Return::Representation,
                    "return=OperationOutcome" => prefer.ret = Return::OperationOutcome,
                    "handling=strict" => prefer.strict = true,
                    "handling=lenient" => prefer.strict = false,
                    _ => {}
                }
            }
        }
        prefer
    }
}

/// Who asks, and how answers are addressed.
pub struct Ctx {
    pub app: Arc<App>,
    pub caller: Caller,
    /// The FHIR base URL as the client reaches it.
    pub base: String,
    pub prefer: Prefer,
}

impl Ctx {
    pub fn new(app: Arc<App>, caller: Caller, headers: &HeaderMap) -> Ctx {
        let base = app.public_base(app.config.fhir.public_url.as_deref(), headers, "/fhir");
        Ctx {
            app,
            caller,
            base,
            prefer: Prefer::of(headers),
        }
    }

    /// The partners whose resources this caller may see (`None`: all).
    pub fn scope(&self) -> Option<Vec<PartnerId>> {
        self.caller.partner().map(|id| vec![id.clone()])
    }

    /// Whether this caller may see `stored` (the policy's resource half).
    pub fn may_see(&self, stored: &StoredResource) -> bool {
        crate::auth::policy::may_see(&self.caller, stored)
    }

    /// A case-restricted specialist writes records of the assigned cases'
    /// patients only (and Binaries, which name no patient: they become
    /// visible to them through a DocumentReference of a case).
    pub fn check_case_write(&self, resource_type: &str, value: &Value) -> Result<(), FhirError> {
        let Some(cases) = self.caller.case_scope() else {
            return Ok(());
        };
        let allowed = match resource_type {
            "Binary" => true,
            "Patient" | "Task" => false,
            t if crate::auth::cases::DIRECTORY.contains(&t) => false,
            _ => cases.about_a_case_patient(value),
        };
        if allowed {
            return Ok(());
        }
        Err(FhirError::new(
            StatusCode::FORBIDDEN,
            Issue::error(
                "forbidden",
                format!(
                    "a specialist writes records of the patients of the cases assigned to them; this \
                     {resource_type} is not about one of them"
                ),
            ),
        ))
    }

    /// Search conditions of `resource_type` that keep a case-restricted
    /// specialist within the assigned cases (none for everyone else).
    pub fn case_clauses(&self, resource_type: &str) -> Result<Vec<Clause>, FhirError> {
        let Some(cases) = self.caller.case_scope() else {
            return Ok(Vec::new());
        };
        cases
            .clause(resource_type)
            .map(|clause| clause.into_iter().collect())
            .map_err(|why| FhirError::new(StatusCode::FORBIDDEN, Issue::error("forbidden", why)))
    }

    /// Open the transaction of this interaction (the workflow reacts in it
    /// before it commits).
    pub async fn begin(&self) -> Result<CaseTx, FhirError> {
        CaseTx::begin(&*self.app.resources).await
    }

    fn partner(&self) -> Option<PartnerId> {
        self.caller.partner().cloned()
    }
}

/// The caller the FHIR gate identified; without one (a route outside the
/// gate, a defect) the answer is a 401 OperationOutcome.
pub fn caller(caller: Result<Caller, CallerError>) -> Result<Caller, FhirError> {
    caller.map_err(|e| super::unauthenticated_error(&e))
}

/// A type in the URL: one this server serves.
pub fn check_type(resource_type: &str) -> Result<(), FhirError> {
    if SUPPORTED.contains(&resource_type) {
        return Ok(());
    }
    let why = if Definitions::core().resource(resource_type).is_some() {
        format!(
            "{resource_type} is a FHIR R4 resource this server does not serve (see /fhir/metadata)"
        )
    } else {
        format!("'{resource_type}' is not a FHIR R4 resource type")
    };
    Err(FhirError::new(
        StatusCode::NOT_FOUND,
        Issue::error("not-supported", why),
    ))
}

fn check_writable(resource_type: &str) -> Result<(), FhirError> {
    if read_only(resource_type) {
        return Err(FhirError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            Issue::error(
                "forbidden",
                format!(
                    "{resource_type} is written by the server only; clients read and search it"
                ),
            ),
        ));
    }
    Ok(())
}

fn check_id(id: &str) -> Result<(), FhirError> {
    if is_valid_id(id) {
        Ok(())
    } else {
        Err(FhirError::bad_request(format!(
            "'{id}' is not a valid logical id (1-64 of A-Z a-z 0-9 - .)"
        )))
    }
}

/// `meta.lastUpdated` for a write now, and the same instant in ms.
pub fn now() -> (String, i64) {
    let t = chrono::Utc::now();
    (
        t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
        t.timestamp_millis(),
    )
}

/// Validate a resource for storage: errors reject it (422 with every
/// finding); warnings come back to go into the answer.
pub async fn check_valid(resource_type: &str, value: &Value) -> Result<Vec<Issue>, FhirError> {
    let issues = validation(resource_type, value, &[]).await;
    if issues.iter().any(Issue::is_error) {
        return Err(FhirError::unprocessable(issues));
    }
    Ok(issues)
}

/// Every finding about `value`: the core definitions, then each profile it
/// claims in `meta.profile` and each one in `also` (for `$validate`).
pub async fn validation(resource_type: &str, value: &Value, also: &[String]) -> Vec<Issue> {
    let mut issues = validate_full(Definitions::core(), value, Some(resource_type)).await;
    if issues.iter().any(Issue::is_error) {
        return issues;
    }
    let claimed = value
        .get("meta")
        .and_then(|m| m.get("profile"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(|p| p.split('|').next().unwrap_or(p).to_owned());
    let mut urls: Vec<String> = Vec::new();
    for url in claimed.chain(also.iter().cloned()) {
        if !urls.contains(&url) {
            urls.push(url);
        }
    }
    for url in urls {
        if url == format!("http://hl7.org/fhir/StructureDefinition/{resource_type}") {
            continue;
        }
        match super::profiles::all().get(&url) {
            Some(profile) => issues.extend(super::profiles::check(profile, value).await),
            None => issues.push(
                Issue::warning(
                    "not-supported",
                    format!("profile {url} is not known to this server: checked against the core definitions only"),
                )
                .at(format!("{resource_type}.meta.profile")),
            ),
        }
    }
    issues
}

/// Put the server's `id` and `meta.versionId` / `meta.lastUpdated` into the
/// submitted JSON, keeping everything else (and the element order) as sent.
fn stamp(value: &mut Value, id: &str, version: i64, last_updated: &str) {
    let Some(obj) = value.as_object_mut() else {
        return;
    };
    obj.shift_remove("id");
    let mut meta = match obj.shift_remove("meta") {
        Some(Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    // After resourceType, wherever the sender put that.
    let at = obj
        .keys()
        .position(|k| k == "resourceType")
        .map_or(0, |i| i + 1);
    obj.shift_insert(at, "id".to_owned(), Value::String(id.to_owned()));
    meta.shift_remove("versionId");
    meta.shift_remove("lastUpdated");
    meta.shift_insert(
        0,
        "versionId".to_owned(),
        Value::String(version.to_string()),
    );
    meta.shift_insert(
        1,
        "lastUpdated".to_owned(),
        Value::String(last_updated.to_owned()),
    );
    obj.shift_insert(at + 1, "meta".to_owned(), Value::Object(meta));
}

/// The result of a write.
pub struct Written {
    pub stored: StoredResource,
    /// 201 created, 200 updated or matched an existing resource.
    pub status: StatusCode,
    /// Warnings to pass on.
    pub issues: Vec<Issue>,
}

impl Written {
    /// Answer with what the workflow made of the write: its latest version
    /// of the resource and its warnings.
    pub fn settle(&mut self, finished: &Finished) {
        let warnings = finished.settle(&mut self.stored);
        self.issues.extend(warnings);
    }
}

/// Parse a search-style condition (`If-None-Exist`, conditional update or
/// reference) and find what matches it, inside the transaction.
pub async fn matching(
    tx: &mut dyn ResourceTx,
    ctx: &Ctx,
    resource_type: &str,
    condition: &str,
) -> Result<Vec<StoredResource>, FhirError> {
    // `If-None-Exist` may be written `identifier=...` or
    // `Patient?identifier=...`.
    let condition = condition
        .strip_prefix(resource_type)
        .and_then(|c| c.strip_prefix('?'))
        .unwrap_or(condition);
    let mut clauses = Vec::new();
    for (name, value) in form_urlencoded::parse(condition.as_bytes()) {
        match search::parse_param(resource_type, &name, &value) {
            Ok(Some(clause)) => clauses.push(clause),
            Ok(None) => {
                return Err(FhirError::bad_request(format!(
                    "condition '{condition}': {name} is not a search parameter of {resource_type}"
                )))
            }
            Err(issue) => return Err(FhirError::new(StatusCode::BAD_REQUEST, issue)),
        }
    }
    if clauses.is_empty() {
        return Err(FhirError::bad_request(format!(
            "condition '{condition}' has no search parameters"
        )));
    }
    clauses.extend(ctx.case_clauses(resource_type)?);
    let page = tx
        .search(&ResourceQuery {
            resource_type: resource_type.to_owned(),
            partners: ctx.scope(),
            clauses,
            sort: Sort::Created,
            after: None,
            count: 2,
            want_total: false,
        })
        .await?;
    Ok(page.resources)
}

/// The resource a conditional update or delete selects: its id for one
/// match, `None` for none; several matches are 412.
pub async fn conditional_target(
    tx: &mut dyn ResourceTx,
    ctx: &Ctx,
    resource_type: &str,
    condition: &str,
) -> Result<Option<String>, FhirError> {
    let found = matching(tx, ctx, resource_type, condition).await?;
    match found.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(one.id.clone())),
        _ => Err(FhirError::precondition(format!(
            "condition '{condition}' matches more than one {resource_type}: make it more specific"
        ))),
    }
}

/// Create (`POST`), optionally conditional (`If-None-Exist`). `id`: an id
/// already assigned (a transaction's `urn:uuid:` entries); else a new one.
pub async fn create_in(
    tx: &mut dyn ResourceTx,
    ctx: &Ctx,
    resource_type: &str,
    mut value: Value,
    if_none_exist: Option<&str>,
    id: Option<String>,
) -> Result<Written, FhirError> {
    check_writable(resource_type)?;
    let issues = check_valid(resource_type, &value).await?;
    ctx.check_case_write(resource_type, &value)?;
    if let Some(condition) = if_none_exist {
        let mut found = matching(tx, ctx, resource_type, condition).await?;
        if found.len() > 1 {
            return Err(FhirError::precondition(format!(
                "If-None-Exist '{condition}' matches more than one {resource_type}: make the condition more specific"
            )));
        }
        if let Some(existing) = found.pop() {
            return Ok(Written {
                stored: existing,
                status: StatusCode::OK,
                issues,
            });
        }
    }
    let id = id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let stored = write(
        tx,
        ctx,
        resource_type,
        &id,
        1,
        ctx.partner(),
        "POST",
        &mut value,
        None,
    )
    .await?;
    Ok(Written {
        stored,
        status: StatusCode::CREATED,
        issues,
    })
}

/// Stamp and write a new version. A Binary's content goes to the blob store
/// when it came raw (`blob`) or its base64 is large.
#[allow(clippy::too_many_arguments)]
pub async fn write(
    tx: &mut dyn ResourceTx,
    ctx: &Ctx,
    resource_type: &str,
    id: &str,
    version: i64,
    partner: Option<PartnerId>,
    method: &str,
    value: &mut Value,
    blob: Option<binary::StoredBlob>,
) -> Result<StoredResource, FhirError> {
    let blob = match blob {
        Some(blob) => Some(blob),
        None if resource_type == "Binary" => binary::spill(&ctx.app, value).await?,
        None => None,
    };
    Ok(write_version(tx, resource_type, id, version, partner, method, value, blob).await?)
}

/// Stamp `value` as version `version` and write it with its index entries.
#[allow(clippy::too_many_arguments)]
pub async fn write_version(
    tx: &mut dyn ResourceTx,
    resource_type: &str,
    id: &str,
    version: i64,
    partner: Option<PartnerId>,
    method: &str,
    value: &mut Value,
    blob: Option<binary::StoredBlob>,
) -> Result<StoredResource, crate::store::MetaError> {
    let (last_updated, updated_ms) = now();
    stamp(value, id, version, &last_updated);
    let index = search::extract(resource_type, value);
    let stored = StoredResource {
        resource_type: resource_type.to_owned(),
        id: id.to_owned(),
        version,
        last_updated,
        updated_ms,
        partner,
        body: Some(value.to_string()),
        method: method.to_owned(),
        blob: blob.as_ref().map(|b| b.location.clone()),
    };
    let w = ResourceWrite {
        resource: stored,
        index,
        blob_resume_at: blob.map(|b| b.resume_at),
    };
    tx.write(&w).await?;
    Ok(w.resource)
}

/// A version from `If-Match: W/"3"`.
fn parse_etag(value: &str) -> Result<i64, FhirError> {
    value
        .trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .parse()
        .map_err(|_| {
            FhirError::bad_request(format!(
                "If-Match '{value}' is not a version ETag such as W/\"3\""
            ))
        })
}

/// Update (`PUT`), creating the resource under this id if it does not exist.
pub async fn update_in(
    tx: &mut dyn ResourceTx,
    ctx: &Ctx,
    resource_type: &str,
    id: &str,
    mut value: Value,
    if_match: Option<&str>,
    method: &str,
) -> Result<Written, FhirError> {
    check_writable(resource_type)?;
    check_id(id)?;
    match value.get("id").and_then(Value::as_str) {
        Some(body_id) if body_id == id => {}
        Some(body_id) => {
            return Err(FhirError::new(
                StatusCode::BAD_REQUEST,
                Issue::error(
                    "invalid",
                    format!("the body's id ({body_id}) differs from the id in the URL ({id})"),
                )
                .at(format!("{resource_type}.id")),
            ))
        }
        None => {
            return Err(FhirError::new(
                StatusCode::BAD_REQUEST,
                Issue::error(
                    "required",
                    format!("an update must carry the resource's id ({id}) in the body"),
                )
                .at(format!("{resource_type}.id")),
            ))
        }
    }
    let issues = check_valid(resource_type, &value).await?;
    let current = tx.current(resource_type, id).await?;
    if let Some(current) = &current {
        if !ctx.may_see(current) {
            // Another partner's resource: as if it did not exist, and its
            // id cannot be taken over.
            return Err(FhirError::not_found(resource_type, id));
        }
    }
    ctx.check_case_write(resource_type, &value)?;
    let live = current.as_ref().filter(|c| c.body.is_some());
    if let Some(expected) = if_match {
        let expected = parse_etag(expected)?;
        match live {
            Some(c) if c.version == expected => {}
            Some(c) => {
                return Err(FhirError::precondition(format!(
                    "If-Match expects version {expected} of {resource_type}/{id}, but the current version is {}: read it again and re-apply your change",
                    c.version
                )))
            }
            None => {
                return Err(FhirError::precondition(format!(
                    "If-Match expects version {expected} of {resource_type}/{id}, which does not exist"
                )))
            }
        }
    }
    let version = current.as_ref().map_or(1, |c| c.version + 1);
    let partner = match &current {
        Some(c) => c.partner.clone(),
        None => ctx.partner(),
    };
    let stored = write(
        tx,
        ctx,
        resource_type,
        id,
        version,
        partner,
        method,
        &mut value,
        None,
    )
    .await?;
    Ok(Written {
        stored,
        status: if live.is_some() {
            StatusCode::OK
        } else {
            StatusCode::CREATED
        },
        issues,
    })
}

/// Delete: a new version that marks the resource deleted. Deleting what is
/// already gone, or never existed, succeeds (FHIR delete is idempotent).
pub async fn delete_in(
    tx: &mut dyn ResourceTx,
    ctx: &Ctx,
    resource_type: &str,
    id: &str,
) -> Result<(), FhirError> {
    check_writable(resource_type)?;
    check_id(id)?;
    let Some(current) = tx.current(resource_type, id).await? else {
        return Ok(());
    };
    if !ctx.may_see(&current) {
        return Err(FhirError::not_found(resource_type, id));
    }
    if current.body.is_none() {
        return Ok(());
    }
    tx.write(&deletion_of(current)).await?;
    Ok(())
}

/// The version that deletes `current`.
pub fn deletion_of(current: StoredResource) -> ResourceWrite {
    let (last_updated, updated_ms) = now();
    ResourceWrite {
        resource: StoredResource {
            version: current.version + 1,
            last_updated,
            updated_ms,
            body: None,
            method: "DELETE".to_owned(),
            blob: None,
            ..current
        },
        index: IndexEntries::default(),
        blob_resume_at: None,
    }
}

fn etag(version: i64) -> String {
    format!("W/\"{version}\"")
}

fn http_date(ms: i64) -> String {
    let t =
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    httpdate::fmt_http_date(t)
}

/// A JSON answer with FHIR's content type.
pub fn json_response(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON))],
        body,
    )
        .into_response()
}

/// The answer to a read or write of one resource: headers, and the body
/// `Prefer` asks for.
pub fn resource_response(ctx: &Ctx, written: &Written, location: bool) -> Response {
    let stored = &written.stored;
    let body = match ctx.prefer.ret {
        Return::Representation => stored.body.clone().unwrap_or_default(),
        Return::Minimal => String::new(),
        Return::OperationOutcome => operation_outcome(&written.issues).to_string(),
    };
    let mut response = if body.is_empty() {
        written.status.into_response()
    } else {
        json_response(written.status, body)
    };
    let headers = response.headers_mut();
    if ctx.prefer.ret != Return::OperationOutcome {
        // The body is the resource (or nothing): warnings, such as why a
        // ServiceRequest started no case, go in headers, one per issue, as
        // HAPI FHIR's request validation does. `Prefer:
        // return=OperationOutcome` brings them as the body instead.
        for issue in &written.issues {
            if let Ok(v) = HeaderValue::from_str(&validation_header(issue)) {
                headers.append(VALIDATION_HEADER, v);
            }
        }
    }
    if let Ok(v) = HeaderValue::from_str(&etag(stored.version)) {
        headers.insert(header::ETAG, v);
    }
    if let Ok(v) = HeaderValue::from_str(&http_date(stored.updated_ms)) {
        headers.insert(header::LAST_MODIFIED, v);
    }
    if location {
        let url = format!(
            "{}/{}/{}/_history/{}",
            ctx.base, stored.resource_type, stored.id, stored.version
        );
        if let Ok(v) = HeaderValue::from_str(&url) {
            headers.insert(header::LOCATION, v);
        }
    }
    response
}

/// The response header that carries a write's warnings when the body does
/// not.
pub const VALIDATION_HEADER: &str = "x-fhir-request-validation";

/// `severity code: diagnostics (expression)`, in visible ASCII (a header
/// value cannot carry more).
fn validation_header(issue: &Issue) -> String {
    let mut text = format!(
        "{} {}: {}",
        issue.severity.as_str(),
        issue.code,
        issue.diagnostics
    );
    if let Some(expression) = &issue.expression {
        text.push_str(&format!(" ({expression})"));
    }
    text.chars()
        .map(|c| {
            if c == ' ' || c.is_ascii_graphic() {
                c
            } else {
                '?'
            }
        })
        .collect()
}

fn reply(result: Result<Response, FhirError>) -> Response {
    result.unwrap_or_else(IntoResponse::into_response)
}

/// The `_format` parameter of a query string.
pub fn query_format(query: Option<&str>) -> Option<String> {
    form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .find(|(k, _)| k == "_format")
        .map(|(_, v)| v.into_owned())
}

fn header_str<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

pub async fn create(
    State(app): State<Arc<App>>,
    Path(resource_type): Path<String>,
    who: Result<Caller, CallerError>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    reply(
        async {
            let ctx = open_request(app, who, &resource_type, &headers, query.as_deref(), false)?;
            if resource_type == "Binary" && require_json_body(&headers, &[]).is_err() {
                return create_raw_binary(&ctx, &headers, body).await;
            }
            require_json_body(&headers, &[])?;
            let body = collect(&ctx.app, body).await?;
            let value = parse_json(&body)?;
            let mut tx = ctx.begin().await?;
            let mut written = create_in(
                &mut tx,
                &ctx,
                &resource_type,
                value,
                header_str(&headers, "if-none-exist"),
                None,
            )
            .await?;
            let finished = tx.finish(&ctx).await?;
            written.settle(&finished);
            Ok(resource_response(
                &ctx,
                &written,
                written.status == StatusCode::CREATED,
            ))
        }
        .await,
    )
}

/// `POST /fhir/{type}/$validate`: the resource (or a Parameters with
/// `resource` and `profile`), checked against the core definitions, the
/// profiles it claims and those asked for (`profile`), nothing stored.
/// Always 200 with an OperationOutcome of every finding, unless the request
/// itself is unusable.
pub async fn validate_operation(
    State(app): State<Arc<App>>,
    Path(resource_type): Path<String>,
    who: Result<Caller, CallerError>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    reply(
        async {
            let ctx = open_request(app, who, &resource_type, &headers, query.as_deref(), true)?;
            let value = parse_json(&collect(&ctx.app, body).await?)?;
            let mut profiles: Vec<String> =
                form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes())
                    .filter(|(k, _)| k == "profile")
                    .map(|(_, v)| v.into_owned())
                    .collect();
            let resource = if value.get("resourceType").and_then(Value::as_str)
                == Some("Parameters")
            {
                let mut resource = None;
                for p in value
                    .get("parameter")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    match p.get("name").and_then(Value::as_str) {
                        Some("resource") => resource = p.get("resource").cloned(),
                        Some("profile") => profiles.extend(
                            ["valueUri", "valueCanonical"]
                                .iter()
                                .filter_map(|k| p.get(*k).and_then(Value::as_str))
                                .map(str::to_owned),
                        ),
                        _ => {}
                    }
                }
                resource.ok_or_else(|| {
                    FhirError::bad_request("$validate with Parameters needs a 'resource' parameter")
                })?
            } else {
                value
            };
            let issues = validation(&resource_type, &resource, &profiles).await;
            Ok(json_response(
                StatusCode::OK,
                operation_outcome(&issues).to_string(),
            ))
        }
        .await,
    )
}

/// A request body of FHIR JSON, up to `fhir.max_resource_bytes`.
pub async fn collect(app: &App, body: Body) -> Result<Bytes, FhirError> {
    let limit = usize::try_from(app.config.fhir.max_resource_bytes).unwrap_or(usize::MAX);
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        FhirError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            Issue::error(
                "too-long",
                format!("the request body is over fhir.max_resource_bytes ({limit} bytes) or broke off: {e}; send large content as a raw Binary"),
            ),
        )
    })
}

/// `POST /fhir/Binary` with raw content: streamed to the blob store, then
/// recorded as a Binary whose `contentType` is the request's.
async fn create_raw_binary(
    ctx: &Ctx,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, FhirError> {
    let content_type = header_str(headers, "content-type")
        .unwrap_or("application/octet-stream")
        .trim()
        .to_owned();
    let mut value = json!({"resourceType": "Binary", "contentType": content_type});
    check_valid("Binary", &value).await?;
    let blob = binary::store_stream(
        Arc::clone(&ctx.app.fhir_blobs),
        body,
        ctx.app.config.fhir.max_binary_bytes,
    )
    .await?;
    let id = uuid::Uuid::new_v4().to_string();
    let mut tx = ctx.begin().await?;
    let stored = write(
        &mut tx,
        ctx,
        "Binary",
        &id,
        1,
        ctx.partner(),
        "POST",
        &mut value,
        Some(blob),
    )
    .await?;
    tx.finish(ctx).await?;
    let written = Written {
        stored,
        status: StatusCode::CREATED,
        issues: Vec::new(),
    };
    Ok(resource_response(ctx, &written, true))
}

pub async fn update(
    State(app): State<Arc<App>>,
    Path((resource_type, id)): Path<(String, String)>,
    who: Result<Caller, CallerError>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    reply(
        async {
            let ctx = open_request(app, who, &resource_type, &headers, query.as_deref(), true)?;
            let value = parse_json(&collect(&ctx.app, body).await?)?;
            let tx = ctx.begin().await?;
            put(tx, &ctx, &headers, &resource_type, &id, value).await
        }
        .await,
    )
}

/// The checks every request on a resource type starts with (served type,
/// JSON answer, JSON body when `json_body`), and its context.
fn open_request(
    app: Arc<App>,
    who: Result<Caller, CallerError>,
    resource_type: &str,
    headers: &HeaderMap,
    query: Option<&str>,
    json_body: bool,
) -> Result<Ctx, FhirError> {
    check_type(resource_type)?;
    negotiate(headers, query_format(query).as_deref())?;
    if json_body {
        require_json_body(headers, &[])?;
    }
    Ok(Ctx::new(app, caller(who)?, headers))
}

/// Update `resource_type/id` to `value` in `tx` (honouring `If-Match`),
/// commit, and answer.
async fn put(
    mut tx: CaseTx,
    ctx: &Ctx,
    headers: &HeaderMap,
    resource_type: &str,
    id: &str,
    value: Value,
) -> Result<Response, FhirError> {
    let mut written = update_in(
        &mut tx,
        ctx,
        resource_type,
        id,
        value,
        header_str(headers, "if-match"),
        "PUT",
    )
    .await?;
    let finished = tx.finish(ctx).await?;
    written.settle(&finished);
    Ok(resource_response(ctx, &written, true))
}

/// Conditional update, `PUT /fhir/{type}?search`: updates the one match,
/// creates when there is none (under the body's id, if it has one).
pub async fn conditional_update(
    State(app): State<Arc<App>>,
    Path(resource_type): Path<String>,
    who: Result<Caller, CallerError>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    reply(
        async {
            let condition = search_condition(query.as_deref(), "PUT")?;
            let ctx = open_request(app, who, &resource_type, &headers, query.as_deref(), true)?;
            let mut value = parse_json(&collect(&ctx.app, body).await?)?;
            let mut tx = ctx.begin().await?;
            let body_id = value.get("id").and_then(Value::as_str).map(str::to_owned);
            let id = match (conditional_target(&mut tx, &ctx, &resource_type, &condition).await?, body_id) {
                (Some(target), Some(body_id)) if target != body_id => {
                    return Err(FhirError::bad_request(format!(
                        "the condition selects {resource_type}/{target}, but the body's id is {body_id}"
                    )))
                }
                (Some(target), _) => target,
                (None, Some(body_id)) => body_id,
                (None, None) => uuid::Uuid::new_v4().to_string(),
            };
            if let Some(obj) = value.as_object_mut() {
                obj.insert("id".to_owned(), Value::String(id.clone()));
            }
            put(tx, &ctx, &headers, &resource_type, &id, value).await
        }
        .await,
    )
}

/// Conditional delete, `DELETE /fhir/{type}?search`: deletes the one
/// match; none is success; several are 412.
pub async fn conditional_delete(
    State(app): State<Arc<App>>,
    Path(resource_type): Path<String>,
    who: Result<Caller, CallerError>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    reply(
        async {
            let condition = search_condition(query.as_deref(), "DELETE")?;
            let ctx = open_request(app, who, &resource_type, &headers, query.as_deref(), false)?;
            let mut tx = ctx.begin().await?;
            if let Some(id) = conditional_target(&mut tx, &ctx, &resource_type, &condition).await? {
                delete_in(&mut tx, &ctx, &resource_type, &id).await?;
            }
            tx.finish(&ctx).await?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        .await,
    )
}

/// The search part of a conditional request, without `_format`.
fn search_condition(query: Option<&str>, method: &str) -> Result<String, FhirError> {
    let pairs: Vec<(String, String)> = form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .into_owned()
        .filter(|(k, _)| k != "_format")
        .collect();
    if pairs.is_empty() {
        return Err(FhirError::bad_request(format!(
            "{method} on a type needs search parameters (a conditional {method}); to address one resource use {method} /fhir/Type/id"
        )));
    }
    Ok(encode_query(&pairs))
}

pub async fn patch(
    State(app): State<Arc<App>>,
    Path((resource_type, id)): Path<(String, String)>,
    who: Result<Caller, CallerError>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    reply(
        async {
            let ctx = open_request(app, who, &resource_type, &headers, query.as_deref(), false)?;
            let media = header_str(&headers, "content-type")
                .and_then(|ct| ct.split(';').next())
                .map(|m| m.trim().to_ascii_lowercase());
            if media.as_deref() != Some("application/json-patch+json") {
                return Err(FhirError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    Issue::error(
                        "not-supported",
                        "PATCH takes a JSON Patch (RFC 6902) with Content-Type application/json-patch+json",
                    ),
                ));
            }
            let body = collect(&ctx.app, body).await?;
            let operations: json_patch::Patch = serde_json::from_slice(&body).map_err(|e| {
                FhirError::new(
                    StatusCode::BAD_REQUEST,
                    Issue::error("structure", format!("not a JSON Patch document: {e}")),
                )
            })?;
            let mut tx = ctx.begin().await?;
            let mut written = patch_in(
                &mut tx,
                &ctx,
                &resource_type,
                &id,
                &operations,
                header_str(&headers, "if-match"),
            )
            .await?;
            let finished = tx.finish(&ctx).await?;
            written.settle(&finished);
            Ok(resource_response(&ctx, &written, false))
        }
        .await,
    )
}

/// Apply a JSON Patch to the current version and store the result as an
/// update (validated like any other).
pub async fn patch_in(
    tx: &mut dyn ResourceTx,
    ctx: &Ctx,
    resource_type: &str,
    id: &str,
    operations: &json_patch::Patch,
    if_match: Option<&str>,
) -> Result<Written, FhirError> {
    check_id(id)?;
    let current = tx
        .current(resource_type, id)
        .await?
        .filter(|c| ctx.may_see(c))
        .ok_or_else(|| FhirError::not_found(resource_type, id))?;
    let Some(body) = &current.body else {
        return Err(gone(resource_type, id));
    };
    let mut value = parse_json(body.as_bytes())?;
    json_patch::patch(&mut value, operations).map_err(|e| {
        FhirError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            Issue::error("processing", format!("the patch cannot be applied: {e}")),
        )
    })?;
    if value.get("resourceType").and_then(Value::as_str) != Some(resource_type)
        || value.get("id").and_then(Value::as_str) != Some(id)
    {
        return Err(FhirError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            Issue::error("processing", "a patch may not change resourceType or id"),
        ));
    }
    update_in(tx, ctx, resource_type, id, value, if_match, "PATCH").await
}

fn gone(resource_type: &str, id: &str) -> FhirError {
    FhirError::new(
        StatusCode::GONE,
        Issue::error("deleted", format!("{resource_type}/{id} has been deleted")),
    )
}

pub async fn delete(
    State(app): State<Arc<App>>,
    Path((resource_type, id)): Path<(String, String)>,
    who: Result<Caller, CallerError>,
    headers: HeaderMap,
) -> Response {
    reply(
        async {
            check_type(&resource_type)?;
            let ctx = Ctx::new(app, caller(who)?, &headers);
            let mut tx = ctx.begin().await?;
            delete_in(&mut tx, &ctx, &resource_type, &id).await?;
            tx.finish(&ctx).await?;
            Ok(match ctx.prefer.ret {
                Return::OperationOutcome => json_response(
                    StatusCode::OK,
                    operation_outcome(&[Issue::information(
                        "informational",
                        format!("{resource_type}/{id} is deleted"),
                    )])
                    .to_string(),
                ),
                _ => StatusCode::NO_CONTENT.into_response(),
            })
        }
        .await,
    )
}

pub async fn read(
    State(app): State<Arc<App>>,
    Path((resource_type, id)): Path<(String, String)>,
    who: Result<Caller, CallerError>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    reply(
        async {
            let ctx = open_request(app, who, &resource_type, &headers, query.as_deref(), false)?;
            check_id(&id)?;
            let stored = ctx
                .app
                .resources
                .current(&resource_type, &id)
                .await?
                .filter(|s| ctx.may_see(s))
                .ok_or_else(|| FhirError::not_found(&resource_type, &id))?;
            if stored.body.is_some()
                && header_str(&headers, "if-none-match")
                    .is_some_and(|tag| tag.split(',').any(|t| t.trim() == etag(stored.version)))
            {
                let mut not_modified = StatusCode::NOT_MODIFIED.into_response();
                if let Ok(v) = HeaderValue::from_str(&etag(stored.version)) {
                    not_modified.headers_mut().insert(header::ETAG, v);
                }
                return Ok(not_modified);
            }
            read_answer(ctx, &headers, query.as_deref(), stored).await
        }
        .await,
    )
}

/// The answer to a read or vread of `stored`: 410 for a deletion; a Binary's
/// raw content unless FHIR is asked for; else the resource (subsetted if
/// `_summary` / `_elements` ask), always in full representation.
async fn read_answer(
    ctx: Ctx,
    headers: &HeaderMap,
    query: Option<&str>,
    stored: StoredResource,
) -> Result<Response, FhirError> {
    if stored.body.is_none() {
        return Err(gone(&stored.resource_type, &stored.id));
    }
    if stored.resource_type == "Binary"
        && !binary::wants_resource(headers, query_format(query).as_deref())
    {
        return binary::raw_response(&ctx.app, &stored);
    }
    partner_saw(&ctx, &stored);
    let mut body = binary::with_data(&ctx.app, &stored).await?;
    if let Some(subset) = read_subset(query)? {
        body = super::subset::apply(&body, &subset);
    }
    let written = Written {
        stored: StoredResource {
            body: Some(body),
            ..stored
        },
        status: StatusCode::OK,
        issues: Vec::new(),
    };
    let ctx = Ctx {
        prefer: Prefer {
            ret: Return::Representation,
            ..ctx.prefer
        },
        ..ctx
    };
    Ok(resource_response(&ctx, &written, false))
}

/// A referring partner read a resource: when it is a case's final
/// opinion, the workflow may now release the patient's notification
/// (after the answer, in its own transaction).
fn partner_saw(ctx: &Ctx, stored: &StoredResource) {
    if !matches!(ctx.caller, Caller::Partner(_)) || stored.resource_type != "DiagnosticReport" {
        return;
    }
    let app = Arc::clone(&ctx.app);
    let id = stored.id.clone();
    tokio::spawn(async move {
        let released = async {
            let mut tx = app.cases.begin().await?;
            let (_, now_ms) = now();
            app.workflow.opinion_read(tx.records(), &id, now_ms).await?;
            tx.commit().await
        };
        if let Err(e) = released.await {
            tracing::warn!(error = %e, "releasing the patient notification failed; it is tried again at the next read");
        }
    });
}

/// `_summary` / `_elements` of a read.
fn read_subset(query: Option<&str>) -> Result<Option<Subset>, FhirError> {
    let mut subset = None;
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "_summary" => {
                subset = Subset::from_summary(&v).ok_or_else(|| {
                    FhirError::bad_request(format!("_summary={v}: use true, text, data or false"))
                })?
            }
            "_elements" => subset = Some(Subset::from_elements(&v)),
            _ => {}
        }
    }
    Ok(subset)
}

pub async fn vread(
    State(app): State<Arc<App>>,
    Path((resource_type, id, version)): Path<(String, String, String)>,
    who: Result<Caller, CallerError>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    reply(
        async {
            let ctx = open_request(app, who, &resource_type, &headers, query.as_deref(), false)?;
            check_id(&id)?;
            let not_found = || {
                FhirError::new(
                    StatusCode::NOT_FOUND,
                    Issue::error(
                        "not-found",
                        format!("{resource_type}/{id} has no version {version}"),
                    ),
                )
            };
            let number: i64 = version.parse().map_err(|_| not_found())?;
            let stored = ctx
                .app
                .resources
                .version(&resource_type, &id, number)
                .await?
                .filter(|s| ctx.may_see(s))
                .ok_or_else(not_found)?;
            read_answer(ctx, &headers, query.as_deref(), stored).await
        }
        .await,
    )
}

/// Paging and result parameters, shared by search and history.
fn page_size(ctx: &Ctx, count: Option<&str>) -> Result<usize, FhirError> {
    let config = &ctx.app.config.fhir;
    match count {
        None => Ok(config.default_page_size as usize),
        Some(n) => n
            .parse::<usize>()
            .map(|n| n.min(config.max_page_size as usize))
            .map_err(|_| FhirError::bad_request(format!("_count={n} is not a number"))),
    }
}

fn parse_cursor(raw: &str) -> Result<Cursor, FhirError> {
    let bad = || {
        FhirError::bad_request(format!(
            "_cursor={raw} is not a paging cursor of this server"
        ))
    };
    let (key, row) = raw.split_once('.').ok_or_else(bad)?;
    Ok(Cursor {
        key: key.parse().map_err(|_| bad())?,
        row: row.parse().map_err(|_| bad())?,
    })
}

fn encode_query(pairs: &[(String, String)]) -> String {
    let mut out = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        out.append_pair(k, v);
    }
    out.finish()
}

/// A Bundle written as text around stored resource bodies (which are not
/// parsed again).
struct BundleText {
    out: String,
    entries: usize,
}

impl BundleText {
    fn new(kind: &str, total: Option<u64>, links: &[(&str, String)]) -> BundleText {
        let (now, _) = now();
        let mut head = json!({
            "resourceType": "Bundle",
            "id": uuid::Uuid::new_v4().to_string(),
            "meta": {"lastUpdated": now},
            "type": kind,
        });
        if let Some(total) = total {
            head["total"] = json!(total);
        }
        if !links.is_empty() {
            head["link"] = links
                .iter()
                .map(|(relation, url)| json!({"relation": relation, "url": url}))
                .collect();
        }
        let mut out = head.to_string();
        out.pop(); // the closing brace
        out.push_str(",\"entry\":[");
        BundleText { out, entries: 0 }
    }

    /// One entry: `fields` (fullUrl first) with `resource` placed raw.
    fn entry(&mut self, full_url: Option<&str>, resource: Option<&str>, rest: Value) {
        if self.entries > 0 {
            self.out.push(',');
        }
        self.entries += 1;
        self.out.push('{');
        let mut first = true;
        let mut field = |out: &mut String, name: &str, raw: &str| {
            if !first {
                out.push(',');
            }
            first = false;
            out.push_str(&Value::String(name.to_owned()).to_string());
            out.push(':');
            out.push_str(raw);
        };
        if let Some(url) = full_url {
            field(
                &mut self.out,
                "fullUrl",
                &Value::String(url.to_owned()).to_string(),
            );
        }
        if let Some(resource) = resource {
            field(&mut self.out, "resource", resource);
        }
        if let Value::Object(rest) = rest {
            for (k, v) in rest {
                field(&mut self.out, &k, &v.to_string());
            }
        }
        self.out.push('}');
    }

    fn finish(mut self) -> String {
        if self.entries == 0 {
            // No empty arrays in FHIR JSON: drop `"entry":[`.
            let cut = self.out.len() - ",\"entry\":[".len();
            self.out.truncate(cut);
            self.out.push('}');
        } else {
            self.out.push_str("]}");
        }
        self.out
    }
}

pub async fn history_system(
    State(app): State<Arc<App>>,
    who: Result<Caller, CallerError>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    reply(history(app, who, None, None, query, headers).await)
}

pub async fn history_type(
    State(app): State<Arc<App>>,
    Path(resource_type): Path<String>,
    who: Result<Caller, CallerError>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    reply(history(app, who, Some(resource_type), None, query, headers).await)
}

pub async fn history_instance(
    State(app): State<Arc<App>>,
    Path((resource_type, id)): Path<(String, String)>,
    who: Result<Caller, CallerError>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    reply(history(app, who, Some(resource_type), Some(id), query, headers).await)
}

async fn history(
    app: Arc<App>,
    who: Result<Caller, CallerError>,
    resource_type: Option<String>,
    id: Option<String>,
    query: Option<String>,
    headers: HeaderMap,
) -> Result<Response, FhirError> {
    if let Some(t) = &resource_type {
        check_type(t)?;
    }
    negotiate(&headers, query_format(query.as_deref()).as_deref())?;
    let ctx = Ctx::new(app, caller(who)?, &headers);
    let mut count = None;
    let mut since = None;
    let mut before = None;
    let mut applied = Vec::new();
    for (k, v) in form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "_count" => count = Some(v.to_string()),
            "_since" => {
                since = Some(search::date_range(&v).map(|r| r.0).ok_or_else(|| {
                    FhirError::bad_request(format!("_since={v} is not an instant"))
                })?);
                applied.push(("_since".to_owned(), v.to_string()));
            }
            "_cursor" => {
                before = Some(v.parse::<i64>().map_err(|_| {
                    FhirError::bad_request(format!(
                        "_cursor={v} is not a paging cursor of this server"
                    ))
                })?)
            }
            _ => {}
        }
    }
    let count = page_size(&ctx, count.as_deref())?;
    if let (Some(t), Some(id)) = (&resource_type, &id) {
        check_id(id)?;
        let visible = ctx
            .app
            .resources
            .current(t, id)
            .await?
            .is_some_and(|c| ctx.may_see(&c));
        if !visible {
            return Err(FhirError::not_found(t, id));
        }
    }
    let page = ctx
        .app
        .resources
        .history(&HistoryQuery {
            resource_type: resource_type.clone(),
            id: id.clone(),
            partners: ctx.scope(),
            since_ms: since,
            before_row: before,
            count,
        })
        .await?;
    let path = match (&resource_type, &id) {
        (Some(t), Some(id)) => format!("{}/{t}/{id}/_history", ctx.base),
        (Some(t), None) => format!("{}/{t}/_history", ctx.base),
        _ => format!("{}/_history", ctx.base),
    };
    applied.push(("_count".to_owned(), count.to_string()));
    let mut links = vec![("self", format!("{path}?{}", encode_query(&applied)))];
    if let Some(next) = page.next {
        let mut next_query = applied.clone();
        next_query.push(("_cursor".to_owned(), next.to_string()));
        links.push(("next", format!("{path}?{}", encode_query(&next_query))));
    }
    let mut bundle = BundleText::new("history", None, &links);
    // A system-wide history spans types some callers may not read (the
    // audit trail), and a type's history spans cases a specialist is not
    // assigned: those versions are left out.
    let shown = |v: &&StoredResource| ctx.may_see(v);
    for v in page.versions.iter().filter(shown) {
        let (status, url) = match v.method.as_str() {
            "POST" => ("201 Created", v.resource_type.clone()),
            "DELETE" => ("204 No Content", format!("{}/{}", v.resource_type, v.id)),
            _ => ("200 OK", format!("{}/{}", v.resource_type, v.id)),
        };
        let method = if v.method == "PATCH" {
            "PATCH"
        } else {
            v.method.as_str()
        };
        bundle.entry(
            Some(&format!("{}/{}/{}", ctx.base, v.resource_type, v.id)),
            v.body.as_deref(),
            json!({
                "request": {"method": method, "url": url},
                "response": {"status": status, "etag": etag(v.version), "lastModified": v.last_updated},
            }),
        );
    }
    Ok(json_response(StatusCode::OK, bundle.finish()))
}

pub async fn search_get(
    State(app): State<Arc<App>>,
    Path(resource_type): Path<String>,
    who: Result<Caller, CallerError>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let pairs = form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes())
        .into_owned()
        .collect();
    reply(search_request(app, who, resource_type, pairs, headers).await)
}

pub async fn search_post(
    State(app): State<Arc<App>>,
    Path(resource_type): Path<String>,
    who: Result<Caller, CallerError>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let media = header_str(&headers, "content-type")
        .and_then(|ct| ct.split(';').next())
        .map(|m| m.trim().to_ascii_lowercase());
    if media.as_deref() != Some("application/x-www-form-urlencoded") {
        return FhirError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Issue::error(
                "not-supported",
                "POST _search takes the parameters as application/x-www-form-urlencoded",
            ),
        )
        .into_response();
    }
    let body = match collect(&app, body).await {
        Ok(body) => body,
        Err(e) => return e.into_response(),
    };
    let pairs = form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes())
        .chain(form_urlencoded::parse(&body))
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    reply(search_request(app, who, resource_type, pairs, headers).await)
}

async fn search_request(
    app: Arc<App>,
    who: Result<Caller, CallerError>,
    resource_type: String,
    pairs: Vec<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, FhirError> {
    check_type(&resource_type)?;
    let format = pairs
        .iter()
        .find(|(k, _)| k == "_format")
        .map(|(_, v)| v.as_str());
    negotiate(&headers, format)?;
    let ctx = Ctx::new(app, caller(who)?, &headers);
    let body = search(&ctx, &resource_type, &pairs).await?;
    Ok(json_response(StatusCode::OK, body))
}

/// Run a search and write its searchset Bundle.
pub async fn search(
    ctx: &Ctx,
    resource_type: &str,
    pairs: &[(String, String)],
) -> Result<String, FhirError> {
    let mut clauses = Vec::new();
    let mut applied: Vec<(String, String)> = Vec::new();
    let mut warnings = Vec::new();
    let mut count = None;
    let mut sort = Sort::Created;
    let mut after = None;
    let mut summary_count = false;
    let mut subset: Option<Subset> = None;
    let mut want_total = true;
    let mut includes = Vec::new();
    let mut revincludes = Vec::new();
    for (name, value) in pairs {
        match name.as_str() {
            "_format" | "_pretty" => {}
            "_count" => count = Some(value.clone()),
            "_cursor" => after = Some(parse_cursor(value)?),
            "_summary" if value == "count" => summary_count = true,
            "_summary" => {
                subset = Subset::from_summary(value).ok_or_else(|| {
                    FhirError::bad_request(format!(
                        "_summary={value}: use true, text, data, count or false"
                    ))
                })?;
                applied.push((name.clone(), value.clone()));
            }
            "_elements" => {
                subset = Some(Subset::from_elements(value));
                applied.push((name.clone(), value.clone()));
            }
            "_total" => match value.as_str() {
                "none" => want_total = false,
                "accurate" | "estimate" => want_total = true,
                other => {
                    return Err(FhirError::bad_request(format!(
                        "_total={other}: use none, estimate or accurate"
                    )))
                }
            },
            "_sort" => {
                sort = parse_sort(resource_type, value)?;
                applied.push((name.clone(), value.clone()));
            }
            "_include" => {
                includes.push(parse_include(resource_type, value, false)?);
                applied.push((name.clone(), value.clone()));
            }
            "_revinclude" => {
                revincludes.push(parse_include(resource_type, value, true)?);
                applied.push((name.clone(), value.clone()));
            }
            _ => match search::parse_param(
                resource_type,
                name,
                &local_reference(ctx, resource_type, name, value),
            ) {
                Ok(Some(clause)) => {
                    clauses.push(clause);
                    applied.push((name.clone(), value.clone()));
                }
                Ok(None) => {
                    let issue = Issue::warning(
                        "not-supported",
                        format!("search parameter '{name}' is not supported for {resource_type} and was ignored (see /fhir/metadata)"),
                    );
                    if ctx.prefer.strict {
                        return Err(FhirError::new(
                            StatusCode::BAD_REQUEST,
                            Issue {
                                severity: super::outcome::Severity::Error,
                                ..issue
                            },
                        ));
                    }
                    warnings.push(issue);
                }
                Err(issue) => return Err(FhirError::new(StatusCode::BAD_REQUEST, issue)),
            },
        }
    }
    let count = if summary_count {
        0
    } else {
        page_size(ctx, count.as_deref())?
    };
    clauses.extend(ctx.case_clauses(resource_type)?);
    let query = ResourceQuery {
        resource_type: resource_type.to_owned(),
        partners: ctx.scope(),
        clauses,
        sort,
        after,
        count,
        want_total: want_total || summary_count,
    };
    let page = ctx.app.resources.search(&query).await?;
    let path = format!("{}/{resource_type}", ctx.base);
    let mut self_query = applied.clone();
    if summary_count {
        self_query.push(("_summary".to_owned(), "count".to_owned()));
    } else {
        self_query.push(("_count".to_owned(), count.to_string()));
    }
    let mut links = vec![("self", format!("{path}?{}", encode_query(&self_query)))];
    if let Some(next) = page.next {
        let mut next_query = self_query.clone();
        next_query.push(("_cursor".to_owned(), format!("{}.{}", next.key, next.row)));
        links.push(("next", format!("{path}?{}", encode_query(&next_query))));
    }
    let mut bundle = BundleText::new("searchset", page.total, &links);
    let full_url = |s: &StoredResource| format!("{}/{}/{}", ctx.base, s.resource_type, s.id);
    let shown = |s: &StoredResource| match (&subset, &s.body) {
        (Some(subset), Some(body)) => Some(super::subset::apply(body, subset)),
        _ => s.body.clone(),
    };
    for s in &page.resources {
        partner_saw(ctx, s);
        bundle.entry(
            Some(&full_url(s)),
            shown(s).as_deref(),
            json!({"search": {"mode": "match"}}),
        );
    }
    let mut seen: std::collections::HashSet<(String, String)> = page
        .resources
        .iter()
        .map(|s| (s.resource_type.clone(), s.id.clone()))
        .collect();
    for extra in included(ctx, &page.resources, &includes, &revincludes).await? {
        if seen.insert((extra.resource_type.clone(), extra.id.clone())) {
            bundle.entry(
                Some(&full_url(&extra)),
                shown(&extra).as_deref(),
                json!({"search": {"mode": "include"}}),
            );
        }
    }
    if !warnings.is_empty() {
        bundle.entry(
            None,
            Some(&operation_outcome(&warnings).to_string()),
            json!({"search": {"mode": "outcome"}}),
        );
    }
    Ok(bundle.finish())
}

/// A reference parameter's value with this server's base URL taken off:
/// `http://host/fhir/Patient/1` searches like `Patient/1`.
fn local_reference(ctx: &Ctx, resource_type: &str, name: &str, value: &str) -> String {
    let bare = name.split(':').next().unwrap_or(name);
    match search::param(resource_type, bare) {
        Some(p) if p.kind == ParamKind::Reference => value.replace(&format!("{}/", ctx.base), ""),
        _ => value.to_owned(),
    }
}

fn parse_sort(resource_type: &str, value: &str) -> Result<Sort, FhirError> {
    let (descending, name) = match value.strip_prefix('-') {
        Some(n) => (true, n),
        None => (false, value),
    };
    if name == "_lastUpdated" {
        return Ok(Sort::LastUpdated { descending });
    }
    match search::param(resource_type, name) {
        Some(p) if p.kind == ParamKind::Date => Ok(Sort::Date {
            param: search::key(p),
            descending,
        }),
        _ => Err(FhirError::bad_request(format!(
            "_sort={value}: sorting is supported on _lastUpdated and the date parameters of {resource_type}"
        ))),
    }
}

/// `_include=Source:param[:Target]` / `_revinclude=Source:param[:Target]`.
#[derive(Debug)]
struct Include {
    source: String,
    param: &'static search::SearchParam,
}

fn parse_include(resource_type: &str, value: &str, reverse: bool) -> Result<Include, FhirError> {
    let mut parts = value.split(':');
    let source = parts.next().unwrap_or("");
    let name = parts.next().unwrap_or("");
    let what = if reverse { "_revinclude" } else { "_include" };
    if !reverse && source != resource_type {
        return Err(FhirError::bad_request(format!(
            "{what}={value}: the source type must be {resource_type}"
        )));
    }
    if reverse {
        check_type(source)?;
    }
    match search::param(source, name) {
        Some(p) if p.kind == ParamKind::Reference => Ok(Include {
            source: source.to_owned(),
            param: p,
        }),
        _ => Err(FhirError::bad_request(format!(
            "{what}={value}: {name} is not a reference search parameter of {source}"
        ))),
    }
}

/// Resources `_include`d by the page's resources and `_revinclude`d ones
/// that point at them, as far as the caller may see them.
async fn included(
    ctx: &Ctx,
    page: &[StoredResource],
    includes: &[Include],
    revincludes: &[Include],
) -> Result<Vec<StoredResource>, FhirError> {
    let mut out = Vec::new();
    if !includes.is_empty() {
        let mut keys = Vec::new();
        for s in page {
            let Some(body) = &s.body else { continue };
            let Ok(value) = serde_json::from_str::<Value>(body) else {
                continue;
            };
            let index = search::extract(&s.resource_type, &value);
            for inc in includes {
                let key = search::key(inc.param);
                for (param, target) in &index.references {
                    if *param == key {
                        if let Some((t, id)) = target.split_once('/') {
                            if SUPPORTED.contains(&t) && !id.contains('/') {
                                keys.push((t.to_owned(), id.to_owned()));
                            }
                        }
                    }
                }
            }
        }
        keys.sort();
        keys.dedup();
        out.extend(
            ctx.app
                .resources
                .current_many(&keys)
                .await?
                .into_iter()
                .filter(|s| ctx.may_see(s)),
        );
    }
    for rev in revincludes {
        let targets: Vec<String> = page
            .iter()
            .map(|s| format!("{}/{}", s.resource_type, s.id))
            .collect();
        if targets.is_empty() {
            continue;
        }
        let found = ctx
            .app
            .resources
            .search(&ResourceQuery {
                resource_type: rev.source.clone(),
                partners: ctx.scope(),
                clauses: vec![Clause::Reference {
                    param: search::key(rev.param),
                    targets,
                }],
                sort: Sort::Created,
                after: None,
                count: ctx.app.config.fhir.max_page_size as usize,
                want_total: false,
            })
            .await?;
        out.extend(found.resources.into_iter().filter(|s| ctx.may_see(s)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_keeps_the_senders_order_wherever_resourcetype_is() {
        for sent in [
            json!({"resourceType": "Patient", "id": "x", "meta": {"profile": ["p"]}, "active": true}),
            json!({"meta": {"versionId": "9"}, "id": "x", "active": true, "gender": "other", "resourceType": "Patient"}),
            json!({"active": true}),
        ] {
            let mut v = sent.clone();
            stamp(&mut v, "new", 2, "2024-01-01T00:00:00.000Z");
            assert_eq!(v["id"], "new");
            assert_eq!(v["meta"]["versionId"], "2");
            assert_eq!(v["active"], true);
            if let Some(profile) = sent["meta"].get("profile") {
                assert_eq!(&v["meta"]["profile"], profile);
            }
            let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
            let rt = keys.iter().position(|k| *k == "resourceType");
            let id = keys.iter().position(|k| *k == "id").unwrap();
            assert_eq!(id, rt.map_or(0, |r| r + 1));
        }
    }
}
