//! Losing NATS, and the real binaries: configuration from the environment, signals, exit codes.

use crate::common;

use std::{process::Command, time::Duration};

use common::*;
use serde_json::{Value, json};

/// Publishes to `channel` until `client` receives one of those events (each attempt waits
/// briefly): proves delivery works end to end again after an outage.
async fn until_delivered(api: &Server, client: &mut Client, channel: &str) -> Value {
    within("delivery to resume", async {
        for attempt in 0.. {
            let (status, _) = post_raw(
                api,
                &format!("/v1/channels/{channel}/events"),
                json!({"attempt": attempt}).to_string(),
            )
            .await;
            if status != 202 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            let wait = Duration::from_millis(500);
            if let Ok(event) = tokio::time::timeout(wait, client.event()).await {
                return event;
            }
        }
        unreachable!()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_outage_gives_503_then_delivery_resumes() {
    let mut nats = NatsServer::start();
    let api = start_api(&nats).await;
    let ws = start_ws(&nats, "ws-1", |_| {}).await;
    let mut client = Client::connect(&ws).await;
    client.subscribe("news").await;
    publish(&api, "news", &json!("before")).await;
    assert_eq!(client.event().await["data"], "before");

    nats.stop();
    let (status, body) = post_raw(&api, "/v1/channels/news/events", "\"during\"").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "bus_unavailable");
    let (status, body) = post_raw(&api, "/ping", "").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("bus_unavailable"))
    );
    for server in [&api, &ws] {
        let url = server.url("/readyz");
        eventually("/readyz to report NATS down", || async {
            reqwest::get(&url).await.unwrap().status() == 503
        })
        .await;
    }
    // The ws node keeps its clients while NATS is away.
    assert_eq!(
        client.request(json!({"op": "ping"})).await,
        json!({"op": "pong"})
    );

    nats.restart();
    wait_ready(&api).await;
    wait_ready(&ws).await;
    // The node re-subscribed on its own: the client, subscribed before the outage, gets news.
    let event = until_delivered(&api, &mut client, "news").await;
    assert_eq!(event["channel"], "news");
    // File storage: the stream and its sequence survived the restart.
    assert!(event["seq"].as_u64().unwrap() >= 2, "{event}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binaries_read_the_environment_and_stop_cleanly_on_sigterm() {
    let nats = NatsServer::start();
    let env = |node: &str| {
        vec![
            (
                "FANOUT_NATS_URL",
                format!("nats://127.0.0.1:1,{}", nats.url()),
            ),
            ("FANOUT_NODE_ID", node.to_string()),
            ("FANOUT_LISTEN", "127.0.0.1:0".to_string()),
            ("FANOUT_PREFIX", "acme".to_string()),
        ]
    };
    let mut api = Process::start("fanout-api", &env("proc-api"));
    let mut ws = Process::start("fanout-ws", &env("proc-ws"));
    let (api_server, ws_server) = (api.server(), ws.server());
    wait_ready(&api_server).await;
    wait_ready(&ws_server).await;

    // FANOUT_PREFIX and FANOUT_NODE_ID took effect.
    let subjects = node_subjects(&nats, "proc-ws").await;
    assert!(
        subjects.contains(&"acme.out.broadcast".to_string()),
        "{subjects:?}"
    );
    let mut client = Client::connect(&ws_server).await;
    assert_eq!(client.welcome["node"], "proc-ws");
    let (status, _) = post_raw(&api_server, "/ping", "").await;
    assert_eq!(status, 200);
    assert!(client.event().await["data"]["sendTime"].is_string());

    // SIGTERM: the client is told "going away", the process exits 0.
    ws.signal("-TERM");
    assert_eq!(
        client.closed().await.said(),
        Closed::Code(1001, "server shutting down: reconnect elsewhere".into())
    );
    assert_eq!(ws.exit_code().await, 0);
    api.signal("-TERM");
    assert_eq!(api.exit_code().await, 0);
}

/// Runs `name` with `env` and `args`, expecting it to refuse to start; returns its stderr.
fn refused(name: &str, env: &[(&str, &str)], args: &[&str]) -> String {
    let output = Command::new(binary(name))
        .env_clear()
        .envs(env.iter().copied())
        .args(args)
        .output()
        .unwrap();
    assert!(
        !output.status.success(),
        "{name} started with {env:?} {args:?}"
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A binary, its environment, and what its error must mention.
type BadSetting<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);

#[test]
fn invalid_settings_fail_at_start_naming_the_setting() {
    let cases: [BadSetting; 10] = [
        (
            "fanout-ws",
            &[("FANOUT_HEARTBEAT_SECS", "0")],
            "FANOUT_HEARTBEAT_SECS",
        ),
        (
            "fanout-ws",
            &[("FANOUT_QUEUE_CAPACITY", "lots")],
            "queue_capacity",
        ),
        (
            "fanout-ws",
            &[("FANOUT_LISTEN", "nowhere")],
            "FANOUT_LISTEN",
        ),
        (
            "fanout-api",
            &[("FANOUT_NATS_URL", " , ")],
            "FANOUT_NATS_URL",
        ),
        ("fanout-api", &[("FANOUT_PREFIX", "a.*")], "FANOUT_PREFIX"),
        (
            "fanout-api",
            &[("FANOUT_NODE_ID", "has space")],
            "FANOUT_NODE_ID",
        ),
        (
            "fanout-api",
            &[("FANOUT_HISTORY_STORAGE", "tape")],
            "FANOUT_HISTORY_STORAGE",
        ),
        (
            "fanout-ws",
            &[("FANOUT_WORKER_THREADS", "5000")],
            "FANOUT_WORKER_THREADS",
        ),
        (
            "fanout-api",
            &[("FANOUT_BATCH_MAX_EVENTS", "20000")],
            "FANOUT_BATCH_MAX_EVENTS",
        ),
        (
            "fanout-api",
            &[("FANOUT_BATCH_MAX_BYTES", "0")],
            "FANOUT_BATCH_MAX_BYTES",
        ),
    ];
    for (name, env, expected) in cases {
        let stderr = refused(name, env, &[]);
        assert!(stderr.contains(expected), "{name} {env:?}: {stderr}");
        // `--check` finds the same fault without starting anything.
        let stderr = refused(name, env, &["--check"]);
        assert!(
            stderr.contains("settings are not valid") && stderr.contains(expected),
            "{name} --check {env:?}: {stderr}"
        );
    }
    // What the node would only find at start: the key file.
    let stderr = refused(
        "fanout-ws",
        &[
            ("FANOUT_AUTH", "jwt"),
            ("FANOUT_JWT_PUBLIC_KEY", "/nonexistent/key.pem"),
        ],
        &["--check"],
    );
    assert!(stderr.contains("FANOUT_JWT_PUBLIC_KEY"), "{stderr}");
    let stderr = refused("fanout-api", &[], &["--config", "/nonexistent/fanout.toml"]);
    assert!(stderr.contains("/nonexistent/fanout.toml"), "{stderr}");
    let stderr = refused("fanout-api", &[], &["--bogus"]);
    assert!(
        stderr.to_lowercase().contains("usage") && stderr.contains("--bogus"),
        "{stderr}"
    );
}

/// A binary, its environment, its arguments, and a line `--check` must print.
type Checked<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a [&'a str], &'a str);

/// `--check` prints the effective settings, secrets masked, and exits 0 without listening or
/// connecting (no NATS runs here, and the port is one nothing could bind twice).
#[test]
fn check_prints_the_effective_settings_with_secrets_masked() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ws.toml");
    std::fs::write(&file, "heartbeat_secs = 7\n").unwrap();
    let cases: [Checked; 2] = [
        (
            "fanout-ws",
            &[
                ("FANOUT_AUTH", "jwt"),
                ("FANOUT_JWT_SECRET", "hunter2"),
                ("FANOUT_NATS_URL", "nats://ada:swordfish@127.0.0.1:1"),
            ],
            &["--check", "--config"],
            "FANOUT_HEARTBEAT_SECS=7",
        ),
        (
            "fanout-api",
            &[("FANOUT_API_KEYS", "hunter2,swordfish")],
            &["--check"],
            "FANOUT_API_KEYS=********",
        ),
    ];
    for (name, env, args, expected) in cases {
        let mut command = Command::new(binary(name));
        command.env_clear().envs(env.iter().copied()).args(args);
        if args.contains(&"--config") {
            command.arg(&file);
        }
        let output = command.output().unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{name}: {output:?}");
        assert!(stdout.contains("settings are valid"), "{stdout}");
        assert!(stdout.contains(expected), "{name}: {stdout}");
        assert!(stdout.contains("FANOUT_LISTEN="), "{stdout}");
        assert!(
            !stdout.contains("hunter2") && !stdout.contains("swordfish"),
            "{name} printed a secret: {stdout}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_toml_file_configures_a_binary_and_the_environment_overrides_it() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ws.toml");
    std::fs::write(
        &file,
        format!(
            "nats_url = \"{}\"\nnode_id = \"from-file\"\nlisten = \"127.0.0.1:0\"\nheartbeat_secs = 7\n",
            nats.url()
        ),
    )
    .unwrap();
    let env = [
        ("FANOUT_CONFIG", file.display().to_string()),
        ("FANOUT_NODE_ID", "from-env".to_string()),
    ];
    let ws = Process::start("fanout-ws", &env);
    let server = ws.server();
    wait_ready(&server).await;
    let client = Client::connect(&server).await;
    assert_eq!(client.welcome["node"], "from-env");
    assert_eq!(client.welcome["heartbeat"], 7);
}

/// `FANOUT_WORKER_THREADS` sizes the runtime the binaries build themselves: one thread
/// serves everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binaries_run_on_the_worker_threads_they_are_given() {
    let nats = NatsServer::start();
    let env = |node: &str| {
        [
            ("FANOUT_NATS_URL", nats.url()),
            ("FANOUT_NODE_ID", node.to_string()),
            ("FANOUT_LISTEN", "127.0.0.1:0".to_string()),
            ("FANOUT_WORKER_THREADS", "1".to_string()),
        ]
    };
    let api = Process::start("fanout-api", &env("api-1"));
    let ws = Process::start("fanout-ws", &env("ws-1"));
    let (api, ws) = (api.server(), ws.server());
    wait_ready(&api).await;
    wait_ready(&ws).await;
    let mut client = Client::connect(&ws).await;
    client.subscribe("one.thread").await;
    let batch = serde_json::json!({"events": [{"channel": "one.thread", "data": 1}]});
    let (status, body) = post_raw(&api, "/v1/batch", batch.to_string()).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(client.event().await["data"], 1);
}
