//! The running gateway's shared state and its HTTP router.

use std::sync::Arc;

use axum::response::IntoResponse;
use axum::Router;

use crate::config::Config;
use crate::fhir::records::ResourceRecordStore;
use crate::ingest::Ingest;
use crate::metrics::Metrics;
use crate::store::fhir::ResourceStore;
use crate::store::segments::SegmentStore;
use crate::store::sqlite::SqliteStore;
use crate::store::{BlobStore, MetadataStore};
use crate::workflow::engine::Workflow;
use crate::workflow::records::RecordStore;
use crate::workflow::retention::Retention;
use crate::workflow::runner::{Arrivals, Runner, StudyKey};
use tokio::sync::mpsc;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Index(#[from] crate::store::MetaError),
    #[error("workflow rules: {0}")]
    Workflow(String),
    #[error("cannot set up the service's own FHIR resources: {0}")]
    Service(#[from] crate::workflow::records::WorkflowError),
    #[error("start-up recovery failed: {0}")]
    Recover(#[from] crate::ingest::IngestError),
    #[error(transparent)]
    Auth(#[from] crate::auth::token::AuthStartError),
}

/// Set by the listener a request came in on (never taken from the client:
/// [`plain_listener`] and [`tls_listener`] drop a client's own), so that
/// the URLs Konsil writes into answers carry the scheme the client used.
const SCHEME_HEADER: &str = "x-konsil-scheme";

/// Outermost layer of the plain HTTP listener.
pub async fn plain_listener(
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    request.headers_mut().remove(SCHEME_HEADER);
    next.run(request).await
}

/// Outermost layer of the HTTPS listener.
pub async fn tls_listener(
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    request
        .headers_mut()
        .insert(SCHEME_HEADER, axum::http::HeaderValue::from_static("https"));
    next.run(request).await
}

/// Shared state of one gateway node.
pub struct App {
    pub config: Config,
    pub index: Arc<dyn MetadataStore>,
    pub resources: Arc<dyn ResourceStore>,
    pub blobs: Arc<dyn BlobStore>,
    /// FHIR Binary content, apart from DICOM objects (whose recovery
    /// re-indexes everything it finds as DICOM).
    pub fhir_blobs: Arc<dyn BlobStore>,
    pub metrics: Arc<Metrics>,
    /// Issues and checks access tokens.
    pub authority: crate::auth::Authority,
    /// Client assertions already used (replay protection).
    pub assertions: Arc<dyn crate::store::AssertionLog>,
    /// The audit trail of what changes nothing (reads, searches, transfers).
    pub auditor: crate::audit::Auditor,
    /// Per-partner request rates and association counts.
    pub limits: Arc<crate::limits::PartnerLimits>,
    /// Its writer, until [`crate::run`] starts it.
    pub audit_writer: std::sync::Mutex<Option<crate::audit::AuditWriter>>,
    pub ingest: Ingest,
    /// The second-opinion workflow (rules and configuration).
    pub workflow: Arc<Workflow>,
    /// Workflow transactions for work no client request carries.
    pub cases: Arc<dyn RecordStore>,
    /// Study arrivals reported by the ingest pipeline, until [`crate::run`]
    /// hands them to the workflow runner.
    pub arrivals: std::sync::Mutex<Option<mpsc::UnboundedReceiver<StudyKey>>>,
}

impl App {
    /// Open the embedded stores under the configured data directory and
    /// clean up what a crash may have left.
    pub async fn open(config: Config) -> Result<Arc<App>, StartError> {
        Self::open_inner(config, true).await
    }

    /// Open the stores without start-up recovery, for a second process (such
    /// as `konsil import`) next to a running server.
    pub async fn open_without_recovery(config: Config) -> Result<Arc<App>, StartError> {
        Self::open_inner(config, false).await
    }

    async fn open_inner(config: Config, recover: bool) -> Result<Arc<App>, StartError> {
        let data_dir = config.server.data_dir.clone();
        let dir_err = |source| StartError::DataDir {
            path: data_dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(&data_dir).map_err(dir_err)?;
        let blobs: Arc<dyn BlobStore> = Arc::new(SegmentStore::open(&data_dir).map_err(dir_err)?);
        let fhir_blobs: Arc<dyn BlobStore> =
            Arc::new(SegmentStore::open(&data_dir.join("fhir")).map_err(dir_err)?);
        let sqlite = SqliteStore::open(&data_dir).await?;
        let resources: Arc<dyn ResourceStore> = Arc::new(sqlite.clone());
        let assertions: Arc<dyn crate::store::AssertionLog> = Arc::new(sqlite.clone());
        let authority = crate::auth::Authority::open(&config)?;
        let index: Arc<dyn MetadataStore> = Arc::new(sqlite);
        let metrics = Arc::new(Metrics::new());
        let (arrivals_tx, arrivals) = Arrivals::channel();
        let ingest = Ingest::new(
            Arc::clone(&blobs),
            Arc::clone(&index),
            Arc::clone(&metrics),
            arrivals_tx,
        );
        let dicomweb_url = config
            .workflow
            .dicomweb_url
            .clone()
            .unwrap_or_else(|| format!("{}/dicomweb", config.server.own_url()));
        let workflow = Arc::new(
            Workflow::new(config.workflow.clone(), dicomweb_url)
                .map_err(StartError::Workflow)?
                .with_patient_id_systems(
                    config
                        .partners
                        .iter()
                        .filter_map(|p| Some((p.id.clone(), p.patient_id_system.clone()?)))
                        .collect(),
                ),
        );
        let cases: Arc<dyn RecordStore> = Arc::new(ResourceRecordStore {
            resources: Arc::clone(&resources),
        });
        {
            let mut tx = cases.begin().await?;
            workflow.ensure_service(tx.records()).await?;
            tx.commit().await?;
        }
        if recover {
            let recovered = ingest.recover().await?;
            if recovered.discarded_bytes > 0 {
                tracing::info!(
                    discarded_bytes = recovered.discarded_bytes,
                    "discarded unfinished objects left by an earlier run"
                );
            }
            let reindexed = recovered.reindexed;
            let resume_at = resources.binary_resume_points().await?;
            let store = Arc::clone(&fhir_blobs);
            let found = tokio::task::spawn_blocking(move || store.recover(&resume_at))
                .await
                .map_err(|_| StartError::Recover(crate::ingest::IngestError::Internal))?
                .map_err(|e| StartError::Recover(e.into()))?;
            if !found.unindexed.is_empty() {
                // Binary content whose resource never committed (a failed
                // transaction or a crash): unreachable, left in place.
                tracing::info!(
                    objects = found.unindexed.len(),
                    "FHIR binary objects without a resource version"
                );
            }
            if reindexed > 0 {
                tracing::warn!(
                    reindexed,
                    "re-indexed stored instances the index had lost (OS crash?)"
                );
            }
            // After the re-indexing, whose rows are noted too. A `konsil
            // import` still running keeps its notes for its own event.
            let events = crate::audit::audit_interrupted_transfers(&*cases).await?;
            if events > 0 {
                tracing::warn!(
                    events,
                    "stored the audit records of DICOM transfers an earlier run stopped in the middle of"
                );
            }
        }
        let (auditor, audit_writer) = crate::audit::Auditor::new(Arc::clone(&cases));
        Ok(Arc::new(App {
            limits: Arc::new(crate::limits::PartnerLimits::new(&config)),
            config,
            index,
            resources,
            blobs,
            fhir_blobs,
            metrics,
            authority,
            assertions,
            auditor,
            audit_writer: std::sync::Mutex::new(Some(audit_writer)),
            ingest,
            workflow,
            cases,
            arrivals: std::sync::Mutex::new(Some(arrivals)),
        }))
    }

    /// Store one audit record now (command-line runs, which start no
    /// background writer).
    pub async fn audit_now(&self, record: crate::audit::AuditRecord) {
        if let Err(e) = crate::audit::store_records(&*self.cases, &[record]).await {
            tracing::error!(error = %e, "the audit record could not be stored");
        }
    }

    /// The workflow's background runner, with the study arrivals (once:
    /// `None` when already taken).
    pub fn runner(&self) -> Option<(Runner, mpsc::UnboundedReceiver<StudyKey>)> {
        let arrivals = self.arrivals.lock().ok()?.take()?;
        Some((
            Runner {
                workflow: Arc::clone(&self.workflow),
                records: Arc::clone(&self.cases),
                index: Arc::clone(&self.index),
                retention: self.retention(),
            },
            arrivals,
        ))
    }

    /// Retention over this node's stores.
    pub fn retention(&self) -> Retention {
        Retention {
            workflow: Arc::clone(&self.workflow),
            records: Arc::clone(&self.cases),
            resources: Arc::clone(&self.resources),
            dicom_blobs: Arc::clone(&self.blobs),
            fhir_blobs: Arc::clone(&self.fhir_blobs),
        }
    }

    /// The Subscription notification deliverer.
    pub fn deliverer(&self) -> Result<crate::notify::Deliverer, reqwest::Error> {
        let fhir_base = self
            .config
            .fhir
            .public_url
            .clone()
            .unwrap_or_else(|| format!("{}/fhir", self.config.server.own_url()));
        crate::notify::Deliverer::new(
            Arc::clone(&self.resources),
            Arc::clone(&self.cases),
            self.config.workflow.clone(),
            fhir_base.trim_end_matches('/').to_owned(),
        )
    }

    /// The base URL clients use for an edge at `path` (`/fhir`): the
    /// configured public URL, else from the request's Host header.
    pub fn public_base(
        &self,
        configured: Option<&str>,
        headers: &axum::http::HeaderMap,
        path: &str,
    ) -> String {
        if let Some(url) = configured {
            return url.trim_end_matches('/').to_owned();
        }
        let host = headers
            .get(axum::http::header::HOST)
            .and_then(|h| h.to_str().ok())
            // Only what a host[:port] can hold: the value ends up in URLs.
            .filter(|h| {
                !h.is_empty()
                    && h.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
            })
            .map(str::to_owned);
        let scheme = match headers.get(SCHEME_HEADER) {
            Some(v) if v == "https" => "https",
            _ => "http",
        };
        match host {
            Some(host) => format!("{scheme}://{host}{path}"),
            None => format!("{}{path}", self.config.server.own_url()),
        }
    }

    /// The HTTP router: operational endpoints, DICOMweb at `/dicomweb`, FHIR
    /// at `/fhir`.
    pub fn router(self: &Arc<Self>) -> Router {
        crate::ops::routes()
            .merge(crate::auth::token::routes())
            .merge(crate::dicomweb::routes(self))
            .merge(crate::fhir::routes(self))
            .with_state(Arc::clone(self))
            .layer(axum::middleware::from_fn_with_state(
                std::time::Duration::from_secs(self.config.server.idle_timeout_secs.max(1)),
                body_idle_timeout,
            ))
            // A defect must not cost the connection or leak a trace: log it
            // and answer 500 (every input path is meant never to get here).
            .layer(tower_http::catch_panic::CatchPanicLayer::custom(
                |_: Box<dyn std::any::Any + Send>| {
                    tracing::error!("request handler panicked (a defect); answered 500");
                    (
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                        "internal error: the request was not completed\n",
                    )
                        .into_response()
                },
            ))
    }
}

/// A request body that sends nothing for `idle` ends in an error (the
/// handler answers or gives up as for a broken body, and what was being
/// stored is discarded): a stalled or trickling client cannot hold an
/// upload open for ever, while a slow but moving one is never cut, however
/// long the whole transfer takes (the timer restarts with every chunk).
async fn body_idle_timeout(
    axum::extract::State(idle): axum::extract::State<std::time::Duration>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let request = request.map(|body| {
        axum::body::Body::from_stream(IdleBody {
            inner: body.into_data_stream(),
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
        })
    });
    next.run(request).await
}

struct IdleBody {
    inner: axum::body::BodyDataStream,
    idle: std::time::Duration,
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl futures_util::Stream for IdleBody {
    type Item = Result<bytes::Bytes, std::io::Error>;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::future::Future;
        use std::task::Poll;
        let this = self.get_mut();
        match std::pin::Pin::new(&mut this.inner).poll_next(cx) {
            Poll::Ready(item) => {
                let deadline = tokio::time::Instant::now() + this.idle;
                this.timer.as_mut().reset(deadline);
                Poll::Ready(item.map(|chunk| chunk.map_err(std::io::Error::other)))
            }
            Poll::Pending => match this.timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "no request body data for {} s (server.idle_timeout_secs)",
                        this.idle.as_secs()
                    ),
                )))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}
