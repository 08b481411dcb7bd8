//! Specialists see the cases assigned to them, and nothing else of
//! patients' records.
//!
//! A staff member whose roles give no wider view (specialist, without
//! coordinator, approver or admin) is matched to the roster by
//! `Practitioner.identifier` = (`http://konsil.dev/fhir/sid/staff`, token
//! subject). Their cases are the Tasks owned by that Practitioner or one of
//! its PractitionerRoles; what they may see is those Tasks, their patients
//! and the patients' records (resources whose `subject` / `patient` / `for`
//! / `beneficiary` is one of those patients, Binaries their
//! DocumentReferences and DiagnosticReports point at), plus the service's directory
//! (practitioners, roles, organizations). Anyone unmatched sees no patient
//! records at all. Worked out per request, from the index (a few small
//! queries), so an assignment takes effect at once.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::audit::STAFF_SID;
use crate::fhir::search;
use crate::store::fhir::{Clause, ResourceQuery, ResourceStore, Sort, StoredResource};
use crate::store::MetaError;

use super::{Caller, Role};

/// Resource types that hold no patient's records.
pub const DIRECTORY: [&str; 6] = [
    "Practitioner",
    "PractitionerRole",
    "Organization",
    "Endpoint",
    "Location",
    "HealthcareService",
];

/// Elements that name the patient a record is about.
const PATIENT_ELEMENTS: [&str; 4] = ["subject", "patient", "for", "beneficiary"];

/// Most resources one query of the scope reads.
const QUERY_LIMIT: usize = 10_000;

/// What a case-restricted staff member may see.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CaseScope {
    pub tasks: BTreeSet<String>,
    pub patients: BTreeSet<String>,
    pub binaries: BTreeSet<String>,
    /// StudyInstanceUIDs of the cases' ImagingStudy resources.
    pub studies: BTreeSet<String>,
}

/// Whether these roles see only assigned cases.
pub fn restricted(roles: &[Role]) -> bool {
    roles.contains(&Role::Specialist)
        && !roles
            .iter()
            .any(|r| matches!(r, Role::Coordinator | Role::Approver | Role::Admin))
}

/// `caller`, with its case scope when it is a case-restricted staff member.
pub async fn scoped(resources: &dyn ResourceStore, caller: Caller) -> Result<Caller, MetaError> {
    match caller {
        Caller::Staff(mut staff) if restricted(&staff.roles) => {
            let scope = CaseScope::of(resources, &staff.subject).await?;
            staff.cases = Some(std::sync::Arc::new(scope));
            Ok(Caller::Staff(staff))
        }
        other => Ok(other),
    }
}

impl CaseScope {
    /// The cases assigned to the staff member `subject`.
    pub async fn of(resources: &dyn ResourceStore, subject: &str) -> Result<CaseScope, MetaError> {
        let mut scope = CaseScope::default();
        let practitioners = ids(
            resources,
            "Practitioner",
            Clause::Token {
                param: "Practitioner.identifier".into(),
                values: vec![(Some(STAFF_SID.to_owned()), Some(subject.to_owned()))],
            },
        )
        .await?;
        if practitioners.is_empty() {
            return Ok(scope);
        }
        let practitioner_refs: Vec<String> = practitioners
            .iter()
            .map(|(id, _)| format!("Practitioner/{id}"))
            .collect();
        let roles = ids(
            resources,
            "PractitionerRole",
            Clause::Reference {
                param: "PractitionerRole.practitioner".into(),
                targets: practitioner_refs.clone(),
            },
        )
        .await?;
        let mut owners = practitioner_refs;
        owners.extend(roles.iter().map(|(id, _)| format!("PractitionerRole/{id}")));
        for (id, task) in ids(
            resources,
            "Task",
            Clause::Reference {
                param: "Task.owner".into(),
                targets: owners,
            },
        )
        .await?
        {
            if let Some(patient) = reference_id(&task["for"], "Patient") {
                scope.patients.insert(patient);
            }
            scope.tasks.insert(id);
        }
        if scope.patients.is_empty() {
            return Ok(scope);
        }
        let patient_refs: Vec<String> = scope
            .patients
            .iter()
            .map(|id| format!("Patient/{id}"))
            .collect();
        // Binaries reached through the cases' documents and reports.
        for (resource_type, attachments) in [
            ("DocumentReference", "/content/*/attachment"),
            ("DiagnosticReport", "/presentedForm/*"),
        ] {
            for (_, record) in ids(
                resources,
                resource_type,
                Clause::Reference {
                    param: format!("{resource_type}.patient"),
                    targets: patient_refs.clone(),
                },
            )
            .await?
            {
                for url in attachment_urls(&record, attachments) {
                    if let Some((_, id)) = url.rsplit_once("Binary/") {
                        scope.binaries.insert(id.to_owned());
                    }
                }
            }
        }
        for (_, study) in ids(
            resources,
            "ImagingStudy",
            Clause::Reference {
                param: "ImagingStudy.patient".into(),
                targets: patient_refs,
            },
        )
        .await?
        {
            let identifiers = study["identifier"].as_array().into_iter().flatten();
            for identifier in identifiers.filter(|i| i["system"] == "urn:dicom:uid") {
                if let Some(uid) = identifier["value"].as_str() {
                    scope
                        .studies
                        .insert(uid.trim_start_matches("urn:oid:").to_owned());
                }
            }
        }
        Ok(scope)
    }

    /// Whether `stored` is within the cases.
    pub fn covers(&self, stored: &StoredResource) -> bool {
        let id = &stored.id;
        match stored.resource_type.as_str() {
            t if DIRECTORY.contains(&t) => true,
            "Patient" => self.patients.contains(id),
            "Task" => self.tasks.contains(id),
            "Binary" => self.binaries.contains(id),
            _ => stored
                .body
                .as_deref()
                .and_then(|b| serde_json::from_str::<Value>(b).ok())
                .is_some_and(|body| self.about_a_case_patient(&body)),
        }
    }

    /// Whether a record (not a Patient, Task or Binary) names one of the
    /// cases' patients as what it is about.
    pub fn about_a_case_patient(&self, body: &Value) -> bool {
        PATIENT_ELEMENTS.iter().any(|element| {
            reference_id(&body[*element], "Patient")
                .is_some_and(|patient| self.patients.contains(&patient))
        })
    }

    /// The search condition that keeps a search of `resource_type` within
    /// the cases; `Err` for a type of patients' records that has no
    /// `patient` search parameter to restrict it by.
    pub fn clause(&self, resource_type: &str) -> Result<Option<Clause>, String> {
        let ids = |set: &BTreeSet<String>| Clause::Ids(set.iter().cloned().collect());
        Ok(match resource_type {
            t if DIRECTORY.contains(&t) => None,
            "Patient" => Some(ids(&self.patients)),
            "Task" => Some(ids(&self.tasks)),
            "Binary" => Some(ids(&self.binaries)),
            t => {
                let param = search::param(t, "patient").ok_or_else(|| {
                    format!(
                        "{t} cannot be searched by a specialist (it has no patient parameter to keep \
                         the search within the assigned cases)"
                    )
                })?;
                Some(Clause::Reference {
                    param: search::key(param),
                    targets: self
                        .patients
                        .iter()
                        .map(|p| format!("Patient/{p}"))
                        .collect(),
                })
            }
        })
    }
}

/// The `url`s of the attachments at `path` (`/a/*/b`: every item of the
/// array `a`, then `b`).
fn attachment_urls<'v>(record: &'v Value, path: &str) -> Vec<&'v str> {
    let mut nodes = vec![record];
    for step in path.trim_start_matches('/').split('/') {
        nodes = if step == "*" {
            nodes
                .into_iter()
                .filter_map(Value::as_array)
                .flatten()
                .collect()
        } else {
            nodes.into_iter().map(|n| &n[step]).collect()
        };
    }
    nodes
        .into_iter()
        .filter_map(|n| n["url"].as_str())
        .collect()
}

/// The id in a reference to `resource_type` (relative or absolute URL).
fn reference_id(reference: &Value, resource_type: &str) -> Option<String> {
    let text = reference["reference"].as_str()?;
    let (_, id) = text.rsplit_once(&format!("{resource_type}/"))?;
    (!id.is_empty() && !id.contains('/')).then(|| id.to_owned())
}

/// (id, body) of the current resources of `resource_type` matching `clause`.
async fn ids(
    resources: &dyn ResourceStore,
    resource_type: &str,
    clause: Clause,
) -> Result<Vec<(String, Value)>, MetaError> {
    let page = resources
        .search(&ResourceQuery {
            resource_type: resource_type.to_owned(),
            partners: None,
            clauses: vec![clause],
            sort: Sort::Created,
            after: None,
            count: QUERY_LIMIT,
            want_total: false,
        })
        .await?;
    Ok(page
        .resources
        .into_iter()
        .filter_map(|r| {
            let body = serde_json::from_str(r.body.as_deref()?).ok()?;
            Some((r.id, body))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(resource_type: &str, id: &str, body: Value) -> StoredResource {
        StoredResource {
            resource_type: resource_type.into(),
            id: id.into(),
            version: 1,
            last_updated: String::new(),
            updated_ms: 0,
            partner: None,
            body: Some(body.to_string()),
            method: "POST".into(),
            blob: None,
        }
    }

    #[test]
    fn only_the_assigned_patients_records_are_covered() {
        let scope = CaseScope {
            tasks: ["t1".to_owned()].into(),
            patients: ["p1".to_owned()].into(),
            binaries: ["b1".to_owned()].into(),
            studies: BTreeSet::new(),
        };
        let about = |patient: &str| serde_json::json!({"subject": {"reference": format!("Patient/{patient}")}});
        assert!(scope.covers(&stored("DiagnosticReport", "r", about("p1"))));
        assert!(!scope.covers(&stored("DiagnosticReport", "r", about("p2"))));
        assert!(scope.covers(&stored(
            "Consent",
            "c",
            serde_json::json!({"patient": {"reference": "https://gw/fhir/Patient/p1"}})
        )));
        assert!(scope.covers(&stored("Patient", "p1", serde_json::json!({}))));
        assert!(!scope.covers(&stored("Patient", "p2", serde_json::json!({}))));
        assert!(scope.covers(&stored("Task", "t1", serde_json::json!({}))));
        assert!(!scope.covers(&stored("Binary", "b2", serde_json::json!({}))));
        assert!(scope.covers(&stored("PractitionerRole", "x", serde_json::json!({}))));
        assert!(!scope.covers(&stored("Observation", "o", serde_json::json!({}))));
        let report =
            serde_json::json!({"presentedForm": [{"url": "Binary/pdf-1"}, {"data": "AA=="}]});
        assert_eq!(
            attachment_urls(&report, "/presentedForm/*"),
            ["Binary/pdf-1"]
        );
        let note =
            serde_json::json!({"content": [{"attachment": {"url": "https://gw/fhir/Binary/n-1"}}]});
        assert_eq!(
            attachment_urls(&note, "/content/*/attachment"),
            ["https://gw/fhir/Binary/n-1"]
        );
        assert!(restricted(&[Role::Specialist]));
        assert!(!restricted(&[Role::Specialist, Role::Coordinator]));
        assert!(!restricted(&[Role::Coordinator]));
    }
}
