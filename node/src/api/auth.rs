//! Authentication and authorization on port 8000: one layer in front of every gRPC method and
//! every REST route, default deny, driven by one table from method to permission.
//!
//! The layer reads `authorization: Bearer <token>` (gRPC metadata is an HTTP header, so one
//! layer serves both surfaces), turns it into a [`Principal`] and checks the permission the
//! method's row in [`GRPC_METHODS`] or [`REST_ROUTES`] names. A path in neither table is refused
//! for everyone (a new method must get a row; `tests/security.rs` enumerates both surfaces).
//! The handlers find the principal in the request's extensions (`principal_in`).
//!
//! Tokens:
//! - API keys, `maos_<16 hex id>_<64 hex secret>`: checked against the keyed hash in the
//!   replicated state (`maos_raft_store::auth`), so a key created or revoked anywhere holds on
//!   this node once the entry applies here.
//! - JWTs from the issuers of `security.jwt.issuers` (`jwt.rs`): principal `jwt:<issuer>:<sub>`,
//!   roles from the token's roles claim.
//! - Agent credentials from a task envelope (`maos1:…`, `agents/credential.rs`): the key-value
//!   service only, which checks their scope itself.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hmac::Mac;
#[cfg(test)]
use maos_raft_store::auth::{key_hash, new_auth_secret, new_key, KEY_PREFIX};
use maos_raft_store::auth::{key_mac, parse_key, ApiKeyRecord};
use tokio_rustls::rustls::pki_types::{CertificateDer, DnsName, ServerName};
use tonic::Status;

use crate::agents::credential::Credentials;
use crate::api::limits::{retry_after_secs, InFlight, RateLimiter, Verdict};
use crate::api::principal::{Permission, Principal};
use crate::api::rest_error::ApiError;
use crate::raft::core::NodeCore;
use crate::storage::Storage;
use crate::transport::PeerAddr;

/// How long a caller refused as busy is asked to wait (`grpc-retry-pushback-ms`).
const BUSY_PUSHBACK_MS: u64 = 50;

/// Upper bound on an `authorization` header, in bytes.
const HEADER_BYTES_MAX: usize = 4096;

/// Every gRPC method on port 8000 and what it needs. Services listed with `/*` have one
/// permission for all their methods.
pub const GRPC_METHODS: &[(&str, Permission)] = &[
    ("grpc.health.v1.Health/*", Permission::Public),
    ("grpc.reflection.v1.ServerReflection/*", Permission::Public),
    ("maos.v1.AuthService/CreateKey", Permission::Auth),
    ("maos.v1.AuthService/ListKeys", Permission::Auth),
    ("maos.v1.AuthService/RevokeKey", Permission::Auth),
    ("maos.v1.AuthService/WhoAmI", Permission::Identity),
    ("maos.v1.AuthService/ListAudit", Permission::Auth),
    ("maos.v1.TaskService/Submit", Permission::Submit),
    ("maos.v1.TaskService/BatchSubmit", Permission::Submit),
    ("maos.v1.TaskService/Get", Permission::Read),
    ("maos.v1.TaskService/List", Permission::Read),
    ("maos.v1.TaskService/Results", Permission::Read),
    ("maos.v1.TaskService/Watch", Permission::Read),
    ("maos.v1.TaskService/Retry", Permission::Retry),
    ("maos.v1.TaskService/Cancel", Permission::Cancel),
    ("maos.v1.TaskService/Complete", Permission::Work),
    ("maos.v1.AgentService/List", Permission::Read),
    ("maos.v1.AgentService/Spawn", Permission::Agents),
    ("maos.v1.AgentService/Pause", Permission::Agents),
    ("maos.v1.AgentService/Resume", Permission::Agents),
    ("maos.v1.AgentService/Terminate", Permission::Agents),
    ("maos.v1.WorkerService/*", Permission::Work),
    ("maos.v1.ClusterService/Status", Permission::Read),
    ("maos.v1.ClusterService/AddNode", Permission::Membership),
    ("maos.v1.ClusterService/RemoveNode", Permission::Membership),
    ("maos.v1.ClusterService/Initialize", Permission::Membership),
    ("maos.v1.ClusterService/TransferLeader", Permission::Leadership),
    ("maos.v1.ClusterService/OpenSession", Permission::Session),
    ("maos.v1.KvService/Put", Permission::KvWrite),
    ("maos.v1.KvService/Delete", Permission::KvWrite),
    ("maos.v1.KvService/CompareAndSet", Permission::KvWrite),
    ("maos.v1.KvService/Get", Permission::KvRead),
    ("maos.v1.KvService/Watch", Permission::KvRead),
];

/// Every HTTP route on port 8000 (REST and the plain endpoints): method, path template (`{x}`
/// matches one segment, `{*x}` the rest) and what it needs.
pub const REST_ROUTES: &[(&str, &str, Permission)] = &[
    ("GET", "/health", Permission::Public),
    ("GET", "/ready", Permission::Public),
    ("GET", "/metrics", Permission::Public),
    ("GET", "/api/v1/openapi.json", Permission::Public),
    ("POST", "/api/v1/tasks", Permission::Submit),
    ("GET", "/api/v1/tasks", Permission::Read),
    ("GET", "/api/v1/tasks/{task_id}", Permission::Read),
    ("GET", "/api/v1/tasks/{task_id}/results", Permission::Read),
    ("GET", "/api/v1/tasks/{task_id}/events", Permission::Read),
    ("POST", "/api/v1/tasks/{task_id}/cancel", Permission::Cancel),
    ("POST", "/api/v1/tasks/{task_id}/retry", Permission::Retry),
    ("GET", "/api/v1/agents", Permission::Read),
    ("POST", "/api/v1/agents", Permission::Agents),
    ("POST", "/api/v1/agents/{agent_id}/{action}", Permission::Agents),
    ("GET", "/api/v1/cluster", Permission::Read),
    ("POST", "/api/v1/cluster/init", Permission::Membership),
    ("POST", "/api/v1/cluster/leader", Permission::Leadership),
    ("POST", "/api/v1/cluster/nodes", Permission::Membership),
    ("DELETE", "/api/v1/cluster/nodes/{id}", Permission::Membership),
    ("POST", "/api/v1/sessions", Permission::Session),
];

/// The permission of a gRPC method (`package.Service/Method`), if it has a row.
pub fn grpc_permission(method: &str) -> Option<Permission> {
    let service = method.split_once('/').map(|(service, _)| service);
    GRPC_METHODS.iter().find_map(|(row, permission)| {
        let matches = match row.strip_suffix("/*") {
            Some(row_service) => service == Some(row_service),
            None => *row == method,
        };
        matches.then_some(*permission)
    })
}

fn template_matches(template: &str, path: &str) -> bool {
    let mut want = template.trim_start_matches('/').split('/');
    let mut have = path.trim_start_matches('/').split('/');
    loop {
        match (want.next(), have.next()) {
            (None, None) => return true,
            (Some(w), Some(h)) if w.starts_with("{*") => return !h.is_empty(),
            (Some(w), Some(h)) if w.starts_with('{') => {
                if h.is_empty() {
                    return false;
                }
            }
            (Some(w), Some(h)) if w == h => {}
            _ => return false,
        }
    }
}

/// The permission of an HTTP route, if it has a row.
pub fn rest_permission(method: &str, path: &str) -> Option<Permission> {
    let path = if path.len() > 1 { path.trim_end_matches('/') } else { path };
    REST_ROUTES.iter().find_map(|(m, template, permission)| {
        (m.eq_ignore_ascii_case(method) && template_matches(template, path)).then_some(*permission)
    })
}

/// Why a token was refused; the message names the fix and never the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("this call needs `authorization: Bearer <token>` (an API key; `maos auth key create`, or the bootstrap token in the first leader's data dir)")]
    Missing,
    #[error("the authorization header is not `Bearer <token>` with a printable token of at most 4096 bytes")]
    Malformed,
    #[error("the token is not a MAOS API key (`maos_<id>_<secret>`), a JWT or an agent credential")]
    UnknownKind,
    #[error("API key {id} is unknown, revoked or expired")]
    UnknownKey { id: String },
    #[error("the API key's secret does not match")]
    BadSecret,
    #[error("the agent credential is invalid: {0}")]
    Agent(String),
    #[error("{0}")]
    Jwt(String),
    #[error("the client certificate is valid for none of security.tls.client_principals' names; send an API key, or list one of its names there")]
    UnknownCertificate,
}

/// The bearer token of an `authorization` header value.
pub fn bearer(header: &[u8]) -> Result<&str, AuthError> {
    if header.len() > HEADER_BYTES_MAX {
        return Err(AuthError::Malformed);
    }
    let text = std::str::from_utf8(header).map_err(|_| AuthError::Malformed)?;
    let (scheme, token) = text.split_once(' ').ok_or(AuthError::Malformed)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(AuthError::Malformed);
    }
    Ok(token)
}

/// Turns tokens into principals and checks them against the table.
pub struct Authorizer {
    pub core: Arc<NodeCore>,
    pub credentials: Arc<Credentials>,
    pub storage: Arc<Storage>,
    /// `security.auth.enabled`.
    pub enabled: bool,
    /// `security.rate_limit`, per principal (per source address for calls without a valid credential).
    pub rate: RateLimiter,
    /// `network.max_concurrent_requests`.
    pub in_flight: InFlight,
    /// `security.jwt.issuers`.
    pub jwt: Arc<crate::api::jwt::JwtIssuers>,
    /// `security.tls.client_principals`.
    pub cert_principals: Vec<crate::config::CertPrincipal>,
}

impl Authorizer {
    /// The principal of a client certificate the TLS handshake verified: the first of
    /// `security.tls.client_principals` whose name it is valid for.
    pub fn certificate_principal(&self, cert: &CertificateDer<'_>) -> Result<Principal, AuthError> {
        let cert = webpki::EndEntityCert::try_from(cert).map_err(|_| AuthError::UnknownCertificate)?;
        let entry = self
            .cert_principals
            .iter()
            .find(|entry| {
                let Ok(name) = DnsName::try_from(entry.name.as_str()) else { return false };
                cert.verify_is_valid_for_subject_name(&ServerName::DnsName(name)).is_ok()
            })
            .ok_or(AuthError::UnknownCertificate)?;
        Ok(Principal {
            id: format!("cert:{}", entry.name),
            roles: vec![entry.role],
            namespace: "default".into(),
            agent: false,
        })
    }

    /// The principal of a bearer token.
    pub fn authenticate(&self, token: &str) -> Result<Principal, AuthError> {
        if let Some((id, secret)) = parse_key(token) {
            let key: ApiKeyRecord = {
                let state = self.core.state.read();
                let auth = &state.app.auth;
                let key = auth.keys.get(id).ok_or_else(|| AuthError::UnknownKey { id: id.to_string() })?;
                let tag = hex::decode(&key.hash).map_err(|_| AuthError::BadSecret)?;
                key_mac(&auth.secret, secret).verify_slice(&tag).map_err(|_| AuthError::BadSecret)?;
                key.clone()
            };
            if !key.live_at((self.core.clock)()) {
                return Err(AuthError::UnknownKey { id: key.id });
            }
            return Ok(Principal {
                id: format!("key:{}", key.id),
                roles: vec![key.role],
                namespace: "default".into(),
                agent: false,
            });
        }
        if token.strip_prefix(crate::agents::credential::PREFIX).is_some_and(|rest| rest.starts_with(':')) {
            let scope = self.credentials.verify(token).map_err(|e| AuthError::Agent(e.to_string()))?;
            return Ok(Principal {
                id: format!("agent:{}", scope.task_id),
                roles: Vec::new(),
                namespace: "default".into(),
                agent: true,
            });
        }
        if crate::api::jwt::looks_like_jwt(token) {
            let (id, roles) = self.jwt.authenticate(token).map_err(AuthError::Jwt)?;
            return Ok(Principal { id, roles, namespace: "default".into(), agent: false });
        }
        Err(AuthError::UnknownKind)
    }

    /// Answer `status`, and audit it: `auth.refused` (no valid credential) or `auth.denied`.
    fn refuse(&self, request: &Request, method: &str, status: Status, grpc: bool, principal: &str) -> Response {
        let source = source_of(request);
        let action = match status.code() {
            tonic::Code::Unauthenticated => "auth.refused",
            _ => "auth.denied",
        };
        tracing::info!(method, %source, principal, reason = status.message(), "{action}");
        let detail = serde_json::json!({ "source": source, "reason": status.message() });
        self.storage.audit(self.core.id, principal, action, method, detail);
        answer(status, grpc)
    }

    /// Count one call by `caller`; `Some(answer)` when it is over its limit. Not logged or
    /// audited, so a flood of calls cannot flood the log (`maos_requests_refused_total`).
    async fn over_limit(&self, caller: &str, grpc: bool) -> Option<Response> {
        let Verdict::Limited(wait) = self.rate.check(caller, self.storage.cache()).await else {
            return None;
        };
        metrics::counter!("maos_requests_refused_total", "reason" => "rate").increment(1);
        let secs = retry_after_secs(wait);
        let mut status = Status::resource_exhausted(format!(
            "rate limit: {caller} is over security.rate_limit ({}); retry after {secs} s",
            self.rate.describe()
        ));
        status.metadata_mut().insert("retry-after", secs.into());
        status.metadata_mut().insert("grpc-retry-pushback-ms", (wait.as_millis().max(1) as u64).into());
        let mut response = answer(status, grpc);
        if !grpc {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        Some(response)
    }
}

/// `status` as a gRPC answer or a REST error.
fn answer(status: Status, grpc: bool) -> Response {
    match grpc {
        true => status.into_http::<Body>(),
        false => ApiError::from(status).into_response(),
    }
}

/// The auth layer (`axum::middleware::from_fn_with_state`).
pub async fn authorize(State(auth): State<Arc<Authorizer>>, mut request: Request, next: Next) -> Response {
    let grpc = request
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let path = request.uri().path().to_string();
    let method = match grpc {
        true => path.trim_start_matches('/').to_string(),
        false => format!("{} {path}", request.method()),
    };
    let permission = match grpc {
        true => grpc_permission(&method),
        false => rest_permission(request.method().as_str(), &path),
    };
    // Public routes, and a method no route of a known path serves (the router answers 405 and
    // runs nothing), need no credential.
    let known_path_only =
        !grpc && permission.is_none() && REST_ROUTES.iter().any(|(_, t, _)| template_matches(t, &path));
    if permission == Some(Permission::Public) || known_path_only {
        return next.run(request).await;
    }
    // Held until the answer starts (a stream's body is bounded apart, `api/streams.rs`).
    let Some(_in_flight) = auth.in_flight.try_enter() else {
        metrics::counter!("maos_requests_refused_total", "reason" => "busy").increment(1);
        let mut status = Status::resource_exhausted(format!(
            "busy: this node serves network.max_concurrent_requests ({}) calls at once; retry shortly or call another node",
            auth.in_flight.max
        ));
        status.metadata_mut().insert("grpc-retry-pushback-ms", BUSY_PUSHBACK_MS.into());
        let mut response = answer(status, grpc);
        if !grpc {
            *response.status_mut() = axum::http::StatusCode::SERVICE_UNAVAILABLE;
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, 1u64.into());
        }
        return response;
    };
    let principal = match (auth.enabled, request.headers().get(axum::http::header::AUTHORIZATION)) {
        (false, _) => Ok(Principal::anonymous()),
        // No token: a client certificate (checked against the client CAs in the handshake)
        // may name the principal.
        (true, None) => match PeerAddr::client_cert(request.extensions()) {
            Some(cert) if !auth.cert_principals.is_empty() => auth.certificate_principal(&cert),
            _ => Err(AuthError::Missing),
        },
        (true, Some(value)) => bearer(value.as_bytes()).and_then(|token| auth.authenticate(token)),
    };
    let principal = match principal {
        Ok(principal) => principal,
        Err(error) => {
            // Calls without a valid credential are limited by where they come from.
            if auth.rate.enabled() {
                if let Some(limited) = auth.over_limit(&format!("source:{}", source_ip(&request)), grpc).await {
                    return limited;
                }
            }
            let status = Status::unauthenticated(error.to_string());
            return auth.refuse(&request, &method, status, grpc, "unauthenticated");
        }
    };
    if auth.rate.enabled() {
        // With auth off every caller is `anonymous`: count by source address instead.
        let caller = match auth.enabled {
            true => principal.id.clone(),
            false => format!("source:{}", source_ip(&request)),
        };
        if let Some(limited) = auth.over_limit(&caller, grpc).await {
            return limited;
        }
    }
    let Some(permission) = permission.or((!auth.enabled).then_some(Permission::Identity)) else {
        let status = Status::permission_denied(format!(
            "{method} is not in the authorization table, so it is refused to everyone (is the path right? see docs/SECURITY.md)"
        ));
        return auth.refuse(&request, &method, status, grpc, &principal.id);
    };
    if !principal.may(permission) {
        let roles: Vec<&str> = principal.roles.iter().map(|r| r.name()).collect();
        let status = Status::permission_denied(format!(
            "{} (roles: {}) lacks the `{}` permission that {method} needs; docs/SECURITY.md lists which roles hold it",
            principal.id,
            if roles.is_empty() { "agent credential".to_string() } else { roles.join(", ") },
            permission.name()
        ));
        return auth.refuse(&request, &method, status, grpc, &principal.id);
    }
    // Control-plane changes are audited here, with their outcome; task cancels and retries and
    // key changes by their handlers (with more detail). Data-plane writes (submits, reports, KV)
    // are recorded with their principal in the task's record instead.
    let audited = matches!(permission, Permission::Agents | Permission::Leadership | Permission::Membership)
        .then(|| (principal.id.clone(), source_of(&request)));
    request.extensions_mut().insert(principal);
    let response = next.run(request).await;
    if let Some((principal, source)) = audited {
        let outcome = match grpc {
            // An error is a trailers-only answer: its status is a header. Success ends in trailers.
            true => response.headers().get("grpc-status").and_then(|v| v.to_str().ok()).unwrap_or("0").to_string(),
            false => response.status().as_u16().to_string(),
        };
        let detail = serde_json::json!({ "source": source, "outcome": outcome });
        auth.storage.audit(auth.core.id, &principal, "call", &method, detail);
    }
    response
}

/// The peer address of a request's connection.
fn peer_of(request: &Request) -> Option<std::net::SocketAddr> {
    PeerAddr::of(request.extensions())
}

/// The peer's IP address of a request, for limits by source.
fn source_ip(request: &Request) -> String {
    peer_of(request).map(|a| a.ip().to_string()).unwrap_or_else(|| "unknown".into())
}

/// The peer address of a request, for the audit.
fn source_of(request: &Request) -> String {
    peer_of(request).map(|a| a.to_string()).unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use maos_raft_store::auth::Role;

    #[test]
    fn the_tables_name_a_permission_for_their_rows_and_nothing_else() {
        assert_eq!(grpc_permission("maos.v1.ClusterService/RemoveNode"), Some(Permission::Membership));
        assert_eq!(grpc_permission("maos.v1.WorkerService/Heartbeat"), Some(Permission::Work));
        assert_eq!(grpc_permission("maos.v1.ClusterService/Nope"), None);
        assert_eq!(grpc_permission("maos.v1.WorkerServiceX/Heartbeat"), None);
        assert_eq!(rest_permission("DELETE", "/api/v1/cluster/nodes/1"), Some(Permission::Membership));
        assert_eq!(rest_permission("GET", "/api/v1/tasks/abc/"), Some(Permission::Read));
        assert_eq!(rest_permission("POST", "/api/v1/agents/a-1/pause"), Some(Permission::Agents));
        assert_eq!(rest_permission("GET", "/api/v1/tasks//results"), None);
        assert_eq!(rest_permission("PUT", "/api/v1/tasks"), None);
        assert_eq!(rest_permission("GET", "/api/v1/secret"), None);
    }

    #[test]
    fn roles_hold_what_the_security_doc_says() {
        use Permission as P;
        assert!(P::Membership.granted_to(Role::Admin));
        assert!(!P::Membership.granted_to(Role::Operator));
        assert!(P::Retry.granted_to(Role::Operator) && !P::Retry.granted_to(Role::Submitter));
        assert!(P::Submit.granted_to(Role::Submitter) && !P::Submit.granted_to(Role::Viewer));
        assert!(P::Work.granted_to(Role::Worker) && !P::Read.granted_to(Role::Worker));
        assert!(!P::KvWrite.granted_to(Role::Viewer));
    }

    #[test]
    fn a_key_verifies_only_with_its_own_secret() {
        let secret = new_auth_secret();
        let key = new_key(&secret);
        let (id, part) = parse_key(&key.token).unwrap();
        assert_eq!(id, key.id);
        assert_eq!(key_hash(&secret, part), key.hash);
        assert_ne!(key_hash(&new_auth_secret(), part), key.hash);
        assert!(key.token.starts_with(KEY_PREFIX) && key.token.len() == 5 + 16 + 1 + 64);
        assert_eq!(parse_key("maos_0123_abc"), None);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2_000))]
        /// Header and token parsing never panics, whatever arrives.
        #[test]
        fn header_parsing_never_panics(header in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            if let Ok(token) = bearer(&header) {
                let _ = parse_key(token);
            }
        }

        #[test]
        fn key_shaped_tokens_parse_without_panics(id in "[0-9a-fA-F_]{0,20}", secret in "[0-9a-f_]{0,70}") {
            let token = format!("maos_{id}_{secret}");
            let _ = parse_key(&token);
            let _ = bearer(format!("Bearer {token}").as_bytes());
        }
    }
}
