//! Server-side control and the history API, across three nodes and every transport:
//! `POST /v1/users/{user}/disconnect` (both ranges, the app's code and reason), server-side
//! `subscribe` / `unsubscribe` (frames the client did not ask for), the connections and
//! channels lists, blocks (a node started after the block honours it) and token revocations
//! (by `jti`, by issue time; on connect, on refresh, and present connections closed), history
//! paging both ways and its removal (a resume across it is not recovered).

use crate::common;

use std::time::Duration;

use common::*;
use jsonwebtoken::{EncodingKey, Header, encode};
use serde_json::{Value, json};

const SECRET: &str = "test-secret-test-secret-test-secret";

fn now() -> u64 {
    fanout::time::now_ms() / 1000
}

/// An HTTP call to the API: (status, JSON answer).
pub(crate) async fn call(
    api: &Server,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut request = reqwest::Client::new().request(method, api.url(path));
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body.to_string());
    }
    let response = within("an API answer", request.send()).await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("answer to {path} is not JSON ({e}): {text:?}"));
    (status, value)
}

/// Polls `check` until it holds (bounded by the suite's wait).
async fn until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the API knows every node (its discovery has heard each announce): from then
/// on a command's answer is complete.
pub(crate) async fn until_complete(api: &Server) {
    until("the API to know every node", || async {
        call(api, "GET", "/v1/channels", None).await.1["partial"] == false
    })
    .await;
}

/// `user`'s connections as the API lists them.
async fn connections(api: &Server, user: &str) -> Vec<Value> {
    let (status, body) = call(api, "GET", &format!("/v1/users/{user}/connections"), None).await;
    assert_eq!(status, 200, "{body}");
    body["connections"].as_array().unwrap().clone()
}

/// Waits until the API lists `count` connections of `user`.
async fn until_listed(api: &Server, user: &str, count: usize) {
    until_complete(api).await;
    until(&format!("{count} connections of {user} listed"), || async {
        connections(api, user).await.len() == count
    })
    .await;
}

/// A WebSocket client of `user` on `node`.
async fn ws(node: &Server, user: &str) -> Client {
    Client::connect_url(&format!("{}?user={user}", node.ws_url())).await
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_reaches_every_connection_of_the_user_on_every_node_and_transport() {
    let tier = Tier::start(3).await;
    let api = &tier.api;
    let mut ada_ws = ws(&tier.nodes[0], "ada").await;
    let mut ada_sse = SseClient::connect(&tier.nodes[1], "user=ada&channel=room", None)
        .await
        .ok()
        .unwrap();
    let mut ada_other = ws(&tier.nodes[2], "ada").await;
    let mut bob = ws(&tier.nodes[0], "bob").await;
    // A long-poll waiting on node 3 is one of ada's connections while it waits.
    let poller = {
        let node = Server::external(tier.nodes[2].addr);
        tokio::spawn(async move { poll(&node, "user=ada&channel=room&timeout=60").await })
    };
    until_listed(api, "ada", 4).await;
    let listed = connections(api, "ada").await;
    let mut transports: Vec<&str> = listed
        .iter()
        .map(|c| c["transport"].as_str().unwrap())
        .collect();
    transports.sort();
    assert_eq!(transports, ["long_poll", "sse", "websocket", "websocket"]);
    let mut nodes: Vec<&str> = listed.iter().map(|c| c["node"].as_str().unwrap()).collect();
    nodes.sort();
    assert_eq!(nodes, ["ws-1", "ws-2", "ws-3", "ws-3"]);
    assert!(
        listed
            .iter()
            .all(|c| c["connected_since"].as_u64().unwrap() > 0)
    );

    // A code outside the range `reconnect` names, and a reason too long for a close frame.
    for body in [
        json!({"code": 4600, "reconnect": true}),
        json!({"code": 4100, "reconnect": false}),
        json!({"code": 1000}),
        json!({"reason": "x".repeat(124)}),
        json!({"cod": 4100}),
    ] {
        let (status, answer) = call(api, "POST", "/v1/users/ada/disconnect", Some(body)).await;
        assert_eq!(status, 400, "{answer}");
        assert_eq!(answer["error"]["code"], "invalid_request");
    }
    let (status, answer) = call(api, "POST", "/v1/users/ada/disconnect", Some(json!("nope"))).await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (400, Some("invalid_request"))
    );

    let (status, answer) = call(
        api,
        "POST",
        "/v1/users/ada/disconnect",
        Some(json!({"reconnect": false, "reason": "account deleted"})),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer, json!({"disconnected": 4, "partial": false}));
    assert_eq!(
        ada_ws.closed().await,
        Closed::Code(4500, "account deleted".into())
    );
    assert_eq!(
        ada_other.closed().await,
        Closed::Code(4500, "account deleted".into())
    );
    assert_eq!(
        ada_sse.ended().await,
        Some(json!({"code": 4500, "reason": "account deleted"}))
    );
    let (status, polled) = poller.await.unwrap();
    assert_eq!(status, 200, "{polled}");
    assert_eq!(
        polled["disconnect"],
        json!({"code": 4500, "reason": "account deleted"})
    );
    // Bob was not touched.
    assert_eq!(
        bob.request(json!({"op": "ping", "id": 1})).await["op"],
        "pong"
    );
    until_listed(api, "ada", 0).await;

    // The app's own code in the reconnect range; the default is 4005.
    let mut ada = ws(&tier.nodes[1], "ada").await;
    let (_, answer) = call(
        api,
        "POST",
        "/v1/users/ada/disconnect",
        Some(json!({"code": 4100, "reason": "moved"})),
    )
    .await;
    assert_eq!(answer["disconnected"], 1);
    assert_eq!(
        ada.closed().await.said(),
        Closed::Code(4100, "moved".into())
    );
    let mut ada = ws(&tier.nodes[2], "ada").await;
    call(api, "POST", "/v1/users/ada/disconnect", None).await;
    assert_eq!(
        ada.closed().await.said(),
        Closed::Code(4005, "disconnected by the server".into())
    );
    // Nobody to disconnect is not an error.
    let (status, answer) = call(api, "POST", "/v1/users/nobody/disconnect", None).await;
    assert_eq!((status, answer["disconnected"].as_u64()), (200, Some(0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_side_subscriptions_reach_every_present_connection() {
    let tier = Tier::start(3).await;
    let api = &tier.api;
    let mut ada_ws = ws(&tier.nodes[0], "ada").await;
    ada_ws.subscribe("mine").await;
    let mut ada_sse = SseClient::connect(&tier.nodes[1], "user=ada&channel=mine", None)
        .await
        .ok()
        .unwrap();
    let mut bob = ws(&tier.nodes[2], "bob").await;
    bob.subscribe("mine").await;
    until_listed(api, "ada", 2).await;

    for (body, code) in [
        (json!({}), "invalid_request"),
        (json!({"channel": "a b"}), "invalid_channel"),
        (json!({"channel": "_fanout.x"}), "reserved_channel"),
        (json!({"channel": "broadcast"}), "reserved_channel"),
    ] {
        let (status, answer) = call(api, "POST", "/v1/users/ada/subscribe", Some(body)).await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (400, Some(code)),
            "{answer}"
        );
    }

    let (status, answer) = call(
        api,
        "POST",
        "/v1/users/ada/subscribe",
        Some(json!({"channel": "news"})),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer, json!({"subscribed": 2, "partial": false}));
    let frame = ada_ws.recv().await;
    assert_eq!(frame["op"], "subscribed", "{frame}");
    assert_eq!(frame["channel"], "news");
    assert!(frame.get("id").is_none(), "{frame}");
    let frame = ada_sse.until("subscribed").await;
    assert_eq!(frame.data["channel"], "news");
    // Subscribing again changes nothing.
    let (_, answer) = call(
        api,
        "POST",
        "/v1/users/ada/subscribe",
        Some(json!({"channel": "news"})),
    )
    .await;
    assert_eq!(answer["subscribed"], 0);

    let seq = publish(api, "news", &json!({"headline": 1})).await;
    let event = ada_ws.event().await;
    assert_eq!(
        (event["channel"].as_str(), event["seq"].as_u64()),
        (Some("news"), Some(seq))
    );
    let event = ada_sse.until("event").await;
    assert_eq!(event.data["seq"], seq);
    let mut listed = connections(api, "ada").await;
    listed.sort_by_key(|c| c["node"].as_str().unwrap().to_string());
    assert_eq!(listed[0]["channels"], json!(["mine", "news"]));
    assert_eq!(listed[1]["channels"], json!(["mine", "news"]));

    // The channels list: by name, with their subscribers across the nodes.
    let (status, answer) = call(api, "GET", "/v1/channels", None).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["channels"],
        json!([
            {"channel": "mine", "subscribers": 3},
            {"channel": "news", "subscribers": 2},
        ])
    );
    let (_, answer) = call(api, "GET", "/v1/channels?prefix=ne&limit=1", None).await;
    assert_eq!(
        answer["channels"],
        json!([{"channel": "news", "subscribers": 2}])
    );
    assert_eq!(answer["truncated"], false);
    let (_, answer) = call(api, "GET", "/v1/channels?limit=1", None).await;
    assert_eq!(answer["truncated"], true);
    let (status, answer) = call(api, "GET", "/v1/channels?limit=0", None).await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (400, Some("invalid_query"))
    );

    let (_, answer) = call(
        api,
        "POST",
        "/v1/users/ada/unsubscribe",
        Some(json!({"channel": "news"})),
    )
    .await;
    assert_eq!(answer, json!({"unsubscribed": 2, "partial": false}));
    let frame = ada_ws.recv().await;
    assert_eq!(
        (frame["op"].as_str(), frame["channel"].as_str()),
        (Some("unsubscribed"), Some("news"))
    );
    let frame = ada_sse.until("unsubscribed").await;
    assert_eq!(frame.data["channel"], "news");
    // What comes next on either is of the channel it kept, not the one it left.
    publish(api, "news", &json!({"headline": 2})).await;
    let seq = publish(api, "mine", &json!({"mine": 1})).await;
    let event = ada_ws.event().await;
    assert_eq!(
        (event["channel"].as_str(), event["seq"].as_u64()),
        (Some("mine"), Some(seq))
    );
    let event = ada_sse.until("event").await;
    assert_eq!(event.data["channel"], "mine");
    // Bob got both "mine" events, and nothing was done to him.
    assert_eq!(bob.event().await["channel"], "mine");
}

fn hs256(claims: Value) -> String {
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

async fn jwt_tier(nats: &NatsServer, nodes: usize) -> Vec<Server> {
    let mut servers = Vec::new();
    for i in 1..=nodes {
        servers.push(
            start_ws(nats, &format!("ws-{i}"), |c| {
                c.auth = fanout_ws::config::AuthMode::Jwt;
                c.jwt_secret = SECRET.into();
            })
            .await,
        );
    }
    servers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_closes_and_refuses_the_user_everywhere_even_on_a_node_started_later() {
    let tier = Tier::start(2).await;
    let api = &tier.api;
    let mut ada = ws(&tier.nodes[0], "ada").await;
    let mut ada_sse = SseClient::connect(&tier.nodes[1], "user=ada&channel=room", None)
        .await
        .ok()
        .unwrap();
    let mut bob = ws(&tier.nodes[1], "bob").await;
    until_listed(api, "ada", 2).await;

    let (status, answer) = call(
        api,
        "POST",
        "/v1/users/ada/block",
        Some(json!({"until": 1})),
    )
    .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (400, Some("invalid_request"))
    );
    let end = now() + 3600;
    let (status, answer) = call(
        api,
        "POST",
        "/v1/users/ada/block",
        Some(json!({"until": end})),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer,
        json!({"user": "ada", "blocked": true, "until": end, "disconnected": 2, "partial": false})
    );
    assert_eq!(
        ada.closed().await,
        Closed::Code(4501, "user blocked".into())
    );
    assert_eq!(
        ada_sse.ended().await,
        Some(json!({"code": 4501, "reason": "user blocked"}))
    );
    let url = format!("{}?user=ada", tier.nodes[1].ws_url());
    let (status, body) = refused(&url).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("user_blocked"))
    );
    let refusal = SseClient::connect(&tier.nodes[0], "user=ada&channel=room", None)
        .await
        .err()
        .unwrap();
    assert_eq!(refusal.status, 403);
    assert_eq!(refusal.body["error"]["code"], "user_blocked");
    let (status, body) = poll(&tier.nodes[0], "user=ada&channel=room&timeout=0").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("user_blocked"))
    );
    assert_eq!(
        bob.request(json!({"op": "ping", "id": 1})).await["op"],
        "pong"
    );

    // A node that starts now knows the block before it is ready.
    let late = start_ws(&tier.nats, "ws-late", |_| {}).await;
    wait_ready(&late).await;
    let (status, body) = refused(&format!("{}?user=ada", late.ws_url())).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("user_blocked"))
    );

    let (status, answer) = call(api, "DELETE", "/v1/users/ada/block", None).await;
    assert_eq!(
        (status, answer),
        (200, json!({"user": "ada", "blocked": false}))
    );
    for node in [&late, &tier.nodes[0]] {
        let url = format!("{}?user=ada", node.ws_url());
        until("the block lifted", || async {
            tokio_tungstenite::connect_async(url.as_str()).await.is_ok()
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_tokens_are_refused_and_their_connections_closed() {
    let nats = NatsServer::start();
    let api = start_api(&nats).await;
    let nodes = jwt_tier(&nats, 2).await;
    let exp = now() + 3600;
    let t1 = hs256(json!({"sub": "ada", "exp": exp, "jti": "t1", "iat": now() - 100}));
    let t2 = hs256(json!({"sub": "ada", "exp": exp, "jti": "t2", "iat": now() - 10}));
    let t3 = hs256(json!({"sub": "ada", "exp": exp, "jti": "t3", "iat": now() + 5}));
    let url = |node: usize, token: &str| format!("{}?token={token}", nodes[node].ws_url());
    let mut one = Client::connect_url(&url(0, &t1)).await;
    let mut two = Client::connect_url(&url(1, &t2)).await;
    until_listed(&api, "ada", 2).await;

    for body in [
        json!({}),
        json!({"jti": ""}),
        json!({"user": "ada"}),
        json!({"jti": "a", "user": "b", "issued_before": 1}),
    ] {
        let (status, answer) = call(&api, "POST", "/v1/tokens/revoke", Some(body)).await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (400, Some("invalid_request"))
        );
    }
    let (status, answer) = call(
        &api,
        "POST",
        "/v1/tokens/revoke",
        Some(json!({"jti": "t1", "until": exp})),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer,
        json!({"revoked": true, "disconnected": 1, "partial": false})
    );
    assert_eq!(
        one.closed().await,
        Closed::Code(4502, "token revoked".into())
    );
    let (status, body) = refused(&url(1, &t1)).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("token_revoked"))
    );
    // A refresh to a revoked token is refused; the connection keeps its own.
    let reply = two
        .request(json!({"op": "refresh", "token": t1, "id": 7}))
        .await;
    assert_eq!(reply["code"], "token_revoked", "{reply}");
    assert_eq!(
        two.request(json!({"op": "ping", "id": 8})).await["op"],
        "pong"
    );

    // Every token of ada's issued before now: t2 goes, t3 (issued later) stays.
    let (_, answer) = call(
        &api,
        "POST",
        "/v1/tokens/revoke",
        Some(json!({"user": "ada", "issued_before": now()})),
    )
    .await;
    assert_eq!(answer["disconnected"], 1, "{answer}");
    assert_eq!(
        two.closed().await,
        Closed::Code(4502, "token revoked".into())
    );
    let (status, body) = refused(&url(0, &t2)).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("token_revoked"))
    );
    let mut three = Client::connect_url(&url(0, &t3)).await;
    assert_eq!(
        three.request(json!({"op": "ping", "id": 1})).await["op"],
        "pong"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_both_ways_and_its_removal_is_not_recovered() {
    let tier = Tier::start(1).await;
    let api = &tier.api;
    let (status, answer) = call(api, "GET", "/v1/channels/log/history", None).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer,
        json!({"channel": "log", "events": [], "first": null, "last": null})
    );
    let mut seqs = Vec::new();
    for i in 0..5 {
        seqs.push(publish(api, "log", &json!({"i": i})).await);
        publish(api, "other", &json!({"i": i})).await;
    }
    let page = |query: String| async move {
        let (status, answer) = call(
            api,
            "GET",
            &format!("/v1/channels/log/history{query}"),
            None,
        )
        .await;
        assert_eq!(status, 200, "{answer}");
        answer
    };
    let first = page("?limit=2".into()).await;
    let got: Vec<u64> = first["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(got, &seqs[..2]);
    assert_eq!(first["events"][0]["op"], "event");
    assert_eq!(first["events"][0]["channel"], "log");
    assert_eq!(first["events"][0]["data"], json!({"i": 0}));
    assert_eq!(
        (first["first"].as_u64(), first["last"].as_u64()),
        (Some(seqs[0]), Some(seqs[4]))
    );
    assert_eq!(first["next"], seqs[1]);
    let second = page(format!("?limit=2&since={}", seqs[1])).await;
    let got: Vec<u64> = second["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(got, &seqs[2..4]);
    let third = page(format!("?limit=2&since={}", second["next"])).await;
    let got: Vec<u64> = third["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(got, &seqs[4..]);
    assert!(third.get("next").is_none(), "{third}");
    let newest = page("?limit=2&reverse=true".into()).await;
    let got: Vec<u64> = newest["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(got, [seqs[4], seqs[3]]);
    assert_eq!(newest["next"], seqs[3]);
    let older = page(format!("?limit=5&reverse=true&since={}", seqs[3])).await;
    let got: Vec<u64> = older["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(got, [seqs[2], seqs[1], seqs[0]]);
    assert!(older.get("next").is_none(), "{older}");
    for query in [
        "?limit=0",
        "?limit=1001",
        "?since=eu:3",
        "?reverse=maybe",
        "?x=1",
    ] {
        let (status, answer) = call(
            api,
            "GET",
            &format!("/v1/channels/log/history{query}"),
            None,
        )
        .await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (400, Some("invalid_query")),
            "{query}: {answer}"
        );
    }
    let (status, answer) = call(api, "GET", "/v1/channels/_fanout.x/history", None).await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (400, Some("reserved_channel"))
    );

    // A client that has seen the first two events, live on the channel while it is removed.
    let mut watcher = tier.client(0).await;
    watcher.subscribe("log").await;
    let (status, answer) = call(api, "DELETE", "/v1/channels/log/history", None).await;
    assert_eq!(
        (status, answer),
        (200, json!({"channel": "log", "removed": true}))
    );
    let gone = page(String::new()).await;
    assert_eq!(gone["events"], json!([]));
    assert_eq!(gone["first"], Value::Null);
    // The other channel kept its history.
    let (_, other) = call(api, "GET", "/v1/channels/other/history", None).await;
    assert_eq!(other["events"].as_array().unwrap().len(), 5);
    // A resume from before the removal (from memory on this node, or from the stream) is not
    // recovered; from after it, it is.
    let mut client = tier.client(0).await;
    let reply = client
        .request(json!({"op": "subscribe", "channel": "log", "since": seqs[1], "id": 1}))
        .await;
    assert_eq!(reply["op"], "subscribed", "{reply}");
    assert_eq!(reply["recovered"], false, "{reply}");
    assert_eq!(reply["replayed"], 0, "{reply}");
    let after = publish(api, "log", &json!({"i": "after"})).await;
    assert_eq!(watcher.event().await["seq"], after);
    let mut late = tier.client(0).await;
    let reply = late
        .request(json!({"op": "subscribe", "channel": "log", "since": after, "id": 1}))
        .await;
    assert_eq!(reply["recovered"], true, "{reply}");
    let fresh = page(String::new()).await;
    assert_eq!(fresh["events"].as_array().unwrap().len(), 1);
    assert_eq!(fresh["first"], after);
}
