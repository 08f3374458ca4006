//! Volatile events (`POST /v1/channels/{channel}/volatile`, `{"op":"publish","volatile":true}`):
//! not stored, no `seq`, at most once, never replayed; delivered to every node and transport
//! as `{"op":"event","volatile":true,…}`.

use crate::common;

use common::http::SseClient;
use common::*;
use serde_json::{Value, json};

fn is_volatile(frame: &Value, data: &Value) -> bool {
    frame["op"] == "event"
        && frame["volatile"] == true
        && frame.get("seq").is_none()
        && frame["channel"] == "lobby"
        && &frame["data"] == data
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volatile_events_reach_every_node_and_transport_and_never_the_history() {
    let tier = Tier::start(2).await;
    let mut a = tier.client(0).await;
    a.subscribe("lobby").await;
    let mut b = tier.client(1).await;
    b.subscribe("lobby").await;
    let mut sse = SseClient::connect(&tier.nodes[1], "channel=lobby&user=sse", None)
        .await
        .unwrap_or_else(|refused| panic!("SSE refused: {:?}", refused.body));
    // An SSE stream joins its channels after `welcome`: once a stored event has reached it,
    // it is in the channel (a volatile event is never replayed to one that joins late).
    let ready = publish(&tier.api, "lobby", &json!("ready")).await;
    assert_eq!(a.event().await["seq"], ready);
    assert_eq!(b.event().await["seq"], ready);
    assert_eq!(sse.event().await["seq"], ready);

    // From the API: handed to NATS, not stored.
    let data = json!({"x": 1, "y": 2});
    let (status, answer) =
        post_raw(&tier.api, "/v1/channels/lobby/volatile", data.to_string()).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["volatile"], true, "{answer}");
    assert_eq!(answer["channel"], "lobby");
    assert!(answer.get("seq").is_none(), "{answer}");
    let id = answer["id"].as_str().unwrap();
    for frame in [a.event().await, b.event().await, sse.event().await] {
        assert!(is_volatile(&frame, &data), "{frame}");
        assert_eq!(frame["id"], id);
    }

    // From a client: the same permissions and rate as any publish; the reply has no seq.
    let data = json!({"cursor": [10, 20]});
    let reply = a
        .request(
            json!({"op": "publish", "channel": "lobby", "data": data, "volatile": true, "id": 7}),
        )
        .await;
    assert_eq!(reply["op"], "published", "{reply}");
    assert_eq!(reply["volatile"], true, "{reply}");
    assert!(reply.get("seq").is_none(), "{reply}");
    assert_eq!(reply["id"], 7);
    for frame in [a.event().await, b.event().await, sse.event().await] {
        assert!(is_volatile(&frame, &data), "{frame}");
        assert_eq!(frame["id"], reply["event"]);
    }

    // The history holds only stored events: a resume from the start replays the two stored
    // events, then live ones, and neither volatile event.
    let stored = publish(&tier.api, "lobby", &json!("stored")).await;
    assert_eq!(b.event().await["seq"], stored);
    let mut late = tier.client(0).await;
    let reply = late
        .request(json!({"op": "subscribe", "channel": "lobby", "since": 0}))
        .await;
    assert_eq!(reply["op"], "subscribed", "{reply}");
    assert_eq!(late.event().await["seq"], ready);
    assert_eq!(late.event().await["seq"], stored);
    let marker = publish(&tier.api, "lobby", &json!("marker")).await;
    assert_eq!(late.event().await["seq"], marker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volatile_publishes_are_refused_like_any_publish() {
    let tier = Tier::start(1).await;
    for (path, body, status, code) in [
        (
            "/v1/channels/lobby/volatile",
            "not json",
            400,
            "invalid_json",
        ),
        (
            "/v1/channels/no%20spaces/volatile",
            "{}",
            400,
            "invalid_channel",
        ),
        (
            "/v1/channels/_fanout.x/volatile",
            "{}",
            400,
            "reserved_channel",
        ),
    ] {
        let (got, answer) = post_raw(&tier.api, path, body.to_string()).await;
        assert_eq!(
            (got, answer["error"]["code"].as_str()),
            (status, Some(code)),
            "{path}: {answer}"
        );
    }
    let mut client = tier.client(0).await;
    let reply = client
        .request(
            json!({"op": "publish", "channel": "lobby", "data": 1, "volatile": "yes", "id": 1}),
        )
        .await;
    assert_eq!(reply["op"], "error", "{reply}");
    assert_eq!(reply["code"], "invalid_request", "{reply}");
}
