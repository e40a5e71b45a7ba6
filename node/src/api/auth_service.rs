//! `maos.v1.AuthService`: create, list and revoke API keys; who am I. The auth layer
//! (`auth.rs`) lets only admins reach the key methods.

use std::sync::Arc;

use maos_client::proto::v1::auth_service_server::AuthService;
use maos_client::proto::v1::{
    ApiKey, AuditEntry, CreateKeyRequest, CreateKeyResponse, ListAuditRequest, ListAuditResponse, ListKeysRequest,
    ListKeysResponse, RevokeKeyRequest, RevokeKeyResponse, WhoAmIRequest, WhoAmIResponse,
};
use maos_raft_store::auth::{ApiKeyRecord, AuthCommand, Role, KEY_NAME_BYTES_MAX};
use maos_raft_store::Command;
use tonic::{Request, Response, Status};

use crate::api::principal::principal_in;
use crate::api::status::{invalid_field, status_from, storage_status};
use crate::raft::core::NodeCore;
use crate::storage::Storage;
use maos_raft_store::auth::new_key;

/// Upper bound on a key's lifetime: ten years.
pub const KEY_LIFETIME_S_MAX: u64 = 10 * 365 * 86_400;

pub struct AuthApi {
    pub core: Arc<NodeCore>,
    pub storage: Arc<Storage>,
    pub enabled: bool,
}

fn view(key: &ApiKeyRecord) -> ApiKey {
    ApiKey {
        id: key.id.clone(),
        name: key.name.clone(),
        role: key.role.name().to_string(),
        created_by: key.created_by.clone(),
        created_at_ms: key.created_at_ms,
        expires_at_ms: key.expires_at_ms.unwrap_or(0),
    }
}

#[tonic::async_trait]
impl AuthService for AuthApi {
    async fn create_key(&self, request: Request<CreateKeyRequest>) -> Result<Response<CreateKeyResponse>, Status> {
        let principal = principal_in(request.extensions());
        let CreateKeyRequest { name, role, expires_in_s } = request.into_inner();
        if name.is_empty() || name.len() > KEY_NAME_BYTES_MAX || name.chars().any(char::is_control) {
            return Err(invalid_field(
                "name",
                &format!("must be 1..={KEY_NAME_BYTES_MAX} bytes without control characters"),
            ));
        }
        let role = Role::parse(&role)
            .ok_or_else(|| invalid_field("role", "must be one of admin, operator, submitter, worker, viewer"))?;
        if expires_in_s > KEY_LIFETIME_S_MAX {
            return Err(invalid_field(
                "expires_in_s",
                &format!("must be at most {KEY_LIFETIME_S_MAX} (ten years); 0 means never"),
            ));
        }
        let secret = self.core.state.read().app.auth.secret.clone();
        if secret.is_empty() {
            return Err(Status::unavailable(
                "auth is not bootstrapped yet (the first leader does it when the cluster forms); retry shortly",
            ));
        }
        let now = (self.core.clock)();
        let key = new_key(&secret);
        let record = ApiKeyRecord {
            id: key.id.clone(),
            name,
            role,
            hash: key.hash,
            created_by: principal.id.clone(),
            created_at_ms: now,
            expires_at_ms: (expires_in_s > 0).then(|| now.saturating_add(expires_in_s.saturating_mul(1_000))),
        };
        self.core.write(Command::Auth(AuthCommand::CreateKey { key: record.clone() })).await.map_err(status_from)?;
        let detail =
            serde_json::json!({ "name": record.name, "role": role.name(), "expires_at_ms": record.expires_at_ms });
        self.storage.audit(self.core.id, &principal.id, "auth.key.create", &record.id, detail);
        tracing::info!(principal = %principal.id, key = %record.id, role = role.name(), "API key created");
        // The applied record carries the leader's creation time; the proposed one is close.
        Ok(Response::new(CreateKeyResponse { key: Some(view(&record)), secret: key.token }))
    }

    async fn list_keys(&self, _request: Request<ListKeysRequest>) -> Result<Response<ListKeysResponse>, Status> {
        self.core.read_barrier().await.map_err(status_from)?;
        let state = self.core.state.read();
        Ok(Response::new(ListKeysResponse { keys: state.app.auth.keys.values().map(view).collect() }))
    }

    async fn revoke_key(&self, request: Request<RevokeKeyRequest>) -> Result<Response<RevokeKeyResponse>, Status> {
        let principal = principal_in(request.extensions());
        let id = request.into_inner().id;
        self.core.write(Command::Auth(AuthCommand::RevokeKey { id: id.clone() })).await.map_err(status_from)?;
        self.storage.audit(self.core.id, &principal.id, "auth.key.revoke", &id, serde_json::json!({}));
        tracing::info!(principal = %principal.id, key = %id, "API key revoked");
        Ok(Response::new(RevokeKeyResponse {}))
    }

    async fn list_audit(&self, request: Request<ListAuditRequest>) -> Result<Response<ListAuditResponse>, Status> {
        let ListAuditRequest { since_ms, principal, limit } = request.into_inner();
        let limit = match limit {
            0 => 100,
            n if n > 1_000 => return Err(invalid_field("limit", "must be at most 1000")),
            n => n as usize,
        };
        let records = self.storage.audit_list(since_ms, &principal, limit).await.map_err(|e| storage_status(&e))?;
        let entries = records
            .into_iter()
            .map(|r| AuditEntry {
                at_ms: r.at_ms,
                node_id: r.node_id,
                principal: r.principal,
                action: r.action,
                target: r.target,
                detail_json: r.detail.to_string(),
            })
            .collect();
        Ok(Response::new(ListAuditResponse { entries }))
    }

    async fn who_am_i(&self, request: Request<WhoAmIRequest>) -> Result<Response<WhoAmIResponse>, Status> {
        let principal = principal_in(request.extensions());
        Ok(Response::new(WhoAmIResponse {
            principal: principal.id,
            roles: principal.roles.iter().map(|r| r.name().to_string()).collect(),
            namespace: principal.namespace,
            auth_enabled: self.enabled,
        }))
    }
}
