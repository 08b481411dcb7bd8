//! The workflow's storage port ([`Records`]) on the FHIR resource store, and
//! [`CaseTx`], the transaction every client write runs in: it notes what
//! the interaction wrote and lets the workflow react inside the same
//! transaction before it commits, so a referral and its case Task (or a
//! document and the case it completes) are stored together or not at all.

use std::collections::HashMap;
use std::sync::Arc;

use axum::http::StatusCode;
use serde_json::Value;

use super::outcome::Issue;
use super::rest::{self, Ctx};
use super::{search, FhirError};
use crate::ids::{PartnerId, TransferId, Uid};
use crate::notify::{self, Changed};
use crate::store::fhir::{
    Clause, ResourcePage, ResourceQuery, ResourceStore, ResourceTx, ResourceWrite, Sort,
    StoredResource,
};
use crate::store::{MetaError, UnauditedTransfer};
use crate::workflow::engine::{Notice, Written};
use crate::workflow::records::{Finding, Record, RecordStore, Records, RecordsTx, WorkflowError};

/// Most results one workflow search reads (a patient's documents, a
/// specialist's cases); more is a sign of a runaway query.
const SEARCH_CAP: usize = 10_000;

impl From<WorkflowError> for FhirError {
    fn from(e: WorkflowError) -> FhirError {
        match e {
            WorkflowError::Refused(refusal) => FhirError::new(
                StatusCode::CONFLICT,
                Issue::error("business-rule", refusal.to_string()),
            ),
            WorkflowError::Invalid(why) => FhirError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                Issue::error("business-rule", why),
            ),
            WorkflowError::Unconformant {
                what,
                profile,
                findings,
            } => {
                let mut issues = vec![Issue::error(
                    "processing",
                    format!("{what} does not meet the profile {profile}"),
                )];
                issues.extend(findings.into_iter().map(|f| match f.at {
                    Some(at) => Issue::error(f.code, f.text).at(at),
                    None => Issue::error(f.code, f.text),
                }));
                FhirError::unprocessable(issues)
            }
            WorkflowError::Conflict(why) => {
                FhirError::new(StatusCode::CONFLICT, Issue::error("conflict", why))
            }
            WorkflowError::NotFound(what) => FhirError::new(
                StatusCode::NOT_FOUND,
                Issue::error("not-found", format!("{what} is not known")),
            ),
            WorkflowError::Store(detail) => FhirError::unavailable(&detail, "resource store"),
            WorkflowError::Defect { .. } => {
                tracing::error!(error = %e, "workflow defect");
                FhirError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Issue::error(
                        "exception",
                        "the workflow could not complete this step (a defect, logged); nothing was changed",
                    ),
                )
            }
        }
    }
}

fn store_error(e: MetaError) -> WorkflowError {
    WorkflowError::Store(e.to_string())
}

/// A stored version with its body parsed (`None`: a deletion).
fn record_of(stored: StoredResource) -> Option<Record> {
    let body: Value = serde_json::from_str(stored.body.as_deref()?).ok()?;
    Some(record(stored, body))
}

fn record(stored: StoredResource, body: Value) -> Record {
    Record {
        resource_type: stored.resource_type,
        id: stored.id,
        version: stored.version,
        partner: stored.partner,
        body,
        updated_ms: stored.updated_ms,
    }
}

/// [`Records`] on one open resource-store transaction.
pub struct StoreRecords {
    tx: Box<dyn ResourceTx>,
    /// The latest version the workflow wrote of each resource.
    rewritten: HashMap<(String, String), StoredResource>,
    /// What the workflow wrote (`Type/id/_history/n`, and the method), for
    /// the audit trail.
    written: Vec<(String, String)>,
    /// Whether the transaction stores an AuditEvent of its own (an
    /// operation's, a purge's, a delivery's): then that is its record.
    audited: bool,
}

impl StoreRecords {
    async fn store(
        &mut self,
        resource_type: &str,
        id: &str,
        version: i64,
        partner: Option<PartnerId>,
        method: &str,
        mut body: Value,
    ) -> Result<Record, WorkflowError> {
        let issues = rest::validation(resource_type, &body, &[]).await;
        let errors: Vec<String> = issues
            .iter()
            .filter(|i| i.is_error())
            .map(|i| i.to_json().to_string())
            .collect();
        if !errors.is_empty() {
            return Err(WorkflowError::Defect {
                resource_type: resource_type.to_owned(),
                findings: errors.join("; "),
            });
        }
        let stored = rest::write_version(
            self.tx.as_mut(),
            resource_type,
            id,
            version,
            partner,
            method,
            &mut body,
            None,
        )
        .await
        .map_err(store_error)?;
        if resource_type == "AuditEvent" {
            self.audited = true;
        } else {
            self.written
                .push((history_reference(&stored), method.to_owned()));
        }
        self.rewritten.insert(
            (stored.resource_type.clone(), stored.id.clone()),
            stored.clone(),
        );
        Ok(record(stored, body))
    }
}

#[async_trait::async_trait]
impl Records for StoreRecords {
    async fn read(&mut self, reference: &str) -> Result<Option<Record>, WorkflowError> {
        let Some((resource_type, id)) = reference.split_once('/') else {
            return Ok(None);
        };
        let stored = self
            .tx
            .current(resource_type, id)
            .await
            .map_err(store_error)?;
        Ok(stored.and_then(record_of))
    }

    async fn search(
        &mut self,
        resource_type: &str,
        query: &str,
    ) -> Result<Vec<Record>, WorkflowError> {
        let mut clauses: Vec<Clause> = Vec::new();
        for (name, value) in form_urlencoded::parse(query.as_bytes()) {
            match search::parse_param(resource_type, &name, &value) {
                Ok(Some(clause)) => clauses.push(clause),
                // The workflow's own queries: a wrong one is a defect.
                _ => {
                    return Err(WorkflowError::Defect {
                        resource_type: resource_type.to_owned(),
                        findings: format!("search '{query}' is not supported"),
                    })
                }
            }
        }
        let mut out = Vec::new();
        let mut after = None;
        loop {
            let page: ResourcePage = self
                .tx
                .search(&ResourceQuery {
                    resource_type: resource_type.to_owned(),
                    partners: None,
                    clauses: clauses.clone(),
                    sort: Sort::Created,
                    after,
                    count: 500,
                    want_total: false,
                })
                .await
                .map_err(store_error)?;
            out.extend(page.resources.into_iter().filter_map(record_of));
            match page.next {
                Some(next) if out.len() < SEARCH_CAP => after = Some(next),
                _ => break,
            }
        }
        Ok(out)
    }

    async fn create(
        &mut self,
        resource_type: &str,
        partner: Option<PartnerId>,
        body: Value,
    ) -> Result<Record, WorkflowError> {
        let id = uuid::Uuid::new_v4().to_string();
        self.store(resource_type, &id, 1, partner, "POST", body)
            .await
    }

    async fn update(&mut self, record: &Record) -> Result<Record, WorkflowError> {
        let current = self
            .tx
            .current(&record.resource_type, &record.id)
            .await
            .map_err(store_error)?;
        let version = current.map_or(0, |c| c.version) + 1;
        self.store(
            &record.resource_type,
            &record.id,
            version,
            record.partner.clone(),
            "PUT",
            record.body.clone(),
        )
        .await
    }

    async fn put(
        &mut self,
        resource_type: &str,
        id: &str,
        body: Value,
    ) -> Result<Record, WorkflowError> {
        let current = self
            .tx
            .current(resource_type, id)
            .await
            .map_err(store_error)?;
        let version = current.map_or(0, |c| c.version) + 1;
        self.store(resource_type, id, version, None, "PUT", body)
            .await
    }

    async fn delete(&mut self, reference: &str) -> Result<(), WorkflowError> {
        let Some((resource_type, id)) = reference.split_once('/') else {
            return Ok(());
        };
        let Some(current) = self
            .tx
            .current(resource_type, id)
            .await
            .map_err(store_error)?
            .filter(|c| c.body.is_some())
        else {
            return Ok(());
        };
        let deletion = rest::deletion_of(current);
        self.tx.write(&deletion).await.map_err(store_error)?;
        self.written
            .push((history_reference(&deletion.resource), "DELETE".to_owned()));
        Ok(())
    }

    async fn purge_history(
        &mut self,
        reference: &str,
        below_version: i64,
    ) -> Result<Vec<crate::store::BlobLocation>, WorkflowError> {
        let Some((resource_type, id)) = reference.split_once('/') else {
            return Ok(Vec::new());
        };
        self.tx
            .purge_history(resource_type, id, below_version)
            .await
            .map_err(store_error)
    }

    async fn discard_study(
        &mut self,
        partner: &PartnerId,
        study_uid: &Uid,
    ) -> Result<Vec<crate::store::BlobLocation>, WorkflowError> {
        self.tx
            .discard_study(partner, study_uid)
            .await
            .map_err(store_error)
    }

    async fn queue_discards(
        &mut self,
        kind: crate::store::BlobKind,
        locations: &[crate::store::BlobLocation],
    ) -> Result<(), WorkflowError> {
        self.tx
            .queue_discards(kind, locations)
            .await
            .map_err(store_error)
    }

    async fn take_unaudited_transfers(
        &mut self,
        transfer: Option<TransferId>,
    ) -> Result<Vec<UnauditedTransfer>, WorkflowError> {
        self.tx
            .take_unaudited_transfers(transfer)
            .await
            .map_err(store_error)
    }

    async fn profile_findings(&mut self, resource: &Value, profile: &str) -> Vec<Finding> {
        let resource_type = resource["resourceType"].as_str().unwrap_or("");
        rest::validation(resource_type, resource, &[profile.to_owned()])
            .await
            .into_iter()
            .filter(Issue::is_error)
            .map(|i| Finding {
                code: i.code,
                at: i.expression,
                text: i.diagnostics,
            })
            .collect()
    }
}

impl StoreRecords {
    /// Announce what was written to the Subscriptions it matches, then
    /// commit.
    async fn announce_and_commit(mut self, mut changed: Vec<Changed>) -> Result<(), MetaError> {
        changed.extend(self.rewritten.values().map(|s| Changed {
            resource_type: s.resource_type.clone(),
            id: s.id.clone(),
            partner: s.partner.clone(),
        }));
        let (_, now_ms) = rest::now();
        notify::announce(self.tx.as_mut(), &changed, now_ms).await?;
        self.tx.commit().await
    }
}

#[async_trait::async_trait]
impl RecordsTx for StoreRecords {
    fn records(&mut self) -> &mut dyn Records {
        self
    }

    async fn commit(self: Box<Self>) -> Result<(), WorkflowError> {
        // Every change is in the audit trail, stored with it. Work that
        // stores its own event names who acted; what is left is the
        // workflow acting on its own (a study's arrival, a deadline).
        match writes_audit(crate::audit::Actor::Service, &self.written, &[]) {
            Some(record) if !self.audited => self.commit_audited(record.to_resource()).await,
            _ => self
                .announce_and_commit(Vec::new())
                .await
                .map_err(store_error),
        }
    }

    async fn commit_audited(mut self: Box<Self>, mut event: Value) -> Result<(), WorkflowError> {
        let named: Vec<Value> = self
            .written
            .iter()
            .map(|(reference, _)| crate::audit::Entity::Resource(reference.clone()).to_json())
            .collect();
        if !named.is_empty() {
            if let Some(entities) = event
                .as_object_mut()
                .map(|e| {
                    e.entry("entity")
                        .or_insert_with(|| Value::Array(Vec::new()))
                })
                .and_then(Value::as_array_mut)
            {
                entities.extend(named);
            }
        }
        self.create("AuditEvent", None, event).await?;
        self.announce_and_commit(Vec::new())
            .await
            .map_err(store_error)
    }
}

/// Workflow transactions for work no client request carries.
pub struct ResourceRecordStore {
    pub resources: Arc<dyn ResourceStore>,
}

#[async_trait::async_trait]
impl RecordStore for ResourceRecordStore {
    async fn begin(&self) -> Result<Box<dyn RecordsTx>, WorkflowError> {
        let tx = self.resources.begin().await.map_err(store_error)?;
        Ok(Box::new(StoreRecords {
            tx,
            rewritten: HashMap::new(),
            written: Vec::new(),
            audited: false,
        }))
    }
}

/// The transaction of one client interaction (a request or a whole
/// transaction Bundle). Commit with [`CaseTx::finish`].
pub struct CaseTx {
    records: StoreRecords,
    written: Vec<Written>,
    /// What the client wrote, for the audit trail: `Type/id/_history/n`
    /// and the method.
    audited: Vec<(String, String)>,
    /// What the client's interaction wrote, for the Subscriptions.
    changed: Vec<Changed>,
}

impl CaseTx {
    pub async fn begin(resources: &dyn ResourceStore) -> Result<CaseTx, FhirError> {
        Ok(CaseTx {
            records: StoreRecords {
                tx: resources.begin().await?,
                rewritten: HashMap::new(),
                written: Vec::new(),
                audited: false,
            },
            written: Vec::new(),
            audited: Vec::new(),
            changed: Vec::new(),
        })
    }

    /// Let the workflow react to what was written, then commit. Returns
    /// what the caller should be told, and the resources the workflow
    /// wrote again (an adopted Task answers with its case state).
    pub async fn finish(mut self, ctx: &Ctx) -> Result<Finished, FhirError> {
        let written = std::mem::take(&mut self.written);
        let (_, now_ms) = rest::now();
        // The server, not the client, says whether a Subscription is active.
        for w in written
            .iter()
            .filter(|w| w.resource_type == "Subscription" && !w.deleted)
        {
            if let Some(mut subscription) =
                self.records.read(&format!("Subscription/{}", w.id)).await?
            {
                if let Some(next) = notify::activation(&subscription.body) {
                    subscription.body = next;
                    self.records.update(&subscription).await?;
                }
            }
        }
        let notices = if written.is_empty() {
            Vec::new()
        } else {
            ctx.app
                .workflow
                .react(&mut self.records, &ctx.caller, &written, now_ms)
                .await?
        };
        // The client's writes, then what the workflow wrote in reaction.
        let reactions = std::mem::take(&mut self.records.written);
        if let Some(record) = writes_audit(
            crate::audit::Actor::Caller(ctx.caller.clone()),
            &self.audited,
            &reactions,
        ) {
            self.records
                .create("AuditEvent", None, record.to_resource())
                .await?;
        }
        let rewritten = self.records.rewritten.clone();
        self.records.announce_and_commit(self.changed).await?;
        Ok(Finished { notices, rewritten })
    }
}

/// The AuditEvent of one interaction's writes (`Type/id/_history/n` and
/// method), stored with them: a client's (a single create, update, patch
/// or delete, or a transaction) with the workflow's reactions to it named
/// after them, or the workflow's own.
fn writes_audit(
    actor: crate::audit::Actor,
    writes: &[(String, String)],
    reactions: &[(String, String)],
) -> Option<crate::audit::AuditRecord> {
    use crate::audit::{Actor, AuditRecord, Entity, Kind};
    let (code, action) = match writes {
        [] if reactions.is_empty() => return None,
        [] => ("transaction", "E"),
        [(_, method)] => match method.as_str() {
            "POST" => ("create", "C"),
            "DELETE" => ("delete", "D"),
            "PATCH" => ("patch", "U"),
            _ => ("update", "U"),
        },
        _ => ("transaction", "E"),
    };
    let kind = match actor {
        Actor::Service => Kind::Workflow(code),
        _ => Kind::Rest(code),
    };
    let mut record = AuditRecord::new(kind, action, actor);
    for (reference, _) in writes.iter().chain(reactions) {
        record = record.entity(Entity::Resource(reference.clone()));
    }
    Some(record)
}

/// `Type/id/_history/n` of a stored version.
fn history_reference(stored: &StoredResource) -> String {
    format!(
        "{}/{}/_history/{}",
        stored.resource_type, stored.id, stored.version
    )
}

/// What the workflow made of an interaction.
pub struct Finished {
    pub notices: Vec<Notice>,
    pub rewritten: HashMap<(String, String), StoredResource>,
}

impl Finished {
    /// The version to answer with for `stored`, and the warnings about it.
    pub fn settle(&self, stored: &mut StoredResource) -> Vec<Issue> {
        let key = (stored.resource_type.clone(), stored.id.clone());
        if let Some(latest) = self.rewritten.get(&key) {
            *stored = latest.clone();
        }
        warnings_for(&self.notices, &stored.resource_type, &stored.id)
    }
}

#[async_trait::async_trait]
impl ResourceTx for CaseTx {
    async fn current(
        &mut self,
        resource_type: &str,
        id: &str,
    ) -> Result<Option<StoredResource>, MetaError> {
        self.records.tx.current(resource_type, id).await
    }

    async fn search(&mut self, query: &ResourceQuery) -> Result<ResourcePage, MetaError> {
        self.records.tx.search(query).await
    }

    async fn write(&mut self, write: &ResourceWrite) -> Result<(), MetaError> {
        let resource = &write.resource;
        // What the workflow compares (a Task, a report) or, for a deletion,
        // what it needs to find the cases the record belonged to.
        let previous = if matches!(
            resource.resource_type.as_str(),
            "Task" | "DiagnosticReport" | "ImagingStudy"
        ) || resource.body.is_none()
        {
            self.records
                .tx
                .current(&resource.resource_type, &resource.id)
                .await?
                .and_then(|p| p.body)
                .and_then(|b| serde_json::from_str(&b).ok())
        } else {
            None
        };
        self.records.tx.write(write).await?;
        self.audited
            .push((history_reference(resource), resource.method.clone()));
        self.changed.push(Changed {
            resource_type: resource.resource_type.clone(),
            id: resource.id.clone(),
            partner: resource.partner.clone(),
        });
        self.written.push(Written {
            resource_type: resource.resource_type.clone(),
            id: resource.id.clone(),
            deleted: resource.body.is_none(),
            partner: resource.partner.clone(),
            previous,
        });
        Ok(())
    }

    async fn purge_history(
        &mut self,
        resource_type: &str,
        id: &str,
        below_version: i64,
    ) -> Result<Vec<crate::store::BlobLocation>, MetaError> {
        self.records
            .tx
            .purge_history(resource_type, id, below_version)
            .await
    }

    async fn discard_study(
        &mut self,
        partner: &PartnerId,
        study_uid: &Uid,
    ) -> Result<Vec<crate::store::BlobLocation>, MetaError> {
        self.records.tx.discard_study(partner, study_uid).await
    }

    async fn queue_discards(
        &mut self,
        kind: crate::store::BlobKind,
        locations: &[crate::store::BlobLocation],
    ) -> Result<(), MetaError> {
        self.records.tx.queue_discards(kind, locations).await
    }

    async fn take_unaudited_transfers(
        &mut self,
        transfer: Option<TransferId>,
    ) -> Result<Vec<UnauditedTransfer>, MetaError> {
        self.records.tx.take_unaudited_transfers(transfer).await
    }

    async fn enqueue_notification(
        &mut self,
        subscription_id: &str,
        focus: &str,
        now_ms: i64,
    ) -> Result<(), MetaError> {
        self.records
            .tx
            .enqueue_notification(subscription_id, focus, now_ms)
            .await
    }

    async fn commit(self: Box<Self>) -> Result<(), MetaError> {
        // Every caller commits with `finish`, which runs the workflow.
        self.records.tx.commit().await
    }
}

/// Notices about `stored`, as warnings for its answer.
fn warnings_for(notices: &[Notice], resource_type: &str, id: &str) -> Vec<Issue> {
    let reference = format!("{resource_type}/{id}");
    notices
        .iter()
        .filter(|n| n.reference == reference)
        .map(|n| Issue::warning("business-rule", n.text.clone()).at(resource_type.to_owned()))
        .collect()
}
