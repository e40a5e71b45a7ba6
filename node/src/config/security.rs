//! The `security` section: auth, the cluster secret, TLS on the API and Raft ports, JWT issuers and rate
//! limits (`docs/SECURITY.md`), and the helpers that read them.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Who may call the node (`docs/SECURITY.md`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecuritySection {
    pub auth: AuthSection,
    /// A file whose first line is a secret every node of the cluster shares (at least 32
    /// characters; `openssl rand -hex 32`). Every call to the Raft port must carry it, so only
    /// members can send Raft traffic or forward writes. Unset: the Raft port is open to anyone
    /// who reaches it (the node warns when it listens beyond loopback).
    pub cluster_secret_file: Option<PathBuf>,
    /// With auth off, listen on addresses other than loopback anyway (reported in `/ready`'s
    /// body and by `maos health --all-components`).
    pub allow_insecure: bool,
    /// TLS on the API port (8000).
    pub tls: TlsSection,
    /// Mutual TLS on the Raft port (7000), between members.
    pub peer_tls: PeerTlsSection,
    /// Calls per second each caller may make on the API port.
    pub rate_limit: RateLimitSection,
    /// JWT bearer tokens from identity providers, beside API keys.
    pub jwt: JwtSection,
}

/// Upper bound on `security.jwt.issuers`.
pub const JWT_ISSUERS_MAX: usize = 16;

/// JWT bearer tokens (`authorization: Bearer <JWT>`) from the issuers listed, each checked
/// against its JSON Web Key Set: signature, `exp`, `nbf`, `iss`, `aud` and `sub` all required.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JwtSection {
    pub issuers: Vec<JwtIssuerSection>,
}

/// One identity provider whose tokens the node accepts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JwtIssuerSection {
    /// The `iss` a token must carry (for example `https://idp.example.com/`).
    pub issuer: String,
    /// The `aud` a token must name (for example `maos`).
    pub audience: String,
    /// A JSON Web Key Set file (`{"keys": [...]}`), read again when it changes.
    pub jwks_file: Option<PathBuf>,
    /// A JSON Web Key Set URL (https, or http on loopback), fetched at start and every
    /// `jwks_refresh_s`.
    pub jwks_url: Option<String>,
    pub jwks_refresh_s: u64,
    /// The claim that names the token's MAOS roles: an array of role names, or one string of
    /// names separated by spaces.
    pub roles_claim: String,
    /// Seconds of clock difference allowed on `exp` and `nbf`.
    pub leeway_s: u64,
    /// How principals of this issuer are named: `jwt:<name>:<sub>` (default: the issuer).
    pub name: Option<String>,
}

impl Default for JwtIssuerSection {
    fn default() -> Self {
        Self {
            issuer: String::new(),
            audience: String::new(),
            jwks_file: None,
            jwks_url: None,
            jwks_refresh_s: 300,
            roles_claim: "roles".into(),
            leeway_s: 0,
            name: None,
        }
    }
}

/// Calls per second each principal (an API key, an agent credential; a source address for
/// calls that present no valid credential) may make on the API port. Over it, a call is
/// answered `RESOURCE_EXHAUSTED` (429 over REST) with when to retry. Counted in Redis when
/// `redis.url` is set, so the limit holds across the cluster, and on each node otherwise (or
/// while Redis does not answer). Health, readiness, metrics and reflection are never limited.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitSection {
    /// The sustained rate per principal; 0 (the default): no limit.
    pub requests_per_second: f64,
    /// Calls a principal may make at once after being idle; 0: the same as one second's rate
    /// (at least 1).
    pub burst: u32,
}

impl RateLimitSection {
    /// Whether calls are limited.
    pub fn enabled(&self) -> bool {
        self.requests_per_second > 0.0
    }

    /// The burst in calls (at least 1).
    pub fn burst_calls(&self) -> u32 {
        match self.burst {
            0 => (self.requests_per_second.ceil() as u32).max(1),
            n => n,
        }
    }
}

/// Mutual TLS between members on the Raft port: each node presents `cert_file` and accepts only
/// peers whose certificate a CA in `ca_file` signed, both when it serves and when it calls. A
/// node without such a certificate can neither join nor send Raft traffic. The certificate must
/// name the host its peers dial (`cluster.peers[].raft_addr`: a DNS name or an IP address in its
/// subject alternative names). The files are read again when they change, or on SIGHUP.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PeerTlsSection {
    /// The PEM certificate chain this node presents to its peers, as server and as client.
    pub cert_file: Option<PathBuf>,
    /// The PEM private key of the certificate (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
    /// A PEM bundle of the CAs that sign members' certificates.
    pub ca_file: Option<PathBuf>,
    /// PEM certificate revocation lists from `ca_file`'s CAs: a peer whose certificate one lists
    /// is refused when it calls this node (checked by the serving side).
    pub crl_file: Option<PathBuf>,
}

impl PeerTlsSection {
    /// Whether the Raft port speaks mutual TLS.
    pub fn enabled(&self) -> bool {
        self.cert_file.is_some()
    }
}

/// TLS on the API port: gRPC, REST, `/metrics` and `/ready` all over TLS (ALPN `h2` and
/// `http/1.1`). The files are read again when they change, or on SIGHUP, without a restart.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSection {
    /// The PEM certificate chain the port presents (the node's own first). With `key_file`,
    /// the port speaks only TLS.
    pub cert_file: Option<PathBuf>,
    /// The PEM private key of the certificate (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
    /// The PEM CA bundle that signed `cert_file`, for the callers the node itself points at this
    /// port: command agents find it in their envelope (`api.ca_file`). Without it they check
    /// the port's certificate against the public web roots.
    pub ca_file: Option<PathBuf>,
    /// A PEM bundle of CAs: when set, every client must present a certificate one of them
    /// signed (mutual TLS).
    pub client_ca_file: Option<PathBuf>,
    /// PEM certificate revocation lists from `client_ca_file`'s CAs: a client whose certificate
    /// one lists is refused in the handshake.
    pub crl_file: Option<PathBuf>,
    /// Client certificates as principals (with `client_ca_file`): a call without a bearer token
    /// whose certificate is valid for one of these names is that principal.
    pub client_principals: Vec<CertPrincipal>,
}

/// Upper bound on `security.tls.client_principals`.
pub const CERT_PRINCIPALS_MAX: usize = 256;

/// One client certificate name and the role its holder gets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertPrincipal {
    /// A DNS name the certificate must be valid for (in its subject alternative names, checked as
    /// a server's name is); the principal is `cert:<name>`.
    pub name: String,
    /// `admin`, `operator`, `submitter`, `worker` or `viewer`.
    pub role: maos_raft_store::auth::Role,
}

impl TlsSection {
    /// Whether the API port speaks TLS.
    pub fn enabled(&self) -> bool {
        self.cert_file.is_some()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSection {
    /// Every call on port 8000 but health, readiness, metrics and reflection needs a token.
    /// `false` only explicitly, and then only on loopback unless `security.allow_insecure`.
    pub enabled: bool,
}

impl Default for AuthSection {
    fn default() -> Self {
        Self { enabled: true }
    }
}

/// The shortest cluster secret accepted, in bytes (`openssl rand -hex 32` makes 64).
pub const CLUSTER_SECRET_BYTES_MIN: usize = 32;

/// Read `security.cluster_secret_file`: its first line, at least [`CLUSTER_SECRET_BYTES_MIN`]
/// printable bytes.
pub fn read_cluster_secret(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let secret = text.lines().next().unwrap_or_default().trim().to_string();
    if secret.len() < CLUSTER_SECRET_BYTES_MIN || !secret.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "{}: the secret must be at least {CLUSTER_SECRET_BYTES_MIN} printable characters on the first line (make one with `openssl rand -hex 32`)",
            path.display()
        ));
    }
    Ok(secret)
}
