//! Reading and checking the header of a received instance: everything up to
//! (not into) the first element at or after group 0x0029, which is past every
//! attribute the index needs and before Pixel Data, encapsulated documents,
//! overlays and waveforms, so memory stays small whatever the instance size.

use std::io::Read;

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_object::file::ReadPreamble;
use dicom_object::{DefaultDicomObject, OpenFileOptions};

use super::{Declared, IngestError};
use crate::ids::Uid;
use crate::store::InstanceAttributes;

/// Stop reading here: every indexed attribute sorts before this tag.
const READ_UNTIL: Tag = Tag(0x0029, 0x0000);

/// At most this many bytes are read to find the header; a data set whose
/// elements before (0029,0000) are larger is refused rather than buffered.
pub const HEADER_LIMIT: u64 = 64 * 1024 * 1024;

/// The identifying UIDs and indexed attributes of an instance.
#[derive(Debug, Clone)]
pub struct Header {
    pub study_uid: Uid,
    pub series_uid: Uid,
    pub attributes: InstanceAttributes,
}

/// Parse the Part 10 stream `file` (preamble, meta, data set) and check it
/// against what the sender declared. (Lookups use `get`, not `element_opt`:
/// the latter builds an error, with a captured backtrace, for every absent
/// attribute, which cost more than the rest of the parse.)
pub fn read_and_check(file: impl Read, declared: &Declared) -> Result<Header, IngestError> {
    let obj = OpenFileOptions::new()
        .read_preamble(ReadPreamble::Always)
        .read_until(READ_UNTIL)
        .from_reader(file.take(HEADER_LIMIT))
        .map_err(|e| IngestError::Malformed(format!("cannot parse data set: {e}")))?;
    check(&obj, declared)
}

fn check(obj: &DefaultDicomObject, declared: &Declared) -> Result<Header, IngestError> {
    let sop_class = required_uid(obj, tags::SOP_CLASS_UID, "SOPClassUID")?;
    if sop_class != declared.sop_class {
        return Err(IngestError::Mismatch(format!(
            "SOPClassUID in data set ({sop_class}) differs from the request ({})",
            declared.sop_class
        )));
    }
    let sop_instance = required_uid(obj, tags::SOP_INSTANCE_UID, "SOPInstanceUID")?;
    if sop_instance != declared.sop_instance {
        return Err(IngestError::Mismatch(format!(
            "SOPInstanceUID in data set ({sop_instance}) differs from the request ({})",
            declared.sop_instance
        )));
    }
    let study_uid = required_uid(obj, tags::STUDY_INSTANCE_UID, "StudyInstanceUID")?;
    if let Some(expected) = &declared.study {
        if study_uid != *expected {
            return Err(IngestError::StudyMismatch(format!(
                "StudyInstanceUID in data set ({study_uid}) differs from the study in the request ({expected})"
            )));
        }
    }
    let series_uid = required_uid(obj, tags::SERIES_INSTANCE_UID, "SeriesInstanceUID")?;

    let attributes = InstanceAttributes {
        patient_name: text(obj, tags::PATIENT_NAME),
        patient_id: text(obj, tags::PATIENT_ID),
        issuer_of_patient_id: text(obj, tags::ISSUER_OF_PATIENT_ID),
        patient_birth_date: text(obj, tags::PATIENT_BIRTH_DATE),
        patient_sex: text(obj, tags::PATIENT_SEX),
        study_date: text(obj, tags::STUDY_DATE),
        study_time: text(obj, tags::STUDY_TIME),
        accession_number: text(obj, tags::ACCESSION_NUMBER),
        referring_physician_name: text(obj, tags::REFERRING_PHYSICIAN_NAME),
        study_id: text(obj, tags::STUDY_ID),
        study_description: text(obj, tags::STUDY_DESCRIPTION),
        modality: text(obj, tags::MODALITY),
        series_number: int(obj, tags::SERIES_NUMBER),
        series_description: text(obj, tags::SERIES_DESCRIPTION),
        series_date: text(obj, tags::SERIES_DATE),
        series_time: text(obj, tags::SERIES_TIME),
        body_part_examined: text(obj, tags::BODY_PART_EXAMINED),
        instance_number: int(obj, tags::INSTANCE_NUMBER),
        rows: int(obj, tags::ROWS),
        columns: int(obj, tags::COLUMNS),
        number_of_frames: int(obj, tags::NUMBER_OF_FRAMES),
        specific_character_set: obj
            .get(tags::SPECIFIC_CHARACTER_SET)
            .and_then(|e| e.to_multi_str().ok())
            .map(|v| v.join("\\")),
    };
    Ok(Header {
        study_uid,
        series_uid,
        attributes,
    })
}

fn required_uid(obj: &DefaultDicomObject, tag: Tag, name: &str) -> Result<Uid, IngestError> {
    let raw = obj
        .get(tag)
        .and_then(|e| e.to_str().ok())
        .ok_or_else(|| IngestError::MissingAttribute(format!("{name} {tag} is missing")))?;
    if raw.trim_end_matches(['\0', ' ']).is_empty() {
        return Err(IngestError::MissingAttribute(format!(
            "{name} {tag} is empty"
        )));
    }
    Uid::parse(&raw).map_err(|e| IngestError::InvalidUid(format!("{name}: {e}")))
}

fn text(obj: &DefaultDicomObject, tag: Tag) -> Option<String> {
    let value = obj.get(tag)?.to_str().ok()?;
    let value = value.trim_end_matches(['\0', ' ']).trim_start();
    (!value.is_empty()).then(|| value.to_owned())
}

fn int(obj: &DefaultDicomObject, tag: Tag) -> Option<i64> {
    obj.get(tag)?.to_int::<i64>().ok()
}
