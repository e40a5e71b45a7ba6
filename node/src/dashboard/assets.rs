//! The dashboard's static files, embedded in the binary. htmx and its SSE extension are
//! vendored under `assets/` with their licences (both Zero-Clause BSD), taken from the npm
//! packages `htmx.org@2.0.11` and `htmx-ext-sse@2.2.4` (`npm pack`); the build needs no npm.

use axum::extract::Path;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

/// The htmx file the pages load, named with its version so a browser never keeps an old one.
pub const HTMX: &str = "htmx-2.0.11.min.js";
/// The SSE extension of htmx.
pub const HTMX_SSE: &str = "htmx-ext-sse-2.2.4.min.js";
pub const STYLESHEET: &str = "dashboard.css";

/// Every file served under `/assets/`: name, content type, bytes.
const FILES: &[(&str, &str, &[u8])] = &[
    (HTMX, "text/javascript; charset=utf-8", include_bytes!("assets/htmx-2.0.11.min.js")),
    (HTMX_SSE, "text/javascript; charset=utf-8", include_bytes!("assets/htmx-ext-sse-2.2.4.min.js")),
    (STYLESHEET, "text/css; charset=utf-8", include_bytes!("assets/dashboard.css")),
    ("LICENSE-htmx", "text/plain; charset=utf-8", include_bytes!("assets/LICENSE-htmx")),
    ("LICENSE-htmx-ext-sse", "text/plain; charset=utf-8", include_bytes!("assets/LICENSE-htmx-ext-sse")),
];

pub async fn serve(Path(name): Path<String>) -> Response {
    match FILES.iter().find(|(file, _, _)| *file == name) {
        Some((_, content_type, bytes)) => {
            ([(header::CONTENT_TYPE, *content_type), (header::CACHE_CONTROL, "public, max-age=3600")], *bytes)
                .into_response()
        }
        None => (StatusCode::NOT_FOUND, "no such asset\n").into_response(),
    }
}
