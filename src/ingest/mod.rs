//! The one streaming ingest pipeline, shared by C-STORE, STOW-RS and
//! `konsil import`.
//!
//! bytes → a new blob-store record (hashed as they pass) → header parsed up
//! to, not into, Pixel Data and checked → structure walked → fsync → indexed
//! in one transaction (the index row is what makes it visible) → only then
//! does the caller acknowledge.
//!
//! Two stages joined by a bounded channel: the protocol edge pushes chunks
//! from its async task; a blocking thread hashes and writes them. Memory per
//! instance is the channel depth times the chunk size (one PDU or one read
//! buffer), never the instance size.

pub mod header;
pub mod meta;
pub mod status;
pub mod structure;

use std::io::{Read, Seek, Write};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use dicom_object::meta::{FileMetaTable, FileMetaTableBuilder};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::ids::{AeTitle, PartnerId, TransferId, Uid};
use crate::metrics::{label, Metrics};
use crate::store::{
    BlobError, BlobLocation, BlobStore, BlobWrite, CommittedBlob, IndexOutcome, InstanceRecord,
    MetaError, MetadataStore, RecoveredBlob, Source,
};
use crate::workflow::runner::Arrivals;

/// Chunks in flight between the edge and the writer thread.
const CHANNEL_DEPTH: usize = 4;
/// Smaller pieces (16 KiB PDUs are common) are gathered up to this size
/// before they cross to the writer thread: each crossing costs a wake-up
/// (measured: 64 KiB costs more CPU than it saves in latency).
/// Pieces of half this size or more cross as they are. Memory per instance
/// is at most (CHANNEL_DEPTH + 1) chunks of this size or of a piece.
const CHUNK_BYTES: usize = 256 * 1024;

/// Our Implementation Class UID (under the pydicom-style UUID-derived root
/// 2.25, fixed for Konsil) and version, written into stored file meta.
pub const IMPLEMENTATION_CLASS_UID: &str = "2.25.186902510573612203944478410911735393153";
pub const IMPLEMENTATION_VERSION_NAME: &str = concat!("KONSIL_", env!("CARGO_PKG_VERSION"));

/// The Storage SOP Classes we accept (PS3.4 Annex B, generated from PS3.6;
/// see conformance/dicom/).
pub fn storage_sop_classes() -> impl Iterator<Item = &'static str> {
    include_str!("../../conformance/dicom/storage-sop-classes.tsv")
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split('\t').next())
}

/// Whether `uid` is one of [`storage_sop_classes`].
pub fn is_storage_sop_class(uid: &str) -> bool {
    static CLASSES: std::sync::LazyLock<std::collections::HashSet<&'static str>> =
        std::sync::LazyLock::new(|| storage_sop_classes().collect());
    CLASSES.contains(uid)
}

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
    /// The instance belongs to another study than the one it was sent to.
    #[error("{0}")]
    StudyMismatch(String),
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
    /// The association, request or import run; none for an object the
    /// index is rebuilt from.
    pub transfer: Option<TransferId>,
}

/// What the sender said the instance is, before its bytes arrive (the
/// C-STORE command, or a Part 10 file meta header).
#[derive(Debug, Clone)]
pub struct Declared {
    pub sop_class: Uid,
    pub sop_instance: Uid,
    pub transfer_syntax: Uid,
    /// The study the instance must belong to (STOW-RS to `/studies/{study}`).
    pub study: Option<Uid>,
}

impl Declared {
    /// The identity a Part 10 file meta header declares (a file to import,
    /// or a stored object being re-indexed).
    pub fn from_file_meta(meta: &FileMetaTable) -> Result<Declared, IngestError> {
        let uid = |name: &str, raw: &str| {
            Uid::parse(raw).map_err(|e| IngestError::InvalidUid(format!("{name}: {e}")))
        };
        Ok(Declared {
            sop_class: uid(
                "MediaStorageSOPClassUID",
                meta.media_storage_sop_class_uid(),
            )?,
            sop_instance: uid(
                "MediaStorageSOPInstanceUID",
                meta.media_storage_sop_instance_uid(),
            )?,
            transfer_syntax: uid("TransferSyntaxUID", meta.transfer_syntax())?,
            study: None,
        })
    }
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
    /// Tells the workflow which study got an instance.
    arrivals: Arrivals,
}

impl Ingest {
    pub fn new(
        blobs: Arc<dyn BlobStore>,
        index: Arc<dyn MetadataStore>,
        metrics: Arc<Metrics>,
        arrivals: Arrivals,
    ) -> Ingest {
        Ingest {
            blobs,
            index,
            metrics,
            arrivals,
        }
    }

    /// Start receiving one instance. Dropping the returned upload before
    /// [`InstanceUpload::finish`] discards everything written.
    pub fn begin(&self, origin: Origin, declared: Declared) -> InstanceUpload {
        let (tx, rx) = mpsc::channel::<Chunk>(CHANNEL_DEPTH);
        let blobs = Arc::clone(&self.blobs);
        let worker_declared = declared.clone();
        let worker_origin = origin.clone();
        let worker = tokio::task::spawn_blocking(move || {
            write_instance(&*blobs, &worker_origin, &worker_declared, rx)
        });
        InstanceUpload {
            ingest: self.clone(),
            origin,
            declared,
            tx,
            worker,
            hasher: Sha256::new(),
            gathered: Vec::new(),
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
    Data(Bytes),
    /// All data passed; the SHA-256 of the data set.
    End([u8; 32]),
}

/// One instance being received.
pub struct InstanceUpload {
    ingest: Ingest,
    origin: Origin,
    declared: Declared,
    tx: mpsc::Sender<Chunk>,
    worker: JoinHandle<Result<Written, IngestError>>,
    /// Hashing here, on the receiving task, overlaps the writer thread's
    /// disk writes.
    hasher: Sha256,
    /// Small pieces waiting to make up a chunk.
    gathered: Vec<u8>,
}

impl InstanceUpload {
    /// Pass the next chunk of data set bytes. Waits while the writer is
    /// behind (back-pressure reaches the socket). A writer failure is
    /// reported by [`finish`](Self::finish); until then input is drained.
    pub async fn write(&mut self, chunk: Vec<u8>) {
        if chunk.is_empty() {
            return;
        }
        // Never grow the gathered chunk past its size: what is gathered
        // goes first (a 256 KiB PDU carries a little less than 256 KiB of
        // data; gathering two of them held a CT slice back from the writer
        // until its last PDU, so nothing was written or synced early).
        if !self.gathered.is_empty() && self.gathered.len() + chunk.len() > CHUNK_BYTES {
            let full = std::mem::take(&mut self.gathered);
            self.send(full).await;
        }
        if self.gathered.is_empty() && chunk.len() >= CHUNK_BYTES / 2 {
            self.send(chunk).await;
            return;
        }
        if self.gathered.capacity() == 0 {
            self.gathered.reserve_exact(CHUNK_BYTES);
        }
        self.gathered.extend_from_slice(&chunk);
        if self.gathered.len() >= CHUNK_BYTES {
            let full = std::mem::take(&mut self.gathered);
            self.send(full).await;
        }
    }

    /// Hand a chunk to the writer, then hash it here while it is written.
    async fn send(&mut self, bytes: Vec<u8>) {
        let bytes = Bytes::from(bytes);
        if self.tx.send(Chunk::Data(bytes.clone())).await.is_err() {
            // The writer stopped early: it has the reason. Keep accepting
            // (and dropping) the rest so the caller can drain its input;
            // `finish` reports the error.
        }
        self.hasher.update(&bytes);
    }

    /// All bytes passed: check, make durable and index.
    pub async fn finish(mut self) -> Result<Receipt, IngestError> {
        if !self.gathered.is_empty() {
            let rest = std::mem::take(&mut self.gathered);
            self.send(rest).await;
        }
        let InstanceUpload {
            ingest,
            origin,
            declared,
            tx,
            worker,
            hasher,
            gathered: _,
        } = self;
        let _ = tx.send(Chunk::End(hasher.finalize().into())).await;
        drop(tx);
        let finishing = std::time::Instant::now();
        let written = worker.await.map_err(|_| IngestError::Internal)??;
        let checked = finishing.elapsed();
        let receipt = ingest.index(&origin, &declared, written).await?;
        tracing::debug!(
            size = receipt.size,
            checks_us = checked.as_micros() as u64,
            index_and_sync_us = (finishing.elapsed() - checked).as_micros() as u64,
            "instance ingested"
        );
        Ok(receipt)
    }
}

impl Ingest {
    /// Record a durable instance in the index; withdraw the blob again when
    /// the index already holds the same bytes or cannot take the record.
    async fn index(
        &self,
        origin: &Origin,
        declared: &Declared,
        written: Written,
    ) -> Result<Receipt, IngestError> {
        let Written {
            header,
            provenance,
            location,
            resume_at,
            syncing,
        } = written;

        let record = InstanceRecord {
            partner: origin.partner.clone(),
            study_uid: header.study_uid.clone(),
            series_uid: header.series_uid.clone(),
            sop_instance_uid: declared.sop_instance.clone(),
            sop_class_uid: declared.sop_class.clone(),
            transfer_syntax: declared.transfer_syntax.clone(),
            attributes: header.attributes,
            received_at_ms: provenance.received_at_ms,
            size: provenance.size,
            dataset_sha256: provenance.sha256()?,
            blob: location,
            resume_at,
            source: origin.source,
            calling_ae: origin.calling_ae.as_ref().map(|ae| ae.to_string()),
            transfer: origin.transfer,
        };
        // The index records the object while it is being made durable (the
        // two waits overlap); the acknowledgement waits for both. A row whose
        // object then fails to sync is withdrawn; one that a crash leaves
        // pointing at a torn object is found by `recover`.
        let indexed = self.index.record_instance(&record).await;
        let synced = syncing.await.map_err(|_| IngestError::Internal)?;
        let (outcome, blob) = match (indexed, synced) {
            (Ok(outcome), Ok(blob)) => (outcome, blob),
            (Ok(outcome), Err(e)) => {
                if outcome != IndexOutcome::Duplicate {
                    self.index.withdraw_instance(&record.blob).await?;
                }
                return Err(e.into());
            }
            (Err(e), Ok(blob)) => {
                let _ = tokio::task::spawn_blocking(move || blob.retract()).await;
                return Err(e.into());
            }
            (Err(e), Err(_)) => return Err(e.into()),
        };
        if outcome == IndexOutcome::Duplicate {
            // The same bytes are already stored: keep one copy.
            tokio::task::spawn_blocking(move || blob.retract())
                .await
                .map_err(|_| IngestError::Internal)??;
        }
        let source = origin.source.as_str();
        let outcome_label = match outcome {
            IndexOutcome::Stored => "stored",
            IndexOutcome::Duplicate => "duplicate",
            IndexOutcome::Conflict => "conflict",
        };
        self.metrics
            .instances
            .get_or_create(&vec![
                label("source", source),
                label("outcome", outcome_label),
            ])
            .inc();
        self.metrics
            .bytes
            .get_or_create(&vec![label("source", source)])
            .inc_by(record.size);
        if outcome != IndexOutcome::Duplicate {
            self.arrivals.report(&origin.partner, &record.study_uid);
        }
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
            sop_instance: record.sop_instance_uid,
            size: record.size,
        })
    }

    /// Start-up recovery: after a crash, withdraw index rows whose object
    /// the crash tore; then index what the blob store holds durably but the
    /// index lost (an OS crash before the index commit was on disk).
    pub async fn recover(&self) -> Result<Recovered, IngestError> {
        let resume_at = self.index.blob_resume_points().await?;
        let blobs = Arc::clone(&self.blobs);
        let recovery = tokio::task::spawn_blocking(move || blobs.recover(&resume_at))
            .await
            .map_err(|_| IngestError::Internal)??;
        let mut recovered = Recovered {
            discarded_bytes: recovery.discarded_bytes,
            ..Recovered::default()
        };
        if recovery.after_crash {
            // Rows are recorded while their object syncs, and a writer
            // starts the next object in a storage object only after the
            // sync: so only the last instance of each can be torn.
            for last in self.index.last_instances().await? {
                let blobs = Arc::clone(&self.blobs);
                let check = last.clone();
                let intact = tokio::task::spawn_blocking(move || {
                    dataset_intact(
                        &*blobs,
                        &check.location,
                        check.dataset_size,
                        &check.dataset_sha256,
                    )
                })
                .await
                .map_err(|_| IngestError::Internal)?;
                if !matches!(intact, Ok(true)) {
                    tracing::warn!(
                        object = %last.location.object,
                        offset = last.location.offset,
                        "an instance the crash left incomplete on disk was never acknowledged; withdrawn from the index"
                    );
                    self.index.withdraw_instance(&last.location).await?;
                }
            }
        }
        for found in recovery.unindexed {
            let blobs = Arc::clone(&self.blobs);
            let read = tokio::task::spawn_blocking(move || reread(&*blobs, found))
                .await
                .map_err(|_| IngestError::Internal)?;
            match read {
                Ok((origin, declared, written)) => {
                    let receipt = self.index(&origin, &declared, written).await?;
                    if receipt.outcome != IndexOutcome::Duplicate {
                        recovered.reindexed += 1;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "a recovered object could not be re-indexed; left in place")
                }
            }
        }
        Ok(recovered)
    }
}

/// What start-up recovery did.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Instances the index had lost, indexed again.
    pub reindexed: usize,
    /// Bytes of unfinished objects removed.
    pub discarded_bytes: u64,
}

/// Whether the data set stored at `location` (its last `size` bytes) still
/// hashes to `sha256`.
fn dataset_intact(
    blobs: &dyn BlobStore,
    location: &BlobLocation,
    size: u64,
    sha256: &[u8; 32],
) -> Result<bool, BlobError> {
    let Some(start) = location.length.checked_sub(size) else {
        return Ok(false);
    };
    let read_err = |source| BlobError::Open {
        object: location.object.clone(),
        source,
    };
    let mut object = blobs.open(location)?;
    object
        .seek(std::io::SeekFrom::Start(start))
        .map_err(read_err)?;
    let mut hasher = Sha256::new();
    let copied = std::io::copy(&mut object, &mut hasher).map_err(read_err)?;
    Ok(copied == size && hasher.finalize().as_slice() == sha256)
}

/// What is kept with every stored object so the index can be rebuilt from
/// the blob store alone.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Provenance {
    partner: String,
    source: String,
    calling_ae: Option<String>,
    received_at_ms: i64,
    dataset_sha256: String,
    size: u64,
}

impl Provenance {
    fn sha256(&self) -> Result<[u8; 32], IngestError> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(&self.dataset_sha256, &mut out)
            .map_err(|_| IngestError::Malformed("stored provenance has a bad digest".into()))?;
        Ok(out)
    }

    fn origin(&self) -> Result<Origin, IngestError> {
        let bad =
            |what: &str| IngestError::Malformed(format!("stored provenance has a bad {what}"));
        Ok(Origin {
            partner: PartnerId::parse(&self.partner).map_err(|_| bad("partner"))?,
            source: match self.source.as_str() {
                "dimse" => Source::Dimse,
                "stow" => Source::Stow,
                "import" => Source::Import,
                _ => return Err(bad("source")),
            },
            calling_ae: match &self.calling_ae {
                Some(ae) => Some(AeTitle::parse(ae).map_err(|_| bad("calling AE title"))?),
                None => None,
            },
            transfer: None,
        })
    }
}

/// A checked, complete instance on its way into the index, and to disk.
struct Written {
    header: header::Header,
    provenance: Provenance,
    location: BlobLocation,
    resume_at: u64,
    /// The object being made durable.
    syncing: JoinHandle<Result<Box<dyn CommittedBlob>, BlobError>>,
}

/// The blocking stage: write the file meta we build from `declared`, then
/// every chunk; then seal the object with the provenance label and check
/// the header and the structure while it is being made durable.
fn write_instance(
    blobs: &dyn BlobStore,
    origin: &Origin,
    declared: &Declared,
    mut rx: mpsc::Receiver<Chunk>,
) -> Result<Written, IngestError> {
    let mut blob = blobs.begin()?;
    let data_start = write_file_meta(&mut *blob, declared)?;
    let mut size: u64 = 0;
    let sha256 = loop {
        match rx.blocking_recv() {
            Some(Chunk::Data(bytes)) => {
                size += bytes.len() as u64;
                blob.write_all(&bytes).map_err(BlobError::Write)?;
            }
            Some(Chunk::End(sha256)) => break sha256,
            // The edge dropped the upload: the transfer was aborted.
            None => return Err(IngestError::Aborted),
        }
    };
    blob.flush().map_err(BlobError::Write)?;
    if size == 0 {
        return Err(IngestError::Malformed("empty data set".into()));
    }
    let provenance = Provenance {
        partner: origin.partner.to_string(),
        source: origin.source.as_str().to_owned(),
        calling_ae: origin.calling_ae.as_ref().map(|ae| ae.to_string()),
        received_at_ms: now_ms(),
        dataset_sha256: hex::encode(sha256),
        size,
    };
    let label = serde_json::to_vec(&provenance).map_err(|_| IngestError::Internal)?;
    let sealed = blob.seal(&label)?;
    let location = sealed.location().clone();
    let resume_at = sealed.resume_at();
    // The checks read what the sync writes out; neither waits for the
    // other. An object that fails them is withdrawn once it is synced (and
    // if a crash comes first, recovery runs the same checks and skips it).
    let syncing = tokio::task::spawn_blocking(move || sealed.sync());
    let checked = blobs
        .open(&location)
        .map_err(IngestError::from)
        .and_then(|object| check_instance(object, data_start, declared));
    match checked {
        Ok(header) => Ok(Written {
            header,
            provenance,
            location,
            resume_at,
            syncing,
        }),
        Err(e) => {
            if let Ok(Ok(blob)) = tokio::runtime::Handle::current().block_on(syncing) {
                blob.retract()?;
            }
            Err(e)
        }
    }
}

/// The checks of a received instance (`object`: the Part 10 object as
/// stored, its data set from `data_start`): the structure of the whole data
/// set, then the header against what was declared. The walk comes first:
/// it proves every element's length real before the header parse, which
/// allocates what an element claims (a few bytes claiming a gigabyte cost
/// a gigabyte; found by the `stow_multipart` fuzz target).
pub fn check_instance(
    mut object: impl std::io::Read + std::io::Seek,
    data_start: u64,
    declared: &Declared,
) -> Result<header::Header, IngestError> {
    structure::check(&mut object, data_start, declared.transfer_syntax.as_str())
        .map_err(IngestError::Malformed)?;
    object
        .seek(std::io::SeekFrom::Start(0))
        .map_err(|e| IngestError::Malformed(format!("cannot read the stored object: {e}")))?;
    header::read_and_check(&mut object, declared)
}

/// Recovery: rebuild what `write_instance` knew from a stored object.
fn reread(
    blobs: &dyn BlobStore,
    found: RecoveredBlob,
) -> Result<(Origin, Declared, Written), IngestError> {
    let provenance: Provenance = serde_json::from_slice(&found.label)
        .map_err(|e| IngestError::Malformed(format!("stored provenance unreadable: {e}")))?;
    let origin = provenance.origin()?;
    let mut reader = blobs.open(&found.location)?;
    let mut preamble = [0u8; 128];
    reader
        .read_exact(&mut preamble)
        .map_err(|e| IngestError::Malformed(format!("stored object unreadable: {e}")))?;
    let meta = FileMetaTable::from_reader(reader)
        .map_err(|e| IngestError::Malformed(format!("stored file meta unreadable: {e}")))?;
    let declared = Declared::from_file_meta(&meta)?;
    // The data set is the object's tail; the provenance gives its size.
    let data_start = found
        .location
        .length
        .checked_sub(provenance.size)
        .ok_or_else(|| IngestError::Malformed("stored provenance has a bad size".into()))?;
    // Framing complete does not prove the middle reached the disk.
    if !dataset_intact(
        blobs,
        &found.location,
        provenance.size,
        &provenance.sha256()?,
    )? {
        return Err(IngestError::Malformed(
            "stored object does not match its digest (torn by a crash)".into(),
        ));
    }
    let header = check_instance(blobs.open(&found.location)?, data_start, &declared)?;
    let blob: Box<dyn CommittedBlob> = Box::new(RecoveredHandle {
        location: found.location.clone(),
        resume_at: found.resume_at,
    });
    Ok((
        origin,
        declared,
        Written {
            header,
            provenance,
            location: found.location,
            resume_at: found.resume_at,
            syncing: tokio::task::spawn_blocking(move || Ok(blob)),
        },
    ))
}

/// A recovered object: already durable; a duplicate is left as dead space
/// (recovery runs before any writer, so it is not at a segment's end).
struct RecoveredHandle {
    location: BlobLocation,
    resume_at: u64,
}

impl CommittedBlob for RecoveredHandle {
    fn location(&self) -> &BlobLocation {
        &self.location
    }
    fn resume_at(&self) -> u64 {
        self.resume_at
    }
    fn retract(self: Box<Self>) -> Result<(), BlobError> {
        Ok(())
    }
}

/// Preamble, `DICM` and a file meta group that is a function of the declared
/// identity only, so identical data sets give identical files.
/// Returns the offset where the data set starts.
fn write_file_meta(out: &mut dyn BlobWrite, declared: &Declared) -> Result<u64, IngestError> {
    let head = file_meta_bytes(declared)?;
    out.write_all(&head).map_err(BlobError::Write)?;
    Ok(head.len() as u64)
}

/// The preamble, `DICM` and file meta group the pipeline stores for
/// `declared`.
pub fn file_meta_bytes(declared: &Declared) -> Result<Vec<u8>, IngestError> {
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
    Ok(head)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
