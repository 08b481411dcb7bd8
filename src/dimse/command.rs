//! DIMSE command sets (PS3.7 §9.3, §E): parsed from and written to Implicit
//! VR Little Endian, as the standard requires for commands.

use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN;

/// C-STORE-RQ.
pub const C_STORE_RQ: u16 = 0x0001;
/// C-ECHO-RQ.
pub const C_ECHO_RQ: u16 = 0x0030;
/// The CommandDataSetType value meaning "no data set follows".
const NO_DATA_SET: u16 = 0x0101;

/// The parts of a request command we act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub command_field: u16,
    pub message_id: u16,
    pub affected_sop_class: Option<String>,
    pub affected_sop_instance: Option<String>,
    /// Whether a data set follows the command.
    pub has_data_set: bool,
}

/// Parse a request command set.
pub fn parse_request(bytes: &[u8]) -> Result<Request, String> {
    let obj = InMemDicomObject::read_dataset_with_ts(bytes, &IMPLICIT_VR_LITTLE_ENDIAN.erased())
        .map_err(|e| format!("cannot parse command set: {e}"))?;
    let u16_of = |tag: Tag| -> Option<u16> { obj.get(tag).and_then(|e| e.to_int::<u16>().ok()) };
    let str_of = |tag: Tag| -> Option<String> {
        obj.get(tag)
            .and_then(|e| e.to_str().ok())
            .map(|s| s.trim_end_matches(['\0', ' ']).to_owned())
    };
    let command_field = u16_of(tags::COMMAND_FIELD).ok_or("command set without CommandField")?;
    let message_id = u16_of(tags::MESSAGE_ID).ok_or("command set without MessageID")?;
    let data_set_type =
        u16_of(tags::COMMAND_DATA_SET_TYPE).ok_or("command set without CommandDataSetType")?;
    Ok(Request {
        command_field,
        message_id,
        affected_sop_class: str_of(tags::AFFECTED_SOP_CLASS_UID),
        affected_sop_instance: str_of(tags::AFFECTED_SOP_INSTANCE_UID),
        has_data_set: data_set_type != NO_DATA_SET,
    })
}

/// Encode the response to `request` with `status` and an optional error
/// comment (cut to the 64 characters of VR LO).
pub fn response(request: &Request, status: u16, comment: Option<&str>) -> Vec<u8> {
    let mut elements = Vec::with_capacity(8);
    if let Some(class) = &request.affected_sop_class {
        elements.push(DataElement::new(
            tags::AFFECTED_SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from(class.as_str()),
        ));
    }
    elements.push(DataElement::new(
        tags::COMMAND_FIELD,
        VR::US,
        PrimitiveValue::from(request.command_field | 0x8000),
    ));
    elements.push(DataElement::new(
        tags::MESSAGE_ID_BEING_RESPONDED_TO,
        VR::US,
        PrimitiveValue::from(request.message_id),
    ));
    elements.push(DataElement::new(
        tags::COMMAND_DATA_SET_TYPE,
        VR::US,
        PrimitiveValue::from(NO_DATA_SET),
    ));
    elements.push(DataElement::new(
        tags::STATUS,
        VR::US,
        PrimitiveValue::from(status),
    ));
    if let Some(comment) = comment {
        let cut: String = comment
            .chars()
            .filter(|c| *c != '\\' && !c.is_control())
            .take(64)
            .collect();
        elements.push(DataElement::new(
            tags::ERROR_COMMENT,
            VR::LO,
            PrimitiveValue::from(cut),
        ));
    }
    if let Some(instance) = &request.affected_sop_instance {
        elements.push(DataElement::new(
            tags::AFFECTED_SOP_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from(instance.as_str()),
        ));
    }
    let body = encode(elements.clone());
    let mut with_length = vec![DataElement::new(
        tags::COMMAND_GROUP_LENGTH,
        VR::UL,
        PrimitiveValue::from(u32::try_from(body.len()).unwrap_or(u32::MAX)),
    )];
    with_length.extend(elements);
    encode(with_length)
}

fn encode(elements: Vec<DataElement<InMemDicomObject>>) -> Vec<u8> {
    let obj = InMemDicomObject::from_element_iter(elements);
    let mut out = Vec::with_capacity(256);
    // Writing a handful of command elements to a Vec cannot fail; should it,
    // the empty command makes the peer abort, which is the safe outcome.
    if obj
        .write_dataset_with_ts(&mut out, &IMPLICIT_VR_LITTLE_ENDIAN.erased())
        .is_err()
    {
        out.clear();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_round_trips_and_carries_group_length() {
        let request = Request {
            command_field: C_STORE_RQ,
            message_id: 7,
            affected_sop_class: Some("1.2.840.10008.5.1.4.1.1.2".into()),
            affected_sop_instance: Some("1.2.3.4".into()),
            has_data_set: true,
        };
        let bytes = response(&request, 0xA900, Some(&"x".repeat(100)));
        let obj =
            InMemDicomObject::read_dataset_with_ts(&bytes[..], &IMPLICIT_VR_LITTLE_ENDIAN.erased())
                .unwrap();
        let group_length = obj
            .element(tags::COMMAND_GROUP_LENGTH)
            .unwrap()
            .to_int::<u32>()
            .unwrap();
        assert_eq!(group_length as usize, bytes.len() - 12);
        assert_eq!(
            obj.element(tags::COMMAND_FIELD)
                .unwrap()
                .to_int::<u16>()
                .unwrap(),
            0x8001
        );
        assert_eq!(
            obj.element(tags::STATUS).unwrap().to_int::<u16>().unwrap(),
            0xA900
        );
        assert_eq!(
            obj.element(tags::MESSAGE_ID_BEING_RESPONDED_TO)
                .unwrap()
                .to_int::<u16>()
                .unwrap(),
            7
        );
        let comment = obj.element(tags::ERROR_COMMENT).unwrap().to_str().unwrap();
        assert!(comment.trim_end().len() <= 64);

        assert_eq!(
            obj.element(tags::COMMAND_DATA_SET_TYPE)
                .unwrap()
                .to_int::<u16>()
                .unwrap(),
            0x0101
        );
        // A response is not a request: it has no MessageID.
        assert!(parse_request(&bytes).is_err());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(parse_request(&[0xff; 10]).is_err());
        assert!(parse_request(&[]).is_err());
    }
}
