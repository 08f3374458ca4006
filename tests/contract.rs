//! The OpenAPI documents (`api/openapi.json`, `ws/openapi.json`) against the binaries, with
//! the tools of the OpenAPI ecosystem (PyPI, in `.tools/venv`; `make test` installs them):
//! `openapi-spec-validator` accepts both; each binary serves its own at `GET /openapi.json`;
//! every route the routers register is documented with every method it answers, and every
//! documented operation exists; `schemathesis` finds no 5xx, no answer that breaks the
//! document and no undocumented status against a live API and a live ws node.

mod common;

use std::{collections::BTreeSet, process::Command, time::Duration};

use common::*;
use serde_json::Value;

fn document(binary: &str) -> Value {
    let path = workspace().join(binary).join("openapi.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A tier of processes: nats-server, `fanout-api` and one `fanout-ws`, as deployed.
struct Live {
    _nats: NatsServer,
    _processes: Vec<Process>,
    api: Server,
    ws: Server,
}

async fn live() -> Live {
    let nats = NatsServer::start();
    let mut env = ws_process_env(&nats.url(), "contract-api", 0);
    // A Pusher app, so that its endpoints answer (unsigned requests: 401).
    env.push((
        "FANOUT_PUSHER_APPS",
        "42:contract-key:contract-secret".into(),
    ));
    let api = Process::start("fanout-api", &env);
    let mut env = ws_process_env(&nats.url(), "contract-ws", 0);
    env.push((
        "FANOUT_PUSHER_APPS",
        "42:contract-key:contract-secret".into(),
    ));
    let ws = Process::start("fanout-ws", &env);
    let (api_server, ws_server) = (api.server(), ws.server());
    wait_ready(&api_server).await;
    wait_ready(&ws_server).await;
    Live {
        _nats: nats,
        _processes: vec![api, ws],
        api: api_server,
        ws: ws_server,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documents_are_valid_openapi_and_each_binary_serves_its_own() {
    let dir = workspace();
    succeeds(
        Command::new(venv_tool("openapi-spec-validator"))
            .arg(dir.join("api/openapi.json"))
            .arg(dir.join("ws/openapi.json")),
    );
    let live = live().await;
    for (binary, server) in [("api", &live.api), ("ws", &live.ws)] {
        let doc = document(binary);
        assert_eq!(doc["openapi"], "3.1.0");
        assert_eq!(doc["info"]["title"], format!("fanout-{binary}"));
        let response = reqwest::get(server.url("/openapi.json")).await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "application/json");
        let served: Value = response.json().await.unwrap();
        assert_eq!(served, doc, "fanout-{binary} serves another document");
    }
}

/// The string literal at the start of `text` (after whitespace), if any.
fn literal(text: &str) -> Option<&str> {
    let text = text.trim_start().strip_prefix('"')?;
    text.split('"').next()
}

/// The paths a router's source registers: every `.route("...")`, and the page files of
/// `api/src/web.rs`'s `FILES` table.
fn registered(sources: &[&str]) -> BTreeSet<String> {
    let mut paths = BTreeSet::new();
    for source in sources {
        let text = std::fs::read_to_string(workspace().join(source)).unwrap();
        let has_files = text.contains("const FILES");
        for piece in text.split(".route(").skip(1) {
            match literal(piece) {
                Some(path) => {
                    paths.insert(path.to_string());
                }
                // The loop over `FILES`, read below.
                None if has_files && piece.trim_start().starts_with("path,") => {}
                None => panic!("{source}: a route whose path is not a literal: {piece:.60}"),
            }
        }
        if let Some(files) = text.split("const FILES").nth(1) {
            let table = files.split("];").next().unwrap();
            for entry in table.split('(').skip(1) {
                if let Some(path) = literal(entry).filter(|p| p.starts_with('/')) {
                    paths.insert(path.to_string());
                }
            }
        }
    }
    paths
}

/// A path template with sample values for its parameters.
fn concrete(template: &str) -> String {
    template
        .replace("{channel}", "orders")
        .replace("{conn}", "c0ffee")
        .replace("{user}", "ada")
        .replace("{app_id}", "42")
        .replace("{name}", "orders")
        .replace("{user_id}", "ada")
        .replace("{key}", "contract-key")
}

const METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];

/// Whether the router answers `method` on `path` (anything but its own 404 / 405). Only
/// the headers are read: `/sse` answers with a stream that does not end.
async fn answers(server: &Server, method: &str, path: &str) -> bool {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    // `timeout=0`: a long-poll answers at once. Other endpoints ignore it.
    let url = server.url(&format!("{}?timeout=0", concrete(path)));
    let response = client
        .request(method.parse().unwrap(), url)
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    if !matches!(status, 404 | 405) {
        return true;
    }
    let body: Value = response.json().await.unwrap_or_default();
    !matches!(
        body["error"]["code"].as_str(),
        Some("not_found" | "method_not_allowed")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_is_documented_and_every_documented_operation_exists() {
    let live = live().await;
    let cases = [
        (
            "api",
            &live.api,
            &[
                "api/src/routes.rs",
                "api/src/web.rs",
                "api/src/control.rs",
                "api/src/pusher.rs",
            ][..],
        ),
        ("ws", &live.ws, &["ws/src/transport/mod.rs"][..]),
    ];
    for (binary, server, sources) in cases {
        let doc = document(binary);
        let paths = doc["paths"].as_object().unwrap();
        let documented: BTreeSet<String> = paths.keys().cloned().collect();
        let routes = registered(sources);
        assert!(routes.len() >= 8, "{binary}: found only {routes:?}");
        assert_eq!(
            routes, documented,
            "fanout-{binary}: the routes its source registers are not the document's paths"
        );
        for (path, operations) in paths {
            for method in METHODS {
                let in_doc = operations.get(method.to_ascii_lowercase()).is_some();
                let served = answers(server, method, path).await;
                assert_eq!(
                    served,
                    in_doc,
                    "fanout-{binary}: {method} {path} is {} but {}",
                    if served { "served" } else { "not served" },
                    if in_doc {
                        "documented"
                    } else {
                        "not documented"
                    }
                );
            }
        }
    }
}

/// schemathesis with the checks the contract promises, a fixed seed (a failure repeats),
/// `config` for the per-operation settings.
fn schemathesis(server: &Server, config: &std::path::Path) -> String {
    let report = tempfile::tempdir().unwrap();
    let (stdout, _) = succeeds(
        Command::new(venv_tool("schemathesis"))
            .arg("--config-file")
            .arg(config)
            .arg("run")
            .arg(server.url("/openapi.json"))
            .args([
                "--checks",
                "not_a_server_error,status_code_conformance,content_type_conformance,\
                 response_headers_conformance,response_schema_conformance",
                "--max-examples",
                "40",
                "--seed",
                "1",
                "--workers",
                "1",
                "--request-timeout",
                "30",
                "--no-color",
            ])
            .current_dir(report.path()),
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_nothing_against_a_live_api_and_ws_node() {
    let live = live().await;
    // A live SSE stream, so that `POST /session/{conn}` reaches a session too.
    let stream = common::http::SseClient::connect(&live.ws, "channel=orders&user=ada", None)
        .await
        .unwrap_or_else(|refused| panic!("SSE refused: {}", refused.body));
    let config = tempfile::NamedTempFile::new().unwrap();
    let base =
        std::fs::read_to_string(workspace().join("tests/contract/schemathesis.toml")).unwrap();
    std::fs::write(
        config.path(),
        format!(
            "{base}\n[[operations]]\ninclude-path = \"/session/{{conn}}\"\n\
             parameters = {{ \"path.conn\" = \"{}\", \"header.Authorization\" = \"Bearer {}\" }}\n",
            stream.conn(),
            stream.secret()
        ),
    )
    .unwrap();
    for server in [&live.api, &live.ws] {
        let output = schemathesis(server, config.path());
        assert!(output.contains("passed"), "{output}");
        assert!(!output.contains("failure"), "{output}");
    }
    drop(stream);
}
