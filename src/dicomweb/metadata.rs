//! WADO-RS metadata (PS3.18 10.4.1.1.2): DICOM JSON of each instance with
//! bulk data (Pixel Data and other large binaries) as `BulkDataURI`s. Each
//! instance's JSON is computed once, on first request, and kept in the index;
//! study and series metadata are then read from there, never by re-reading
//! every stored object.

use std::collections::HashMap;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::sync::Arc;

use dicom_core::Tag;
use dicom_object::file::ReadPreamble;
use dicom_object::{DefaultDicomObject, OpenFileOptions};

use super::WebError;
use crate::app::App;
use crate::ingest::structure::{self, ElementSpan};
use crate::store::query::StoredInstance;
use crate::store::BlobStore;

/// Stand-in for the DICOMweb base in cached JSON: the base depends on how
/// the client reached us, so it is filled in per response.
const BASE_MARK: &str = "konsil-base:";
/// Binary values longer than this (bytes) become BulkDataURIs.
const INLINE_LIMIT: usize = 1024;
pub const PIXEL_DATA: Tag = Tag(0x7FE0, 0x0010);

/// A stored object opened for reading its header and layout.
pub struct OpenedInstance {
    pub header: DefaultDicomObject,
    /// Top-level elements and where their values are (empty for deflated
    /// objects, whose values cannot be addressed).
    pub layout: Vec<ElementSpan>,
    /// Encapsulated Pixel Data's Basic Offset Table (empty if it has none).
    pub offset_table: Vec<u64>,
}

/// A Basic Offset Table larger than this is refused (4 bytes per frame:
/// a million frames).
const OFFSET_TABLE_LIMIT: u32 = 4 * 1024 * 1024;

/// Parse the header (up to Pixel Data) and walk the layout of a stored
/// object. Blocking.
pub fn open_instance(
    blobs: &dyn BlobStore,
    instance: &StoredInstance,
) -> Result<OpenedInstance, WebError> {
    let mut reader = blobs.open(&instance.blob)?;
    let header = OpenFileOptions::new()
        .read_preamble(ReadPreamble::Always)
        .read_until(PIXEL_DATA)
        .from_reader(BufReader::new(&mut reader))
        .map_err(|e| WebError::Internal(format!("stored object unreadable: {e}")))?;
    let data_start = 132 + 12 + u64::from(header.meta().information_group_length);
    reader
        .seek(SeekFrom::Start(0))
        .map_err(|e| WebError::Internal(format!("stored object unreadable: {e}")))?;
    let layout = structure::layout(
        reader.by_ref(),
        data_start,
        instance.transfer_syntax.as_str(),
    )
    .unwrap_or_default();
    let mut offset_table = Vec::new();
    let table = layout
        .iter()
        .find(|e| e.tag == PIXEL_DATA)
        .and_then(|e| e.fragments.first().copied());
    if let Some((at, len)) = table.filter(|(_, len)| *len > 0 && *len <= OFFSET_TABLE_LIMIT) {
        let mut bytes = vec![0u8; len as usize];
        reader
            .seek(SeekFrom::Start(at))
            .and_then(|_| reader.read_exact(&mut bytes))
            .map_err(|e| WebError::Internal(format!("stored object unreadable: {e}")))?;
        // Offsets are little endian in every encapsulated transfer syntax.
        offset_table = bytes
            .chunks_exact(4)
            .map(|c| u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect();
    }
    Ok(OpenedInstance {
        header,
        layout,
        offset_table,
    })
}

/// The DICOMweb path of an instance, relative to the base.
fn instance_path(i: &StoredInstance) -> String {
    format!(
        "studies/{}/series/{}/instances/{}",
        i.study_uid, i.series_uid, i.sop_instance_uid
    )
}

/// DICOM JSON of one instance, with bulk data URIs relative to [`BASE_MARK`].
fn compute(blobs: &dyn BlobStore, instance: &StoredInstance) -> Result<String, WebError> {
    let opened = open_instance(blobs, instance)?;
    let mut json = dicom_json::to_value(&*opened.header)
        .map_err(|e| WebError::Internal(format!("DICOM JSON: {e}")))?;
    let bulk = |tag: &str| format!("{BASE_MARK}{}/bulkdata/{tag}", instance_path(instance));
    strip_group_lengths(&mut json);
    if let Some(map) = json.as_object_mut() {
        for (tag, element) in map.iter_mut() {
            let large = element
                .get("InlineBinary")
                .and_then(|b| b.as_str())
                .is_some_and(|b| b.len() * 3 / 4 > INLINE_LIMIT);
            if let (true, Some(fields)) = (large, element.as_object_mut()) {
                fields.remove("InlineBinary");
                fields.insert("BulkDataURI".into(), bulk(tag).into());
            }
        }
        if let Some(pixels) = opened.layout.iter().find(|e| e.tag == PIXEL_DATA) {
            let key = "7FE00010".to_owned();
            map.insert(
                key.clone(),
                serde_json::json!({ "vr": pixels.vr.to_string(), "BulkDataURI": bulk(&key) }),
            );
        }
    }
    Ok(json.to_string())
}

/// Drop Group Length elements (gggg,0000), in nested items too: they are
/// retired, describe an encoding the JSON does not have, and DICOM JSON
/// clients expect them absent.
fn strip_group_lengths(json: &mut serde_json::Value) {
    let Some(map) = json.as_object_mut() else {
        return;
    };
    map.retain(|tag, _| !(tag.len() == 8 && tag.ends_with("0000")));
    for element in map.values_mut() {
        if element.get("vr").and_then(|vr| vr.as_str()) != Some("SQ") {
            continue;
        }
        if let Some(items) = element.get_mut("Value").and_then(|v| v.as_array_mut()) {
            items.iter_mut().for_each(strip_group_lengths);
        }
    }
}

/// The metadata of `instances`, as one JSON array, for a client that
/// reaches us at `base`.
pub async fn json_array(
    app: &Arc<App>,
    instances: &[StoredInstance],
    base: &str,
) -> Result<String, WebError> {
    let ids: Vec<i64> = instances.iter().map(|i| i.id).collect();
    let mut cached: HashMap<i64, String> = app.index.cached_metadata(&ids).await?;
    let missing: Vec<StoredInstance> = instances
        .iter()
        .filter(|i| !cached.contains_key(&i.id))
        .cloned()
        .collect();
    if !missing.is_empty() {
        let blobs = Arc::clone(&app.blobs);
        let computed = tokio::task::spawn_blocking(move || {
            missing
                .iter()
                .map(|i| compute(&*blobs, i).map(|json| (i.id, json)))
                .collect::<Result<Vec<_>, WebError>>()
        })
        .await
        .map_err(|e| WebError::Internal(format!("metadata worker: {e}")))??;
        // Losing the cache only costs recomputation: a failed write is logged.
        if let Err(e) = app.index.cache_metadata(&computed).await {
            tracing::warn!(error = %e, "could not keep computed metadata");
        }
        cached.extend(computed);
    }
    let mut out = String::from("[");
    for (n, instance) in instances.iter().enumerate() {
        if n > 0 {
            out.push(',');
        }
        let json = cached
            .get(&instance.id)
            .ok_or_else(|| WebError::Internal("metadata missing after computing it".into()))?;
        out.push_str(&json.replace(BASE_MARK, &format!("{base}/")));
    }
    out.push(']');
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::strip_group_lengths;

    #[test]
    fn group_lengths_go_at_every_level() {
        let mut json = serde_json::json!({
            "00080000": {"vr": "UL", "Value": [42]},
            "00080016": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
            "00081140": {"vr": "SQ", "Value": [{
                "00080000": {"vr": "UL", "Value": [7]},
                "00081150": {"vr": "UI", "Value": ["1.2"]}
            }]}
        });
        strip_group_lengths(&mut json);
        assert_eq!(
            json,
            serde_json::json!({
                "00080016": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
                "00081140": {"vr": "SQ", "Value": [{
                    "00081150": {"vr": "UI", "Value": ["1.2"]}
                }]}
            })
        );
    }
}
