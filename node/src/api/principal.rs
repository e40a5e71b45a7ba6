//! Who made a call and what each role may do: the principal the auth layer (`auth.rs`) puts in a request's extensions,
//! read by the handlers (`principal_in`; REST handlers take it as an extractor).

use maos_raft_store::auth::Role;

/// What a method needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    /// No credential: health, readiness, metrics, reflection, the OpenAPI document.
    Public,
    /// Any authenticated principal (who am I).
    Identity,
    /// Read tasks, agents, the cluster (a submitter reads its own tasks only).
    Read,
    Submit,
    /// Cancel a task (a submitter cancels its own only).
    Cancel,
    /// Retry any task.
    Retry,
    /// Register as a worker, take assignments, heartbeat and report for own leases.
    Work,
    /// Spawn, pause, resume, terminate agents.
    Agents,
    /// Transfer the leadership.
    Leadership,
    /// Initialise, add or remove members.
    Membership,
    /// Create, list and revoke API keys.
    Auth,
    /// Read the coordination key-value space.
    KvRead,
    /// Write the coordination key-value space.
    KvWrite,
    /// Open a client session for exactly-once writes: every role that writes (not viewers).
    Session,
}

impl Permission {
    /// Whether `role` holds this permission (ownership checks are the handler's).
    pub fn granted_to(self, role: Role) -> bool {
        use Permission as P;
        match role {
            Role::Admin => true,
            Role::Operator => !matches!(self, P::Membership | P::Auth | P::Work),
            Role::Submitter => {
                matches!(self, P::Public | P::Identity | P::Read | P::Submit | P::Cancel | P::KvRead | P::Session)
            }
            Role::Worker => matches!(self, P::Public | P::Identity | P::Work | P::Session),
            Role::Viewer => matches!(self, P::Public | P::Identity | P::Read | P::KvRead),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Permission::Public => "public",
            Permission::Identity => "identity",
            Permission::Read => "read",
            Permission::Submit => "submit",
            Permission::Cancel => "cancel",
            Permission::Retry => "retry",
            Permission::Work => "work",
            Permission::Agents => "agents",
            Permission::Leadership => "leadership",
            Permission::Membership => "membership",
            Permission::Auth => "auth",
            Permission::KvRead => "kv-read",
            Permission::KvWrite => "kv-write",
            Permission::Session => "session",
        }
    }
}

/// Who made a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// `key:<id>`, `agent:<task id>`, or `anonymous` (auth off).
    pub id: String,
    pub roles: Vec<Role>,
    pub namespace: String,
    /// An agent credential's scope is checked by the key-value service itself.
    pub agent: bool,
}

impl Principal {
    pub fn anonymous() -> Self {
        Principal { id: "anonymous".into(), roles: vec![Role::Admin], namespace: "default".into(), agent: false }
    }

    pub fn may(&self, permission: Permission) -> bool {
        if self.agent {
            return matches!(permission, Permission::KvRead | Permission::KvWrite | Permission::Public);
        }
        self.roles.iter().any(|role| permission.granted_to(*role))
    }

    /// Whether this principal sees the fencing tokens of leases: operators and admins (a
    /// worker knows its own from its assignment). Others see 0, so a leaked viewer or
    /// submitter key cannot report for a lease it does not hold.
    pub fn sees_fencing_tokens(&self) -> bool {
        !self.agent && self.roles.iter().any(|r| matches!(r, Role::Admin | Role::Operator))
    }

    /// Whether this principal may act on every task, not only its own.
    pub fn sees_all_tasks(&self) -> bool {
        !self.agent && self.roles.iter().any(|r| matches!(r, Role::Admin | Role::Operator | Role::Viewer))
    }
}

impl Principal {
    /// A gRPC request carrying this principal, for the REST handlers that call the services.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.extensions_mut().insert(self.clone());
        request
    }
}

/// REST handlers take the principal as an extractor (never refused: the layer has decided).
impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Principal {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(principal_in(&parts.extensions))
    }
}

/// The principal the auth layer put on a request (anonymous when auth is off or the request did
/// not pass the layer, as in unit tests).
pub fn principal_in(extensions: &axum::http::Extensions) -> Principal {
    extensions.get::<Principal>().cloned().unwrap_or_else(Principal::anonymous)
}
