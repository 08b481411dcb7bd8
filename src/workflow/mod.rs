//! The second-opinion workflow core: protocol-free. The FHIR and DICOM edges
//! drive it; it decides how a case moves.
//!
//! - [`case`]: the case state machine of `design.md`.
//! - [`completeness`]: which records a case still needs, by the rules in
//!   `profiles/completeness-rules.json`.

pub mod case;
pub mod completeness;
