//! TLS for the HTTPS and DICOM TLS listeners: rustls with TLS 1.2 and 1.3
//! only and rustls' default (BCP 195) cipher suites, so nothing can be
//! negotiated down to an older protocol or a weak suite.
//!
//! The certificate chain and key (and the partners' CA for mutual TLS) are
//! read from the files named in `[tls]` at start and again on SIGHUP; a
//! reload that fails keeps the certificates in use and says why.
//!
//! With `client_ca`, a client certificate is accepted only if that CA
//! issued it **and** its subject is listed in a partner's
//! `certificate_subjects`: the certificate then speaks for that partner.
//! DICOM TLS requires one; on HTTPS it is optional (the bearer token is the
//! credential), but a request over a partner's certificate must carry that
//! partner's token.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{StoresServerSessions, WebPkiClientVerifier};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{
    DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use x509_cert::der::Decode;

use crate::config::{Config, TlsConfig};
use crate::ids::PartnerId;
use crate::net::IdleIo;

/// A TLS handshake not done by then is dropped (a silent client must not
/// hold a slot).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress on the HTTPS port; more connections wait in the
/// kernel's backlog.
const MAX_PENDING_HANDSHAKES: usize = 512;

/// Why the TLS files could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls.{key} = {path}: {reason}")]
    File {
        key: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The server's TLS state, shared by the HTTPS and DICOM TLS listeners.
pub struct Tls {
    files: TlsConfig,
    /// Normalised certificate subject → the partner it speaks for.
    subjects: Arc<HashMap<String, PartnerId>>,
    provider: Arc<CryptoProvider>,
    /// Shared by every configuration built, so that sessions resume across
    /// reloads and DIMSE connections.
    sessions: Arc<dyn StoresServerSessions>,
    current: RwLock<Arc<Loaded>>,
}

/// What one read of the files gives.
struct Loaded {
    https: Arc<ServerConfig>,
    key: Arc<CertifiedKey>,
    /// The partners' CA, when mutual TLS is on.
    partner_roots: Option<Arc<RootCertStore>>,
    /// DICOM TLS without mutual TLS needs no per-connection state.
    dimse_shared: Arc<ServerConfig>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("files", &self.files).finish()
    }
}

impl Tls {
    /// Read the `[tls]` files, if configured.
    pub fn open(config: &Config) -> Result<Option<Arc<Tls>>, TlsError> {
        let Some(files) = config.tls.clone() else {
            return Ok(None);
        };
        let subjects: HashMap<String, PartnerId> = config
            .partners
            .iter()
            .flat_map(|p| {
                p.certificate_subjects
                    .iter()
                    .map(|s| (s.clone(), p.id.clone()))
            })
            .collect();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let sessions: Arc<dyn StoresServerSessions> =
            rustls::server::ServerSessionMemoryCache::new(4096);
        let subjects = Arc::new(subjects);
        let loaded = load(&files, &provider, &sessions, &subjects)?;
        Ok(Some(Arc::new(Tls {
            files,
            subjects,
            provider,
            sessions,
            current: RwLock::new(Arc::new(loaded)),
        })))
    }

    /// Read the files again (SIGHUP). On error the certificates in use stay.
    pub fn reload(&self) -> Result<(), TlsError> {
        let loaded = load(&self.files, &self.provider, &self.sessions, &self.subjects)?;
        if let Ok(mut current) = self.current.write() {
            *current = Arc::new(loaded);
        }
        Ok(())
    }

    fn loaded(&self) -> Arc<Loaded> {
        match self.current.read() {
            Ok(current) => Arc::clone(&current),
            // A panic while swapping cannot leave a half-written Arc.
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Whether client certificates are checked (mutual TLS).
    pub fn mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// The configuration for one HTTPS connection.
    pub fn https_config(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.loaded().https)
    }

    /// The configuration for one DICOM TLS connection. With mutual TLS the
    /// client must present a partner's certificate, and `binding` learns
    /// which partner it is during the handshake, before the association
    /// request is read (the AE title check needs it).
    pub fn dimse_config(
        &self,
        binding: &CertificateBinding,
    ) -> Result<Arc<ServerConfig>, TlsError> {
        let loaded = self.loaded();
        let Some(roots) = &loaded.partner_roots else {
            return Ok(Arc::clone(&loaded.dimse_shared));
        };
        let inner = WebPkiClientVerifier::builder_with_provider(
            Arc::clone(roots),
            Arc::clone(&self.provider),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        let verifier = PartnerVerifier {
            inner,
            subjects: Arc::clone(&self.subjects),
            binding: Some(binding.clone()),
        };
        let mut config = builder(&self.provider)?
            .with_client_cert_verifier(Arc::new(verifier))
            .with_cert_resolver(Arc::new(SingleCertAndKey::from(Arc::clone(&loaded.key))));
        config.session_storage = Arc::clone(&self.sessions);
        Ok(Arc::new(config))
    }

    /// The partner a verified client certificate speaks for, and its subject.
    fn identify(&self, certificate: &CertificateDer<'_>) -> Option<(String, Option<PartnerId>)> {
        let subject = subject_of(certificate)?;
        let partner = self.subjects.get(&subject).cloned();
        Some((subject, partner))
    }
}

/// Which partner the client certificate of one DICOM TLS connection speaks
/// for, set by the handshake and read by the association's AE title check.
#[derive(Debug, Clone, Default)]
pub struct CertificateBinding(Arc<OnceLock<(String, PartnerId)>>);

impl CertificateBinding {
    /// The certificate's subject and partner, once the handshake verified it.
    pub fn get(&self) -> Option<&(String, PartnerId)> {
        self.0.get()
    }
}

fn builder(
    provider: &Arc<CryptoProvider>,
) -> Result<rustls::ConfigBuilder<ServerConfig, rustls::WantsVerifier>, TlsError> {
    Ok(ServerConfig::builder_with_provider(Arc::clone(provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?)
}

fn load(
    files: &TlsConfig,
    provider: &Arc<CryptoProvider>,
    sessions: &Arc<dyn StoresServerSessions>,
    subjects: &Arc<HashMap<String, PartnerId>>,
) -> Result<Loaded, TlsError> {
    let chain = read_certificates("certificate", &files.certificate)?;
    let key = PrivateKeyDer::from_pem_file(&files.private_key).map_err(|e| TlsError::File {
        key: "private_key",
        path: files.private_key.clone(),
        reason: format!("no usable PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"),
    })?;
    let key = CertifiedKey::from_der(chain, key, provider).map_err(|e| TlsError::File {
        key: "private_key",
        path: files.private_key.clone(),
        reason: format!("does not fit the certificate: {e}"),
    })?;
    let key = Arc::new(key);
    let resolver = || Arc::new(SingleCertAndKey::from(Arc::clone(&key)));

    let partner_roots = match &files.client_ca {
        None => None,
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certificates("client_ca", path)? {
                roots.add(cert).map_err(|e| TlsError::File {
                    key: "client_ca",
                    path: path.clone(),
                    reason: format!("not a usable CA certificate: {e}"),
                })?;
            }
            Some(Arc::new(roots))
        }
    };
    let mut https = match &partner_roots {
        None => builder(provider)?
            .with_no_client_auth()
            .with_cert_resolver(resolver()),
        Some(roots) => {
            let inner = WebPkiClientVerifier::builder_with_provider(
                Arc::clone(roots),
                Arc::clone(provider),
            )
            .allow_unauthenticated()
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
            let verifier = PartnerVerifier {
                inner,
                subjects: Arc::clone(subjects),
                binding: None,
            };
            builder(provider)?
                .with_client_cert_verifier(Arc::new(verifier))
                .with_cert_resolver(resolver())
        }
    };
    // axum serves HTTP/1.1 here.
    https.alpn_protocols = vec![b"http/1.1".to_vec()];
    https.session_storage = Arc::clone(sessions);
    let mut dimse_shared = builder(provider)?
        .with_no_client_auth()
        .with_cert_resolver(resolver());
    dimse_shared.session_storage = Arc::clone(sessions);
    Ok(Loaded {
        https: Arc::new(https),
        key,
        partner_roots,
        dimse_shared: Arc::new(dimse_shared),
    })
}

fn read_certificates(
    key: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let error = |reason: String| TlsError::File {
        key,
        path: path.to_owned(),
        reason,
    };
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(|e| error(format!("cannot read: {e}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(format!("not a PEM certificate file: {e}")))?;
    if certificates.is_empty() {
        return Err(error("holds no CERTIFICATE block".into()));
    }
    Ok(certificates)
}

/// A certificate's subject as an RFC 4514 string (`CN=st-mary-pacs,O=…`),
/// the form `certificate_subjects` are compared in.
pub fn subject_of(certificate: &CertificateDer<'_>) -> Option<String> {
    let parsed = x509_cert::Certificate::from_der(certificate.as_ref()).ok()?;
    Some(parsed.tbs_certificate.subject.to_string())
}

/// A subject written in the config, in the form [`subject_of`] gives.
pub fn normalise_subject(text: &str) -> Result<String, String> {
    use std::str::FromStr;
    // Operators write OpenSSL's `CN=a, O=b`; RFC 4514 has no spaces there.
    let mut compact = String::with_capacity(text.len());
    let mut escaped = false;
    let mut after_separator = true;
    for c in text.chars() {
        if after_separator && c == ' ' {
            continue;
        }
        after_separator = false;
        if !escaped && matches!(c, ',' | '+') {
            after_separator = true;
        }
        escaped = !escaped && c == '\\';
        compact.push(c);
    }
    let name = x509_cert::name::RdnSequence::from_str(compact.trim_end())
        .map_err(|e| format!("not an RFC 4514 distinguished name: {e}"))?;
    if name.0.is_empty() {
        return Err("empty distinguished name".into());
    }
    Ok(name.to_string())
}

/// The CA's verdict, and then: the subject must be bound to a partner.
#[derive(Debug)]
struct PartnerVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    subjects: Arc<HashMap<String, PartnerId>>,
    binding: Option<CertificateBinding>,
}

impl ClientCertVerifier for PartnerVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let subject = subject_of(end_entity).ok_or(rustls::Error::InvalidCertificate(
            rustls::CertificateError::BadEncoding,
        ))?;
        let Some(partner) = self.subjects.get(&subject) else {
            tracing::warn!(
                subject = %subject,
                "TLS client certificate refused: its subject is no partner's; to accept it, add it to \
                 the partner's certificate_subjects in konsil.toml"
            );
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ));
        };
        if let Some(binding) = &self.binding {
            let _ = binding.0.set((subject, partner.clone()));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Who is at the other end of an HTTPS connection (axum `ConnectInfo`).
#[derive(Debug, Clone)]
pub struct TlsPeer {
    pub remote: SocketAddr,
    /// The verified client certificate's subject and partner, with mutual TLS.
    pub certificate: Option<(String, PartnerId)>,
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>>
    for TlsPeer
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        stream.remote_addr().clone()
    }
}

/// The HTTPS port for `axum::serve`: accepts TCP connections and hands
/// over those whose TLS handshake completed. Handshakes run concurrently,
/// each bounded by [`HANDSHAKE_TIMEOUT`].
pub struct TlsListener {
    tcp: TcpListener,
    tls: Arc<Tls>,
    /// Connections idle this long are closed ([`crate::net::IdleIo`]).
    idle: Duration,
    handshakes: JoinSet<Option<(HttpsStream, TlsPeer)>>,
}

/// One HTTPS connection: TLS over a TCP stream with an idle deadline.
pub type HttpsStream = tokio_rustls::server::TlsStream<IdleIo<TcpStream>>;

impl TlsListener {
    pub fn new(tcp: TcpListener, tls: Arc<Tls>, idle: Duration) -> TlsListener {
        TlsListener {
            tcp,
            tls,
            idle,
            handshakes: JoinSet::new(),
        }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = HttpsStream;
    type Addr = TlsPeer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let room = self.handshakes.len() < MAX_PENDING_HANDSHAKES;
            tokio::select! {
                accepted = self.tcp.accept(), if room => {
                    let (socket, remote) = match accepted {
                        Ok(x) => x,
                        Err(e) => {
                            // Out of file descriptors and the like: back off.
                            tracing::warn!(error = %e, "HTTPS accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    let _ = socket.set_nodelay(true);
                    let socket = IdleIo::new(socket, self.idle);
                    let acceptor = tokio_rustls::TlsAcceptor::from(self.tls.https_config());
                    let tls = Arc::clone(&self.tls);
                    self.handshakes.spawn(async move {
                        let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(socket)).await {
                            Ok(Ok(stream)) => stream,
                            Ok(Err(e)) => {
                                tracing::info!(%remote, error = %e, "HTTPS handshake failed");
                                return None;
                            }
                            Err(_) => {
                                tracing::info!(%remote, "HTTPS handshake timed out");
                                return None;
                            }
                        };
                        let certificate = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|chain| chain.first())
                            .and_then(|end_entity| tls.identify(end_entity))
                            .and_then(|(subject, partner)| partner.map(|p| (subject, p)));
                        Some((stream, TlsPeer { remote, certificate }))
                    });
                }
                Some(done) = self.handshakes.join_next(), if !self.handshakes.is_empty() => {
                    if let Ok(Some(connection)) = done {
                        return connection;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(TlsPeer {
            remote: self.tcp.local_addr()?,
            certificate: None,
        })
    }
}
