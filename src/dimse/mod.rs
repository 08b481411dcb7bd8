//! The DICOM DIMSE edge: an async SCP on dicom-ul offering Verification and
//! every Storage SOP Class, feeding C-STORE data straight into the ingest
//! pipeline PDU by PDU.

pub mod command;
mod pdata;

use std::collections::{BTreeMap, HashMap};
use std::io::Cursor;
use std::sync::Arc;
use std::time::Duration;

use dicom_ul::association::server::AccessControl;
use dicom_ul::association::Association;
use dicom_ul::pdu::{
    AssociationRJ, AssociationRJResult, AssociationRJServiceProviderPresentationReason,
    AssociationRJServiceUserReason, AssociationRJSource, PDataValue, PDataValueType,
    PresentationContextResultReason, UserIdentity,
};
use dicom_ul::{Pdu, ServerAssociationOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::audit::{Actor, AuditRecord, Auditor, Entity, Kind, Outcome};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::config::Config;
use crate::ids::{AeTitle, PartnerId, TransferId, Uid};
use crate::ingest::status;
use crate::ingest::{Declared, Ingest, InstanceUpload, Origin};
use crate::limits::{AssociationSlot, PartnerLimits};
use crate::metrics::{label, Metrics};
use crate::store::{IndexOutcome, Source};
use crate::tls::{CertificateBinding, Tls};
use command::Request;

/// Verification SOP Class.
const VERIFICATION: &str = "1.2.840.10008.1.1";
/// Command sets are small; a larger one is a protocol violation.
const MAX_COMMAND_BYTES: usize = 64 * 1024;

/// Who may associate: the called AE title must be ours, the calling AE
/// title must belong to a configured partner and, over mutual TLS, to the
/// partner the client certificate speaks for.
#[derive(Clone)]
struct PartnerAccess {
    ae_partner: Arc<HashMap<String, PartnerId>>,
    /// Set on a mutual-TLS connection: the handshake's verified certificate.
    certificate: Option<CertificateBinding>,
    /// Partners' own association caps, and where this connection keeps the
    /// slot it took.
    limits: Arc<PartnerLimits>,
    slot: AssociationSlot,
}

impl std::fmt::Debug for PartnerAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartnerAccess")
            .field("certificate", &self.certificate)
            .finish_non_exhaustive()
    }
}

impl AccessControl for PartnerAccess {
    fn check_access(
        &self,
        this_ae_title: &str,
        calling_ae_title: &str,
        called_ae_title: &str,
        _user_identity: Option<&UserIdentity>,
    ) -> Result<(), AssociationRJServiceUserReason> {
        let calling = calling_ae_title.trim();
        let called = called_ae_title.trim();
        if called != this_ae_title.trim() {
            tracing::warn!(
                calling_ae = calling,
                called_ae = called,
                our_ae = this_ae_title.trim(),
                "association rejected: called AE title not recognized; the sender must call our AE title"
            );
            return Err(AssociationRJServiceUserReason::CalledAETitleNotRecognized);
        }
        let Some(partner) = self.ae_partner.get(calling) else {
            tracing::warn!(
                calling_ae = calling,
                "association rejected: calling AE title not recognized; to accept it, add it to a partner's \
                 ae_titles in konsil.toml ([[partners]] ... ae_titles = [\"{calling}\"]) and restart"
            );
            return Err(AssociationRJServiceUserReason::CallingAETitleNotRecognized);
        };
        if let Some(binding) = &self.certificate {
            match binding.get() {
                Some((_, certified)) if certified == partner => {}
                Some((subject, certified)) => {
                    tracing::warn!(
                        calling_ae = calling,
                        ae_partner = %partner,
                        certificate_subject = %subject,
                        certificate_partner = %certified,
                        "association rejected: the calling AE title belongs to another partner than the TLS \
                         client certificate"
                    );
                    return Err(AssociationRJServiceUserReason::CallingAETitleNotRecognized);
                }
                None => {
                    // The verifier makes a certificate mandatory; keep the guard.
                    tracing::warn!(
                        calling_ae = calling,
                        "association rejected: no verified TLS client certificate"
                    );
                    return Err(AssociationRJServiceUserReason::NoReasonGiven);
                }
            }
        }
        match self.limits.association(partner) {
            Ok(Some(permit)) => self.slot.hold(permit),
            Ok(None) => {}
            Err(max) => {
                tracing::warn!(
                    calling_ae = calling,
                    partner = %partner,
                    max_associations = max,
                    "association rejected: the partner has its max_associations open; it may retry when one closes"
                );
                return Err(AssociationRJServiceUserReason::NoReasonGiven);
            }
        }
        Ok(())
    }
}

/// The ports associations arrive on.
pub struct DimseListeners {
    /// Plain DICOM (`server.dicom`).
    pub plain: Option<TcpListener>,
    /// DICOM TLS (`server.dicom_tls`).
    pub tls: Option<(TcpListener, Arc<Tls>)>,
}

/// Everything an association task needs.
struct Scp {
    options: ServerAssociationOptions<
        'static,
        PartnerAccess,
        dicom_ul::association::server::DefaultNegotiation,
    >,
    ae_partner: Arc<HashMap<String, PartnerId>>,
    ingest: Ingest,
    metrics: Arc<Metrics>,
    auditor: Auditor,
    limits: Arc<PartnerLimits>,
    /// Bound on the TLS handshake plus association negotiation.
    idle: Duration,
}

/// Accept associations on `listeners` until `shutdown` turns true, then let
/// open associations finish for up to `shutdown_grace_secs`.
pub async fn serve(
    listeners: DimseListeners,
    config: Config,
    ingest: Ingest,
    metrics: Arc<Metrics>,
    auditor: Auditor,
    limits: Arc<PartnerLimits>,
    mut shutdown: watch::Receiver<bool>,
) {
    let server = &config.server;
    let ae_partner: HashMap<String, PartnerId> = config
        .partners
        .iter()
        .flat_map(|p| p.ae_titles.iter().map(|ae| (ae.to_string(), p.id.clone())))
        .collect();
    let ae_partner = Arc::new(ae_partner);
    let idle = Duration::from_secs(server.idle_timeout_secs.max(1));
    let mut options = ServerAssociationOptions::new()
        .ae_access_control(PartnerAccess {
            ae_partner: Arc::clone(&ae_partner),
            certificate: None,
            limits: Arc::clone(&limits),
            slot: AssociationSlot::default(),
        })
        .ae_title(server.ae_title.to_string())
        .max_pdu_length(server.max_pdu)
        .read_timeout(idle)
        .write_timeout(idle)
        .promiscuous(server.accept_unknown_sop_classes)
        .with_abstract_syntax(VERIFICATION);
    for uid in crate::ingest::storage_sop_classes() {
        options = options.with_abstract_syntax(uid);
    }
    let scp = Arc::new(Scp {
        options,
        ae_partner,
        ingest,
        metrics,
        auditor,
        limits,
        idle,
    });
    // The cap on concurrent associations: over it, a caller gets a transient
    // rejection at once instead of waiting in a queue it cannot see.
    let slots = Arc::new(Semaphore::new(server.max_associations));
    let mut tasks = JoinSet::new();
    let DimseListeners { plain, tls } = listeners;
    loop {
        tokio::select! {
            (accepted, tls) = async {
                tokio::select! {
                    a = accept_on(plain.as_ref()) => (a, None),
                    a = accept_on(tls.as_ref().map(|(l, _)| l)) => (a, tls.as_ref().map(|(_, t)| Arc::clone(t))),
                }
            } => {
                let (socket, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        continue;
                    }
                };
                // Nagle's algorithm would hold back small PDUs (responses)
                // and stall the sender.
                let _ = socket.set_nodelay(true);
                match Arc::clone(&slots).try_acquire_owned() {
                    Ok(permit) => {
                        let scp = Arc::clone(&scp);
                        tasks.spawn(async move {
                            scp.run_association(socket, tls).await;
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        scp.metrics.associations.get_or_create(&vec![label("outcome", "busy")]).inc();
                        tracing::warn!(%peer, "association rejected: max_associations reached (transient)");
                        let scp = Arc::clone(&scp);
                        tasks.spawn(async move { scp.reject_busy_on(socket, tls).await });
                    }
                }
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            _ = shutdown.changed() => break,
        }
    }
    drop(plain);
    drop(tls);
    let grace = Duration::from_secs(server.shutdown_grace_secs);
    if !tasks.is_empty() {
        tracing::info!(
            open = tasks.len(),
            "DIMSE: waiting for open associations to finish"
        );
    }
    let drained =
        tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(
            open = tasks.len(),
            "DIMSE: grace period over; aborting remaining associations (unfinished instances are discarded)"
        );
        tasks.shutdown().await;
    }
}

/// Accept on `listener`, or never when there is none.
async fn accept_on(
    listener: Option<&TcpListener>,
) -> std::io::Result<(TcpStream, std::net::SocketAddr)> {
    match listener {
        Some(listener) => listener.accept().await,
        None => std::future::pending().await,
    }
}

/// Answer an A-ASSOCIATE-RQ with a transient "local limit exceeded" rejection.
async fn reject_busy<S>(mut socket: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let read_rq = async {
        let mut buf = Vec::with_capacity(4096);
        loop {
            let mut cursor = Cursor::new(&buf[..]);
            if let Ok(Some(_)) = dicom_ul::read_pdu(&mut cursor, 65_536, false) {
                return true;
            }
            if buf.len() > 65_536 {
                return false;
            }
            let mut chunk = [0u8; 4096];
            match socket.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    if !matches!(
        tokio::time::timeout(Duration::from_secs(10), read_rq).await,
        Ok(true)
    ) {
        return;
    }
    let rj = Pdu::AssociationRJ(AssociationRJ {
        result: AssociationRJResult::Transient,
        source: AssociationRJSource::ServiceProviderPresentation(
            AssociationRJServiceProviderPresentationReason::LocalLimitExceeded,
        ),
    });
    let mut out = Vec::new();
    if dicom_ul::write_pdu(&mut out, &rj).is_ok() {
        let _ = socket.write_all(&out).await;
        let _ = socket.shutdown().await;
    }
}

/// A C-STORE between its command and the last fragment of its data set.
struct PendingStore {
    request: Request,
    presentation_context_id: u8,
    /// `Ok`: bytes stream into the pipeline. `Err`: the request was refused
    /// up front; the data set is drained and the status sent at its end.
    upload: Result<InstanceUpload, (u16, String)>,
}

impl Scp {
    /// Over the server's cap: the transient rejection, on the DICOM TLS port
    /// after the TLS handshake (a plain-text answer would read as a broken
    /// handshake to the caller, not as "busy, retry later").
    async fn reject_busy_on(&self, socket: TcpStream, tls: Option<Arc<Tls>>) {
        let Some(tls) = tls else {
            return reject_busy(socket).await;
        };
        let config = match tls.dimse_config(&CertificateBinding::default()) {
            Ok(config) => config,
            Err(e) => {
                tracing::error!(error = %e, "DICOM TLS: cannot build the TLS configuration");
                return;
            }
        };
        let handshake = tokio_rustls::TlsAcceptor::from(config).accept(socket);
        match tokio::time::timeout(self.idle, handshake).await {
            Ok(Ok(stream)) => reject_busy(stream).await,
            Ok(Err(e)) => tracing::info!(error = %e, "DICOM TLS: handshake failed"),
            Err(_) => tracing::info!("DICOM TLS: handshake timed out"),
        }
    }

    /// Negotiate (over TLS when `tls` is given), then serve the association.
    async fn run_association(&self, socket: TcpStream, tls: Option<Arc<Tls>>) {
        // Per connection: the association slot its partner's cap gives it
        // lives as long as these options, i.e. this function.
        let Some(tls) = tls else {
            // A partner at its own cap gets the same transient rejection as
            // a full server, before negotiation: its PACS retries later. (The
            // access control can only reject permanently; it still guards
            // the race between this look and the association request.)
            let partner = if self.limits.caps_associations() {
                self.calling_partner(&socket).await
            } else {
                None
            };
            if let Some(partner) = partner {
                if self.limits.associations_full(&partner) {
                    tracing::warn!(
                        partner = %partner,
                        "association rejected: the partner has its max_associations open (transient)"
                    );
                    self.metrics
                        .associations
                        .get_or_create(&vec![label("outcome", "busy")])
                        .inc();
                    reject_busy(socket).await;
                    return;
                }
            }
            let options = self.options.clone().ae_access_control(self.access(None));
            match options.establish_async(socket).await {
                Ok(assoc) => self.serve_association(assoc, None).await,
                Err(e) => self.not_established(&e),
            }
            return;
        };
        let binding = CertificateBinding::default();
        let config = match tls.dimse_config(&binding) {
            Ok(config) => config,
            Err(e) => {
                tracing::error!(error = %e, "DICOM TLS: cannot build the TLS configuration");
                return;
            }
        };
        let options = self
            .options
            .clone()
            .ae_access_control(self.access(tls.mutual().then(|| binding.clone())))
            .tls_config(config);
        // dicom-ul bounds the association request but not the handshake.
        match tokio::time::timeout(self.idle, options.establish_tls_async(socket)).await {
            Ok(Ok(assoc)) => {
                let subject = binding.get().map(|(subject, _)| subject.clone());
                self.serve_association(assoc, Some(subject)).await
            }
            Ok(Err(e)) => self.not_established(&e),
            Err(_) => {
                self.metrics
                    .associations
                    .get_or_create(&vec![label("outcome", "failed")])
                    .inc();
                tracing::info!("DICOM TLS: handshake or association request timed out");
            }
        }
    }

    /// The partner of the calling AE title in the A-ASSOCIATE-RQ waiting on
    /// `socket`, read without consuming it (`None`: not there in time, not
    /// an association request, or no partner's title).
    async fn calling_partner(&self, socket: &TcpStream) -> Option<PartnerId> {
        // PDU type, reserved, length (4), protocol version (2), reserved
        // (2), called AE title (16), calling AE title (16).
        const CALLING: std::ops::Range<usize> = 26..42;
        let mut head = [0u8; 42];
        let peeked = tokio::time::timeout(self.idle, async {
            loop {
                match socket.peek(&mut head).await {
                    Ok(n) if n >= head.len() => return true,
                    Ok(0) | Err(_) => return false,
                    // Not all there yet: wait a little for the rest.
                    Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
        })
        .await;
        if !matches!(peeked, Ok(true)) || head[0] != 0x01 {
            return None;
        }
        let calling = std::str::from_utf8(&head[CALLING]).ok()?.trim();
        self.ae_partner.get(calling).cloned()
    }

    /// The access control of one connection.
    fn access(&self, certificate: Option<CertificateBinding>) -> PartnerAccess {
        PartnerAccess {
            ae_partner: Arc::clone(&self.ae_partner),
            certificate,
            limits: Arc::clone(&self.limits),
            slot: AssociationSlot::default(),
        }
    }

    fn not_established(&self, e: &dicom_ul::association::Error) {
        // "rejected": we sent an A-ASSOCIATE-RJ; "failed": the peer went
        // away, failed the TLS handshake or spoke no DICOM (port probes).
        let outcome = if matches!(e, dicom_ul::association::Error::Rejected { .. }) {
            "rejected"
        } else {
            "failed"
        };
        self.metrics
            .associations
            .get_or_create(&vec![label("outcome", outcome)])
            .inc();
        tracing::info!(error = %e, "association not established");
    }

    /// Serve an established association until it is released or aborted.
    /// `tls`: `None` on plain DICOM, else the client certificate's subject
    /// (if mutual TLS).
    async fn serve_association<S>(
        &self,
        mut assoc: dicom_ul::association::server::AsyncServerAssociation<S>,
        tls: Option<Option<String>>,
    ) where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
    {
        let calling = assoc.peer_ae_title().trim().to_owned();
        let Some(partner) = self.ae_partner.get(&calling).cloned() else {
            // Access control already refused unknown titles; keep the guard.
            let _ = assoc.abort().await;
            return;
        };
        // Every C-STORE of the association is one transfer.
        let origin = Origin {
            partner: partner.clone(),
            source: Source::Dimse,
            calling_ae: AeTitle::parse(&calling).ok(),
            transfer: Some(TransferId::new()),
        };
        self.metrics
            .associations
            .get_or_create(&vec![label("outcome", "accepted")])
            .inc();
        // Decrements on every way out of this function.
        let _active = ActiveAssociation::new(&self.metrics);
        match &tls {
            None => {
                tracing::info!(calling_ae = %calling, partner = %partner, "association accepted")
            }
            Some(subject) => tracing::info!(
                calling_ae = %calling,
                partner = %partner,
                certificate_subject = subject.as_deref().unwrap_or("-"),
                "association accepted over TLS"
            ),
        }

        let mut command_buf: Vec<u8> = Vec::new();
        let mut pending: Option<PendingStore> = None;
        let mut stored = 0u64;
        // Recorded however the association ends.
        let mut audit = AssociationAudit {
            auditor: self.auditor.clone(),
            partner: partner.to_string(),
            calling_ae: calling.clone(),
            transfer: origin.transfer,
            studies: BTreeMap::new(),
            failures: 0,
        };
        let end = loop {
            let pdu = match pdata::receive(&mut assoc, self.idle).await {
                Ok(pdu) => pdu,
                Err(e) => break format!("receive failed or idle timeout: {e}"),
            };
            match pdu {
                Pdu::PData { data } => {
                    let mut abort_reason = None;
                    for pdv in data {
                        match pdv.value_type {
                            PDataValueType::Command => {
                                if pending.is_some() {
                                    abort_reason =
                                        Some("command received while a data set was expected");
                                    break;
                                }
                                command_buf.extend_from_slice(&pdv.data);
                                if command_buf.len() > MAX_COMMAND_BYTES {
                                    abort_reason = Some("command set too large");
                                    break;
                                }
                                if !pdv.is_last {
                                    continue;
                                }
                                let bytes = std::mem::take(&mut command_buf);
                                let request = match command::parse_request(&bytes) {
                                    Ok(r) => r,
                                    Err(e) => {
                                        tracing::warn!(calling_ae = %calling, error = %e, "unparseable command set");
                                        abort_reason = Some("unparseable command set");
                                        break;
                                    }
                                };
                                match self.on_command(
                                    &assoc,
                                    &origin,
                                    pdv.presentation_context_id,
                                    request,
                                ) {
                                    CommandAction::Respond(bytes) => {
                                        if let Err(e) = send_command(
                                            &mut assoc,
                                            pdv.presentation_context_id,
                                            bytes,
                                        )
                                        .await
                                        {
                                            abort_reason = Some("cannot send response");
                                            tracing::warn!(error = %e, "cannot send response");
                                            break;
                                        }
                                    }
                                    CommandAction::AwaitData(store) => pending = Some(*store),
                                }
                            }
                            PDataValueType::Data => {
                                let Some(store) = pending.as_mut() else {
                                    abort_reason = Some("data set without a command");
                                    break;
                                };
                                if pdv.presentation_context_id != store.presentation_context_id {
                                    abort_reason = Some("data set on another presentation context");
                                    break;
                                }
                                let is_last = pdv.is_last;
                                if let Ok(upload) = store.upload.as_mut() {
                                    upload.write(pdv.data).await;
                                }
                                if is_last {
                                    if let Some(store) = pending.take() {
                                        let (pc, response, study) =
                                            self.finish_store(store, &calling).await;
                                        match study {
                                            Some(uid) => {
                                                stored += 1;
                                                *audit
                                                    .studies
                                                    .entry(uid.to_string())
                                                    .or_insert(0) += 1;
                                            }
                                            None => audit.failures += 1,
                                        }
                                        if let Err(e) = send_command(&mut assoc, pc, response).await
                                        {
                                            abort_reason = Some("cannot send response");
                                            tracing::warn!(error = %e, "cannot send response");
                                            break;
                                        }
                                    }
                                }
                            }
                        }
                    }
                    if let Some(reason) = abort_reason {
                        tracing::warn!(calling_ae = %calling, reason, "aborting association");
                        let _ = assoc.abort().await;
                        return;
                    }
                }
                Pdu::ReleaseRQ => {
                    let _ = assoc.send(&Pdu::ReleaseRP).await;
                    break "released".to_owned();
                }
                Pdu::AbortRQ { .. } => break "aborted by peer".to_owned(),
                other => {
                    tracing::warn!(calling_ae = %calling, pdu = ?pdu_kind(&other), "unexpected PDU; aborting");
                    let _ = assoc.abort().await;
                    return;
                }
            }
        };
        // An unfinished C-STORE is dropped here: its temporary object is removed.
        if pending.is_some() {
            tracing::warn!(calling_ae = %calling, "association ended during a C-STORE; the partial instance is discarded");
        }
        tracing::info!(calling_ae = %calling, stored, end = %end, "association closed");
    }

    fn on_command<S>(
        &self,
        assoc: &dicom_ul::association::server::AsyncServerAssociation<S>,
        origin: &Origin,
        pc_id: u8,
        request: Request,
    ) -> CommandAction {
        let context = assoc
            .presentation_contexts()
            .iter()
            .find(|pc| pc.id == pc_id && pc.reason == PresentationContextResultReason::Acceptance);
        match request.command_field {
            command::C_ECHO_RQ => {
                CommandAction::Respond(command::response(&request, status::SUCCESS, None))
            }
            command::C_STORE_RQ if request.has_data_set => {
                let refuse = |status: u16, comment: String| {
                    self.ingest.count_failure(Source::Dimse, status);
                    CommandAction::AwaitData(Box::new(PendingStore {
                        request: request.clone(),
                        presentation_context_id: pc_id,
                        upload: Err((status, comment)),
                    }))
                };
                let Some(context) = context else {
                    return refuse(
                        status::SOP_CLASS_NOT_SUPPORTED,
                        "presentation context not accepted".into(),
                    );
                };
                let sop_class =
                    match Uid::parse(request.affected_sop_class.as_deref().unwrap_or("")) {
                        Ok(u) => u,
                        Err(e) => {
                            return refuse(status::INVALID_UID, format!("AffectedSOPClassUID: {e}"))
                        }
                    };
                let sop_instance =
                    match Uid::parse(request.affected_sop_instance.as_deref().unwrap_or("")) {
                        Ok(u) => u,
                        Err(e) => {
                            return refuse(
                                status::INVALID_UID,
                                format!("AffectedSOPInstanceUID: {e}"),
                            )
                        }
                    };
                if sop_class.as_str() != context.abstract_syntax.trim_end_matches(['\0', ' ']) {
                    return refuse(
                        status::SOP_CLASS_NOT_SUPPORTED,
                        "SOP class differs from the presentation context".into(),
                    );
                }
                let transfer_syntax = match Uid::parse(&context.transfer_syntax) {
                    Ok(u) => u,
                    Err(e) => return refuse(status::INVALID_UID, format!("transfer syntax: {e}")),
                };
                let upload = self.ingest.begin(
                    origin.clone(),
                    Declared {
                        sop_class,
                        sop_instance,
                        transfer_syntax,
                        study: None,
                    },
                );
                CommandAction::AwaitData(Box::new(PendingStore {
                    request,
                    presentation_context_id: pc_id,
                    upload: Ok(upload),
                }))
            }
            other => {
                tracing::info!(
                    command_field = format!("0x{other:04X}"),
                    "unsupported DIMSE command"
                );
                let mut reply = request.clone();
                if request.has_data_set {
                    // Nothing sensible to do with a data set we did not ask for.
                    reply.has_data_set = false;
                }
                CommandAction::Respond(command::response(
                    &reply,
                    status::UNRECOGNIZED_OPERATION,
                    None,
                ))
            }
        }
    }

    /// Finish a C-STORE: returns the context id, the response, and the
    /// study of the stored instance (`None`: it was refused).
    async fn finish_store(&self, store: PendingStore, calling: &str) -> (u8, Vec<u8>, Option<Uid>) {
        let PendingStore {
            request,
            presentation_context_id,
            upload,
        } = store;
        let result = match upload {
            Ok(upload) => upload.finish().await.map_err(|e| {
                let (status, comment) = status::for_ingest_error(&e);
                self.ingest.count_failure(Source::Dimse, status);
                if status == status::OUT_OF_RESOURCES || status == status::PROCESSING_FAILURE {
                    tracing::error!(calling_ae = calling, error = %e, "C-STORE failed at the receiver");
                } else {
                    tracing::warn!(calling_ae = calling, status = format!("0x{status:04X}"), reason = %e, "C-STORE refused");
                }
                (status, comment)
            }),
            Err(refused) => Err(refused),
        };
        match result {
            Ok(receipt) => {
                if receipt.outcome == IndexOutcome::Duplicate {
                    tracing::debug!("duplicate instance acknowledged");
                }
                (
                    presentation_context_id,
                    command::response(&request, status::SUCCESS, None),
                    Some(receipt.study_uid),
                )
            }
            Err((status, comment)) => (
                presentation_context_id,
                command::response(&request, status, Some(&comment)),
                None,
            ),
        }
    }
}

/// The audit record of an association's C-STOREs (DICOM "Instances
/// Transferred", one per association), queued when it ends however it ends.
struct AssociationAudit {
    auditor: Auditor,
    partner: String,
    calling_ae: String,
    transfer: Option<TransferId>,
    /// Instances stored, by study.
    studies: BTreeMap<String, u64>,
    /// C-STOREs refused.
    failures: u64,
}

impl Drop for AssociationAudit {
    fn drop(&mut self) {
        if self.studies.is_empty() && self.failures == 0 {
            return;
        }
        let outcome = if self.failures == 0 {
            Outcome::Success
        } else {
            Outcome::MinorFailure
        };
        let description =
            (self.failures > 0).then(|| format!("{} instance(s) refused", self.failures));
        let mut record = AuditRecord::new(
            Kind::DicomStore,
            "C",
            Actor::Association {
                partner: std::mem::take(&mut self.partner),
                calling_ae: std::mem::take(&mut self.calling_ae),
            },
        )
        .outcome(outcome, description);
        record.transfer = self.transfer;
        for (uid, instances) in std::mem::take(&mut self.studies) {
            record = record.entity(Entity::Study {
                uid,
                instances: Some(instances),
            });
        }
        let auditor = self.auditor.clone();
        tokio::spawn(async move { auditor.record(record).await });
    }
}

/// Counts an open association in the metrics for as long as it lives.
struct ActiveAssociation<'a>(&'a Metrics);

impl<'a> ActiveAssociation<'a> {
    fn new(metrics: &'a Metrics) -> Self {
        metrics.associations_active.inc();
        ActiveAssociation(metrics)
    }
}

impl Drop for ActiveAssociation<'_> {
    fn drop(&mut self) {
        self.0.associations_active.dec();
    }
}

enum CommandAction {
    Respond(Vec<u8>),
    AwaitData(Box<PendingStore>),
}

async fn send_command<S>(
    assoc: &mut dicom_ul::association::server::AsyncServerAssociation<S>,
    presentation_context_id: u8,
    bytes: Vec<u8>,
) -> Result<(), dicom_ul::association::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
{
    assoc
        .send(&Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id,
                value_type: PDataValueType::Command,
                is_last: true,
                data: bytes,
            }],
        })
        .await
}

fn pdu_kind(pdu: &Pdu) -> &'static str {
    match pdu {
        Pdu::AssociationRQ(_) => "A-ASSOCIATE-RQ",
        Pdu::AssociationAC(_) => "A-ASSOCIATE-AC",
        Pdu::AssociationRJ(_) => "A-ASSOCIATE-RJ",
        Pdu::PData { .. } => "P-DATA-TF",
        Pdu::ReleaseRQ => "A-RELEASE-RQ",
        Pdu::ReleaseRP => "A-RELEASE-RP",
        Pdu::AbortRQ { .. } => "A-ABORT",
        Pdu::Unknown { .. } => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_classes_cover_annex_b() {
        let all: Vec<_> = crate::ingest::storage_sop_classes().collect();
        assert!(all.len() > 150, "{} classes", all.len());
        for uid in all.iter() {
            assert!(Uid::parse(uid).is_ok(), "{uid}");
        }
        for needed in [
            "1.2.840.10008.5.1.4.1.1.2",     // CT
            "1.2.840.10008.5.1.4.1.1.4",     // MR
            "1.2.840.10008.5.1.4.1.1.104.1", // Encapsulated PDF
            "1.2.840.10008.5.1.4.1.1.88.22", // Enhanced SR
        ] {
            assert!(all.contains(&needed), "{needed}");
        }
        assert!(
            !all.contains(&"1.2.840.10008.1.20.1"),
            "storage commitment is not storage"
        );
    }

    #[test]
    fn access_control_by_partner() {
        let map = HashMap::from([(
            "STMARY_PACS".to_owned(),
            PartnerId::parse("st-mary").unwrap(),
        )]);
        let access = PartnerAccess {
            ae_partner: Arc::new(map),
            certificate: None,
            limits: Arc::new(PartnerLimits::new(&Config::default())),
            slot: AssociationSlot::default(),
        };
        assert!(access
            .check_access("KONSIL", "STMARY_PACS", "KONSIL", None)
            .is_ok());
        assert_eq!(
            access.check_access("KONSIL", "STRANGER", "KONSIL", None),
            Err(AssociationRJServiceUserReason::CallingAETitleNotRecognized)
        );
        assert_eq!(
            access.check_access("KONSIL", "STMARY_PACS", "OTHER", None),
            Err(AssociationRJServiceUserReason::CalledAETitleNotRecognized)
        );
    }
}
