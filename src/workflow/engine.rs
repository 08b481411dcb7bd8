//! The workflow's actions on stored records: intake of referrals, the
//! completeness and consent checks, imaging reconciliation, assignment,
//! approval and follow-up questions. Every action runs inside one
//! [`Records`] transaction that the caller commits, so a case never shows
//! half a step. No protocol here: the edges call these functions and map
//! [`WorkflowError`] to their own error form.

use std::collections::{BTreeSet, HashMap};

use serde_json::{json, Value};

use super::build;
use super::case::{self, Case, ConsentState, Event, Stage};
use super::completeness::{self, Coding, Document, Rules, Submitted};
use super::imaging::StudySummary;
use super::records::{
    codes, extensions, has_coding, items, reference_of, Record, Records, WorkflowError,
};
use super::retention;
use super::task::{self, case_of, write_case, SPECIALTY_KIND};
use crate::auth::Caller;
use crate::config::WorkflowConfig;
use crate::ids::PartnerId;

/// The service's own Organization: owner of every case until assignment.
pub const SERVICE_ORGANIZATION: &str = "Organization/konsil";
/// The Endpoint of our DICOMweb that case ImagingStudies point to.
pub const SERVICE_ENDPOINT: &str = "Endpoint/konsil-dicomweb";
pub const REFERRAL_PROFILE: &str = "http://konsil.dev/fhir/StructureDefinition/konsil-referral";
/// What a case's opinion (a DiagnosticReport based on its referral) must be.
pub const OPINION_PROFILE: &str = "http://konsil.dev/fhir/StructureDefinition/konsil-opinion";
pub const REFERRAL_TYPE: &str = "http://konsil.dev/fhir/CodeSystem/referral-type";
pub const SPECIALTY: &str = "http://konsil.dev/fhir/CodeSystem/specialty";
/// Extension on a case ImagingStudy: how many instances the referrer's
/// manifest announced (`numberOfInstances` then counts what arrived).
pub const ANNOUNCED_INSTANCES: &str =
    "http://konsil.dev/fhir/StructureDefinition/announced-instances";
/// `Task.output` type code of the patient's notification.
const PATIENT_NOTIFIED: &str = "patient-notified";

/// A resource a client's interaction wrote (the workflow reacts to these).
#[derive(Debug, Clone)]
pub struct Written {
    pub resource_type: String,
    pub id: String,
    pub deleted: bool,
    /// The partner the resource belongs to (kept on a deletion's version).
    pub partner: Option<PartnerId>,
    /// For a Task, a DiagnosticReport or an ImagingStudy, and for any
    /// deletion: the version before this interaction, if there was one.
    pub previous: Option<Value>,
}

impl Written {
    fn reference(&self) -> String {
        format!("{}/{}", self.resource_type, self.id)
    }
}

/// Something the caller should know about what it wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// `Type/id` of the written resource it is about.
    pub reference: String,
    pub text: String,
}

/// The workflow: configuration and rules. Stateless between calls.
pub struct Workflow {
    pub config: WorkflowConfig,
    pub rules: &'static Rules,
    /// Base URL of our DICOMweb (the service Endpoint's address).
    pub dicomweb_url: String,
    /// Per partner, the identifier system its studies' patient IDs belong
    /// to when they name no issuer (`[[partners]] patient_id_system`).
    pub patient_id_systems: HashMap<PartnerId, String>,
}

/// The parts of a case every step needs.
struct CaseFile {
    task: Record,
    case: Case,
    request: Record,
    patient: Option<String>,
    partner: Option<PartnerId>,
}

/// The specialist proposed for a case.
#[derive(Debug, Clone, PartialEq)]
pub struct Proposal {
    /// The PractitionerRole.
    pub owner: String,
    /// It is the referral's requested performer.
    pub requested: bool,
    /// Its in-progress cases now.
    pub open_cases: usize,
}

/// `meta.lastUpdated`-style text of a time in ms.
pub fn instant_text(ms: i64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string()
}

impl Workflow {
    pub fn new(config: WorkflowConfig, dicomweb_url: String) -> Result<Workflow, String> {
        let rules = Rules::shipped().map_err(|e| e.to_string())?;
        Ok(Workflow {
            config,
            rules,
            dicomweb_url,
            patient_id_systems: HashMap::new(),
        })
    }

    /// Set each partner's `patient_id_system`.
    pub fn with_patient_id_systems(mut self, systems: HashMap<PartnerId, String>) -> Workflow {
        self.patient_id_systems = systems;
        self
    }

    /// Make sure the service's own Organization and DICOMweb Endpoint exist
    /// as configured.
    pub async fn ensure_service(&self, r: &mut dyn Records) -> Result<(), WorkflowError> {
        let organization = json!({
            "resourceType": "Organization",
            "active": true,
            "name": self.config.organization_name,
            "endpoint": [{"reference": SERVICE_ENDPOINT}],
        });
        let endpoint = json!({
            "resourceType": "Endpoint",
            "status": "active",
            "connectionType": {"system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type", "code": "dicom-wado-rs"},
            "name": "Konsil DICOMweb",
            "managingOrganization": {"reference": SERVICE_ORGANIZATION},
            "payloadType": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/endpoint-payload-type", "code": "any"}]}],
            "payloadMimeType": ["application/dicom"],
            "address": self.dicomweb_url,
        });
        for (reference, wanted) in [
            (SERVICE_ENDPOINT, endpoint),
            (SERVICE_ORGANIZATION, organization),
        ] {
            let (resource_type, id) = reference.split_once('/').unwrap_or((reference, ""));
            let current = r.read(reference).await?;
            let same = current.as_ref().is_some_and(|c| {
                wanted
                    .as_object()
                    .into_iter()
                    .flatten()
                    .all(|(k, v)| c.body.get(k) == Some(v))
            });
            if !same {
                r.put(resource_type, id, wanted).await?;
            }
        }
        Ok(())
    }

    /// React to what a client's interaction wrote, inside its transaction:
    /// start cases for referrals, re-run checks when records arrive, turn
    /// Task and report changes into case events (refusing illegal ones).
    pub async fn react(
        &self,
        r: &mut dyn Records,
        caller: &Caller,
        written: &[Written],
        now_ms: i64,
    ) -> Result<Vec<Notice>, WorkflowError> {
        let mut notices = Vec::new();
        let mut adopted: BTreeSet<String> = BTreeSet::new();
        let mut checked: BTreeSet<String> = BTreeSet::new();
        let mut to_check: BTreeSet<String> = BTreeSet::new();
        // Referrals first: a Task sent with its referral is adopted.
        for w in written.iter().filter(|w| !w.deleted) {
            if w.resource_type != "ServiceRequest" {
                continue;
            }
            let Some(request) = r.read(&w.reference()).await? else {
                continue;
            };
            if self.case_task(r, &request.reference()).await?.is_some() {
                // An update of a referral that has a case: the checks see it.
                if let Some(task) = self.case_task(r, &request.reference()).await? {
                    to_check.insert(task.reference());
                }
                continue;
            }
            let theirs = self.sent_task(r, written, &request.reference()).await?;
            match self.intake(r, &request, theirs, now_ms).await? {
                Ok(task) => {
                    adopted.insert(task.reference());
                    checked.insert(task.reference());
                }
                Err(why) => notices.push(Notice {
                    reference: w.reference(),
                    text: why,
                }),
            }
        }
        for w in written {
            match w.resource_type.as_str() {
                "ServiceRequest" if w.deleted => {
                    if let Some(task) = self.case_task(r, &w.reference()).await? {
                        return Err(WorkflowError::Conflict(format!(
                            "{} is the referral of the case {}, which keeps it as its record (also once the case is over): to stop the case, withdraw it (Task.status 'cancelled')",
                            w.reference(),
                            task.reference()
                        )));
                    }
                }
                "Task" if !w.deleted && !adopted.contains(&w.reference()) => {
                    self.task_written(r, caller, w, now_ms).await?;
                }
                "ImagingStudy" if !w.deleted => {
                    self.imaging_study_written(r, w).await?;
                    for task in self.cases_touched_by(r, w).await? {
                        to_check.insert(task);
                    }
                }
                "DocumentReference" | "Consent" | "ImagingStudy" | "List" => {
                    for task in self.cases_touched_by(r, w).await? {
                        to_check.insert(task);
                    }
                }
                "DiagnosticReport" => {
                    self.report_written(r, caller, w, now_ms).await?;
                }
                "Communication" if !w.deleted => {
                    self.communication_written(r, caller, w, now_ms).await?;
                }
                _ => {}
            }
        }
        for task in to_check.difference(&checked) {
            if let Some(task) = r.read(task).await? {
                self.check_case(r, task, now_ms).await?;
            }
        }
        Ok(notices)
    }

    /// A client wrote an ImagingStudy. What Konsil derives from the DICOM
    /// it received (its DICOMweb endpoint, the series and instance counts)
    /// is not a client's to write: an ImagingStudy claiming it would count
    /// as imaging that never arrived.
    async fn imaging_study_written(
        &self,
        r: &mut dyn Records,
        w: &Written,
    ) -> Result<(), WorkflowError> {
        let Some(study) = r.read(&w.reference()).await? else {
            return Ok(());
        };
        if !has_our_endpoint(&study.body) {
            return Ok(());
        }
        let derived = |body: &Value| {
            json!({
                // Which case and patient the received images belong to
                // is Konsil's reconciliation too ($link for staff).
                "basedOn": body.get("basedOn"),
                "subject": body.get("subject"),
                "endpoint": body.get("endpoint"),
                "numberOfSeries": body.get("numberOfSeries"),
                "numberOfInstances": body.get("numberOfInstances"),
                "series": body.get("series"),
            })
        };
        let kept = w
            .previous
            .as_ref()
            .is_some_and(|previous| derived(previous) == derived(&study.body));
        if kept {
            return Ok(());
        }
        Err(WorkflowError::Invalid(format!(
            "ImagingStudy.endpoint {SERVICE_ENDPOINT}, series, numberOfSeries, numberOfInstances, basedOn and \
             subject are kept by Konsil from the DICOM it received: send the images (C-STORE or STOW-RS); \
             announce a study in a manifest without that endpoint; staff link a study with $link"
        )))
    }

    /// The case Task of a referral (the Task whose focus it is and that
    /// carries a case stage).
    async fn case_task(
        &self,
        r: &mut dyn Records,
        request: &str,
    ) -> Result<Option<Record>, WorkflowError> {
        let tasks = r.search("Task", &format!("focus={request}")).await?;
        Ok(tasks
            .into_iter()
            .find(|t| case_of(&t.body).is_some() && t.body.get("partOf").is_none()))
    }

    /// A Task the referrer sent in the same interaction for this referral.
    async fn sent_task(
        &self,
        r: &mut dyn Records,
        written: &[Written],
        request: &str,
    ) -> Result<Option<Record>, WorkflowError> {
        for w in written
            .iter()
            .filter(|w| w.resource_type == "Task" && !w.deleted)
        {
            if w.previous.is_some() {
                continue;
            }
            if let Some(task) = r.read(&w.reference()).await? {
                if reference_of(task.body.get("focus")) == Some(request) {
                    return Ok(Some(task));
                }
            }
        }
        Ok(None)
    }

    /// Start a case for a referral: adopt the referrer's Task or create
    /// one, then run the checks. `Ok(Err(why))`: the referral does not
    /// qualify and starts no case.
    async fn intake(
        &self,
        r: &mut dyn Records,
        request: &Record,
        theirs: Option<Record>,
        now_ms: i64,
    ) -> Result<Result<Record, String>, WorkflowError> {
        let body = &request.body;
        let status = body.get("status").and_then(Value::as_str).unwrap_or("");
        if status != "active" {
            return Ok(Err(format!(
                "no case started: the referral's status is '{status}'; a case starts for an active ServiceRequest"
            )));
        }
        if !has_coding(body.get("category"), REFERRAL_TYPE, "second-opinion") {
            return Ok(Err(format!(
                "no case started: ServiceRequest.category does not say {REFERRAL_TYPE}|second-opinion"
            )));
        }
        let findings = r.profile_findings(body, REFERRAL_PROFILE).await;
        if !findings.is_empty() {
            let findings: Vec<String> = findings.iter().map(ToString::to_string).collect();
            return Ok(Err(format!(
                "no case started: the referral does not meet {REFERRAL_PROFILE}: {}",
                findings.join("; ")
            )));
        }
        let now = instant_text(now_ms);
        let mut task = match theirs {
            Some(task) => task,
            None => {
                let mut fresh = build::case_task(
                    &request.reference(),
                    reference_of(body.get("subject")),
                    reference_of(body.get("requester")),
                    now_ms,
                )?;
                write_case(
                    &mut fresh,
                    &Case::new(),
                    self.rules,
                    SERVICE_ORGANIZATION,
                    &now,
                );
                r.create("Task", request.partner.clone(), fresh).await?
            }
        };
        // An adopted Task gets the case's shape (its other elements stay,
        // but a legal hold is staff's to set on the case, not the sender's).
        retention::lift_legal_hold(&mut task.body);
        if let Some(obj) = task.body.as_object_mut() {
            obj.insert("intent".into(), json!("order"));
            if let Some(subject) = body.get("subject") {
                obj.insert("for".into(), subject.clone());
            }
            if !obj.contains_key("authoredOn") {
                obj.insert("authoredOn".into(), json!(now));
            }
        }
        write_case(
            &mut task.body,
            &Case::new(),
            self.rules,
            SERVICE_ORGANIZATION,
            &now,
        );
        let task = r.update(&task).await?;
        self.adopt_waiting_studies(r, request).await?;
        Ok(Ok(self.check_case(r, task, now_ms).await?))
    }

    /// Studies that arrived before their referral wait unmatched; the
    /// referral's accession numbers link them now (same partner only).
    async fn adopt_waiting_studies(
        &self,
        r: &mut dyn Records,
        request: &Record,
    ) -> Result<(), WorkflowError> {
        let accessions: Vec<String> = items(Some(&request.body), "identifier")
            .filter_map(|i| i.get("value").and_then(Value::as_str))
            .map(str::to_owned)
            .collect();
        for accession in accessions {
            let waiting = r
                .search(
                    "ImagingStudy",
                    &format!("identifier={}", token_escape(&accession)),
                )
                .await?;
            for mut study in waiting {
                if study.partner != request.partner || study.body.get("basedOn").is_some() {
                    continue;
                }
                study.body["basedOn"] = json!([{ "reference": request.reference() }]);
                if let Some(subject) = request.body.get("subject") {
                    study.body["subject"] = subject.clone();
                }
                r.update(&study).await?;
            }
        }
        Ok(())
    }

    /// Load a case from its Task.
    async fn case_file(
        &self,
        r: &mut dyn Records,
        task: Record,
    ) -> Result<CaseFile, WorkflowError> {
        let case = case_of(&task.body).ok_or_else(|| {
            WorkflowError::Invalid(format!("{} is not a case Task", task.reference()))
        })?;
        let request_ref = reference_of(task.body.get("focus"))
            .ok_or_else(|| WorkflowError::Invalid(format!("{} has no focus", task.reference())))?
            .to_owned();
        let request = r
            .read(&request_ref)
            .await?
            .ok_or(WorkflowError::NotFound(request_ref))?;
        let patient = reference_of(request.body.get("subject"))
            .filter(|s| s.starts_with("Patient/"))
            .map(str::to_owned);
        let partner = request.partner.clone();
        Ok(CaseFile {
            task,
            case,
            request,
            patient,
            partner,
        })
    }

    /// Apply `event` to the case and store the Task when it changed.
    async fn move_case(
        &self,
        r: &mut dyn Records,
        file: &mut CaseFile,
        event: &Event,
        now_ms: i64,
    ) -> Result<(), WorkflowError> {
        let next = case::apply(&file.case, event)?;
        if next != file.case {
            write_case(
                &mut file.task.body,
                &next,
                self.rules,
                SERVICE_ORGANIZATION,
                &instant_text(now_ms),
            );
            file.task = r.update(&file.task).await?;
            file.case = next;
        }
        Ok(())
    }

    /// Run the completeness and consent checks of a case and move it.
    pub async fn check_case(
        &self,
        r: &mut dyn Records,
        task: Record,
        now_ms: i64,
    ) -> Result<Record, WorkflowError> {
        let mut file = self.case_file(r, task).await?;
        if !matches!(
            file.case.stage,
            Stage::Intake
                | Stage::AwaitingRecords
                | Stage::ReadyForTriage
                | Stage::UnderReview
                | Stage::AwaitingApproval
        ) {
            return Ok(file.task);
        }
        let consent = self.consent(r, &file, now_ms).await?;
        let specialty = codes(file.request.body.get("code"), SPECIALTY)
            .next()
            .unwrap_or("")
            .to_owned();
        let submitted = self.submitted(r, &file, now_ms).await?;
        let missing = match completeness::missing(self.rules, &specialty, &submitted, now_ms) {
            Ok(kinds) => kinds.into_iter().map(str::to_owned).collect(),
            Err(_) => vec![SPECIALTY_KIND.to_owned()],
        };
        self.move_case(r, &mut file, &Event::Checked { missing, consent }, now_ms)
            .await?;
        // Records missing too long: the case goes on hold (and leaves it by
        // itself when they arrive).
        if file.case.stage == Stage::AwaitingRecords && file.case.hold.is_none() {
            let since = file
                .task
                .body
                .get("authoredOn")
                .and_then(Value::as_str)
                .and_then(start_ms);
            let stale_ms = self.config.stale_days as i64 * 86_400_000;
            if since.is_some_and(|t| now_ms - t >= stale_ms) {
                self.move_case(r, &mut file, &Event::StalePeriodPassed, now_ms)
                    .await?;
            }
        }
        Ok(file.task)
    }

    /// The case's documents and the imaging that counts as complete.
    async fn submitted(
        &self,
        r: &mut dyn Records,
        file: &CaseFile,
        now_ms: i64,
    ) -> Result<Submitted, WorkflowError> {
        let mut seen = BTreeSet::new();
        let mut documents = Vec::new();
        let mut found = r
            .search(
                "DocumentReference",
                &format!("related={}", file.request.reference()),
            )
            .await?;
        if let Some(patient) = &file.patient {
            found.extend(
                r.search("DocumentReference", &format!("patient={patient}"))
                    .await?,
            );
        }
        for doc in found {
            if doc.partner != file.partner || !seen.insert(doc.id.clone()) {
                continue;
            }
            if let Some(document) = submitted_document(&doc.body, &file.request.reference()) {
                documents.push(document);
            }
        }
        let mut complete_studies = 0;
        let mut awaited = 0;
        for study in r
            .search(
                "ImagingStudy",
                &format!("basedon={}", file.request.reference()),
            )
            .await?
        {
            if study.partner != file.partner {
                continue;
            }
            if self.imaging_complete(&study, now_ms) {
                complete_studies += 1;
            } else if announces_instances(&study.body) {
                awaited += 1;
            }
        }
        // A study the referral announced with its instance count is awaited
        // until all of it arrived, whatever else came (IHE IRWF: the
        // manifest says what the case needs).
        if awaited > 0 {
            complete_studies = 0;
        }
        Ok(Submitted {
            documents,
            complete_studies,
        })
    }

    /// Whether a linked study's imaging has all arrived: the announced
    /// count reached, or (without one) no new instance for the quiet period.
    fn imaging_complete(&self, study: &Record, now_ms: i64) -> bool {
        if !has_our_endpoint(&study.body) {
            return false;
        }
        let count = study
            .body
            .get("numberOfInstances")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        match announced(&study.body) {
            Some(announced) => count >= announced,
            None => {
                count > 0
                    && now_ms - study.updated_ms >= self.config.imaging_quiet_secs as i64 * 1000
            }
        }
    }

    /// The patient's consent as it stands: the most recently written
    /// Consent decides (a later revocation beats an earlier permit).
    async fn consent(
        &self,
        r: &mut dyn Records,
        file: &CaseFile,
        now_ms: i64,
    ) -> Result<ConsentState, WorkflowError> {
        let Some(patient) = &file.patient else {
            return Ok(ConsentState::Absent);
        };
        let consents = r.search("Consent", &format!("patient={patient}")).await?;
        let latest = consents
            .into_iter()
            .filter(|c| c.partner == file.partner)
            .max_by_key(|c| c.updated_ms);
        Ok(match latest {
            None => ConsentState::Absent,
            Some(c) => match self.consent_refusal(&c.body, now_ms) {
                None => ConsentState::Permits,
                Some(why) => ConsentState::Refused(format!("{}: {why}", c.reference())),
            },
        })
    }

    /// Why a Consent does not permit disclosure to the service for a second
    /// opinion (`None`: it does).
    fn consent_refusal(&self, consent: &Value, now_ms: i64) -> Option<String> {
        let status = consent.get("status").and_then(Value::as_str).unwrap_or("");
        if status != "active" {
            return Some(format!("status is {status}"));
        }
        let provision = consent.get("provision");
        let kind = provision
            .and_then(|p| p.get("type"))
            .and_then(Value::as_str);
        if kind != Some("permit") {
            return Some("the provision does not permit (provision.type is not 'permit')".into());
        }
        if let Some(period) = provision.and_then(|p| p.get("period")) {
            let start = period.get("start").and_then(Value::as_str);
            let end = period.get("end").and_then(Value::as_str);
            if let Some(start) = start.and_then(start_ms) {
                if now_ms < start {
                    return Some("the provision's period has not started".into());
                }
            }
            if let Some(end) = end.and_then(end_ms) {
                if now_ms > end {
                    return Some("the provision's period has ended".into());
                }
            }
        }
        let purposes: Vec<(String, String)> = items(provision, "purpose")
            .filter_map(|c| {
                Some((
                    c.get("system")?.as_str()?.to_owned(),
                    c.get("code")?.as_str()?.to_owned(),
                ))
            })
            .collect();
        let accepted = &self.rules.consent.purposes;
        if !purposes.is_empty()
            && !purposes
                .iter()
                .any(|(s, c)| accepted.iter().any(|a| &a.system == s && &a.code == c))
        {
            return Some("its purposes do not include a second opinion (treatment)".into());
        }
        // A provision that names who may receive the records must name the
        // service (as any party: recipient, custodian…); one naming only
        // others does not permit disclosure to us.
        let actors: Vec<&str> = items(provision, "actor")
            .filter_map(|a| reference_of(a.get("reference")))
            .collect();
        let names_us = |reference: &str| {
            reference == SERVICE_ORGANIZATION
                || reference.ends_with(&format!("/{SERVICE_ORGANIZATION}"))
        };
        if !actors.is_empty() && !actors.iter().any(|r| names_us(r)) {
            return Some(format!(
                "its provision names who may receive the records (provision.actor) and the \
                 service ({SERVICE_ORGANIZATION}) is not among them"
            ));
        }
        self.denied_by_exception(provision, now_ms, 0)
    }

    /// A nested provision (an exception to the base one) of type deny that
    /// applies to a second opinion by the service now: its actors (if any)
    /// name the service, its purposes (if any) include ours, its period
    /// (if any) is current.
    fn denied_by_exception(
        &self,
        provision: Option<&Value>,
        now_ms: i64,
        depth: usize,
    ) -> Option<String> {
        // Deeper nesting than any real consent: refuse rather than recurse on.
        if depth > 8 {
            return Some("its provisions are nested too deeply to evaluate".into());
        }
        for nested in items(provision, "provision") {
            let applies = {
                let actors: Vec<&str> = items(Some(nested), "actor")
                    .filter_map(|a| reference_of(a.get("reference")))
                    .collect();
                let to_us = actors.is_empty()
                    || actors.iter().any(|r| {
                        *r == SERVICE_ORGANIZATION
                            || r.ends_with(&format!("/{SERVICE_ORGANIZATION}"))
                    });
                let accepted = &self.rules.consent.purposes;
                let purposes: Vec<&Value> = items(Some(nested), "purpose").collect();
                let for_us = purposes.is_empty()
                    || purposes.iter().any(|c| {
                        accepted.iter().any(|a| {
                            c.get("system").and_then(Value::as_str) == Some(a.system.as_str())
                                && c.get("code").and_then(Value::as_str) == Some(a.code.as_str())
                        })
                    });
                let period = nested.get("period");
                let started = period
                    .and_then(|p| p.get("start"))
                    .and_then(Value::as_str)
                    .and_then(start_ms)
                    .is_none_or(|start| now_ms >= start);
                let not_ended = period
                    .and_then(|p| p.get("end"))
                    .and_then(Value::as_str)
                    .and_then(end_ms)
                    .is_none_or(|end| now_ms <= end);
                to_us && for_us && started && not_ended
            };
            if applies && nested.get("type").and_then(Value::as_str) == Some("deny") {
                return Some(
                    "a nested provision (provision.provision) denies disclosure to the service for this purpose".into(),
                );
            }
            if let Some(why) = self.denied_by_exception(Some(nested), now_ms, depth + 1) {
                return Some(why);
            }
        }
        None
    }

    /// The open cases a written record may complete: of its patient or of
    /// the referral it names, same partner.
    async fn cases_touched_by(
        &self,
        r: &mut dyn Records,
        w: &Written,
    ) -> Result<Vec<String>, WorkflowError> {
        // A deleted record is found by what it was, and stays its
        // partner's: it touches that partner's cases only.
        let body = match r.read(&w.reference()).await? {
            Some(record) => record.body,
            None => match &w.previous {
                Some(previous) => previous.clone(),
                None => return Ok(Vec::new()),
            },
        };
        let partner = &w.partner;
        let body = &body;
        let mut requests = BTreeSet::new();
        let mut patients = BTreeSet::new();
        for key in ["subject", "patient"] {
            if let Some(p) = reference_of(body.get(key)).filter(|p| p.starts_with("Patient/")) {
                patients.insert(p.to_owned());
            }
        }
        for based in items(Some(body), "basedOn").chain(items(body.get("context"), "related")) {
            if let Some(s) = reference_of(Some(based)).filter(|s| s.starts_with("ServiceRequest/"))
            {
                requests.insert(s.to_owned());
            }
        }
        let mut tasks = BTreeSet::new();
        for request in &requests {
            if let Some(task) = self.case_task(r, request).await? {
                tasks.insert(task.reference());
            }
        }
        for patient in &patients {
            for task in r.search("Task", &format!("patient={patient}")).await? {
                if *partner == task.partner
                    && case_of(&task.body).is_some_and(|c| !c.stage.is_final())
                    && task.body.get("partOf").is_none()
                {
                    tasks.insert(task.reference());
                }
            }
        }
        Ok(tasks.into_iter().collect())
    }

    /// A client wrote a Task: a withdrawal or decline is a case event; any
    /// other change to what the workflow owns is refused; a second case
    /// Task for one referral too.
    async fn task_written(
        &self,
        r: &mut dyn Records,
        caller: &Caller,
        w: &Written,
        now_ms: i64,
    ) -> Result<(), WorkflowError> {
        let Some(task) = r.read(&w.reference()).await? else {
            return Ok(());
        };
        let Some(previous) = &w.previous else {
            // A new Task for a referral that already has a case.
            if let Some(request) = reference_of(task.body.get("focus")) {
                if request.starts_with("ServiceRequest/") && task.body.get("partOf").is_none() {
                    if let Some(existing) = self.case_task(r, request).await? {
                        if existing.id != task.id {
                            return Err(WorkflowError::Invalid(format!(
                                "{request} already has its case Task ({}); follow that one",
                                existing.reference()
                            )));
                        }
                    }
                }
            }
            return Ok(());
        };
        let Some(before) = case_of(previous) else {
            return Ok(());
        };
        // Whether records are kept past retention is the service's call.
        if matches!(caller, Caller::Partner(_))
            && retention::on_legal_hold(previous) != retention::on_legal_hold(&task.body)
        {
            return Err(WorkflowError::Invalid(format!(
                "the {}|{} tag of a case Task is set and removed by the service's staff",
                retention::CASE_FLAG,
                retention::LEGAL_HOLD
            )));
        }
        // Retention counts inactivity from lastModified: a client's write
        // is activity and may move it up to now, never back or ahead.
        let mut task = task;
        if let Some(kept) = kept_last_modified(previous, &task.body, now_ms) {
            if let Some(obj) = task.body.as_object_mut() {
                obj.insert("lastModified".into(), kept);
            }
            task = r.update(&task).await?;
        }
        if task::workflow_owned(previous) == task::workflow_owned(&task.body) {
            return Ok(());
        }
        let status = task
            .body
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("");
        let event = match (status, caller) {
            ("cancelled", _) => Event::Withdrawn,
            ("rejected", Caller::Staff(_)) => Event::Declined {
                reason: task
                    .body
                    .get("statusReason")
                    .and_then(|s| s.get("text"))
                    .and_then(Value::as_str)
                    .unwrap_or("declined by the service")
                    .to_owned(),
            },
            _ => {
                return Err(WorkflowError::Invalid(
                    "Task.status, businessStatus, statusReason, owner, focus, for, output and the missing-record inputs are kept by the workflow: withdraw with status 'cancelled', or use $assign, $approve and $return".into(),
                ))
            }
        };
        let next = case::apply(&before, &event)?;
        // Restore what the workflow owns, then write the new state.
        for key in [
            "businessStatus",
            "owner",
            "focus",
            "for",
            "output",
            "partOf",
        ] {
            match previous.get(key) {
                Some(v) => {
                    task.body[key] = v.clone();
                }
                None => {
                    if let Some(o) = task.body.as_object_mut() {
                        o.shift_remove(key);
                    }
                }
            }
        }
        let reason = task.body.get("statusReason").cloned();
        write_case(
            &mut task.body,
            &next,
            self.rules,
            SERVICE_ORGANIZATION,
            &instant_text(now_ms),
        );
        if let (Event::Declined { .. }, Some(reason)) = (&event, reason) {
            task.body["statusReason"] = reason;
        }
        r.update(&task).await?;
        Ok(())
    }

    /// A report on a referral: a preliminary one from the specialist is the
    /// draft opinion; making it final is `$approve`'s alone. A draft not yet
    /// approved may be withdrawn (entered-in-error, cancelled or deleted).
    async fn report_written(
        &self,
        r: &mut dyn Records,
        caller: &Caller,
        w: &Written,
        now_ms: i64,
    ) -> Result<(), WorkflowError> {
        // The report as written, or as it was before its deletion.
        let body = if w.deleted {
            w.previous.clone()
        } else {
            r.read(&w.reference()).await?.map(|report| report.body)
        };
        let Some(body) = body else {
            return Ok(());
        };
        let Some(mut file) = self.case_of_report(r, &body).await? else {
            return Ok(());
        };
        if let Caller::Partner(_) = caller {
            return Err(WorkflowError::Invalid(
                "the opinion on a case is written by the service's specialist".into(),
            ));
        }
        let status_of = |body: &Value| {
            body.get("status")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned()
        };
        let was = w.previous.as_ref().map(status_of);
        let status = if w.deleted {
            "deleted".to_owned()
        } else {
            status_of(&body)
        };
        match status.as_str() {
            "registered" | "partial" | "preliminary" => {
                if let Some(withdrawn @ ("entered-in-error" | "cancelled")) = was.as_deref() {
                    return Err(WorkflowError::Invalid(format!(
                        "{} was withdrawn ('{withdrawn}') and stays so: write a new draft",
                        w.reference()
                    )));
                }
                let findings = r.profile_findings(&body, OPINION_PROFILE).await;
                if !findings.is_empty() {
                    return Err(WorkflowError::Unconformant {
                        what: format!("the draft opinion {}", w.reference()),
                        profile: OPINION_PROFILE,
                        findings,
                    });
                }
                // A preliminary report is the draft submitted for approval;
                // a registered or partial one is work in progress, kept
                // without moving the case.
                match file.case.stage {
                    Stage::UnderReview if status == "preliminary" => {
                        self.move_case(r, &mut file, &Event::DraftSubmitted, now_ms)
                            .await?;
                    }
                    Stage::UnderReview | Stage::AwaitingApproval => {}
                    // Refused with the state machine's reason.
                    _ => {
                        case::apply(&file.case, &Event::DraftSubmitted)?;
                    }
                }
                Ok(())
            }
            "entered-in-error" | "cancelled" | "deleted" => match was.as_deref() {
                Some("registered" | "partial" | "preliminary") => {
                    self.draft_withdrawn(r, &mut file, now_ms).await
                }
                // A draft withdrawn before may go.
                Some("entered-in-error" | "cancelled") if w.deleted => Ok(()),
                // What was delivered stays the case's record.
                Some(delivered) if w.deleted => Err(WorkflowError::Conflict(format!(
                    "{} is the '{delivered}' opinion of the case {}, which keeps it as its record",
                    w.reference(),
                    file.task.reference()
                ))),
                _ => Err(WorkflowError::Invalid(format!(
                    "only a draft opinion (registered, partial or preliminary) becomes '{status}'; {} was '{}'",
                    w.reference(),
                    was.as_deref().unwrap_or("not there")
                ))),
            },
            _ => Err(WorkflowError::Invalid(format!(
                "a case's opinion becomes '{status}' only through DiagnosticReport/{}/$approve",
                w.id
            ))),
        }
    }

    /// A draft opinion was withdrawn: when no submitted draft is left on a
    /// case waiting for approval, the case returns to review.
    async fn draft_withdrawn(
        &self,
        r: &mut dyn Records,
        file: &mut CaseFile,
        now_ms: i64,
    ) -> Result<(), WorkflowError> {
        if file.case.stage != Stage::AwaitingApproval {
            // Work in progress under review, or a draft left over after
            // delivery, just goes; elsewhere the state machine refuses
            // with its reason.
            case::apply(&file.case, &Event::DraftWithdrawn)?;
            return Ok(());
        }
        let Some(request) = reference_of(file.task.body.get("focus")) else {
            return Ok(());
        };
        let submitted = r
            .search(
                "DiagnosticReport",
                &format!("based-on={request}&status=preliminary"),
            )
            .await?;
        if submitted.is_empty() {
            self.move_case(r, file, &Event::DraftWithdrawn, now_ms)
                .await?;
        }
        Ok(())
    }

    async fn case_of_report(
        &self,
        r: &mut dyn Records,
        report: &Value,
    ) -> Result<Option<CaseFile>, WorkflowError> {
        for based in items(Some(report), "basedOn") {
            let Some(request) =
                reference_of(Some(based)).filter(|s| s.starts_with("ServiceRequest/"))
            else {
                continue;
            };
            if let Some(task) = self.case_task(r, request).await? {
                return Ok(Some(self.case_file(r, task).await?));
            }
        }
        Ok(None)
    }

    /// `$assign`: a specialist for a case ready for triage (or a new one
    /// under review). `owner`: a PractitionerRole reference; without it the
    /// referral's requested performer when available, else the available
    /// specialist of the specialty with the fewest open cases.
    pub async fn assign(
        &self,
        r: &mut dyn Records,
        task_id: &str,
        owner: Option<&str>,
        now_ms: i64,
    ) -> Result<Record, WorkflowError> {
        let (mut file, specialty) = self.triage_file(r, task_id, now_ms).await?;
        let chosen = match owner {
            Some(owner) => {
                let role = r
                    .read(owner)
                    .await?
                    .filter(|role| role.resource_type == "PractitionerRole")
                    .ok_or_else(|| {
                        WorkflowError::Invalid(format!(
                            "owner {owner} is not a PractitionerRole of this service"
                        ))
                    })?;
                if let Some(why) = unavailable(&role.body, now_ms) {
                    return Err(WorkflowError::Invalid(format!("{owner} {why}")));
                }
                role.reference()
            }
            None => self.propose(r, &file, &specialty, now_ms).await?.owner,
        };
        self.move_case(
            r,
            &mut file,
            &Event::Assigned { specialist: chosen },
            now_ms,
        )
        .await?;
        Ok(file.task)
    }

    /// `$propose`: the specialist `$assign` without an owner would choose
    /// for a case ready for triage (or under review), and why; nothing
    /// changes.
    pub async fn proposal(
        &self,
        r: &mut dyn Records,
        task_id: &str,
        now_ms: i64,
    ) -> Result<Proposal, WorkflowError> {
        let (file, specialty) = self.triage_file(r, task_id, now_ms).await?;
        // Refused as $assign would be, by the case's stage.
        case::apply(
            &file.case,
            &Event::Assigned {
                specialist: String::new(),
            },
        )?;
        self.propose(r, &file, &specialty, now_ms).await
    }

    /// The case of `Task/{task_id}` for triage, its consent checked again
    /// (it may have changed since), and the referral's specialty.
    async fn triage_file(
        &self,
        r: &mut dyn Records,
        task_id: &str,
        now_ms: i64,
    ) -> Result<(CaseFile, String), WorkflowError> {
        let task_ref = format!("Task/{task_id}");
        let task = r
            .read(&task_ref)
            .await?
            .ok_or_else(|| WorkflowError::NotFound(task_ref.clone()))?;
        let mut file = self.case_file(r, task).await?;
        file.task = self.check_case(r, file.task.clone(), now_ms).await?;
        file.case = case_of(&file.task.body).unwrap_or(file.case);
        let specialty = codes(file.request.body.get("code"), SPECIALTY)
            .next()
            .unwrap_or("")
            .to_owned();
        Ok((file, specialty))
    }

    /// The specialist to propose for a case: the referral's requested
    /// performer when available, else the available specialist of the
    /// specialty with the fewest open cases.
    async fn propose(
        &self,
        r: &mut dyn Records,
        file: &CaseFile,
        specialty: &str,
        now_ms: i64,
    ) -> Result<Proposal, WorkflowError> {
        let roles = r
            .search(
                "PractitionerRole",
                &format!("specialty={SPECIALTY}|{specialty}&active=true"),
            )
            .await?;
        let available: Vec<Record> = roles
            .into_iter()
            .filter(|role| unavailable(&role.body, now_ms).is_none())
            .collect();
        let requested: Vec<&str> = items(Some(&file.request.body), "performer")
            .filter_map(|p| reference_of(Some(p)))
            .collect();
        let mut best: Option<Proposal> = None;
        for role in &available {
            let open_cases = r
                .search(
                    "Task",
                    &format!("owner={}&status=in-progress", role.reference()),
                )
                .await?
                .len();
            // The referrer may name the role or the doctor who holds it.
            let practitioner = reference_of(role.body.get("practitioner"));
            let candidate = Proposal {
                owner: role.reference(),
                requested: requested.contains(&role.reference().as_str())
                    || practitioner.is_some_and(|p| requested.contains(&p)),
                open_cases,
            };
            if candidate.requested {
                return Ok(candidate);
            }
            if best.as_ref().is_none_or(|b| open_cases < b.open_cases) {
                best = Some(candidate);
            }
        }
        best.ok_or_else(|| {
            WorkflowError::Invalid(format!(
                "no active, available PractitionerRole with specialty {SPECIALTY}|{specialty}: name one as 'owner'"
            ))
        })
    }

    /// `$approve`: the draft becomes the final opinion, rendered as a PDF
    /// (unless one was supplied), filed as a DocumentReference, made
    /// visible to the referrer, and the case is delivered.
    pub async fn approve(
        &self,
        r: &mut dyn Records,
        report_id: &str,
        now_ms: i64,
    ) -> Result<Record, WorkflowError> {
        let report_ref = format!("DiagnosticReport/{report_id}");
        let mut report = r
            .read(&report_ref)
            .await?
            .ok_or_else(|| WorkflowError::NotFound(report_ref.clone()))?;
        let mut file = self.case_of_report(r, &report.body).await?.ok_or_else(|| {
            WorkflowError::Invalid(format!(
                "{report_ref} is not based on a referral with a case"
            ))
        })?;
        // The consent must still hold at delivery.
        file.task = self.check_case(r, file.task.clone(), now_ms).await?;
        file.case = case_of(&file.task.body).unwrap_or(file.case);
        let status = report
            .body
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("");
        if status != "preliminary" {
            return Err(WorkflowError::Invalid(format!(
                "{report_ref} is '{status}': only a draft (preliminary) opinion is approved"
            )));
        }
        let delivered = case::apply(&file.case, &Event::Approved)?;
        self.check_opinion_imaging(r, &file, &report_ref, &report.body)
            .await?;
        // What is delivered must meet the profile as a final opinion.
        let mut as_final = report.body.clone();
        as_final["status"] = json!("final");
        let findings = r.profile_findings(&as_final, OPINION_PROFILE).await;
        if !findings.is_empty() {
            return Err(WorkflowError::Unconformant {
                what: format!("{report_ref}, once final,"),
                profile: OPINION_PROFILE,
                findings,
            });
        }
        let now = instant_text(now_ms);
        // The report.
        let pdf = match supplied_pdf(&report.body) {
            Some(pdf) => pdf,
            None => {
                let pdf = super::pdf::render_opinion(&report.body, &now);
                let attachment = json!({
                    "contentType": "application/pdf",
                    "data": base64_encode(&pdf),
                    "title": "Second opinion",
                    "creation": now,
                });
                let forms = report
                    .body
                    .as_object_mut()
                    .map(|o| o.entry("presentedForm").or_insert_with(|| json!([])));
                if let Some(Value::Array(forms)) = forms {
                    forms.push(attachment);
                }
                pdf
            }
        };
        report.body["status"] = json!("final");
        report.body["issued"] = json!(now);
        report.partner = file.partner.clone();
        let report = r.update(&report).await?;
        // The opinion as a document of the case.
        let document = build::opinion_document(
            &pdf,
            file.patient.as_deref(),
            &[file.request.reference(), report.reference()],
            SERVICE_ORGANIZATION,
            now_ms,
        )?;
        r.create("DocumentReference", file.partner.clone(), document)
            .await?;
        // The case.
        write_case(
            &mut file.task.body,
            &delivered,
            self.rules,
            SERVICE_ORGANIZATION,
            &now,
        );
        file.task.body["output"] = json!([{
            "type": {"coding": [{"system": task::CASE_INPUT, "code": "opinion", "display": "Second opinion"}]},
            "valueReference": {"reference": report.reference()},
        }]);
        let period = file
            .task
            .body
            .as_object_mut()
            .map(|o| o.entry("executionPeriod").or_insert_with(|| json!({})));
        if let Some(period) = period {
            period["end"] = json!(now);
        }
        r.update(&file.task).await?;
        Ok(report)
    }

    /// An opinion names the imaging it rests on: when studies Konsil
    /// received are linked to the case, `imagingStudy` names at least one,
    /// and never a study that is not the case's.
    async fn check_opinion_imaging(
        &self,
        r: &mut dyn Records,
        file: &CaseFile,
        report_ref: &str,
        report: &Value,
    ) -> Result<(), WorkflowError> {
        let received: BTreeSet<String> = r
            .search(
                "ImagingStudy",
                &format!("basedon={}", file.request.reference()),
            )
            .await?
            .into_iter()
            .filter(|s| s.partner == file.partner && has_our_endpoint(&s.body))
            .map(|s| s.reference())
            .collect();
        // `ImagingStudy/x`, also when written as an absolute URL.
        let named: Vec<&str> = items(Some(report), "imagingStudy")
            .filter_map(|i| reference_of(Some(i)))
            .map(|r| r.rfind("ImagingStudy/").map_or(r, |at| &r[at..]))
            .collect();
        if let Some(foreign) = named.iter().find(|n| !received.contains(**n)) {
            return Err(WorkflowError::Invalid(format!(
                "{report_ref}.imagingStudy names {foreign}, which is not a study received for this case"
            )));
        }
        if named.is_empty() && !received.is_empty() {
            return Err(WorkflowError::Invalid(format!(
                "{report_ref}.imagingStudy is empty, but the case has received imaging ({}): name the studies the opinion rests on",
                received.into_iter().collect::<Vec<_>>().join(", ")
            )));
        }
        Ok(())
    }

    /// The referring partner read a final opinion: the patient's
    /// notification is released now, once (the referrer hears first).
    pub async fn opinion_read(
        &self,
        r: &mut dyn Records,
        report_id: &str,
        now_ms: i64,
    ) -> Result<(), WorkflowError> {
        let Some(report) = r.read(&format!("DiagnosticReport/{report_id}")).await? else {
            return Ok(());
        };
        if report.body.get("status").and_then(Value::as_str) != Some("final") {
            return Ok(());
        }
        let Some(mut file) = self.case_of_report(r, &report.body).await? else {
            return Ok(());
        };
        let notified = task::has_output(&file.task.body, PATIENT_NOTIFIED);
        if notified || file.case.stage != Stage::Delivered {
            return Ok(());
        }
        let Some(patient) = file.patient.clone() else {
            return Ok(());
        };
        let message = build::communication(
            build::Message {
                category: build::notification_category()?,
                subject: Some(&patient),
                about: vec![report.reference()],
                recipients: vec![patient.clone()],
                sender: SERVICE_ORGANIZATION,
                text: "Your second opinion is complete and has been sent to your referring physician, who will discuss it with you.",
            },
            now_ms,
        )?;
        let message = r
            .create("Communication", file.partner.clone(), message)
            .await?;
        let outputs = file
            .task
            .body
            .as_object_mut()
            .map(|o| o.entry("output").or_insert_with(|| json!([])));
        if let Some(Value::Array(outputs)) = outputs {
            outputs.push(json!({
                "type": {"coding": [{"system": task::CASE_INPUT, "code": PATIENT_NOTIFIED, "display": "Patient notified"}]},
                "valueReference": {"reference": message.reference()},
            }));
        }
        r.update(&file.task).await?;
        Ok(())
    }

    /// `$return`: the draft goes back to the specialist with a note (kept
    /// as an internal Communication; the referrer never sees it).
    pub async fn return_draft(
        &self,
        r: &mut dyn Records,
        report_id: &str,
        note: &str,
        now_ms: i64,
    ) -> Result<Record, WorkflowError> {
        let report_ref = format!("DiagnosticReport/{report_id}");
        let report = r
            .read(&report_ref)
            .await?
            .ok_or_else(|| WorkflowError::NotFound(report_ref.clone()))?;
        let mut file = self.case_of_report(r, &report.body).await?.ok_or_else(|| {
            WorkflowError::Invalid(format!(
                "{report_ref} is not based on a referral with a case"
            ))
        })?;
        if note.trim().is_empty() {
            return Err(WorkflowError::Invalid(
                "$return needs a 'note' saying what to change".into(),
            ));
        }
        self.move_case(
            r,
            &mut file,
            &Event::Returned {
                note: note.to_owned(),
            },
            now_ms,
        )
        .await?;
        let message = build::communication(
            build::Message {
                category: build::text_category("Opinion returned for revision")?,
                subject: None,
                about: vec![report.reference(), file.task.reference()],
                recipients: file.case.specialist.iter().cloned().collect(),
                sender: SERVICE_ORGANIZATION,
                text: note,
            },
            now_ms,
        )?;
        r.create("Communication", None, message).await?;
        Ok(file.task)
    }

    /// A study arrived (or more of it): find its case, keep its
    /// ImagingStudy current, re-run the case's checks. A study no rule
    /// matches waits, as an ImagingStudy without `basedOn`, for `$link`.
    pub async fn reconcile(
        &self,
        r: &mut dyn Records,
        study: &StudySummary,
        now_ms: i64,
    ) -> Result<Option<Record>, WorkflowError> {
        let partner = Some(study.partner.clone());
        let uid_value = format!("urn:oid:{}", study.uid);
        let mut existing = r
            .search(
                "ImagingStudy",
                &format!("identifier=urn:dicom:uid|{uid_value}"),
            )
            .await?
            .into_iter()
            .filter(|s| s.partner == partner)
            .collect::<Vec<_>>();
        // Prefer the one linked to a case.
        existing.sort_by_key(|s| s.body.get("basedOn").is_none());
        let mut record = existing.into_iter().next();
        let linked = record
            .as_ref()
            .and_then(|s| based_on_request(&s.body))
            .map(str::to_owned);
        let task = match &linked {
            Some(request) => self.case_task(r, request).await?,
            None => self.match_case(r, study).await?,
        };
        let file = match task {
            Some(task) => Some(self.case_file(r, task).await?),
            None => None,
        };
        let before = record.as_ref().map(|s| s.body.clone());
        let mut body = match record.as_ref() {
            Some(s) => s.body.clone(),
            None => json!({"resourceType": "ImagingStudy", "status": "available"}),
        };
        // The manifest's announced count, kept before it is overwritten.
        if announced(&body).is_none() && !has_our_endpoint(&body) {
            if let Some(n) = body.get("numberOfInstances").and_then(Value::as_u64) {
                let ext = body
                    .as_object_mut()
                    .map(|o| o.entry("extension").or_insert_with(|| json!([])));
                if let Some(Value::Array(list)) = ext {
                    list.push(json!({"url": ANNOUNCED_INSTANCES, "valueUnsignedInt": n}));
                }
            }
        }
        study.write_into(&mut body, SERVICE_ENDPOINT);
        match &file {
            Some(file) => {
                body["basedOn"] = json!([{ "reference": file.request.reference() }]);
                if let Some(patient) = &file.patient {
                    body["subject"] = json!({ "reference": patient });
                }
            }
            None => {
                if body.get("subject").is_none() {
                    // No patient resource yet: a logical reference by the
                    // study's Patient ID (no name, no PHI beyond the id).
                    let mut identifier = json!({"value": study.patient_id.clone().unwrap_or_else(|| "unknown".into())});
                    if let Some(issuer) = &study.issuer_of_patient_id {
                        identifier["assigner"] = json!({ "display": issuer });
                    }
                    body["subject"] = json!({ "identifier": identifier });
                }
            }
        }
        let saved = match record.take() {
            Some(mut s) => {
                if Some(&body) == before.as_ref() {
                    s
                } else {
                    s.body = body;
                    r.update(&s).await?
                }
            }
            None => r.create("ImagingStudy", partner, body).await?,
        };
        if let Some(file) = file {
            self.check_case(r, file.task, now_ms).await?;
        }
        Ok(Some(saved))
    }

    /// The open case a study belongs to by its accession number, or (only
    /// if exactly one) by its patient: always of the same partner.
    async fn match_case(
        &self,
        r: &mut dyn Records,
        study: &StudySummary,
    ) -> Result<Option<Record>, WorkflowError> {
        let partner = Some(study.partner.clone());
        if let Some(accession) = &study.accession {
            let requests: Vec<Record> = r
                .search(
                    "ServiceRequest",
                    &format!("identifier={}", token_escape(accession)),
                )
                .await?
                .into_iter()
                .filter(|s| s.partner == partner)
                .collect();
            let mut tasks = Vec::new();
            for request in &requests {
                if let Some(task) = self.case_task(r, &request.reference()).await? {
                    tasks.push(task);
                }
            }
            if tasks.len() == 1 {
                return Ok(tasks.pop());
            }
        }
        let Some(patient_id) = &study.patient_id else {
            return Ok(None);
        };
        // Which identifier system the patient ID is in: the study's issuer,
        // else the partner's own. Without either, a patient ID alone could
        // be any of the partner's numbering schemes: no match by patient.
        let system = match &study.issuer_of_patient_id {
            Some(issuer) => IdSystem::Issuer(issuer),
            None => match self.patient_id_systems.get(&study.partner) {
                Some(system) => IdSystem::Exact(system),
                None => {
                    tracing::info!(
                        partner = %study.partner,
                        "a study without IssuerOfPatientID is not matched by patient: the partner has no patient_id_system"
                    );
                    return Ok(None);
                }
            },
        };
        let patients: Vec<Record> = r
            .search(
                "Patient",
                &format!("identifier={}", token_escape(patient_id)),
            )
            .await?
            .into_iter()
            .filter(|p| p.partner == partner)
            .filter(|p| has_identifier(&p.body, patient_id, system))
            .collect();
        let mut open = Vec::new();
        for patient in &patients {
            for task in r
                .search("Task", &format!("patient={}", patient.reference()))
                .await?
            {
                let open_case = case_of(&task.body).is_some_and(|c| {
                    matches!(
                        c.stage,
                        Stage::Intake
                            | Stage::AwaitingRecords
                            | Stage::ReadyForTriage
                            | Stage::UnderReview
                    )
                });
                if open_case && task.partner == partner && task.body.get("partOf").is_none() {
                    open.push(task);
                }
            }
        }
        Ok(if open.len() == 1 { open.pop() } else { None })
    }

    /// `$link`: staff attach an unmatched study to a case of the same
    /// partner.
    pub async fn link(
        &self,
        r: &mut dyn Records,
        imaging_study_id: &str,
        task_ref: &str,
        now_ms: i64,
    ) -> Result<Record, WorkflowError> {
        let study_ref = format!("ImagingStudy/{imaging_study_id}");
        let mut study = r
            .read(&study_ref)
            .await?
            .ok_or_else(|| WorkflowError::NotFound(study_ref.clone()))?;
        let task = r
            .read(task_ref)
            .await?
            .ok_or_else(|| WorkflowError::NotFound(task_ref.to_owned()))?;
        let file = self.case_file(r, task).await?;
        if study.partner != file.partner {
            return Err(WorkflowError::Invalid(format!(
                "{study_ref} and {task_ref} come from different partners; records are never merged across partners"
            )));
        }
        if let Some(other) = based_on_request(&study.body) {
            if other != file.request.reference() {
                return Err(WorkflowError::Invalid(format!(
                    "{study_ref} is already linked to {other}"
                )));
            }
        }
        study.body["basedOn"] = json!([{ "reference": file.request.reference() }]);
        if let Some(patient) = &file.patient {
            study.body["subject"] = json!({ "reference": patient });
        }
        let study = r.update(&study).await?;
        self.check_case(r, file.task, now_ms).await?;
        Ok(study)
    }

    /// A Communication on a delivered case from the referrer is a
    /// follow-up question (a child Task for the same specialist); one from
    /// the service answering it closes that child Task.
    async fn communication_written(
        &self,
        r: &mut dyn Records,
        caller: &Caller,
        w: &Written,
        now_ms: i64,
    ) -> Result<(), WorkflowError> {
        let Some(message) = r.read(&w.reference()).await? else {
            return Ok(());
        };
        match caller {
            Caller::Partner(_) => self.follow_up_question(r, message, now_ms).await,
            Caller::Staff(_) => self.follow_up_answer(r, message, now_ms).await,
        }
    }

    async fn follow_up_question(
        &self,
        r: &mut dyn Records,
        message: Record,
        now_ms: i64,
    ) -> Result<(), WorkflowError> {
        let mut task = None;
        for target in references_in(&message.body, &["partOf", "about", "basedOn"]) {
            if target.starts_with("Task/") {
                task = r.read(&target).await?;
            } else if target.starts_with("ServiceRequest/") {
                task = self.case_task(r, &target).await?;
            }
            if task.is_some() {
                break;
            }
        }
        let Some(task) = task.filter(|t| case_of(&t.body).is_some()) else {
            return Ok(());
        };
        let file = self.case_file(r, task).await?;
        if file.partner != message.partner {
            return Ok(());
        }
        if file.case.stage != Stage::Delivered {
            return Err(WorkflowError::Invalid(format!(
                "{} is {}: follow-up questions are taken once the opinion is delivered",
                file.task.reference(),
                file.case.stage
            )));
        }
        let delivered_ms = file
            .task
            .body
            .get("executionPeriod")
            .and_then(|p| p.get("end"))
            .and_then(Value::as_str)
            .and_then(start_ms)
            .unwrap_or(file.task.updated_ms);
        let window_ms = self.config.follow_up_days as i64 * 86_400_000;
        if now_ms - delivered_ms > window_ms {
            return Err(WorkflowError::Invalid(format!(
                "the follow-up window of {} days after delivery has closed",
                self.config.follow_up_days
            )));
        }
        let now = instant_text(now_ms);
        let child = build::follow_up_task(
            &file.task.reference(),
            &message.reference(),
            file.patient.as_deref(),
            reference_of(file.request.body.get("requester")),
            file.case
                .specialist
                .as_deref()
                .unwrap_or(SERVICE_ORGANIZATION),
            now_ms,
        )?;
        r.create("Task", file.partner.clone(), child).await?;
        // The parent case is active again: its inactivity clock restarts.
        let mut parent = file.task;
        parent.body["lastModified"] = json!(now);
        r.update(&parent).await?;
        Ok(())
    }

    async fn follow_up_answer(
        &self,
        r: &mut dyn Records,
        mut message: Record,
        now_ms: i64,
    ) -> Result<(), WorkflowError> {
        for question in references_in(&message.body, &["inResponseTo"]) {
            let Some(question) = r.read(&question).await? else {
                continue;
            };
            let children = r
                .search("Task", &format!("focus={}", question.reference()))
                .await?;
            let Some(mut child) = children
                .into_iter()
                .find(|t| t.body.get("partOf").is_some())
            else {
                continue;
            };
            let now = instant_text(now_ms);
            child.body["status"] = json!("completed");
            child.body["businessStatus"] = json!({"text": "answered"});
            child.body["lastModified"] = json!(now);
            child.body["output"] = json!([{
                "type": {"text": "Answer"},
                "valueReference": {"reference": message.reference()},
            }]);
            r.update(&child).await?;
            // The answer goes to the referrer.
            if message.partner != question.partner {
                message.partner = question.partner.clone();
                r.update(&message).await?;
            }
            return Ok(());
        }
        Ok(())
    }

    /// The open cases (their Task references), which the time-driven
    /// checks (quiet periods, stale records, consents that expired) look at
    /// again.
    pub async fn open_cases(&self, r: &mut dyn Records) -> Result<Vec<String>, WorkflowError> {
        let mut open = Vec::new();
        for stage in [
            Stage::Intake,
            Stage::AwaitingRecords,
            Stage::ReadyForTriage,
            Stage::UnderReview,
            Stage::AwaitingApproval,
        ] {
            let tasks = r
                .search(
                    "Task",
                    &format!(
                        "business-status={}|{}",
                        task::CASE_STAGE,
                        stage.business_status()
                    ),
                )
                .await?;
            open.extend(tasks.iter().map(Record::reference));
        }
        Ok(open)
    }
}

/// The first instant a FHIR date or dateTime covers, in ms.
/// A DocumentReference as a record the referrer submitted for the case of
/// `request`, or `None` when it is none: not `current`, filed by the
/// service itself (an earlier opinion is not the referrer's record), without
/// content (retention discarded it), or filed for another of the patient's
/// referrals (that case's record, on that case's retention clock).
fn submitted_document(doc: &Value, request: &str) -> Option<Document> {
    if doc.get("status").and_then(Value::as_str) != Some("current") {
        return None;
    }
    let has_content = items(Some(doc), "content").any(|c| {
        c.get("attachment")
            .is_some_and(|a| a.get("url").is_some() || a.get("data").is_some())
    });
    if reference_of(doc.get("custodian")) == Some(SERVICE_ORGANIZATION)
        || !has_content
        || retention::of_another_case(doc, request)
    {
        return None;
    }
    Some(Document {
        types: codings(doc.get("type")),
        categories: codings(doc.get("category")),
        date_ms: clinical_date_ms(doc),
    })
}

/// When a document's clinical content dates from, for "within N months":
/// the period of care it documents (`context.period`, its end if it has
/// one), else when its content was made (`attachment.creation`, the latest),
/// else when the reference was written (`date`). `date` comes last because
/// a referrer packaging an old note today writes today's date there.
fn clinical_date_ms(doc: &Value) -> Option<i64> {
    let period = doc.get("context").and_then(|c| c.get("period"));
    let from_period = period.and_then(|p| {
        let end = p.get("end").and_then(Value::as_str).and_then(start_ms);
        end.or_else(|| p.get("start").and_then(Value::as_str).and_then(start_ms))
    });
    from_period
        .or_else(|| {
            items(Some(doc), "content")
                .filter_map(|c| c.get("attachment")?.get("creation")?.as_str())
                .filter_map(start_ms)
                .max()
        })
        .or_else(|| doc.get("date").and_then(Value::as_str).and_then(start_ms))
}

fn start_ms(value: &str) -> Option<i64> {
    crate::fhir::search::date_range(value).map(|r| r.0)
}

/// The last instant a FHIR date or dateTime covers (`2027-11-19` lasts
/// all day), in ms.
fn end_ms(value: &str) -> Option<i64> {
    crate::fhir::search::date_range(value).map(|r| r.1)
}

fn codings(concept: Option<&Value>) -> Vec<Coding> {
    let list: Vec<&Value> = match concept {
        Some(Value::Array(list)) => list.iter().collect(),
        Some(one) => vec![one],
        None => vec![],
    };
    list.into_iter()
        .filter_map(|c| c.get("coding").and_then(Value::as_array))
        .flatten()
        .filter_map(|c| {
            Some(Coding {
                system: c.get("system")?.as_str()?.to_owned(),
                code: c.get("code")?.as_str()?.to_owned(),
            })
        })
        .collect()
}

fn announced(study: &Value) -> Option<u64> {
    extensions(Some(study), ANNOUNCED_INSTANCES)
        .next()?
        .get("valueUnsignedInt")?
        .as_u64()
}

/// The `lastModified` a client's Task write must keep, if its own is not
/// acceptable: missing or earlier than before (the previous value stays),
/// or more than a minute ahead of now (now).
fn kept_last_modified(previous: &Value, written: &Value, now_ms: i64) -> Option<Value> {
    let at = |task: &Value| {
        task.get("lastModified")
            .and_then(Value::as_str)
            .and_then(start_ms)
    };
    let before = previous.get("lastModified").cloned();
    match (at(previous), at(written)) {
        (_, Some(new)) if new > now_ms + 60_000 => Some(json!(instant_text(now_ms))),
        (Some(old), Some(new)) if new < old => before,
        (Some(_), None) => before,
        _ => None,
    }
}

/// Whether an ImagingStudy says how many instances to expect: a manifest
/// not yet matched by DICOM (its `numberOfInstances`), or a received study
/// that keeps the manifest's count (`announced-instances`).
fn announces_instances(study: &Value) -> bool {
    if has_our_endpoint(study) {
        return announced(study).is_some();
    }
    study
        .get("numberOfInstances")
        .and_then(Value::as_u64)
        .is_some_and(|n| n > 0)
}

fn has_our_endpoint(study: &Value) -> bool {
    items(Some(study), "endpoint").any(|x| reference_of(Some(x)) == Some(SERVICE_ENDPOINT))
}

fn based_on_request(study: &Value) -> Option<&str> {
    items(Some(study), "basedOn")
        .filter_map(|b| reference_of(Some(b)))
        .find(|s| s.starts_with("ServiceRequest/"))
}

fn references_in(body: &Value, keys: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for key in keys {
        match body.get(*key) {
            Some(Value::Array(list)) => out.extend(
                list.iter()
                    .filter_map(|v| reference_of(Some(v)))
                    .map(str::to_owned),
            ),
            Some(one) => out.extend(reference_of(Some(one)).map(str::to_owned)),
            None => {}
        }
    }
    out
}

/// Why a PractitionerRole cannot take a case now (`None`: it can).
fn unavailable(role: &Value, now_ms: i64) -> Option<String> {
    if role.get("active").and_then(Value::as_bool) == Some(false) {
        return Some("is not active".into());
    }
    for absence in items(Some(role), "notAvailable") {
        let during = absence.get("during");
        let start = during
            .and_then(|d| d.get("start"))
            .and_then(Value::as_str)
            .and_then(start_ms);
        let end = during
            .and_then(|d| d.get("end"))
            .and_then(Value::as_str)
            .and_then(end_ms);
        let begun = start.is_none_or(|s| s <= now_ms);
        let over = end.is_some_and(|e| e < now_ms);
        if during.is_some() && begun && !over {
            let why = absence
                .get("description")
                .and_then(Value::as_str)
                .unwrap_or("not available");
            return Some(format!("is not available now ({why})"));
        }
    }
    None
}

/// A PDF the specialist supplied in `presentedForm`, decoded.
fn supplied_pdf(report: &Value) -> Option<Vec<u8>> {
    use base64::Engine as _;
    items(Some(report), "presentedForm")
        .filter(|a| a.get("contentType").and_then(Value::as_str) == Some("application/pdf"))
        .find_map(|a| {
            let data: String = a.get("data")?.as_str()?.split_whitespace().collect();
            base64::engine::general_purpose::STANDARD.decode(data).ok()
        })
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Escape a token search value (`,`, `|`, `$` and `\` are special).
fn token_escape(value: &str) -> String {
    let mut out = String::new();
    for c in value.chars() {
        if matches!(c, ',' | '|' | '$' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    // The search string is parsed as a URL query.
    form_urlencoded::byte_serialize(out.as_bytes()).collect()
}

/// The identifier system a study's patient ID belongs to.
#[derive(Debug, Clone, Copy)]
enum IdSystem<'a> {
    /// The study's Issuer of Patient ID: the system is it, or
    /// `urn:oid:<it>` when it is an OID.
    Issuer(&'a str),
    /// The partner's configured system, as is.
    Exact(&'a str),
}

/// Whether a Patient has the identifier `value` in `system`.
fn has_identifier(patient: &Value, value: &str, system: IdSystem<'_>) -> bool {
    items(Some(patient), "identifier")
        .filter(|i| i.get("value").and_then(Value::as_str) == Some(value))
        .any(|i| {
            let found = i.get("system").and_then(Value::as_str).unwrap_or("");
            match system {
                IdSystem::Issuer(issuer) => {
                    found == issuer || found.strip_prefix("urn:oid:") == Some(issuer)
                }
                IdSystem::Exact(wanted) => found == wanted,
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A clinical note filed for `ServiceRequest/sr-1`.
    fn note(extra: Value) -> Value {
        let mut doc = json!({
            "resourceType": "DocumentReference",
            "status": "current",
            "type": {"coding": [{"system": "http://loinc.org", "code": "11506-3"}]},
            "content": [{"attachment": {"url": "Binary/b1", "contentType": "application/pdf"}}],
            "context": {"related": [{"reference": "ServiceRequest/sr-1"}]}
        });
        if let (Some(doc), Value::Object(extra)) = (doc.as_object_mut(), extra) {
            doc.extend(extra);
        }
        doc
    }

    #[test]
    fn only_the_referrers_current_records_with_content_count_for_the_case() {
        let counted = |doc: &Value| submitted_document(doc, "ServiceRequest/sr-1").is_some();
        assert!(counted(&note(json!({}))));
        // The service's own filing (an earlier opinion's PDF) is not the
        // referrer's record, whatever its type says.
        assert!(!counted(&note(
            json!({"custodian": {"reference": SERVICE_ORGANIZATION}})
        )));
        assert!(counted(&note(
            json!({"custodian": {"reference": "Organization/st-mary"}})
        )));
        assert!(!counted(&note(json!({"status": "superseded"}))));
        // Retention took the content away: no record any more.
        assert!(!counted(&note(
            json!({"content": [{"attachment": {"contentType": "application/pdf", "title": "discarded"}}]})
        )));
        // Filed for another referral of the patient: that case's record.
        assert!(!counted(&note(
            json!({"context": {"related": [{"reference": "ServiceRequest/sr-2"}]}})
        )));
        // Filed for the patient without naming a referral: counts.
        assert!(counted(&note(json!({"context": {}}))));
    }

    #[test]
    fn a_documents_clinical_date_is_its_period_then_its_contents_creation_then_its_date() {
        let date = |extra: Value| {
            submitted_document(&note(extra), "ServiceRequest/sr-1").and_then(|d| d.date_ms)
        };
        let ms = |s: &str| start_ms(s);
        // Packaged today, about a visit two years ago: the visit counts.
        assert_eq!(
            date(json!({
                "date": "2026-11-20T10:00:00Z",
                "context": {"period": {"start": "2024-03-01", "end": "2024-03-02"}},
                "content": [{"attachment": {"url": "Binary/b1", "creation": "2026-11-20"}}]
            })),
            ms("2024-03-02")
        );
        assert_eq!(
            date(json!({"context": {"period": {"start": "2024-03-01"}}})),
            ms("2024-03-01")
        );
        assert_eq!(
            date(json!({
                "date": "2026-11-20T10:00:00Z",
                "content": [
                    {"attachment": {"url": "Binary/b1", "creation": "2025-01-05"}},
                    {"attachment": {"url": "Binary/b2", "creation": "2025-02-07"}}
                ]
            })),
            ms("2025-02-07")
        );
        assert_eq!(
            date(json!({"date": "2026-11-20T10:00:00Z"})),
            ms("2026-11-20T10:00:00Z")
        );
        assert_eq!(date(json!({})), None);
    }

    #[test]
    fn a_patient_id_matches_only_in_its_system() {
        let patient = serde_json::json!({"resourceType": "Patient", "identifier": [
            {"system": "urn:oid:1.2.3", "value": "MRN-1"},
            {"system": "http://lab.example/id", "value": "LAB-9"}]});
        assert!(has_identifier(&patient, "MRN-1", IdSystem::Issuer("1.2.3")));
        assert!(has_identifier(
            &patient,
            "MRN-1",
            IdSystem::Issuer("urn:oid:1.2.3")
        ));
        assert!(has_identifier(
            &patient,
            "LAB-9",
            IdSystem::Issuer("http://lab.example/id")
        ));
        assert!(!has_identifier(
            &patient,
            "MRN-1",
            IdSystem::Issuer("1.2.4")
        ));
        assert!(!has_identifier(
            &patient,
            "LAB-9",
            IdSystem::Issuer("1.2.3")
        ));
        assert!(has_identifier(
            &patient,
            "MRN-1",
            IdSystem::Exact("urn:oid:1.2.3")
        ));
        assert!(!has_identifier(&patient, "MRN-1", IdSystem::Exact("1.2.3")));
        assert!(!has_identifier(
            &patient,
            "LAB-9",
            IdSystem::Exact("urn:oid:1.2.3")
        ));
    }

    fn consent(provision: Value) -> Value {
        serde_json::json!({"resourceType": "Consent", "status": "active", "provision": provision})
    }

    #[test]
    fn a_consent_naming_recipients_must_name_the_service() {
        let workflow = Workflow::new(WorkflowConfig::default(), "http://gw/dicomweb".into())
            .expect("shipped rules load");
        let now = 1_800_000_000_000;
        let open = consent(serde_json::json!({"type": "permit"}));
        assert_eq!(workflow.consent_refusal(&open, now), None);
        let to_us = consent(serde_json::json!({"type": "permit", "actor": [
            {"role": {"text": "recipient"}, "reference": {"reference": "Organization/konsil"}},
            {"role": {"text": "source"}, "reference": {"reference": "Organization/st-mary"}}]}));
        assert_eq!(workflow.consent_refusal(&to_us, now), None);
        let absolute = consent(serde_json::json!({"type": "permit", "actor": [
            {"role": {"text": "recipient"}, "reference": {"reference": "https://gw.example.org/fhir/Organization/konsil"}}]}));
        assert_eq!(workflow.consent_refusal(&absolute, now), None);
        let to_others = consent(serde_json::json!({"type": "permit", "actor": [
            {"role": {"text": "recipient"}, "reference": {"reference": "Organization/other-clinic"}}]}));
        let why = workflow.consent_refusal(&to_others, now).expect("refused");
        assert!(why.contains("provision.actor"), "{why}");
    }

    #[test]
    fn a_nested_deny_for_the_service_refuses_and_one_for_others_does_not() {
        let workflow = Workflow::new(WorkflowConfig::default(), "http://gw/dicomweb".into())
            .expect("shipped rules load");
        let now = 1_800_000_000_000;
        let deny_us = consent(serde_json::json!({"type": "permit", "provision": [
            {"type": "deny", "actor": [{"role": {"text": "recipient"},
                "reference": {"reference": "Organization/konsil"}}]}]}));
        let why = workflow.consent_refusal(&deny_us, now).expect("refused");
        assert!(why.contains("nested provision"), "{why}");
        let deny_others = consent(serde_json::json!({"type": "permit", "provision": [
            {"type": "deny", "actor": [{"role": {"text": "recipient"},
                "reference": {"reference": "Organization/insurer"}}]}]}));
        assert_eq!(workflow.consent_refusal(&deny_others, now), None);
        let deny_ended = consent(serde_json::json!({"type": "permit", "provision": [
            {"type": "deny", "period": {"end": "2020-01-01"}}]}));
        assert_eq!(workflow.consent_refusal(&deny_ended, now), None);
        let deny_deep = consent(serde_json::json!({"type": "permit", "provision": [
            {"type": "permit", "provision": [{"type": "deny"}]}]}));
        assert!(workflow.consent_refusal(&deny_deep, now).is_some());
    }
}
