//! The `konsil` binary: parse the command line, bind, run, wait.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;

use konsil::audit::{Actor, AuditRecord, Entity, Kind, Outcome};
use konsil::config::{self, Overrides};
use konsil::ids::PartnerId;
use konsil::{App, Listeners};

/// Konsil: second-opinion gateway (DICOM DIMSE, DICOMweb, FHIR R4).
///
/// Configuration is layered: built-in defaults, then the config file, then
/// KONSIL_<KEY> environment variables (e.g. KONSIL_DATA_DIR, KONSIL_HTTP,
/// KONSIL_HTTPS, KONSIL_DICOM, KONSIL_DICOM_TLS, KONSIL_AE_TITLE, KONSIL_MAX_ASSOCIATIONS,
/// KONSIL_IDLE_TIMEOUT_SECS, KONSIL_MAX_PDU), then these flags. Logging:
/// KONSIL_LOG (filter, default info), KONSIL_LOG_FORMAT=json.
#[derive(Parser, Debug)]
#[command(name = "konsil", version, about, long_about)]
struct Cli {
    /// Configuration file (TOML; see README "Configuration"). Also KONSIL_CONFIG.
    #[arg(long, global = true, env = "KONSIL_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory (index database and blobs) [default: ./konsil-data]
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// Plain HTTP listen address (FHIR, DICOMweb, /healthz, /readyz, /metrics); "" turns it off [default: 127.0.0.1:8080]
    #[arg(long, global = true)]
    http: Option<String>,
    /// HTTPS listen address; needs [tls] in the config [default with [tls]: 127.0.0.1:8443]
    #[arg(long, global = true)]
    https: Option<String>,
    /// Plain DICOM DIMSE listen address; "" turns it off [default: 127.0.0.1:11112]
    #[arg(long, global = true)]
    dicom: Option<String>,
    /// DICOM TLS listen address; needs [tls] in the config [default with [tls]: 127.0.0.1:2762]
    #[arg(long, global = true)]
    dicom_tls: Option<String>,
    /// Our DICOM AE title [default: KONSIL]
    #[arg(long, global = true)]
    ae_title: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start the gateway (DIMSE SCP and HTTP). Ctrl-C / SIGTERM drain in-flight transfers, then exit 0.
    Serve {
        /// Development only: no authentication. An HTTP request with
        /// `X-Konsil-Partner: ID` acts as that partner's system (every scope), one without it
        /// as staff with every role. Never on a server that holds real patients' data.
        #[arg(long)]
        dev: bool,
    },
    /// Print a staff access token signed by this server's key (for the CLI, scripts and tests).
    Token {
        /// Role(s): coordinator, specialist, approver, auditor, admin (repeat or comma-separate)
        #[arg(long, required = true, value_delimiter = ',')]
        role: Vec<String>,
        /// Who the token stands for (the audit trail's agent)
        #[arg(long, default_value = "konsil-cli")]
        subject: String,
        /// Lifetime in minutes
        #[arg(long, default_value_t = 60)]
        minutes: u64,
    },
    /// Import a folder, a DICOMDIR or a single file for a partner, through the ingest pipeline.
    Import {
        /// Folder, DICOMDIR, or file
        path: PathBuf,
        /// Partner id (from the config) the records belong to
        #[arg(long)]
        partner: String,
    },
    /// Discard the submitted records (DICOM studies, Binaries, document content) of cases
    /// inactive for [workflow] retention_months, unless on legal hold; keep the opinion,
    /// the case skeleton and the audit trail. Prints what it removed. (`serve` runs it daily.)
    Retention {
        /// List what would be discarded; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Judge inactivity as if it were this date (YYYY-MM-DD or a FHIR dateTime); default now.
        #[arg(long)]
        as_of: Option<String>,
    },
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("konsil: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("konsil: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let overrides = Overrides {
        data_dir: cli.data_dir,
        http: cli.http,
        https: cli.https,
        dicom: cli.dicom,
        dicom_tls: cli.dicom_tls,
        ae_title: cli.ae_title,
    };
    let mut config = config::load(cli.config.as_deref(), &config::process_env(), &overrides)?;
    match cli.command {
        Command::Serve { dev } => {
            config.dev = dev;
            serve(config).await
        }
        Command::Token {
            role,
            subject,
            minutes,
        } => token(&config, &role, &subject, minutes),
        Command::Import { path, partner } => import(config, &path, &partner).await,
        Command::Retention { dry_run, as_of } => retention(config, dry_run, as_of.as_deref()).await,
    }
}

async fn serve(config: config::Config) -> anyhow::Result<ExitCode> {
    if config.partners.is_empty() {
        tracing::warn!("no partners configured: every DICOM association will be rejected; add [[partners]] to konsil.toml");
    }
    let tls = konsil::tls::Tls::open(&config)?;
    let server = &config.server;
    let listeners = Listeners {
        http: bind(server.http, "HTTP").await?,
        https: bind(server.https, "HTTPS").await?,
        dicom: bind(server.dicom, "DICOM").await?,
        dicom_tls: bind(server.dicom_tls, "DICOM TLS").await?,
        tls,
    };
    let app = App::open(config).await?;
    if app.config.dev {
        tracing::warn!(
            "DEVELOPMENT MODE (--dev): AUTHENTICATION IS OFF. Anyone who reaches the HTTP port acts as \
             staff with every role, or as any partner via X-Konsil-Partner. Never use --dev with real \
             patients' data."
        );
        if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            eprintln!("\n*** konsil serve --dev: authentication is OFF; never use it with real patients' data ***\n");
        }
    }
    let address = |l: &Option<TcpListener>| {
        l.as_ref()
            .and_then(|l| l.local_addr().ok())
            .map_or_else(|| "off".to_owned(), |a| a.to_string())
    };
    tracing::info!(
        http = %address(&listeners.http),
        https = %address(&listeners.https),
        dicom = %address(&listeners.dicom),
        dicom_tls = %address(&listeners.dicom_tls),
        mutual_tls = listeners.tls.as_ref().is_some_and(|t| t.mutual()),
        ae_title = %app.config.server.ae_title,
        data_dir = %app.config.server.data_dir.display(),
        partners = app.config.partners.len(),
        "konsil is up"
    );
    konsil::run(app, listeners, shutdown_signal()).await;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// Bind `address` if that listener is on.
async fn bind(address: Option<SocketAddr>, what: &str) -> anyhow::Result<Option<TcpListener>> {
    match address {
        None => Ok(None),
        Some(address) => TcpListener::bind(address)
            .await
            .map(Some)
            .with_context(|| format!("cannot listen for {what} on {address}")),
    }
}

async fn import(
    config: config::Config,
    path: &std::path::Path,
    partner: &str,
) -> anyhow::Result<ExitCode> {
    let partner = PartnerId::parse(partner)?;
    if config.partner(&partner).is_none() {
        anyhow::bail!(
            "partner {partner} is not configured; add it as [[partners]] in the config file"
        );
    }
    let app = App::open_without_recovery(config).await?;
    let transfer = konsil::ids::TransferId::new();
    // A server starting while this import runs must leave its notes to it.
    app.index.transfer_started(transfer).await?;
    let summary = konsil::import::run(&app.ingest, &partner, path, transfer).await;
    // Every import is acknowledged only once durable: unless `serve` (or
    // another import) still has the store open, the next start may skip
    // the check for objects a crash tore.
    let blobs = std::sync::Arc::clone(&app.blobs);
    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || blobs.close()).await {
        tracing::warn!(error = %e, "cannot mark the blob store closed cleanly");
    }
    let summary = summary?;
    // The import is a DICOM store on the partner's behalf: it goes into the
    // audit trail like an association does.
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".to_owned());
    let mut record = AuditRecord::new(Kind::DicomStore, "C", Actor::Operator { user }).outcome(
        if summary.rejected.is_empty() {
            Outcome::Success
        } else {
            Outcome::MinorFailure
        },
        Some(format!(
            "konsil import for partner {partner}: {} stored, {} duplicate, {} rejected",
            summary.stored,
            summary.duplicate,
            summary.rejected.len()
        )),
    );
    for (uid, instances) in &summary.studies {
        record = record.entity(Entity::Study {
            uid: uid.clone(),
            instances: Some(*instances),
        });
    }
    app.audit_now(record.transfer(summary.transfer)).await;
    print!("{}", summary.report());
    Ok(if summary.rejected.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

async fn retention(
    config: config::Config,
    dry_run: bool,
    as_of: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let as_of_ms = match as_of {
        None => chrono::Utc::now().timestamp_millis(),
        Some(text) => konsil::fhir::search::date_range(text)
            .map(|(start, _)| start)
            .with_context(|| {
                format!("--as-of {text:?} is not a date (YYYY-MM-DD) or a FHIR dateTime")
            })?,
    };
    let app = App::open_without_recovery(config).await?;
    let reports = app
        .retention()
        .run(as_of_ms, dry_run)
        .await
        .map_err(|e| anyhow::anyhow!("retention failed: {e}"))?;
    let verb = if dry_run {
        "would discard"
    } else {
        "discarded"
    };
    for r in &reports {
        println!(
            "{} (last activity {}): {verb} {} studies ({} instances), the content of {} documents, {} binaries",
            r.task, r.last_activity, r.studies, r.instances, r.documents, r.binaries
        );
    }
    println!(
        "{} case(s); retention period {} months{}",
        reports.len(),
        app.config.workflow.retention_months,
        if dry_run {
            "; dry run, nothing changed"
        } else {
            ""
        }
    );
    Ok(ExitCode::SUCCESS)
}

fn token(
    config: &config::Config,
    roles: &[String],
    subject: &str,
    minutes: u64,
) -> anyhow::Result<ExitCode> {
    let roles = roles
        .iter()
        .map(|r| {
            konsil::auth::Role::parse(r.trim()).with_context(|| {
                format!("--role {r:?}: use coordinator, specialist, approver, auditor or admin")
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if minutes == 0 || minutes > 24 * 60 {
        anyhow::bail!("--minutes must be 1 to 1440");
    }
    if subject.trim().is_empty() {
        anyhow::bail!("--subject must not be empty");
    }
    let authority = konsil::auth::Authority::open(config)?;
    let token = authority.staff_token(
        subject,
        &roles,
        std::time::Duration::from_secs(minutes * 60),
    )?;
    println!("{token}");
    Ok(ExitCode::SUCCESS)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Logs go to stderr: `KONSIL_LOG` filters (tracing EnvFilter syntax,
/// default `info`), `KONSIL_LOG_FORMAT=json` gives one JSON object per line
/// for log shippers.
fn init_logging() {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("KONSIL_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("KONSIL_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json")) {
        builder.json().init();
    } else {
        builder.with_ansi(std::io::stderr().is_terminal()).init();
    }
}

/// glibc's malloc serves blocks of 128 KiB and more (PDU buffers, body
/// chunks, the ingest pipeline's 256 KiB chunks) with fresh `mmap`s, and
/// gives freed heap back to the kernel eagerly: every instance then pays
/// page faults and zeroing for memory it just freed. Keeping such blocks
/// in the heap made STOW-RS of single CT slices about 30 % faster here
/// (benches/dicomweb.sh) at the same peak RSS, which the buffer sizes bound
/// (not the instance size). Must run before any other thread starts.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn tune_allocator() {
    /// glibc's ceiling for the mmap threshold on 64-bit.
    const MMAP_THRESHOLD: libc::c_int = 32 << 20;
    const TRIM_THRESHOLD: libc::c_int = 256 << 20;
    // SAFETY: mallopt only sets allocator parameters; no thread but this
    // one exists yet. A refused setting (returns 0) only costs speed.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_allocator() {}
