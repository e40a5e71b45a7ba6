//! The client API on port 8000: gRPC services, the REST mirror, `/health`, `/ready` and
//! `/metrics`, all on one port.
//!
//! - `status.rs`: every error (refusals, the write path's, the task-data store's) to a gRPC
//!   status, in one place; nothing below this layer knows tonic's `Status`.
//! - `views.rs`: replicated records as API messages, and enum conversions.
//! - `streams.rs`: the bound on open streams and the watches' polling.
//! - `kv.rs`, `cluster.rs`, `tasks.rs`, `agents.rs`, `workers.rs`: the gRPC services.
//! - `rest.rs` (the router and the HTTP mapping of statuses), `rest_tasks.rs` and `rest_cluster.rs`
//!   (the handlers and their JSON bodies), `openapi.rs` (the document, generated from those).
//! - `auth.rs`: the one authorization layer (tokens to principals, the method-to-permission
//!   tables, default deny); `principal.rs`: the principal handlers read and what each role
//!   may do; `auth_service.rs`: API keys and the audit; `limits.rs`: calls per second per
//!   caller and calls in flight, which the auth layer applies; `jwt.rs`: JWT bearer tokens from
//!   configured issuers.
//! - `sessions.rs`: the layer that puts a request on its caller's client session
//!   (`maos-session`), for exactly-once writes across nodes.
//! - `http.rs`: `/health`, `/ready`, `/metrics`.
//!
//! The REST handlers call the gRPC service structs, so both surfaces share validation.

pub(crate) mod agents;
pub(crate) mod auth;
pub(crate) mod auth_service;
pub(crate) mod cluster;
pub(crate) mod http;
pub(crate) mod jwt;
pub(crate) mod kv;
pub(crate) mod limits;
pub(crate) mod openapi;
pub(crate) mod principal;
pub(crate) mod rest;
pub(crate) mod rest_cluster;
pub(crate) mod rest_error;
pub(crate) mod rest_tasks;
pub(crate) mod sessions;
pub(crate) mod status;
pub(crate) mod streams;
pub(crate) mod tasks;
pub(crate) mod views;
pub(crate) mod workers;
