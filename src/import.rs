//! `konsil import PATH --partner ID`: ingest a folder or a DICOMDIR (a
//! patient's CD) through the same pipeline as C-STORE and STOW-RS.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use dicom_dictionary_std::tags;
use dicom_object::OpenFileOptions;
use indicatif::{ProgressBar, ProgressStyle};

use crate::ids::{PartnerId, TransferId};
use crate::ingest::{Declared, Ingest, IngestError, Origin};
use crate::store::{IndexOutcome, Source};

/// Media Storage Directory Storage: the DICOMDIR itself, never ingested.
const DICOMDIR_CLASS: &str = "1.2.840.10008.1.3.10";
/// Read size when streaming a file into the pipeline.
const CHUNK: usize = 256 * 1024;

/// Counts and reasons after an import.
#[derive(Debug, Default)]
pub struct Summary {
    pub stored: usize,
    pub duplicate: usize,
    pub conflict: usize,
    /// Files that are not DICOM Part 10 (CD viewers, autorun files …).
    pub skipped: Vec<(PathBuf, String)>,
    /// DICOM files the pipeline refused, with the reason.
    pub rejected: Vec<(PathBuf, String)>,
    /// Instances stored (or already there) per StudyInstanceUID.
    pub studies: std::collections::BTreeMap<String, u64>,
    /// The import run as one transfer, for its audit record.
    pub transfer: TransferId,
}

impl Summary {
    /// A human summary, one line per count, then each rejection.
    pub fn report(&self) -> String {
        let mut out = format!(
            "stored: {}\nduplicate: {}\nconflict (kept, flagged): {}\nskipped (not DICOM): {}\nrejected: {}\n",
            self.stored,
            self.duplicate,
            self.conflict,
            self.skipped.len(),
            self.rejected.len()
        );
        let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
        for (_, why) in &self.skipped {
            *reasons.entry(why.as_str()).or_default() += 1;
        }
        for (why, n) in reasons {
            out.push_str(&format!("  skipped {n}: {why}\n"));
        }
        for (path, why) in &self.rejected {
            out.push_str(&format!("  rejected {}: {why}\n", path.display()));
        }
        out
    }
}

/// Why an import could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read DICOMDIR {path}: {reason}")]
    Dicomdir { path: PathBuf, reason: String },
}

/// Import every DICOM file under `path` (a folder, a DICOMDIR, or a folder
/// holding a DICOMDIR) for `partner`, as the one transfer `transfer`.
pub async fn run(
    ingest: &Ingest,
    partner: &PartnerId,
    path: &Path,
    transfer: TransferId,
) -> Result<Summary, ImportError> {
    let files = collect_files(path)?;
    let bar = ProgressBar::new(files.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} files  {elapsed_precise} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut summary = Summary {
        transfer,
        ..Summary::default()
    };
    for file in files {
        match import_file(ingest, partner, summary.transfer, &file).await {
            Ok(FileOutcome::Stored(outcome, study)) => {
                *summary.studies.entry(study).or_insert(0) += 1;
                match outcome {
                    IndexOutcome::Stored => summary.stored += 1,
                    IndexOutcome::Duplicate => summary.duplicate += 1,
                    IndexOutcome::Conflict => summary.conflict += 1,
                }
            }
            Ok(FileOutcome::Skipped(why)) => summary.skipped.push((file, why)),
            Err(why) => summary.rejected.push((file, why)),
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(summary)
}

enum FileOutcome {
    /// How the index took it, and its study.
    Stored(IndexOutcome, String),
    Skipped(String),
}

async fn import_file(
    ingest: &Ingest,
    partner: &PartnerId,
    transfer: TransferId,
    path: &Path,
) -> Result<FileOutcome, String> {
    let mut file = File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let mut preamble = [0u8; 132];
    if file.read_exact(&mut preamble).is_err() || &preamble[128..132] != b"DICM" {
        return Ok(FileOutcome::Skipped(
            "no DICOM Part 10 header (preamble + DICM)".into(),
        ));
    }
    // The group length element, then the group it announces (bounded),
    // parsed like a STOW-RS part's.
    let mut group_length = [0u8; 12];
    file.read_exact(&mut group_length)
        .map_err(|_| "the file ends inside its file meta information".to_owned())?;
    let length = u32::from_le_bytes([
        group_length[8],
        group_length[9],
        group_length[10],
        group_length[11],
    ]) as usize;
    if group_length[..4] != [0x02, 0x00, 0x00, 0x00] || length > crate::ingest::meta::META_LIMIT {
        return Err("file meta information does not start with a usable group length".into());
    }
    let mut group = b"DICM".to_vec();
    group.extend_from_slice(&group_length);
    group.resize(16 + length, 0);
    file.read_exact(&mut group[16..])
        .map_err(|_| "the file ends inside its file meta information".to_owned())?;
    let meta = crate::ingest::meta::parse(&group).map_err(|e| e.to_string())?;
    if meta.media_storage_sop_class_uid() == DICOMDIR_CLASS {
        return Ok(FileOutcome::Skipped(
            "DICOMDIR (directory, not an instance)".into(),
        ));
    }
    let declared = Declared::from_file_meta(&meta).map_err(|e| e.to_string())?;
    // The data set starts after the group length element (12 bytes) and the
    // group it announces.
    let data_start = 132 + 12 + u64::from(meta.information_group_length);
    file.seek(SeekFrom::Start(data_start))
        .map_err(|e| format!("cannot seek to the data set: {e}"))?;

    let mut upload = ingest.begin(
        Origin {
            partner: partner.clone(),
            source: Source::Import,
            calling_ae: None,
            transfer: Some(transfer),
        },
        declared,
    );
    loop {
        let mut chunk = vec![0u8; CHUNK];
        let n = read_full(&mut file, &mut chunk).map_err(|e| format!("read failed: {e}"))?;
        if n == 0 {
            break;
        }
        chunk.truncate(n);
        upload.write(chunk).await;
    }
    match upload.finish().await {
        Ok(receipt) => Ok(FileOutcome::Stored(
            receipt.outcome,
            receipt.study_uid.to_string(),
        )),
        Err(e @ (IngestError::Blob(_) | IngestError::Index(_) | IngestError::Internal)) => {
            Err(format!("storage failure: {e}"))
        }
        Err(e) => Err(e.to_string()),
    }
}

fn read_full(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// The files to import, in a stable order.
fn collect_files(path: &Path) -> Result<Vec<PathBuf>, ImportError> {
    let read_err = |source| ImportError::Read {
        path: path.to_owned(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    let dicomdir = if meta.is_dir() {
        let candidate = path.join("DICOMDIR");
        candidate.is_file().then_some(candidate)
    } else if path
        .file_name()
        .is_some_and(|n| n.eq_ignore_ascii_case("DICOMDIR"))
    {
        Some(path.to_owned())
    } else {
        None
    };
    if let Some(dicomdir) = dicomdir {
        return dicomdir_files(&dicomdir);
    }
    if meta.is_file() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files = Vec::new();
    for entry in walkdir::WalkDir::new(path).sort_by_file_name() {
        let entry = entry.map_err(|e| ImportError::Read {
            path: e
                .path()
                .map(Path::to_owned)
                .unwrap_or_else(|| path.to_owned()),
            source: e
                .into_io_error()
                .unwrap_or_else(|| std::io::Error::other("directory loop")),
        })?;
        if entry.file_type().is_file() {
            files.push(entry.into_path());
        }
    }
    Ok(files)
}

/// The files a DICOMDIR references (Referenced File ID of each record),
/// relative to the folder that holds the DICOMDIR.
fn dicomdir_files(dicomdir: &Path) -> Result<Vec<PathBuf>, ImportError> {
    let fail = |reason: String| ImportError::Dicomdir {
        path: dicomdir.to_owned(),
        reason,
    };
    let obj = OpenFileOptions::new()
        .open_file(dicomdir)
        .map_err(|e| fail(e.to_string()))?;
    let root = dicomdir.parent().unwrap_or(Path::new("."));
    let records = obj
        .element(tags::DIRECTORY_RECORD_SEQUENCE)
        .map_err(|e| fail(e.to_string()))?;
    let items = records
        .items()
        .ok_or_else(|| fail("DirectoryRecordSequence is not a sequence".into()))?;
    let mut files = Vec::new();
    for item in items {
        let Some(id) = item.get(tags::REFERENCED_FILE_ID) else {
            continue;
        };
        let parts = id.to_multi_str().map_err(|e| fail(e.to_string()))?;
        let mut file = root.to_path_buf();
        for part in parts.iter() {
            let part = part.trim();
            // File IDs are up to 8 characters of A-Z, 0-9, '_' (PS3.10 §8.2);
            // refuse anything that could leave the medium's folder.
            if part.is_empty() || part == ".." || part.contains(['/', '\\']) {
                return Err(fail(format!(
                    "unsafe Referenced File ID component {part:?}"
                )));
            }
            file.push(part);
        }
        files.push(file);
    }
    files.sort();
    files.dedup();
    Ok(files)
}
