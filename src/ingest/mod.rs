//! The one streaming ingest pipeline, shared by C-STORE, STOW-RS and
//! `konsil import`.
//!
//! bytes → temporary object (hashed as they pass) → header parsed up to,
//! not into, Pixel Data and checked → fsync + atomic publish → indexed in one
//! transaction → only then does the caller acknowledge.
//!
//! Two stages joined by a bounded channel: the protocol edge pushes chunks
//! from its async task; a blocking thread hashes and writes them. Memory per
//! instance is the channel depth times the chunk size (one PDU or one read
//! buffer), never the instance size.

pub mod header;
pub mod structure;

use std::io::Write;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use dicom_object::meta::FileMetaTableBuilder;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::ids::{AeTitle, PartnerId, Uid};
use crate::metrics::{label, Metrics};
use crate::store::{
    BlobError, BlobKey, BlobStore, BlobWrite, IndexOutcome, InstanceRecord, MetaError,
    MetadataStore, Source,
};

/// Chunks in flight between the edge and the writer thread.
const CHANNEL_DEPTH: usize = 4;

/// Our Implementation Class UID (under the pydicom-style UUID-derived root
/// 2.25, fixed for Konsil) and version, written into stored file meta.
pub const IMPLEMENTATION_CLASS_UID: &str = "2.25.186902510573612203944478410911735393153";
pub const IMPLEMENTATION_VERSION_NAME: &str = concat!("KONSIL_", env!("CARGO_PKG_VERSION"));

/// Why an instance was not stored. Each edge maps these to its own error
/// form exactly once (a DIMSE status, a STOW FailureReason, an import line).
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The bytes are not a DICOM data set we can parse.
    #[error("{0}")]
    Malformed(String),
    /// SOP Class / Instance UID of the data set differ from the request.
    #[error("{0}")]
    Mismatch(String),
    /// A required identifying attribute is absent or empty.
    #[error("{0}")]
    MissingAttribute(String),
    /// A UID value is not a valid UID.
    #[error("{0}")]
    InvalidUid(String),
    /// The sender stopped before the end of the instance.
    #[error("transfer aborted before the end of the instance")]
    Aborted,
    /// The blob store failed (disk full, I/O error).
    #[error("storage failure: {0}")]
    Blob(#[from] BlobError),
    /// The index failed.
    #[error("index failure: {0}")]
    Index(#[from] MetaError),
    /// The writer thread died (a bug, not input).
    #[error("internal error in the ingest writer")]
    Internal,
}

/// Who sent the instance and how.
#[derive(Debug, Clone)]
pub struct Origin {
    pub partner: PartnerId,
    pub source: Source,
    pub calling_ae: Option<AeTitle>,
}

/// What the sender said the instance is, before its bytes arrive (the
/// C-STORE command, or a Part 10 file meta header).
#[derive(Debug, Clone)]
pub struct Declared {
    pub sop_class: Uid,
    pub sop_instance: Uid,
    pub transfer_syntax: Uid,
}

/// The result of a successful ingest.
#[derive(Debug, Clone)]
pub struct Receipt {
    pub outcome: IndexOutcome,
    pub study_uid: Uid,
    pub series_uid: Uid,
    pub sop_instance: Uid,
    pub size: u64,
}

/// The pipeline's shared resources.
#[derive(Clone)]
pub struct Ingest {
    blobs: Arc<dyn BlobStore>,
    index: Arc<dyn MetadataStore>,
    metrics: Arc<Metrics>,
}

impl Ingest {
    pub fn new(
        blobs: Arc<dyn BlobStore>,
        index: Arc<dyn MetadataStore>,
        metrics: Arc<Metrics>,
    ) -> Ingest {
        Ingest {
            blobs,
            index,
            metrics,
        }
    }

    /// Start receiving one instance. Dropping the returned upload before
    /// [`InstanceUpload::finish`] discards everything written.
    pub fn begin(&self, origin: Origin, declared: Declared) -> InstanceUpload {
        let (tx, rx) = mpsc::channel::<Chunk>(CHANNEL_DEPTH);
        let blobs = Arc::clone(&self.blobs);
        let worker_declared = declared.clone();
        let worker =
            tokio::task::spawn_blocking(move || write_instance(&*blobs, &worker_declared, rx));
        InstanceUpload {
            ingest: self.clone(),
            origin,
            declared,
            tx,
            worker,
        }
    }

    /// Record a failure in the metrics (the edge chose the status).
    pub fn count_failure(&self, source: Source, status: u16) {
        self.metrics
            .failures
            .get_or_create(&vec![
                label("source", source.as_str()),
                label("status", format!("0x{status:04X}")),
            ])
            .inc();
    }
}

enum Chunk {
    Data(Vec<u8>),
    End,
}

/// One instance being received.
pub struct InstanceUpload {
    ingest: Ingest,
    origin: Origin,
    declared: Declared,
    tx: mpsc::Sender<Chunk>,
    worker: JoinHandle<Result<Written, IngestError>>,
}

impl InstanceUpload {
    /// Pass the next chunk of data set bytes. Waits while the writer is
    /// behind (back-pressure reaches the socket).
    pub async fn write(&mut self, chunk: Vec<u8>) -> Result<(), IngestError> {
        if chunk.is_empty() {
            return Ok(());
        }
        if self.tx.send(Chunk::Data(chunk)).await.is_err() {
            // The writer stopped early: it has the reason. Keep accepting
            // (and dropping) the rest so the caller can drain its input;
            // `finish` reports the error.
        }
        Ok(())
    }

    /// All bytes passed: check, make durable, publish and index.
    pub async fn finish(self) -> Result<Receipt, IngestError> {
        let InstanceUpload {
            ingest,
            origin,
            declared,
            tx,
            worker,
        } = self;
        let _ = tx.send(Chunk::End).await;
        drop(tx);
        let finishing = std::time::Instant::now();
        let written = worker.await.map_err(|_| IngestError::Internal)??;
        let durable = finishing.elapsed();
        let record = InstanceRecord {
            partner: origin.partner.clone(),
            study_uid: written.header.study_uid.clone(),
            series_uid: written.header.series_uid.clone(),
            sop_instance_uid: declared.sop_instance.clone(),
            sop_class_uid: declared.sop_class.clone(),
            transfer_syntax: declared.transfer_syntax.clone(),
            attributes: written.header.attributes,
            received_at_ms: now_ms(),
            size: written.size,
            dataset_sha256: written.sha256,
            blob_key: written.key,
            source: origin.source,
            calling_ae: origin.calling_ae.as_ref().map(|ae| ae.to_string()),
        };
        let outcome = ingest.index.record_instance(&record).await?;
        tracing::debug!(
            size = written.size,
            check_and_publish_us = durable.as_micros() as u64,
            index_us = (finishing.elapsed() - durable).as_micros() as u64,
            "instance ingested"
        );
        let source = origin.source.as_str();
        let outcome_label = match outcome {
            IndexOutcome::Stored => "stored",
            IndexOutcome::Duplicate => "duplicate",
            IndexOutcome::Conflict => "conflict",
        };
        ingest
            .metrics
            .instances
            .get_or_create(&vec![
                label("source", source),
                label("outcome", outcome_label),
            ])
            .inc();
        ingest
            .metrics
            .bytes
            .get_or_create(&vec![label("source", source)])
            .inc_by(written.size);
        if outcome == IndexOutcome::Conflict {
            tracing::warn!(
                partner = %origin.partner,
                sop_instance_uid = %declared.sop_instance,
                "a different object already exists under this SOP Instance UID; both kept and flagged as conflict"
            );
        }
        Ok(Receipt {
            outcome,
            study_uid: record.study_uid,
            series_uid: record.series_uid,
            sop_instance: declared.sop_instance,
            size: written.size,
        })
    }
}

struct Written {
    header: header::Header,
    sha256: [u8; 32],
    size: u64,
    key: BlobKey,
}

/// The blocking stage: write the file meta we build from `declared`, then
/// every chunk, hashing the data set bytes; then check the header and commit.
fn write_instance(
    blobs: &dyn BlobStore,
    declared: &Declared,
    mut rx: mpsc::Receiver<Chunk>,
) -> Result<Written, IngestError> {
    let mut blob = blobs.begin()?;
    let data_start = write_file_meta(&mut *blob, declared)?;
    let mut hasher = Sha256::new();
    let mut size: u64 = 0;
    loop {
        match rx.blocking_recv() {
            Some(Chunk::Data(bytes)) => {
                hasher.update(&bytes);
                size += bytes.len() as u64;
                blob.write_all(&bytes).map_err(BlobError::Write)?;
            }
            Some(Chunk::End) => break,
            // The edge dropped the upload: the transfer was aborted.
            None => return Err(IngestError::Aborted),
        }
    }
    blob.flush().map_err(BlobError::Write)?;
    if size == 0 {
        return Err(IngestError::Malformed("empty data set".into()));
    }
    let header = {
        let reader = blob.read_back().map_err(BlobError::Write)?;
        header::read_and_check(reader, declared)?
    };
    {
        let reader = blob.read_back().map_err(BlobError::Write)?;
        structure::check(reader, data_start, declared.transfer_syntax.as_str())
            .map_err(IngestError::Malformed)?;
    }
    let sha256: [u8; 32] = hasher.finalize().into();
    let key = BlobKey::for_instance(&sha256, &declared.transfer_syntax);
    blob.commit(&key)?;
    Ok(Written {
        header,
        sha256,
        size,
        key,
    })
}

/// Preamble, `DICM` and a file meta group that is a function of the declared
/// identity only, so identical data sets give identical files.
/// Returns the offset where the data set starts.
fn write_file_meta(out: &mut dyn BlobWrite, declared: &Declared) -> Result<u64, IngestError> {
    let meta = FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(declared.sop_class.as_str())
        .media_storage_sop_instance_uid(declared.sop_instance.as_str())
        .transfer_syntax(declared.transfer_syntax.as_str())
        .implementation_class_uid(IMPLEMENTATION_CLASS_UID)
        .implementation_version_name(IMPLEMENTATION_VERSION_NAME)
        .build()
        .map_err(|e| IngestError::Malformed(format!("cannot build file meta: {e}")))?;
    let mut head = Vec::with_capacity(512);
    head.extend_from_slice(&[0u8; 128]);
    head.extend_from_slice(b"DICM");
    meta.write(&mut head)
        .map_err(|e| IngestError::Malformed(format!("cannot encode file meta: {e}")))?;
    out.write_all(&head).map_err(BlobError::Write)?;
    Ok(head.len() as u64)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
