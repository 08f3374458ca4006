//! The demo page and the client library, served at `/` from files compiled into the binary
//! (`web/` in the repository), so a deployed API needs nothing next to it.
//! Also `GET /v1/config`: which ws nodes the page may connect to, and `/admin`, the
//! operators' page (its figures come from `GET /v1/stats`).

use axum::{Json, Router, http::header, routing::get};
use serde_json::json;

use crate::config::WsNode;

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

/// The page's routes. `GET /v1/config` answers `{"nodes":[{"name","url"}],"jaeger_ui":"..."}`
/// from `FANOUT_WS_URLS` and `FANOUT_JAEGER_UI` (`ws_nodes`, `jaeger_ui`). A URL may contain
/// `{host}`, which the page replaces with the host it was loaded from.
pub fn router<S: Clone + Send + Sync + 'static>(ws_nodes: &[WsNode], jaeger_ui: &str) -> Router<S> {
    let config = Json(json!({ "nodes": ws_nodes, "jaeger_ui": jaeger_ui }));
    let mut router = Router::new()
        .route("/v1/config", get(move || async move { config }))
        .route(
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
