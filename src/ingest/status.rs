//! The one place where ingest errors become DICOM storage statuses (PS3.4
//! Annex B.2.3): the C-STORE response status, and the same codes as a STOW-RS
//! FailureReason (PS3.18 Table 10.5.3-3). The DICOM Conformance Statement
//! lists the same table.

use crate::ingest::IngestError;

pub const SUCCESS: u16 = 0x0000;
/// Refused: SOP Class not supported.
pub const SOP_CLASS_NOT_SUPPORTED: u16 = 0x0122;
/// Refused: out of resources (storage failure).
pub const OUT_OF_RESOURCES: u16 = 0xA700;
/// Error: data set does not match SOP Class (or the command's UIDs).
pub const DATA_SET_MISMATCH: u16 = 0xA900;
/// Error: cannot understand (the data set cannot be parsed).
pub const CANNOT_UNDERSTAND: u16 = 0xC000;
/// Error: cannot understand, a UID value is invalid.
pub const INVALID_UID: u16 = 0xC001;
/// Processing failure.
pub const PROCESSING_FAILURE: u16 = 0x0110;
/// Unrecognized operation (a DIMSE service we do not provide).
pub const UNRECOGNIZED_OPERATION: u16 = 0x0211;

/// Status and error comment for a failed store. Storage and internal
/// failures get a generic comment: the detail goes to our log, not to the peer.
pub fn for_ingest_error(err: &IngestError) -> (u16, String) {
    match err {
        IngestError::Malformed(m) => (CANNOT_UNDERSTAND, m.clone()),
        IngestError::InvalidUid(m) => (INVALID_UID, m.clone()),
        IngestError::Mismatch(m) | IngestError::MissingAttribute(m) => {
            (DATA_SET_MISMATCH, m.clone())
        }
        IngestError::Blob(_) | IngestError::Index(_) | IngestError::Aborted => (
            OUT_OF_RESOURCES,
            "storage failure at the receiver; retry later".into(),
        ),
        IngestError::StudyMismatch(m) => (PROCESSING_FAILURE, m.clone()),
        IngestError::Internal => (PROCESSING_FAILURE, "internal error at the receiver".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::BlobError;

    #[test]
    fn status_table() {
        let cases = [
            (IngestError::Malformed("x".into()), 0xC000),
            (IngestError::InvalidUid("x".into()), 0xC001),
            (IngestError::Mismatch("x".into()), 0xA900),
            (IngestError::MissingAttribute("x".into()), 0xA900),
            (
                IngestError::Blob(BlobError::Write(std::io::Error::other("disk full"))),
                0xA700,
            ),
            (IngestError::StudyMismatch("x".into()), 0x0110),
            (IngestError::Internal, 0x0110),
        ];
        for (err, status) in cases {
            assert_eq!(for_ingest_error(&err).0, status, "{err:?}");
        }
        let (_, comment) = for_ingest_error(&IngestError::Blob(BlobError::Write(
            std::io::Error::other("/secret/path"),
        )));
        assert!(
            !comment.contains("/secret"),
            "no internals leak to the peer"
        );
    }
}
