//! Presence across nodes: who is in a channel (HTTP and WebSocket), join / leave / update
//! frames from every node, and no ghosts when a node crashes or shuts down.

use crate::common;

use std::time::Instant;

use common::*;
use serde_json::{Value, json};

async fn member(server: &Server, user: &str) -> Client {
    Client::connect_url(&format!("{}?user={user}", server.ws_url())).await
}

/// Subscribes with `presence: true`.
async fn watch(client: &mut Client, channel: &str) {
    let reply = client
        .request(json!({"op": "subscribe", "channel": channel, "presence": true}))
        .await;
    assert_eq!(reply["op"], "subscribed", "{reply}");
}

/// The next presence change about `user`, skipping those about others (a watcher may or
/// may not see its own join, depending on timing).
async fn change_of(client: &mut Client, user: &str) -> Value {
    loop {
        let frame = client.recv().await;
        assert!(
            ["join", "leave", "update"].contains(&frame["op"].as_str().unwrap_or("")),
            "{frame}"
        );
        if frame["user"] == user {
            return frame;
        }
    }
}

async fn presence(api: &Server, channel: &str, query: &str) -> Value {
    let response = reqwest::get(api.url(&format!("/v1/channels/{channel}/presence{query}")))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// A complete answer (`partial: false`): asked again until every node answered in time, which
/// on a loaded machine may take more than one query (a node has 1 s to answer).
async fn complete(api: &Server, channel: &str, query: &str) -> Value {
    within("a complete presence answer", async {
        loop {
            let answer = presence(api, channel, query).await;
            if answer["partial"] == false {
                return answer;
            }
        }
    })
    .await
}

/// The same over WebSocket: `request` (a `presence` op) until the reply is complete.
async fn complete_ws(client: &mut Client, request: Value) -> Value {
    within("a complete presence reply", async {
        loop {
            let reply = client.request(request.clone()).await;
            assert_eq!(reply["op"], "presence", "{reply}");
            if reply["partial"] == false {
                return reply;
            }
        }
    })
    .await
}

fn users(answer: &Value) -> Vec<String> {
    let mut users: Vec<String> = answer["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["user"].as_str().unwrap().to_string())
        .collect();
    users.sort();
    users
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_across_three_nodes() {
    let tier = Tier::start(3).await;
    let api = &tier.api;
    let mut watcher = member(&tier.nodes[2], "wanda").await;
    watch(&mut watcher, "room:maths").await;

    let mut ada = member(&tier.nodes[0], "ada").await;
    ada.subscribe("room:maths").await;
    let mut bob = member(&tier.nodes[1], "bob").await;
    bob.subscribe("room:maths").await;
    let join = change_of(&mut watcher, "ada").await;
    assert_eq!(join["op"], "join");
    assert_eq!(join["channel"], "room:maths");
    assert_eq!(join["node"], "ws-1");
    assert_eq!(join["conn"], ada.welcome["conn"]);
    assert!(join["joined_at"].as_u64().unwrap() > 1_700_000_000_000);
    assert_eq!(change_of(&mut watcher, "bob").await["node"], "ws-2");

    // Everyone, from every node, in one answer (once the API knows all three nodes).
    eventually("a complete answer with all three members", || async move {
        let answer = presence(api, "room:maths", "").await;
        answer["partial"] == false && users(&answer) == ["ada", "bob", "wanda"]
    })
    .await;
    let answer = complete(api, "room:maths", "").await;
    assert_eq!(answer["channel"], "room:maths");
    assert_eq!(answer["count"], 3);
    let ada_entry = answer["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["user"] == "ada")
        .unwrap()
        .clone();
    assert_eq!(ada_entry["node"], "ws-1");
    assert_eq!(ada_entry["conn"], ada.welcome["conn"]);
    assert_eq!(ada_entry["info"], Value::Null);
    assert_eq!(ada_entry["joined_at"], join["joined_at"]);

    let count = complete(api, "room:maths", "?count_only=true").await;
    assert_eq!(
        count,
        json!({"channel": "room:maths", "count": 3, "partial": false})
    );
    let empty = complete(api, "room:nobody", "").await;
    assert_eq!(
        (empty["count"].clone(), empty["partial"].clone()),
        (json!(0), json!(false))
    );

    // The same over WebSocket, from any node.
    let reply = complete_ws(
        &mut bob,
        json!({"op": "presence", "channel": "room:maths", "id": 1}),
    )
    .await;
    assert_eq!(reply["id"], 1);
    assert_eq!(users(&reply), ["ada", "bob", "wanda"]);
    let reply = complete_ws(
        &mut bob,
        json!({"op": "presence", "channel": "room:maths", "count_only": true}),
    )
    .await;
    assert_eq!(
        (reply["count"].clone(), reply.get("members")),
        (json!(3), None)
    );

    // Info updates reach the watchers and the answers.
    let reply = bob
        .request(json!({"op": "info", "info": {"name": "Bob", "status": "away"}, "id": "i"}))
        .await;
    assert_eq!(
        reply,
        json!({"op": "info_updated", "info": {"name": "Bob", "status": "away"}, "id": "i"})
    );
    let update = change_of(&mut watcher, "bob").await;
    assert_eq!(update["op"], "update");
    assert_eq!(update["info"]["name"], "Bob");
    let answer = complete(api, "room:maths", "").await;
    let bob_entry = answer["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["user"] == "bob")
        .unwrap()
        .clone();
    assert_eq!(bob_entry["info"]["status"], "away");

    // Leaving, by unsubscribing or by closing.
    ada.request(json!({"op": "unsubscribe", "channel": "room:maths"}))
        .await;
    let leave = change_of(&mut watcher, "ada").await;
    assert_eq!(
        (leave["op"].clone(), leave["node"].clone()),
        (json!("leave"), json!("ws-1"))
    );
    drop(bob);
    assert_eq!(change_of(&mut watcher, "bob").await["op"], "leave");
    eventually("only the watcher to be left", || async move {
        users(&presence(api, "room:maths", "").await) == ["wanda"]
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_requests_are_checked() {
    let tier = Tier::start(1).await;
    let mut client = tier.client(0).await;
    let cases = [
        (
            json!({"op": "presence", "channel": "broadcast"}),
            "reserved_channel",
        ),
        (
            json!({"op": "presence", "channel": "a b"}),
            "invalid_channel",
        ),
        (json!({"op": "presence"}), "invalid_request"),
        (
            json!({"op": "presence", "channel": "x", "count_only": 1}),
            "invalid_request",
        ),
        (
            json!({"op": "subscribe", "channel": "broadcast", "presence": true}),
            "reserved_channel",
        ),
        (json!({"op": "info", "info": "Ada"}), "invalid_request"),
        (
            json!({"op": "info", "info": {"bio": "x".repeat(3000)}}),
            "info_too_large",
        ),
    ];
    for (request, code) in cases {
        let reply = client.request(request.clone()).await;
        assert_eq!(
            (reply["op"].as_str(), reply["code"].as_str()),
            (Some("error"), Some(code)),
            "{request}"
        );
    }
    client.subscribe("still-works").await;
    let (status, body) = get_json(&tier.api, "/v1/channels/broadcast/presence").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("reserved_channel"))
    );
    let (status, body) = get_json(&tier.api, "/v1/channels/a%20b/presence").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_channel"))
    );
    let (status, body) = get_json(&tier.api, "/v1/channels/x/presence?count_only=maybe").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_query"))
    );
}

async fn get_json(server: &Server, path: &str) -> (u16, Value) {
    let response = reqwest::get(server.url(path)).await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

/// The ghost-leave counter of an in-process node (0 when never incremented).
async fn ghost_leaves(server: &Server) -> u64 {
    metric(server, "fanout_ws_presence_ghost_leaves_total")
        .await
        .map_or(0, |n| n as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_ghosts_after_a_crash_or_a_shutdown() {
    let nats = NatsServer::start();
    let api = start_api(&nats).await;
    let survivor = start_ws(&nats, "ws-2", |_| {}).await;
    let mut watcher = member(&survivor, "wanda").await;
    watch(&mut watcher, "room").await;

    // A node shutting down says goodbye for each of its clients as they go.
    let mut leaving = Process::start("fanout-ws", &ws_process_env(&nats.url(), "ws-3", 0));
    let mut cy = member(&leaving.server(), "cy").await;
    cy.subscribe("room").await;
    assert_eq!(change_of(&mut watcher, "cy").await["op"], "join");
    leaving.signal("-TERM");
    assert_eq!(change_of(&mut watcher, "cy").await["op"], "leave");
    assert_eq!(leaving.exit_code().await, 0);
    assert_eq!(
        ghost_leaves(&survivor).await,
        0,
        "cy's leave came from ws-3 itself"
    );

    // A node that crashes cannot: its members vanish from answers at once, and the
    // survivors say they left once discovery forgets the node.
    let crashing = Process::start("fanout-ws", &ws_process_env(&nats.url(), "ws-1", 0));
    let mut members = Vec::new();
    for user in ["ada", "bob"] {
        let mut client = member(&crashing.server(), user).await;
        client.subscribe("room").await;
        assert_eq!(change_of(&mut watcher, user).await["op"], "join");
        members.push(client);
    }
    let api = &api;
    eventually("all three members to be listed", || async move {
        users(&presence(api, "room", "").await) == ["ada", "bob", "wanda"]
    })
    .await;
    crashing.signal("-KILL");
    let crashed = Instant::now();
    let answer = presence(api, "room", "").await;
    assert_eq!(
        users(&answer),
        ["wanda"],
        "ws-1 cannot answer for its members"
    );
    // Until discovery forgets ws-1 (4 to 6 s after the kill), it is expected to answer: the
    // answer says it is partial. Only once it is forgotten may an answer be complete.
    if answer["partial"] == false {
        let nodes: Value = reqwest::get(api.url("/v1/nodes"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(
            !nodes.to_string().contains("\"ws-1\""),
            "a complete answer while ws-1 is listed: {answer} {nodes}"
        );
    }
    let mut left = Vec::new();
    for _ in 0..2 {
        let frame = watcher.recv().await;
        assert_eq!(
            (frame["op"].as_str(), frame["node"].as_str()),
            (Some("leave"), Some("ws-1")),
            "{frame}"
        );
        left.push(frame["user"].as_str().unwrap().to_string());
    }
    left.sort();
    assert_eq!(left, ["ada", "bob"]);
    println!(
        "leaves for the crashed node's members came {:?} after kill -9",
        crashed.elapsed()
    );
    assert_eq!(ghost_leaves(&survivor).await, 2);
    eventually("a complete answer once ws-1 is forgotten", || async move {
        let answer = presence(api, "room", "").await;
        answer["partial"] == false && users(&answer) == ["wanda"]
    })
    .await;
    drop(members);
}
