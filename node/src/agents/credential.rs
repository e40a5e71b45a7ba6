//! Credentials scoped to one attempt, handed to agents in their envelope.
//!
//! A credential names a task and a fencing token and carries an HMAC-SHA256 over both, keyed by a
//! secret this node draws at start. It is valid on the node that issued it while that lease is
//! the task's current one; it lets the agent use its workflow's shared state
//! (`workflows/<root task id>/...`) and nothing else.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Prefix and version of the credential format.
pub const PREFIX: &str = "maos1";

/// The node's credential key.
pub struct Credentials {
    key: [u8; 32],
}

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
    #[error("the credential was not issued by this node (or was altered); call the endpoint from the envelope")]
    BadSignature,
}

impl Credentials {
    /// A fresh random key: credentials from before a restart stop working (their agents were
    /// stopped with the node).
    pub fn generate() -> Self {
        Self { key: rand::random() }
    }

    fn mac(&self, task_id: &str, token: u64) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes a key of any length");
        mac.update(task_id.as_bytes());
        mac.update(&token.to_be_bytes());
        mac
    }

    /// `maos1:<token>:<hex mac>:<task id>`.
    pub fn issue(&self, task_id: &str, token: u64) -> String {
        let tag = hex::encode(self.mac(task_id, token).finalize().into_bytes());
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
        self.mac(task_id, token).verify_slice(&tag).map_err(|_| CredentialError::BadSignature)?;
        Ok(AgentScope { task_id: task_id.to_string(), token })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_credential_verifies_only_unaltered_and_only_where_issued() {
        let node = Credentials::generate();
        let credential = node.issue("0193-task.left", 42);
        assert_eq!(node.verify(&credential), Ok(AgentScope { task_id: "0193-task.left".into(), token: 42 }));
        let forged = credential.replace(":42:", ":43:");
        assert_eq!(node.verify(&forged), Err(CredentialError::BadSignature));
        assert_eq!(Credentials::generate().verify(&credential), Err(CredentialError::BadSignature));
        assert_eq!(node.verify("garbage"), Err(CredentialError::Malformed));
    }
}
