//! Response data sets (STOW-RS results, QIDO-RS matches) built as DICOM
//! objects and written as DICOM JSON (PS3.18 Annex F, by dicom-json) or as
//! the Native DICOM Model XML (PS3.19 Annex A).

use dicom_core::header::Header;
use dicom_core::value::{DataSetSequence, PrimitiveValue, Value};
use dicom_core::{DataDictionary, DataElement, Tag, VR};
use dicom_dictionary_std::StandardDataDictionary;
use dicom_object::InMemDicomObject;

use super::WebError;

/// An element from text as stored in the index (multiple values separated
/// by backslashes), typed by `vr`.
pub fn text_element(tag: Tag, vr: VR, raw: &str) -> DataElement<InMemDicomObject> {
    if matches!(vr, VR::IS | VR::US | VR::UL | VR::SL | VR::SS) {
        // DICOM JSON numbers (PS3.18 F.2.3), not strings.
        let numbers: Option<Vec<i64>> = raw.split('\\').map(|v| v.trim().parse().ok()).collect();
        if let Some(numbers) = numbers {
            return DataElement::new(tag, vr, PrimitiveValue::I64(numbers.into()));
        }
    }
    let values: Vec<String> = raw.split('\\').map(str::to_owned).collect();
    DataElement::new(tag, vr, PrimitiveValue::Strs(values.into()))
}

/// A UI element, empty when the UID is unknown.
pub fn uid_element(tag: Tag, uid: Option<&str>) -> DataElement<InMemDicomObject> {
    match uid {
        Some(uid) => DataElement::new(tag, VR::UI, PrimitiveValue::from(uid)),
        None => DataElement::new(tag, VR::UI, PrimitiveValue::Empty),
    }
}

pub fn sequence(tag: Tag, items: Vec<InMemDicomObject>) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, VR::SQ, DataSetSequence::from(items))
}

/// DICOM JSON of one data set.
pub fn json_object(obj: &InMemDicomObject) -> Result<String, WebError> {
    dicom_json::to_string(obj).map_err(|e| WebError::Internal(format!("DICOM JSON: {e}")))
}

/// DICOM JSON of a list of data sets.
pub fn json_array(objs: &[InMemDicomObject]) -> Result<String, WebError> {
    dicom_json::to_string(objs).map_err(|e| WebError::Internal(format!("DICOM JSON: {e}")))
}

/// The Native DICOM Model XML of one data set.
pub fn xml(obj: &InMemDicomObject) -> String {
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    out.push_str("<NativeDicomModel xmlns=\"http://dicom.nema.org/PS3.19/models/NativeDICOM\">\n");
    write_xml(obj, &mut out);
    out.push_str("</NativeDicomModel>\n");
    out
}

fn write_xml(obj: &InMemDicomObject, out: &mut String) {
    for element in obj {
        let tag = element.tag();
        let vr = element.vr();
        let keyword = StandardDataDictionary
            .by_tag(tag)
            .map(|e| format!(" keyword=\"{}\"", e.alias))
            .unwrap_or_default();
        out.push_str(&format!(
            "<DicomAttribute tag=\"{:04X}{:04X}\" vr=\"{}\"{keyword}>",
            tag.group(),
            tag.element(),
            vr
        ));
        match element.value() {
            Value::Sequence(seq) => {
                for (n, item) in seq.items().iter().enumerate() {
                    out.push_str(&format!("<Item number=\"{}\">", n + 1));
                    write_xml(item, out);
                    out.push_str("</Item>");
                }
            }
            Value::Primitive(PrimitiveValue::Empty) | Value::PixelSequence(_) => {}
            Value::Primitive(value) => {
                for (n, text) in value.to_multi_str().iter().enumerate() {
                    if vr == VR::PN {
                        out.push_str(&format!("<PersonName number=\"{}\"><Alphabetic>", n + 1));
                        let names = [
                            "FamilyName",
                            "GivenName",
                            "MiddleName",
                            "NamePrefix",
                            "NameSuffix",
                        ];
                        let alphabetic = text.split('=').next().unwrap_or_default();
                        for (part, name) in alphabetic.split('^').zip(names) {
                            out.push_str(&format!("<{name}>{}</{name}>", escape(part)));
                        }
                        out.push_str("</Alphabetic></PersonName>");
                    } else {
                        out.push_str(&format!(
                            "<Value number=\"{}\">{}</Value>",
                            n + 1,
                            escape(text)
                        ));
                    }
                }
            }
        }
        out.push_str("</DicomAttribute>\n");
    }
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_dictionary_std::tags;

    #[test]
    fn json_follows_ps3_18_annex_f() {
        let obj = InMemDicomObject::from_element_iter([
            text_element(tags::PATIENT_NAME, VR::PN, "Doe^Jane"),
            text_element(tags::MODALITIES_IN_STUDY, VR::CS, "CT\\MR"),
            text_element(tags::NUMBER_OF_STUDY_RELATED_INSTANCES, VR::IS, "12"),
            uid_element(tags::REFERENCED_SOP_CLASS_UID, None),
        ]);
        let v: serde_json::Value = serde_json::from_str(&json_object(&obj).unwrap()).unwrap();
        assert_eq!(v["00100010"]["Value"][0]["Alphabetic"], "Doe^Jane");
        assert_eq!(v["00080061"]["Value"], serde_json::json!(["CT", "MR"]));
        assert_eq!(v["00201208"]["Value"][0], 12);
        assert_eq!(v["00081150"], serde_json::json!({"vr": "UI"}));
    }

    #[test]
    fn xml_escapes_and_numbers_items() {
        let item = InMemDicomObject::from_element_iter([DataElement::new(
            tags::RETRIEVE_URL,
            VR::UR,
            PrimitiveValue::from("http://h/a?b=1&c=2"),
        )]);
        let obj = InMemDicomObject::from_element_iter([sequence(
            tags::REFERENCED_SOP_SEQUENCE,
            vec![item],
        )]);
        let x = xml(&obj);
        assert!(x.contains("<DicomAttribute tag=\"00081199\" vr=\"SQ\" keyword=\"ReferencedSOPSequence\"><Item number=\"1\">"), "{x}");
        assert!(x.contains("b=1&amp;c=2"), "{x}");
    }
}
