//! Storage behind two small traits: a metadata index ([`MetadataStore`]) and
//! a blob store ([`BlobStore`]). The embedded defaults are a SQLite file and
//! append-only segment files in a local directory; a PostgreSQL and an S3-compatible implementation slot
//! in behind the same traits without touching the edges.

pub mod fhir;
pub mod query;
mod runway;
pub mod segments;
pub mod sqlite;
mod sqlite_fhir;

use std::collections::HashMap;
use std::io::{self, Read, Seek, Write};

use crate::ids::{PartnerId, TransferId, Uid};

/// Where an instance came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Dimse,
    Stow,
    Import,
}

impl Source {
    /// The name stored in the index.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Dimse => "dimse",
            Source::Stow => "stow",
            Source::Import => "import",
        }
    }
}

/// Where a stored object lives: a byte range of a named object (a segment
/// file of the embedded store, or a whole object in an object store).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobLocation {
    pub object: String,
    pub offset: u64,
    pub length: u64,
}

/// Which blob store an object is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobKind {
    /// DICOM instances (`segments/`).
    Dicom,
    /// FHIR Binary content (`fhir/segments/`).
    Fhir,
}

impl BlobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BlobKind::Dicom => "dicom",
            BlobKind::Fhir => "fhir",
        }
    }
}

/// A record whose bytes are still to be destroyed (retention), queued in
/// the transaction that stopped pointing at it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingDiscard {
    pub id: i64,
    pub kind: BlobKind,
    pub location: BlobLocation,
}

/// Errors of the blob store.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("cannot create a storage object: {0}")]
    Create(#[source] io::Error),
    #[error("cannot write object: {0}")]
    Write(#[source] io::Error),
    #[error("cannot make object durable: {0}")]
    Sync(#[source] io::Error),
    #[error("cannot withdraw object: {0}")]
    Retract(#[source] io::Error),
    #[error("cannot open object {object}: {source}")]
    Open { object: String, source: io::Error },
    #[error("cannot recover the blob store: {0}")]
    Recover(#[source] io::Error),
}

/// A readable, seekable view of an object.
pub trait ReadSeek: Read + Seek + Send {
    /// Append up to `n` more bytes of the object to `buf` (fewer only at
    /// its end); how many. For sending an object on: a store whose reader
    /// can fill `buf`'s spare capacity as it is (a file can) overrides
    /// this, so that no buffer is zeroed first only to be overwritten (that
    /// zeroing was the largest cost of a WADO-RS retrieve).
    fn read_append(&mut self, buf: &mut Vec<u8>, n: usize) -> io::Result<usize> {
        self.take(n as u64).read_to_end(buf)
    }
}

/// Durable object storage. Called from blocking threads.
pub trait BlobStore: Send + Sync + 'static {
    /// Start a new object; nothing is durable or readable by others until
    /// it is committed.
    fn begin(&self) -> Result<Box<dyn BlobWrite>, BlobError>;
    /// Read a committed object.
    fn open(&self, location: &BlobLocation) -> Result<Box<dyn ReadSeek>, BlobError>;
    /// After a crash: drop unfinished objects, and return the committed ones
    /// past each object's recovery point (`resume_at`, as recorded by the
    /// index), which the index may not hold yet. Run at start-up, before any
    /// writer.
    fn recover(&self, resume_at: &HashMap<String, u64>) -> Result<Recovery, BlobError>;
    /// Whether the store is reachable.
    fn ping(&self) -> Result<(), BlobError>;
    /// Destroy a committed object's content for good (retention), once the
    /// index no longer points at it. Recovery never brings it back.
    fn discard(&self, location: &BlobLocation) -> Result<(), BlobError>;
    /// At a clean shutdown, after the last writer: make everything durable
    /// and note it, so the next start knows no object can be torn
    /// ([`Recovery::after_crash`] false).
    fn close(&self) -> Result<(), BlobError>;
}

/// An object being written. Dropping it without [`commit`](BlobWrite::commit)
/// discards it.
pub trait BlobWrite: Write + Send {
    /// Complete the object without waiting for it to be durable. `label`
    /// is kept with it and handed back by [`BlobStore::recover`], so the
    /// index can be rebuilt from the store.
    fn seal(self: Box<Self>, label: &[u8]) -> Result<Box<dyn SealedBlob>, BlobError>;
    /// Complete the object and make it durable.
    fn commit(self: Box<Self>, label: &[u8]) -> Result<Box<dyn CommittedBlob>, BlobError> {
        self.seal(label)?.sync()
    }
}

/// A complete object that may not be durable yet. Its location is final,
/// so the index can record it while [`sync`](SealedBlob::sync) runs; what
/// the caller acknowledges must wait for both. Dropping it without a sync
/// keeps it (recovery judges it after a crash).
pub trait SealedBlob: Send {
    fn location(&self) -> &BlobLocation;
    /// The recovery point to record with this object in the index.
    fn resume_at(&self) -> u64;
    /// Wait until the object is durable. On failure the object is in an
    /// unknown state: it must not be acknowledged.
    fn sync(self: Box<Self>) -> Result<Box<dyn CommittedBlob>, BlobError>;
}

/// A durable object, before the index has recorded it.
pub trait CommittedBlob: Send {
    fn location(&self) -> &BlobLocation;
    /// The recovery point to record with this object in the index.
    fn resume_at(&self) -> u64;
    /// Withdraw the object (the index already had an identical one, or
    /// indexing failed). Dropping the handle keeps it.
    fn retract(self: Box<Self>) -> Result<(), BlobError>;
}

/// What [`BlobStore::recover`] found.
#[derive(Debug, Default)]
pub struct Recovery {
    /// The store was not closed cleanly since it was last opened for
    /// writing: the last object of each storage object may be torn (the
    /// index records objects while their sync runs).
    pub after_crash: bool,
    /// Bytes of unfinished objects removed.
    pub discarded_bytes: u64,
    /// Committed objects the index may not hold.
    pub unindexed: Vec<RecoveredBlob>,
}

/// A committed object found by recovery.
#[derive(Debug, Clone)]
pub struct RecoveredBlob {
    pub location: BlobLocation,
    pub resume_at: u64,
    pub label: Vec<u8>,
}

/// Attributes of one instance for the index (patient / study / series /
/// instance levels, denormalised: the index stores each level once).
#[derive(Debug, Clone, Default)]
pub struct InstanceAttributes {
    pub patient_name: Option<String>,
    pub patient_id: Option<String>,
    pub issuer_of_patient_id: Option<String>,
    pub patient_birth_date: Option<String>,
    pub patient_sex: Option<String>,
    pub study_date: Option<String>,
    pub study_time: Option<String>,
    pub accession_number: Option<String>,
    pub referring_physician_name: Option<String>,
    pub study_id: Option<String>,
    pub study_description: Option<String>,
    pub modality: Option<String>,
    pub series_number: Option<i64>,
    pub series_description: Option<String>,
    pub series_date: Option<String>,
    pub series_time: Option<String>,
    pub body_part_examined: Option<String>,
    pub instance_number: Option<i64>,
    pub rows: Option<i64>,
    pub columns: Option<i64>,
    pub number_of_frames: Option<i64>,
    pub specific_character_set: Option<String>,
}

/// Everything the index records about one received instance.
#[derive(Debug, Clone)]
pub struct InstanceRecord {
    pub partner: PartnerId,
    pub study_uid: Uid,
    pub series_uid: Uid,
    pub sop_instance_uid: Uid,
    pub sop_class_uid: Uid,
    pub transfer_syntax: Uid,
    pub attributes: InstanceAttributes,
    pub received_at_ms: i64,
    pub size: u64,
    pub dataset_sha256: [u8; 32],
    pub blob: BlobLocation,
    /// Recovery point of `blob.object` once this record is indexed.
    pub resume_at: u64,
    pub source: Source,
    pub calling_ae: Option<String>,
    pub transfer: Option<crate::ids::TransferId>,
}

/// Instances of one study that one transfer stored and whose audit record
/// is not stored yet, as the index noted them when indexing them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnauditedTransfer {
    /// None: not known (the index rows were rebuilt from the blob store).
    pub transfer: Option<crate::ids::TransferId>,
    pub partner: String,
    pub study_uid: String,
    pub source: String,
    pub calling_ae: Option<String>,
    pub instances: u64,
    pub first_ms: i64,
    pub last_ms: i64,
}

/// An indexed instance's object and what its data set (the object's last
/// `dataset_size` bytes) must hash to.
#[derive(Debug, Clone)]
pub struct IndexedBlob {
    pub location: BlobLocation,
    pub dataset_size: u64,
    pub dataset_sha256: [u8; 32],
}

/// What the index did with a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexOutcome {
    /// First time this instance was seen for this partner.
    Stored,
    /// The same bytes were already indexed; nothing changed.
    Duplicate,
    /// A different object already exists under this SOP Instance UID; both
    /// are kept and both are flagged.
    Conflict,
}

/// Errors of the metadata store.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("cannot open the index database: {0}")]
    Open(#[source] sqlx::Error),
    #[error("cannot migrate the index database: {0}")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    #[error("index query failed: {0}")]
    Query(#[from] sqlx::Error),
    #[error("index holds an invalid value: {0}")]
    Corrupt(String),
}

/// Client assertions already used (SMART Backend Services: a `jti` is
/// accepted once per client).
#[async_trait::async_trait]
pub trait AssertionLog: Send + Sync + 'static {
    /// Record `jti` of `client_id` until `expires_ms`; false if it was
    /// already recorded (a replay). Forgets assertions expired by `now_ms`.
    async fn first_use(
        &self,
        client_id: &str,
        jti: &str,
        expires_ms: i64,
        now_ms: i64,
    ) -> Result<bool, MetaError>;
}

/// The metadata index.
#[async_trait::async_trait]
pub trait MetadataStore: Send + Sync + 'static {
    /// Record one instance (whose blob is complete, and durable by the time
    /// anyone acknowledges it) and its patient/study/series levels,
    /// atomically.
    async fn record_instance(&self, record: &InstanceRecord) -> Result<IndexOutcome, MetaError>;
    /// Remove the row of an instance whose object could not be made
    /// durable after it was recorded (it was never acknowledged).
    async fn withdraw_instance(&self, blob: &BlobLocation) -> Result<(), MetaError>;
    /// For each blob-store object, the instance recorded last in it (the
    /// one a crash can have torn).
    async fn last_instances(&self) -> Result<Vec<IndexedBlob>, MetaError>;
    /// Recovery points of the blob store's objects, as last recorded.
    async fn blob_resume_points(&self) -> Result<HashMap<String, u64>, MetaError>;
    /// Whether the database answers.
    async fn ping(&self) -> Result<(), MetaError>;
    /// Search the index (QIDO-RS).
    async fn search(&self, search: &query::Search) -> Result<Vec<query::SearchRow>, MetaError>;
    /// The stored instances of a study, series or instance, in series and
    /// instance-number order (one version per SOP Instance UID).
    async fn locate(&self, locate: &query::Locate)
        -> Result<Vec<query::StoredInstance>, MetaError>;
    /// Previously computed DICOM JSON metadata of these instances, by id.
    async fn cached_metadata(&self, ids: &[i64]) -> Result<HashMap<i64, String>, MetaError>;
    /// Keep computed metadata for later requests.
    async fn cache_metadata(&self, entries: &[(i64, String)]) -> Result<(), MetaError>;
    /// Studies with instances not yet reconciled by the workflow, with the
    /// arrival counter to clear them by.
    async fn pending_studies(&self, limit: u32) -> Result<Vec<(PartnerId, Uid, i64)>, MetaError>;
    /// The arrival counter of one pending study.
    async fn pending_seq(
        &self,
        partner: &PartnerId,
        study_uid: &Uid,
    ) -> Result<Option<i64>, MetaError>;
    /// This process runs `transfer` next to a server (`konsil import`):
    /// while it lives, a server starting up leaves the transfer's audit
    /// notes to it.
    async fn transfer_started(&self, transfer: TransferId) -> Result<(), MetaError>;
    /// The workflow reconciled the study as of arrival `seq` (a later
    /// arrival keeps it pending).
    async fn clear_pending_study(
        &self,
        partner: &PartnerId,
        study_uid: &Uid,
        seq: i64,
    ) -> Result<(), MetaError>;
}

/// Whether a process with this id exists (Linux: /proc). A store shared
/// with other processes (`konsil import`, `konsil retention`) leaves what
/// a living one owns alone.
pub(crate) fn process_alive(pid: u32) -> bool {
    std::path::Path::new("/proc").join(pid.to_string()).exists()
}
