//! The demo page and the client library, served at `/` from files compiled into the binary
//! (`web/` in the repository), so a deployed API needs nothing next to it.
//! Also `GET /v1/config`: which ws nodes the page may connect to, and `/admin`, the
//! operators' page (its figures come from `GET /v1/stats`).

use axum::{Json, Router, extract::State, http::header, response::IntoResponse, routing::get};
use serde_json::json;

use crate::routes::AppState;

/// `(path, content type, body)` of every page file.
const FILES: [(&str, &str, &str); 7] = [
    (
        "/",
        "text/html; charset=utf-8",
        include_str!("../../web/index.html"),
    ),
    (
        "/app.js",
        "text/javascript; charset=utf-8",
        include_str!("../../web/app.js"),
    ),
    (
        "/fanout.js",
        "text/javascript; charset=utf-8",
        include_str!("../../clients/js/fanout.js"),
    ),
    (
        "/style.css",
        "text/css; charset=utf-8",
        include_str!("../../web/style.css"),
    ),
    // The operators' page: a shell that draws `GET /v1/stats` (which needs the API key when
    // keys are set; the page holds no data of its own).
    (
        "/admin",
        "text/html; charset=utf-8",
        include_str!("../../web/admin.html"),
    ),
    (
        "/admin.js",
        "text/javascript; charset=utf-8",
        include_str!("../../web/admin.js"),
    ),
    (
        "/admin.css",
        "text/css; charset=utf-8",
        include_str!("../../web/admin.css"),
    ),
];

/// This API's OpenAPI 3.1 document (`api/openapi.json`; checked against the routes and the
/// live answers in tests/contract.rs).
pub const OPENAPI: &str = include_str!("../openapi.json");

pub fn router() -> Router<AppState> {
    let mut router = Router::new().route("/v1/config", get(config)).route(
        "/openapi.json",
        get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }),
    );
    for (path, content_type, body) in FILES {
        router = router.route(
            path,
            get(move || async move {
                (
                    [
                        (header::CONTENT_TYPE, content_type),
                        (header::CACHE_CONTROL, "no-cache"),
                    ],
                    body,
                )
            }),
        );
    }
    router
}

/// `{"nodes":[{"name","url"}],"jaeger_ui":"..."}` from `FANOUT_WS_URLS` and
/// `FANOUT_JAEGER_UI`. A URL may contain `{host}`, which the page replaces with the host it
/// was loaded from.
async fn config(State(state): State<AppState>) -> impl IntoResponse {
    Json(json!({ "nodes": state.ws_nodes(), "jaeger_ui": state.jaeger_ui() }))
}
