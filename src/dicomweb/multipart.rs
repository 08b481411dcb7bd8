//! Streaming `multipart/related` responses straight from the blob store:
//! one blocking reader per response, a small bounded channel to the socket,
//! so memory stays flat whatever the study size. The exact Content-Length
//! is computed up front from the index's sizes.

use std::io::{Seek, SeekFrom};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Body;
use bytes::Bytes;
use tokio::sync::mpsc;

use crate::store::{BlobLocation, BlobStore};

/// Bytes read from the blob store per chunk sent.
const CHUNK: usize = 1024 * 1024;
/// Chunks in flight between the reader and the socket.
const DEPTH: usize = 4;

/// A byte range of a stored object, relative to the object's start.
#[derive(Debug, Clone, Copy)]
pub struct Piece {
    pub offset: u64,
    pub length: u64,
}

/// One body part: pieces of one stored object, sent back to back.
#[derive(Debug, Clone)]
pub struct Part {
    pub content_type: String,
    pub location: BlobLocation,
    pub pieces: Vec<Piece>,
}

impl Part {
    /// A whole stored object as one part.
    pub fn whole(content_type: String, location: BlobLocation) -> Part {
        let length = location.length;
        Part {
            content_type,
            location,
            pieces: vec![Piece { offset: 0, length }],
        }
    }

    fn length(&self) -> u64 {
        self.pieces.iter().map(|p| p.length).sum()
    }
}

/// A boundary that will not occur in the content (random per response).
pub fn boundary() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // Mixed so consecutive boundaries differ in every position.
    let mixed = (nanos ^ n.rotate_left(32)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    format!("konsil-{mixed:016x}{n:08x}")
}

fn part_header(boundary: &str, part: &Part) -> String {
    format!(
        "--{boundary}\r\nContent-Type: {}\r\nContent-Length: {}\r\n\r\n",
        part.content_type,
        part.length()
    )
}

/// The multipart body of `parts` and its exact length.
pub fn body(blobs: Arc<dyn BlobStore>, parts: Vec<Part>, boundary: String) -> (Body, u64) {
    let mut length = 0u64;
    for part in &parts {
        length += part_header(&boundary, part).len() as u64 + part.length() + 2;
    }
    let closing = format!("--{boundary}--\r\n");
    length += closing.len() as u64;
    let body = stream(blobs, move |out| {
        for part in &parts {
            out.send(Bytes::from(part_header(&boundary, part)))?;
            out.copy_part(part)?;
            out.send(Bytes::from_static(b"\r\n"))?;
        }
        out.send(Bytes::from(closing))
    });
    (body, length)
}

/// One part as a bare body (a single `application/dicom` instance).
pub fn single(blobs: Arc<dyn BlobStore>, part: Part) -> (Body, u64) {
    let length = part.length();
    let body = stream(blobs, move |out| out.copy_part(&part));
    (body, length)
}

/// Why streaming stopped.
enum Stop {
    /// The client went away: nothing to report.
    Gone,
    /// The store failed mid-response; the connection is cut so the client
    /// sees a short body, never a complete-looking wrong one.
    Failed(std::io::Error),
}

/// The blocking side of a streamed response.
struct Output {
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    blobs: Arc<dyn BlobStore>,
}

impl Output {
    fn send(&self, bytes: Bytes) -> Result<(), Stop> {
        self.tx.blocking_send(Ok(bytes)).map_err(|_| Stop::Gone)
    }

    fn copy_part(&self, part: &Part) -> Result<(), Stop> {
        let mut reader = self
            .blobs
            .open(&part.location)
            .map_err(|e| Stop::Failed(std::io::Error::other(e.to_string())))?;
        for piece in &part.pieces {
            reader
                .seek(SeekFrom::Start(piece.offset))
                .map_err(Stop::Failed)?;
            let mut left = piece.length;
            while left > 0 {
                let want = usize::try_from(left).unwrap_or(CHUNK).min(CHUNK);
                let mut buf = Vec::with_capacity(want);
                let got = reader.read_append(&mut buf, want).map_err(Stop::Failed)?;
                if got < want {
                    return Err(Stop::Failed(std::io::ErrorKind::UnexpectedEof.into()));
                }
                self.send(Bytes::from(buf))?;
                left -= want as u64;
            }
        }
        Ok(())
    }
}

/// Run `produce` on a blocking thread and stream what it sends.
fn stream<F>(blobs: Arc<dyn BlobStore>, produce: F) -> Body
where
    F: FnOnce(&Output) -> Result<(), Stop> + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(DEPTH);
    tokio::task::spawn_blocking(move || {
        let out = Output { tx, blobs };
        if let Err(Stop::Failed(e)) = produce(&out) {
            tracing::error!(error = %e, "DICOMweb response cut short: blob store read failed");
            let _ = out.tx.blocking_send(Err(e));
        }
    });
    Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }))
}
