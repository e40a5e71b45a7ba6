//! Sign-in to the dashboard when auth is on (`security.auth.enabled`): every page and live
//! stream needs an API key of a role that reads every task (viewer, operator, admin), given once
//! on `/login` and kept in a cookie the browser sends back (`HttpOnly`, `SameSite=Strict`, and
//! `Secure` over TLS). The key is checked on every request, as on port 8000, so a revoked or
//! expired key stops working at once; a refused sign-in is audited (`auth.refused`).
//!
//! The stylesheet and scripts are served to anyone: the login page needs them, and they hold
//! nothing of the cluster's.

use std::sync::Arc;

use axum::extract::{FromRequest, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use maud::{html, Markup, DOCTYPE};

use super::layout::head;
use super::Dashboard;
use crate::api::auth::Authorizer;
use crate::api::principal::Principal;
use crate::transport::PeerAddr;

/// The cookie that carries the key.
pub const COOKIE: &str = "maos_dashboard";
/// How long a browser keeps the cookie (12 hours); the key's own expiry still applies.
const COOKIE_MAX_AGE_S: u64 = 12 * 3600;

/// Who may see the dashboard, when auth is on.
pub struct Gate {
    pub authorizer: Arc<Authorizer>,
    /// Mark the cookie `Secure` (the port speaks TLS).
    pub secure: bool,
}

/// The middleware: a request without a valid key goes to the sign-in page (a live stream gets
/// 401). With auth off there is no gate and everything passes.
pub async fn require(State(dash): State<Arc<Dashboard>>, request: Request, next: Next) -> Response {
    let Some(gate) = &dash.gate else { return next.run(request).await };
    let path = request.uri().path();
    if path == "/login" || path == "/logout" || path.starts_with("/assets/") {
        return next.run(request).await;
    }
    let live = path.starts_with("/sse/");
    match cookie(request.headers()).map(|key| signed_in(gate, &key)) {
        Some(Ok(_)) => next.run(request).await,
        _ if live => (StatusCode::UNAUTHORIZED, "sign in on /login").into_response(),
        _ => Redirect::to("/login").into_response(),
    }
}

/// The principal of `key`, if it may read the dashboard; else why not, for the sign-in page.
fn signed_in(gate: &Gate, key: &str) -> Result<Principal, String> {
    let principal = gate.authorizer.authenticate(key).map_err(|e| e.to_string())?;
    if !principal.sees_all_tasks() {
        return Err(format!(
            "{} may not read the dashboard: sign in with a key of the viewer, operator or admin role",
            principal.id
        ));
    }
    Ok(principal)
}

/// The key in the request's cookie, if any.
fn cookie(headers: &HeaderMap) -> Option<String> {
    headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).find_map(|pair| {
        let (name, value) = pair.trim().split_once('=')?;
        (name == COOKIE && !value.is_empty()).then(|| value.to_string())
    })
}

/// `GET /login`.
pub async fn page(State(dash): State<Arc<Dashboard>>) -> Response {
    match dash.gate {
        None => Redirect::to("/").into_response(),
        Some(_) => form(&dash, None).into_response(),
    }
}

#[derive(serde::Deserialize)]
pub struct SignIn {
    key: String,
}

/// `POST /login`: check the key; keep it in the cookie, or say why not.
pub async fn submit(State(dash): State<Arc<Dashboard>>, request: Request) -> Response {
    let Some(gate) = &dash.gate else { return Redirect::to("/").into_response() };
    let source = PeerAddr::of(request.extensions()).map(|a| a.to_string()).unwrap_or_else(|| "unknown".into());
    let key = match Form::<SignIn>::from_request(request, &()).await {
        Ok(Form(sign_in)) => sign_in.key.trim().to_string(),
        Err(_) => String::new(),
    };
    if key.is_empty() {
        return (StatusCode::BAD_REQUEST, form(&dash, Some("key: paste an API key (maos_…)"))).into_response();
    }
    match signed_in(gate, &key) {
        Ok(principal) => {
            tracing::info!(principal = %principal.id, %source, "signed in to the dashboard");
            let secure = if gate.secure { "; Secure" } else { "" };
            let set = format!("{COOKIE}={key}; Path=/; HttpOnly; SameSite=Strict; Max-Age={COOKIE_MAX_AGE_S}{secure}");
            let mut response = Redirect::to("/").into_response();
            match HeaderValue::from_str(&set) {
                Ok(value) => {
                    response.headers_mut().insert(header::SET_COOKIE, value);
                    response
                }
                Err(_) => (StatusCode::BAD_REQUEST, form(&dash, Some("key: not a MAOS API key"))).into_response(),
            }
        }
        Err(why) => {
            let detail = serde_json::json!({ "source": source, "reason": why });
            dash.storage.audit(dash.core.id, "unknown", "auth.refused", "dashboard login", detail);
            (StatusCode::UNAUTHORIZED, form(&dash, Some(&why))).into_response()
        }
    }
}

/// `GET /logout`: forget the cookie.
pub async fn logout() -> Response {
    let mut response = Redirect::to("/login").into_response();
    let clear = format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0");
    if let Ok(value) = HeaderValue::from_str(&clear) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

/// The sign-in page, with `error` above the form when the last try failed.
fn form(dash: &Dashboard, error: Option<&str>) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(dash, "Sign in", false))
            body {
                header { span.brand { "MAOS" } span.cluster { "cluster " (dash.core.cluster_name) } }
                main {
                    h1 { "Sign in" }
                    @if let Some(error) = error { p.error role="alert" { (error) } }
                    form method="post" action="/login" {
                        label for="key" { "API key (viewer, operator or admin: " code { "maos auth key create --role viewer" } ")" }
                        input #key type="password" name="key" autocomplete="off" required;
                        button type="submit" { "Sign in" }
                    }
                }
            }
        }
    }
}
