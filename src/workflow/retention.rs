//! Retention: the submitted records of a case that has been inactive for
//! the retention period (`[workflow] retention_months`, six by default) are
//! discarded — its DICOM studies, the Binaries its documents point to, the
//! content of its DocumentReferences, and every earlier version of those —
//! unless the case Task carries the legal-hold tag. The opinion (report,
//! PDF, its DocumentReference), the case skeleton (Task, ServiceRequest,
//! Patient, Consent, ImagingStudy without endpoints) and the audit trail
//! stay. Inactivity is `Task.lastModified`; only cases that are over
//! (delivered, closed, declined, withdrawn) or on hold for missing records
//! are eligible. The patient's documents not filed for the case's referral
//! go only when no other case of the patient still needs them.

use std::sync::Arc;

use serde_json::{json, Value};

use super::case::{self, Event, Hold, Stage};
use super::engine::{instant_text, Workflow, SERVICE_ORGANIZATION};
use super::records::{codes, items, reference_of, Record, RecordStore, WorkflowError};
use super::task::{self, case_of, write_case};
use crate::ids::Uid;
use crate::store::fhir::ResourceStore;
use crate::store::{BlobError, BlobKind, BlobLocation, BlobStore};

/// `Task.meta.tag` that keeps a case's records whatever their age.
pub const CASE_FLAG: &str = "http://konsil.dev/fhir/CodeSystem/case-flag";
pub const LEGAL_HOLD: &str = "legal-hold";
/// `Task.output` type code saying when records were discarded.
const RECORDS_DISCARDED: &str = "records-discarded";

/// What retention did (or would do) to one case.
#[derive(Debug, Clone, Default)]
pub struct CaseReport {
    pub task: String,
    pub last_activity: String,
    pub studies: usize,
    pub instances: usize,
    pub documents: usize,
    pub binaries: usize,
}

/// Retention over the stores.
pub struct Retention {
    pub workflow: Arc<Workflow>,
    pub records: Arc<dyn RecordStore>,
    /// The queue of records to destroy.
    pub resources: Arc<dyn ResourceStore>,
    pub dicom_blobs: Arc<dyn BlobStore>,
    pub fhir_blobs: Arc<dyn BlobStore>,
}

/// Months back from `as_of_ms`, as ms (calendar months, day clamped).
fn months_before(as_of_ms: i64, months: u32) -> i64 {
    let Some(at) = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(as_of_ms) else {
        return i64::MIN;
    };
    at.checked_sub_months(chrono::Months::new(months))
        .map_or(i64::MIN, |t| t.timestamp_millis())
}

impl Retention {
    /// Discard (or with `dry_run`, list) the records of every eligible
    /// case, judging inactivity as of `as_of_ms`.
    pub async fn run(
        &self,
        as_of_ms: i64,
        dry_run: bool,
    ) -> Result<Vec<CaseReport>, WorkflowError> {
        let cutoff = months_before(as_of_ms, self.workflow.config.retention_months);
        let candidates = {
            let mut tx = self.records.begin().await?;
            let tasks = tx
                .records()
                .search("Task", &format!("modified=lt{}", instant_text(cutoff)))
                .await?;
            tasks
                .into_iter()
                .filter(|t| eligible(&t.body))
                .map(|t| t.reference())
                .collect::<Vec<_>>()
        };
        if !dry_run {
            // What an earlier run could not destroy.
            self.destroy_pending().await;
        }
        let mut reports = Vec::new();
        for task in candidates {
            if let Some(report) = self.discard_case(&task, cutoff, as_of_ms, dry_run).await? {
                reports.push(report);
            }
        }
        Ok(reports)
    }

    /// Destroy the queued records' bytes; each one done leaves the queue.
    /// One that fails stays queued (logged, without PHI: where it is).
    async fn destroy_pending(&self) {
        loop {
            let pending = match self.resources.pending_discards(256).await {
                Ok(pending) => pending,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the queued blob discards; tried again at the next run");
                    return;
                }
            };
            let mut progressed = false;
            for discard in &pending {
                let store = match discard.kind {
                    BlobKind::Dicom => Arc::clone(&self.dicom_blobs),
                    BlobKind::Fhir => Arc::clone(&self.fhir_blobs),
                };
                let location = discard.location.clone();
                let done = tokio::task::spawn_blocking(move || store.discard(&location)).await;
                match done {
                    Ok(Ok(())) => {}
                    // The whole object is gone already: nothing left.
                    Ok(Err(BlobError::Retract(e))) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Ok(Err(e)) => {
                        tracing::warn!(store = discard.kind.as_str(), object = %discard.location.object, offset = discard.location.offset, error = %e, "cannot destroy a discarded record's bytes; tried again at the next run");
                        continue;
                    }
                    Err(_) => continue,
                }
                if let Err(e) = self.resources.forget_discard(discard.id).await {
                    tracing::warn!(error = %e, "cannot clear a done blob discard; it is done again at the next run");
                    continue;
                }
                progressed = true;
            }
            if pending.len() < 256 || !progressed {
                return;
            }
        }
    }

    /// One case, in one transaction; the blobs go after it commits.
    async fn discard_case(
        &self,
        task_ref: &str,
        cutoff: i64,
        as_of_ms: i64,
        dry_run: bool,
    ) -> Result<Option<CaseReport>, WorkflowError> {
        let mut tx = self.records.begin().await?;
        let r = tx.records();
        // Re-read inside the transaction: the case may have moved.
        let Some(mut task) = r.read(task_ref).await? else {
            return Ok(None);
        };
        if !expired(&task.body, cutoff) {
            return Ok(None);
        }
        let Some(request_ref) = reference_of(task.body.get("focus")).map(str::to_owned) else {
            return Ok(None);
        };
        let Some(request) = r.read(&request_ref).await? else {
            return Ok(None);
        };
        let mut report = CaseReport {
            task: task.reference(),
            last_activity: task
                .body
                .get("lastModified")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned(),
            ..CaseReport::default()
        };
        let mut fhir_blobs: Vec<BlobLocation> = Vec::new();
        let mut studies: Vec<Uid> = Vec::new();

        // Documents the referrer submitted (not the opinion we filed).
        let mut documents = r
            .search("DocumentReference", &format!("related={request_ref}"))
            .await?;
        // The patient's other documents too, unless another case of the
        // patient still needs them.
        if let Some(patient) =
            reference_of(request.body.get("subject")).filter(|p| p.starts_with("Patient/"))
        {
            if !patient_has_live_case(r, patient, &request_ref, cutoff).await? {
                documents.extend(
                    r.search("DocumentReference", &format!("patient={patient}"))
                        .await?,
                );
            }
        }
        documents.sort_by(|a, b| a.id.cmp(&b.id));
        documents.dedup_by(|a, b| a.id == b.id);
        for mut document in documents {
            if document.partner != request.partner
                || reference_of(document.body.get("custodian")) == Some(SERVICE_ORGANIZATION)
                || of_another_case(&document.body, &request_ref)
            {
                continue;
            }
            let mut binaries = Vec::new();
            let mut had_content = false;
            for content in document
                .body
                .get_mut("content")
                .and_then(Value::as_array_mut)
                .into_iter()
                .flatten()
            {
                let Some(attachment) = content.get_mut("attachment").and_then(Value::as_object_mut)
                else {
                    continue;
                };
                if let Some(url) = attachment.get("url").and_then(Value::as_str) {
                    if url.starts_with("Binary/") {
                        binaries.push(url.to_owned());
                    }
                }
                had_content |= attachment.shift_remove("url").is_some();
                had_content |= attachment.shift_remove("data").is_some();
                attachment.shift_remove("hash");
                attachment.shift_remove("size");
            }
            if !had_content {
                continue;
            }
            report.documents += 1;
            report.binaries += binaries.len();
            if dry_run {
                continue;
            }
            if let Some(list) = document
                .body
                .get_mut("content")
                .and_then(Value::as_array_mut)
            {
                for content in list {
                    if let Some(attachment) =
                        content.get_mut("attachment").and_then(Value::as_object_mut)
                    {
                        attachment.insert(
                            "title".into(),
                            json!(format!(
                                "{} (discarded by retention {})",
                                attachment
                                    .get("title")
                                    .and_then(Value::as_str)
                                    .unwrap_or("content"),
                                instant_text(as_of_ms)
                            )),
                        );
                    }
                }
            }
            let updated = r.update(&document).await?;
            fhir_blobs.extend(
                r.purge_history(&updated.reference(), updated.version)
                    .await?,
            );
            for binary in binaries {
                if let Some(current) = r.read(&binary).await? {
                    if current.partner == request.partner {
                        r.delete(&binary).await?;
                        fhir_blobs.extend(r.purge_history(&binary, current.version + 1).await?);
                    }
                }
            }
        }

        // The case's studies.
        for mut study in r
            .search("ImagingStudy", &format!("basedon={request_ref}"))
            .await?
        {
            if study.partner != request.partner {
                continue;
            }
            let uids: Vec<Uid> = items(Some(&study.body), "identifier")
                .filter(|i| i.get("system").and_then(Value::as_str) == Some("urn:dicom:uid"))
                .filter_map(|i| i.get("value").and_then(Value::as_str))
                .filter_map(|v| Uid::parse(v.strip_prefix("urn:oid:").unwrap_or(v)).ok())
                .collect();
            let count = study
                .body
                .get("numberOfInstances")
                .and_then(Value::as_u64)
                .unwrap_or(0);
            if study.body.get("endpoint").is_none() {
                continue;
            }
            report.studies += uids.len();
            report.instances += count as usize;
            studies.extend(uids);
            if dry_run {
                continue;
            }
            discard_endpoints(&mut study);
            study.body["note"] = json!([{
                "time": instant_text(as_of_ms),
                "text": "The images were discarded by retention after the case was inactive; the study record is kept.",
            }]);
            r.update(&study).await?;
        }
        if dry_run {
            return Ok(Some(report));
        }

        // The case: closed if it was delivered; says what was discarded.
        let current = case_of(&task.body).unwrap_or_default();
        let next = if current.stage == Stage::Delivered {
            case::apply(&current, &Event::Inactive)?
        } else {
            current
        };
        write_case(
            &mut task.body,
            &next,
            self.workflow.rules,
            SERVICE_ORGANIZATION,
            &instant_text(as_of_ms),
        );
        let outputs = task
            .body
            .as_object_mut()
            .map(|o| o.entry("output").or_insert_with(|| json!([])));
        if let Some(Value::Array(outputs)) = outputs {
            outputs.push(json!({
                "type": {"coding": [{"system": task::CASE_INPUT, "code": RECORDS_DISCARDED, "display": "Submitted records discarded"}]},
                "valueDateTime": instant_text(as_of_ms),
            }));
        }
        r.update(&task).await?;
        // The DICOM index forgets the studies in the same transaction, so
        // the case says "discarded" exactly when its images are gone from
        // the index; a failure leaves all of it for the next run. The bytes
        // go after the commit.
        let mut dicom_blobs = Vec::new();
        if let Some(partner) = &request.partner {
            for uid in &studies {
                dicom_blobs.extend(r.discard_study(partner, uid).await?);
            }
        }
        // The bytes are destroyed after the commit, from a queue committed
        // with it: one that cannot be destroyed now is tried again at the
        // next run, never forgotten.
        r.queue_discards(BlobKind::Dicom, &dicom_blobs).await?;
        r.queue_discards(BlobKind::Fhir, &fhir_blobs).await?;
        // The purge's event, naming every version it wrote.
        tx.commit_audited(audit_event(&task, &request, &report, as_of_ms))
            .await?;
        self.destroy_pending().await;
        Ok(Some(report))
    }
}

/// Whether the case `task` is due for retention at `cutoff`: eligible,
/// and last active before it.
fn expired(task: &Value, cutoff: i64) -> bool {
    let last = task
        .get("lastModified")
        .and_then(Value::as_str)
        .and_then(|t| crate::fhir::search::date_range(t).map(|r| r.1));
    eligible(task) && last.is_some_and(|t| t < cutoff)
}

/// Whether a case of `patient` other than the one of `request_ref` still
/// keeps its records: open, on legal hold, or active within the period.
/// (Such a case counts the patient's documents not filed for another
/// referral among its records.)
async fn patient_has_live_case(
    r: &mut dyn super::records::Records,
    patient: &str,
    request_ref: &str,
    cutoff: i64,
) -> Result<bool, WorkflowError> {
    for other in r.search("Task", &format!("patient={patient}")).await? {
        let is_other_case = other.body.get("partOf").is_none()
            && case_of(&other.body).is_some()
            && reference_of(other.body.get("focus")) != Some(request_ref);
        if is_other_case
            && !task::has_output(&other.body, RECORDS_DISCARDED)
            && !expired(&other.body, cutoff)
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Whether a document was submitted for another referral than
/// `request_ref` (its `context.related` names only other ServiceRequests):
/// that case's retention decides about it.
pub(super) fn of_another_case(document: &Value, request_ref: &str) -> bool {
    let requests: Vec<&str> = items(document.get("context"), "related")
        .filter_map(|related| reference_of(Some(related)))
        .filter(|reference| reference.starts_with("ServiceRequest/"))
        .collect();
    !requests.is_empty() && !requests.contains(&request_ref)
}

/// Whether `tag` (a Coding of `meta.tag`) is the legal hold.
fn is_legal_hold(tag: &Value) -> bool {
    tag.get("system").and_then(Value::as_str) == Some(CASE_FLAG)
        && tag.get("code").and_then(Value::as_str) == Some(LEGAL_HOLD)
}

/// Whether the case Task carries the legal-hold tag.
pub fn on_legal_hold(task: &Value) -> bool {
    items(task.get("meta"), "tag").any(is_legal_hold)
}

/// Remove the legal-hold tag from a Task (and `meta.tag` when it held
/// nothing else: FHIR has no empty arrays).
pub fn lift_legal_hold(task: &mut Value) {
    let Some(meta) = task.get_mut("meta").and_then(Value::as_object_mut) else {
        return;
    };
    if let Some(tags) = meta.get_mut("tag").and_then(Value::as_array_mut) {
        tags.retain(|t| !is_legal_hold(t));
        if tags.is_empty() {
            meta.shift_remove("tag");
        }
    }
}

/// Whether a case Task's records may be discarded at all (its age aside):
/// the case is over (delivered, closed, declined, withdrawn) or stale, not
/// on legal hold, not discarded yet.
fn eligible(task: &Value) -> bool {
    if task.get("partOf").is_some() {
        return false;
    }
    let held = on_legal_hold(task);
    let discarded = task::has_output(task, RECORDS_DISCARDED);
    let Some(case) = case_of(task) else {
        return false;
    };
    let over = matches!(
        case.stage,
        Stage::Delivered | Stage::Closed | Stage::Declined | Stage::Withdrawn
    ) || case.hold == Some(Hold::Stale);
    over && !held && !discarded
}

fn discard_endpoints(study: &mut Record) {
    if let Some(obj) = study.body.as_object_mut() {
        obj.shift_remove("endpoint");
    }
    if let Some(series) = study.body.get_mut("series").and_then(Value::as_array_mut) {
        for s in series {
            if let Some(obj) = s.as_object_mut() {
                obj.shift_remove("endpoint");
            }
        }
    }
}

/// The audit record of a purge (DICOM "Study Deleted", ATNA-shaped).
fn audit_event(task: &Record, request: &Record, report: &CaseReport, as_of_ms: i64) -> Value {
    let specialty: Vec<&str> = codes(request.body.get("code"), super::engine::SPECIALTY).collect();
    json!({
        "resourceType": "AuditEvent",
        "type": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110105", "display": "DICOM Study Deleted"},
        "subtype": [{"system": crate::audit::KONSIL_SUBTYPE, "code": "retention", "display": "Retention purge of submitted records"}],
        "action": "D",
        "recorded": instant_text(chrono::Utc::now().timestamp_millis()),
        "outcome": "0",
        "outcomeDesc": format!(
            "as of {}: {} studies ({} instances), content of {} documents, {} binaries discarded; specialty {}",
            instant_text(as_of_ms), report.studies, report.instances, report.documents, report.binaries,
            specialty.join(",")
        ),
        "agent": [{
            "type": {"coding": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110150", "display": "Application"}]},
            "who": {"reference": SERVICE_ORGANIZATION},
            "requestor": true,
        }],
        "source": {"observer": {"reference": SERVICE_ORGANIZATION}},
        "entity": [
            {"what": {"reference": task.reference()}, "description": "case"},
            {"what": {"reference": request.reference()}, "description": "referral"},
        ],
    })
}
