//! Credentials scoped to one attempt, handed to agents in their envelope.
//!
//! A credential names a task and a fencing token and carries an HMAC-SHA256 over both. The key
//! is derived from the cluster's auth secret (drawn once by the first leader and replicated), so
//! a credential is valid on every node, before and after restarts, while that lease is the
//! task's current one; it lets the agent use its workflow's shared state
//! (`workflows/<root task id>/...`) and nothing else. Until auth is bootstrapped (and always with
//! auth off, which draws no auth secret) the key is one this node draws at start, and its
//! credentials are valid on it alone; a credential issued so is still accepted there afterwards.

use hmac::{Hmac, Mac};
use maos_raft_store::{StateMachineData, StateMachineHandle};
use sha2::Sha256;

/// Prefix and version of the credential format.
pub const PREFIX: &str = "maos1";

/// Issues and checks agent credentials.
pub struct Credentials {
    /// This node's own key, for credentials issued before the cluster's is known.
    local: [u8; 32],
    /// Where the cluster's auth secret is, once auth is bootstrapped.
    state: Option<StateMachineHandle>,
}

/// What the cluster's credential key is derived under, from its auth secret (which also keys API
/// keys' hashes: a separate derivation keeps the two uses apart).
const DERIVATION: &[u8] = b"maos agent credentials v1";

/// What a valid credential grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentScope {
    pub task_id: String,
    pub token: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    #[error("the credential is malformed; use the one from the task envelope")]
    Malformed,
    #[error("the credential was not issued by this cluster (or was altered); use the one from the task envelope")]
    BadSignature,
}

impl Credentials {
    /// Credentials keyed by the cluster's auth secret in `state` once it holds one.
    pub fn for_cluster(state: StateMachineHandle) -> Self {
        Self { local: rand::random(), state: Some(state) }
    }

    /// Credentials of this node alone: a fresh random key, so credentials from before a restart
    /// stop working.
    pub fn generate() -> Self {
        Self { local: rand::random(), state: None }
    }

    /// The cluster's key, when auth is bootstrapped: the same on every node.
    fn cluster_key(&self) -> Option<[u8; 32]> {
        Self::cluster_key_in(&self.state.as_ref()?.read())
    }

    /// The cluster's key as `state` holds it (`None` before auth is bootstrapped).
    fn cluster_key_in(state: &StateMachineData) -> Option<[u8; 32]> {
        let secret = hex::decode(&state.app.auth.secret).ok().filter(|s| !s.is_empty())?;
        let mut mac = Hmac::<Sha256>::new_from_slice(&secret).expect("HMAC takes a key of any length");
        mac.update(DERIVATION);
        Some(mac.finalize().into_bytes().into())
    }

    fn mac(key: &[u8; 32], task_id: &str, token: u64) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
        mac.update(task_id.as_bytes());
        mac.update(&token.to_be_bytes());
        mac
    }

    /// `maos1:<token>:<hex mac>:<task id>`, keyed by the auth secret in `state`: the caller's
    /// read of the applied state, which it already holds while it builds the envelope (taking a
    /// second read on the same thread deadlocks once apply is waiting to write).
    pub fn issue(&self, state: &StateMachineData, task_id: &str, token: u64) -> String {
        let key = self.state.as_ref().and_then(|_| Self::cluster_key_in(state)).unwrap_or(self.local);
        let tag = hex::encode(Self::mac(&key, task_id, token).finalize().into_bytes());
        format!("{PREFIX}:{token}:{tag}:{task_id}")
    }

    /// Check a credential's signature; whether its lease is still current is the caller's check.
    pub fn verify(&self, credential: &str) -> Result<AgentScope, CredentialError> {
        let mut parts = credential.splitn(4, ':');
        let (Some(PREFIX), Some(token), Some(tag), Some(task_id)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(CredentialError::Malformed);
        };
        let token: u64 = token.parse().map_err(|_| CredentialError::Malformed)?;
        let tag = hex::decode(tag).map_err(|_| CredentialError::Malformed)?;
        let signed_by = |key: &[u8; 32]| Self::mac(key, task_id, token).verify_slice(&tag).is_ok();
        if !self.cluster_key().is_some_and(|key| signed_by(&key)) && !signed_by(&self.local) {
            return Err(CredentialError::BadSignature);
        }
        Ok(AgentScope { task_id: task_id.to_string(), token })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_credential_verifies_only_unaltered_and_only_where_issued() {
        let node = Credentials::generate();
        let credential = node.issue(&StateMachineData::default(), "0193-task.left", 42);
        assert_eq!(node.verify(&credential), Ok(AgentScope { task_id: "0193-task.left".into(), token: 42 }));
        let forged = credential.replace(":42:", ":43:");
        assert_eq!(node.verify(&forged), Err(CredentialError::BadSignature));
        assert_eq!(Credentials::generate().verify(&credential), Err(CredentialError::BadSignature));
        assert_eq!(node.verify("garbage"), Err(CredentialError::Malformed));
    }
}
