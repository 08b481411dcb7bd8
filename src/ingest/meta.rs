//! The file meta information group (PS3.10 7.1) of a Part 10 object from
//! outside (a STOW-RS part, a file to import). dicom-object allocates an
//! element's declared length before it reads the value, so a 1 KiB body
//! claiming a 3 GiB value would cost 3 GiB of memory (found by the
//! `stow_multipart` fuzz target): every element's length is checked
//! against the bytes actually there before the group is handed over.

use dicom_core::header::{HasLength, Header};
use dicom_encoding::decode::explicit_le::ExplicitVRLittleEndianDecoder;
use dicom_encoding::decode::Decode;
use dicom_object::meta::FileMetaTable;

use super::IngestError;

/// A file meta group larger than this is refused (real ones are < 1 KiB).
pub const META_LIMIT: usize = 1024 * 1024;

/// Parse the group: `group` runs from `DICM` to the end the group length
/// announces.
pub fn parse(group: &[u8]) -> Result<FileMetaTable, IngestError> {
    check_lengths(group)?;
    FileMetaTable::from_reader(group)
        .map_err(|e| IngestError::Malformed(format!("unreadable file meta information: {e}")))
}

/// Every element of the group (explicit VR little endian) is complete
/// within `group`. The headers are read with the decoder dicom-object reads
/// them with, so both see the same lengths (an unknown VR, for one, has a
/// 4-byte length to both).
fn check_lengths(group: &[u8]) -> Result<(), IngestError> {
    let malformed = |why: String| IngestError::Malformed(format!("file meta information: {why}"));
    if group.len() > META_LIMIT + 4 {
        return Err(malformed(format!("larger than {META_LIMIT} bytes")));
    }
    let Some(elements) = group.strip_prefix(b"DICM") else {
        return Err(malformed("no DICM prefix".into()));
    };
    let decoder = ExplicitVRLittleEndianDecoder::default();
    let mut at = 0usize;
    while at < elements.len() {
        let mut rest = &elements[at..];
        let (header, header_len) = decoder.decode_header(&mut rest).map_err(|e| {
            malformed(format!(
                "the element header at byte {at} is unreadable: {e}"
            ))
        })?;
        let tag = header.tag();
        if tag.group() != 0x0002 {
            return Err(malformed(format!("element {tag} is outside group 0002")));
        }
        let Some(length) = header.length().get() else {
            return Err(malformed(format!("element {tag} has an undefined length")));
        };
        let available = elements.len() - at - header_len;
        if length as usize > available {
            return Err(malformed(format!(
                "element {tag} claims {length} bytes where {available} remain"
            )));
        }
        at += header_len + length as usize;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn element(element: u16, vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
        let mut out = vec![0x02, 0x00];
        out.extend_from_slice(&element.to_le_bytes());
        out.extend_from_slice(vr);
        if [b"OB", b"UN", b"UT"].contains(&vr) {
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        } else {
            out.extend_from_slice(&(value.len() as u16).to_le_bytes());
        }
        out.extend_from_slice(value);
        out
    }

    fn group(elements: &[Vec<u8>]) -> Vec<u8> {
        let body: Vec<u8> = elements.concat();
        let mut out = b"DICM".to_vec();
        out.extend(element(0x0000, b"UL", &(body.len() as u32).to_le_bytes()));
        out.extend(body);
        out
    }

    #[test]
    fn a_complete_group_parses() {
        let g = group(&[
            element(0x0001, b"OB", &[0, 1]),
            element(0x0002, b"UI", b"1.2.840.10008.5.1.4.1.1.7\0"),
            element(0x0003, b"UI", b"1.2.3.4\0"),
            element(0x0010, b"UI", b"1.2.840.10008.1.2.1\0"),
            element(0x0012, b"UI", b"1.2.3\0"),
        ]);
        let meta = parse(&g).unwrap();
        assert_eq!(meta.media_storage_sop_instance_uid(), "1.2.3.4");
    }

    #[test]
    fn a_length_past_the_end_is_refused_before_any_allocation() {
        let mut g = group(&[element(0x0002, b"UI", b"1.2.3\0")]);
        // (0002,0012) OB claiming 3.5 GB, with 4 bytes present.
        g.extend_from_slice(&[0x02, 0x00, 0x12, 0x00, b'O', b'B', 0, 0]);
        g.extend_from_slice(&0xD1CE_FFE3u32.to_le_bytes());
        g.extend_from_slice(b"1.2.");
        let err = parse(&g).unwrap_err().to_string();
        assert!(
            err.contains("claims 3520004067 bytes where 4 remain"),
            "{err}"
        );
    }

    #[test]
    fn garbage_vrs_other_groups_and_cut_headers_are_refused() {
        let mut bad_vr = group(&[]);
        bad_vr.extend_from_slice(&[0x02, 0x00, 0x12, 0x00, 0xAB, 0xB6, 0xE3, 0xFF]);
        assert!(parse(&bad_vr)
            .unwrap_err()
            .to_string()
            .contains("unreadable"));
        let mut other_group = group(&[]);
        other_group.extend(element(0x0010, b"UI", b"1.2\0"));
        let start = other_group.len() - 12;
        other_group[start] = 0x08;
        assert!(parse(&other_group)
            .unwrap_err()
            .to_string()
            .contains("outside group 0002"));
        let mut cut = group(&[]);
        cut.extend_from_slice(&[0x02, 0x00, 0x01]);
        assert!(parse(&cut).unwrap_err().to_string().contains("unreadable"));
    }
}
