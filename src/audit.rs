//! The audit trail: one ATNA-shaped FHIR `AuditEvent` (type, subtype,
//! action, outcome, agent, source, entity) per access to patient data.
//!
//! A write's event goes into the transaction of the write
//! ([`crate::fhir::records::CaseTx`]). Reads, searches and token issues
//! change nothing, so their events go through [`Auditor`], a background
//! writer that stores them in batches (at shutdown it flushes).
//!
//! A DICOM store (an association, a STOW-RS request, an import) has one
//! event for all it stored, so it goes through [`Auditor`] too when the
//! transfer ends; but each instance's index transaction notes it under its
//! [`TransferId`] in the index, and the transaction that stores the event
//! takes those notes. Notes a crash leaves behind become events at the next
//! start ([`audit_interrupted_transfers`]): no stored instance is ever
//! missing from the trail.
//! The trail is read by the auditor role only and is never writable or
//! deletable through the API.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

use crate::auth::{Caller, Role};
use crate::ids::TransferId;
use crate::store::UnauditedTransfer;
use crate::workflow::engine::{instant_text, SERVICE_ORGANIZATION};
use crate::workflow::records::RecordStore;

const DCM: &str = "http://dicom.nema.org/resources/ontology/DCM";
const EVENT_TYPE: &str = "http://terminology.hl7.org/CodeSystem/audit-event-type";
const RESTFUL: &str = "http://hl7.org/fhir/restful-interaction";
/// Konsil's own event subtypes (retention, notification, workflow).
pub const KONSIL_SUBTYPE: &str = "http://konsil.dev/fhir/CodeSystem/audit-subtype";
/// Identifier systems of who acted.
pub const PARTNER_SID: &str = "http://konsil.dev/fhir/sid/partner";
pub const CLIENT_SID: &str = "http://konsil.dev/fhir/sid/client-id";
pub const STAFF_SID: &str = "http://konsil.dev/fhir/sid/staff";
pub const AE_SID: &str = "http://konsil.dev/fhir/sid/ae-title";
/// DICOM UIDs as entity identifiers.
const UID_SID: &str = "urn:dicom:uid";

/// What happened (the event's type and subtype, and its action code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A FHIR RESTful interaction; the code is its `restful-interaction`.
    Rest(&'static str),
    /// A FHIR operation (`$assign`, …).
    Operation,
    /// Instances received (C-STORE, STOW-RS).
    DicomStore,
    /// Instances or metadata sent (WADO-RS).
    DicomRetrieve,
    /// A DICOM query (QIDO-RS).
    DicomQuery,
    /// An access token issued (SMART Backend Services).
    Login,
    /// Records the workflow wrote on its own (a study's arrival, a
    /// deadline); the code is the `restful-interaction` it amounts to.
    Workflow(&'static str),
}

/// How it ended (AuditEvent.outcome).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// Refused or failed for the caller's reasons (4xx).
    MinorFailure,
    /// Failed on our side (5xx).
    SeriousFailure,
}

impl Outcome {
    /// The outcome of an HTTP answer.
    pub fn of_status(status: u16) -> Outcome {
        match status {
            0..=399 => Outcome::Success,
            400..=499 => Outcome::MinorFailure,
            _ => Outcome::SeriousFailure,
        }
    }

    fn code(self) -> &'static str {
        match self {
            Outcome::Success => "0",
            Outcome::MinorFailure => "4",
            Outcome::SeriousFailure => "8",
        }
    }
}

/// Who acted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    Caller(Caller),
    /// A DICOM association of a partner, by calling AE title.
    Association {
        partner: String,
        calling_ae: String,
    },
    /// A client of a partner asking for a token.
    Client {
        partner: String,
        client_id: String,
    },
    /// A request whose credentials were missing or refused.
    Unidentified,
    /// Someone at the server's command line (`konsil import`), by OS user.
    Operator {
        user: String,
    },
    /// A partner, when no more is known of who acted (a transfer the
    /// server stopped in the middle of).
    Partner {
        partner: String,
    },
    /// The service itself (its workflow acting on its own).
    Service,
}

impl AuditRecord {
    /// A request refused for missing or bad credentials (401, or an
    /// unknown development partner): a failed login, with the reason and
    /// the path asked for (never the token).
    pub fn refused_credentials(reason: &str, path: &str) -> AuditRecord {
        AuditRecord::new(Kind::Login, "E", Actor::Unidentified).outcome(
            Outcome::MinorFailure,
            Some(format!("{reason} (request to {path})")),
        )
    }
}

/// What was involved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entity {
    /// A FHIR resource (`Type/id` or `Type/id/_history/n`).
    Resource(String),
    /// A DICOM study by its UID, with the number of instances concerned
    /// when known.
    Study { uid: String, instances: Option<u64> },
    /// A search: the resource type (or DICOM level) and the query string.
    Query { target: String, query: String },
    /// A FHIR operation (`$assign`, `$approve`, ...) and what it was
    /// invoked on: `Type/id`, a resource type, or nothing (system level).
    Operation { target: String, name: String },
}

impl Entity {
    /// The entity of an operation request's path below the FHIR base
    /// (`Task/x/$assign`, `ServiceRequest/$validate`, `$link`).
    pub fn operation(path: &str) -> Entity {
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let at = segments
            .iter()
            .position(|s| s.starts_with('$'))
            .unwrap_or(segments.len());
        Entity::Operation {
            target: segments[..at.min(2)].join("/"),
            name: segments.get(at).map(|s| s.to_string()).unwrap_or_default(),
        }
    }
}

/// One audit record, before it becomes an AuditEvent.
#[derive(Debug, Clone)]
pub struct AuditRecord {
    pub kind: Kind,
    /// C, R, U, D or E.
    pub action: &'static str,
    pub outcome: Outcome,
    pub outcome_desc: Option<String>,
    pub actor: Actor,
    pub entities: Vec<Entity>,
    pub recorded_ms: i64,
    /// A DICOM store's transfer: the instances it stored that the record
    /// does not name yet are added from the index's notes, which the
    /// transaction storing the record clears.
    pub transfer: Option<TransferId>,
}

impl AuditRecord {
    pub fn new(kind: Kind, action: &'static str, actor: Actor) -> AuditRecord {
        AuditRecord {
            kind,
            action,
            outcome: Outcome::Success,
            outcome_desc: None,
            actor,
            entities: Vec::new(),
            recorded_ms: chrono::Utc::now().timestamp_millis(),
            transfer: None,
        }
    }

    pub fn transfer(mut self, transfer: TransferId) -> AuditRecord {
        self.transfer = Some(transfer);
        self
    }

    /// Name the studies of `stored` that the record does not name yet,
    /// with how many instances were stored.
    fn add_stored(&mut self, stored: &[UnauditedTransfer]) {
        for note in stored {
            let named = self
                .entities
                .iter()
                .any(|e| matches!(e, Entity::Study { uid, .. } if *uid == note.study_uid));
            if !named {
                self.entities.push(Entity::Study {
                    uid: note.study_uid.clone(),
                    instances: Some(note.instances),
                });
            }
        }
    }

    pub fn outcome(mut self, outcome: Outcome, description: Option<String>) -> AuditRecord {
        self.outcome = outcome;
        self.outcome_desc = description;
        self
    }

    pub fn entity(mut self, entity: Entity) -> AuditRecord {
        self.entities.push(entity);
        self
    }

    /// The FHIR R4 AuditEvent.
    pub fn to_resource(&self) -> Value {
        let (event_type, subtype) = match self.kind {
            Kind::Rest(code) | Kind::Workflow(code) => (
                json!({"system": EVENT_TYPE, "code": "rest", "display": "RESTful Operation"}),
                json!({"system": RESTFUL, "code": code}),
            ),
            Kind::Operation => (
                json!({"system": EVENT_TYPE, "code": "rest", "display": "RESTful Operation"}),
                json!({"system": RESTFUL, "code": "operation"}),
            ),
            Kind::DicomStore | Kind::DicomRetrieve => (
                json!({"system": DCM, "code": "110104", "display": "DICOM Instances Transferred"}),
                json!({"system": DCM, "code": "110104", "display": "DICOM Instances Transferred"}),
            ),
            Kind::DicomQuery => (
                json!({"system": DCM, "code": "110112", "display": "Query"}),
                json!({"system": DCM, "code": "110112", "display": "Query"}),
            ),
            Kind::Login => (
                json!({"system": DCM, "code": "110114", "display": "User Authentication"}),
                json!({"system": DCM, "code": "110122", "display": "Login"}),
            ),
        };
        let mut subtypes = vec![subtype];
        if matches!(self.kind, Kind::Workflow(_)) {
            subtypes.push(json!({"system": KONSIL_SUBTYPE, "code": "workflow", "display": "Workflow update (no client request)"}));
        }
        let mut event = json!({
            "resourceType": "AuditEvent",
            "type": event_type,
            "subtype": subtypes,
            "action": self.action,
            "recorded": instant_text(self.recorded_ms),
            "outcome": self.outcome.code(),
            "agent": [self.agent()],
            "source": {
                "observer": {"reference": SERVICE_ORGANIZATION},
                "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "4", "display": "Application Server"}],
            },
        });
        if let Some(desc) = &self.outcome_desc {
            event["outcomeDesc"] = json!(desc);
        }
        let entities: Vec<Value> = self.entities.iter().map(entity_json).collect();
        if !entities.is_empty() {
            event["entity"] = Value::Array(entities);
        }
        event
    }

    fn agent(&self) -> Value {
        let (who, alt, roles): (Value, Option<String>, Vec<&str>) = match &self.actor {
            Actor::Caller(Caller::Staff(staff)) => (
                json!({"identifier": {"system": STAFF_SID, "value": staff.subject}}),
                None,
                staff.roles.iter().map(|r: &Role| r.as_str()).collect(),
            ),
            Actor::Caller(Caller::Partner(client)) => (
                json!({"identifier": {"system": PARTNER_SID, "value": client.partner.to_string()}}),
                client.client_id.clone(),
                Vec::new(),
            ),
            Actor::Association {
                partner,
                calling_ae,
            } => (
                json!({"identifier": {"system": PARTNER_SID, "value": partner}}),
                Some(calling_ae.clone()),
                Vec::new(),
            ),
            Actor::Client { partner, client_id } => (
                json!({"identifier": {"system": PARTNER_SID, "value": partner}}),
                Some(client_id.clone()),
                Vec::new(),
            ),
            Actor::Unidentified => (
                json!({"display": "unidentified caller (no valid credentials)"}),
                None,
                Vec::new(),
            ),
            Actor::Operator { user } => (
                json!({"display": format!("server operator {user} (command line)")}),
                None,
                Vec::new(),
            ),
            Actor::Partner { partner } => (
                json!({"identifier": {"system": PARTNER_SID, "value": partner}}),
                None,
                Vec::new(),
            ),
            Actor::Service => (json!({"reference": SERVICE_ORGANIZATION}), None, Vec::new()),
        };
        let mut agent = json!({"who": who, "requestor": true});
        if self.actor == Actor::Service {
            agent["type"] =
                json!({"coding": [{"system": DCM, "code": "110150", "display": "Application"}]});
        }
        if let Some(alt) = alt {
            agent["altId"] = json!(alt);
        }
        if !roles.is_empty() {
            agent["role"] = Value::Array(roles.iter().map(|r| json!({"text": r})).collect());
        }
        agent
    }
}

impl Entity {
    /// The `AuditEvent.entity` element.
    pub fn to_json(&self) -> Value {
        entity_json(self)
    }
}

fn entity_json(entity: &Entity) -> Value {
    use base64::Engine;
    match entity {
        Entity::Resource(reference) => object_entity(reference),
        Entity::Operation { target, name } => {
            let mut e = object_entity(target);
            if !name.is_empty() {
                e["detail"] = json!([{"type": "operation", "valueString": name}]);
            }
            e
        }
        Entity::Study { uid, instances } => {
            let mut e = json!({
                "what": {"identifier": {"system": UID_SID, "value": format!("urn:oid:{uid}")}},
                "type": {"system": DCM, "code": "110180", "display": "Study Instance UID"},
            });
            if let Some(n) = instances {
                e["description"] = json!(format!("{n} instance(s)"));
            }
            e
        }
        Entity::Query { target, query } => {
            let mut e = system_object(target);
            // FHIR has no empty strings: a query without parameters has none.
            if !query.is_empty() {
                e["query"] =
                    json!(base64::engine::general_purpose::STANDARD.encode(query.as_bytes()));
            }
            e
        }
    }
}

/// What a request was about: a literal reference when it names one
/// (`Type/id`, `Type/id/_history/n`); else (a resource type, the whole
/// system, or an id no resource can have) a system object described by
/// the text, so the record stays a valid AuditEvent and is kept.
fn object_entity(target: &str) -> Value {
    // The trail is validated like every stored resource: a reference is
    // one only where the validator takes it as one.
    let defs = crate::fhir::definitions::Definitions::core();
    if crate::fhir::validate::is_resource_reference(defs, target) {
        json!({"what": {"reference": target}})
    } else {
        system_object(target)
    }
}

/// A system object described by `text` (FHIR has no empty strings: none
/// is "(all)").
fn system_object(text: &str) -> Value {
    json!({
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2", "display": "System Object"},
        "description": if text.is_empty() { "(all)" } else { text },
    })
}

/// Stores audit records of what changed nothing, in batches, off the
/// request path. Cloning is cheap.
#[derive(Clone)]
pub struct Auditor {
    queue: mpsc::Sender<AuditRecord>,
}

/// The receiving end, run by [`Auditor::run`].
pub struct AuditWriter {
    queue: mpsc::Receiver<AuditRecord>,
    records: Arc<dyn RecordStore>,
}

/// Records queued at most; a full queue makes callers wait (the trail is
/// never dropped to keep up).
const QUEUE: usize = 4096;
/// Records per transaction.
const BATCH: usize = 256;

impl Auditor {
    pub fn new(records: Arc<dyn RecordStore>) -> (Auditor, AuditWriter) {
        let (queue, rx) = mpsc::channel(QUEUE);
        (Auditor { queue }, AuditWriter { queue: rx, records })
    }

    /// Queue a record.
    pub async fn record(&self, record: AuditRecord) {
        if self.queue.send(record).await.is_err() {
            tracing::error!("the audit writer has stopped; an audit record was not stored");
        }
    }
}

impl AuditWriter {
    /// Store queued records until `stop`, then what is left.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            tokio::select! {
                n = self.queue.recv_many(&mut batch, BATCH) => {
                    if n == 0 {
                        break;
                    }
                    self.store(&mut batch).await;
                }
                _ = async { let _ = stop.wait_for(|s| *s).await; } => {
                    // Writers still running may queue a few more.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    self.queue.close();
                    while self.queue.recv_many(&mut batch, BATCH).await > 0 {
                        self.store(&mut batch).await;
                    }
                    break;
                }
            }
        }
    }

    /// Store a batch in one transaction; if that fails, each record alone,
    /// so one bad record (a defect) costs no other.
    async fn store(&self, batch: &mut Vec<AuditRecord>) {
        if self.try_store(batch).await.is_err() {
            for record in batch.iter() {
                let mut attempt = 0u32;
                while let Err(e) = self.try_store(std::slice::from_ref(record)).await {
                    attempt += 1;
                    if attempt >= 5 {
                        tracing::error!(error = %e, "an audit record could not be stored");
                        break;
                    }
                    tracing::warn!(error = %e, attempt, "storing an audit record failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                }
            }
        }
        batch.clear();
    }

    async fn try_store(
        &self,
        batch: &[AuditRecord],
    ) -> Result<(), crate::workflow::records::WorkflowError> {
        store_records(&*self.records, batch).await
    }
}

/// Store `batch` as AuditEvents in one transaction (the writer's batches,
/// or one record of a command-line run that has no writer).
pub async fn store_records(
    records: &dyn RecordStore,
    batch: &[AuditRecord],
) -> Result<(), crate::workflow::records::WorkflowError> {
    let mut tx = records.begin().await?;
    for record in batch {
        let event = match record.transfer {
            Some(transfer) => {
                let stored = tx
                    .records()
                    .take_unaudited_transfers(Some(transfer))
                    .await?;
                let mut record = record.clone();
                record.add_stored(&stored);
                record.to_resource()
            }
            None => record.to_resource(),
        };
        tx.records().create("AuditEvent", None, event).await?;
    }
    tx.commit().await
}

/// At start-up: store the events of the transfers a stop in the middle
/// (a crash, a kill) left unaudited, one per transfer, from the index's
/// notes of what they stored. Returns how many.
pub async fn audit_interrupted_transfers(
    records: &dyn RecordStore,
) -> Result<usize, crate::workflow::records::WorkflowError> {
    let mut tx = records.begin().await?;
    let notes = tx.records().take_unaudited_transfers(None).await?;
    // Sorted by transfer, then partner: one event per run of equal keys.
    let mut events = 0;
    for run in notes.chunk_by(|a, b| (a.transfer, &a.partner) == (b.transfer, &b.partner)) {
        let first = &run[0];
        let actor = match &first.calling_ae {
            Some(calling_ae) => Actor::Association {
                partner: first.partner.clone(),
                calling_ae: calling_ae.clone(),
            },
            None => Actor::Partner {
                partner: first.partner.clone(),
            },
        };
        let what = match first.source.as_str() {
            "dimse" => "DICOM association",
            "stow" => "STOW-RS request",
            "import" => "konsil import",
            _ => "transfer",
        };
        let description = if first.transfer.is_some() {
            format!(
                "{what} cut off before its audit record was stored (its process stopped); \
                 recorded at the next server start from what the index holds"
            )
        } else {
            format!(
                "{what}: index entries rebuilt from the blob store at start-up \
                 (the original transfer is not known)"
            )
        };
        let mut record = AuditRecord::new(Kind::DicomStore, "C", actor)
            .outcome(Outcome::Success, Some(description));
        record.add_stored(run);
        tx.records()
            .create("AuditEvent", None, record.to_resource())
            .await?;
        events += 1;
    }
    tx.commit().await?;
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{PartnerClient, Scopes, StaffUser};
    use crate::ids::PartnerId;

    #[test]
    fn events_are_atna_shaped_and_name_who_and_what() {
        let partner = Caller::Partner(PartnerClient {
            partner: PartnerId::parse("st-mary").unwrap(),
            client_id: Some("st-mary-ehr".into()),
            scopes: Scopes::everything(),
        });
        let e = AuditRecord::new(Kind::Rest("search-type"), "E", Actor::Caller(partner))
            .entity(Entity::Query {
                target: "Patient".into(),
                query: "name=x".into(),
            })
            .to_resource();
        assert_eq!(e["type"]["code"], "rest");
        assert_eq!(e["subtype"][0]["code"], "search-type");
        assert_eq!(e["outcome"], "0");
        assert_eq!(e["agent"][0]["who"]["identifier"]["value"], "st-mary");
        assert_eq!(e["agent"][0]["altId"], "st-mary-ehr");
        assert_eq!(e["entity"][0]["query"], "bmFtZT14");
        let bare = AuditRecord::new(
            Kind::Rest("search-type"),
            "E",
            Actor::Client {
                partner: "st-mary".into(),
                client_id: "x".into(),
            },
        )
        .entity(Entity::Query {
            target: "Patient".into(),
            query: String::new(),
        })
        .to_resource();
        assert!(bare["entity"][0].get("query").is_none());
        assert_eq!(e["source"]["observer"]["reference"], SERVICE_ORGANIZATION);

        let staff = Caller::Staff(StaffUser {
            subject: "alice".into(),
            roles: vec![Role::Approver],
            cases: None,
        });
        let e = AuditRecord::new(Kind::DicomRetrieve, "R", Actor::Caller(staff))
            .outcome(Outcome::of_status(404), Some("not found".into()))
            .entity(Entity::Study {
                uid: "1.2.3".into(),
                instances: Some(2),
            })
            .to_resource();
        assert_eq!(e["type"]["code"], "110104");
        assert_eq!(e["outcome"], "4");
        assert_eq!(e["outcomeDesc"], "not found");
        assert_eq!(e["agent"][0]["role"][0]["text"], "approver");
        assert_eq!(
            e["entity"][0]["what"]["identifier"]["value"],
            "urn:oid:1.2.3"
        );
    }

    /// Every operation request gets an AuditEvent the validator takes
    /// (the whole path `Task/x/$assign` as a reference was refused, and
    /// the event of each `$assign` / `$approve` was lost).
    #[tokio::test]
    async fn operation_and_odd_path_events_are_valid_audit_events() {
        let cases = [
            (
                Entity::operation("Task/t1/$assign"),
                Some("Task/t1"),
                Some("$assign"),
            ),
            (
                Entity::operation("ServiceRequest/$validate"),
                None,
                Some("$validate"),
            ),
            (Entity::operation("$link"), None, Some("$link")),
            (
                Entity::operation("Task/not an id!/$assign"),
                None,
                Some("$assign"),
            ),
            (Entity::operation("Patient/p/x/y"), Some("Patient/p"), None),
            (
                Entity::Resource("Task/t1/_history/2".into()),
                Some("Task/t1/_history/2"),
                None,
            ),
            (Entity::Resource("Task/bad id".into()), None, None),
            (Entity::Resource("NotAType/1".into()), None, None),
        ];
        for (entity, reference, operation) in cases {
            let what = format!("{entity:?}");
            let e = AuditRecord::new(
                Kind::Operation,
                "E",
                Actor::Client {
                    partner: "st-mary".into(),
                    client_id: "x".into(),
                },
            )
            .entity(entity)
            .to_resource();
            let found = crate::fhir::rest::check_valid("AuditEvent", &e).await;
            assert!(found.is_ok(), "{what}: {found:?}");
            let entity = &e["entity"][0];
            assert_eq!(entity["what"]["reference"].as_str(), reference, "{what}");
            assert_eq!(
                entity["detail"][0]["valueString"].as_str(),
                operation,
                "{what}"
            );
            if reference.is_none() {
                assert!(
                    entity["description"]
                        .as_str()
                        .is_some_and(|d| !d.is_empty()),
                    "{what}"
                );
            }
        }
    }
}
