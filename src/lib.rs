//! Konsil: a gateway that lets hospitals send a patient's case to a remote
//! second-opinion service and get the opinion back, system to system.
//!
//! # Layout
//! - [`config`]: defaults, `konsil.toml`, `KONSIL_*` env, flags.
//! - [`ids`]: validated domain identifiers (UIDs, AE titles, partner ids).
//! - [`store`]: the metadata index and blob store traits, with the embedded
//!   SQLite and local-directory implementations.
//! - [`ingest`]: the one streaming pipeline every DICOM instance goes through.
//! - [`dimse`]: the DICOM DIMSE edge (C-ECHO, C-STORE).
//! - [`dicomweb`]: the DICOMweb edge (STOW-RS, QIDO-RS, WADO-RS).
//! - [`fhir`]: the FHIR R4 edge (validation, storage, search, transactions).
//! - [`workflow`]: the second-opinion case core (no protocol).
//! - [`auth`]: who is calling (the development identity until tokens land).
//! - [`tls`]: HTTPS and DICOM TLS (rustls), mutual TLS, reload on SIGHUP.
//! - [`ops`]: health, readiness and metrics over HTTP.
//! - [`import`]: `konsil import` of a folder or DICOMDIR.
//! - [`app`]: shared state; [`run`] is the library entry point.

#![deny(unsafe_code)]

pub mod app;
pub mod audit;
pub mod auth;
pub mod config;
pub mod dicomweb;
pub mod dimse;
pub mod fhir;
#[doc(hidden)]
pub mod fuzzing;
pub mod ids;
pub mod import;
pub mod ingest;
pub mod limits;
pub mod metrics;
pub mod net;
pub mod notify;
pub mod ops;
pub mod store;
pub mod tls;
pub mod workflow;

use std::future::Future;
use std::sync::Arc;

use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use app::App;

/// The sockets the gateway serves on, bound by the caller (so tests can bind
/// port 0 and read the address back). `None`: that listener is off.
pub struct Listeners {
    pub http: Option<TcpListener>,
    pub https: Option<TcpListener>,
    pub dicom: Option<TcpListener>,
    pub dicom_tls: Option<TcpListener>,
    /// The certificates for `https` and `dicom_tls` (required with either).
    pub tls: Option<Arc<tls::Tls>>,
}

/// Serve until `shutdown` completes, then stop accepting, let in-flight
/// work finish (bounded by `shutdown_grace_secs`) and return.
pub async fn run(app: Arc<App>, listeners: Listeners, shutdown: impl Future<Output = ()>) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let with_tls = |listener: Option<TcpListener>| {
        listener.and_then(|l| listeners.tls.as_ref().map(|tls| (l, Arc::clone(tls))))
    };
    let dicom_tls = with_tls(listeners.dicom_tls);
    let https = with_tls(listeners.https);
    let dimse = tokio::spawn(dimse::serve(
        dimse::DimseListeners {
            plain: listeners.dicom,
            tls: dicom_tls,
        },
        app.config.clone(),
        app.ingest.clone(),
        Arc::clone(&app.metrics),
        app.auditor.clone(),
        Arc::clone(&app.limits),
        stop_rx.clone(),
    ));
    let audit = app
        .audit_writer
        .lock()
        .ok()
        .and_then(|mut w| w.take())
        .map(|writer| tokio::spawn(writer.run(stop_rx.clone())));
    let workflow = app
        .runner()
        .map(|(runner, arrivals)| tokio::spawn(runner.run(arrivals, stop_rx.clone())));
    let deliverer = match app.deliverer() {
        Ok(d) => Some(tokio::spawn(d.run(stop_rx.clone()))),
        Err(e) => {
            tracing::error!(error = %e, "cannot start the notification deliverer; Subscriptions will not be notified");
            None
        }
    };
    // Connections with no byte read or written for twice the idle time are
    // closed (the request layer cuts a stalled body after the idle time
    // itself, with an answer).
    let connection_idle =
        std::time::Duration::from_secs(app.config.server.idle_timeout_secs.max(1) * 2);
    let mut http_servers = Vec::new();
    if let Some(listener) = listeners.http {
        let mut stop = stop_rx.clone();
        let router = app
            .router()
            .layer(axum::middleware::from_fn(app::plain_listener));
        http_servers.push(tokio::spawn(async move {
            // No Nagle delay on small answers (STOW responses, QIDO pages).
            let listener = net::IdleListener::new(
                listener.tap_io(|tcp| {
                    let _ = tcp.set_nodelay(true);
                }),
                connection_idle,
            );
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|stop| *stop).await;
                })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "HTTP server failed");
            }
        }));
    }
    if let Some((listener, tls)) = https {
        let mut stop = stop_rx.clone();
        let router = app
            .router()
            .layer(axum::middleware::from_fn(app::tls_listener));
        http_servers.push(tokio::spawn(async move {
            let listener = tls::TlsListener::new(listener, tls, connection_idle);
            let served = axum::serve(
                listener,
                router.into_make_service_with_connect_info::<tls::TlsPeer>(),
            )
            .with_graceful_shutdown(async move {
                let _ = stop.wait_for(|stop| *stop).await;
            })
            .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "HTTPS server failed");
            }
        }));
    }
    let reload = listeners
        .tls
        .map(|tls| tokio::spawn(reload_on_hangup(tls, stop_rx.clone())));
    shutdown.await;
    tracing::info!("shutting down: no new connections; finishing in-flight transfers");
    let _ = stop_tx.send(true);
    let _ = dimse.await;
    let grace = std::time::Duration::from_secs(app.config.server.shutdown_grace_secs);
    let mut all_finished = true;
    for server in http_servers {
        all_finished &= tokio::time::timeout(grace, server).await.is_ok();
    }
    for task in [workflow, deliverer, reload].into_iter().flatten() {
        let _ = tokio::time::timeout(grace, task).await;
    }
    if all_finished {
        // No writer is left: the next start may skip checking for objects
        // a crash tore.
        let blobs = Arc::clone(&app.blobs);
        match tokio::task::spawn_blocking(move || blobs.close()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot mark the blob store closed cleanly"),
            Err(_) => tracing::warn!("cannot mark the blob store closed cleanly"),
        }
    }
    // Last: the audit records of everything above.
    if let Some(task) = audit {
        let _ = tokio::time::timeout(grace, task).await;
    }
}

/// Read the TLS certificate and key files again on SIGHUP (certificate
/// renewal without a restart); a failed reload keeps the ones in use.
async fn reload_on_hangup(tls: Arc<tls::Tls>, mut stop: watch::Receiver<bool>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; TLS files are read at start only");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = hangup.recv() => match tls.reload() {
                    Ok(()) => tracing::info!("SIGHUP: TLS certificate and key reloaded"),
                    Err(e) => tracing::error!(error = %e, "SIGHUP: TLS reload failed; the certificates in use stay"),
                },
                _ = stop.wait_for(|stop| *stop) => return,
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (tls, stop.wait_for(|stop| *stop).await);
    }
}
