//! The CapabilityStatement at `/fhir/metadata`, generated from what is
//! registered: [`SUPPORTED`](super::rest::SUPPORTED) types and the search
//! parameter table.

use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::negotiate;
use super::rest::{json_response, now, query_format, read_only, SUPPORTED};
use super::search::{params_of, ParamKind, PARAMS};
use crate::app::App;

pub async fn metadata(
    State(app): State<Arc<App>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let format = query_format(query.as_deref());
    if let Err(e) = negotiate(&headers, format.as_deref()) {
        return e.into_response();
    }
    let base = app.public_base(app.config.fhir.public_url.as_deref(), &headers, "/fhir");
    json_response(StatusCode::OK, capability_statement(&base).to_string())
}

fn resource_entry(resource_type: &str) -> Value {
    let interactions: &[&str] = if read_only(resource_type) {
        &[
            "read",
            "vread",
            "history-instance",
            "history-type",
            "search-type",
        ]
    } else {
        &[
            "read",
            "vread",
            "update",
            "patch",
            "delete",
            "history-instance",
            "history-type",
            "create",
            "search-type",
        ]
    };
    let mut search_params = vec![
        json!({"name": "_id", "type": "token", "documentation": "Logical id"}),
        json!({"name": "_lastUpdated", "type": "date", "documentation": "When the resource last changed"}),
    ];
    for p in params_of(resource_type) {
        search_params.push(json!({
            "name": p.name,
            "definition": format!("http://hl7.org/fhir/SearchParameter/{}-{}", p.resource, p.name),
            "type": p.kind.as_str(),
            "documentation": p.documentation,
        }));
    }
    let includes: Vec<String> = params_of(resource_type)
        .filter(|p| p.kind == ParamKind::Reference)
        .map(|p| format!("{}:{}", p.resource, p.name))
        .collect();
    let revincludes: Vec<String> = PARAMS
        .iter()
        .filter(|p| p.kind == ParamKind::Reference)
        .filter(|p| p.targets.is_empty() || p.targets.contains(&resource_type))
        .map(|p| format!("{}:{}", p.resource, p.name))
        .collect();
    let mut entry = json!({
        "type": resource_type,
        "profile": format!("http://hl7.org/fhir/StructureDefinition/{resource_type}"),
        "interaction": interactions.iter().map(|c| json!({"code": c})).collect::<Vec<_>>(),
        "versioning": "versioned-update",
        "readHistory": true,
        "updateCreate": !read_only(resource_type),
        "conditionalCreate": !read_only(resource_type),
        "conditionalRead": "not-supported",
        "conditionalUpdate": !read_only(resource_type),
        "conditionalDelete": if read_only(resource_type) { "not-supported" } else { "single" },
        "searchParam": search_params,
    });
    let mut operations = vec![json!({
        "name": "validate",
        "definition": "http://hl7.org/fhir/OperationDefinition/Resource-validate",
        "documentation": "Checks a resource against the R4 core definitions (structure, required codes, invariants) and the profiles it claims or the 'profile' parameter names; nothing is stored.",
    })];
    for (_, name, documentation) in super::operations::OPERATIONS
        .iter()
        .filter(|(t, _, _)| *t == resource_type)
    {
        operations.push(json!({
            "name": name,
            "definition": format!("http://konsil.dev/fhir/OperationDefinition/{resource_type}-{name}"),
            "documentation": format!("{documentation}. Staff only."),
        }));
    }
    entry["operation"] = Value::Array(operations);
    let supported: Vec<&str> = super::profiles::all()
        .values()
        .filter(|p| p.resource_type == resource_type)
        .map(|p| p.url.as_str())
        .collect();
    if !supported.is_empty() {
        entry["supportedProfile"] = json!(supported);
    }
    if !includes.is_empty() {
        entry["searchInclude"] = json!(includes);
    }
    if !revincludes.is_empty() {
        entry["searchRevInclude"] = json!(revincludes);
    }
    entry
}

/// The statement, for a server reached at `base`.
pub fn capability_statement(base: &str) -> Value {
    let (date, _) = now();
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": date,
        "publisher": "Konsil",
        "kind": "instance",
        "software": {"name": "Konsil", "version": env!("CARGO_PKG_VERSION")},
        "implementation": {
            "description": "Konsil second-opinion gateway: FHIR R4 edge",
            "url": base,
        },
        "fhirVersion": "4.0.1",
        "format": ["json", "application/fhir+json"],
        "patchFormat": ["application/json-patch+json"],
        "rest": [{
            "mode": "server",
            "documentation": "JSON only. Every resource is validated against the FHIR R4 core StructureDefinitions before it is stored, and stored as sent (with the server's id and meta). Unknown search parameters are ignored (reported in an OperationOutcome entry) unless Prefer: handling=strict. Paging links use keyset cursors, stable under inserts.",
            "security": {
                "service": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service", "code": "SMART-on-FHIR"}]}],
                "description": "Bearer tokens: partner systems by SMART Backend Services (client_credentials with a private_key_jwt assertion, RS384 or ES384) at the token endpoint below, SMART v2 system scopes; staff by Konsil-signed or the configured OpenID Connect issuer's tokens with roles. A partner sees only its own records (another partner's: 404). See /fhir/.well-known/smart-configuration.",
                "extension": [{
                    "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                    "extension": [{"url": "token", "valueUri": format!("{}/auth/token", base.trim_end_matches("/fhir"))}],
                }],
            },
            "resource": SUPPORTED.iter().map(|t| resource_entry(t)).collect::<Vec<_>>(),
            "interaction": [
                {"code": "transaction", "documentation": "Atomic; urn:uuid: and conditional references (Type?search) resolved; IHE MHD ITI-65 Provide Document Bundle."},
                {"code": "batch"},
                {"code": "history-system"},
            ],
        }],
    })
}
