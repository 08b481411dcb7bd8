//! Storage of FHIR resources: every version of every resource as the JSON
//! text the edge produced (the submitted JSON with server `id` and `meta`),
//! and search index entries for the current versions. The store knows no
//! FHIR rules: the FHIR edge decides versions, extracts index entries and
//! builds queries; the store keeps and finds rows.

use crate::ids::{PartnerId, TransferId, Uid};

use super::{BlobKind, BlobLocation, MetaError, PendingDiscard, UnauditedTransfer};

/// One stored version of a resource.
#[derive(Debug, Clone)]
pub struct StoredResource {
    pub resource_type: String,
    pub id: String,
    pub version: i64,
    /// `meta.lastUpdated`, as written into the body.
    pub last_updated: String,
    pub updated_ms: i64,
    /// The partner that created the resource; `None`: the service's own.
    pub partner: Option<PartnerId>,
    /// `None` for a deletion.
    pub body: Option<String>,
    /// The interaction that made this version (`POST`, `PUT`, `PATCH`,
    /// `DELETE`).
    pub method: String,
    /// A Binary's content, when it is kept in the blob store rather than as
    /// base64 in `body`.
    pub blob: Option<BlobLocation>,
}

/// Search index entries of one resource version, by search parameter
/// (qualified by resource type, e.g. `Task.status`).
#[derive(Debug, Clone, Default)]
pub struct IndexEntries {
    /// (param, system ("" if none), code).
    pub tokens: Vec<(String, String, String)>,
    /// (param, target): `Type/id` for local references, else the URL.
    pub references: Vec<(String, String)>,
    /// (param, low ms, high ms), both inclusive.
    pub dates: Vec<(String, i64, i64)>,
    /// (param, lower-cased text for prefix and contains, text as written
    /// for `:exact`).
    pub strings: Vec<(String, String, String)>,
}

/// A new version to write.
#[derive(Debug, Clone)]
pub struct ResourceWrite {
    pub resource: StoredResource,
    /// Index entries of the new version (empty for a deletion).
    pub index: IndexEntries,
    /// The blob store's recovery point once `resource.blob` is recorded.
    pub blob_resume_at: Option<u64>,
}

/// Date comparisons of FHIR search (`ge2024-01-01`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatePrefix {
    Eq,
    Ne,
    Gt,
    Lt,
    Ge,
    Le,
    Sa,
    Eb,
    Ap,
}

/// How a string parameter matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StringMatch {
    Prefix,
    Exact,
    Contains,
}

/// One AND-ed condition of a search; the values inside one are OR-ed.
#[derive(Debug, Clone)]
pub enum Clause {
    Ids(Vec<String>),
    LastUpdated(Vec<(DatePrefix, i64, i64)>),
    /// (system: None = any, Some("") = none; code: None = any code of the
    /// system).
    Token {
        param: String,
        values: Vec<(Option<String>, Option<String>)>,
    },
    Reference {
        param: String,
        targets: Vec<String>,
    },
    Date {
        param: String,
        values: Vec<(DatePrefix, i64, i64)>,
    },
    String {
        param: String,
        mode: StringMatch,
        values: Vec<String>,
    },
    /// A parameter that is known but has no value in this resource.
    Missing {
        param: String,
        missing: bool,
    },
}

/// Result order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sort {
    /// Order of creation (stable).
    Created,
    LastUpdated {
        descending: bool,
    },
    /// By a date parameter's earliest value; resources without one last.
    Date {
        param: String,
        descending: bool,
    },
}

/// Where the previous page ended: the sort key and the row of its last
/// result. Keyset paging: inserts never shift later pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub key: i64,
    pub row: i64,
}

/// A search over one resource type.
#[derive(Debug, Clone)]
pub struct ResourceQuery {
    pub resource_type: String,
    /// Only resources of these partners (and the service's own when
    /// `include_own`); `None`: every partner.
    pub partners: Option<Vec<PartnerId>>,
    pub clauses: Vec<Clause>,
    pub sort: Sort,
    pub after: Option<Cursor>,
    /// Page size; 0 asks for the total only.
    pub count: usize,
    pub want_total: bool,
}

/// One page of results.
#[derive(Debug, Clone, Default)]
pub struct ResourcePage {
    pub resources: Vec<StoredResource>,
    pub total: Option<u64>,
    /// Set when more results follow.
    pub next: Option<Cursor>,
}

/// History query (`_history` at instance, type or system level).
#[derive(Debug, Clone)]
pub struct HistoryQuery {
    pub resource_type: Option<String>,
    pub id: Option<String>,
    pub partners: Option<Vec<PartnerId>>,
    pub since_ms: Option<i64>,
    /// Newest first; continue below this history row.
    pub before_row: Option<i64>,
    pub count: usize,
}

/// One page of history, newest first.
#[derive(Debug, Clone, Default)]
pub struct HistoryPage {
    pub versions: Vec<StoredResource>,
    /// The history row to continue below, when more follow.
    pub next: Option<i64>,
}

/// A pending Subscription notification.
#[derive(Debug, Clone)]
pub struct Notification {
    pub id: i64,
    pub subscription_id: String,
    /// `Type/id` of the resource it announces.
    pub focus: String,
    pub created_ms: i64,
    pub attempts: u32,
}

/// What became of a delivery attempt.
#[derive(Debug, Clone)]
pub enum Attempt {
    Delivered,
    /// Failed; try again at `next_ms`.
    Retry {
        next_ms: i64,
        error: String,
    },
    /// Failed for the last time (or the subscription is gone).
    Abandoned {
        error: String,
    },
}

/// FHIR resource storage.
#[async_trait::async_trait]
pub trait ResourceStore: Send + Sync + 'static {
    /// Queued discards (oldest first), at most `limit`.
    async fn pending_discards(&self, limit: u32) -> Result<Vec<PendingDiscard>, MetaError>;
    /// A queued discard is done.
    async fn forget_discard(&self, id: i64) -> Result<(), MetaError>;
    /// The current version (possibly a deletion).
    async fn current(
        &self,
        resource_type: &str,
        id: &str,
    ) -> Result<Option<StoredResource>, MetaError>;
    /// One version.
    async fn version(
        &self,
        resource_type: &str,
        id: &str,
        version: i64,
    ) -> Result<Option<StoredResource>, MetaError>;
    /// The current versions of these resources that exist (not deleted).
    async fn current_many(
        &self,
        keys: &[(String, String)],
    ) -> Result<Vec<StoredResource>, MetaError>;
    async fn search(&self, query: &ResourceQuery) -> Result<ResourcePage, MetaError>;
    async fn history(&self, query: &HistoryQuery) -> Result<HistoryPage, MetaError>;
    /// Start an atomic unit of reads and writes (one interaction or a whole
    /// transaction Bundle). Writers are serialised: what a transaction read
    /// stays true until it commits.
    async fn begin(&self) -> Result<Box<dyn ResourceTx>, MetaError>;
    /// Recovery points of the FHIR blob store's objects, as recorded.
    async fn binary_resume_points(
        &self,
    ) -> Result<std::collections::HashMap<String, u64>, MetaError>;
    /// Pending notifications due at `now_ms`, oldest first.
    async fn due_notifications(
        &self,
        now_ms: i64,
        limit: u32,
    ) -> Result<Vec<Notification>, MetaError>;
    /// Record the outcome of a delivery attempt.
    async fn record_attempt(&self, id: i64, attempt: &Attempt) -> Result<(), MetaError>;
}

/// An open write transaction. Dropping it without commit rolls back.
#[async_trait::async_trait]
pub trait ResourceTx: Send {
    async fn current(
        &mut self,
        resource_type: &str,
        id: &str,
    ) -> Result<Option<StoredResource>, MetaError>;
    /// Search inside the transaction (conditional create, update, delete
    /// and references), seeing its own writes.
    async fn search(&mut self, query: &ResourceQuery) -> Result<ResourcePage, MetaError>;
    async fn write(&mut self, write: &ResourceWrite) -> Result<(), MetaError>;
    /// Erase the content of every version of a resource below `version`
    /// (retention: the history keeps that versions existed, not what they
    /// held; reading one answers as deleted). Returns the blob-store
    /// objects those versions held, to discard after the commit.
    async fn purge_history(
        &mut self,
        resource_type: &str,
        id: &str,
        below_version: i64,
    ) -> Result<Vec<BlobLocation>, MetaError>;
    /// Remove a partner's study from the DICOM index (retention), in this
    /// transaction: the index and the resources share one database, so a
    /// case's records and its images go together or not at all. Returns
    /// where the study's objects are, for the blob store to discard after
    /// the commit.
    async fn discard_study(
        &mut self,
        partner: &PartnerId,
        study_uid: &Uid,
    ) -> Result<Vec<BlobLocation>, MetaError>;
    /// Queue the destruction of records no longer pointed at (retention),
    /// committed with the change that let go of them.
    async fn queue_discards(
        &mut self,
        kind: BlobKind,
        locations: &[BlobLocation],
    ) -> Result<(), MetaError>;
    /// Take the index's notes of instances stored by transfers whose audit
    /// record is not stored yet (of `transfer`, or of all but those a
    /// living process runs: see `MetadataStore::transfer_started`): they
    /// are gone once this transaction, which stores that record, commits.
    async fn take_unaudited_transfers(
        &mut self,
        transfer: Option<TransferId>,
    ) -> Result<Vec<UnauditedTransfer>, MetaError>;
    /// Queue a notification to `subscription_id` about `focus`, committed
    /// with the change it announces.
    async fn enqueue_notification(
        &mut self,
        subscription_id: &str,
        focus: &str,
        now_ms: i64,
    ) -> Result<(), MetaError>;
    async fn commit(self: Box<Self>) -> Result<(), MetaError>;
}
