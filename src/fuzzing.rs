//! Entry points for the fuzz targets in `tests/fuzz` (cargo-fuzz): the
//! code that reads bytes from the network, run on arbitrary input without
//! the stores. Each must return for every input; a panic is a finding.
//! (Not an API: hidden from the docs, called by the fuzz targets and by the
//! regression tests of their findings.)

use std::sync::OnceLock;

use crate::dicomweb::stow::{read_part_head, request_boundary, PartHead};
use crate::ingest::Declared;
use axum::http::{header, HeaderMap, HeaderValue};

/// Most bytes of one part read after its file meta group (the header parse
/// stops long before on real data).
const PART_LIMIT: usize = 1 << 20;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a current-thread runtime needs no resources")
    })
}

/// The `stow_multipart` target's input: byte 0 sets the chunk size
/// (`64 * n + 1`), the `Content-Type` value runs to the first newline, the
/// body is the rest.
pub fn stow_input(data: &[u8]) -> Vec<Result<(), String>> {
    let Some((chunk, rest)) = data.split_first() else {
        return Vec::new();
    };
    let (content_type, body) = match rest.iter().position(|&b| b == b'\n') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    stow_request(content_type, body, usize::from(*chunk) * 64 + 1)
}

/// A STOW-RS request: `Content-Type` value and body, the body arriving in
/// chunks of `chunk` bytes (the multipart parser must not care where the
/// network split it). Every part goes through the part checks and, when it
/// declares a storable instance, the checks of the ingest pipeline. The
/// verdict on each part, `Ok` if it would be stored.
pub fn stow_request(content_type: &[u8], body: &[u8], chunk: usize) -> Vec<Result<(), String>> {
    let mut verdicts = Vec::new();
    let Ok(value) = HeaderValue::from_bytes(content_type) else {
        return verdicts;
    };
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, value);
    let Ok(boundary) = request_boundary(&headers) else {
        return verdicts;
    };
    let chunks: Vec<Result<bytes::Bytes, std::io::Error>> = body
        .chunks(chunk.max(1))
        .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
        .collect();
    let stream = futures_util::stream::iter(chunks);
    runtime().block_on(async {
        let mut multipart = multer::Multipart::new(stream, boundary);
        while let Ok(Some(mut field)) = multipart.next_field().await {
            let Ok(head) = read_part_head(&mut field, false).await else {
                return;
            };
            let (declared, rest) = match head {
                PartHead::Declared { declared, rest } => (declared, rest),
                PartHead::Refused(_) => {
                    verdicts.push(Err("refused before the data set".to_owned()));
                    continue;
                }
            };
            let mut instance = rest;
            while let Ok(Some(chunk)) = field.chunk().await {
                if instance.len() < PART_LIMIT {
                    instance.extend_from_slice(&chunk);
                }
            }
            verdicts.push(check_as_stored(&declared, &instance));
        }
    });
    verdicts
}

/// The ingest pipeline's checks (header parse, structure walk) on a data
/// set as a C-STORE brings it: declared by the command (here: as a CT
/// instance in the transfer syntax the first input byte picks).
pub fn dimse_data_set(bytes: &[u8]) -> Result<(), String> {
    const SYNTAXES: [&str; 4] = [
        "1.2.840.10008.1.2",      // implicit VR little endian
        "1.2.840.10008.1.2.1",    // explicit VR little endian
        "1.2.840.10008.1.2.2",    // explicit VR big endian
        "1.2.840.10008.1.2.4.50", // JPEG baseline (encapsulated)
    ];
    let Some((first, data_set)) = bytes.split_first() else {
        return Err("empty input".into());
    };
    let uid = |text: &str| crate::ids::Uid::parse(text).expect("constant UID is valid");
    let declared = Declared {
        sop_class: uid("1.2.840.10008.5.1.4.1.1.2"),
        sop_instance: uid("1.2.3.4"),
        transfer_syntax: uid(SYNTAXES[usize::from(*first) % SYNTAXES.len()]),
        study: None,
    };
    check_as_stored(&declared, data_set)
}

/// A FHIR JSON request body through the parser and the validator (core
/// definitions, invariants, claimed profiles). The error findings' texts
/// (empty: valid), or `Err` if the body is not a resource we serve.
pub fn fhir_resource(body: &[u8]) -> Result<Vec<String>, String> {
    let value = crate::fhir::json::parse(body).map_err(|e| e.to_string())?;
    let resource_type = value
        .get("resourceType")
        .and_then(|t| t.as_str())
        .ok_or("no resourceType")?;
    // Bundles too: transactions and batches are validated as a whole.
    if crate::fhir::definitions::Definitions::core()
        .resource(resource_type)
        .is_none()
    {
        return Err(format!("{resource_type} is not an R4 resource type"));
    }
    let resource_type = resource_type.to_owned();
    let issues = runtime().block_on(crate::fhir::rest::validation(&resource_type, &value, &[]));
    Ok(issues
        .iter()
        .filter(|i| i.is_error())
        .map(|i| format!("{i:?}"))
        .collect())
}

/// What the pipeline does with a data set once stored: the file meta it
/// writes from `declared`, then the data set, checked as one object.
fn check_as_stored(declared: &Declared, data_set: &[u8]) -> Result<(), String> {
    let mut object = crate::ingest::file_meta_bytes(declared).map_err(|e| e.to_string())?;
    let data_start = object.len() as u64;
    object.extend_from_slice(data_set);
    crate::ingest::check_instance(std::io::Cursor::new(object), data_start, declared)
        .map(|_| ())
        .map_err(|e| e.to_string())
}
