//! The HTTP transports: server-sent events (`GET /sse`, with `POST /session/{conn}` for its
//! requests) and long-polling (`GET /poll`): the same events as WebSocket, resume anywhere
//! with the cursor, and every bad input answered.

use crate::common;

use common::*;
use serde_json::{Value, json};

/// The cursor a poll answered with.
fn cursor_of(answer: &Value) -> String {
    answer["cursor"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_ping_reaches_every_transport() {
    let tier = Tier::start(2).await;
    let mut ws = tier.client(0).await;
    let mut sse = SseClient::connect(&tier.nodes[1], "user=ada", None)
        .await
        .unwrap();
    assert!(sse.head.starts_with("HTTP/1.0 200"), "{}", sse.head);
    assert!(
        sse.head.contains("content-type: text/event-stream"),
        "{}",
        sse.head
    );
    assert!(sse.head.contains("cache-control: no-cache"), "{}", sse.head);
    assert_eq!(sse.welcome["op"], "welcome");
    assert_eq!(sse.welcome["user"], "ada");
    assert_eq!(sse.welcome["node"], "ws-2");
    assert_eq!(sse.welcome["session"].as_str().unwrap().len(), 32);
    // A poll without a cursor starts from now.
    let (status, first) = poll(&tier.nodes[0], "channel=broadcast&timeout=0").await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["events"], json!([]));
    let cursor = cursor_of(&first);

    let (status, _) = post_raw(&tier.api, "/ping", "").await;
    assert_eq!(status, 200);
    let from_ws = ws.event().await;
    let from_sse = sse.recv().await;
    assert_eq!(from_sse.event, "event");
    assert_eq!(
        from_sse.data, from_ws,
        "SSE's data is exactly the WebSocket event frame"
    );
    assert!(from_sse.id.is_some(), "every event carries the cursor");
    let (status, polled) = poll(
        &tier.nodes[1],
        &format!("channel=broadcast&cursor={cursor}"),
    )
    .await;
    assert_eq!(status, 200, "{polled}");
    assert_eq!(polled["events"], json!([from_ws]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sse_stream_resumes_on_another_node_with_its_last_event_id() {
    let tier = Tier::start(2).await;
    let mut stream = SseClient::connect(&tier.nodes[0], "channel=maths&channel=art", None)
        .await
        .unwrap();
    let first = publish(&tier.api, "maths", &json!(1)).await;
    assert_eq!(stream.event().await["seq"], first);
    let id = stream.last_id.clone().unwrap();
    drop(stream);
    // Missed while away, on both channels.
    let mut missed = Vec::new();
    for (channel, data) in [("maths", 2), ("art", 3), ("maths", 4)] {
        missed.push((channel, publish(&tier.api, channel, &json!(data)).await));
    }
    // Back on the other node, with only the cursor: its channels come back with it.
    let mut back = SseClient::connect(&tier.nodes[1], "", Some(&id))
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut resumed = Vec::new();
    while got.len() < missed.len() {
        let event = back.recv().await;
        match event.event.as_str() {
            "resumed" => resumed.push(event.data),
            "event" => got.push((
                event.data["channel"].as_str().unwrap().to_string(),
                event.data["seq"].as_u64().unwrap(),
            )),
            other => panic!("unexpected {other}: {event:?}"),
        }
    }
    got.sort_by_key(|(_, seq)| *seq);
    let missed: Vec<(String, u64)> = missed
        .into_iter()
        .map(|(c, s)| (c.to_string(), s))
        .collect();
    assert_eq!(got, missed, "exactly what was missed, each once");
    resumed.sort_by_key(|r| r["channel"].as_str().unwrap().to_string());
    assert!(
        resumed.iter().all(|r| r["recovered"] == true),
        "{resumed:?}"
    );
    let replayed: Vec<_> = resumed
        .iter()
        .map(|r| (r["channel"].clone(), r["replayed"].clone()))
        .collect();
    assert!(
        replayed.contains(&(json!("maths"), json!(2))),
        "{resumed:?}"
    );
    assert!(replayed.contains(&(json!("art"), json!(1))), "{resumed:?}");
    // Then live.
    let live = publish(&tier.api, "art", &json!("live")).await;
    assert_eq!(back.until("event").await.data["seq"], live);
    // The same cursor as a query parameter works as well.
    let id = back.last_id.clone().unwrap();
    let again = SseClient::connect(&tier.nodes[0], &format!("last_event_id={id}"), None).await;
    assert!(again.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_refusals_are_json_errors() {
    let nats = NatsServer::start();
    let secret = "test-secret-test-secret-test-secret";
    let ws = start_ws(&nats, "ws-1", |c| {
        c.auth = fanout_ws::config::AuthMode::Jwt;
        c.jwt_secret = secret.into();
        c.max_subscriptions = 2;
        c.allowed_origins = "https://good.example".into();
    })
    .await;
    let token = |claims: Value| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    };
    let exp = fanout::time::now_ms() / 1000 + 600;
    let good = token(json!({"sub": "ada", "exp": exp, "channels": ["room:*"]}));
    let refused = |query: String| {
        let ws = &ws;
        async move {
            match SseClient::connect(ws, &query, None).await {
                Err(refused) => (refused.status, refused.body["error"]["code"].clone()),
                Ok(_) => panic!("{query} was accepted"),
            }
        }
    };
    assert_eq!(refused(String::new()).await, (401, json!("missing_token")));
    assert_eq!(
        refused("token=nope".into()).await,
        (401, json!("invalid_token"))
    );
    assert_eq!(
        refused(format!("token={good}&channel=secret")).await,
        (403, json!("forbidden"))
    );
    assert_eq!(
        refused(format!("token={good}&channel=room%3Aa%20b")).await,
        (400, json!("invalid_channel"))
    );
    assert_eq!(
        refused(format!(
            "token={good}&channel=room:a&channel=room:b&channel=room:c"
        ))
        .await,
        (400, json!("too_many_subscriptions"))
    );
    assert_eq!(
        refused(format!("token={good}&last_event_id=garbage!")).await,
        (400, json!("invalid_cursor"))
    );
    let origin = SseClient::connect_with(
        &ws,
        &format!("token={good}"),
        None,
        &[("Origin", "https://evil.example")],
    )
    .await;
    assert_eq!(origin.err().map(|r| r.status), Some(403));
    // What is allowed opens.
    let stream = SseClient::connect(
        &ws,
        &format!("token={good}&channel=room:a&channel=room:b"),
        None,
    )
    .await;
    assert_eq!(stream.unwrap().welcome["user"], "ada");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_requests_act_on_their_stream() {
    let tier = Tier::start(1).await;
    let node = &tier.nodes[0];
    let mut stream = SseClient::connect(node, "user=ada&channel=maths", None)
        .await
        .unwrap();
    let conn = stream.conn();

    // Refusals.
    let ping = r#"{"op":"ping","id":1}"#;
    assert_eq!(session_request(node, &conn, None, ping).await.0, 401);
    let (status, body) = session_request(node, &conn, Some("wrong"), ping).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("invalid_session"))
    );
    let (status, body) = session_request(
        node,
        "0c5ff0f6-0000-0000-0000-000000000000",
        Some("x"),
        ping,
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("unknown_session"))
    );
    let (status, _) = session_request(node, "not-a-conn", Some("x"), ping).await;
    assert_eq!(status, 404);
    let big = format!(r#"{{"op":"ping","pad":"{}"}}"#, "x".repeat(70_000));
    let (status, body) = session_request(node, &conn, Some(&stream.secret()), &big).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (413, Some("payload_too_large"))
    );

    // Requests: their replies answer the POST; a bad one gets its error frame.
    assert_eq!(
        stream.request(node, json!({"op": "ping", "id": 1})).await,
        (200, json!({"op": "pong", "id": 1}))
    );
    let (status, reply) = stream
        .request(node, json!({"op": "subscribe", "channel": "a b"}))
        .await;
    assert_eq!(
        (status, reply["code"].as_str()),
        (200, Some("invalid_channel"))
    );
    let (status, reply) = session_request(node, &conn, Some(&stream.secret()), "{nope").await;
    assert_eq!(
        (status, reply["code"].as_str()),
        (200, Some("invalid_json"))
    );

    // Subscribing changes what the stream carries; so does unsubscribing.
    let (_, reply) = stream
        .request(
            node,
            json!({"op": "subscribe", "channel": "art", "id": "s"}),
        )
        .await;
    assert_eq!(
        reply,
        json!({"op": "subscribed", "channel": "art", "id": "s"})
    );
    let art = publish(&tier.api, "art", &json!("monet")).await;
    assert_eq!(stream.event().await["seq"], art);
    let (_, reply) = stream
        .request(node, json!({"op": "unsubscribe", "channel": "maths"}))
        .await;
    assert_eq!(reply["op"], "unsubscribed");
    publish(&tier.api, "maths", &json!("not for us")).await;
    let marker = publish(&tier.api, "art", &json!("marker")).await;
    assert_eq!(
        stream.event().await["seq"],
        marker,
        "nothing of maths after unsubscribed"
    );

    // Publish and presence through the session.
    let (_, published) = stream
        .request(
            node,
            json!({"op": "publish", "channel": "art", "data": {"x": 1}}),
        )
        .await;
    assert_eq!(published["op"], "published", "{published}");
    let event = stream.event().await;
    assert_eq!(
        (&event["seq"], &event["id"]),
        (&published["seq"], &published["event"])
    );
    let (_, presence) = stream
        .request(node, json!({"op": "presence", "channel": "art"}))
        .await;
    assert_eq!(presence["count"], 1, "{presence}");
    assert_eq!(presence["members"][0]["user"], "ada");

    // A closed stream's session is gone.
    drop(stream);
    let conn = &conn;
    eventually("the session to close", || async move {
        session_request(node, conn, Some("x"), ping).await.0 == 404
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polls_are_stateless_across_nodes_and_wait_for_events() {
    let tier = Tier::start(2).await;
    let (status, first) = poll(&tier.nodes[0], "channel=orders&timeout=0").await;
    assert_eq!(status, 200, "{first}");
    let mut cursor = cursor_of(&first);
    let mut acked = Vec::new();
    for i in 0..5 {
        acked.push(publish(&tier.api, "orders", &json!(i)).await);
    }
    // Alternate nodes: the cursor carries everything.
    let mut got = Vec::new();
    let mut polls = 0;
    while got.len() < acked.len() {
        let node = &tier.nodes[polls % 2];
        polls += 1;
        let (status, answer) =
            poll(node, &format!("channel=orders&cursor={cursor}&timeout=5")).await;
        assert_eq!(status, 200, "{answer}");
        got.extend(
            answer["events"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["seq"].as_u64().unwrap()),
        );
        assert!(
            answer["resumed"]
                .as_array()
                .unwrap()
                .iter()
                .all(|r| r["recovered"] == true),
            "{answer}"
        );
        cursor = cursor_of(&answer);
    }
    assert_eq!(got, acked);
    // Nothing new: a poll waits for the next event, and answers with it at once.
    let api = Server::external(tier.api.addr);
    let later = tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        publish(&api, "orders", &json!("later")).await
    });
    let (_, answer) = poll(
        &tier.nodes[1],
        &format!("channel=orders&cursor={cursor}&timeout=30"),
    )
    .await;
    let later = within("the publisher", later).await.unwrap();
    assert_eq!(answer["events"][0]["seq"], later, "{answer}");
    // Nothing at all within the timeout: an empty answer, the cursor unchanged in effect.
    let cursor = cursor_of(&answer);
    let (_, empty) = poll(
        &tier.nodes[0],
        &format!("channel=orders&cursor={cursor}&timeout=1"),
    )
    .await;
    assert_eq!(empty["events"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poll_beyond_the_history_window_is_not_recovered() {
    let nats = NatsServer::start();
    let api = start_api_with(&nats, |c| c.common.history_max_messages = 2).await;
    let ws = start_ws(&nats, "ws-1", |c| c.common.history_max_messages = 2).await;
    let (_, first) = poll(&ws, "channel=short&timeout=0").await;
    let cursor = cursor_of(&first);
    let mut seqs = Vec::new();
    for i in 0..4 {
        seqs.push(publish(&api, "short", &json!(i)).await);
    }
    let (_, answer) = poll(&ws, &format!("channel=short&cursor={cursor}")).await;
    let resumed = &answer["resumed"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["channel"] == "short")
        .unwrap()
        .clone();
    assert_eq!(
        resumed["recovered"], false,
        "two of four were dropped: {answer}"
    );
    let got: Vec<u64> = answer["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(got, seqs[2..], "what is still stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_refusals_are_json_errors() {
    let tier = Tier::start(1).await;
    let node = &tier.nodes[0];
    for (query, status, code) in [
        ("channel=a%20b", 400, "invalid_channel"),
        ("channel=x&cursor=!!", 400, "invalid_cursor"),
        ("channel=x&timeout=61", 400, "invalid_query"),
        ("channel=x&timeout=soon", 400, "invalid_query"),
        ("channel=x&user=", 401, "invalid_user"),
    ] {
        let (got, body) = poll(node, query).await;
        assert_eq!(
            (got, body["error"]["code"].as_str()),
            (status, Some(code)),
            "{query}: {body}"
        );
    }
    let many: String = (0..200).map(|i| format!("channel=c{i}&")).collect();
    let (got, body) = poll(node, &format!("{many}timeout=0")).await;
    assert_eq!(
        (got, body["error"]["code"].as_str()),
        (400, Some("too_many_subscriptions"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_node_says_so_on_its_streams() {
    let nats = NatsServer::start();
    let node = Process::start("fanout-ws", &ws_process_env(&nats.url(), "ws-1", 0));
    let server = node.server();
    wait_ready(&server).await;
    let mut stream = SseClient::connect(&server, "user=ada", None).await.unwrap();
    node.signal("-TERM");
    let mut ended = stream.ended().await.expect("a disconnect event");
    // Alone, it sends the client nowhere in particular, at once (no drain window).
    assert_eq!(ended["reconnect_after_ms"], 0, "{ended}");
    ended.as_object_mut().unwrap().remove("reconnect_after_ms");
    assert_eq!(
        ended,
        json!({"code": 1001, "reason": "server shutting down: reconnect elsewhere"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_gets_heartbeats() {
    let nats = NatsServer::start();
    let ws = start_ws(&nats, "ws-1", |c| c.heartbeat_secs = 1).await;
    let mut stream = SseClient::connect(&ws, "user=ada", None).await.unwrap();
    assert_eq!(stream.welcome["heartbeat"], 1);
    let stream = &mut stream;
    within("a heartbeat comment", async {
        while stream.comments == 0 {
            tokio::select! {
                event = stream.next() => panic!("an event, not a comment: {event:?}"),
                // `next` counts comments as it reads; poll it for a bounded slice each time.
                _ = tokio::time::sleep(std::time::Duration::from_millis(50)) => {}
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_polling_client_publishes_and_asks_presence_with_post_request() {
    let tier = Tier::start(1).await;
    let node = &tier.nodes[0];
    let (_, first) = poll(node, "channel=maths&timeout=0").await;
    let cursor = cursor_of(&first);
    let mut member = tier.client(0).await;
    member
        .request(json!({"op": "subscribe", "channel": "maths", "id": 1}))
        .await;

    let (status, reply) = post_raw(
        node,
        "/request?user=ada",
        r#"{"op":"publish","channel":"maths","data":{"x":1},"id":7}"#,
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        (reply["op"].as_str(), reply["id"].as_i64()),
        (Some("published"), Some(7))
    );
    let (_, polled) = poll(node, &format!("channel=maths&cursor={cursor}")).await;
    assert_eq!(polled["events"][0]["id"], reply["event"], "{polled}");
    assert_eq!(polled["events"][0]["data"], json!({"x": 1}));

    let (status, reply) = post_raw(
        node,
        "/request?user=ada",
        r#"{"op":"presence","channel":"maths"}"#,
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["op"], "presence", "{reply}");
    assert_eq!(
        reply["count"], 1,
        "the WebSocket member, not the poller: {reply}"
    );

    let (status, reply) = post_raw(node, "/request?user=ada", r#"{"op":"ping","id":"p"}"#).await;
    assert_eq!(
        (status, reply["op"].as_str()),
        (200, Some("pong")),
        "{reply}"
    );

    // Ops that need a live connection, bad requests, missing identity.
    for (body, code) in [
        (r#"{"op":"subscribe","channel":"maths"}"#, "unsupported_op"),
        (r#"{"op":"info","info":{}}"#, "unsupported_op"),
        (r#"{"op":"nope"}"#, "unknown_op"),
        ("not json", "invalid_json"),
    ] {
        let (status, reply) = post_raw(node, "/request?user=ada", body).await;
        assert_eq!(status, 200, "{body}: {reply}");
        assert_eq!(
            (reply["op"].as_str(), reply["code"].as_str()),
            (Some("error"), Some(code)),
            "{body}: {reply}"
        );
    }
    let (status, reply) = post_raw(node, "/request?user=", r#"{"op":"ping"}"#).await;
    assert_eq!(
        (status, reply["error"]["code"].as_str()),
        (401, Some("invalid_user")),
        "{reply}"
    );
}

/// `fanout_ws_replayed_events_total{from=...}` of a node process.
async fn replayed(server: &Server, from: &str) -> u64 {
    let series = format!("fanout_ws_replayed_events_total{{from=\"{from}\"}}");
    metric(server, &series).await.map_or(0, |n| n as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recent_positions_resume_from_memory_older_ones_from_the_stream() {
    let nats = NatsServer::start();
    let api = start_api(&nats).await;
    let mut env = ws_process_env(&nats.url(), "ws-1", 0);
    env.push(("FANOUT_RECENT_EVENTS", "4".into()));
    let node = Process::start("fanout-ws", &env);
    let node = node.server();
    wait_ready(&node).await;
    // A WebSocket member keeps the channel followed on the node between polls.
    let mut member = Client::connect(&node).await;
    member
        .request(json!({"op": "subscribe", "channel": "log", "id": 1}))
        .await;
    let (_, first) = poll(&node, "channel=log&timeout=0").await;
    let start = cursor_of(&first);
    let mut acked = Vec::new();
    for i in 0..10 {
        acked.push(publish(&api, "log", &json!(i)).await);
    }
    // The member has them all: the node delivered them, and kept the last 4.
    for seq in &acked {
        assert_eq!(member.event().await["seq"], *seq);
    }
    let seqs = |answer: &Value| -> Vec<u64> {
        answer["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["seq"].as_u64().unwrap())
            .collect()
    };
    // From before the window: the stream answers, complete.
    let before = replayed(&node, "stream").await;
    let (_, old) = poll(&node, &format!("channel=log&cursor={start}&timeout=0")).await;
    assert_eq!(seqs(&old), acked, "{old}");
    assert_eq!(replayed(&node, "stream").await, before + 10);
    // From inside it (after the 7th event): memory answers, the same events.
    let seven = cursor_after(&cursor_of(&old), "log", acked[6]);
    let memory = replayed(&node, "memory").await;
    let (_, recent) = poll(&node, &format!("channel=log&cursor={seven}&timeout=0")).await;
    assert_eq!(seqs(&recent), acked[7..], "{recent}");
    assert_eq!(replayed(&node, "memory").await, memory + 3);
}

/// `cursor` with its position on `channel` set to event `seq`.
fn cursor_after(cursor: &str, channel: &str, seq: u64) -> String {
    use fanout_ws::{cursor::Cursor, position::Position};
    const ONE_REGION: &[&str] = &[];
    let mut cursor = Cursor::decode(cursor, ONE_REGION).unwrap();
    let channel = fanout::Channel::parse(channel).unwrap();
    cursor
        .positions
        .insert(channel, [Position::Event(seq)].into());
    cursor.encode(ONE_REGION)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sse_stream_resumes_broadcast_on_its_restarted_node() {
    let nats = NatsServer::start();
    let api = start_api(&nats).await;
    let env = ws_process_env(&nats.url(), "ws-1", 0);
    let mut node = Process::start("fanout-ws", &env);
    let addr = node.addr.clone();
    wait_ready(&node.server()).await;
    let mut stream = SseClient::connect(&node.server(), "channel=lobby", None)
        .await
        .unwrap();
    let (status, _) = post_raw(&api, "/ping", "").await;
    assert_eq!(status, 200);
    let first = stream.until("event").await;
    assert_eq!(first.data["channel"], "broadcast");
    let id = stream.last_id.clone().unwrap();
    drop(stream);
    node.signal("-KILL");
    node.exit_code().await;
    let (status, _) = post_raw(&api, "/ping", "").await;
    assert_eq!(status, 200);
    // Back on the same port, a fresh process: the missed broadcast is replayed.
    let mut env = env;
    env.retain(|(k, _)| *k != "FANOUT_LISTEN");
    env.push(("FANOUT_LISTEN", addr));
    let node = Process::start("fanout-ws", &env);
    // As a browser does: as soon as the port answers, ready or not.
    let mut back = SseClient::connect(&node.server(), "", Some(&id))
        .await
        .unwrap();
    let mut resumed = Vec::new();
    let missed = loop {
        let event = back.recv().await;
        match event.event.as_str() {
            "resumed" => resumed.push(event.data),
            "event" => break event.data,
            other => panic!("unexpected {other}: {event:?}"),
        }
    };
    assert_eq!(missed["channel"], "broadcast", "{missed}");
    assert!(
        missed["seq"].as_u64() > first.data["seq"].as_u64(),
        "{missed}"
    );
    assert!(
        resumed.iter().all(|r| r["recovered"] == true),
        "{resumed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_reach_every_json_transport_as_base64() {
    let tier = Tier::start(2).await;
    let mut ws = tier.client(0).await;
    ws.subscribe("raw").await;
    let mut sse = SseClient::connect(&tier.nodes[1], "channel=raw", None)
        .await
        .unwrap();
    let (status, first) = poll(&tier.nodes[0], "channel=raw&timeout=0").await;
    assert_eq!(status, 200, "{first}");
    let cursor = cursor_of(&first);

    // Bytes that are not JSON, nor UTF-8.
    let (status, answer) =
        post_bytes(&tier.api, "/v1/channels/raw/events", &b"\xff{\x00"[..]).await;
    assert_eq!(status, 202, "{answer}");
    let from_ws = ws.event().await;
    assert_eq!(from_ws["data"], "/3sA", "{from_ws}");
    assert_eq!(from_ws["encoding"], "base64");
    assert_eq!(from_ws["seq"], answer["seq"]);
    assert_eq!(sse.event().await, from_ws, "SSE's data is the same frame");
    let (status, polled) = poll(&tier.nodes[1], &format!("channel=raw&cursor={cursor}")).await;
    assert_eq!(status, 200, "{polled}");
    assert_eq!(
        polled["events"],
        json!([from_ws]),
        "and a poll's, read back"
    );

    // Without the content type, the same body is refused as JSON.
    let (status, error) = post_raw(&tier.api, "/v1/channels/raw/events", &b"\xff{\x00"[..]).await;
    assert_eq!(status, 400, "{error}");
    assert_eq!(error["error"]["code"], "invalid_json");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poll_far_behind_gets_everything_over_several_polls() {
    let tier = Tier::start(1).await;
    let (_, first) = poll(&tier.nodes[0], "channel=backlog&timeout=0").await;
    let mut cursor = cursor_of(&first);
    // More than a connection's queue holds (FANOUT_QUEUE_CAPACITY, 512).
    let mut acked = Vec::new();
    for i in 0..700 {
        acked.push(publish(&tier.api, "backlog", &json!(i)).await);
    }
    let mut got = Vec::new();
    for _ in 0..20 {
        let (status, answer) = poll(
            &tier.nodes[0],
            &format!("channel=backlog&cursor={cursor}&timeout=0"),
        )
        .await;
        assert_eq!(status, 200, "{answer}");
        got.extend(
            answer["events"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["seq"].as_u64().unwrap()),
        );
        cursor = cursor_of(&answer);
        if got.len() >= acked.len() {
            break;
        }
    }
    assert_eq!(got, acked, "every event once, in order, over the polls");
}
