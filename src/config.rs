//! Configuration: built-in defaults, then the `konsil.toml` file, then
//! `KONSIL_<KEY>` environment variables, then command-line flags.
//!
//! Every key and its default is documented in the README ("Configuration").

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::auth::scope::Scopes;
use crate::ids::{AeTitle, IdError, PartnerId};

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {source}")]
    ParseFile {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("{key} = {value:?} is not valid: {reason}")]
    Value {
        key: String,
        value: String,
        reason: String,
    },
    #[error("partner {partner}: {source}")]
    Partner { partner: String, source: IdError },
    #[error("{0}")]
    Conflict(String),
}

/// The `[server]` section.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where the index database and the blobs live.
    pub data_dir: PathBuf,
    /// Plain HTTP listen address (FHIR, DICOMweb, health, metrics); `None`
    /// (`http = ""`) switches plain HTTP off.
    pub http: Option<SocketAddr>,
    /// HTTPS listen address (the same services over TLS); needs `[tls]`.
    pub https: Option<SocketAddr>,
    /// Plain DICOM DIMSE listen address; `None` (`dicom = ""`) switches it off.
    pub dicom: Option<SocketAddr>,
    /// DICOM TLS listen address (PS3.15 Annex B); needs `[tls]`.
    pub dicom_tls: Option<SocketAddr>,
    /// Our AE title; associations calling another title are rejected.
    pub ae_title: AeTitle,
    /// Concurrent associations; over the cap a caller gets a transient rejection.
    pub max_associations: usize,
    /// An association with no PDU for this long is aborted.
    pub idle_timeout_secs: u64,
    /// Maximum PDU length we announce and accept.
    pub max_pdu: u32,
    /// Accept storage of SOP classes the standard dictionary does not know.
    pub accept_unknown_sop_classes: bool,
    /// How long shutdown waits for in-flight associations.
    pub shutdown_grace_secs: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            data_dir: PathBuf::from("./konsil-data"),
            http: Some(SocketAddr::from(([127, 0, 0, 1], 8080))),
            https: None,
            dicom: Some(SocketAddr::from(([127, 0, 0, 1], 11112))),
            dicom_tls: None,
            ae_title: AeTitle::parse("KONSIL").expect("constant AE title is valid"),
            max_associations: 32,
            idle_timeout_secs: 120,
            max_pdu: 262_144,
            accept_unknown_sop_classes: false,
            shutdown_grace_secs: 30,
        }
    }
}

impl ServerConfig {
    /// Our own base URL when nothing better is known: HTTPS if it is on.
    pub fn own_url(&self) -> String {
        match (self.https, self.http) {
            (Some(addr), _) => format!("https://{addr}"),
            (None, Some(addr)) => format!("http://{addr}"),
            // Configuration loading refuses to have neither.
            (None, None) => "http://127.0.0.1".to_owned(),
        }
    }
}

/// A referring organisation.
#[derive(Debug, Clone)]
pub struct Partner {
    pub id: PartnerId,
    pub name: String,
    /// Calling AE titles this partner's systems use.
    pub ae_titles: Vec<AeTitle>,
    /// The partner's registered SMART backend-services clients.
    pub clients: Vec<ClientRegistration>,
    /// Subjects (RFC 4514, normalised) of the TLS client certificates that
    /// speak for this partner.
    pub certificate_subjects: Vec<String>,
    /// HTTP requests a minute this partner's systems may make (over it:
    /// 429 with Retry-After); `None`: no limit.
    pub requests_per_minute: Option<u32>,
    /// Associations this partner may have open at once (within
    /// `server.max_associations`); `None`: no limit of its own.
    pub max_associations: Option<usize>,
    /// The identifier system of the patient IDs its PACS sends without an
    /// Issuer of Patient ID (its local record numbers); `None`: such a
    /// study is never matched to a case by its patient.
    pub patient_id_system: Option<String>,
}

/// The `[tls]` section: the server's certificate and key, and the CA of the
/// partners' client certificates (mutual TLS). Paths are taken from the
/// config file's folder.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsConfig {
    /// PEM certificate chain, the server's own first.
    pub certificate: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub private_key: PathBuf,
    /// PEM CA certificate(s) the partners' client certificates are issued
    /// by; turns mutual TLS on.
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTls {
    certificate: Option<PathBuf>,
    private_key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
}

impl FileTls {
    /// `KONSIL_TLS_<KEY>` variables replace file values.
    fn resolve(
        mut self,
        env: &HashMap<String, String>,
        base: &Path,
    ) -> Result<Option<TlsConfig>, ConfigError> {
        let get = |key: &str| {
            env.get(&format!("KONSIL_TLS_{}", key.to_uppercase()))
                .map(|v| Some(PathBuf::from(v)).filter(|p| !p.as_os_str().is_empty()))
        };
        if let Some(v) = get("certificate") {
            self.certificate = v;
        }
        if let Some(v) = get("private_key") {
            self.private_key = v;
        }
        if let Some(v) = get("client_ca") {
            self.client_ca = v;
        }
        match (self.certificate, self.private_key) {
            (None, None) if self.client_ca.is_none() => Ok(None),
            (Some(certificate), Some(private_key)) => Ok(Some(TlsConfig {
                certificate: base.join(certificate),
                private_key: base.join(private_key),
                client_ca: self.client_ca.map(|p| base.join(p)),
            })),
            _ => Err(ConfigError::Conflict(
                "[tls] needs both certificate and private_key".into(),
            )),
        }
    }
}

/// A partner's system registered for SMART Backend Services
/// (`[[partners.clients]]`).
#[derive(Debug, Clone)]
pub struct ClientRegistration {
    pub client_id: String,
    /// The public keys its client assertions are signed with.
    pub jwks: jsonwebtoken::jwk::JwkSet,
    /// The most this client may be granted.
    pub scopes: Scopes,
}

/// The `[auth]` section: Konsil as the SMART Backend Services
/// authorisation server, and how staff tokens are checked.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// PEM (PKCS#8) P-384 private key Konsil signs access tokens with; by
    /// default `<data_dir>/auth/signing-key.pem`, created at first start.
    /// Gateway nodes that share a database must share this key.
    pub signing_key: Option<PathBuf>,
    /// The token endpoint's URL as clients reach it: the `aud` their client
    /// assertions must carry. By default `http://<Host header>/auth/token`.
    pub token_url: Option<String>,
    /// Lifetime of the access tokens `/auth/token` issues.
    pub access_token_secs: u64,
    /// Longest a client assertion may live (`exp` - now); SMART says 5 min.
    pub max_assertion_secs: u64,
    /// An OpenID Connect issuer whose tokens staff sign in with (`iss`).
    pub staff_issuer: Option<String>,
    /// That issuer's public keys (a JWKS file); without it they are
    /// discovered from the issuer (`/.well-known/openid-configuration`).
    pub staff_jwks_file: Option<PathBuf>,
    /// The `aud` that issuer puts in tokens meant for Konsil.
    pub staff_audience: Option<String>,
    /// The claim holding the staff member's Konsil roles.
    pub staff_roles_claim: String,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            signing_key: None,
            token_url: None,
            access_token_secs: 300,
            max_assertion_secs: 300,
            staff_issuer: None,
            staff_jwks_file: None,
            staff_audience: None,
            staff_roles_claim: "roles".to_owned(),
        }
    }
}

impl AuthConfig {
    /// `KONSIL_AUTH_<KEY>` variables replace file values; relative paths are
    /// taken from `base` (the config file's folder).
    fn apply_env(&mut self, env: &HashMap<String, String>, base: &Path) -> Result<(), ConfigError> {
        let get = |key: &str| env.get(&format!("KONSIL_AUTH_{}", key.to_uppercase()));
        if let Some(v) = get("signing_key") {
            self.signing_key = Some(PathBuf::from(v)).filter(|p| !p.as_os_str().is_empty());
        }
        if let Some(v) = get("token_url") {
            self.token_url = Some(v.clone()).filter(|v| !v.is_empty());
        }
        if let Some(v) = get("access_token_secs") {
            self.access_token_secs = parse_value("auth.access_token_secs", v)?;
        }
        if let Some(v) = get("max_assertion_secs") {
            self.max_assertion_secs = parse_value("auth.max_assertion_secs", v)?;
        }
        if let Some(v) = get("staff_issuer") {
            self.staff_issuer = Some(v.clone()).filter(|v| !v.is_empty());
        }
        if let Some(v) = get("staff_jwks_file") {
            self.staff_jwks_file = Some(PathBuf::from(v)).filter(|p| !p.as_os_str().is_empty());
        }
        if let Some(v) = get("staff_audience") {
            self.staff_audience = Some(v.clone()).filter(|v| !v.is_empty());
        }
        if let Some(v) = get("staff_roles_claim") {
            self.staff_roles_claim = v.clone();
        }
        if self.max_assertion_secs > 300 {
            return Err(value_error(
                "auth.max_assertion_secs",
                &self.max_assertion_secs.to_string(),
                "SMART Backend Services allows a client assertion at most 300 s (five minutes) of life",
            ));
        }
        if self.access_token_secs == 0 || self.max_assertion_secs == 0 {
            return Err(value_error(
                "auth.access_token_secs",
                "0",
                "token lifetimes must be at least 1 second",
            ));
        }
        if self.staff_issuer.is_some() && self.staff_audience.is_none() {
            // An identity provider issues tokens for many applications;
            // without the audience, a token meant for any of them would
            // open Konsil.
            return Err(ConfigError::Conflict(
                "auth.staff_issuer needs auth.staff_audience: the aud its tokens for Konsil \
                 carry (tokens the issuer made for other applications must not open Konsil)"
                    .into(),
            ));
        }
        if self.staff_jwks_file.is_some() && self.staff_issuer.is_none() {
            return Err(ConfigError::Conflict(
                "auth.staff_jwks_file holds the keys of auth.staff_issuer: set that too".into(),
            ));
        }
        self.signing_key = self.signing_key.take().map(|p| base.join(p));
        self.staff_jwks_file = self.staff_jwks_file.take().map(|p| base.join(p));
        Ok(())
    }
}

/// The `[dicomweb]` section.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DicomwebConfig {
    /// The DICOMweb base URL as clients reach it (behind a proxy), used in
    /// RetrieveURL and BulkDataURI; by default `http://<Host header>/dicomweb`.
    pub public_url: Option<String>,
    /// Largest STOW-RS request body in bytes; none by default.
    pub max_request_bytes: Option<u64>,
    /// Largest single STOW-RS part in bytes; none by default.
    pub max_part_bytes: Option<u64>,
    /// Most QIDO-RS results in one answer (also the default `limit`).
    pub max_results: u32,
    /// Origins allowed by CORS (`["*"]` for any); empty turns CORS off.
    pub cors_origins: Vec<String>,
}

impl Default for DicomwebConfig {
    fn default() -> Self {
        DicomwebConfig {
            public_url: None,
            max_request_bytes: None,
            max_part_bytes: None,
            max_results: 1000,
            cors_origins: Vec::new(),
        }
    }
}

impl DicomwebConfig {
    /// `KONSIL_DICOMWEB_<KEY>` variables replace file values.
    fn apply_env(&mut self, env: &HashMap<String, String>) -> Result<(), ConfigError> {
        let get = |key: &str| env.get(&format!("KONSIL_DICOMWEB_{}", key.to_uppercase()));
        if let Some(v) = get("public_url") {
            self.public_url = Some(v.clone()).filter(|v| !v.is_empty());
        }
        if let Some(v) = get("max_request_bytes") {
            self.max_request_bytes = Some(parse_value("dicomweb.max_request_bytes", v)?);
        }
        if let Some(v) = get("max_part_bytes") {
            self.max_part_bytes = Some(parse_value("dicomweb.max_part_bytes", v)?);
        }
        if let Some(v) = get("max_results") {
            self.max_results = parse_value("dicomweb.max_results", v)?;
        }
        if let Some(v) = get("cors_origins") {
            self.cors_origins = v
                .split(',')
                .map(|o| o.trim().to_owned())
                .filter(|o| !o.is_empty())
                .collect();
        }
        if self.max_results == 0 {
            return Err(value_error(
                "dicomweb.max_results",
                "0",
                "must be at least 1",
            ));
        }
        if let Some(url) = &self.public_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(value_error(
                    "dicomweb.public_url",
                    url,
                    "must start with http:// or https://",
                ));
            }
        }
        Ok(())
    }
}

/// The `[fhir]` section.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FhirConfig {
    /// The FHIR base URL as clients reach it (behind a proxy), used in
    /// Location headers, fullUrl and paging links; by default
    /// `http://<Host header>/fhir`.
    pub public_url: Option<String>,
    /// Search page size when the client gives no `_count`.
    pub default_page_size: u32,
    /// Largest `_count` honoured (larger asks are cut to it).
    pub max_page_size: u32,
    /// Largest FHIR JSON request body in bytes (a resource or a Bundle,
    /// inline base64 attachments included). Raw `Binary` uploads stream and
    /// are not bound by it.
    pub max_resource_bytes: u64,
    /// Largest raw `Binary` upload in bytes; none by default (it streams).
    pub max_binary_bytes: Option<u64>,
}

impl Default for FhirConfig {
    fn default() -> Self {
        FhirConfig {
            public_url: None,
            default_page_size: 50,
            max_page_size: 1000,
            max_resource_bytes: 64 * 1024 * 1024,
            max_binary_bytes: None,
        }
    }
}

impl FhirConfig {
    /// `KONSIL_FHIR_<KEY>` variables replace file values.
    fn apply_env(&mut self, env: &HashMap<String, String>) -> Result<(), ConfigError> {
        let get = |key: &str| env.get(&format!("KONSIL_FHIR_{}", key.to_uppercase()));
        if let Some(v) = get("public_url") {
            self.public_url = Some(v.clone()).filter(|v| !v.is_empty());
        }
        if let Some(v) = get("default_page_size") {
            self.default_page_size = parse_value("fhir.default_page_size", v)?;
        }
        if let Some(v) = get("max_page_size") {
            self.max_page_size = parse_value("fhir.max_page_size", v)?;
        }
        if let Some(v) = get("max_resource_bytes") {
            self.max_resource_bytes = parse_value("fhir.max_resource_bytes", v)?;
        }
        if let Some(v) = get("max_binary_bytes") {
            self.max_binary_bytes = Some(parse_value("fhir.max_binary_bytes", v)?);
        }
        if self.default_page_size == 0 || self.max_page_size == 0 {
            return Err(value_error(
                "fhir.default_page_size",
                "0",
                "page sizes must be at least 1",
            ));
        }
        if let Some(url) = &self.public_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(value_error(
                    "fhir.public_url",
                    url,
                    "must start with http:// or https://",
                ));
            }
        }
        Ok(())
    }
}

/// `[workflow]`: the second-opinion case rules that are configuration
/// rather than data (`profiles/completeness-rules.json` holds the rest).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkflowConfig {
    /// Name of the service's own Organization (`Task.owner` until a
    /// specialist is assigned).
    pub organization_name: String,
    /// DICOMweb base URL put in each case ImagingStudy's Endpoint; by
    /// default `http://<server.http>/dicomweb`.
    pub dicomweb_url: Option<String>,
    /// A study without an announced instance count counts as complete once
    /// no instance arrived for this many seconds.
    pub imaging_quiet_secs: u64,
    /// Records missing this many days put the case on hold.
    pub stale_days: u64,
    /// How often the time-driven checks run (quiet period, stale cases,
    /// expired consents), in seconds.
    pub check_interval_secs: u64,
    /// Follow-up questions are taken this many days after delivery.
    pub follow_up_days: u64,
    /// Submitted records of cases inactive this many months are discarded.
    pub retention_months: u32,
    /// A Subscription notification is retried for this many days.
    pub notify_retry_days: u64,
    /// First retry after this many seconds; each later one waits twice as
    /// long, up to `notify_max_backoff_secs`.
    pub notify_first_retry_secs: u64,
    pub notify_max_backoff_secs: u64,
}

impl Default for WorkflowConfig {
    fn default() -> Self {
        WorkflowConfig {
            organization_name: "Konsil second-opinion service".to_owned(),
            dicomweb_url: None,
            imaging_quiet_secs: 600,
            stale_days: 30,
            check_interval_secs: 60,
            follow_up_days: 90,
            retention_months: 6,
            notify_retry_days: 3,
            notify_first_retry_secs: 30,
            notify_max_backoff_secs: 3600,
        }
    }
}

impl WorkflowConfig {
    /// `KONSIL_WORKFLOW_<KEY>` variables replace file values.
    fn apply_env(&mut self, env: &HashMap<String, String>) -> Result<(), ConfigError> {
        let get = |key: &str| env.get(&format!("KONSIL_WORKFLOW_{}", key.to_uppercase()));
        if let Some(v) = get("organization_name") {
            self.organization_name = v.clone();
        }
        if let Some(v) = get("dicomweb_url") {
            self.dicomweb_url = Some(v.clone()).filter(|v| !v.is_empty());
        }
        if let Some(v) = get("imaging_quiet_secs") {
            self.imaging_quiet_secs = parse_value("workflow.imaging_quiet_secs", v)?;
        }
        if let Some(v) = get("stale_days") {
            self.stale_days = parse_value("workflow.stale_days", v)?;
        }
        if let Some(v) = get("check_interval_secs") {
            self.check_interval_secs = parse_value("workflow.check_interval_secs", v)?;
        }
        if let Some(v) = get("follow_up_days") {
            self.follow_up_days = parse_value("workflow.follow_up_days", v)?;
        }
        if let Some(v) = get("retention_months") {
            self.retention_months = parse_value("workflow.retention_months", v)?;
        }
        if let Some(v) = get("notify_retry_days") {
            self.notify_retry_days = parse_value("workflow.notify_retry_days", v)?;
        }
        if let Some(v) = get("notify_first_retry_secs") {
            self.notify_first_retry_secs = parse_value("workflow.notify_first_retry_secs", v)?;
        }
        if let Some(v) = get("notify_max_backoff_secs") {
            self.notify_max_backoff_secs = parse_value("workflow.notify_max_backoff_secs", v)?;
        }
        if self.notify_first_retry_secs == 0 {
            return Err(value_error(
                "workflow.notify_first_retry_secs",
                "0",
                "must be at least 1",
            ));
        }
        if self.check_interval_secs == 0 {
            return Err(value_error(
                "workflow.check_interval_secs",
                "0",
                "must be at least 1",
            ));
        }
        if self.organization_name.trim().is_empty() {
            return Err(value_error(
                "workflow.organization_name",
                "",
                "must name the service",
            ));
        }
        Ok(())
    }
}

/// The whole configuration after layering.
#[derive(Debug, Clone, Default)]
pub struct Config {
    pub server: ServerConfig,
    pub dicomweb: DicomwebConfig,
    pub fhir: FhirConfig,
    pub workflow: WorkflowConfig,
    pub auth: AuthConfig,
    /// `None`: no HTTPS and no DICOM TLS.
    pub tls: Option<TlsConfig>,
    pub partners: Vec<Partner>,
    /// `konsil serve --dev`: no authentication, the development identity
    /// of `design.md` instead. Never set from a file or the environment.
    pub dev: bool,
}

impl Config {
    /// The registered client with this id, and its partner.
    pub fn client(&self, client_id: &str) -> Option<(&Partner, &ClientRegistration)> {
        self.partners.iter().find_map(|p| {
            p.clients
                .iter()
                .find(|c| c.client_id == client_id)
                .map(|c| (p, c))
        })
    }

    /// The partner whose systems call from this AE title.
    pub fn partner_for_ae(&self, ae: &AeTitle) -> Option<&Partner> {
        self.partners.iter().find(|p| p.ae_titles.contains(ae))
    }

    /// The partner with this id.
    pub fn partner(&self, id: &PartnerId) -> Option<&Partner> {
        self.partners.iter().find(|p| &p.id == id)
    }
}

/// Values given on the command line; they win over everything else.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub data_dir: Option<PathBuf>,
    pub http: Option<String>,
    pub https: Option<String>,
    pub dicom: Option<String>,
    pub dicom_tls: Option<String>,
    pub ae_title: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    server: FileServer,
    #[serde(default)]
    dicomweb: DicomwebConfig,
    #[serde(default)]
    fhir: FhirConfig,
    #[serde(default)]
    workflow: WorkflowConfig,
    #[serde(default)]
    auth: AuthConfig,
    #[serde(default)]
    tls: FileTls,
    #[serde(default)]
    partners: Vec<FilePartner>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileServer {
    data_dir: Option<PathBuf>,
    http: Option<String>,
    https: Option<String>,
    dicom: Option<String>,
    dicom_tls: Option<String>,
    ae_title: Option<String>,
    max_associations: Option<usize>,
    idle_timeout_secs: Option<u64>,
    max_pdu: Option<u32>,
    accept_unknown_sop_classes: Option<bool>,
    shutdown_grace_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePartner {
    id: String,
    /// Display name; the id when left out.
    name: Option<String>,
    #[serde(default)]
    ae_titles: Vec<String>,
    #[serde(default)]
    clients: Vec<FileClient>,
    #[serde(default)]
    certificate_subjects: Vec<String>,
    requests_per_minute: Option<u32>,
    max_associations: Option<usize>,
    patient_id_system: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileClient {
    client_id: String,
    /// A JWKS file, relative to the config file's folder.
    jwks_file: Option<PathBuf>,
    /// The JWKS inline: a table, or a JSON string.
    jwks: Option<serde_json::Value>,
    scopes: Vec<String>,
}

impl FileClient {
    fn load(self, partner: &str, base: &Path) -> Result<ClientRegistration, ConfigError> {
        let conflict = |why: String| {
            ConfigError::Conflict(format!(
                "partner {partner}, client {}: {why}",
                self.client_id
            ))
        };
        if self.client_id.trim().is_empty() || self.client_id.len() > 255 {
            return Err(conflict("client_id must be 1 to 255 characters".into()));
        }
        let jwks: serde_json::Value = match (&self.jwks_file, self.jwks.clone()) {
            (Some(file), None) => {
                let path = base.join(file);
                let text =
                    std::fs::read_to_string(&path).map_err(|source| ConfigError::ReadFile {
                        path: path.clone(),
                        source,
                    })?;
                serde_json::from_str(&text)
                    .map_err(|e| conflict(format!("{} is not JSON: {e}", path.display())))?
            }
            (None, Some(serde_json::Value::String(text))) => serde_json::from_str(&text)
                .map_err(|e| conflict(format!("jwks is not JSON: {e}")))?,
            (None, Some(value)) => value,
            _ => return Err(conflict("give exactly one of jwks_file and jwks".into())),
        };
        let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_value(jwks)
            .map_err(|e| conflict(format!("not a JSON Web Key Set: {e}")))?;
        if jwks.keys.is_empty() {
            return Err(conflict("the key set holds no key".into()));
        }
        for key in &jwks.keys {
            if key.common.key_id.is_none() {
                return Err(conflict(
                    "every key needs a kid (client assertions name it)".into(),
                ));
            }
            if jsonwebtoken::DecodingKey::from_jwk(key).is_err() {
                return Err(conflict(
                    "a key is not a usable RSA or EC public key".into(),
                ));
            }
        }
        let scopes = Scopes::parse(self.scopes.iter().map(String::as_str))
            .map_err(|e| conflict(e.to_string()))?;
        Ok(ClientRegistration {
            client_id: self.client_id,
            jwks,
            scopes,
        })
    }
}

/// Load the configuration: defaults, then `file` (if any), then the
/// environment `env`, then `overrides`.
pub fn load(
    file: Option<&Path>,
    env: &HashMap<String, String>,
    overrides: &Overrides,
) -> Result<Config, ConfigError> {
    let parsed = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
                path: path.to_owned(),
                source,
            })?;
            toml::from_str::<FileConfig>(&text).map_err(|source| ConfigError::ParseFile {
                path: path.to_owned(),
                source: Box::new(source),
            })?
        }
        None => FileConfig::default(),
    };
    // Key and certificate files named in the config are found next to it.
    let base = file
        .and_then(Path::parent)
        .map(Path::to_owned)
        .unwrap_or_default();

    let mut server = ServerConfig::default();
    let f = parsed.server;
    // One layer at a time; each later layer replaces what it names.
    let layers: [Layer; 3] = [
        Layer {
            data_dir: f.data_dir.map(|p| p.display().to_string()),
            http: f.http,
            https: f.https,
            dicom: f.dicom,
            dicom_tls: f.dicom_tls,
            ae_title: f.ae_title,
            max_associations: f.max_associations.map(|v| v.to_string()),
            idle_timeout_secs: f.idle_timeout_secs.map(|v| v.to_string()),
            max_pdu: f.max_pdu.map(|v| v.to_string()),
            accept_unknown_sop_classes: f.accept_unknown_sop_classes.map(|v| v.to_string()),
            shutdown_grace_secs: f.shutdown_grace_secs.map(|v| v.to_string()),
        },
        Layer::from_env(env),
        Layer {
            data_dir: overrides.data_dir.as_ref().map(|p| p.display().to_string()),
            http: overrides.http.clone(),
            https: overrides.https.clone(),
            dicom: overrides.dicom.clone(),
            dicom_tls: overrides.dicom_tls.clone(),
            ae_title: overrides.ae_title.clone(),
            ..Layer::default()
        },
    ];
    let https_named = layers.iter().any(|l| l.https.is_some());
    let dicom_tls_named = layers.iter().any(|l| l.dicom_tls.is_some());
    for layer in layers {
        layer.apply(&mut server)?;
    }
    let tls = parsed.tls.resolve(env, &base)?;
    if tls.is_some() {
        // With [tls], the TLS ports are on unless switched off.
        if !https_named {
            server.https = Some(SocketAddr::from(([127, 0, 0, 1], 8443)));
        }
        if !dicom_tls_named {
            server.dicom_tls = Some(SocketAddr::from(([127, 0, 0, 1], 2762)));
        }
    } else if server.https.is_some() || server.dicom_tls.is_some() {
        return Err(ConfigError::Conflict(
            "https and dicom_tls need a [tls] section with certificate and private_key".into(),
        ));
    }
    if server.http.is_none() && server.https.is_none() {
        return Err(ConfigError::Conflict(
            "http and https are both off: one is needed (FHIR, DICOMweb, /healthz)".into(),
        ));
    }
    if !(4096..=16_777_216).contains(&server.max_pdu) {
        return Err(value_error(
            "max_pdu",
            &server.max_pdu.to_string(),
            "use 4096 to 16777216",
        ));
    }
    if server.max_associations == 0 {
        return Err(value_error("max_associations", "0", "must be at least 1"));
    }

    let mut partners = Vec::new();
    let mut ae_owner: HashMap<AeTitle, PartnerId> = HashMap::new();
    for p in parsed.partners {
        let id = PartnerId::parse(&p.id).map_err(|source| ConfigError::Partner {
            partner: p.id.clone(),
            source,
        })?;
        if partners.iter().any(|q: &Partner| q.id == id) {
            return Err(ConfigError::Conflict(format!(
                "partner id {id} appears twice"
            )));
        }
        let mut ae_titles = Vec::new();
        for raw in &p.ae_titles {
            let ae = AeTitle::parse(raw).map_err(|source| ConfigError::Partner {
                partner: p.id.clone(),
                source,
            })?;
            if let Some(other) = ae_owner.insert(ae.clone(), id.clone()) {
                return Err(ConfigError::Conflict(format!(
                    "AE title {ae} is listed for both partner {other} and partner {id}"
                )));
            }
            ae_titles.push(ae);
        }
        if p.requests_per_minute == Some(0) || p.max_associations == Some(0) {
            return Err(ConfigError::Conflict(format!(
                "partner {id}: requests_per_minute and max_associations must be at least 1 (leave them out for no limit)"
            )));
        }
        let mut certificate_subjects = Vec::new();
        for raw in &p.certificate_subjects {
            let subject = crate::tls::normalise_subject(raw).map_err(|reason| {
                value_error(
                    &format!("partners.{}.certificate_subjects", p.id),
                    raw,
                    &reason,
                )
            })?;
            let taken = partners
                .iter()
                .find(|q: &&Partner| q.certificate_subjects.contains(&subject));
            if let Some(other) = taken {
                return Err(ConfigError::Conflict(format!(
                    "certificate subject {subject} is listed for both partner {} and partner {id}",
                    other.id
                )));
            }
            certificate_subjects.push(subject);
        }
        if !certificate_subjects.is_empty() && tls.as_ref().is_none_or(|t| t.client_ca.is_none()) {
            return Err(ConfigError::Conflict(format!(
                "partner {id} has certificate_subjects, but [tls] has no client_ca to verify them"
            )));
        }
        let mut clients = Vec::new();
        for client in p.clients {
            let client = client.load(&p.id, &base)?;
            let taken = partners
                .iter()
                .flat_map(|q: &Partner| &q.clients)
                .chain(&clients)
                .any(|c: &ClientRegistration| c.client_id == client.client_id);
            if taken {
                return Err(ConfigError::Conflict(format!(
                    "client_id {} is registered twice",
                    client.client_id
                )));
            }
            clients.push(client);
        }
        partners.push(Partner {
            name: p.name.unwrap_or_else(|| id.to_string()),
            id,
            ae_titles,
            clients,
            certificate_subjects,
            requests_per_minute: p.requests_per_minute,
            max_associations: p.max_associations,
            patient_id_system: p.patient_id_system.filter(|s| !s.trim().is_empty()),
        });
    }
    let mut dicomweb = parsed.dicomweb;
    dicomweb.apply_env(env)?;
    let mut fhir = parsed.fhir;
    fhir.apply_env(env)?;
    let mut workflow = parsed.workflow;
    workflow.apply_env(env)?;
    let mut auth = parsed.auth;
    auth.apply_env(env, &base)?;
    Ok(Config {
        server,
        dicomweb,
        fhir,
        workflow,
        auth,
        tls,
        partners,
        dev: false,
    })
}

/// The process environment as a map, for [`load`].
pub fn process_env() -> HashMap<String, String> {
    std::env::vars()
        .filter(|(k, _)| k.starts_with("KONSIL_"))
        .collect()
}

#[derive(Default)]
struct Layer {
    data_dir: Option<String>,
    http: Option<String>,
    https: Option<String>,
    dicom: Option<String>,
    dicom_tls: Option<String>,
    ae_title: Option<String>,
    max_associations: Option<String>,
    idle_timeout_secs: Option<String>,
    max_pdu: Option<String>,
    accept_unknown_sop_classes: Option<String>,
    shutdown_grace_secs: Option<String>,
}

impl Layer {
    fn from_env(env: &HashMap<String, String>) -> Layer {
        let get = |key: &str| env.get(&format!("KONSIL_{}", key.to_uppercase())).cloned();
        Layer {
            data_dir: get("data_dir"),
            http: get("http"),
            https: get("https"),
            dicom: get("dicom"),
            dicom_tls: get("dicom_tls"),
            ae_title: get("ae_title"),
            max_associations: get("max_associations"),
            idle_timeout_secs: get("idle_timeout_secs"),
            max_pdu: get("max_pdu"),
            accept_unknown_sop_classes: get("accept_unknown_sop_classes"),
            shutdown_grace_secs: get("shutdown_grace_secs"),
        }
    }

    fn apply(self, s: &mut ServerConfig) -> Result<(), ConfigError> {
        if let Some(v) = self.data_dir {
            s.data_dir = PathBuf::from(v);
        }
        if let Some(v) = self.http {
            s.http = parse_address("http", &v)?;
        }
        if let Some(v) = self.https {
            s.https = parse_address("https", &v)?;
        }
        if let Some(v) = self.dicom {
            s.dicom = parse_address("dicom", &v)?;
        }
        if let Some(v) = self.dicom_tls {
            s.dicom_tls = parse_address("dicom_tls", &v)?;
        }
        if let Some(v) = self.ae_title {
            s.ae_title =
                AeTitle::parse(&v).map_err(|e| value_error("ae_title", &v, &e.to_string()))?;
        }
        if let Some(v) = self.max_associations {
            s.max_associations = parse_value("max_associations", &v)?;
        }
        if let Some(v) = self.idle_timeout_secs {
            s.idle_timeout_secs = parse_value("idle_timeout_secs", &v)?;
        }
        if let Some(v) = self.max_pdu {
            s.max_pdu = parse_value("max_pdu", &v)?;
        }
        if let Some(v) = self.accept_unknown_sop_classes {
            s.accept_unknown_sop_classes = parse_value("accept_unknown_sop_classes", &v)?;
        }
        if let Some(v) = self.shutdown_grace_secs {
            s.shutdown_grace_secs = parse_value("shutdown_grace_secs", &v)?;
        }
        Ok(())
    }
}

fn parse_value<T: std::str::FromStr>(key: &str, value: &str) -> Result<T, ConfigError>
where
    T::Err: std::fmt::Display,
{
    value
        .trim()
        .parse()
        .map_err(|e: T::Err| value_error(key, value, &e.to_string()))
}

/// A listen address; `""` switches the listener off.
fn parse_address(key: &str, value: &str) -> Result<Option<SocketAddr>, ConfigError> {
    if value.trim().is_empty() {
        return Ok(None);
    }
    parse_value(key, value).map(Some)
}

fn value_error(key: &str, value: &str, reason: &str) -> ConfigError {
    ConfigError::Value {
        key: key.to_owned(),
        value: value.to_owned(),
        reason: reason.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_config(text: &str) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), text).unwrap();
        file
    }

    #[test]
    fn defaults_match_the_design_contract() {
        let c = load(None, &HashMap::new(), &Overrides::default()).unwrap();
        assert_eq!(c.server.data_dir, PathBuf::from("./konsil-data"));
        assert_eq!(c.server.http, Some("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(c.server.dicom, Some("127.0.0.1:11112".parse().unwrap()));
        assert_eq!(c.server.https, None, "no TLS without [tls]");
        assert_eq!(c.server.dicom_tls, None);
        assert_eq!(c.server.ae_title.as_str(), "KONSIL");
        assert!(c.partners.is_empty());
    }

    #[test]
    fn flags_beat_env_beat_file() {
        let file = write_config(
            "[server]\nhttp = \"127.0.0.1:1000\"\ndicom = \"127.0.0.1:1001\"\nae_title = \"FROMFILE\"\nmax_pdu = 65536\n\
             [[partners]]\nid = \"st-mary\"\nname = \"St. Mary's\"\nae_titles = [\"STMARY_PACS\"]\n",
        );
        let env = HashMap::from([
            ("KONSIL_DICOM".to_owned(), "127.0.0.1:2001".to_owned()),
            ("KONSIL_AE_TITLE".to_owned(), "FROMENV".to_owned()),
        ]);
        let flags = Overrides {
            ae_title: Some("FROMFLAG".into()),
            ..Overrides::default()
        };
        let c = load(Some(file.path()), &env, &flags).unwrap();
        assert_eq!(c.server.http.unwrap().port(), 1000, "file value kept");
        assert_eq!(c.server.dicom.unwrap().port(), 2001, "env beats file");
        assert_eq!(c.server.ae_title.as_str(), "FROMFLAG", "flag beats env");
        assert_eq!(c.server.max_pdu, 65536);
        let ae = AeTitle::parse("STMARY_PACS").unwrap();
        assert_eq!(c.partner_for_ae(&ae).unwrap().id.as_str(), "st-mary");
    }

    #[test]
    fn a_staff_issuer_needs_the_audience_its_tokens_for_konsil_carry() {
        let issuer = "[auth]\nstaff_issuer = \"https://login.example.org/realms/konsil\"\n";
        let file = write_config(issuer);
        let refused = load(Some(file.path()), &HashMap::new(), &Overrides::default());
        assert!(
            matches!(&refused, Err(ConfigError::Conflict(why)) if why.contains("staff_audience")),
            "{refused:?}"
        );
        let file = write_config(&format!("{issuer}staff_audience = \"konsil\"\n"));
        let c = load(Some(file.path()), &HashMap::new(), &Overrides::default()).unwrap();
        assert_eq!(c.auth.staff_audience.as_deref(), Some("konsil"));
    }

    /// Issue 6's configuration contract, key for key as the issue writes
    /// it (no partner `name`: it defaults to the id).
    #[test]
    fn the_security_contract_loads_as_written() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("keys")).unwrap();
        let key = serde_json::json!({"keys": [{"kty": "RSA", "kid": "st-mary-ehr-1", "alg": "RS384", "use": "sig",
            "n": "sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw",
            "e": "AQAB"}]});
        std::fs::write(
            dir.path().join("keys/st-mary-ehr.jwks.json"),
            key.to_string(),
        )
        .unwrap();
        let path = dir.path().join("konsil.toml");
        std::fs::write(
            &path,
            r#"[server]
http = "127.0.0.1:8080"          # plain HTTP; "" disables it
https = "127.0.0.1:8443"
dicom = "127.0.0.1:11112"        # plain DIMSE; "" disables it
dicom_tls = "127.0.0.1:2762"
[tls]
certificate = "certs/server.pem"  # PEM chain
private_key = "certs/server.key"
client_ca = "certs/partners-ca.pem"   # optional; enables mutual TLS
[[partners]]
id = "st-mary"
ae_titles = ["STMARY_PACS"]
certificate_subjects = ["CN=st-mary-pacs"]   # TLS client identities bound to this partner
[[partners.clients]]
client_id = "st-mary-ehr"
jwks_file = "keys/st-mary-ehr.jwks.json"
scopes = ["system/ServiceRequest.cru", "system/DiagnosticReport.rs"]
"#,
        )
        .unwrap();
        let c = load(Some(&path), &HashMap::new(), &Overrides::default()).unwrap();
        assert_eq!(c.server.dicom_tls, Some("127.0.0.1:2762".parse().unwrap()));
        let partner = &c.partners[0];
        assert_eq!(partner.name, "st-mary", "the name defaults to the id");
        assert_eq!(partner.certificate_subjects, ["CN=st-mary-pacs"]);
        assert_eq!(partner.clients[0].client_id, "st-mary-ehr");
    }

    #[test]
    fn tls_ports_follow_the_tls_section() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("konsil.toml");
        let partner =
            "[[partners]]\nid = \"st-mary\"\nname = \"St. Mary's\"\nae_titles = [\"SM\"]\n";
        std::fs::write(
            &path,
            format!(
                "[server]\ndicom = \"\"\n[tls]\ncertificate = \"certs/server.pem\"\nprivate_key = \"certs/server.key\"\n\
                 client_ca = \"certs/ca.pem\"\n{partner}certificate_subjects = [\"cn=st-mary-pacs, O=St Mary\"]\n"
            ),
        )
        .unwrap();
        let c = load(Some(&path), &HashMap::new(), &Overrides::default()).unwrap();
        assert_eq!(c.server.https, Some("127.0.0.1:8443".parse().unwrap()));
        assert_eq!(c.server.dicom_tls, Some("127.0.0.1:2762".parse().unwrap()));
        assert_eq!(c.server.dicom, None, "\"\" switches plain DICOM off");
        let tls = c.tls.as_ref().unwrap();
        assert_eq!(tls.certificate, dir.path().join("certs/server.pem"));
        assert_eq!(tls.client_ca, Some(dir.path().join("certs/ca.pem")));
        assert_eq!(
            c.partners[0].certificate_subjects,
            ["CN=st-mary-pacs,O=St Mary"]
        );
        assert_eq!(c.server.own_url(), "https://127.0.0.1:8443");

        let env = HashMap::from([("KONSIL_HTTPS".to_owned(), String::new())]);
        let c = load(Some(&path), &env, &Overrides::default()).unwrap();
        assert_eq!(c.server.https, None, "https = \"\" switches HTTPS off");

        for (text, expect) in [
            ("[server]\nhttps = \"127.0.0.1:8443\"\n".to_owned(), "need a [tls] section"),
            ("[server]\nhttp = \"\"\n".to_owned(), "both off"),
            ("[tls]\ncertificate = \"a.pem\"\n".to_owned(), "both certificate and private_key"),
            (
                format!("[tls]\ncertificate = \"a.pem\"\nprivate_key = \"a.key\"\n{partner}certificate_subjects = [\"CN=x\"]\n"),
                "no client_ca",
            ),
            (
                format!("[tls]\ncertificate = \"a\"\nprivate_key = \"b\"\nclient_ca = \"c\"\n{partner}certificate_subjects = [\"CN=x\"]\n\
                         [[partners]]\nid = \"city\"\nname = \"City\"\ncertificate_subjects = [\"cn=x\"]\n"),
                "listed for both partner st-mary and partner city",
            ),
            (
                format!("[tls]\ncertificate = \"a\"\nprivate_key = \"b\"\nclient_ca = \"c\"\n{partner}certificate_subjects = [\"no equals sign\"]\n"),
                "certificate_subjects",
            ),
        ] {
            std::fs::write(&path, &text).unwrap();
            let err = load(Some(&path), &HashMap::new(), &Overrides::default()).unwrap_err();
            assert!(err.to_string().contains(expect), "{text}: {err}");
        }
    }

    #[test]
    fn bad_values_are_named() {
        let file = write_config("[server]\nunknown_key = 1\n");
        let err = load(Some(file.path()), &HashMap::new(), &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("unknown_key"), "{err}");

        let env = HashMap::from([("KONSIL_MAX_PDU".to_owned(), "12".to_owned())]);
        let err = load(None, &env, &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("max_pdu"), "{err}");

        let file = write_config(
            "[[partners]]\nid = \"a\"\nname = \"A\"\nae_titles = [\"X\"]\n[[partners]]\nid = \"b\"\nname = \"B\"\nae_titles = [\"X\"]\n",
        );
        let err = load(Some(file.path()), &HashMap::new(), &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("AE title X"), "{err}");
    }
}
