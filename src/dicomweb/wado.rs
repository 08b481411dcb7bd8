//! WADO-RS (PS3.18 10.4): instances, frames and bulk data streamed from the
//! blob store as stored (never transcoded), and metadata from the cache in
//! [`super::metadata`].

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use dicom_dictionary_std::tags;

use super::metadata::{OpenedInstance, PIXEL_DATA};
use super::multipart::{self, Part, Piece};
use super::{base_url, media, path_uid, reply, WebError};
use crate::app::App;
use crate::auth::{Caller, CallerError};
use crate::store::query::{Locate, StoredInstance};

/// The path parameters: `study`, and `series`, `instance`, `frames`, `tag`
/// as the route has them.
type Params = Path<HashMap<String, String>>;

fn target(p: &HashMap<String, String>) -> Target<'_> {
    (
        p.get("study").map(String::as_str).unwrap_or_default(),
        p.get("series").map(String::as_str),
        p.get("instance").map(String::as_str),
    )
}

/// Study, series or instance.
pub async fn retrieve_instances(
    State(app): State<Arc<App>>,
    Path(p): Params,
    caller: Result<Caller, CallerError>,
    headers: HeaderMap,
) -> Response {
    reply(retrieve(&app, caller, &headers, target(&p)).await)
}

/// Study, series or instance metadata.
pub async fn metadata(
    State(app): State<Arc<App>>,
    Path(p): Params,
    caller: Result<Caller, CallerError>,
    headers: HeaderMap,
) -> Response {
    reply(metadata_json(&app, caller, &headers, target(&p)).await)
}

pub async fn frames(
    State(app): State<Arc<App>>,
    Path(p): Params,
    caller: Result<Caller, CallerError>,
    headers: HeaderMap,
) -> Response {
    // The list is checked first: a malformed one is a 400 even when the
    // client's cached copy would otherwise get a 304.
    let list = p.get("frames").map(String::as_str).unwrap_or_default();
    let frames = match parse_frames(list) {
        Ok(frames) => frames,
        Err(e) => return reply(Err(e)),
    };
    reply(pixels(&app, caller, &headers, target(&p), Wanted::Frames(frames)).await)
}

pub async fn bulkdata(
    State(app): State<Arc<App>>,
    Path(p): Params,
    caller: Result<Caller, CallerError>,
    headers: HeaderMap,
) -> Response {
    let tag = p.get("tag").cloned().unwrap_or_default();
    reply(pixels(&app, caller, &headers, target(&p), Wanted::Bulk(tag)).await)
}

/// Study, series and instance UIDs from the path.
type Target<'a> = (&'a str, Option<&'a str>, Option<&'a str>);

/// The caller's stored instances under `target`; 404 when there are none
/// (another partner's study is as absent as a missing one).
async fn locate(
    app: &Arc<App>,
    caller: Result<Caller, CallerError>,
    target: Target<'_>,
) -> Result<Vec<StoredInstance>, WebError> {
    let caller = caller?;
    let (study, series, instance) = target;
    let locate = Locate {
        partners: crate::auth::policy::visible_partners(&caller, &app.config),
        study_uid: path_uid("StudyInstanceUID", study)?,
        series_uid: series
            .map(|s| path_uid("SeriesInstanceUID", s))
            .transpose()?,
        sop_instance_uid: instance
            .map(|i| path_uid("SOPInstanceUID", i))
            .transpose()?,
    };
    let found = app.index.locate(&locate).await?;
    if found.is_empty() {
        let what = match (series, instance) {
            (_, Some(i)) => format!("instance {i}"),
            (Some(s), None) => format!("series {s}"),
            (None, None) => format!("study {study}"),
        };
        return Err(WebError::NotFound(format!("{what} not found")));
    }
    Ok(found)
}

/// Cheap validators: an instance's content hash; for a study or series the
/// newest row and the count, which change whenever an instance arrives.
/// `weak` for multipart bodies: their boundary differs per response, so the
/// bytes are equivalent, not identical (RFC 9110 8.8.1).
fn validators(found: &[StoredInstance], weak: bool) -> (String, Option<String>) {
    let opaque = match found {
        [one] => format!("\"{}\"", one.dataset_sha256),
        many => format!(
            "\"{}-{}\"",
            many.len(),
            many.iter().map(|i| i.id).max().unwrap_or(0)
        ),
    };
    let etag = if weak { format!("W/{opaque}") } else { opaque };
    let newest = found.iter().map(|i| i.received_at_ms).max().unwrap_or(0);
    let last_modified = u64::try_from(newest).ok().map(|ms| {
        httpdate::fmt_http_date(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
    });
    (etag, last_modified)
}

/// Set ETag and Last-Modified; true when the client's copy is current
/// (If-None-Match compares weakly, RFC 9110 13.1.2).
fn conditional(
    headers: &HeaderMap,
    found: &[StoredInstance],
    weak: bool,
    response: &mut HeaderMap,
) -> bool {
    let (etag, last_modified) = validators(found, weak);
    let opaque = etag.trim_start_matches("W/");
    let current = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim() == "*" || t.trim().trim_start_matches("W/") == opaque)
        });
    if let Ok(v) = HeaderValue::from_str(&etag) {
        response.insert(header::ETAG, v);
    }
    if let Some(v) = last_modified.and_then(|v| HeaderValue::from_str(&v).ok()) {
        response.insert(header::LAST_MODIFIED, v);
    }
    current
}

async fn retrieve(
    app: &Arc<App>,
    caller: Result<Caller, CallerError>,
    headers: &HeaderMap,
    target: Target<'_>,
) -> Result<Response, WebError> {
    let found = locate(app, caller, target).await?;
    let syntaxes: Vec<&str> = found.iter().map(|i| i.transfer_syntax.as_str()).collect();
    let packaging = media::instances(headers, &syntaxes, found.len())?;
    let mut response_headers = HeaderMap::new();
    let weak = packaging == media::Packaging::Multipart;
    if conditional(headers, &found, weak, &mut response_headers) {
        return Ok((StatusCode::NOT_MODIFIED, response_headers).into_response());
    }
    let parts: Vec<Part> = found
        .iter()
        .map(|i| {
            Part::whole(
                format!("{}; transfer-syntax={}", media::DICOM, i.transfer_syntax),
                i.blob.clone(),
            )
        })
        .collect();
    let blobs = Arc::clone(&app.blobs);
    let (body, length, content_type) = match packaging {
        media::Packaging::Multipart => {
            let boundary = multipart::boundary();
            let (body, length) = multipart::body(blobs, parts, boundary.clone());
            let ct = format!(
                "multipart/related; type=\"{}\"; boundary={boundary}",
                media::DICOM
            );
            (body, length, ct)
        }
        media::Packaging::Single => {
            let part = parts
                .into_iter()
                .next()
                .ok_or_else(|| WebError::Internal("no part to send".into()))?;
            let ct = part.content_type.clone();
            let (body, length) = multipart::single(blobs, part);
            (body, length, ct)
        }
    };
    insert(&mut response_headers, header::CONTENT_TYPE, &content_type);
    insert(
        &mut response_headers,
        header::CONTENT_LENGTH,
        &length.to_string(),
    );
    Ok((StatusCode::OK, response_headers, body).into_response())
}

fn insert(headers: &mut HeaderMap, name: header::HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(name, v);
    }
}

async fn metadata_json(
    app: &Arc<App>,
    caller: Result<Caller, CallerError>,
    headers: &HeaderMap,
    target: Target<'_>,
) -> Result<Response, WebError> {
    media::dataset_format(headers, false)?;
    let found = locate(app, caller, target).await?;
    let mut response_headers = HeaderMap::new();
    if conditional(headers, &found, false, &mut response_headers) {
        return Ok((StatusCode::NOT_MODIFIED, response_headers).into_response());
    }
    let body = super::metadata::json_array(app, &found, &base_url(app, headers)).await?;
    insert(
        &mut response_headers,
        header::CONTENT_TYPE,
        media::DICOM_JSON,
    );
    Ok((StatusCode::OK, response_headers, body).into_response())
}

/// What part of the pixel data or other bulk data is asked for.
enum Wanted {
    /// 1-based frame numbers.
    Frames(Vec<u32>),
    /// A top-level attribute by tag (`7FE00010`), as our BulkDataURIs name it.
    Bulk(String),
}

async fn pixels(
    app: &Arc<App>,
    caller: Result<Caller, CallerError>,
    headers: &HeaderMap,
    target: Target<'_>,
    wanted: Wanted,
) -> Result<Response, WebError> {
    let found = locate(app, caller, target).await?;
    let instance = found
        .into_iter()
        .next()
        .ok_or_else(|| WebError::Internal("located nothing".into()))?;
    // Pixel data is negotiated by transfer syntax; other bulk data (an
    // encapsulated PDF, overlay bits) is plain bytes in any syntax.
    let pixel_data = match &wanted {
        Wanted::Frames(_) => true,
        Wanted::Bulk(tag) => tag.eq_ignore_ascii_case("7FE00010"),
    };
    let part_type = if pixel_data {
        media::pixels(headers, instance.transfer_syntax.as_str())?
    } else {
        media::OCTET_STREAM.to_owned()
    };
    // A viewer re-fetching frames it holds gets a 304 without a read.
    let mut response_headers = HeaderMap::new();
    if conditional(
        headers,
        std::slice::from_ref(&instance),
        true,
        &mut response_headers,
    ) {
        return Ok((StatusCode::NOT_MODIFIED, response_headers).into_response());
    }
    let opened = match opened_instances().get(&instance.id) {
        Some(opened) => opened,
        None => {
            let blobs = Arc::clone(&app.blobs);
            let located = instance.clone();
            let opened = Arc::new(
                tokio::task::spawn_blocking(move || {
                    super::metadata::open_instance(&*blobs, &located)
                })
                .await
                .map_err(|e| WebError::Internal(format!("reader: {e}")))??,
            );
            opened_instances().insert(instance.id, Arc::clone(&opened));
            opened
        }
    };
    let pieces = match wanted {
        Wanted::Frames(frames) => frame_pieces(&opened, &frames)?,
        Wanted::Bulk(tag) => bulk_pieces(&opened, &tag)?,
    };
    let parts = pieces
        .into_iter()
        .map(|pieces| Part {
            content_type: part_type.clone(),
            location: instance.blob.clone(),
            pieces,
        })
        .collect();
    let boundary = multipart::boundary();
    let (body, length) = multipart::body(Arc::clone(&app.blobs), parts, boundary.clone());
    let part_essence = part_type.split(';').next().unwrap_or(media::OCTET_STREAM);
    insert(
        &mut response_headers,
        header::CONTENT_TYPE,
        &format!("multipart/related; type=\"{part_essence}\"; boundary={boundary}"),
    );
    insert(
        &mut response_headers,
        header::CONTENT_LENGTH,
        &length.to_string(),
    );
    Ok((StatusCode::OK, response_headers, body).into_response())
}

/// Parsed headers and layouts of stored instances, by index id, so that a
/// viewer's many frame requests for one instance walk it once. A stored
/// object never changes under its id. Bounded by layout size (about 24
/// bytes per unit).
fn opened_instances() -> &'static moka::sync::Cache<i64, Arc<OpenedInstance>> {
    static CACHE: std::sync::OnceLock<moka::sync::Cache<i64, Arc<OpenedInstance>>> =
        std::sync::OnceLock::new();
    CACHE.get_or_init(|| {
        moka::sync::Cache::builder()
            .max_capacity(2_000_000)
            .weigher(|_, opened: &Arc<OpenedInstance>| {
                let fragments: usize = opened.layout.iter().map(|e| e.fragments.len()).sum();
                u32::try_from(64 + opened.layout.len() + fragments + opened.offset_table.len())
                    .unwrap_or(u32::MAX)
            })
            .build()
    })
}

/// Deflated objects have no byte ranges to serve from.
fn unaddressable() -> WebError {
    WebError::NotAcceptable(
        "values of this instance (deflated transfer syntax) cannot be served separately; \
         retrieve the instance"
            .into(),
    )
}

fn parse_frames(list: &str) -> Result<Vec<u32>, WebError> {
    let frames = list
        .split(',')
        .map(|f| f.trim().parse::<u32>().ok().filter(|n| *n >= 1))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| {
            WebError::BadRequest(format!(
                "frame list {list:?}: use comma-separated frame numbers starting at 1"
            ))
        })?;
    if frames.is_empty() {
        return Err(WebError::BadRequest("empty frame list".into()));
    }
    Ok(frames)
}

fn int(opened: &OpenedInstance, tag: dicom_core::Tag) -> Option<u64> {
    opened.header.get(tag)?.to_int::<u64>().ok()
}

/// Byte ranges of each asked-for frame.
fn frame_pieces(opened: &OpenedInstance, frames: &[u32]) -> Result<Vec<Vec<Piece>>, WebError> {
    if opened.layout.is_empty() {
        return Err(unaddressable());
    }
    let span = opened
        .layout
        .iter()
        .find(|e| e.tag == PIXEL_DATA)
        .ok_or_else(|| WebError::NotFound("the instance has no pixel data".into()))?;
    let count = int(opened, tags::NUMBER_OF_FRAMES).unwrap_or(1).max(1);
    let missing = |f: u32| WebError::NotFound(format!("frame {f} does not exist ({count} frames)"));
    if let Some(length) = span.length {
        // Native pixel data: frames of equal size, back to back.
        let rows = int(opened, tags::ROWS).unwrap_or(0);
        let columns = int(opened, tags::COLUMNS).unwrap_or(0);
        let samples = int(opened, tags::SAMPLES_PER_PIXEL).unwrap_or(1);
        let bits = int(opened, tags::BITS_ALLOCATED).unwrap_or(0);
        if bits == 0 || !bits.is_multiple_of(8) {
            return Err(WebError::NotAcceptable(format!(
                "frames of {bits}-bit pixel data cannot be cut at byte boundaries; retrieve the instance"
            )));
        }
        let frame_len = rows * columns * samples * (bits / 8);
        if frame_len == 0 {
            return Err(WebError::NotAcceptable(
                "the instance lacks Rows/Columns to cut frames by; retrieve the instance".into(),
            ));
        }
        return frames
            .iter()
            .map(|&f| {
                let start = u64::from(f - 1) * frame_len;
                if f as u64 > count || start + frame_len > u64::from(length) {
                    return Err(missing(f));
                }
                Ok(vec![Piece {
                    offset: span.offset + start,
                    length: frame_len,
                }])
            })
            .collect();
    }
    // Encapsulated: the first item is the Basic Offset Table.
    let fragments = span.fragments.get(1..).unwrap_or_default();
    let groups = frame_fragments(opened, fragments, count)?;
    frames
        .iter()
        .map(|&f| {
            let group = groups.get(f as usize - 1).ok_or_else(|| missing(f))?;
            Ok(group
                .iter()
                .map(|&(offset, len)| Piece {
                    offset,
                    length: u64::from(len),
                })
                .collect())
        })
        .collect()
}

/// Which fragments make up each frame (PS3.5 A.4): one frame takes them
/// all; otherwise the Basic Offset Table says where frames start, or each
/// fragment is a frame.
fn frame_fragments(
    opened: &OpenedInstance,
    fragments: &[(u64, u32)],
    count: u64,
) -> Result<Vec<Vec<(u64, u32)>>, WebError> {
    if count == 1 {
        return Ok(vec![fragments.to_vec()]);
    }
    let starts = &opened.offset_table;
    if !starts.is_empty() {
        // Offsets count from the first fragment's item tag, 8 bytes before
        // its value.
        let first_item = fragments.first().map(|(o, _)| o - 8).unwrap_or(0);
        let mut groups = vec![Vec::new(); starts.len()];
        for &(offset, len) in fragments {
            let rel = offset - 8 - first_item;
            let frame = starts.iter().rposition(|&s| s <= rel).unwrap_or(0);
            groups[frame].push((offset, len));
        }
        return Ok(groups);
    }
    if fragments.len() as u64 == count {
        return Ok(fragments.iter().map(|f| vec![*f]).collect());
    }
    Err(WebError::NotAcceptable(
        "this instance's frames cannot be told apart (no offset table, fragments ≠ frames); \
         retrieve the instance"
            .into(),
    ))
}

/// The byte ranges of a top-level attribute: one part for a plain value,
/// one per frame for encapsulated pixel data.
fn bulk_pieces(opened: &OpenedInstance, tag: &str) -> Result<Vec<Vec<Piece>>, WebError> {
    let raw = u32::from_str_radix(tag, 16)
        .ok()
        .filter(|_| tag.len() == 8)
        .ok_or_else(|| WebError::BadRequest(format!("{tag:?} is not a tag (8 hex digits)")))?;
    let tag = dicom_core::Tag((raw >> 16) as u16, raw as u16);
    if opened.layout.is_empty() {
        return Err(unaddressable());
    }
    let span = opened
        .layout
        .iter()
        .find(|e| e.tag == tag)
        .ok_or_else(|| WebError::NotFound(format!("no bulk data at {tag}")))?;
    match span.length {
        Some(length) => Ok(vec![vec![Piece {
            offset: span.offset,
            length: u64::from(length),
        }]]),
        None if tag == PIXEL_DATA => {
            let count = int(opened, tags::NUMBER_OF_FRAMES).unwrap_or(1).max(1);
            let frames: Vec<u32> = (1..=count as u32).collect();
            frame_pieces(opened, &frames)
        }
        None => Err(WebError::NotFound(format!(
            "{tag} is a sequence, not bulk data"
        ))),
    }
}
