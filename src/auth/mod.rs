//! Who is calling. Until token authentication lands (issue 6), HTTP callers
//! use the development identity of `design.md`: a request with
//! `X-Konsil-Partner: ID` acts as that partner's system client, one without
//! it as staff with every role.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use crate::app::App;
use crate::config::Config;
use crate::ids::PartnerId;

/// The development identity header.
pub const PARTNER_HEADER: &str = "x-konsil-partner";

/// The caller of an HTTP request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// Service staff: every role, every partner's data.
    Staff,
    /// A referring partner's system: its own data only.
    Partner(PartnerId),
}

impl Caller {
    /// The partners whose data this caller may see.
    pub fn visible_partners(&self, config: &Config) -> Vec<PartnerId> {
        match self {
            Caller::Staff => config.partners.iter().map(|p| p.id.clone()).collect(),
            Caller::Partner(id) => vec![id.clone()],
        }
    }
}

/// Why the caller could not be identified.
#[derive(Debug, thiserror::Error)]
pub enum CallerError {
    #[error("{PARTNER_HEADER} is not a valid partner id: {0}")]
    Invalid(String),
    #[error("{PARTNER_HEADER} names no configured partner ({0})")]
    Unknown(PartnerId),
}

impl axum::response::IntoResponse for CallerError {
    fn into_response(self) -> axum::response::Response {
        (axum::http::StatusCode::FORBIDDEN, format!("{self}\n")).into_response()
    }
}

impl FromRequestParts<Arc<App>> for Caller {
    type Rejection = CallerError;

    async fn from_request_parts(
        parts: &mut Parts,
        app: &Arc<App>,
    ) -> Result<Self, Self::Rejection> {
        let Some(raw) = parts.headers.get(PARTNER_HEADER) else {
            return Ok(Caller::Staff);
        };
        let text = raw
            .to_str()
            .map_err(|_| CallerError::Invalid("not visible ASCII".into()))?;
        let id = PartnerId::parse(text.trim()).map_err(|e| CallerError::Invalid(e.to_string()))?;
        if app.config.partner(&id).is_none() {
            return Err(CallerError::Unknown(id));
        }
        Ok(Caller::Partner(id))
    }
}
