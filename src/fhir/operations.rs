//! The workflow's FHIR operations on one resource:
//! `POST /fhir/Task/{id}/$assign`, `POST /fhir/DiagnosticReport/{id}/$approve`,
//! `POST /fhir/DiagnosticReport/{id}/$return`, `POST /fhir/ImagingStudy/{id}/$link`,
//! and `POST /fhir/Task/{id}/$propose`, which changes nothing.
//! Each takes a `Parameters` body (or none), is for the service's staff,
//! runs one workflow step in one transaction and answers with the resource
//! it changed (`$propose`: a Parameters with the proposal).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::outcome::Issue;
use super::rest::{self, collect, json_response, now, query_format};
use super::{negotiate, parse_json, require_json_body, FhirError};
use crate::app::App;
use crate::audit::{Actor, AuditRecord, Entity, Kind, Outcome};
use crate::auth::{Caller, CallerError};
use crate::workflow::records::Record;

/// The operations, by resource type and name (one list: routing and the
/// CapabilityStatement).
pub const OPERATIONS: &[(&str, &str, &str)] = &[
    (
        "Task",
        "assign",
        "Assign the case's specialist (Parameters 'owner': Reference(PractitionerRole); without it, the requested performer or the least-loaded available specialist of the specialty)",
    ),
    (
        "Task",
        "propose",
        "Propose the case's specialist as $assign without 'owner' would choose, changing nothing (out: 'owner', 'requested', 'openCases')",
    ),
    (
        "DiagnosticReport",
        "approve",
        "Approve the draft opinion: final, PDF in presentedForm, filed as a DocumentReference, delivered to the referrer",
    ),
    (
        "DiagnosticReport",
        "return",
        "Send the draft opinion back to the specialist (Parameters 'note': string)",
    ),
    (
        "ImagingStudy",
        "link",
        "Link an unmatched study to a case of the same partner (Parameters 'task': Reference(Task))",
    ),
];

/// A named parameter of a `Parameters` body.
fn parameter<'p>(parameters: &'p Value, name: &str) -> Option<&'p Value> {
    parameters
        .get("parameter")?
        .as_array()?
        .iter()
        .find(|p| p.get("name").and_then(Value::as_str) == Some(name))
}

fn reference_parameter(parameters: &Value, name: &str) -> Result<Option<String>, FhirError> {
    let Some(p) = parameter(parameters, name) else {
        return Ok(None);
    };
    p.get("valueReference")
        .and_then(|r| r.get("reference"))
        .and_then(Value::as_str)
        .filter(|r| {
            r.split_once('/')
                .is_some_and(|(t, id)| !t.is_empty() && !id.is_empty())
        })
        .map(|r| Some(r.to_owned()))
        .ok_or_else(|| {
            FhirError::new(
                StatusCode::BAD_REQUEST,
                Issue::error(
                    "invalid",
                    format!("parameter '{name}' must be a valueReference with a Type/id reference"),
                )
                .at(format!("Parameters.parameter.where(name = '{name}')")),
            )
        })
}

fn string_parameter(parameters: &Value, name: &str) -> Option<String> {
    parameter(parameters, name)?
        .get("valueString")?
        .as_str()
        .map(str::to_owned)
}

/// Marks a response whose AuditEvent its transaction stored: the gate does
/// not record another.
#[derive(Debug, Clone, Copy)]
pub struct AuditedInTransaction;

/// `POST /fhir/{type}/{id}/${operation}`.
pub async fn instance_operation(
    State(app): State<Arc<App>>,
    Path((resource_type, id, operation)): Path<(String, String, String)>,
    who: Result<Caller, CallerError>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        negotiate(&headers, query_format(query.as_deref()).as_deref())?;
        let name = operation.strip_prefix('$').unwrap_or("");
        if !OPERATIONS
            .iter()
            .any(|(t, n, _)| *t == resource_type && *n == name)
        {
            return Err(FhirError::new(
                StatusCode::NOT_FOUND,
                Issue::error(
                    "not-supported",
                    format!(
                        "{resource_type}/{{id}}/{operation} is not an operation of this server"
                    ),
                ),
            ));
        }
        let caller = rest::caller(who)?;
        crate::auth::authorize(&caller, crate::auth::Action::Operation(&format!("${name}")))
            .map_err(super::forbidden)?;
        let bytes = collect(&app, body).await?;
        let parameters = if bytes.iter().all(u8::is_ascii_whitespace) {
            Value::Null
        } else {
            require_json_body(&headers, &[])?;
            let value = parse_json(&bytes)?;
            if value.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
                return Err(FhirError::bad_request(format!(
                    "${name} takes a Parameters resource (or no body)"
                )));
            }
            // `{"resourceType": "Parameters"}` (no parameters) is how
            // clients say "none"; anything more is validated.
            if value.as_object().is_some_and(|o| o.len() > 1) {
                rest::check_valid("Parameters", &value).await?;
            }
            value
        };
        let workflow = &app.workflow;
        let (_, now_ms) = now();
        let mut tx = app.cases.begin().await?;
        // The operation's event is stored with the change it made, naming
        // what it wrote.
        let event = AuditRecord::new(Kind::Operation, "E", Actor::Caller(caller.clone()))
            .outcome(Outcome::Success, None)
            .entity(Entity::operation(&format!(
                "{resource_type}/{id}/{operation}"
            )));
        let changed: Record = match name {
            "propose" => {
                let proposal = workflow.proposal(tx.records(), &id, now_ms).await?;
                let out = serde_json::json!({"resourceType": "Parameters", "parameter": [
                    {"name": "owner", "valueReference": {"reference": proposal.owner}},
                    {"name": "requested", "valueBoolean": proposal.requested},
                    {"name": "openCases", "valueInteger": proposal.open_cases},
                ]});
                // The consent re-check may have moved the case.
                tx.commit_audited(event.to_resource()).await?;
                let mut response = json_response(StatusCode::OK, out.to_string());
                response.extensions_mut().insert(AuditedInTransaction);
                return Ok(response);
            }
            "assign" => {
                let owner = reference_parameter(&parameters, "owner")?;
                workflow
                    .assign(tx.records(), &id, owner.as_deref(), now_ms)
                    .await?
            }
            "approve" => workflow.approve(tx.records(), &id, now_ms).await?,
            "return" => {
                let note = string_parameter(&parameters, "note").unwrap_or_default();
                workflow
                    .return_draft(tx.records(), &id, &note, now_ms)
                    .await?
            }
            "link" => {
                let task = reference_parameter(&parameters, "task")?.ok_or_else(|| {
                    FhirError::bad_request(
                        "$link needs parameter 'task' (a Reference to the case Task)",
                    )
                })?;
                workflow.link(tx.records(), &id, &task, now_ms).await?
            }
            _ => unreachable_operation()?,
        };
        tx.commit_audited(event.to_resource()).await?;
        let mut response = json_response(StatusCode::OK, changed.body.to_string());
        response.extensions_mut().insert(AuditedInTransaction);
        Ok(response)
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

/// Every name in [`OPERATIONS`] is matched above; this keeps the match total
/// without a panic.
fn unreachable_operation() -> Result<Record, FhirError> {
    Err(FhirError::new(
        StatusCode::NOT_FOUND,
        Issue::error("not-supported", "operation not implemented"),
    ))
}
