//! The one authorisation decision: may this caller take this action? Every
//! FHIR, DICOMweb and workflow call asks [`authorize`]; which partner's data
//! a caller sees is the other half (the stores filter by
//! [`super::Caller::visible_partners`], and a resource of another partner is
//! "not found", never "forbidden").

use super::scope::Permission;
use super::{Caller, Role};

/// What a caller wants to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action<'a> {
    /// A FHIR interaction on a resource type; `None` for a system-level
    /// interaction spanning every type (`/fhir/_history`).
    Fhir(Permission, Option<&'a str>),
    /// A workflow operation (`$assign`, `$propose`, `$approve`, `$return`,
    /// `$link`).
    Operation(&'a str),
    /// STOW-RS (C-STORE is scoped by the association's partner).
    StoreImages,
    /// QIDO-RS.
    SearchImages,
    /// WADO-RS.
    RetrieveImages,
}

/// Why the policy refused (a 403 with this text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Denied(pub String);

/// The audit trail: read only by the auditor role, written by the server.
const AUDIT: &str = "AuditEvent";

/// Resources a specialist writes: the opinion and what goes with it.
const SPECIALIST_WRITES: &[&str] = &[
    "DiagnosticReport",
    "Observation",
    "Communication",
    "DocumentReference",
    "Binary",
];

/// Decide. Partners act within their granted SMART scopes (DICOMweb counts
/// as `ImagingStudy`: store = c, search = s, retrieve = r); staff within
/// the union of their roles.
pub fn authorize(caller: &Caller, action: Action<'_>) -> Result<(), Denied> {
    match caller {
        Caller::Partner(client) => {
            let (permission, resource_type) = match action {
                Action::Fhir(_, Some(AUDIT)) | Action::Fhir(_, None) => {
                    return Err(Denied(
                        "partner clients read their own cases' resources by type; \
                         the audit trail and system-wide history are the service's"
                            .into(),
                    ))
                }
                Action::Fhir(permission, resource_type) => (permission, resource_type),
                Action::Operation(name) => {
                    return Err(Denied(format!(
                        "{name} is a staff operation of the second-opinion service"
                    )))
                }
                Action::StoreImages => (Permission::Create, Some("ImagingStudy")),
                Action::SearchImages => (Permission::Search, Some("ImagingStudy")),
                Action::RetrieveImages => (Permission::Read, Some("ImagingStudy")),
            };
            if client.scopes.allows(resource_type, permission) {
                Ok(())
            } else {
                Err(Denied(format!(
                    "the access token does not grant {}; its scopes are: {}",
                    needed_scope(resource_type, permission),
                    client.scopes
                )))
            }
        }
        Caller::Staff(_) if action == Action::StoreImages => Err(Denied(
            "STOW-RS stores instances under the sending partner: use a partner system's token \
             (staff have no partner; under --dev send X-Konsil-Partner)"
                .into(),
        )),
        Caller::Staff(staff) => {
            if staff.roles.iter().any(|role| role_allows(*role, action)) {
                Ok(())
            } else {
                let roles: Vec<&str> = staff.roles.iter().map(|r| r.as_str()).collect();
                Err(Denied(format!(
                    "{} is not allowed to the role(s) {}",
                    describe(action),
                    if roles.is_empty() {
                        "(none)".to_owned()
                    } else {
                        roles.join(", ")
                    }
                )))
            }
        }
    }
}

fn role_allows(role: Role, action: Action<'_>) -> bool {
    use Permission::{Create, Delete, Read, Search, Update};
    let reads = |p: Permission| matches!(p, Read | Search);
    match (role, action) {
        (Role::Auditor, Action::Fhir(p, Some(AUDIT))) => reads(p),
        (Role::Auditor, _) => false,
        // Nobody else reads the audit trail; nobody writes it.
        (_, Action::Fhir(_, Some(AUDIT))) => false,
        // Stored images belong to the partner that sent them; staff have
        // none to store under (their studies come from partners).
        (_, Action::StoreImages) => false,
        // Approval is the approver's alone (issue 6): an administrator
        // manages the service, it does not release opinions.
        (Role::Admin, Action::Operation("$approve")) => false,
        (Role::Admin, _) => true,
        (Role::Coordinator, Action::Fhir(p, _)) => p != Delete,
        (Role::Coordinator, Action::Operation(op)) => {
            matches!(op, "$assign" | "$propose" | "$link")
        }
        (Role::Coordinator, _) => true,
        (Role::Specialist, Action::Fhir(p, t)) => {
            reads(p)
                || (matches!(p, Create | Update)
                    && t.is_some_and(|t| SPECIALIST_WRITES.contains(&t)))
        }
        (Role::Approver, Action::Fhir(p, t)) => {
            reads(p) || (p == Update && t == Some("DiagnosticReport"))
        }
        (Role::Approver, Action::Operation(op)) => matches!(op, "$approve" | "$return"),
        (Role::Specialist, Action::Operation(_)) => false,
        (Role::Specialist | Role::Approver, _) => true,
    }
}

fn needed_scope(resource_type: Option<&str>, permission: Permission) -> String {
    let letter = match permission {
        Permission::Create => 'c',
        Permission::Read => 'r',
        Permission::Update => 'u',
        Permission::Delete => 'd',
        Permission::Search => 's',
    };
    format!("system/{}.{letter}", resource_type.unwrap_or("*"))
}

fn describe(action: Action<'_>) -> String {
    match action {
        Action::Fhir(p, t) => {
            let verb = match p {
                Permission::Create => "creating",
                Permission::Read => "reading",
                Permission::Update => "updating",
                Permission::Delete => "deleting",
                Permission::Search => "searching",
            };
            format!("{verb} {}", t.unwrap_or("every resource type"))
        }
        Action::Operation(name) => name.to_owned(),
        Action::StoreImages => "storing images".to_owned(),
        Action::SearchImages => "searching images".to_owned(),
        Action::RetrieveImages => "retrieving images".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::scope::Scopes;
    use crate::auth::{PartnerClient, StaffUser};
    use crate::ids::PartnerId;

    fn staff(role: Role) -> Caller {
        Caller::Staff(StaffUser {
            subject: "t".into(),
            roles: vec![role],
            cases: None,
        })
    }

    fn partner(scopes: &str) -> Caller {
        Caller::Partner(PartnerClient {
            partner: PartnerId::parse("st-mary").unwrap(),
            client_id: Some("ehr".into()),
            scopes: Scopes::parse(scopes.split_whitespace()).unwrap(),
        })
    }

    /// Each row: caller, action, allowed.
    #[test]
    fn decision_table() {
        use Permission::*;
        let sr = Some("ServiceRequest");
        let dr = Some("DiagnosticReport");
        let audit = Some(AUDIT);
        let p =
            partner("system/ServiceRequest.cru system/DiagnosticReport.rs system/ImagingStudy.cs");
        let rows: Vec<(Caller, Action, bool)> = vec![
            (p.clone(), Action::Fhir(Create, sr), true),
            (p.clone(), Action::Fhir(Delete, sr), false),
            (p.clone(), Action::Fhir(Search, sr), false),
            (p.clone(), Action::Fhir(Read, dr), true),
            (p.clone(), Action::Fhir(Update, dr), false),
            (p.clone(), Action::Fhir(Read, Some("Patient")), false),
            (p.clone(), Action::Fhir(Read, None), false),
            (partner("system/*.rs"), Action::Fhir(Read, audit), false),
            (p.clone(), Action::Operation("$approve"), false),
            (p.clone(), Action::StoreImages, true),
            (p.clone(), Action::SearchImages, true),
            (p.clone(), Action::RetrieveImages, false),
            (staff(Role::Coordinator), Action::Fhir(Create, sr), true),
            (staff(Role::Coordinator), Action::Fhir(Delete, sr), false),
            (staff(Role::Coordinator), Action::Operation("$assign"), true),
            (staff(Role::Coordinator), Action::Operation("$link"), true),
            (
                staff(Role::Coordinator),
                Action::Operation("$propose"),
                true,
            ),
            (staff(Role::Approver), Action::Operation("$propose"), false),
            (
                staff(Role::Coordinator),
                Action::Operation("$approve"),
                false,
            ),
            (staff(Role::Coordinator), Action::Fhir(Read, audit), false),
            (staff(Role::Specialist), Action::Fhir(Create, dr), true),
            (
                staff(Role::Specialist),
                Action::Fhir(Update, Some("Task")),
                false,
            ),
            (
                staff(Role::Specialist),
                Action::Fhir(Read, Some("Task")),
                true,
            ),
            (
                staff(Role::Specialist),
                Action::Operation("$approve"),
                false,
            ),
            (staff(Role::Specialist), Action::RetrieveImages, true),
            (staff(Role::Specialist), Action::StoreImages, false),
            (staff(Role::Coordinator), Action::StoreImages, false),
            (staff(Role::Admin), Action::StoreImages, false),
            (staff(Role::Approver), Action::Operation("$approve"), true),
            (staff(Role::Approver), Action::Operation("$return"), true),
            (staff(Role::Approver), Action::Operation("$assign"), false),
            (staff(Role::Approver), Action::Fhir(Create, dr), false),
            (staff(Role::Auditor), Action::Fhir(Search, audit), true),
            (staff(Role::Auditor), Action::Fhir(Read, audit), true),
            (staff(Role::Auditor), Action::Fhir(Update, audit), false),
            (staff(Role::Auditor), Action::Fhir(Read, sr), false),
            (staff(Role::Auditor), Action::RetrieveImages, false),
            (staff(Role::Admin), Action::Fhir(Delete, sr), true),
            (staff(Role::Admin), Action::Operation("$approve"), false),
            (staff(Role::Admin), Action::Operation("$return"), true),
            (staff(Role::Admin), Action::Fhir(Read, audit), false),
            (staff(Role::Admin), Action::Fhir(Delete, audit), false),
        ];
        for (caller, action, allowed) in rows {
            let got = authorize(&caller, action);
            assert_eq!(got.is_ok(), allowed, "{caller:?} {action:?}: {got:?}");
            if let Err(Denied(why)) = got {
                assert!(!why.is_empty());
            }
        }
    }

    #[test]
    fn refusals_name_the_missing_scope() {
        let p = partner("system/ServiceRequest.cru");
        let Err(Denied(why)) = authorize(&p, Action::Fhir(Permission::Read, Some("Patient")))
        else {
            panic!("allowed")
        };
        assert!(why.contains("system/Patient.r"), "{why}");
        assert!(why.contains("system/ServiceRequest.cru"), "{why}");
    }
}
