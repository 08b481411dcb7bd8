//! Binary content. A raw upload (`POST /fhir/Binary` with, say,
//! `Content-Type: application/pdf`) streams into the FHIR blob store and is
//! durable before it is acknowledged; memory stays bounded by the chunk size.
//! Base64 `data` over [`INLINE_MAX`] sent as FHIR JSON is moved there too.
//! A read returns the raw bytes with their content type unless FHIR JSON is
//! asked for explicitly.

use std::io::Write as _;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use futures_util::StreamExt as _;
use serde_json::Value;
use tokio::sync::mpsc;

use super::outcome::Issue;
use super::FhirError;
use crate::app::App;
use crate::store::fhir::StoredResource;
use crate::store::{BlobError, BlobLocation, BlobStore};

/// Base64 characters of `data` kept in the stored JSON; more go to the blob
/// store.
pub const INLINE_MAX: usize = 1024 * 1024;

/// Chunks in flight between the request and the writer thread.
const DEPTH: usize = 4;

/// Written to every FHIR blob: what it is (no PHI).
const LABEL: &[u8] = br#"{"kind":"fhir-binary"}"#;

/// A durable blob, not yet recorded by the resource store.
pub struct StoredBlob {
    pub location: BlobLocation,
    pub resume_at: u64,
}

fn internal() -> FhirError {
    FhirError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        Issue::error("exception", "internal error while storing binary content"),
    )
}

enum Chunk {
    Data(bytes::Bytes),
    End,
}

/// Stream a request body into a new blob. Returns once it is durable. A
/// body over `limit` bytes is refused (413) and nothing of it is kept.
pub async fn store_stream(
    blobs: Arc<dyn BlobStore>,
    body: Body,
    limit: Option<u64>,
) -> Result<StoredBlob, FhirError> {
    let (tx, mut rx) = mpsc::channel::<Chunk>(DEPTH);
    let writer = tokio::task::spawn_blocking(move || -> Result<Option<StoredBlob>, BlobError> {
        let mut blob = blobs.begin()?;
        loop {
            match rx.blocking_recv() {
                Some(Chunk::Data(bytes)) => blob.write_all(&bytes).map_err(BlobError::Write)?,
                Some(Chunk::End) => break,
                // The request broke off: the object is discarded.
                None => return Ok(None),
            }
        }
        blob.flush().map_err(BlobError::Write)?;
        let committed = blob.commit(LABEL)?;
        Ok(Some(StoredBlob {
            location: committed.location().clone(),
            resume_at: committed.resume_at(),
        }))
    });
    let mut stream = body.into_data_stream();
    let mut failed = None;
    let mut over_limit = None;
    let mut received: u64 = 0;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(bytes) => {
                received = received.saturating_add(bytes.len() as u64);
                if let Some(limit) = limit.filter(|limit| received > *limit) {
                    // Dropping the sender below discards what was written.
                    over_limit = Some(limit);
                    break;
                }
                if tx.send(Chunk::Data(bytes)).await.is_err() {
                    break; // the writer failed; it says why
                }
            }
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    if failed.is_none() && over_limit.is_none() {
        let _ = tx.send(Chunk::End).await;
    }
    drop(tx);
    let written = writer.await.map_err(|_| internal())??;
    if let Some(limit) = over_limit {
        return Err(FhirError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            Issue::error(
                "too-long",
                format!("the Binary upload is over fhir.max_binary_bytes ({limit} bytes); nothing was stored"),
            ),
        ));
    }
    match (written, failed) {
        (Some(stored), None) => Ok(stored),
        (_, Some(e)) => Err(FhirError::bad_request(format!(
            "the upload broke off before its end ({e}); nothing was stored"
        ))),
        (None, None) => Err(internal()),
    }
}

/// Store bytes already in memory as a new blob.
async fn store_bytes(blobs: Arc<dyn BlobStore>, bytes: Vec<u8>) -> Result<StoredBlob, FhirError> {
    tokio::task::spawn_blocking(move || -> Result<StoredBlob, BlobError> {
        let mut blob = blobs.begin()?;
        blob.write_all(&bytes).map_err(BlobError::Write)?;
        blob.flush().map_err(BlobError::Write)?;
        let committed = blob.commit(LABEL)?;
        Ok(StoredBlob {
            location: committed.location().clone(),
            resume_at: committed.resume_at(),
        })
    })
    .await
    .map_err(|_| internal())?
    .map_err(FhirError::from)
}

/// Move a Binary's large base64 `data` into the blob store (the stored JSON
/// then has none; reads put it back).
pub async fn spill(app: &App, value: &mut Value) -> Result<Option<StoredBlob>, FhirError> {
    let Some(data) = value.get("data").and_then(Value::as_str) else {
        return Ok(None);
    };
    if data.len() <= INLINE_MAX {
        return Ok(None);
    }
    let compact: String = data.chars().filter(|c| !c.is_whitespace()).collect();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(compact.as_bytes())
        .map_err(|_| FhirError::bad_request("Binary.data is not valid base64"))?;
    let stored = store_bytes(Arc::clone(&app.fhir_blobs), bytes).await?;
    if let Some(obj) = value.as_object_mut() {
        obj.remove("data");
    }
    Ok(Some(stored))
}

/// Whether a read of a Binary asks for the FHIR resource rather than its
/// raw content: only an explicit FHIR/JSON `Accept` or `_format` does.
pub fn wants_resource(headers: &HeaderMap, format: Option<&str>) -> bool {
    if format.is_some() {
        return true;
    }
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| {
            accept.split(',').any(|item| {
                let media = item
                    .split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase();
                media == "application/fhir+json"
                    || media == "application/json"
                    || media == "application/json+fhir"
            })
        })
}

/// The raw content of a stored Binary, with its content type.
pub fn raw_response(app: &App, stored: &StoredResource) -> Result<Response, FhirError> {
    let body: Value = stored
        .body
        .as_deref()
        .map(serde_json::from_str)
        .transpose()
        .map_err(|_| internal())?
        .unwrap_or(Value::Null);
    let content_type = body
        .get("contentType")
        .and_then(Value::as_str)
        .unwrap_or("application/octet-stream")
        .to_owned();
    let content_type = HeaderValue::from_str(&content_type)
        .unwrap_or(HeaderValue::from_static("application/octet-stream"));
    let (payload, length) = match &stored.blob {
        Some(location) => {
            crate::dicomweb::stream_blob(Arc::clone(&app.fhir_blobs), location.clone())
        }
        None => {
            let data = body.get("data").and_then(Value::as_str).unwrap_or("");
            let compact: String = data.chars().filter(|c| !c.is_whitespace()).collect();
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(compact.as_bytes())
                .map_err(|_| internal())?;
            let length = bytes.len() as u64;
            (Body::from(bytes), length)
        }
    };
    let mut response = (StatusCode::OK, payload).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, content_type);
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    if let Ok(v) = HeaderValue::from_str(&format!("W/\"{}\"", stored.version)) {
        headers.insert(header::ETAG, v);
    }
    Ok(response)
}

/// The stored JSON of a Binary with its `data` put back from the blob store.
pub async fn with_data(app: &App, stored: &StoredResource) -> Result<String, FhirError> {
    let (Some(location), Some(body)) = (&stored.blob, &stored.body) else {
        return Ok(stored.body.clone().unwrap_or_default());
    };
    if location.length.saturating_mul(4) / 3 > app.config.fhir.max_resource_bytes {
        return Err(FhirError::new(
            StatusCode::NOT_ACCEPTABLE,
            Issue::error(
                "too-costly",
                format!(
                    "Binary/{} holds {} bytes, too many to send as base64 in FHIR JSON; request it without Accept: application/fhir+json to get the raw content",
                    stored.id, location.length
                ),
            ),
        ));
    }
    let blobs = Arc::clone(&app.fhir_blobs);
    let location = location.clone();
    let bytes = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, BlobError> {
        let mut reader = blobs.open(&location)?;
        let mut bytes = Vec::with_capacity(usize::try_from(location.length).unwrap_or(0));
        std::io::Read::read_to_end(
            &mut std::io::Read::take(&mut reader, location.length),
            &mut bytes,
        )
        .map_err(|source| BlobError::Open {
            object: location.object.clone(),
            source,
        })?;
        Ok(bytes)
    })
    .await
    .map_err(|_| internal())??;
    let mut value: Value = serde_json::from_str(body).map_err(|_| internal())?;
    if let Some(obj) = value.as_object_mut() {
        obj.insert(
            "data".to_owned(),
            Value::String(base64::engine::general_purpose::STANDARD.encode(bytes)),
        );
    }
    Ok(value.to_string())
}
