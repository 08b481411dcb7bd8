//! STOW-RS (PS3.18 10.5): a `multipart/related; type="application/dicom"`
//! body parsed as a stream (multer, boundary from the Content-Type), each
//! part streamed through the same ingest pipeline as C-STORE. Nothing is
//! buffered beyond a part's file meta header; every part gets a result.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use dicom_core::value::PrimitiveValue;
use dicom_core::{DataElement, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

use super::dataset::{self, sequence, uid_element};
use super::media::{self, DatasetFormat, DICOM};
use super::{base_url, path_uid, reply, WebError};
use crate::app::App;
use crate::auth::{Caller, CallerError};
use crate::ids::{TransferId, Uid};
use crate::ingest::{self, status, Declared, IngestError, Origin};
use crate::store::{IndexOutcome, Source};

// A part's preamble and file meta group must fit in META_LIMIT; the data
// set after it is streamed.
use crate::ingest::meta::META_LIMIT;

/// `POST /dicomweb/studies`
pub async fn store(
    State(app): State<Arc<App>>,
    Extension(transfer): Extension<TransferId>,
    caller: Result<Caller, CallerError>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    reply(run(&app, caller, transfer, &headers, None, body).await)
}

/// `POST /dicomweb/studies/{study}`: every instance must belong to `study`.
pub async fn store_in_study(
    State(app): State<Arc<App>>,
    Path(study): Path<String>,
    Extension(transfer): Extension<TransferId>,
    caller: Result<Caller, CallerError>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let study = match path_uid("StudyInstanceUID", &study) {
        Ok(study) => study,
        Err(e) => return e.into_response(),
    };
    reply(run(&app, caller, transfer, &headers, Some(study), body).await)
}

/// The result of one part.
pub(crate) enum PartResult {
    Stored {
        sop_class: Uid,
        sop_instance: Uid,
        study: Uid,
        series: Uid,
        outcome: IndexOutcome,
    },
    Failed {
        sop_class: Option<String>,
        sop_instance: Option<String>,
        reason: u16,
        why: String,
    },
}

async fn run(
    app: &Arc<App>,
    caller: Result<Caller, CallerError>,
    transfer: TransferId,
    headers: &HeaderMap,
    study: Option<Uid>,
    body: Body,
) -> Result<Response, WebError> {
    let partner = match caller? {
        Caller::Partner(client) => client.partner,
        Caller::Staff(_) => {
            return Err(WebError::Forbidden(
                "STOW-RS stores instances under the sending partner: use a partner's access \
                 token (staff have no partner; under --dev send X-Konsil-Partner)"
                    .into(),
            ))
        }
    };
    let format = media::dataset_format(headers, true)?;
    let boundary = request_boundary(headers)?;
    let limits = &app.config.dicomweb;
    let mut size_limit = multer::SizeLimit::new();
    if let Some(n) = limits.max_request_bytes {
        size_limit = size_limit.whole_stream(n);
    }
    if let Some(n) = limits.max_part_bytes {
        size_limit = size_limit.per_field(n);
    }
    let mut multipart = multer::Multipart::with_constraints(
        body.into_data_stream(),
        boundary,
        multer::Constraints::new().size_limit(size_limit),
    );
    let origin = Origin {
        partner,
        source: Source::Stow,
        calling_ae: None,
        // Set by the DICOMweb gate, which stores the request's audit record.
        transfer: Some(transfer),
    };

    let mut results = Vec::new();
    let mut body_error = None;
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(e) => {
                body_error = Some(e);
                break;
            }
        };
        match store_part(app, &origin, study.as_ref(), field).await {
            Ok(result) => {
                if let PartResult::Failed { reason, why, .. } = &result {
                    app.ingest.count_failure(Source::Stow, *reason);
                    tracing::info!(
                        partner = %origin.partner,
                        reason = format!("0x{reason:04X}"),
                        why = %why,
                        "STOW-RS part refused"
                    );
                }
                results.push(result);
            }
            Err(e) => {
                body_error = Some(e);
                break;
            }
        }
    }

    let mut warnings = Vec::new();
    if let Some(e) = body_error {
        if let multer::Error::StreamSizeExceeded { limit }
        | multer::Error::FieldSizeExceeded { limit, .. } = &e
        {
            if results.is_empty() {
                return Err(WebError::PayloadTooLarge(format!(
                    "request larger than the configured limit of {limit} bytes"
                )));
            }
        }
        let e = with_causes(&e);
        if results.is_empty() {
            return Err(WebError::BadRequest(format!(
                "malformed multipart body: {e}"
            )));
        }
        // Parts before the damage were stored and are reported; the rest
        // of the body is lost, and the client is told so.
        warnings.push(format!(
            "the body broke off after {} part(s) ({e}); later content was not stored",
            results.len()
        ));
    }
    if results.is_empty() {
        return Err(WebError::BadRequest(
            "the multipart body holds no parts".into(),
        ));
    }
    let stored = StoredStudies::of(&results);
    let mut response = respond(app, headers, format, study.as_ref(), results, warnings);
    response.extensions_mut().insert(stored);
    Ok(response)
}

/// The studies a STOW-RS request stored instances of, with how many: for
/// the audit record the DICOMweb gate writes.
#[derive(Debug, Clone)]
pub(crate) struct StoredStudies(pub Vec<(String, u64)>);

impl StoredStudies {
    fn of(results: &[PartResult]) -> StoredStudies {
        let mut counts: std::collections::BTreeMap<String, u64> = Default::default();
        for result in results {
            if let PartResult::Stored { study, .. } = result {
                *counts.entry(study.to_string()).or_insert(0) += 1;
            }
        }
        StoredStudies(counts.into_iter().collect())
    }
}

/// The boundary of a `multipart/related; type="application/dicom"` body.
pub(crate) fn request_boundary(headers: &HeaderMap) -> Result<String, WebError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            WebError::UnsupportedMediaType(
                "Content-Type must be multipart/related; type=\"application/dicom\"".into(),
            )
        })?;
    let range = media::parse_range(content_type).map_err(|_| {
        WebError::UnsupportedMediaType(format!("Content-Type {content_type:?} is not valid"))
    })?;
    if range.essence != "multipart/related" {
        return Err(WebError::UnsupportedMediaType(format!(
            "Content-Type {} is not supported: send multipart/related; type=\"application/dicom\"",
            range.essence
        )));
    }
    match range.param("type").map(str::to_ascii_lowercase) {
        None => {}
        Some(t) if t == DICOM => {}
        Some(t) => {
            return Err(WebError::UnsupportedMediaType(format!(
                "parts of type {t} are not supported: send type=\"application/dicom\" (Part 10 instances)"
            )))
        }
    }
    range
        .param("boundary")
        .filter(|b| !b.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| WebError::BadRequest("Content-Type has no boundary parameter".into()))
}

/// A part's Part 10 header, read before anything is stored.
pub(crate) enum PartHead {
    /// What the part's file meta declares, and the bytes read past it.
    Declared { declared: Declared, rest: Vec<u8> },
    /// The part is refused (and was drained).
    Refused(PartResult),
}

/// Read a part up to the end of its file meta group and check what it
/// declares. `Err` means the body itself broke.
pub(crate) async fn read_part_head(
    field: &mut multer::Field<'_>,
    accept_unknown_sop_classes: bool,
) -> Result<PartHead, multer::Error> {
    let failed = |reason: u16, why: String| {
        PartHead::Refused(PartResult::Failed {
            sop_class: None,
            sop_instance: None,
            reason,
            why,
        })
    };
    if let Some(ct) = field.content_type() {
        if ct.essence_str() != DICOM {
            let why = format!("part of type {} is not application/dicom", ct.essence_str());
            drain(field).await?;
            return Ok(failed(status::CANNOT_UNDERSTAND, why));
        }
    }
    // Gather the preamble and the file meta group.
    let mut head = Vec::new();
    let meta_end = loop {
        if head.len() >= 144 {
            if &head[128..132] != b"DICM" {
                drain(field).await?;
                return Ok(failed(
                    status::CANNOT_UNDERSTAND,
                    "not a DICOM Part 10 object (no 128-byte preamble and DICM prefix)".into(),
                ));
            }
            // (0002,0000) UL group length: tag 4, VR 2, length 2, value 4.
            let group_length = u32::from_le_bytes([head[140], head[141], head[142], head[143]]);
            let end = 144usize.saturating_add(group_length as usize);
            if head[132..136] != [0x02, 0x00, 0x00, 0x00] || end > META_LIMIT {
                drain(field).await?;
                return Ok(failed(
                    status::CANNOT_UNDERSTAND,
                    "file meta information does not start with a usable group length".into(),
                ));
            }
            if head.len() >= end {
                break end;
            }
        }
        match field.chunk().await? {
            Some(chunk) => head.extend_from_slice(&chunk),
            None => {
                return Ok(failed(
                    status::CANNOT_UNDERSTAND,
                    "part ends inside the DICOM file header".into(),
                ))
            }
        }
    };
    let meta = match ingest::meta::parse(&head[128..meta_end]) {
        Ok(meta) => meta,
        Err(e) => {
            drain(field).await?;
            return Ok(failed(status::CANNOT_UNDERSTAND, e.to_string()));
        }
    };
    let failed_for = |reason: u16, why: String| {
        PartHead::Refused(PartResult::Failed {
            sop_class: Some(meta.media_storage_sop_class_uid().to_owned()),
            sop_instance: Some(meta.media_storage_sop_instance_uid().to_owned()),
            reason,
            why,
        })
    };
    let declared = match Declared::from_file_meta(&meta) {
        Ok(d) => d,
        Err(e) => {
            drain(field).await?;
            let (reason, why) = status::for_ingest_error(&e);
            return Ok(failed_for(reason, why));
        }
    };
    if !accept_unknown_sop_classes && !ingest::is_storage_sop_class(declared.sop_class.as_str()) {
        drain(field).await?;
        return Ok(failed_for(
            status::SOP_CLASS_NOT_SUPPORTED,
            format!(
                "{} is not a Storage SOP Class we accept",
                declared.sop_class
            ),
        ));
    }
    Ok(PartHead::Declared {
        declared,
        rest: head.split_off(meta_end),
    })
}

/// Stream one part into the ingest pipeline. `Err` means the body itself
/// broke (client gone, malformed multipart): the part's upload is dropped,
/// which discards what was written.
async fn store_part(
    app: &Arc<App>,
    origin: &Origin,
    study: Option<&Uid>,
    mut field: multer::Field<'_>,
) -> Result<PartResult, multer::Error> {
    let (mut declared, rest) =
        match read_part_head(&mut field, app.config.server.accept_unknown_sop_classes).await? {
            PartHead::Declared { declared, rest } => (declared, rest),
            PartHead::Refused(result) => return Ok(result),
        };
    declared.study = study.cloned();
    let failed_for = |reason: u16, why: String| PartResult::Failed {
        sop_class: Some(declared.sop_class.to_string()),
        sop_instance: Some(declared.sop_instance.to_string()),
        reason,
        why,
    };

    let receiving = std::time::Instant::now();
    let mut upload = app.ingest.begin(origin.clone(), declared.clone());
    upload.write(rest).await;
    let mut chunks = 0u32;
    while let Some(chunk) = field.chunk().await? {
        chunks += 1;
        upload.write(Vec::from(chunk)).await;
    }
    tracing::debug!(
        chunks,
        receive_us = receiving.elapsed().as_micros() as u64,
        "STOW-RS part received"
    );
    Ok(match upload.finish().await {
        Ok(receipt) => PartResult::Stored {
            sop_class: declared.sop_class,
            sop_instance: receipt.sop_instance,
            study: receipt.study_uid,
            series: receipt.series_uid,
            outcome: receipt.outcome,
        },
        Err(e) => {
            if matches!(
                e,
                IngestError::Blob(_) | IngestError::Index(_) | IngestError::Internal
            ) {
                tracing::error!(error = %e, "STOW-RS part could not be stored");
            }
            let (reason, why) = status::for_ingest_error(&e);
            failed_for(reason, why)
        }
    })
}

/// An error with what caused it (multer says "failed to read stream" and
/// keeps the why, such as a stalled body, as its source).
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// Read the rest of a part we will not store.
async fn drain(field: &mut multer::Field<'_>) -> Result<(), multer::Error> {
    while let Some(_chunk) = field.chunk().await? {}
    Ok(())
}

/// The Store Instances Response (PS3.18 10.5.3): 200 all stored, 202 some
/// stored or warnings, 409 none stored.
fn respond(
    app: &App,
    headers: &HeaderMap,
    format: DatasetFormat,
    study: Option<&Uid>,
    results: Vec<PartResult>,
    mut warnings: Vec<String>,
) -> Response {
    let base = base_url(app, headers);
    let mut referenced = Vec::new();
    let mut failed = Vec::new();
    let mut studies: Vec<Uid> = Vec::new();
    for result in &results {
        match result {
            PartResult::Stored {
                sop_class,
                sop_instance,
                study,
                series,
                outcome,
            } => {
                if !studies.contains(study) {
                    studies.push(study.clone());
                }
                if *outcome == IndexOutcome::Conflict {
                    warnings.push(format!(
                        "instance {sop_instance} differs from one stored earlier under the same \
                         SOP Instance UID; both are kept and flagged"
                    ));
                }
                referenced.push(InMemDicomObject::from_element_iter([
                    uid_element(tags::REFERENCED_SOP_CLASS_UID, Some(sop_class.as_str())),
                    uid_element(
                        tags::REFERENCED_SOP_INSTANCE_UID,
                        Some(sop_instance.as_str()),
                    ),
                    url_element(format!(
                        "{base}/studies/{study}/series/{series}/instances/{sop_instance}"
                    )),
                ]));
            }
            PartResult::Failed {
                sop_class,
                sop_instance,
                reason,
                why,
            } => {
                warnings.push(format!(
                    "part {} ({}): 0x{reason:04X} {why}",
                    failed.len() + referenced.len() + 1,
                    sop_instance
                        .as_deref()
                        .unwrap_or("SOP Instance UID unknown")
                ));
                failed.push(InMemDicomObject::from_element_iter([
                    uid_element(tags::REFERENCED_SOP_CLASS_UID, sop_class.as_deref()),
                    uid_element(tags::REFERENCED_SOP_INSTANCE_UID, sop_instance.as_deref()),
                    DataElement::new(tags::FAILURE_REASON, VR::US, PrimitiveValue::from(*reason)),
                ]))
            }
        }
    }
    let mut response = InMemDicomObject::new_empty();
    // The study's RetrieveURL when the request named it or all parts went
    // to one study.
    let study_url = study.or(match studies.as_slice() {
        [only] => Some(only),
        _ => None,
    });
    if let Some(study) = study_url {
        response.put(url_element(format!("{base}/studies/{study}")));
    }
    if !failed.is_empty() {
        warnings.push(format!(
            "{} of {} part(s) were not stored; see FailedSOPSequence",
            failed.len(),
            results.len()
        ));
        response.put(sequence(tags::FAILED_SOP_SEQUENCE, failed.clone()));
    }
    if !referenced.is_empty() {
        response.put(sequence(tags::REFERENCED_SOP_SEQUENCE, referenced.clone()));
    }
    let status = if referenced.is_empty() {
        StatusCode::CONFLICT
    } else if warnings.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    let (content_type, text) = match format {
        DatasetFormat::Json => match dataset::json_object(&response) {
            Ok(text) => (media::DICOM_JSON, text),
            Err(e) => return e.into_response(),
        },
        DatasetFormat::Xml => (media::DICOM_XML, dataset::xml(&response)),
    };
    let mut reply = (status, [(header::CONTENT_TYPE, content_type)], text).into_response();
    for warning in warnings {
        // Warning: 299 - "<text>" (RFC 7234 5.5); quotes and controls removed.
        let clean: String = warning
            .chars()
            .filter(|c| !c.is_control() && *c != '"' && *c != '\\')
            .collect();
        if let Ok(value) = HeaderValue::from_str(&format!("299 - \"{clean}\"")) {
            reply.headers_mut().append(header::WARNING, value);
        }
    }
    reply
}

fn url_element(url: String) -> DataElement<InMemDicomObject> {
    DataElement::new(tags::RETRIEVE_URL, VR::UR, PrimitiveValue::from(url))
}
