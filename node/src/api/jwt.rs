//! JWT bearer tokens from configured identity providers (`security.jwt.issuers`), as
//! principals beside API keys.
//!
//! A token is accepted when an issuer's JSON Web Key Set holds the key its header names (`kid`;
//! without one, any of the set's keys), the signature verifies with an algorithm of that key's
//! family (the key's own `alg` when the set says it), and `exp`, `nbf`, `iss`, `aud` and `sub`
//! are all present and hold (`leeway_s` of clock difference). The principal is
//! `jwt:<name>:<sub>`, its roles the MAOS role names in `roles_claim`; a token naming none is
//! refused. Only public keys are taken from a set (RSA, EC, Ed25519): a symmetric key there is
//! ignored. Nothing is cached: an expired token is refused on the first call after its `exp`.
//!
//! Key sets are read at start (a file that cannot be read stops the start, naming its key) and
//! refreshed in the background: a file when its modification time changes (checked every 2 s),
//! a URL every `jwks_refresh_s`. A failed refresh keeps the keys in use and logs a warning.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{DecodingKey, Validation};
use maos_raft_store::auth::Role;
use serde::Deserialize;

use crate::config::JwtIssuerSection;

/// Upper bound on a key set, in bytes.
const JWKS_BYTES_MAX: usize = 1 << 20;
/// Upper bound on the keys of one set.
const JWKS_KEYS_MAX: usize = 64;
/// How often a key-set file's modification time is checked.
const FILE_CHECK: Duration = Duration::from_secs(2);
/// The longest a key-set URL may take to answer.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// One issuer's verification keys.
#[derive(Default)]
struct Keys {
    /// `(kid, key, allowed algorithm if the set names one)`.
    keys: Vec<(Option<String>, DecodingKey, Option<jsonwebtoken::Algorithm>)>,
    /// A file's modification time when it was read.
    stamp: Option<SystemTime>,
}

struct Issuer {
    settings: JwtIssuerSection,
    keys: RwLock<Keys>,
}

/// The configured issuers and their current keys.
#[derive(Default)]
pub struct JwtIssuers {
    issuers: Vec<Issuer>,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    #[serde(flatten)]
    rest: serde_json::Map<String, serde_json::Value>,
}

/// Whether `token` has the shape of a JWT (three base64url parts), so it is checked here.
pub fn looks_like_jwt(token: &str) -> bool {
    token.split('.').count() == 3 && token.starts_with("eyJ")
}

/// The verification keys of a key set's JSON.
fn parse_set(text: &str) -> Result<Keys, String> {
    if text.len() > JWKS_BYTES_MAX {
        return Err(format!("the key set is over {JWKS_BYTES_MAX} bytes"));
    }
    let set: JwkSet = serde_json::from_str(text).map_err(|e| format!("not a JSON Web Key Set: {e}"))?;
    if set.keys.len() > JWKS_KEYS_MAX {
        return Err(format!("{} keys, over the limit of {JWKS_KEYS_MAX}", set.keys.len()));
    }
    let mut keys = Vec::new();
    for jwk in &set.keys {
        if matches!(jwk.algorithm, AlgorithmParameters::OctetKey(_)) {
            continue;
        }
        // A key for something other than signatures (an encryption algorithm) is not taken.
        let algorithm = match jwk.common.key_algorithm {
            None => None,
            Some(named) => match named.to_string().parse::<jsonwebtoken::Algorithm>() {
                Ok(algorithm) => Some(algorithm),
                Err(_) => continue,
            },
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("key {:?}: {e}", jwk.common.key_id))?;
        keys.push((jwk.common.key_id.clone(), key, algorithm));
    }
    if keys.is_empty() {
        return Err("the key set holds no public key (RSA, EC or Ed25519)".into());
    }
    Ok(Keys { keys, stamp: None })
}

fn modified(path: &std::path::Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn read_file(path: &std::path::Path) -> Result<Keys, String> {
    let stamp = modified(path);
    if std::fs::metadata(path).is_ok_and(|m| m.len() > JWKS_BYTES_MAX as u64) {
        return Err(format!("{}: the key set is over {JWKS_BYTES_MAX} bytes", path.display()));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut keys = parse_set(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    keys.stamp = stamp;
    Ok(keys)
}

async fn fetch(http: &reqwest::Client, url: &str) -> Result<Keys, String> {
    let answer = http.get(url).timeout(FETCH_TIMEOUT).send().await.map_err(|e| format!("{url}: {e}"))?;
    if !answer.status().is_success() {
        return Err(format!("{url} answered {}", answer.status()));
    }
    // Read at most the bound (and one byte more, to tell), whatever the server sends.
    let mut answer = answer;
    let mut body = Vec::new();
    while let Some(chunk) = answer.chunk().await.map_err(|e| format!("{url}: {e}"))? {
        body.extend_from_slice(&chunk);
        if body.len() > JWKS_BYTES_MAX {
            return Err(format!("{url}: the key set is over {JWKS_BYTES_MAX} bytes"));
        }
    }
    let text = String::from_utf8(body).map_err(|_| format!("{url}: the key set is not UTF-8"))?;
    parse_set(&text).map_err(|e| format!("{url}: {e}"))
}

impl JwtIssuers {
    /// The issuers of `settings`, their key-set files read now (URLs are fetched by [`Self::refresh`]).
    pub fn new(settings: &[JwtIssuerSection]) -> Result<Self, (String, String)> {
        let mut issuers = Vec::new();
        for (i, issuer) in settings.iter().enumerate() {
            let keys = match &issuer.jwks_file {
                Some(path) => read_file(path).map_err(|e| (format!("security.jwt.issuers[{i}].jwks_file"), e))?,
                None => Keys::default(),
            };
            issuers.push(Issuer { settings: issuer.clone(), keys: RwLock::new(keys) });
        }
        Ok(Self { issuers })
    }

    /// Keep the key sets current until `stopped`: files when they change, URLs every
    /// `jwks_refresh_s` (and at once at start).
    pub async fn refresh(self: Arc<Self>, mut stopped: tokio::sync::watch::Receiver<bool>) {
        if self.issuers.is_empty() {
            return;
        }
        let http = reqwest::Client::new();
        let mut fetched_at: Vec<Option<tokio::time::Instant>> = vec![None; self.issuers.len()];
        loop {
            for (issuer, fetched) in self.issuers.iter().zip(fetched_at.iter_mut()) {
                let loaded = match (&issuer.settings.jwks_file, &issuer.settings.jwks_url) {
                    (Some(path), _) => {
                        let seen = issuer.keys.read().unwrap_or_else(|p| p.into_inner()).stamp;
                        if modified(path) == seen {
                            continue;
                        }
                        read_file(path)
                    }
                    (None, Some(url)) => {
                        let due = Duration::from_secs(issuer.settings.jwks_refresh_s);
                        if fetched.is_some_and(|at| at.elapsed() < due) {
                            continue;
                        }
                        *fetched = Some(tokio::time::Instant::now());
                        fetch(&http, url).await
                    }
                    (None, None) => continue,
                };
                match loaded {
                    Ok(keys) => {
                        tracing::info!(issuer = %issuer.settings.issuer, keys = keys.keys.len(), "JWT verification keys loaded");
                        *issuer.keys.write().unwrap_or_else(|p| p.into_inner()) = keys;
                    }
                    Err(error) => {
                        tracing::warn!(issuer = %issuer.settings.issuer, %error, "JWT verification keys not refreshed; the ones in use stay")
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(FILE_CHECK) => {}
                _ = stopped.wait_for(|stop| *stop) => return,
            }
        }
    }

    /// The principal id and roles of `token`, or why it is refused (never quoting the token).
    pub fn authenticate(&self, token: &str) -> Result<(String, Vec<Role>), String> {
        if self.issuers.is_empty() {
            return Err("no JWT issuer is configured (security.jwt.issuers)".into());
        }
        let header = jsonwebtoken::decode_header(token).map_err(|e| format!("the JWT's header is invalid: {e}"))?;
        let mut last = format!("no configured issuer holds a key for kid {:?}", header.kid);
        for issuer in &self.issuers {
            let settings = &issuer.settings;
            let keys = issuer.keys.read().unwrap_or_else(|p| p.into_inner());
            let candidates = keys.keys.iter().filter(|(kid, _, _)| header.kid.is_none() || *kid == header.kid);
            for (_, key, algorithm) in candidates {
                let mut validation = Validation::new_for_family(key.family());
                if let Some(algorithm) = algorithm {
                    validation.algorithms = vec![*algorithm];
                }
                validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
                validation.validate_nbf = true;
                validation.leeway = settings.leeway_s;
                // Refused from the second `exp` names on, not from the one after (RFC 7519 4.1.4).
                validation.reject_tokens_expiring_in_less_than = 1;
                validation.set_issuer(&[&settings.issuer]);
                validation.set_audience(&[&settings.audience]);
                let claims = match jsonwebtoken::decode::<Claims>(token, key, &validation) {
                    Ok(data) => data.claims,
                    Err(error) => {
                        last = format!("the JWT is not valid for issuer {}: {error}", settings.issuer);
                        continue;
                    }
                };
                let roles = roles_of(claims.rest.get(&settings.roles_claim));
                if roles.is_empty() {
                    return Err(format!(
                        "the JWT's `{}` claim names no MAOS role (admin, operator, submitter, worker, viewer)",
                        settings.roles_claim
                    ));
                }
                let name = settings.name.as_deref().unwrap_or(&settings.issuer);
                return Ok((format!("jwt:{name}:{}", claims.sub), roles));
            }
        }
        Err(last)
    }
}

/// The MAOS roles a roles claim names (an array of names, or one string of names separated by
/// spaces); other names are ignored.
fn roles_of(claim: Option<&serde_json::Value>) -> Vec<Role> {
    let names: Vec<&str> = match claim {
        Some(serde_json::Value::Array(items)) => items.iter().filter_map(|v| v.as_str()).collect(),
        Some(serde_json::Value::String(text)) => text.split_whitespace().collect(),
        _ => Vec::new(),
    };
    let mut roles: Vec<Role> = names.into_iter().filter_map(Role::parse).collect();
    roles.sort_by_key(|r| r.name());
    roles.dedup();
    roles
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_come_from_an_array_or_a_spaced_string_and_unknown_names_are_ignored() {
        let array = serde_json::json!(["viewer", "root", "submitter", "viewer"]);
        assert_eq!(roles_of(Some(&array)), vec![Role::Submitter, Role::Viewer]);
        assert_eq!(roles_of(Some(&serde_json::json!("operator  other"))), vec![Role::Operator]);
        assert!(roles_of(Some(&serde_json::json!(7))).is_empty());
        assert!(roles_of(None).is_empty());
    }

    #[test]
    fn a_key_set_needs_a_public_key_and_stays_bounded() {
        assert!(parse_set("{}").is_err());
        let refused = |text: &str| parse_set(text).err().unwrap_or_default();
        assert!(refused(r#"{"keys": []}"#).contains("no public key"));
        let symmetric = r#"{"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "h"}]}"#;
        assert!(refused(symmetric).contains("no public key"), "a symmetric key is not taken");
        assert!(looks_like_jwt("eyJhbGciOi.eyJzdWIi.c2ln"));
        assert!(!looks_like_jwt("maos_0123_abcd") && !looks_like_jwt("eyJ.only"));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1_000))]
        /// Whatever arrives as a token, checking it never panics.
        #[test]
        fn checking_any_token_never_panics(head in "eyJ[A-Za-z0-9_-]{0,40}", body in "[A-Za-z0-9_-]{0,60}", sig in "[A-Za-z0-9_-]{0,40}") {
            let issuers = JwtIssuers {
                issuers: vec![Issuer { settings: JwtIssuerSection::default(), keys: RwLock::new(Keys::default()) }],
            };
            let _ = issuers.authenticate(&format!("{head}.{body}.{sig}"));
        }
    }
}
