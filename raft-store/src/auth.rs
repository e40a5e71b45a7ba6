//! Who may call the cluster: the API keys and the cluster's auth secret, replicated like
//! everything else so that a key created or revoked on one node holds on every node as soon as
//! the entry applies there.
//!
//! Only a keyed hash of each key's secret is held (HMAC-SHA256 under the cluster's auth secret,
//! computed by the node that creates the key or checks a call; apply never hashes). The auth
//! secret is drawn once, by the leader that bootstraps auth, together with the first admin key.

use std::collections::{BTreeMap, BTreeSet};

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// Upper bound on API keys held (expired keys leave on the next `Tick`).
pub const API_KEYS_MAX: usize = 10_000;
/// Upper bound on a key's name, in bytes.
pub const KEY_NAME_BYTES_MAX: usize = 64;
/// A key id: this many lowercase hex digits.
pub const KEY_ID_HEX_LEN: usize = 16;
/// A hash or the auth secret: this many lowercase hex digits (32 bytes).
pub const DIGEST_HEX_LEN: usize = 64;

/// The prefix of every API key's secret, so a leak scan can recognise one.
pub const KEY_PREFIX: &str = "maos_";

/// A role: what a principal may do (the table of methods to permissions is the node's
/// `api/auth.rs`; `docs/SECURITY.md` shows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything, membership and auth included.
    Admin,
    /// Agents, cancel or retry any task, leadership transfer.
    Operator,
    /// Submit; read and cancel its own tasks.
    Submitter,
    /// Register, take assignments, heartbeat and report for its own leases.
    Worker,
    /// Read only.
    Viewer,
}

impl Role {
    pub const ALL: [Role; 5] = [Role::Admin, Role::Operator, Role::Submitter, Role::Worker, Role::Viewer];

    pub fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Submitter => "submitter",
            Role::Worker => "worker",
            Role::Viewer => "viewer",
        }
    }

    pub fn parse(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|role| role.name() == name)
    }
}

/// One API key, without its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeyRecord {
    /// The public part of the key (`KEY_ID_HEX_LEN` hex digits), also its principal's id suffix.
    pub id: String,
    /// A name for people (`ci`, `alice-laptop`).
    pub name: String,
    pub role: Role,
    /// HMAC-SHA256 of the secret under the cluster's auth secret, hex.
    pub hash: String,
    /// Who created it (a principal id, or `bootstrap`).
    pub created_by: String,
    pub created_at_ms: u64,
    /// Refused from this time on, and removed by the next `Tick` after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
}

impl ApiKeyRecord {
    /// Whether the key may be used at `now_ms`.
    pub fn live_at(&self, now_ms: u64) -> bool {
        self.expires_at_ms.is_none_or(|at| at > now_ms)
    }
}

/// The replicated auth state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthState {
    /// The key under which key secrets are hashed, hex; empty until auth is bootstrapped.
    pub secret: String,
    pub keys: BTreeMap<String, ApiKeyRecord>,
    /// Keys with an expiry, by expiry time.
    #[serde(default)]
    pub expiries: BTreeSet<(u64, String)>,
}

impl AuthState {
    pub fn is_empty(&self) -> bool {
        self.secret.is_empty() && self.keys.is_empty()
    }

    pub fn bootstrapped(&self) -> bool {
        !self.secret.is_empty()
    }

    /// Remove the keys whose expiry is at or before `now_ms`.
    pub fn purge_expired(&mut self, now_ms: u64) {
        while let Some((at, id)) = self.expiries.first().cloned() {
            if at > now_ms {
                break;
            }
            self.expiries.pop_first();
            self.keys.remove(&id);
        }
    }

    pub fn expiry_due(&self, now_ms: u64) -> bool {
        self.expiries.first().is_some_and(|(at, _)| *at <= now_ms)
    }

    /// Apply an auth command (already checked by [`check`]).
    pub fn apply(&mut self, now_ms: u64, command: &AuthCommand) -> Result<(), AuthRejection> {
        match command {
            AuthCommand::Bootstrap { secret, admin } => {
                if self.bootstrapped() {
                    return Err(AuthRejection::AlreadyBootstrapped);
                }
                self.secret = secret.clone();
                self.insert(now_ms, admin)
            }
            AuthCommand::CreateKey { key } => {
                if !self.bootstrapped() {
                    return Err(AuthRejection::NotBootstrapped);
                }
                self.insert(now_ms, key)
            }
            AuthCommand::RevokeKey { id } => match self.keys.remove(id) {
                Some(old) => {
                    if let Some(at) = old.expires_at_ms {
                        self.expiries.remove(&(at, id.clone()));
                    }
                    Ok(())
                }
                None => Err(AuthRejection::UnknownKey { id: id.clone() }),
            },
        }
    }

    fn insert(&mut self, now_ms: u64, key: &ApiKeyRecord) -> Result<(), AuthRejection> {
        if self.keys.contains_key(&key.id) {
            return Err(AuthRejection::DuplicateKey { id: key.id.clone() });
        }
        if self.keys.len() >= API_KEYS_MAX {
            return Err(AuthRejection::TooManyKeys { limit: API_KEYS_MAX });
        }
        if key.expires_at_ms.is_some_and(|at| at <= now_ms) {
            return Err(AuthRejection::Invalid { field: "expires_at_ms".into(), message: "is already past".into() });
        }
        let mut key = key.clone();
        key.created_at_ms = now_ms;
        if let Some(at) = key.expires_at_ms {
            self.expiries.insert((at, key.id.clone()));
        }
        self.keys.insert(key.id.clone(), key);
        Ok(())
    }

    /// The invariants `validate()` checks.
    pub fn validate(&self) -> Result<(), String> {
        if !self.bootstrapped() && !self.keys.is_empty() {
            return Err("API keys exist but auth was never bootstrapped".into());
        }
        if self.keys.len() > API_KEYS_MAX {
            return Err(format!("{} API keys exceed the bound {API_KEYS_MAX}", self.keys.len()));
        }
        for (id, key) in &self.keys {
            if *id != key.id || check_key(key).is_err() {
                return Err(format!("API key {id} is malformed"));
            }
        }
        let with_expiry = self.keys.values().filter_map(|k| k.expires_at_ms.map(|at| (at, k.id.clone())));
        if with_expiry.clone().count() != self.expiries.len()
            || !with_expiry.into_iter().all(|e| self.expiries.contains(&e))
        {
            return Err("the API key expiry index disagrees with the keys".into());
        }
        Ok(())
    }
}

/// Auth commands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum AuthCommand {
    /// Set the auth secret and create the first admin key; refused once auth is bootstrapped.
    Bootstrap {
        secret: String,
        admin: ApiKeyRecord,
    },
    CreateKey {
        key: ApiKeyRecord,
    },
    /// Remove a key: calls with it are refused from the moment a node applies this.
    RevokeKey {
        id: String,
    },
}

/// Why an auth command was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "auth", rename_all = "snake_case")]
pub enum AuthRejection {
    #[error("auth is already bootstrapped; use an admin key to create more keys")]
    AlreadyBootstrapped,
    #[error("auth is not bootstrapped yet (the first leader does it when the cluster forms); retry shortly")]
    NotBootstrapped,
    #[error("an API key with id {id} exists")]
    DuplicateKey { id: String },
    #[error("no API key with id {id} (revoked, expired or never created); `maos auth key list` shows the keys")]
    UnknownKey { id: String },
    #[error("{limit} API keys exist, the most the cluster keeps; revoke unused keys first")]
    TooManyKeys { limit: usize },
    #[error("field `{field}` {message}")]
    Invalid { field: String, message: String },
}

fn is_hex(text: &str, len: usize) -> bool {
    text.len() == len && text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn check_key(key: &ApiKeyRecord) -> Result<(), AuthRejection> {
    if !is_hex(&key.id, KEY_ID_HEX_LEN) {
        return Err(AuthRejection::Invalid {
            field: "id".into(),
            message: format!("must be {KEY_ID_HEX_LEN} lowercase hex digits"),
        });
    }
    if !is_hex(&key.hash, DIGEST_HEX_LEN) {
        return Err(AuthRejection::Invalid {
            field: "hash".into(),
            message: format!("must be {DIGEST_HEX_LEN} hex digits"),
        });
    }
    if key.name.is_empty() || key.name.len() > KEY_NAME_BYTES_MAX || key.name.chars().any(char::is_control) {
        return Err(AuthRejection::Invalid {
            field: "name".into(),
            message: format!("must be 1..={KEY_NAME_BYTES_MAX} bytes without control characters"),
        });
    }
    if key.created_by.len() > 128 {
        return Err(AuthRejection::Invalid { field: "created_by".into(), message: "is over 128 bytes".into() });
    }
    Ok(())
}

/// The state-free checks of an auth command.
pub fn check(command: &AuthCommand) -> Result<(), AuthRejection> {
    match command {
        AuthCommand::Bootstrap { secret, admin } => {
            if !is_hex(secret, DIGEST_HEX_LEN) {
                return Err(AuthRejection::Invalid {
                    field: "secret".into(),
                    message: format!("must be {DIGEST_HEX_LEN} hex digits"),
                });
            }
            if admin.role != Role::Admin {
                return Err(AuthRejection::Invalid {
                    field: "role".into(),
                    message: "the bootstrap key is an admin".into(),
                });
            }
            check_key(admin)
        }
        AuthCommand::CreateKey { key } => check_key(key),
        AuthCommand::RevokeKey { id } => match is_hex(id, KEY_ID_HEX_LEN) {
            true => Ok(()),
            false => Err(AuthRejection::UnknownKey { id: id.chars().take(32).collect() }),
        },
    }
}

// Key material: drawn and hashed by nodes (creating a key, checking a call), never by apply.

/// A new API key: its id, its secret (the bearer token) and the keyed hash the state holds.
pub struct NewKey {
    pub id: String,
    pub token: String,
    pub hash: String,
}

/// The keyed hash of a key's secret part under the cluster's auth secret (hex).
pub fn key_hash(auth_secret_hex: &str, secret: &str) -> String {
    hex::encode(key_mac(auth_secret_hex, secret).finalize().into_bytes())
}

pub fn key_mac(auth_secret_hex: &str, secret: &str) -> Hmac<Sha256> {
    let key = hex::decode(auth_secret_hex).unwrap_or_default();
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("HMAC takes a key of any length");
    mac.update(b"maos api key v1\0");
    mac.update(secret.as_bytes());
    mac
}

/// Draw a new key under `auth_secret_hex`.
pub fn new_key(auth_secret_hex: &str) -> NewKey {
    let id = hex::encode(rand::random::<[u8; KEY_ID_HEX_LEN / 2]>());
    let secret = hex::encode(rand::random::<[u8; DIGEST_HEX_LEN / 2]>());
    let hash = key_hash(auth_secret_hex, &secret);
    NewKey { token: format!("{KEY_PREFIX}{id}_{secret}"), id, hash }
}

/// A new auth secret (hex).
pub fn new_auth_secret() -> String {
    hex::encode(rand::random::<[u8; DIGEST_HEX_LEN / 2]>())
}

/// Split an API key into its id and secret, if it has the shape of one.
pub fn parse_key(token: &str) -> Option<(&str, &str)> {
    let rest = token.strip_prefix(KEY_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(id, KEY_ID_HEX_LEN) && hex(secret, DIGEST_HEX_LEN)).then_some((id, secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str, expires_at_ms: Option<u64>) -> ApiKeyRecord {
        ApiKeyRecord {
            id: id.into(),
            name: "ci".into(),
            role: Role::Submitter,
            hash: "ab".repeat(32),
            created_by: "test".into(),
            created_at_ms: 0,
            expires_at_ms,
        }
    }

    #[test]
    fn keys_need_a_bootstrap_and_expire_and_revoke() {
        let mut auth = AuthState::default();
        let create = AuthCommand::CreateKey { key: key("0123456789abcdef", Some(2_000)) };
        assert_eq!(auth.apply(1_000, &create), Err(AuthRejection::NotBootstrapped));
        let mut admin = key("00000000000000aa", None);
        admin.role = Role::Admin;
        let bootstrap = AuthCommand::Bootstrap { secret: "cd".repeat(32), admin };
        assert_eq!(check(&bootstrap), Ok(()));
        auth.apply(1_000, &bootstrap).unwrap();
        assert_eq!(auth.apply(1_000, &bootstrap), Err(AuthRejection::AlreadyBootstrapped));
        auth.apply(1_000, &create).unwrap();
        assert_eq!(auth.validate(), Ok(()));
        assert!(auth.expiry_due(2_000));
        auth.purge_expired(2_000);
        assert!(!auth.keys.contains_key("0123456789abcdef"));
        assert_eq!(auth.validate(), Ok(()));
        auth.apply(1_000, &AuthCommand::RevokeKey { id: "00000000000000aa".into() }).unwrap();
        assert!(auth.keys.is_empty());
        assert!(matches!(
            auth.apply(1_000, &AuthCommand::RevokeKey { id: "00000000000000aa".into() }),
            Err(AuthRejection::UnknownKey { .. })
        ));
    }

    #[test]
    fn malformed_keys_are_refused_by_the_checks() {
        assert!(check(&AuthCommand::CreateKey { key: key("XYZ", None) }).is_err());
        let mut long = key("0123456789abcdef", None);
        long.name = "n".repeat(KEY_NAME_BYTES_MAX + 1);
        assert!(check(&AuthCommand::CreateKey { key: long }).is_err());
        let not_admin = AuthCommand::Bootstrap { secret: "cd".repeat(32), admin: key("0123456789abcdef", None) };
        assert!(check(&not_admin).is_err());
    }
}
