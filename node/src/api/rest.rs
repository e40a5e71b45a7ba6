//! REST on port 8000 under `/api/v1`, mirroring the task, agent and cluster calls of the gRPC
//! API (the same service code answers both), with an OpenAPI document at `/api/v1/openapi.json`
//! generated from the handlers and their types (`openapi.rs`), so the two cannot drift: a route
//! is registered by the same `routes!` that documents it.
//!
//! - `rest.rs`: the router; `rest_error.rs`: errors and their HTTP statuses, the extractors'
//!   refusals, the answer type.
//! - `rest_tasks.rs`: the task routes and their bodies; `rest_cluster.rs`: agents and cluster.
//!
//! Errors are JSON: `{"error": {"code": "INVALID_ARGUMENT", "message": "...", "field": "..."}}`
//! with HTTP 400 (bad input, malformed JSON), 404 (unknown id, or a task a submit names that does
//! not exist), 409 (wrong state, stale token, a type nothing serves), 413 (body over
//! [`BODY_BYTES_MAX`]), 429 (queue full: retry later), 503 (no leader reachable), 504 (a
//! leadership change that did not finish in time), 500 (a bug: please report it).

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use crate::api::rest_error::Services;
use crate::api::rest_error::{not_found, BODY_BYTES_MAX};
use crate::api::{openapi, rest_cluster, rest_tasks};

/// The documented routes: each `routes!` registers handlers and adds their `#[utoipa::path]`
/// to the document. Agent ids hold slashes, so the agent actions take a wildcard route (plain
/// axum) and their documentation comes from `openapi::ApiDoc`.
fn documented() -> OpenApiRouter<Services> {
    OpenApiRouter::with_openapi(openapi::base())
        .routes(routes!(rest_tasks::submit, rest_tasks::list))
        .routes(routes!(rest_tasks::get_task))
        .routes(routes!(rest_tasks::results))
        .routes(routes!(rest_tasks::cancel))
        .routes(routes!(rest_tasks::retry))
        .routes(routes!(rest_tasks::events))
        .routes(routes!(rest_cluster::list_agents, rest_cluster::spawn_agent))
        .route("/api/v1/agents/{*rest}", post(rest_cluster::change_agent))
        .routes(routes!(rest_cluster::cluster_status))
        .routes(routes!(rest_cluster::transfer_leader))
        .routes(routes!(rest_cluster::initialize))
        .routes(routes!(rest_cluster::add_node))
        .routes(routes!(rest_cluster::remove_node))
        .routes(routes!(rest_cluster::open_session))
}

/// The OpenAPI document of the REST API as this build serves it.
#[cfg(test)]
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    openapi::finish(documented().into_openapi())
}

/// The REST routes, with the document at `/api/v1/openapi.json`.
pub fn router(services: Services) -> Router {
    let (routes, document) = documented().split_for_parts();
    let document = Arc::new(openapi::finish(document));
    routes
        .route("/api/v1/openapi.json", get(move || openapi::serve(document.clone())))
        .route("/api/v1/{*rest}", get(not_found).post(not_found))
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .with_state(services)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_states_the_bounds_validation_enforces() {
        let document = serde_json::to_value(openapi_document()).expect("serialises");
        let submit = &document["components"]["schemas"]["Submit"]["properties"];
        assert_eq!(submit["task_type"]["maxLength"], 64, "{submit}");
        assert_eq!(submit["task_type"]["pattern"], "^[A-Za-z0-9._-]{1,64}$");
        assert_eq!(submit["max_retries"]["maximum"].as_f64(), Some(100.0));
        assert_eq!(submit["depends_on"]["maxItems"], 256);
        assert_eq!(submit["labels"]["maxProperties"], 32);
        let list = &document["paths"]["/api/v1/tasks"]["get"]["parameters"];
        let page_size = list.as_array().and_then(|p| p.iter().find(|p| p["name"] == "page_size")).expect("page_size");
        assert_eq!(page_size["schema"]["minimum"].as_f64(), Some(1.0), "{page_size}");
        let codes = &document["paths"]["/api/v1/tasks"]["post"]["responses"];
        for code in ["200", "201", "400", "404", "409", "413", "429", "500", "503"] {
            assert!(codes.get(code).is_some(), "submit documents {code}: {codes}");
        }
        assert!(document["paths"].get("/api/v1/agents/{agent_id}/{action}").is_some());
    }
}
