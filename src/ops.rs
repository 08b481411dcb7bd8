//! Operational HTTP endpoints: `/healthz` (alive), `/readyz` (stores
//! reachable) and `/metrics` (Prometheus text).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::app::App;

/// Routes for the operational endpoints.
pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

async fn healthz() -> impl IntoResponse {
    (StatusCode::OK, "ok\n")
}

async fn readyz(State(app): State<Arc<App>>) -> impl IntoResponse {
    let index = app.index.ping().await;
    let blobs = {
        let blobs = Arc::clone(&app.blobs);
        tokio::task::spawn_blocking(move || blobs.ping()).await
    };
    match (index, blobs) {
        (Ok(()), Ok(Ok(()))) => (StatusCode::OK, "ready\n".to_owned()),
        (index, blobs) => {
            // Details go to the log; the probe only needs to know.
            tracing::warn!(
                index_ok = index.is_ok(),
                blobs_ok = matches!(blobs, Ok(Ok(()))),
                "not ready"
            );
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "store not reachable\n".to_owned(),
            )
        }
    }
}

async fn metrics(State(app): State<Arc<App>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.metrics.render(),
    )
}
