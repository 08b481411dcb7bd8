//! Staff sign-in with an external OpenID Connect issuer's tokens (Keycloak,
//! Entra ID, …): `[auth] staff_issuer`, with its public keys from a JWKS
//! file (`staff_jwks_file`) or, without one, from the issuer's discovery
//! document (`<issuer>/.well-known/openid-configuration`, its `jwks_uri`),
//! kept current as the issuer rotates its keys.

use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{DecodingKey, Header, Validation};

use super::token::{token_error, AuthStartError, LEEWAY_SECS};
use super::{Caller, CallerError, Role, StaffUser};
use crate::config::AuthConfig;

/// Discovered keys older than this are fetched again (in the background:
/// requests go on with the keys at hand), so a key the issuer withdrew
/// stops working about this long after.
const KEYS_REFRESH_AGE: Duration = Duration::from_secs(3600);
/// Keys older than this (the issuer unreachable all that time) are not
/// trusted any more: staff sign-in fails until the issuer answers again.
const KEYS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// A token naming a key we do not have makes us fetch the keys again (the
/// issuer rotated them), at most once per this: tokens with made-up key ids
/// cannot make Konsil hammer the issuer.
const UNKNOWN_KEY_GAP: Duration = Duration::from_secs(60);
/// After a failed fetch, the next try waits this long (requests meanwhile
/// use the keys fetched before, if any).
const RETRY_GAP: Duration = Duration::from_secs(10);
/// Whole-request limit for the discovery document and the JWKS.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Larger documents are not an issuer's discovery or keys.
const MAX_DOCUMENT: usize = 1024 * 1024;

/// An external staff issuer (OpenID Connect).
pub(super) struct StaffIssuer {
    issuer: String,
    keys: StaffKeys,
    audience: Option<String>,
    roles_claim: String,
}

/// Where a staff issuer's public keys come from.
enum StaffKeys {
    /// A JWKS file, read at start.
    File(JwkSet),
    /// The issuer's discovery document, fetched at first use.
    Discovered(Arc<Discovery>),
}

struct Discovery {
    issuer: String,
    http: reqwest::Client,
    /// The keys and when they were fetched: read by every sign-in, written
    /// only after a fetch (never held across one).
    keys: std::sync::RwLock<Option<(Arc<JwkSet>, Instant)>>,
    /// One fetch at a time; what the last attempts were.
    fetching: tokio::sync::Mutex<Attempts>,
    /// A background refresh is under way (one is enough).
    refreshing: std::sync::atomic::AtomicBool,
}

/// Why keys are fetched.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Need {
    /// None fetched yet.
    First,
    /// Older than KEYS_REFRESH_AGE.
    Old,
    /// A token names a key not among them.
    Unknown,
}

#[derive(Default)]
struct Attempts {
    last_unknown_key_fetch: Option<Instant>,
    failed_at: Option<Instant>,
}

impl StaffIssuer {
    /// The issuer the configuration names, if any.
    pub(super) fn from_config(config: &AuthConfig) -> Result<Option<StaffIssuer>, AuthStartError> {
        let Some(issuer) = &config.staff_issuer else {
            return Ok(None);
        };
        let keys = match &config.staff_jwks_file {
            Some(path) => {
                let bad = |reason: String| AuthStartError::StaffJwks {
                    path: path.clone(),
                    reason,
                };
                let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
                let keys: JwkSet = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
                if keys.keys.is_empty() {
                    return Err(bad("holds no key".into()));
                }
                StaffKeys::File(keys)
            }
            None => {
                let bad = |reason: &str| AuthStartError::StaffIssuer {
                    issuer: issuer.clone(),
                    reason: reason.to_owned(),
                };
                if !fetchable(issuer) {
                    return Err(bad(
                        "its keys are discovered from it, so it must be an https URL (http only on loopback); or give staff_jwks_file",
                    ));
                }
                let discovery = Discovery::new(issuer).map_err(|e| bad(&e.to_string()))?;
                StaffKeys::Discovered(Arc::new(discovery))
            }
        };
        Ok(Some(StaffIssuer {
            issuer: issuer.clone(),
            keys,
            audience: config.staff_audience.clone(),
            roles_claim: config.staff_roles_claim.clone(),
        }))
    }

    /// The staff member a token of this issuer stands for, and when the
    /// token expires.
    pub(super) async fn verify(
        &self,
        token: &str,
        header: &Header,
    ) -> Result<(Caller, i64), CallerError> {
        let invalid = |why: String| CallerError::InvalidToken(why);
        // Public-key signatures only: the JWKS is public, so a shared-secret
        // algorithm named in the token's header must never be honoured.
        use jsonwebtoken::Algorithm as A;
        if !matches!(
            header.alg,
            A::RS256 | A::RS384 | A::RS512 | A::PS256 | A::PS384 | A::PS512 | A::ES256 | A::ES384
        ) {
            return Err(invalid(format!(
                "{:?} is not a public-key signature",
                header.alg
            )));
        }
        let kid = header
            .kid
            .as_deref()
            .ok_or_else(|| invalid("the token names no key (kid)".into()))?;
        let jwk = match &self.keys {
            StaffKeys::File(keys) => keys.find(kid).cloned(),
            StaffKeys::Discovered(discovery) => Discovery::key(discovery, kid).await,
        }
        .ok_or_else(|| invalid("signed by an unknown key".into()))?;
        // A key published for another use or algorithm does not sign this.
        use jsonwebtoken::jwk::PublicKeyUse;
        if matches!(
            jwk.common.public_key_use,
            Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))
        ) {
            return Err(invalid("the key is not published for signatures".into()));
        }
        if let Some(alg) = jwk.common.key_algorithm {
            if format!("{alg:?}") != format!("{:?}", header.alg) {
                return Err(invalid(format!(
                    "the key is published for {alg:?}, the token says {:?}",
                    header.alg
                )));
            }
        }
        let key = DecodingKey::from_jwk(&jwk).map_err(|e| invalid(e.to_string()))?;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.issuer]);
        validation.leeway = LEEWAY_SECS;
        match &self.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&["exp", "iss", "sub"]);
        let claims = jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation)
            .map_err(|e| invalid(token_error(&e)))?
            .claims;
        let roles = match claims.get(&self.roles_claim) {
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .filter_map(|v| v.as_str())
                .filter_map(Role::parse)
                .collect(),
            Some(serde_json::Value::String(text)) => {
                text.split_whitespace().filter_map(Role::parse).collect()
            }
            _ => Vec::new(),
        };
        let subject = claims
            .get("sub")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned();
        let exp = claims.get("exp").and_then(|v| v.as_i64()).unwrap_or(0);
        Ok((
            Caller::Staff(StaffUser {
                subject,
                roles,
                cases: None,
            }),
            exp,
        ))
    }
}

impl Discovery {
    /// Keys to be discovered from `issuer` (checked fetchable).
    fn new(issuer: &str) -> Result<Discovery, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            // A redirect must stay where a fetch may go.
            .redirect(reqwest::redirect::Policy::custom(|attempt| {
                if attempt.previous().len() < 5 && fetchable(attempt.url().as_str()) {
                    attempt.follow()
                } else {
                    attempt.stop()
                }
            }))
            .build()?;
        Ok(Discovery {
            issuer: issuer.to_owned(),
            http,
            keys: std::sync::RwLock::new(None),
            fetching: tokio::sync::Mutex::new(Attempts::default()),
            refreshing: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The issuer's key `kid`. Keys at hand answer at once (old ones are
    /// refreshed in the background); a sign-in waits for a fetch only when
    /// there are no keys yet or `kid` is not among them (the issuer rotated;
    /// at most one such fetch per UNKNOWN_KEY_GAP).
    async fn key(this: &Arc<Discovery>, kid: &str) -> Option<Jwk> {
        let (known, age) = this.current(kid);
        match (known, age) {
            (Some(jwk), Some(age)) if age < KEYS_MAX_AGE => {
                use std::sync::atomic::Ordering;
                if age >= KEYS_REFRESH_AGE && !this.refreshing.swap(true, Ordering::AcqRel) {
                    let this = Arc::clone(this);
                    tokio::spawn(async move {
                        this.refresh(Need::Old).await;
                        this.refreshing.store(false, Ordering::Release);
                    });
                }
                Some(jwk)
            }
            (_, None) => {
                this.refresh(Need::First).await;
                this.current(kid).0
            }
            (_, Some(_)) => {
                // Unknown, or known but too old to trust.
                this.refresh(Need::Unknown).await;
                let (jwk, age) = this.current(kid);
                jwk.filter(|_| age.is_some_and(|a| a < KEYS_MAX_AGE))
            }
        }
    }

    /// `kid` among the keys at hand, and their age (`None`: no keys yet).
    fn current(&self, kid: &str) -> (Option<Jwk>, Option<Duration>) {
        let keys = match self.keys.read() {
            Ok(keys) => keys.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        match keys {
            Some((set, at)) => (set.find(kid).cloned(), Some(at.elapsed())),
            None => (None, None),
        }
    }

    /// Fetch the keys, unless another fetch just did or the gaps say wait.
    async fn refresh(&self, need: Need) {
        let Ok(mut attempts) = tokio::time::timeout(2 * FETCH_TIMEOUT, self.fetching.lock()).await
        else {
            return;
        };
        let fetched_at = self.current("").1;
        let done_meanwhile = match need {
            Need::First => fetched_at.is_some(),
            Need::Old => fetched_at.is_some_and(|age| age < KEYS_REFRESH_AGE),
            Need::Unknown => false,
        };
        let failed_lately = attempts
            .failed_at
            .is_some_and(|at| at.elapsed() < RETRY_GAP);
        let unknown_lately = need == Need::Unknown
            && attempts
                .last_unknown_key_fetch
                .is_some_and(|at| at.elapsed() < UNKNOWN_KEY_GAP);
        if done_meanwhile || failed_lately || unknown_lately {
            return;
        }
        if need == Need::Unknown {
            attempts.last_unknown_key_fetch = Some(Instant::now());
        }
        match self.fetch(&self.issuer).await {
            Ok(keys) => {
                let fresh = Some((Arc::new(keys), Instant::now()));
                match self.keys.write() {
                    Ok(mut keys) => *keys = fresh,
                    Err(poisoned) => *poisoned.into_inner() = fresh,
                }
                attempts.failed_at = None;
            }
            Err(why) => {
                attempts.failed_at = Some(Instant::now());
                tracing::warn!(issuer = %self.issuer, error = %why, "cannot fetch the staff issuer's keys; the ones fetched before (if any, for up to a day) stay in use");
            }
        }
    }

    /// The issuer's discovery document, then the JWKS it points to.
    async fn fetch(&self, issuer: &str) -> Result<JwkSet, String> {
        let url = format!(
            "{}/.well-known/openid-configuration",
            issuer.trim_end_matches('/')
        );
        let document: serde_json::Value = self.get_json(&url).await?;
        // OpenID Connect Discovery 1.0, 4.3: the document's issuer is the
        // one asked for, exactly.
        if document["issuer"] != issuer {
            return Err(format!(
                "{url} names another issuer ({})",
                document["issuer"]
            ));
        }
        let jwks_uri = document["jwks_uri"]
            .as_str()
            .ok_or_else(|| format!("{url} has no jwks_uri"))?;
        if !fetchable(jwks_uri) {
            return Err(format!(
                "its jwks_uri {jwks_uri} is not https (http only on loopback)"
            ));
        }
        let keys: JwkSet = self.get_json(jwks_uri).await?;
        if keys.keys.is_empty() {
            return Err(format!("{jwks_uri} holds no key"));
        }
        Ok(keys)
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, String> {
        let response = self
            .http
            .get(url)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("{url} answered {}", response.status()));
        }
        if response
            .content_length()
            .is_some_and(|n| n > MAX_DOCUMENT as u64)
        {
            return Err(format!("{url} is larger than {MAX_DOCUMENT} bytes"));
        }
        let body = response.bytes().await.map_err(|e| format!("{url}: {e}"))?;
        if body.len() > MAX_DOCUMENT {
            return Err(format!("{url} is larger than {MAX_DOCUMENT} bytes"));
        }
        serde_json::from_slice(&body).map_err(|e| format!("{url} is not the JSON expected: {e}"))
    }
}

/// Whether keys may be fetched from `url`: https, or plain http to this
/// machine (a test issuer, or one behind a local proxy).
fn fetchable(url: &str) -> bool {
    let Ok(url) = reqwest::Url::parse(url) else {
        return false;
    };
    match url.scheme() {
        "https" => true,
        "http" => matches!(url.host_str(), Some("127.0.0.1" | "localhost" | "[::1]")),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_fetched_over_https_or_from_this_machine_only() {
        assert!(fetchable("https://login.example.org/realms/konsil"));
        assert!(fetchable("http://127.0.0.1:8081"));
        assert!(fetchable("http://localhost/realms/k"));
        assert!(!fetchable("http://login.example.org/realms/konsil"));
        assert!(!fetchable("ftp://login.example.org"));
        assert!(!fetchable("not a url"));
    }

    /// A loopback OpenID Connect issuer whose keys the test rotates or
    /// takes down; it counts the key fetches asked of it.
    struct TestIssuer {
        url: String,
        kids: Arc<std::sync::Mutex<Vec<&'static str>>>,
        down: Arc<std::sync::atomic::AtomicBool>,
        fetches: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl TestIssuer {
        async fn start() -> TestIssuer {
            use axum::http::StatusCode;
            use axum::response::IntoResponse;
            use std::sync::atomic::Ordering::SeqCst;
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            let kids = Arc::new(std::sync::Mutex::new(vec!["k1"]));
            let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let fetches = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let discovery = serde_json::json!({"issuer": url, "jwks_uri": format!("{url}/jwks")});
            // What the issuer answers: the document, or 503 while it is down.
            let served = |down: &std::sync::atomic::AtomicBool, body: String| {
                std::future::ready(if down.load(SeqCst) {
                    StatusCode::SERVICE_UNAVAILABLE.into_response()
                } else {
                    body.into_response()
                })
            };
            let (d, document) = (Arc::clone(&down), discovery.to_string());
            let (k, d2, f) = (Arc::clone(&kids), Arc::clone(&down), Arc::clone(&fetches));
            let app = axum::Router::new()
                .route(
                    "/.well-known/openid-configuration",
                    axum::routing::get(move || served(&d, document.clone())),
                )
                .route(
                    "/jwks",
                    axum::routing::get(move || {
                        f.fetch_add(1, SeqCst);
                        let keys: Vec<serde_json::Value> = k
                            .lock()
                            .unwrap()
                            .iter()
                            .map(|kid| {
                                serde_json::json!({"kty": "RSA", "kid": kid, "alg": "RS384", "use": "sig",
                                    "n": "sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw",
                                    "e": "AQAB"})
                            })
                            .collect();
                        served(&d2, serde_json::json!({"keys": keys}).to_string())
                    }),
                );
            tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            });
            TestIssuer {
                url,
                kids,
                down,
                fetches,
            }
        }

        fn fetches(&self) -> usize {
            self.fetches.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    impl Discovery {
        /// Make the keys at hand look `by` older, and forget when fetches
        /// last failed or chased an unknown key (the gaps would make the
        /// test wait).
        async fn age(&self, by: Duration) {
            if let Some((_, at)) = self.keys.write().unwrap().as_mut() {
                *at = at.checked_sub(by).expect("an instant that far back");
            }
            *self.fetching.lock().await = Attempts::default();
        }

        /// Wait until no background refresh runs.
        async fn settled(&self) {
            for _ in 0..500 {
                if !self.refreshing.load(std::sync::atomic::Ordering::Acquire) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("the background refresh did not end");
        }
    }

    /// Keys an hour old are fetched again in the background while the old
    /// ones keep answering; a withdrawn key then stops working; when the
    /// issuer is down the keys at hand stay in use, for up to a day.
    #[tokio::test]
    async fn old_keys_are_refreshed_in_the_background_and_kept_while_the_issuer_is_down() {
        let issuer = TestIssuer::start().await;
        let discovery = Arc::new(Discovery::new(&issuer.url).unwrap());
        let key = |kid: &'static str| {
            let discovery = Arc::clone(&discovery);
            async move { Discovery::key(&discovery, kid).await.is_some() }
        };
        assert!(key("k1").await, "first use fetches the keys");
        assert_eq!(issuer.fetches(), 1);

        // The issuer rotates: k1 goes, k2 comes. Fresh keys are not fetched again.
        *issuer.kids.lock().unwrap() = vec!["k2"];
        assert!(key("k1").await);
        assert_eq!(
            issuer.fetches(),
            1,
            "keys under an hour old are not fetched again"
        );

        // An hour later: the old key still answers at once, and a refresh
        // runs behind it.
        discovery
            .age(KEYS_REFRESH_AGE + Duration::from_secs(1))
            .await;
        assert!(key("k1").await, "old keys answer while they are refreshed");
        discovery.settled().await;
        assert_eq!(issuer.fetches(), 2, "one background refresh");
        assert!(key("k2").await, "the refreshed keys are in use");
        assert!(!key("k1").await, "the withdrawn key stops working");

        // The issuer goes down: keys over an hour old stay in use.
        issuer.down.store(true, std::sync::atomic::Ordering::SeqCst);
        discovery
            .age(KEYS_REFRESH_AGE + Duration::from_secs(1))
            .await;
        assert!(key("k2").await);
        discovery.settled().await;
        assert!(key("k2").await, "a failed refresh keeps the keys at hand");

        // A day without the issuer: the keys are no longer trusted.
        discovery.age(KEYS_MAX_AGE).await;
        assert!(!key("k2").await, "keys a day old are not trusted");

        // The issuer is back: the next sign-in fetches, and works again.
        issuer
            .down
            .store(false, std::sync::atomic::Ordering::SeqCst);
        discovery.age(Duration::ZERO).await;
        assert!(
            key("k2").await,
            "keys fetched again once the issuer answers"
        );
    }
}
