//! Regions: two NATS clusters joined by gateways through a delay proxy (the WAN), each with
//! its own stream and a mirror of the other's, and fanout processes in each.

mod common;

use std::time::Duration;

use common::{Client, eventually, geo::Supercluster, geo::Tier, is_push, publish_json, within};
use serde_json::{Value, json};

/// One-way delay of the gateway links.
const DELAY: Duration = Duration::from_millis(40);

async fn two_regions() -> (Supercluster, Tier, Tier) {
    let cluster = Supercluster::start(&["eu", "us"], DELAY);
    cluster.wait_ready().await;
    let eu = Tier::start(&cluster, "eu", 1).await;
    let us = Tier::start(&cluster, "us", 1).await;
    eu.wait_regions_current().await;
    us.wait_regions_current().await;
    (cluster, eu, us)
}

/// Publishes `data` on `channel` through `tier`'s API; returns the answer.
async fn post(tier: &Tier, channel: &str, data: Value) -> Value {
    publish_json(&tier.api.server(), channel, &data).await
}

/// The next event frame, skipping other pushes.
async fn next_event(client: &mut Client) -> Value {
    loop {
        let frame = client.recv().await;
        if frame["op"] == "event" {
            return frame;
        }
        assert!(is_push(&frame), "unexpected {frame}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_reaches_every_region_and_says_where_it_came_from() {
    let (_cluster, eu, us) = two_regions().await;
    let mut alice = Client::connect_url(&eu.ws[0].server().ws_url()).await;
    assert_eq!(alice.welcome["region"], "eu", "{}", alice.welcome);
    alice.subscribe("room").await;

    let stored = post(&us, "room", json!({"from": "us"})).await;
    assert_eq!(stored["region"], "us", "{stored}");
    let event = within("the event from us", next_event(&mut alice)).await;
    assert_eq!(event["region"], "us");
    assert_eq!(event["data"], json!({"from": "us"}));
    assert_eq!(event["seq"], stored["seq"]);

    let stored = post(&eu, "room", json!({"from": "eu"})).await;
    let event = within("the event from eu", next_event(&mut alice)).await;
    assert_eq!(event["region"], "eu");
    assert_eq!(event["seq"], stored["seq"]);

    // Both APIs list the ws nodes of both regions, with their region.
    for tier in [&eu, &us] {
        let url = tier.api.server().url("/v1/nodes");
        eventually("the nodes of both regions", || async {
            let nodes: Value = reqwest::get(&url).await.unwrap().json().await.unwrap();
            let regions: Vec<&str> = nodes["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|n| n["region"].as_str())
                .collect();
            regions.contains(&"eu") && regions.contains(&"us")
        })
        .await;
    }
}
