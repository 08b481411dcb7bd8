//! Storage behind two small traits: a metadata index ([`MetadataStore`]) and
//! a blob store ([`BlobStore`]). The embedded defaults are a SQLite file and
//! a local directory; a PostgreSQL and an S3-compatible implementation slot
//! in behind the same traits without touching the edges.

pub mod fs;
pub mod sqlite;

use std::io::{self, Read, Seek, Write};

use crate::ids::{PartnerId, Uid};

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

/// The name of a published blob. Derived from the content hash, never from
/// wire text, so it is always safe as a path or object key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BlobKey(String);

impl BlobKey {
    /// Key for a DICOM instance: the SHA-256 of its data set and its transfer
    /// syntax (the stored file meta header is a function of both).
    pub fn for_instance(dataset_sha256: &[u8; 32], transfer_syntax: &Uid) -> BlobKey {
        let hex = hex::encode(dataset_sha256);
        BlobKey(format!("{}/{}-{}.dcm", &hex[..2], hex, transfer_syntax))
    }

    /// Rebuild a key read back from the index.
    pub fn from_stored(key: String) -> BlobKey {
        BlobKey(key)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Errors of the blob store.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("cannot create temporary object: {0}")]
    CreateTemp(#[source] io::Error),
    #[error("cannot write object: {0}")]
    Write(#[source] io::Error),
    #[error("cannot make object durable: {0}")]
    Sync(#[source] io::Error),
    #[error("cannot publish object {key}: {source}")]
    Publish { key: String, source: io::Error },
    #[error("cannot open object {key}: {source}")]
    Open { key: String, source: io::Error },
    #[error("cannot clean up temporary objects: {0}")]
    Recover(#[source] io::Error),
}

/// Content-addressed storage of whole objects. Called from blocking threads.
pub trait BlobStore: Send + Sync + 'static {
    /// Start a new temporary object; nothing is visible until it is committed.
    fn begin(&self) -> Result<Box<dyn BlobWrite>, BlobError>;
    /// Read a published object.
    fn open(&self, key: &BlobKey) -> Result<Box<dyn Read + Send>, BlobError>;
    /// Remove temporary objects left behind by a crash. Run at start-up.
    fn recover(&self) -> Result<usize, BlobError>;
    /// Whether the store is reachable and writable.
    fn ping(&self) -> Result<(), BlobError>;
}

/// A readable, seekable view of an object.
pub trait ReadSeek: Read + Seek + Send {}
impl<T: Read + Seek + Send> ReadSeek for T {}

/// A temporary object being written. Dropping it without [`commit`](BlobWrite::commit)
/// discards it.
pub trait BlobWrite: Write + Send {
    /// Re-read what has been written so far, from the start.
    fn read_back(&mut self) -> io::Result<Box<dyn ReadSeek + '_>>;
    /// Make the object durable and publish it under `key`, atomically: a
    /// reader sees the whole object or nothing.
    fn commit(self: Box<Self>, key: &BlobKey) -> Result<(), BlobError>;
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
    pub blob_key: BlobKey,
    pub source: Source,
    pub calling_ae: Option<String>,
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

/// An indexed instance, as read back.
#[derive(Debug, Clone)]
pub struct StoredInstance {
    pub partner: PartnerId,
    pub study_uid: String,
    pub series_uid: String,
    pub sop_instance_uid: String,
    pub sop_class_uid: String,
    pub transfer_syntax: String,
    pub size: u64,
    pub dataset_sha256: String,
    pub blob_key: BlobKey,
    pub source: String,
    pub calling_ae: Option<String>,
    pub conflict: bool,
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
}

/// The metadata index.
#[async_trait::async_trait]
pub trait MetadataStore: Send + Sync + 'static {
    /// Record one instance and its patient/study/series levels in one transaction.
    async fn record_instance(&self, record: &InstanceRecord) -> Result<IndexOutcome, MetaError>;
    /// All indexed versions of an instance of one partner (more than one only on conflict).
    async fn instances_by_sop(
        &self,
        partner: &PartnerId,
        sop_instance_uid: &str,
    ) -> Result<Vec<StoredInstance>, MetaError>;
    /// Number of indexed instances (all partners).
    async fn instance_count(&self) -> Result<i64, MetaError>;
    /// Whether the database answers.
    async fn ping(&self) -> Result<(), MetaError>;
}
