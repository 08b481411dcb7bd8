//! Prometheus metrics served at `/metrics`.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

/// The gateway's counters. Cheap to update from any task.
pub struct Metrics {
    registry: Registry,
    /// Associations by outcome (`accepted`, `rejected`, `busy`, `failed`).
    pub associations: Family<Labels, Counter>,
    /// Associations open right now.
    pub associations_active: Gauge,
    /// Instances stored, by source (`dimse`, `stow`, `import`) and outcome
    /// (`stored`, `duplicate`, `conflict`).
    pub instances: Family<Labels, Counter>,
    /// Data set bytes received, by source.
    pub bytes: Family<Labels, Counter>,
    /// Failed stores, by source and DICOM status (hex).
    pub failures: Family<Labels, Counter>,
    /// DICOMweb requests by resource (`studies`, `series`, `instances`,
    /// `metadata`, `frames`, `bulkdata`), method and HTTP status.
    pub dicomweb_requests: Family<Labels, Counter>,
    /// FHIR requests by interaction (`read`, `search-type`, `create`,
    /// `transaction`, ...), resource type and HTTP status.
    pub fhir_requests: Family<Labels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("konsil");
        let associations = Family::<Labels, Counter>::default();
        let associations_active = Gauge::default();
        let instances = Family::<Labels, Counter>::default();
        let bytes = Family::<Labels, Counter>::default();
        let failures = Family::<Labels, Counter>::default();
        let dicomweb_requests = Family::<Labels, Counter>::default();
        let fhir_requests = Family::<Labels, Counter>::default();
        registry.register(
            "fhir_requests",
            "FHIR requests by interaction, resource type and status",
            fhir_requests.clone(),
        );
        registry.register(
            "dicomweb_requests",
            "DICOMweb requests by resource, method and status",
            dicomweb_requests.clone(),
        );
        registry.register(
            "dimse_associations",
            "DIMSE associations by outcome",
            associations.clone(),
        );
        registry.register(
            "dimse_associations_active",
            "DIMSE associations open now",
            associations_active.clone(),
        );
        registry.register(
            "instances_received",
            "DICOM instances received by source and outcome",
            instances.clone(),
        );
        registry.register(
            "bytes_received",
            "DICOM data set bytes received by source",
            bytes.clone(),
        );
        registry.register(
            "store_failures",
            "Failed DICOM stores by source and status",
            failures.clone(),
        );
        Metrics {
            registry,
            associations,
            associations_active,
            instances,
            bytes,
            failures,
            dicomweb_requests,
            fhir_requests,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// One label pair, for the families above.
pub fn label(key: &'static str, value: impl Into<String>) -> (&'static str, String) {
    (key, value.into())
}
