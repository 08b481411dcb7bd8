//! Konsil as a SMART Backend Services authorisation server (SMART App
//! Launch 2.x, "Backend Services"): a partner's registered client posts a
//! `private_key_jwt` client assertion to `/auth/token` and gets a short
//! access token with the SMART v2 system scopes it asked for, cut to what
//! it is registered for. Konsil signs its access tokens (ES384) with its
//! own key, which also signs `konsil token` staff tokens. Staff may also
//! sign in with a configured OpenID Connect issuer's tokens.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use jsonwebtoken::jwk::{Jwk, ThumbprintHash};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::scope::Scopes;
use super::staff::StaffIssuer;
use super::{Caller, CallerError, PartnerClient, Role, StaffUser};
use crate::app::App;
use crate::audit::{Actor, AuditRecord, Kind, Outcome};
use crate::config::Config;
use crate::ids::PartnerId;

/// `client_assertion_type` of RFC 7523 client authentication.
const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// `iss` of every token Konsil signs.
const ISSUER: &str = "konsil";
/// Clock skew tolerated on `exp` and `iat`.
pub(super) const LEEWAY_SECS: u64 = 30;
/// The largest token request body (a client assertion is a few KiB).
const MAX_TOKEN_REQUEST: usize = 64 * 1024;

/// Why the authority could not start.
#[derive(Debug, thiserror::Error)]
pub enum AuthStartError {
    #[error("cannot read the token-signing key {path}: {source}")]
    ReadKey {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create the token-signing key {path}: {source}")]
    WriteKey {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the token-signing key {path} is not a PKCS#8 PEM P-384 private key: {reason}")]
    BadKey { path: PathBuf, reason: String },
    #[error("auth.staff_jwks_file {path}: {reason}")]
    StaffJwks { path: PathBuf, reason: String },
    #[error("auth.staff_issuer {issuer}: {reason}")]
    StaffIssuer { issuer: String, reason: String },
}

/// Claims of the access tokens Konsil signs.
#[derive(Debug, Serialize, Deserialize)]
struct AccessClaims {
    iss: String,
    sub: String,
    iat: i64,
    exp: i64,
    jti: String,
    /// Partner tokens: the partner and the granted scopes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    partner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scope: Option<String>,
    /// Staff tokens: the roles.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    roles: Option<Vec<String>>,
}

/// Claims of a partner's client assertion that we read (the rest are
/// checked by the validation).
#[derive(Debug, Deserialize)]
struct AssertionClaims {
    exp: i64,
    #[serde(default)]
    jti: Option<String>,
}

/// Issues and checks tokens.
pub struct Authority {
    signing: EncodingKey,
    verifying: DecodingKey,
    /// Our public key, published at `/auth/jwks.json`.
    public: Jwk,
    kid: String,
    staff: Option<StaffIssuer>,
    access_token_secs: u64,
    max_assertion_secs: u64,
    token_url: Option<String>,
    /// Tokens already verified, until they expire: a request with a known
    /// token skips the signature check.
    verified: moka::sync::Cache<String, (Caller, i64)>,
}

impl Authority {
    /// Load (or at first start create) the signing key and the staff
    /// issuer's keys.
    pub fn open(config: &Config) -> Result<Authority, AuthStartError> {
        let path = signing_key_path(config);
        let pem = load_or_create_key(&path)?;
        let bad = |reason: String| AuthStartError::BadKey {
            path: path.clone(),
            reason,
        };
        let signing = EncodingKey::from_ec_pem(pem.as_bytes()).map_err(|e| bad(e.to_string()))?;
        let mut public =
            Jwk::from_encoding_key(&signing, Algorithm::ES384).map_err(|e| bad(e.to_string()))?;
        let kid = public
            .thumbprint(ThumbprintHash::SHA256)
            .map_err(|e| bad(e.to_string()))?;
        public.common.key_id = Some(kid.clone());
        let verifying = DecodingKey::from_jwk(&public).map_err(|e| bad(e.to_string()))?;
        Ok(Authority {
            signing,
            verifying,
            public,
            kid,
            staff: StaffIssuer::from_config(&config.auth)?,
            access_token_secs: config.auth.access_token_secs,
            max_assertion_secs: config.auth.max_assertion_secs,
            token_url: config.auth.token_url.clone(),
            verified: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(config.auth.access_token_secs.max(3600)))
                .build(),
        })
    }

    /// A staff token signed by Konsil (`konsil token`).
    pub fn staff_token(
        &self,
        subject: &str,
        roles: &[Role],
        lifetime: Duration,
    ) -> Result<String, jsonwebtoken::errors::Error> {
        let now = now_secs();
        self.sign(&AccessClaims {
            iss: ISSUER.to_owned(),
            sub: subject.to_owned(),
            iat: now,
            exp: now + i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX / 2),
            jti: uuid::Uuid::new_v4().to_string(),
            partner: None,
            scope: None,
            roles: Some(roles.iter().map(|r| r.as_str().to_owned()).collect()),
        })
    }

    fn sign(&self, claims: &AccessClaims) -> Result<String, jsonwebtoken::errors::Error> {
        let mut header = Header::new(Algorithm::ES384);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.signing)
    }

    /// The caller a bearer token stands for.
    pub async fn verify(&self, config: &Config, token: &str) -> Result<Caller, CallerError> {
        let now = now_secs();
        if let Some((caller, exp)) = self.verified.get(token) {
            if exp > now {
                return Ok(caller);
            }
            self.verified.invalidate(token);
        }
        let invalid = |why: &str| CallerError::InvalidToken(why.to_owned());
        let header = jsonwebtoken::decode_header(token).map_err(|_| invalid("not a JWT"))?;
        let (caller, exp) = if header.kid.as_deref() == Some(self.kid.as_str()) {
            self.verify_own(config, token)?
        } else if let Some(staff) = &self.staff {
            staff.verify(token, &header).await?
        } else {
            return Err(invalid("not signed by this server"));
        };
        self.verified
            .insert(token.to_owned(), (caller.clone(), exp));
        Ok(caller)
    }

    fn verify_own(&self, config: &Config, token: &str) -> Result<(Caller, i64), CallerError> {
        let mut validation = Validation::new(Algorithm::ES384);
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "iss", "sub"]);
        validation.validate_aud = false;
        validation.leeway = LEEWAY_SECS;
        let claims = jsonwebtoken::decode::<AccessClaims>(token, &self.verifying, &validation)
            .map_err(|e| CallerError::InvalidToken(token_error(&e)))?
            .claims;
        let caller = match (claims.partner, claims.roles) {
            (Some(partner), None) => {
                // The registration as configured now: a client removed from
                // the config, or narrowed, loses access at once.
                let partner_id = PartnerId::parse(&partner)
                    .map_err(|_| CallerError::InvalidToken("unknown partner".into()))?;
                let (owner, client) = config.client(&claims.sub).ok_or_else(|| {
                    CallerError::InvalidToken("the client is no longer registered".into())
                })?;
                if owner.id != partner_id {
                    return Err(CallerError::InvalidToken(
                        "the client belongs to another partner".into(),
                    ));
                }
                let granted =
                    Scopes::parse(claims.scope.as_deref().unwrap_or("").split_whitespace())
                        .map_err(|e| CallerError::InvalidToken(e.to_string()))?;
                Caller::Partner(PartnerClient {
                    partner: partner_id,
                    client_id: Some(claims.sub),
                    scopes: granted.within(&client.scopes),
                })
            }
            (None, Some(roles)) => Caller::Staff(StaffUser {
                subject: claims.sub,
                roles: roles.iter().filter_map(|r| Role::parse(r)).collect(),
                cases: None,
            }),
            _ => {
                return Err(CallerError::InvalidToken(
                    "neither a partner nor a staff token".into(),
                ))
            }
        };
        Ok((caller, claims.exp))
    }

    /// The token endpoint's URL as clients reach it (the `aud` of their
    /// assertions).
    fn token_url(&self, app: &App, headers: &HeaderMap) -> String {
        app.public_base(self.token_url.as_deref(), headers, "/auth/token")
    }

    /// Check a client assertion and issue an access token.
    async fn grant(
        &self,
        app: &App,
        headers: &HeaderMap,
        form: &TokenRequest,
    ) -> Result<TokenResponse, OAuthError> {
        if form.grant_type.as_deref() != Some("client_credentials") {
            return Err(OAuthError::new(
                "unsupported_grant_type",
                "grant_type must be client_credentials (SMART Backend Services)",
            ));
        }
        if form.client_assertion_type.as_deref() != Some(JWT_BEARER) {
            return Err(OAuthError::new(
                "invalid_request",
                format!("client_assertion_type must be {JWT_BEARER}"),
            ));
        }
        let Some(assertion) = form.client_assertion.as_deref() else {
            return Err(OAuthError::new(
                "invalid_request",
                "client_assertion is missing",
            ));
        };
        let Some(requested) = form.scope.as_deref().filter(|s| !s.trim().is_empty()) else {
            return Err(OAuthError::new("invalid_scope", "scope is required"));
        };
        let requested = Scopes::parse(requested.split_whitespace())
            .map_err(|e| OAuthError::new("invalid_scope", e.to_string()))?;

        let header = jsonwebtoken::decode_header(assertion)
            .map_err(|_| OAuthError::client("client_assertion is not a JWT"))?;
        if !matches!(header.alg, Algorithm::RS384 | Algorithm::ES384) {
            return Err(OAuthError::client(format!(
                "client assertions are signed with RS384 or ES384, not {:?}",
                header.alg
            )));
        }
        let kid = header
            .kid
            .as_deref()
            .ok_or_else(|| OAuthError::client("the client assertion's header has no kid"))?;
        // Which client: `iss` (= `sub` = client_id), read before the
        // signature check only to find the keys to check it with.
        let client_id = jsonwebtoken::dangerous::insecure_decode::<serde_json::Value>(assertion)
            .ok()
            .and_then(|t| {
                t.claims
                    .get("iss")
                    .and_then(|v| v.as_str())
                    .map(str::to_owned)
            })
            .ok_or_else(|| OAuthError::client("the client assertion has no iss"))?;
        let (partner, client) = app
            .config
            .client(&client_id)
            .ok_or_else(|| OAuthError::client("unknown client_id"))?;
        let jwk = client
            .jwks
            .find(kid)
            .ok_or_else(|| OAuthError::client("no registered key has the assertion's kid"))?;
        if let Some(alg) = jwk.common.key_algorithm {
            if format!("{alg:?}") != format!("{:?}", header.alg) {
                return Err(OAuthError::client(
                    "the key's alg differs from the assertion's",
                ));
            }
        }
        let key = DecodingKey::from_jwk(jwk)
            .map_err(|_| OAuthError::client("the registered key is not usable"))?;
        let mut validation = Validation::new(header.alg);
        validation.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
        validation.set_issuer(&[&client_id]);
        validation.sub = Some(client_id.clone());
        validation.set_audience(&[self.token_url(app, headers)]);
        validation.leeway = LEEWAY_SECS;
        let claims = jsonwebtoken::decode::<AssertionClaims>(assertion, &key, &validation)
            .map_err(|e| {
                OAuthError::client(format!("client assertion refused: {}", token_error(&e)))
            })?
            .claims;
        let now = now_secs();
        // SMART Backend Services: exp "no more than five minutes in the
        // future" (max_assertion_secs, at most 300), by the client's clock:
        // the leeway absorbs a client clock a little ahead of ours.
        let longest = i64::try_from(self.max_assertion_secs + LEEWAY_SECS).unwrap_or(i64::MAX);
        if claims.exp - now > longest {
            return Err(OAuthError::client(format!(
                "the client assertion's exp is more than {} s ahead",
                self.max_assertion_secs
            )));
        }
        let jti = claims.jti.unwrap_or_default();
        if jti.is_empty() || jti.len() > 255 {
            return Err(OAuthError::client(
                "the client assertion needs a jti of 1-255 characters",
            ));
        }
        let fresh = app
            .assertions
            .first_use(
                &client_id,
                &jti,
                // Remembered while the assertion could still pass the exp
                // check, leeway included: until then a replay is refused.
                claims
                    .exp
                    .saturating_add(LEEWAY_SECS as i64)
                    .saturating_mul(1000),
                now * 1000,
            )
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "cannot record a client assertion");
                OAuthError::unavailable()
            })?;
        if !fresh {
            return Err(OAuthError::client(
                "the client assertion's jti was already used",
            ));
        }
        let granted = requested.within(&client.scopes);
        if granted.is_empty() {
            return Err(OAuthError::new(
                "invalid_scope",
                format!(
                    "none of the requested scopes is granted to this client (registered: {})",
                    client.scopes
                ),
            ));
        }
        let lifetime = i64::try_from(self.access_token_secs).unwrap_or(300);
        let scope = granted.to_string();
        let access_token = self
            .sign(&AccessClaims {
                iss: ISSUER.to_owned(),
                sub: client_id.clone(),
                iat: now,
                exp: now + lifetime,
                jti: uuid::Uuid::new_v4().to_string(),
                partner: Some(partner.id.to_string()),
                scope: Some(scope.clone()),
                roles: None,
            })
            .map_err(|e| {
                tracing::error!(error = %e, "cannot sign an access token");
                OAuthError::unavailable()
            })?;
        tracing::info!(client_id = %client_id, partner = %partner.id, scope = %scope, "access token issued");
        Ok(TokenResponse {
            access_token,
            token_type: "bearer",
            expires_in: lifetime,
            scope,
        })
    }
}

/// Where the signing key lives.
pub fn signing_key_path(config: &Config) -> PathBuf {
    config
        .auth
        .signing_key
        .clone()
        .unwrap_or_else(|| config.server.data_dir.join("auth").join("signing-key.pem"))
}

/// Read the key, or create it (owner-only file) if there is none yet. Two
/// processes starting at once end up with the same key: the file appears
/// whole (written aside, then linked into place without replacing).
fn load_or_create_key(path: &Path) -> Result<String, AuthStartError> {
    match std::fs::read_to_string(path) {
        Ok(pem) => return Ok(pem),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(AuthStartError::ReadKey {
                path: path.to_owned(),
                source,
            })
        }
    }
    let write_err = |source| AuthStartError::WriteKey {
        path: path.to_owned(),
        source,
    };
    use p384::pkcs8::EncodePrivateKey;
    let key = p384::SecretKey::random(&mut rand_core::OsRng);
    let pem = key
        .to_pkcs8_pem(p384::pkcs8::LineEnding::LF)
        .map_err(|e| write_err(std::io::Error::other(e.to_string())))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(write_err)?;
    }
    let aside = path.with_extension(format!("new-{}", std::process::id()));
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&aside)
            .map_err(write_err)?;
        file.write_all(pem.as_bytes()).map_err(write_err)?;
        file.sync_all().map_err(write_err)?;
    }
    let linked = std::fs::hard_link(&aside, path);
    let _ = std::fs::remove_file(&aside);
    match linked {
        Ok(()) => {
            tracing::info!(path = %path.display(), "created the token-signing key");
            Ok(pem.to_string())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => std::fs::read_to_string(path)
            .map_err(|source| AuthStartError::ReadKey {
                path: path.to_owned(),
                source,
            }),
        Err(e) => Err(write_err(e)),
    }
}

fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

/// A JWT check failure as words for the caller (no token content).
pub(super) fn token_error(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind;
    match e.kind() {
        ErrorKind::ExpiredSignature => "expired".into(),
        ErrorKind::InvalidSignature => "bad signature".into(),
        ErrorKind::InvalidAudience => "wrong aud (must be the token endpoint URL)".into(),
        ErrorKind::InvalidIssuer => "wrong iss".into(),
        ErrorKind::InvalidSubject => "sub must equal iss (the client_id)".into(),
        ErrorKind::ImmatureSignature => "not valid yet (nbf)".into(),
        ErrorKind::MissingRequiredClaim(claim) => format!("the {claim} claim is missing"),
        ErrorKind::InvalidAlgorithm => "the key does not fit the algorithm".into(),
        _ => "malformed".into(),
    }
}

/// The form of a token request (RFC 6749 section 4.4, RFC 7523).
#[derive(Debug, Default)]
struct TokenRequest {
    grant_type: Option<String>,
    scope: Option<String>,
    client_assertion_type: Option<String>,
    client_assertion: Option<String>,
}

#[derive(Debug, Serialize)]
struct TokenResponse {
    access_token: String,
    token_type: &'static str,
    expires_in: i64,
    scope: String,
}

/// An OAuth 2.0 error response (RFC 6749 section 5.2).
#[derive(Debug)]
struct OAuthError {
    status: StatusCode,
    code: &'static str,
    description: String,
}

impl OAuthError {
    fn new(code: &'static str, description: impl Into<String>) -> OAuthError {
        OAuthError {
            status: StatusCode::BAD_REQUEST,
            code,
            description: description.into(),
        }
    }

    /// Client authentication failed (SMART: `invalid_client`).
    fn client(description: impl Into<String>) -> OAuthError {
        OAuthError {
            status: StatusCode::UNAUTHORIZED,
            code: "invalid_client",
            description: description.into(),
        }
    }

    fn unavailable() -> OAuthError {
        OAuthError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "temporarily_unavailable",
            description: "the token service cannot record assertions now; retry later".into(),
        }
    }
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        (
            self.status,
            [
                (header::CACHE_CONTROL, "no-store"),
                (header::CONTENT_TYPE, "application/json"),
            ],
            json!({"error": self.code, "error_description": self.description}).to_string(),
        )
            .into_response()
    }
}

/// `/auth/token`, `/auth/jwks.json` and the SMART configuration document.
pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/auth/token", post(token))
        .route("/auth/jwks.json", get(jwks))
        .route(
            "/fhir/.well-known/smart-configuration",
            get(smart_configuration),
        )
}

async fn token(
    State(app): State<Arc<App>>,
    peer: Option<axum::Extension<axum::extract::ConnectInfo<crate::tls::TlsPeer>>>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| {
            v.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        });
    if !is_form {
        return OAuthError::new(
            "invalid_request",
            "send the token request as application/x-www-form-urlencoded",
        )
        .into_response();
    }
    let Ok(bytes) = axum::body::to_bytes(body, MAX_TOKEN_REQUEST).await else {
        return OAuthError::new(
            "invalid_request",
            "the token request is too large or broken",
        )
        .into_response();
    };
    let mut form = TokenRequest::default();
    for (name, value) in form_urlencoded::parse(&bytes) {
        let slot = match name.as_ref() {
            "grant_type" => &mut form.grant_type,
            "scope" => &mut form.scope,
            "client_assertion_type" => &mut form.client_assertion_type,
            "client_assertion" => &mut form.client_assertion,
            _ => continue,
        };
        if slot.is_some() {
            return OAuthError::new("invalid_request", format!("{name} is given twice"))
                .into_response();
        }
        *slot = Some(value.into_owned());
    }
    let mut result = app.authority.grant(&app, &headers, &form).await;
    // Over a partner's TLS client certificate, only that partner's clients.
    if let (Ok(_), Some((_, certified))) = (
        &result,
        peer.as_ref().and_then(|p| p.0 .0.certificate.as_ref()),
    ) {
        let client_partner = assertion_client_id(&form)
            .and_then(|id| app.config.client(&id).map(|(p, _)| p.id.clone()));
        if client_partner.as_ref() != Some(certified) {
            result = Err(OAuthError::client(format!(
                "the connection's TLS client certificate speaks for partner {certified}, not for this client's"
            )));
        }
    }
    if let Some(record) = login_audit(&app.config, &form, &result) {
        app.auditor.record(record).await;
    }
    match result {
        Ok(granted) => (
            StatusCode::OK,
            [
                (header::CACHE_CONTROL, "no-store"),
                (header::PRAGMA, "no-cache"),
                (header::CONTENT_TYPE, "application/json"),
            ],
            serde_json::to_string(&granted).unwrap_or_default(),
        )
            .into_response(),
        Err(e) => {
            tracing::info!(error = e.code, reason = %e.description, "token request refused");
            e.into_response()
        }
    }
}

/// The audit record of a token request: by its client when the assertion
/// names a registered one, else a failed login of an unidentified caller.
fn login_audit(
    config: &Config,
    form: &TokenRequest,
    result: &Result<TokenResponse, OAuthError>,
) -> Option<AuditRecord> {
    let known = assertion_client_id(form)
        .and_then(|id| config.client(&id).map(|(partner, _)| (partner, id)));
    let Some((partner, client_id)) = known else {
        let e = result.as_ref().err()?;
        return Some(AuditRecord::refused_credentials(
            &format!("token request refused, {}: {}", e.code, e.description),
            "/auth/token",
        ));
    };
    let record = AuditRecord::new(
        Kind::Login,
        "E",
        Actor::Client {
            partner: partner.id.to_string(),
            client_id,
        },
    );
    Some(match result {
        Ok(granted) => record.outcome(Outcome::Success, Some(format!("granted {}", granted.scope))),
        Err(e) => record.outcome(
            Outcome::MinorFailure,
            Some(format!("{}: {}", e.code, e.description)),
        ),
    })
}

/// The client a token request's assertion names (`iss`), unverified: for
/// the audit record and checks made after the assertion was verified.
fn assertion_client_id(form: &TokenRequest) -> Option<String> {
    form.client_assertion
        .as_deref()
        .and_then(|a| jsonwebtoken::dangerous::insecure_decode::<serde_json::Value>(a).ok())
        .and_then(|t| {
            t.claims
                .get("iss")
                .and_then(|v| v.as_str())
                .map(str::to_owned)
        })
}

async fn jwks(State(app): State<Arc<App>>) -> Response {
    json_response(&json!({ "keys": [app.authority.public] }))
}

/// SMART App Launch 2.x section "SMART configuration" for backend services.
async fn smart_configuration(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let token_url = app.authority.token_url(&app, &headers);
    let base = token_url.trim_end_matches("/auth/token").to_owned();
    json_response(&json!({
        "token_endpoint": token_url,
        "jwks_uri": format!("{base}/auth/jwks.json"),
        "grant_types_supported": ["client_credentials"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
        "scopes_supported": ["system/*.cruds", "system/*.rs", "system/*.read", "system/*.write"],
        "capabilities": ["client-confidential-asymmetric", "permission-v1", "permission-v2"],
        "code_challenge_methods_supported": [],
    }))
}

fn json_response(value: &serde_json::Value) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
        .into_response()
}
