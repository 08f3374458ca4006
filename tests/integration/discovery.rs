//! Live node discovery: ws nodes announce themselves; `GET /v1/nodes` lists the live ones.

use crate::common;

use common::*;
use serde_json::Value;

async fn live_nodes(api: &Server) -> Vec<Value> {
    discovery(api).await["nodes"].as_array().unwrap().clone()
}

fn ids(nodes: &[Value]) -> Vec<&str> {
    nodes.iter().map(|n| n["id"].as_str().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_come_and_go() {
    let nats = NatsServer::start();
    let api = start_api(&nats).await;
    let env = |node: &str| ws_process_env(&nats.url(), node, 0);
    let mut ws1 = Process::start("fanout-ws", &env("ws-1"));
    // Behind an edge that routes by node (the compose files'), `{node}` is the node's id.
    let mut behind_edge = env("ws-2");
    behind_edge.push((
        "FANOUT_PUBLIC_URL",
        "ws://{host}:8081/node/{node}/ws".into(),
    ));
    let ws2 = Process::start("fanout-ws", &behind_edge);
    let api = &api;
    eventually("both nodes to be listed", || async move {
        ids(&live_nodes(api).await) == ["ws-1", "ws-2"]
    })
    .await;
    // Once the API has followed announcements for a full round, it says its list is whole.
    eventually("the list to be complete", || async move {
        discovery(api).await["partial"] == false
    })
    .await;
    let nodes = live_nodes(api).await;
    let port = ws1.addr.rsplit(':').next().unwrap().to_string();
    assert_eq!(nodes[0]["url"], format!("ws://{{host}}:{port}/ws"));
    assert_eq!(nodes[1]["url"], "ws://{host}:8081/node/ws-2/ws");
    assert!(nodes[0]["started_at"].as_u64().unwrap() > 1_700_000_000_000);

    let _client = Client::connect(&ws1.server()).await;
    eventually("the connection to be announced", || async move {
        live_nodes(api).await[0]["connections"] == 1
    })
    .await;

    // A crashed node stops announcing and drops out within FORGET_AFTER (6 s).
    ws2.signal("-KILL");
    let crashed = std::time::Instant::now();
    eventually("ws-2 to drop out", || async move {
        ids(&live_nodes(api).await) == ["ws-1"]
    })
    .await;
    let after = crashed.elapsed();
    println!("ws-2 dropped out {after:?} after kill -9");
    // A draining node says it is leaving: gone without waiting.
    ws1.signal("-TERM");
    eventually("ws-1 to leave", || async move {
        live_nodes(api).await.is_empty()
    })
    .await;
    assert_eq!(ws1.exit_code().await, 0);
}
