//! `fanout`, the all-in-one executable: the API, a ws node and its own nats-server in one
//! process. It serves the demo page and delivers events; its history survives a restart (the
//! nats-server child keeps its store in `FANOUT_DATA_DIR`); stopped (SIGTERM) or killed
//! (SIGKILL), it leaves no nats-server behind. Given `FANOUT_NATS_URL` it starts none; bad
//! settings end it with one line naming the setting.

use crate::common;

use std::{
    path::Path,
    process::{Command, Stdio},
};

use common::*;
use serde_json::json;

/// The environment of a `fanout` run: both servers on free loopback ports, the store in
/// `data`.
fn env_for(data: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("FANOUT_LISTEN", "127.0.0.1:0".into()),
        ("FANOUT_WS_LISTEN", "127.0.0.1:0".into()),
        ("FANOUT_DATA_DIR", data.display().to_string()),
        ("FANOUT_NODE_ID", "solo".into()),
        ("NATS_SERVER_BIN", nats_server_bin().display().to_string()),
        ("PATH", std::env::var("PATH").unwrap_or_default()),
    ]
}

/// A running `fanout`: the API's and the ws node's addresses, and the nats-server child's pid
/// (when it started one), read from its log.
struct AllInOne {
    process: Process,
    api: Server,
    ws: Server,
    nats_pid: Option<u32>,
}

impl AllInOne {
    async fn start(env: &[(&str, String)]) -> AllInOne {
        let process = Process::start("fanout", env);
        let mut found = (None, None);
        eventually("both servers to listen", || {
            let log = process.log();
            let addr = |server: &str| {
                log.iter()
                    .find(|line| line.contains(&format!("{server} listening")))
                    .and_then(|line| line.split("addr=").nth(1))
                    .and_then(|rest| rest.split_whitespace().next())
                    .map(|addr| addr.parse::<std::net::SocketAddr>().unwrap())
            };
            found = (addr("fanout-api"), addr("fanout-ws"));
            let done = found.0.is_some() && found.1.is_some();
            async move { done }
        })
        .await;
        let nats_pid = process
            .log()
            .iter()
            .find(|line| line.contains("nats-server started"))
            .and_then(|line| line.split("pid=").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .map(|pid| pid.parse().unwrap());
        let api = Server::external(found.0.unwrap());
        let ws = Server::external(found.1.unwrap());
        wait_ready(&api).await;
        wait_ready(&ws).await;
        AllInOne {
            process,
            api,
            ws,
            nats_pid,
        }
    }
}

/// Whether `pid` runs (a zombie waiting for its reaper does not).
fn runs(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(") ")
                .map(|(_, rest)| !rest.starts_with('Z'))
        })
        .unwrap_or(false)
}

async fn gone(pid: u32) {
    eventually(&format!("nats-server {pid} to end"), || async move {
        !runs(pid)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_alone_is_a_tier_that_keeps_its_history_and_leaves_nothing_running() {
    let data = tempfile::tempdir().unwrap();
    let env = env_for(data.path());
    let mut first = AllInOne::start(&env).await;
    let nats = first.nats_pid.expect("it started its own nats-server");
    assert!(runs(nats));
    assert!(
        data.path().join("jetstream").is_dir(),
        "the store is in FANOUT_DATA_DIR"
    );

    // The demo page, and the node it offers.
    let page = reqwest::get(first.api.url("/")).await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("app.js"));
    let nodes_url = first.api.url("/v1/nodes");
    let listed = || async {
        reqwest::get(&nodes_url)
            .await
            .unwrap()
            .json::<serde_json::Value>()
            .await
            .unwrap()
    };
    eventually("the ws node in discovery", || async {
        listed().await["partial"] == false
    })
    .await;
    let nodes = listed().await;
    assert_eq!(nodes["nodes"][0]["id"], "solo", "{nodes}");
    assert_eq!(
        nodes["nodes"][0]["url"],
        format!("ws://{{host}}:{}/ws", first.ws.addr.port())
    );

    // An event through the API reaches a client of the ws node.
    let mut client = Client::connect(&first.ws).await;
    client.subscribe("history").await;
    let seq = publish(&first.api, "history", &json!({ "kept": true })).await;
    let event = client.event().await;
    assert_eq!(
        (event["seq"].as_u64(), &event["data"]),
        (Some(seq), &json!({ "kept": true }))
    );
    drop(client);

    // SIGTERM: both servers drain, the child is stopped, the process ends well.
    first.process.signal("-TERM");
    assert_eq!(first.process.exit_code().await, 0);
    assert!(!runs(nats), "nats-server {nats} outlived fanout");

    // Started again on the same directory, it still has the event.
    let mut second = AllInOne::start(&env).await;
    let mut client = Client::connect(&second.ws).await;
    let reply = client
        .request(json!({ "op": "subscribe", "channel": "history", "since": 0, "id": 1 }))
        .await;
    assert_eq!(reply["op"], "subscribed", "{reply}");
    let event = client.event().await;
    assert_eq!(
        (event["seq"].as_u64(), &event["data"]),
        (Some(seq), &json!({ "kept": true }))
    );

    // Killed outright, it still takes its nats-server along.
    let nats = second.nats_pid.unwrap();
    second.process.signal("-KILL");
    second.process.exit_code().await;
    gone(nats).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_uses_a_given_nats_and_names_a_bad_setting() {
    // With FANOUT_NATS_URL it starts no nats-server and keeps nothing of its own.
    let nats = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let unused = data.path().join("unused");
    let mut env = env_for(&unused);
    env.push(("FANOUT_NATS_URL", nats.url()));
    let tier = AllInOne::start(&env).await;
    assert_eq!(tier.nats_pid, None);
    assert!(
        !unused.exists(),
        "no data directory without a nats-server of its own"
    );
    let mut client = Client::connect(&tier.ws).await;
    client.subscribe("given").await;
    let seq = publish(&tier.api, "given", &json!(1)).await;
    assert_eq!(client.event().await["seq"].as_u64(), Some(seq));

    // Bad settings: exit 1 and one line that names the setting, before anything starts.
    let refused = |extra: &[(&str, &str)]| {
        let mut command = Command::new(binary("fanout"));
        command
            .env_clear()
            .envs(env_for(&unused).iter().map(|(k, v)| (*k, v.clone())))
            .envs(extra.iter().copied())
            .stdout(Stdio::null());
        let output = command.output().unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (code, stderr) = refused(&[("FANOUT_WS_LISTEN", "nowhere")]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("FANOUT_WS_LISTEN"), "{stderr}");
    let (code, stderr) = refused(&[("NATS_SERVER_BIN", "/nonexistent/nats-server")]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("NATS_SERVER_BIN names /nonexistent/nats-server"),
        "{stderr}"
    );
}
