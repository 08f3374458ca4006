//! A real third-party WebSocket client library doing the whole protocol against a live
//! tier: Python's `websockets` (PyPI; `make test` installs it into .tools/py), driven by
//! tests/clients/websockets_client.py: welcome, subscribe with presence, an HTTP publish
//! delivered, a client publish, presence, pings (op and WebSocket), a fragmented request, an
//! error frame, unsubscribe, a normal close, and a resume with `since`; and the
//! `fanout.msgpack` subprotocol with Python's `msgpack` (tests/clients/msgpack_client.py).

mod common;

use common::*;

/// Runs `script` (tests/clients/) with .tools/py's packages against a one-node tier; asserts
/// it holds every step, and returns what it printed.
async fn python(script: &str, package: &str) -> String {
    let tier = Tier::start(1).await;
    let py_tools = workspace().join(".tools/py");
    assert!(
        py_tools.join(package).exists(),
        "{} has no {package}: `make test` installs it (make py-tools)",
        py_tools.display()
    );
    let script = workspace().join("tests/clients").join(script);
    let ws = format!("ws://{}", tier.nodes[0].addr);
    let api = format!("http://{}", tier.api.addr);
    // The script bounds each of its own steps (15 s).
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .arg(&script)
            .arg(&ws)
            .arg(&api)
            .env("PYTHONPATH", &py_tools)
            .output()
    })
    .await
    .unwrap()
    .expect("python3 runs");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("every step held"), "{stdout}");
    stdout.into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_websockets_does_the_whole_protocol() {
    python("websockets_client.py", "websockets").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_msgpack_speaks_the_binary_subprotocol() {
    python("msgpack_client.py", "msgpack").await;
}
