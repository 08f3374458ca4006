//! Presence at scale: how long a query takes when a channel has many members.
//!
//! Members are registered straight into ws nodes' hubs (in this process, each node with its
//! own NATS connection, as separate processes would have): a WebSocket per member would need
//! more file descriptors than this machine allows one process, and presence never touches the
//! sockets. The query path is the real one: one NATS request to every node, each node's
//! answer (its count, or its members in bounded parts), gathered against the discovery
//! directory.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use fanout::{Bus, Channel, discovery::Directory};
use fanout_ws::{
    auth::Verifier,
    hub::{About, Profile},
    node::Node,
    sink::{Kick, Outbox},
    transport::websocket::WebSocket,
};
use serde_json::{json, value::RawValue};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    outcome::{MedianMax, Presence},
    tier,
};

fn common(nats: &str, node: &str) -> fanout::Common {
    fanout::Common {
        nats_url: nats.into(),
        node_id: node.into(),
        history_storage: fanout::config::Storage::Memory,
        ..fanout::Common::default()
    }
}

async fn ready(bus: &Bus) {
    for _ in 0..500 {
        if bus.is_ready() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("NATS never became ready");
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub async fn run(members: usize, nodes: usize) -> Presence {
    let nats = tier::NatsServer::start();
    let url = nats.url();
    let tracker = TaskTracker::new();
    let mut ws = Vec::new();
    for i in 1..=nodes {
        let id = format!("ws-{i}");
        let config = fanout_ws::Config {
            common: common(&url, &id),
            ..fanout_ws::Config::default()
        };
        let bus = Bus::connect(&config.common).await.unwrap();
        ready(&bus).await;
        let node = Node::start(config, bus, Verifier::Anonymous, &tracker);
        node.announce(format!("ws://127.0.0.1:0/{id}"), None, &tracker);
        ws.push(node);
    }
    let channel = Channel::parse("room:big").unwrap();
    let started = Instant::now();
    for k in 0..members {
        let node = &ws[k % nodes];
        let conn = uuid::Uuid::new_v4();
        let info = RawValue::from_string(json!({"name": format!("member {k}")}).to_string()).ok();
        let profile = Profile {
            user: format!("user-{k}").into(),
            info,
        };
        let hub = node.hub();
        let outbox = Outbox::discarding(WebSocket::default(), Kick::new(CancellationToken::new()));
        let about = About {
            user: profile.user.clone(),
            ..About::default()
        };
        hub.add_conn(conn, Arc::new(outbox), profile, about);
        hub.subscribe(conn, &channel, false).unwrap();
    }
    let registered = started.elapsed();

    let asker = Bus::connect(&common(&url, "asker")).await.unwrap();
    ready(&asker).await;
    let directory = Arc::new(Directory::default());
    asker.rpc().follow_nodes(directory.clone()).await.unwrap();
    while !(directory.is_complete() && directory.live().len() == nodes) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut count_ms = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        let answer = asker
            .rpc()
            .presence(&channel, true, &directory)
            .await
            .unwrap();
        count_ms.push(ms(t.elapsed()));
        assert_eq!((answer.count, answer.partial), (members, false));
    }
    count_ms.sort_by(f64::total_cmp);
    let mut full_ms = Vec::new();
    let mut bytes = 0;
    for _ in 0..5 {
        let t = Instant::now();
        let answer = asker
            .rpc()
            .presence(&channel, false, &directory)
            .await
            .unwrap();
        let body = serde_json::to_vec(&answer).unwrap();
        full_ms.push(ms(t.elapsed()));
        bytes = body.len();
        assert_eq!(answer.members.as_ref().map(Vec::len), Some(members));
        assert!(!answer.partial);
    }
    full_ms.sort_by(f64::total_cmp);
    let median = |v: &[f64]| v[v.len() / 2];
    println!(
        "presence: {members} members on {nodes} nodes (registered in {:.1} s)",
        registered.as_secs_f64()
    );
    println!(
        "  count-only: median {:.2} ms, max {:.2} ms ({} queries)",
        median(&count_ms),
        count_ms.last().unwrap(),
        count_ms.len()
    );
    println!(
        "  full list:  median {:.0} ms, max {:.0} ms ({} queries, {:.1} MB of JSON)",
        median(&full_ms),
        full_ms.last().unwrap(),
        full_ms.len(),
        bytes as f64 / 1e6
    );
    let median_max = |v: &[f64]| MedianMax {
        median: median(v),
        max: v.last().copied().unwrap_or(f64::NAN),
    };
    Presence {
        members,
        nodes,
        count_only_ms: median_max(&count_ms),
        full_ms: median_max(&full_ms),
        full_bytes: bytes,
    }
}
