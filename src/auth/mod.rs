//! Who is calling, and what they may do.
//!
//! HTTP callers present a bearer token: one Konsil issued at `/auth/token`
//! to a partner's system (SMART Backend Services), one `konsil token`
//! printed for staff, or one from the configured staff OpenID Connect
//! issuer. Each edge authenticates a request once ([`authenticate`]), maps
//! a failure to its own error form, and asks [`policy::authorize`] before
//! acting. Under `konsil serve --dev` there is no authentication: the
//! development identity of `design.md` applies (`X-Konsil-Partner: ID` acts
//! as that partner's system with every scope, no header as staff with every
//! role).

pub mod cases;
pub mod policy;
pub mod scope;
mod staff;
pub mod token;

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue};

use crate::app::App;
use crate::config::Config;
use crate::ids::PartnerId;

pub use policy::{authorize, Action, Denied};
pub use scope::{Permission, Scopes};
pub use token::Authority;

/// The development identity header (only under `--dev`).
pub const PARTNER_HEADER: &str = "x-konsil-partner";

/// A staff role of the second-opinion service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Checks referrals, assigns specialists, links studies.
    Coordinator,
    /// Reads cases and writes the opinion.
    Specialist,
    /// Approves (or returns) opinions.
    Approver,
    /// Reads the audit trail, nothing else.
    Auditor,
    /// Everything but the audit trail.
    Admin,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Coordinator,
        Role::Specialist,
        Role::Approver,
        Role::Auditor,
        Role::Admin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::Specialist => "specialist",
            Role::Approver => "approver",
            Role::Auditor => "auditor",
            Role::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == text)
    }
}

/// A member of the service's staff.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaffUser {
    /// Who (the token's `sub`); goes into the audit trail, never PHI.
    pub subject: String,
    pub roles: Vec<Role>,
    /// For a case-restricted specialist, the cases assigned (set by the
    /// edge's gate, [`cases::scoped`]); `None`: every partner's data.
    pub cases: Option<Arc<cases::CaseScope>>,
}

/// A referring partner's system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartnerClient {
    pub partner: PartnerId,
    /// The registered client (`None` for the development identity).
    pub client_id: Option<String>,
    /// What the access token grants.
    pub scopes: Scopes,
}

/// The caller of an HTTP request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// Service staff: every partner's data, within their roles.
    Staff(StaffUser),
    /// A referring partner's system: its own data only, within its scopes.
    Partner(PartnerClient),
}

impl Caller {
    /// The development identity's staff: every role.
    pub fn dev_staff() -> Caller {
        Caller::Staff(StaffUser {
            subject: "dev".to_owned(),
            roles: Role::ALL.to_vec(),
            cases: None,
        })
    }

    /// The development identity of a partner: every scope.
    pub fn dev_partner(partner: PartnerId) -> Caller {
        Caller::Partner(PartnerClient {
            partner,
            client_id: None,
            scopes: Scopes::everything(),
        })
    }

    /// The partner this caller acts for (`None` for staff).
    pub fn partner(&self) -> Option<&PartnerId> {
        match self {
            Caller::Staff(_) => None,
            Caller::Partner(client) => Some(&client.partner),
        }
    }

    /// The cases a case-restricted specialist may see (`None`: not
    /// restricted by case).
    pub fn case_scope(&self) -> Option<&cases::CaseScope> {
        match self {
            Caller::Staff(staff) => staff.cases.as_deref(),
            Caller::Partner(_) => None,
        }
    }

    pub fn is_staff(&self) -> bool {
        matches!(self, Caller::Staff(_))
    }
}

/// Why a request carries no usable identity (401), or names an unknown
/// development partner (403).
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallerError {
    #[error("this endpoint needs a bearer access token (Authorization: Bearer …); partner systems get one at /auth/token (SMART Backend Services), staff from `konsil token` or the staff sign-in")]
    Missing,
    #[error("the access token is not valid: {0}")]
    InvalidToken(String),
    #[error("{PARTNER_HEADER} is not a valid partner id: {0}")]
    InvalidPartner(String),
    #[error("{PARTNER_HEADER} names no configured partner ({0})")]
    UnknownPartner(PartnerId),
    #[error("partner {partner} is over its request rate (requests_per_minute); retry in {retry_after} s")]
    Throttled {
        partner: PartnerId,
        retry_after: u64,
    },
}

impl CallerError {
    /// 401 for a missing or bad token, 403 for the development header.
    pub fn status(&self) -> axum::http::StatusCode {
        match self {
            CallerError::Missing | CallerError::InvalidToken(_) => {
                axum::http::StatusCode::UNAUTHORIZED
            }
            CallerError::InvalidPartner(_) | CallerError::UnknownPartner(_) => {
                axum::http::StatusCode::FORBIDDEN
            }
            CallerError::Throttled { .. } => axum::http::StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// The `WWW-Authenticate` challenge of a 401 (RFC 6750 section 3).
    pub fn challenge(&self) -> Option<HeaderValue> {
        let text = match self {
            CallerError::Missing => "Bearer realm=\"konsil\"".to_owned(),
            CallerError::InvalidToken(why) => format!(
                "Bearer realm=\"konsil\", error=\"invalid_token\", error_description=\"{}\"",
                why.replace(['"', '\\'], "'")
            ),
            _ => return None,
        };
        HeaderValue::from_str(&text).ok()
    }

    /// An edge's error response with the challenge added (a 401 must
    /// carry `WWW-Authenticate`, a 429 says when to come back).
    pub fn challenged(&self, mut response: axum::response::Response) -> axum::response::Response {
        if let Some(value) = self.challenge() {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, value);
        }
        if let CallerError::Throttled { retry_after, .. } = self {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
        }
        response
    }
}

impl axum::response::IntoResponse for CallerError {
    fn into_response(self) -> axum::response::Response {
        self.challenged((self.status(), format!("{self}\n")).into_response())
    }
}

/// Identify the caller of a request: by its bearer token, or under `--dev`
/// by the development identity. Over a partner's TLS client certificate
/// the caller must be that partner (mutual TLS binds the connection).
/// A refusal for missing or bad credentials is recorded in the audit trail
/// as a failed login. A case-restricted specialist comes back with the
/// cases assigned ([`cases::scoped`]).
pub async fn authenticate(
    app: &App,
    headers: &HeaderMap,
    extensions: &axum::http::Extensions,
    uri: &axum::http::Uri,
) -> Result<Caller, GateError> {
    let caller = match identify(app, headers, extensions).await {
        Ok(caller) => caller,
        Err(e) => {
            if let Some(record) = refusal_audit(&e, uri) {
                app.auditor.record(record).await;
            }
            return Err(GateError::Caller(e));
        }
    };
    cases::scoped(&*app.resources, caller)
        .await
        .map_err(GateError::Store)
}

/// Why an edge's gate lets a request no further.
#[derive(Debug)]
pub enum GateError {
    /// No usable identity (401, 403 or 429).
    Caller(CallerError),
    /// The index could not say which cases a specialist has.
    Store(crate::store::MetaError),
}

async fn identify(
    app: &App,
    headers: &HeaderMap,
    extensions: &axum::http::Extensions,
) -> Result<Caller, CallerError> {
    let caller = if app.config.dev {
        dev_identity(&app.config, headers)?
    } else {
        app.authority
            .verify(&app.config, bearer_token(headers)?)
            .await?
    };
    certificate_partner_check(&caller, extensions)?;
    if let Some(partner) = caller.partner() {
        app.limits
            .request(partner)
            .map_err(|retry_after| CallerError::Throttled {
                partner: partner.clone(),
                retry_after,
            })?;
    }
    Ok(caller)
}

/// The audit record of a request refused before its caller was known
/// (throttled partners are known and only counted).
fn refusal_audit(e: &CallerError, uri: &axum::http::Uri) -> Option<crate::audit::AuditRecord> {
    match e {
        CallerError::Throttled { .. } => None,
        _ => Some(crate::audit::AuditRecord::refused_credentials(
            &e.to_string(),
            uri.path(),
        )),
    }
}

/// The partner of the connection's verified TLS client certificate must be
/// the caller's: a stolen token is no use from another partner's machine,
/// and a partner's machine cannot act as staff or as another partner.
pub fn certificate_partner_check(
    caller: &Caller,
    extensions: &axum::http::Extensions,
) -> Result<(), CallerError> {
    let certified = extensions
        .get::<axum::extract::ConnectInfo<crate::tls::TlsPeer>>()
        .and_then(|info| info.0.certificate.as_ref());
    match (certified, caller.partner()) {
        (None, _) => Ok(()),
        (Some((_, certified)), Some(partner)) if certified == partner => Ok(()),
        (Some((_, certified)), _) => Err(CallerError::InvalidToken(format!(
            "the connection's TLS client certificate speaks for partner {certified}; a token of \
             another partner or of staff is not accepted over it"
        ))),
    }
}

fn bearer_token(headers: &HeaderMap) -> Result<&str, CallerError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(CallerError::Missing);
    };
    let text = value
        .to_str()
        .map_err(|_| CallerError::InvalidToken("the Authorization header is not ASCII".into()))?;
    match text.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(token.trim())
        }
        _ => Err(CallerError::Missing),
    }
}

fn dev_identity(config: &Config, headers: &HeaderMap) -> Result<Caller, CallerError> {
    let Some(raw) = headers.get(PARTNER_HEADER) else {
        return Ok(Caller::dev_staff());
    };
    let text = raw
        .to_str()
        .map_err(|_| CallerError::InvalidPartner("not visible ASCII".into()))?;
    let id =
        PartnerId::parse(text.trim()).map_err(|e| CallerError::InvalidPartner(e.to_string()))?;
    if config.partner(&id).is_none() {
        return Err(CallerError::UnknownPartner(id));
    }
    Ok(Caller::dev_partner(id))
}

/// The caller an edge's middleware authenticated (it puts the [`Caller`]
/// into the request's extensions; a route outside such an edge has none).
impl FromRequestParts<Arc<App>> for Caller {
    type Rejection = CallerError;

    async fn from_request_parts(
        parts: &mut Parts,
        _app: &Arc<App>,
    ) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Caller>()
            .cloned()
            .ok_or(CallerError::Missing)
    }
}
