//! `transaction` and `batch` Bundles posted to the base (`POST /fhir`).
//!
//! A transaction is atomic, in one store transaction: `urn:uuid:` (and other
//! fullUrl) references between entries are rewritten to the ids the server
//! assigns, conditional references (`Patient?identifier=sys|val`) are
//! resolved, entries run in the order FHIR prescribes (DELETE, POST, PUT,
//! PATCH, GET) and the answer lists them in request order. This is what an
//! IHE MHD Provide Document Bundle (ITI-65) needs. A batch runs each entry
//! on its own.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::{json, Value};

use super::outcome::{operation_outcome, Issue};
use super::rest::{
    self, caller, check_type, conditional_target, create_in, delete_in, json_response, matching,
    patch_in, update_in, Ctx, Return, Written,
};
use super::{negotiate, parse_json, require_json_body, FhirError};
use crate::app::App;
use crate::auth::{authorize, Action, Caller, CallerError, Permission};
use crate::store::fhir::ResourceTx;

/// One parsed entry.
struct Entry {
    index: usize,
    method: Method,
    /// `request.url` (relative to the base).
    url: String,
    full_url: Option<String>,
    resource: Option<Value>,
    if_none_exist: Option<String>,
    if_match: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Method {
    // Declaration order is the processing order of a transaction.
    Delete,
    Post,
    Put,
    Patch,
    Get,
}

/// What happened to one entry.
enum EntryResult {
    Written(Written),
    Deleted,
    Read(StatusCode, String),
    Failed(FhirError),
}

pub async fn transaction_or_batch(
    State(app): State<Arc<App>>,
    who: Result<Caller, CallerError>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        negotiate(&headers, rest::query_format(query.as_deref()).as_deref())?;
        require_json_body(&headers, &[])?;
        let ctx = Ctx::new(app, caller(who)?, &headers);
        let bundle = parse_json(&rest::collect(&ctx.app, body).await?)?;
        if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
            return Err(FhirError::bad_request(
                "POST to the base takes a Bundle of type transaction or batch",
            ));
        }
        let kind = bundle.get("type").and_then(Value::as_str).unwrap_or("");
        let transaction = match kind {
            "transaction" => true,
            "batch" => false,
            other => {
                return Err(FhirError::new(
                    StatusCode::BAD_REQUEST,
                    Issue::error(
                        "invalid",
                        format!(
                            "Bundle.type is '{other}': POST to the base takes transaction or batch"
                        ),
                    )
                    .at("Bundle.type"),
                ))
            }
        };
        // The envelope itself (entries' resources are validated one by one,
        // where they are written).
        let envelope = envelope_of(&bundle);
        let issues = super::validate::validate(
            super::definitions::Definitions::core(),
            &envelope,
            Some("Bundle"),
        );
        if issues.iter().any(Issue::is_error) {
            return Err(FhirError::unprocessable(issues));
        }
        let entries = parse_entries(&bundle, transaction)?;
        if transaction {
            run_transaction(&ctx, entries).await
        } else {
            Ok(run_batch(&ctx, entries).await)
        }
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

/// The Bundle without its entries' resources (those are validated where
/// they are written), built without copying them.
fn envelope_of(bundle: &Value) -> Value {
    let Some(obj) = bundle.as_object() else {
        return bundle.clone();
    };
    let mut envelope = serde_json::Map::new();
    for (key, value) in obj {
        let value = match (key.as_str(), value) {
            ("entry", Value::Array(entries)) => Value::Array(
                entries
                    .iter()
                    .map(|e| match e.as_object() {
                        Some(entry) => Value::Object(
                            entry
                                .iter()
                                .filter(|(k, _)| *k != "resource")
                                .map(|(k, v)| (k.clone(), v.clone()))
                                .collect(),
                        ),
                        None => e.clone(),
                    })
                    .collect(),
            ),
            _ => value.clone(),
        };
        envelope.insert(key.clone(), value);
    }
    Value::Object(envelope)
}

fn parse_entries(bundle: &Value, transaction: bool) -> Result<Vec<Entry>, FhirError> {
    let mut out = Vec::new();
    for (index, e) in bundle
        .get("entry")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let at = |field: &str| format!("Bundle.entry[{index}].{field}");
        let request = e.get("request").ok_or_else(|| {
            FhirError::new(
                StatusCode::BAD_REQUEST,
                Issue::error(
                    "required",
                    format!("entry {index} has no request (method and url)"),
                )
                .at(at("request")),
            )
        })?;
        let method = match request.get("method").and_then(Value::as_str) {
            Some("GET") => Method::Get,
            Some("POST") => Method::Post,
            Some("PUT") => Method::Put,
            Some("PATCH") => Method::Patch,
            Some("DELETE") => Method::Delete,
            other => {
                return Err(FhirError::new(
                    StatusCode::BAD_REQUEST,
                    Issue::error(
                        "not-supported",
                        format!("request.method {other:?} is not supported in a Bundle"),
                    )
                    .at(at("request.method")),
                ))
            }
        };
        let url = request
            .get("url")
            .and_then(Value::as_str)
            .unwrap_or("")
            .trim_start_matches('/')
            .to_owned();
        let resource = e.get("resource").cloned();
        if matches!(method, Method::Post | Method::Put | Method::Patch) && resource.is_none() {
            return Err(FhirError::new(
                StatusCode::BAD_REQUEST,
                Issue::error(
                    "required",
                    format!("entry {index}: {method:?} needs a resource"),
                )
                .at(at("resource")),
            ));
        }
        let full_url = e.get("fullUrl").and_then(Value::as_str).map(str::to_owned);
        if transaction {
            if let Some(full) = &full_url {
                if out
                    .iter()
                    .any(|o: &Entry| o.full_url.as_deref() == Some(full))
                {
                    return Err(FhirError::new(
                        StatusCode::BAD_REQUEST,
                        Issue::error(
                            "duplicate",
                            format!("fullUrl {full} appears twice in the transaction"),
                        )
                        .at(at("fullUrl")),
                    ));
                }
            }
        }
        out.push(Entry {
            index,
            method,
            url,
            full_url,
            resource,
            if_none_exist: request
                .get("ifNoneExist")
                .and_then(Value::as_str)
                .map(str::to_owned),
            if_match: request
                .get("ifMatch")
                .and_then(Value::as_str)
                .map(str::to_owned),
        });
    }
    Ok(out)
}

/// Put the entry index into an error's issues: `Patient.name` becomes
/// `Bundle.entry[2].resource.name`.
fn at_entry(mut e: FhirError, entry: &Entry) -> FhirError {
    let resource_type = entry
        .resource
        .as_ref()
        .and_then(|r| r.get("resourceType"))
        .and_then(Value::as_str)
        .unwrap_or("");
    for issue in &mut e.issues {
        let prefix = format!("Bundle.entry[{}]", entry.index);
        issue.expression = Some(match issue.expression.take() {
            Some(x)
                if !resource_type.is_empty()
                    && (x == resource_type || x.starts_with(&format!("{resource_type}."))) =>
            {
                format!("{prefix}.resource{}", &x[resource_type.len()..])
            }
            Some(x) if x.starts_with("Bundle.entry[") => x,
            _ => prefix,
        });
        issue.diagnostics = format!("entry {}: {}", entry.index, issue.diagnostics);
    }
    e
}

/// `Type/id`, `Type` or `Type?query` of a request URL.
fn split_url(url: &str) -> (&str, Option<&str>, Option<&str>) {
    let (path, query) = match url.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (url, None),
    };
    let mut parts = path.splitn(2, '/');
    let resource_type = parts.next().unwrap_or("");
    (resource_type, parts.next().filter(|s| !s.is_empty()), query)
}

/// The entry's resource type, once the caller may act on it as the entry
/// asks.
fn entry_type<'e>(ctx: &Ctx, entry: &'e Entry) -> Result<&'e str, FhirError> {
    let (resource_type, id, _) = split_url(&entry.url);
    let permission = match entry.method {
        Method::Get if id.is_some() => Permission::Read,
        Method::Get => Permission::Search,
        Method::Post => Permission::Create,
        Method::Put | Method::Patch => Permission::Update,
        Method::Delete => Permission::Delete,
    };
    authorize(&ctx.caller, Action::Fhir(permission, Some(resource_type)))
        .map_err(|denied| at_entry(super::forbidden(denied), entry))?;
    check_type(resource_type).map_err(|e| at_entry(e, entry))?;
    Ok(resource_type)
}

async fn run_transaction(ctx: &Ctx, mut entries: Vec<Entry>) -> Result<Response, FhirError> {
    let mut tx = ctx.begin().await?;
    // 1. Decide each write's id; map fullUrls to Type/id.
    let mut ids: HashMap<usize, String> = HashMap::new();
    let mut matched: HashMap<usize, bool> = HashMap::new();
    let mut mapping: HashMap<String, String> = HashMap::new();
    for entry in &entries {
        let resource_type = entry_type(ctx, entry)?;
        if entry.method == Method::Get {
            continue;
        }
        let (id, found) = plan_write(&mut tx, ctx, entry, resource_type)
            .await
            .map_err(|e| at_entry(e, entry))?;
        if found {
            matched.insert(entry.index, true);
        }
        if let Some(full) = &entry.full_url {
            if !id.is_empty() {
                let to = format!("{resource_type}/{id}");
                // An absolute fullUrl ending in Type/id is also what the
                // Bundle's relative references to that id resolve to.
                if full.starts_with("http://") || full.starts_with("https://") {
                    if let Some((_, tail)) = full.rsplit_once(&format!("/{resource_type}/")) {
                        if !tail.contains('/') {
                            mapping.insert(format!("{resource_type}/{tail}"), to.clone());
                        }
                    }
                }
                mapping.insert(full.clone(), to);
            }
        }
        ids.insert(entry.index, id);
    }
    // 2. Rewrite references, resolve conditional ones.
    for entry in &mut entries {
        let Some(resource) = entry.resource.as_mut() else {
            continue;
        };
        let mut conditional = Vec::new();
        rewrite_references(resource, &mapping, &mut conditional);
        for reference in conditional {
            let (resource_type, _, query) = split_url(&reference);
            check_type(resource_type)?;
            let found = matching(&mut tx, ctx, resource_type, query.unwrap_or("")).await?;
            let [one] = found.as_slice() else {
                return Err(FhirError::precondition(format!(
                    "entry {}: conditional reference '{reference}' matches {} resources; it must match exactly one",
                    entry.index,
                    found.len()
                )));
            };
            let resolved = format!("{resource_type}/{}", one.id);
            let mut map = HashMap::new();
            map.insert(reference.clone(), resolved);
            rewrite_references(resource, &map, &mut Vec::new());
        }
    }
    // 3. Run the writes in FHIR's order.
    let mut order: Vec<usize> = (0..entries.len()).collect();
    order.sort_by_key(|&i| (entries[i].method, i));
    let mut results: Vec<Option<EntryResult>> = (0..entries.len()).map(|_| None).collect();
    for i in order {
        let entry = &entries[i];
        if entry.method == Method::Get {
            continue;
        }
        let resource_type = entry_type(ctx, entry)?;
        let id = ids.get(&entry.index).cloned().unwrap_or_default();
        let result = write_entry(
            &mut tx,
            ctx,
            entry,
            resource_type,
            id,
            matched.contains_key(&entry.index),
        )
        .await
        .map_err(|e| at_entry(e, entry))?;
        results[i] = Some(result);
    }
    let finished = tx.finish(ctx).await?;
    for result in results.iter_mut().flatten() {
        if let EntryResult::Written(w) = result {
            w.settle(&finished);
        }
    }
    // 4. Reads see the committed state.
    for (i, entry) in entries.iter().enumerate() {
        if entry.method == Method::Get {
            results[i] = Some(read_entry(ctx, entry).await);
        }
    }
    Ok(answer(ctx, "transaction-response", &entries, results))
}

/// The id a write entry acts on, and whether a POST's `ifNoneExist` found
/// it already there. An empty id: a conditional DELETE or PATCH that matched
/// nothing.
async fn plan_write(
    tx: &mut dyn ResourceTx,
    ctx: &Ctx,
    entry: &Entry,
    resource_type: &str,
) -> Result<(String, bool), FhirError> {
    let (_, url_id, query) = split_url(&entry.url);
    let new_id = || uuid::Uuid::new_v4().to_string();
    Ok(match (entry.method, url_id, query) {
        (Method::Post, _, _) => match &entry.if_none_exist {
            Some(condition) => match conditional_target(tx, ctx, resource_type, condition).await? {
                Some(existing) => (existing, true),
                None => (new_id(), false),
            },
            None => (new_id(), false),
        },
        (_, Some(id), _) => (id.to_owned(), false),
        (method, None, Some(condition)) => {
            match conditional_target(tx, ctx, resource_type, condition).await? {
                Some(id) => (id, false),
                None if method == Method::Put => (new_id(), false),
                None => (String::new(), false),
            }
        }
        (method, None, None) => {
            return Err(FhirError::bad_request(format!(
                "{method:?} needs Type/id or Type?condition in request.url"
            )))
        }
    })
}

/// One write of a transaction or batch.
async fn write_entry(
    tx: &mut dyn ResourceTx,
    ctx: &Ctx,
    entry: &Entry,
    resource_type: &str,
    id: String,
    matched: bool,
) -> Result<EntryResult, FhirError> {
    let resource = entry.resource.clone().unwrap_or(Value::Null);
    match entry.method {
        Method::Post => {
            if matched {
                let stored = tx
                    .current(resource_type, &id)
                    .await?
                    .ok_or_else(|| FhirError::not_found(resource_type, &id))?;
                return Ok(EntryResult::Written(Written {
                    stored,
                    status: StatusCode::OK,
                    issues: Vec::new(),
                }));
            }
            let w = create_in(tx, ctx, resource_type, resource, None, Some(id)).await?;
            Ok(EntryResult::Written(w))
        }
        Method::Put => {
            let mut resource = resource;
            // A conditional update's body may leave the id out.
            if let Some(obj) = resource.as_object_mut() {
                if !obj.contains_key("id") {
                    obj.insert("id".to_owned(), Value::String(id.clone()));
                }
            }
            let w = update_in(
                tx,
                ctx,
                resource_type,
                &id,
                resource,
                entry.if_match.as_deref(),
                "PUT",
            )
            .await?;
            Ok(EntryResult::Written(w))
        }
        Method::Patch => {
            let patch = json_patch_of(&resource)?;
            let w = patch_in(
                tx,
                ctx,
                resource_type,
                &id,
                &patch,
                entry.if_match.as_deref(),
            )
            .await?;
            Ok(EntryResult::Written(w))
        }
        Method::Delete => {
            if !id.is_empty() {
                delete_in(tx, ctx, resource_type, &id).await?;
            }
            Ok(EntryResult::Deleted)
        }
        Method::Get => Err(FhirError::bad_request("GET is not a write")),
    }
}

/// The JSON Patch of a PATCH entry: a Binary with contentType
/// application/json-patch+json (FHIR's way to carry it in a Bundle).
fn json_patch_of(resource: &Value) -> Result<json_patch::Patch, FhirError> {
    let unsupported = || {
        FhirError::new(
            StatusCode::BAD_REQUEST,
            Issue::error(
                "not-supported",
                "PATCH entries take a JSON Patch as a Binary with contentType application/json-patch+json (FHIRPath Patch is not supported)",
            ),
        )
    };
    if resource.get("resourceType").and_then(Value::as_str) != Some("Binary")
        || resource.get("contentType").and_then(Value::as_str)
            != Some("application/json-patch+json")
    {
        return Err(unsupported());
    }
    let data = resource
        .get("data")
        .and_then(Value::as_str)
        .ok_or_else(unsupported)?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data.as_bytes())
        .map_err(|_| FhirError::bad_request("the JSON Patch Binary's data is not base64"))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| FhirError::bad_request(format!("not a JSON Patch document: {e}")))
}

async fn read_entry(ctx: &Ctx, entry: &Entry) -> EntryResult {
    let (resource_type, id, query) = split_url(&entry.url);
    if let Err(e) = entry_type(ctx, entry) {
        return EntryResult::Failed(e);
    }
    match id {
        Some(id) if !id.contains('/') => match ctx.app.resources.current(resource_type, id).await {
            Ok(Some(s)) if ctx.may_see(&s) => match s.body {
                Some(body) => EntryResult::Read(StatusCode::OK, body),
                None => EntryResult::Failed(FhirError::new(
                    StatusCode::GONE,
                    Issue::error("deleted", format!("{resource_type}/{id} has been deleted")),
                )),
            },
            Ok(_) => EntryResult::Failed(FhirError::not_found(resource_type, id)),
            Err(e) => EntryResult::Failed(e.into()),
        },
        Some(_) => EntryResult::Failed(FhirError::bad_request(format!(
            "GET {}: only reads (Type/id) and searches (Type?params) are supported in a Bundle",
            entry.url
        ))),
        None => {
            let pairs: Vec<(String, String)> =
                form_urlencoded::parse(query.unwrap_or("").as_bytes())
                    .into_owned()
                    .collect();
            match rest::search(ctx, resource_type, &pairs).await {
                Ok(body) => EntryResult::Read(StatusCode::OK, body),
                Err(e) => EntryResult::Failed(e),
            }
        }
    }
}

async fn run_batch(ctx: &Ctx, entries: Vec<Entry>) -> Response {
    let mut results = Vec::with_capacity(entries.len());
    for entry in &entries {
        let result = if entry.method == Method::Get {
            read_entry(ctx, entry).await
        } else {
            batch_write(ctx, entry)
                .await
                .unwrap_or_else(|e| EntryResult::Failed(at_entry(e, entry)))
        };
        results.push(Some(result));
    }
    answer(ctx, "batch-response", &entries, results)
}

async fn batch_write(ctx: &Ctx, entry: &Entry) -> Result<EntryResult, FhirError> {
    let resource_type = entry_type(ctx, entry)?;
    let mut tx = ctx.begin().await?;
    let (id, matched) = plan_write(&mut tx, ctx, entry, resource_type).await?;
    let mut result = write_entry(&mut tx, ctx, entry, resource_type, id, matched).await?;
    let finished = tx.finish(ctx).await?;
    if let EntryResult::Written(w) = &mut result {
        w.settle(&finished);
    }
    Ok(result)
}

fn status_line(status: StatusCode) -> String {
    format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    )
}

/// The response Bundle, entries in request order.
fn answer(ctx: &Ctx, kind: &str, entries: &[Entry], results: Vec<Option<EntryResult>>) -> Response {
    let mut out = Vec::with_capacity(entries.len());
    for (entry, result) in entries.iter().zip(results) {
        let mut e = serde_json::Map::new();
        match result {
            Some(EntryResult::Written(w)) => {
                let s = &w.stored;
                e.insert(
                    "fullUrl".into(),
                    json!(format!("{}/{}/{}", ctx.base, s.resource_type, s.id)),
                );
                match ctx.prefer.ret {
                    Return::Representation => {
                        if let Some(body) = &s.body {
                            if let Ok(v) = serde_json::from_str::<Value>(body) {
                                e.insert("resource".into(), v);
                            }
                        }
                    }
                    Return::OperationOutcome => {
                        e.insert("resource".into(), operation_outcome(&w.issues));
                    }
                    Return::Minimal => {}
                }
                let mut response = json!({
                    "status": status_line(w.status),
                    "location": format!("{}/{}/_history/{}", s.resource_type, s.id, s.version),
                    "etag": format!("W/\"{}\"", s.version),
                    "lastModified": s.last_updated,
                });
                // Warnings (a referral that starts no case, and why) travel
                // with the entry whatever `Prefer` asked for.
                if !w.issues.is_empty() && ctx.prefer.ret != Return::OperationOutcome {
                    response["outcome"] = operation_outcome(&w.issues);
                }
                e.insert("response".into(), response);
            }
            Some(EntryResult::Deleted) => {
                e.insert(
                    "response".into(),
                    json!({"status": status_line(StatusCode::NO_CONTENT)}),
                );
            }
            Some(EntryResult::Read(status, body)) => {
                if let Ok(v) = serde_json::from_str::<Value>(&body) {
                    e.insert("resource".into(), v);
                }
                e.insert("response".into(), json!({"status": status_line(status)}));
            }
            Some(EntryResult::Failed(err)) => {
                e.insert(
                    "response".into(),
                    json!({"status": status_line(err.status), "outcome": operation_outcome(&err.issues)}),
                );
            }
            None => {
                e.insert(
                    "response".into(),
                    json!({"status": "500 Internal Server Error"}),
                );
            }
        }
        let _ = entry;
        out.push(Value::Object(e));
    }
    let (now, _) = rest::now();
    let mut bundle = json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::new_v4().to_string(),
        "meta": {"lastUpdated": now},
        "type": kind,
    });
    if !out.is_empty() {
        bundle["entry"] = Value::Array(out);
    }
    json_response(StatusCode::OK, bundle.to_string())
}

/// Replace references (and attachment URLs) that name another entry's
/// fullUrl by `Type/id`; collect conditional references (`Type?query`).
fn rewrite_references(
    value: &mut Value,
    mapping: &HashMap<String, String>,
    conditional: &mut Vec<String>,
) {
    match value {
        Value::Object(obj) => {
            for (key, v) in obj.iter_mut() {
                if let (true, Value::String(s)) = (key == "reference" || key == "url", &mut *v) {
                    if let Some(to) = mapping.get(s.as_str()) {
                        *s = to.clone();
                    } else if key == "reference" && is_conditional(s) {
                        conditional.push(s.clone());
                    }
                } else {
                    rewrite_references(v, mapping, conditional);
                }
            }
        }
        Value::Array(items) => {
            for v in items {
                rewrite_references(v, mapping, conditional);
            }
        }
        _ => {}
    }
}

fn is_conditional(reference: &str) -> bool {
    match reference.split_once('?') {
        Some((t, q)) => !t.contains('/') && !t.contains(':') && !q.is_empty(),
        None => false,
    }
}
