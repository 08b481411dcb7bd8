//! The second-opinion workflow core: protocol-free. The FHIR and DICOM edges
//! drive it; it decides how a case moves.
//!
//! - [`case`]: the case state machine of `design.md`.
//! - [`completeness`]: which records a case still needs, by the rules in
//!   `profiles/completeness-rules.json`.
//! - [`build`]: the resources it creates, built with fhir-sdk.
//! - [`task`]: the case read from and written to its FHIR `Task`.
//! - [`engine`]: the steps (intake, checks, reconciliation, assignment,
//!   approval, follow-up) on stored records.
//! - [`imaging`]: a received study as the DICOM index knows it.
//! - [`records`]: the storage port the steps run on.
//! - [`retention`]: discarding the records of inactive cases.
//! - [`runner`]: the background work (study arrivals, timers).
//! - [`pdf`]: the approved opinion as a PDF.

pub mod build;
pub mod case;
pub mod completeness;
pub mod engine;
pub mod imaging;
pub mod pdf;
pub mod records;
pub mod retention;
pub mod runner;
pub mod task;
