//! FHIRPath invariants (`constraint.expression` of severity error) of the
//! elements present in a resource, evaluated with octofhir-fhirpath over the
//! submitted JSON. An invariant the engine cannot evaluate is logged and
//! passed: an engine gap must not reject a valid resource.

use std::sync::Arc;

use octofhir_fhirpath::core::trace::NoOpTraceProvider;
use octofhir_fhirpath::{create_function_registry, EmptyModelProvider, FhirPathEngine};
use serde_json::Value;
use tokio::sync::OnceCell;

use super::outcome::Issue;
use super::validate::InvariantCheck;

/// The engine, built on first use (it holds only the function registry).
async fn engine() -> Option<&'static FhirPathEngine> {
    static ENGINE: OnceCell<Option<FhirPathEngine>> = OnceCell::const_new();
    ENGINE
        .get_or_init(|| async {
            match FhirPathEngine::new(
                Arc::new(create_function_registry()),
                Arc::new(EmptyModelProvider),
            )
            .await
            {
                // trace() would print to stderr otherwise.
                Ok(engine) => Some(engine.with_trace_provider(Arc::new(NoOpTraceProvider))),
                Err(e) => {
                    tracing::error!(error = %e, "FHIRPath engine unavailable: invariants are not checked");
                    None
                }
            }
        })
        .await
        .as_ref()
}

/// Evaluate `checks` on `resource`; an issue per invariant that is false.
pub async fn evaluate(resource: &Value, checks: &[InvariantCheck<'_>]) -> Vec<Issue> {
    let mut issues = Vec::new();
    if checks.is_empty() {
        return issues;
    }
    let Some(engine) = engine().await else {
        return issues;
    };
    // Each resource (the top one, contained ones, Bundle entries) is its own
    // %resource.
    let mut by_resource: std::collections::BTreeMap<&str, Vec<&InvariantCheck<'_>>> =
        std::collections::BTreeMap::new();
    for check in checks {
        by_resource
            .entry(check.resource.as_str())
            .or_default()
            .push(check);
    }
    for (pointer, checks) in by_resource {
        let Some(focus) = resource.pointer(pointer) else {
            continue;
        };
        let session = match engine.validation_session(Arc::new(focus.clone())).await {
            Ok(session) => session,
            Err(e) => {
                tracing::warn!(error = %e, "FHIRPath could not load a resource; invariants skipped");
                continue;
            }
        };
        let resource_type = focus["resourceType"].as_str().unwrap_or("Resource");
        for check in checks {
            let expressions: Vec<&str> = check
                .constraints
                .iter()
                .map(|c| c.expression.as_str())
                .collect();
            let results = match session
                .evaluate_constraints(&check.pointer, check.type_name.as_deref(), &expressions)
                .await
            {
                Ok(results) => results,
                Err(e) => {
                    tracing::debug!(error = %e, at = %check.path, "FHIRPath focus not found; invariants skipped");
                    continue;
                }
            };
            for (constraint, result) in check.constraints.iter().zip(results) {
                match result {
                    Ok(true) => {}
                    Ok(false) => {
                        let at = if check.path.is_empty() {
                            resource_type.to_owned()
                        } else {
                            check.path.clone()
                        };
                        issues.push(
                            Issue::error(
                                "invariant",
                                format!(
                                    "{}: {} (rule: {})",
                                    constraint.key, constraint.human, constraint.expression
                                ),
                            )
                            .at(at),
                        );
                    }
                    Err(e) => tracing::debug!(
                        error = %e,
                        key = %constraint.key,
                        "FHIRPath could not evaluate an invariant; passed"
                    ),
                }
            }
        }
    }
    issues
}
