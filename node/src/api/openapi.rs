//! The OpenAPI 3.1 document of the REST API, served at `/api/v1/openapi.json`.

use axum::Json;
use serde_json::{json, Value};

pub(crate) async fn openapi() -> Json<Value> {
    Json(openapi_document())
}

/// The OpenAPI 3.1 description of the REST API.
pub fn openapi_document() -> Value {
    let error = json!({"$ref": "#/components/schemas/Error"});
    let errors = |codes: &[(&str, &str)]| -> Value {
        let mut map = serde_json::Map::new();
        for (code, why) in codes {
            map.insert(
                code.to_string(),
                json!({"description": why, "content": {"application/json": {"schema": error}}}),
            );
        }
        Value::Object(map)
    };
    let with = |mut ok: Value, codes: &[(&str, &str)]| -> Value {
        if let (Some(ok), Value::Object(errors)) = (ok.as_object_mut(), errors(codes)) {
            ok.extend(errors);
        }
        ok
    };
    let task = json!({"description": "the task", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Task"}}}});
    let task_id = json!({"name": "task_id", "in": "path", "required": true, "schema": {"type": "string"}});
    json!({
        "openapi": "3.1.0",
        "info": {"title": "MAOS API", "version": "v1",
            "description": "Tasks, agents and the cluster. Any node answers any call; writes go to the leader. The gRPC API (client/proto/maos/v1) has the same calls and more (watch streams, workers, key-value)."},
        "paths": {
            "/api/v1/tasks": {
                "post": {"summary": "Submit a task", "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Submit"}}}},
                    "responses": with(json!({"201": {"description": "submitted", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Submitted"}}}},
                        "200": {"description": "already submitted with this idempotency key: the original task"}}),
                        &[("400", "invalid input; `field` names it"), ("413", "body over 1 MiB"), ("429", "the task queue is full; retry later"), ("503", "no leader reachable; retry")])},
                "get": {"summary": "List tasks in submission order, a page at a time",
                    "parameters": [
                        {"name": "state", "in": "query", "schema": {"type": "string"}, "description": "comma-separated: pending,queued,running,completed,failed,cancelled"},
                        {"name": "type", "in": "query", "schema": {"type": "string"}},
                        {"name": "parent", "in": "query", "schema": {"type": "string"}},
                        {"name": "submitter", "in": "query", "schema": {"type": "string"}},
                        {"name": "page_size", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                        {"name": "page_token", "in": "query", "schema": {"type": "string"}}],
                    "responses": with(json!({"200": {"description": "a page", "content": {"application/json": {"schema": {"type": "object", "properties": {
                        "tasks": {"type": "array", "items": {"$ref": "#/components/schemas/Task"}}, "next_page_token": {"type": "string"}}}}}}}), &[("400", "bad filter")])}
            },
            "/api/v1/tasks/{task_id}": {"get": {"summary": "A task", "parameters": [task_id], "responses": with(json!({"200": task}), &[("404", "unknown task")])}},
            "/api/v1/tasks/{task_id}/results": {"get": {"summary": "A task's result and its subtasks'", "parameters": [task_id], "responses": with(json!({"200": {"description": "results"}}), &[("404", "unknown task")])}},
            "/api/v1/tasks/{task_id}/cancel": {"post": {"summary": "Cancel a task and its subtasks", "parameters": [task_id],
                "requestBody": {"required": false, "content": {"application/json": {"schema": {"type": "object", "properties": {"reason": {"type": "string"}}}}}},
                "responses": with(json!({"200": {"description": "the tasks cancelled"}}), &[("404", "unknown task"), ("409", "already finished")])}},
            "/api/v1/tasks/{task_id}/events": {"get": {"summary": "The task's events as server-sent events (event `task`, JSON data) until it finishes",
                "parameters": [task_id, {"name": "children", "in": "query", "schema": {"type": "boolean"}}],
                "responses": with(json!({"200": {"description": "text/event-stream"}}), &[("404", "unknown task")])}},
            "/api/v1/cluster/nodes": {"post": {"summary": "Add a node (learner, then voter unless learner_only)",
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object", "required": ["id", "raft_addr", "api_addr"],
                    "properties": {"id": {"type": "integer"}, "raft_addr": {"type": "string"}, "api_addr": {"type": "string"}, "learner_only": {"type": "boolean"}}}}}},
                "responses": with(json!({"200": {"description": "the members"}}), &[("400", "bad id or address"), ("409", "the id is taken")])}},
            "/api/v1/cluster/nodes/{id}": {"delete": {"summary": "Remove a node", "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "integer"}}],
                "responses": with(json!({"200": {"description": "the members"}}), &[("409", "the change is not allowed now")])}},
            "/api/v1/tasks/{task_id}/retry": {"post": {"summary": "Run a failed or cancelled task again", "parameters": [task_id], "responses": with(json!({"200": task}), &[("404", "unknown task"), ("409", "not failed or cancelled")])}},
            "/api/v1/agents": {
                "get": {"summary": "Agents", "parameters": [{"name": "node_id", "in": "query", "schema": {"type": "integer"}}], "responses": {"200": {"description": "agents"}}},
                "post": {"summary": "Spawn an agent", "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object", "required": ["agent_type"], "properties": {"agent_type": {"type": "string"}, "node_id": {"type": "integer"}}}}}},
                    "responses": with(json!({"201": {"description": "the agent", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Agent"}}}}}), &[("400", "a type the node does not run"), ("429", "system.max_agents reached")])}
            },
            "/api/v1/agents/{agent_id}/{action}": {"post": {"summary": "Pause (drain), resume or terminate an agent; agent ids contain slashes",
                "parameters": [{"name": "agent_id", "in": "path", "required": true, "schema": {"type": "string"}}, {"name": "action", "in": "path", "required": true, "schema": {"enum": ["pause", "resume", "terminate"]}}],
                "responses": with(json!({"200": {"description": "the agent"}}), &[("404", "unknown agent"), ("409", "terminated")])}},
            "/api/v1/cluster/init": {"post": {"summary": "Form the cluster from the nodes' static peers (cluster.bootstrap: manual); idempotent", "responses": {"200": {"description": "formed, or already formed"}, "409": {"description": "a peer is not ready (named)"}}}},
            "/api/v1/cluster": {"get": {"summary": "This node's view: role, term, leader, members, task counts", "responses": {"200": {"description": "status"}}}},
            "/api/v1/cluster/leader": {"post": {"summary": "Transfer leadership to a voter", "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object", "required": ["node_id"], "properties": {"node_id": {"type": "integer"}}}}}},
                "responses": with(json!({"200": {"description": "the new leader and term"}}), &[("404", "not a member"), ("400", "a learner")])}},
            "/health": {"get": {"summary": "Liveness", "responses": {"200": {"description": "ok"}}}},
            "/ready": {"get": {"summary": "Readiness: a member with a known leader", "responses": {"200": {"description": "ready"}, "503": {"description": "not ready, with the reason"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text format 0.0.4"}}}}
        },
        "components": {"schemas": {
            "Error": {"type": "object", "properties": {"error": {"type": "object", "properties": {
                "code": {"type": "string"}, "message": {"type": "string"}, "field": {"type": ["string", "null"]}}}}},
            "Submit": {"type": "object", "required": ["task_type", "description"], "additionalProperties": false, "properties": {
                "task_type": {"type": "string", "description": "an agent type a node or worker serves; `mixed` is planned first"},
                "description": {"type": "string", "maxLength": 16384}, "input": {"type": "string", "maxLength": 16384},
                "priority": {"enum": ["low", "normal", "high", "critical"]}, "depends_on": {"type": "array", "items": {"type": "string"}, "maxItems": 256},
                "parent": {"type": "string"}, "max_retries": {"type": "integer", "maximum": 100}, "timeout_ms": {"type": "integer"},
                "idempotency_key": {"type": "string", "maxLength": 128}, "submitter": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}}, "capabilities": {"type": "array", "items": {"type": "string"}},
                "plan": {"type": "boolean"}, "max_agents": {"type": "integer"}}},
            "Submitted": {"type": "object", "properties": {"task_id": {"type": "string"}, "duplicate": {"type": "boolean"}}},
            "Task": {"type": "object", "properties": {"task_id": {"type": "string"}, "task_type": {"type": "string"},
                "state": {"enum": ["PENDING", "QUEUED", "RUNNING", "COMPLETED", "FAILED", "CANCELLED"]}, "attempt": {"type": "integer"},
                "node_id": {"type": "integer"}, "parent": {"type": "string"}, "children": {"type": "array", "items": {"type": "string"}},
                "result": {"type": "string"}, "cause": {"type": "string"}, "progress_percent": {"type": "integer"},
                "input_tokens": {"type": "integer"}, "output_tokens": {"type": "integer"}}},
            "Agent": {"type": "object", "properties": {"agent_id": {"type": "string"}, "node_id": {"type": "integer"}, "agent_type": {"type": "string"},
                "backend": {"type": "string"}, "state": {"enum": ["IDLE", "BUSY", "DRAINING", "FAILED", "TERMINATED"]}, "task_id": {"type": "string"}}}
        }}
    })
}
