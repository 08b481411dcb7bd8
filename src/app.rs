//! The running gateway's shared state and its HTTP router.

use std::sync::Arc;

use axum::Router;

use crate::config::Config;
use crate::ingest::Ingest;
use crate::metrics::Metrics;
use crate::store::segments::SegmentStore;
use crate::store::sqlite::SqliteStore;
use crate::store::{BlobStore, MetadataStore};

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
    #[error("start-up recovery failed: {0}")]
    Recover(#[from] crate::ingest::IngestError),
}

/// Shared state of one gateway node.
pub struct App {
    pub config: Config,
    pub index: Arc<dyn MetadataStore>,
    pub blobs: Arc<dyn BlobStore>,
    pub metrics: Arc<Metrics>,
    pub ingest: Ingest,
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
        let index: Arc<dyn MetadataStore> = Arc::new(SqliteStore::open(&data_dir).await?);
        let metrics = Arc::new(Metrics::new());
        let ingest = Ingest::new(Arc::clone(&blobs), Arc::clone(&index), Arc::clone(&metrics));
        if recover {
            let (reindexed, discarded) = ingest.recover().await?;
            if discarded > 0 {
                tracing::info!(
                    discarded_bytes = discarded,
                    "discarded unfinished objects left by an earlier run"
                );
            }
            if reindexed > 0 {
                tracing::warn!(
                    reindexed,
                    "re-indexed stored instances the index had lost (OS crash?)"
                );
            }
        }
        Ok(Arc::new(App {
            config,
            index,
            blobs,
            metrics,
            ingest,
        }))
    }

    /// The HTTP router: operational endpoints and DICOMweb at `/dicomweb`
    /// (FHIR at `/fhir` as its issue lands).
    pub fn router(self: &Arc<Self>) -> Router {
        crate::ops::routes()
            .merge(crate::dicomweb::routes(self))
            .with_state(Arc::clone(self))
    }
}
