//! The one authorisation policy, both halves in this module:
//! - [`authorize`]: may this caller take this action (caller, action)?
//!   Every FHIR, DICOMweb and workflow call asks it first (403 when not).
//! - [`may_see`]: may this caller see this stored resource (caller,
//!   resource)? A partner sees its own resources, a case-restricted
//!   specialist the resources of the assigned cases, and only types the
//!   caller may read. What it may not see is "not found", never
//!   "forbidden". Searches, `_include`, histories and totals apply the
//!   same rule inside the query (the caller's partner, the case scope's
//!   clause), so a page and its total agree with [`may_see`]; DICOMweb
//!   queries and retrievals are restricted to [`visible_partners`].
use super::scope::Permission;
use super::{Caller, Role};
use crate::config::Config;
use crate::ids::PartnerId;
use crate::store::fhir::StoredResource;

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

/// The resource half of the policy: whether `caller` may see `stored`.
pub fn may_see(caller: &Caller, stored: &StoredResource) -> bool {
    let own = match caller.partner() {
        None => true,
        Some(id) => stored.partner.as_ref() == Some(id),
    };
    own && may_read_type(caller, &stored.resource_type)
        && caller.case_scope().is_none_or(|cases| cases.covers(stored))
}

/// Whether `caller` may read resources of `resource_type` at all (drops
/// `_include`d and history entries of types it may not read).
pub fn may_read_type(caller: &Caller, resource_type: &str) -> bool {
    authorize(caller, Action::Fhir(Permission::Read, Some(resource_type))).is_ok()
}

/// The partners whose data `caller` may see: what a query is restricted
/// to before it runs (staff: every configured partner).
pub fn visible_partners(caller: &Caller, config: &Config) -> Vec<PartnerId> {
    match caller {
        Caller::Staff(_) => config.partners.iter().map(|p| p.id.clone()).collect(),
        Caller::Partner(client) => vec![client.partner.clone()],
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
    fn callers_see_their_own_partners_and_cases_resources_only() {
        let stored = |resource_type: &str, id: &str, partner: Option<&str>| StoredResource {
            resource_type: resource_type.into(),
            id: id.into(),
            version: 1,
            last_updated: String::new(),
            updated_ms: 0,
            partner: partner.map(|p| PartnerId::parse(p).unwrap()),
            body: Some(format!(
                r#"{{"resourceType":"{resource_type}","id":"{id}"}}"#
            )),
            method: "POST".into(),
            blob: None,
        };
        let ours = stored("Task", "t1", Some("st-mary"));
        let theirs = stored("Task", "t2", Some("city-clinic"));
        let trail = stored("AuditEvent", "a1", None);
        let p = partner("system/*.rs");
        assert!(may_see(&p, &ours));
        assert!(!may_see(&p, &theirs));
        assert!(!may_see(&p, &trail));
        assert!(
            !may_see(&partner("system/Patient.rs"), &ours),
            "no Task scope"
        );
        let coordinator = staff(Role::Coordinator);
        assert!(may_see(&coordinator, &ours) && may_see(&coordinator, &theirs));
        assert!(!may_see(&coordinator, &trail));
        assert!(may_see(&staff(Role::Auditor), &trail));
        assert!(!may_see(&staff(Role::Auditor), &ours));
        let specialist = Caller::Staff(StaffUser {
            subject: "dr-a".into(),
            roles: vec![Role::Specialist],
            cases: Some(std::sync::Arc::new(crate::auth::cases::CaseScope {
                tasks: ["t1".to_owned()].into(),
                ..Default::default()
            })),
        });
        assert!(may_see(&specialist, &ours));
        assert!(!may_see(&specialist, &theirs), "a case not assigned");
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
