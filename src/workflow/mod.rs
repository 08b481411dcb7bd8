//! The second-opinion workflow core: protocol-free. The FHIR and DICOM edges
//! drive it; it decides how a case moves.
//!
//! - [`case`]: the case state machine of `design.md`.

pub mod case;
