//! What the workflow needs from storage: FHIR resources as JSON, read, found
//! and written inside one atomic unit. The workflow defines this port; the
//! FHIR layer implements it on its resource store (validating and indexing
//! what the workflow writes, exactly as for a client's write).

use serde_json::Value;

use super::case::Refusal;
use crate::ids::{PartnerId, TransferId, Uid};

/// One current resource.
#[derive(Debug, Clone)]
pub struct Record {
    pub resource_type: String,
    pub id: String,
    pub version: i64,
    /// The partner the resource belongs to (who may read it); `None`: the
    /// service's own, visible to staff only.
    pub partner: Option<PartnerId>,
    pub body: Value,
    /// When this version was written, ms since the epoch.
    pub updated_ms: i64,
}

impl Record {
    /// `Type/id`.
    pub fn reference(&self) -> String {
        format!("{}/{}", self.resource_type, self.id)
    }
}

/// One way a resource falls short of a profile: what kind of finding (a
/// FHIR IssueType code: `required`, `code-invalid`, `invariant`…), where
/// (a FHIRPath, when the check can say) and what.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub code: &'static str,
    pub at: Option<String>,
    pub text: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.at {
            Some(at) => write!(f, "{at}: {}", self.text),
            None => f.write_str(&self.text),
        }
    }
}

/// Why the workflow could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum WorkflowError {
    /// The case's state does not allow it (a guard of the state machine).
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The request cannot be used as it is (says what to change).
    #[error("{0}")]
    Invalid(String),
    /// The request would break what the workflow keeps (e.g. deleting the
    /// referral a case is about).
    #[error("{0}")]
    Conflict(String),
    /// What the request names does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The store failed; nothing was changed.
    #[error("storage: {0}")]
    Store(String),
    /// A resource the workflow needs in a given shape does not meet the
    /// profile that says so.
    #[error("{what} does not meet the profile {profile}")]
    Unconformant {
        what: String,
        profile: &'static str,
        findings: Vec<Finding>,
    },
    /// The workflow built a resource the validator refuses: a defect of
    /// ours, never of the caller's input.
    #[error("the workflow built an invalid {resource_type}: {findings}")]
    Defect {
        resource_type: String,
        findings: String,
    },
}

/// Resources inside one open store transaction.
#[async_trait::async_trait]
pub trait Records: Send {
    /// The current version of `Type/id`, unless deleted or absent.
    async fn read(&mut self, reference: &str) -> Result<Option<Record>, WorkflowError>;
    /// Current resources matching FHIR search parameters
    /// (`focus=ServiceRequest/1&status=requested`), of every partner, in
    /// order of creation.
    async fn search(
        &mut self,
        resource_type: &str,
        query: &str,
    ) -> Result<Vec<Record>, WorkflowError>;
    /// Store a new resource (a new id is assigned).
    async fn create(
        &mut self,
        resource_type: &str,
        partner: Option<PartnerId>,
        body: Value,
    ) -> Result<Record, WorkflowError>;
    /// Store `record.body` as the next version of `record`, owned by
    /// `record.partner`.
    async fn update(&mut self, record: &Record) -> Result<Record, WorkflowError>;
    /// Store a resource under an id the workflow chose (the service's own
    /// Organization and Endpoint), creating or replacing it.
    async fn put(
        &mut self,
        resource_type: &str,
        id: &str,
        body: Value,
    ) -> Result<Record, WorkflowError>;
    /// Delete `Type/id` (a deletion version; absent is fine).
    async fn delete(&mut self, reference: &str) -> Result<(), WorkflowError>;
    /// Erase the content of `Type/id`'s versions below `below_version`;
    /// returns the blob-store objects they held.
    async fn purge_history(
        &mut self,
        reference: &str,
        below_version: i64,
    ) -> Result<Vec<crate::store::BlobLocation>, WorkflowError>;
    /// Remove a partner's study from the DICOM index, in this transaction
    /// (retention). Returns where its objects are, to discard after the
    /// commit.
    async fn discard_study(
        &mut self,
        partner: &PartnerId,
        study_uid: &Uid,
    ) -> Result<Vec<crate::store::BlobLocation>, WorkflowError>;
    /// Queue the destruction of these records (retention), committed with
    /// the transaction that stopped pointing at them.
    async fn queue_discards(
        &mut self,
        kind: crate::store::BlobKind,
        locations: &[crate::store::BlobLocation],
    ) -> Result<(), WorkflowError>;
    /// Take the index's notes of instances stored by transfers whose audit
    /// record is not stored yet (of `transfer`, or of all), for the
    /// AuditEvent this transaction stores.
    async fn take_unaudited_transfers(
        &mut self,
        transfer: Option<TransferId>,
    ) -> Result<Vec<crate::store::UnauditedTransfer>, WorkflowError>;
    /// Why `resource` does not meet the profile `profile` (empty: it does).
    async fn profile_findings(&mut self, resource: &Value, profile: &str) -> Vec<Finding>;
}

/// Where [`Records`] transactions come from (for work that no client
/// request carries: study arrivals, timers, `$operations`).
#[async_trait::async_trait]
pub trait RecordStore: Send + Sync + 'static {
    async fn begin(&self) -> Result<Box<dyn RecordsTx>, WorkflowError>;
}

/// A [`Records`] transaction that can be committed (dropping it rolls back).
#[async_trait::async_trait]
pub trait RecordsTx: Records {
    fn records(&mut self) -> &mut dyn Records;
    /// Commit; what was written without an AuditEvent of its own is
    /// recorded as the workflow's own work.
    async fn commit(self: Box<Self>) -> Result<(), WorkflowError>;
    /// Commit with `event`, the AuditEvent of who asked for the work (an
    /// operation, a purge), stored naming every version the transaction
    /// wrote.
    async fn commit_audited(self: Box<Self>, event: Value) -> Result<(), WorkflowError>;
}

/// The elements of the array `key` of `element` (none when it is absent
/// or not an array): the walk every repeating FHIR element needs.
pub fn items<'v>(element: Option<&'v Value>, key: &str) -> impl Iterator<Item = &'v Value> {
    element
        .and_then(|e| e.get(key))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

/// The extensions of `element` with this `url`.
pub fn extensions<'v>(element: Option<&'v Value>, url: &'v str) -> impl Iterator<Item = &'v Value> {
    items(element, "extension").filter(move |e| e.get("url").and_then(Value::as_str) == Some(url))
}

/// Reference string of a `Reference` element (`{"reference": "Type/id"}`).
pub fn reference_of(element: Option<&Value>) -> Option<&str> {
    element?.get("reference")?.as_str()
}

/// Whether a CodeableConcept (or a list of them) holds `system|code`.
pub fn has_coding(concept: Option<&Value>, system: &str, code: &str) -> bool {
    codes(concept, system).any(|c| c == code)
}

/// The codes of `system` in a CodeableConcept or a list of them.
pub fn codes<'v>(concept: Option<&'v Value>, system: &'v str) -> impl Iterator<Item = &'v str> {
    let concepts: Vec<&Value> = match concept {
        Some(Value::Array(list)) => list.iter().collect(),
        Some(one) => vec![one],
        None => vec![],
    };
    concepts
        .into_iter()
        .filter_map(|c| c.get("coding").and_then(Value::as_array))
        .flatten()
        .filter(move |c| c.get("system").and_then(Value::as_str) == Some(system))
        .filter_map(|c| c.get("code").and_then(Value::as_str))
}
