//! Regions: two NATS clusters joined by gateways through a delay proxy (the WAN), each with
//! its own stream and a mirror of the other's, and fanout processes in each.

use crate::common;

use std::time::Duration;

use common::{
    Client, ProcessExt, eventually, geo::Supercluster, geo::Tier, is_push, publish_json, within,
};
use serde_json::{Value, json};

/// One-way delay of the gateway links.
const DELAY: Duration = Duration::from_millis(40);

async fn two_regions() -> (Supercluster, Tier, Tier) {
    let cluster = Supercluster::start(&["eu", "us"], DELAY).await;
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

/// Where a client is in every region, as fanout.js keeps it: the last seq per region.
fn advance(positions: &mut serde_json::Map<String, Value>, event: &Value) {
    let region = event["region"].as_str().unwrap().to_string();
    let seq = event["seq"].as_u64().unwrap();
    let last = positions.get(&region).and_then(Value::as_u64).unwrap_or(0);
    assert!(
        seq > last,
        "{region} {seq} after {last}: out of order or twice"
    );
    positions.insert(region, json!(seq));
}

/// The events published in each region, as (region, seq).
async fn publish_both(eu: &Tier, us: &Tier, each: usize, tag: &str) -> Vec<(String, u64)> {
    let mut stored = Vec::new();
    for i in 0..each {
        for (name, tier) in [("eu", eu), ("us", us)] {
            let answer = post(tier, "room", json!({"tag": tag, "i": i, "from": name})).await;
            stored.push((name.to_string(), answer["seq"].as_u64().unwrap()));
        }
    }
    stored
}

fn sorted(mut events: Vec<(String, u64)>) -> Vec<(String, u64)> {
    events.sort();
    events
}

fn key(event: &Value) -> (String, u64) {
    (
        event["region"].as_str().unwrap().to_string(),
        event["seq"].as_u64().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_moves_to_another_region_with_its_positions() {
    let (_cluster, eu, us) = two_regions().await;
    // In `us`, the client gets events from both regions.
    let mut client = Client::connect_url(&us.ws[0].server().ws_url()).await;
    let epoch = client.welcome["epoch"].as_str().unwrap().to_string();
    client.subscribe("room").await;
    let before = publish_both(&eu, &us, 2, "before").await;
    let mut positions = serde_json::Map::new();
    let mut got = Vec::new();
    while got.len() < before.len() {
        let event = within("the events before", next_event(&mut client)).await;
        advance(&mut positions, &event);
        got.push(key(&event));
    }
    assert_eq!(sorted(got), sorted(before));
    drop(client);

    // Offline, both regions publish; the client comes back in `eu`.
    let missed = publish_both(&eu, &us, 3, "missed").await;
    let mut client = Client::connect_url(&eu.ws[0].server().ws_url()).await;
    assert_eq!(
        client.welcome["epoch"],
        epoch.as_str(),
        "one epoch for the tier"
    );
    let reply = client
        .request(json!({"op": "subscribe", "channel": "room", "id": 1,
                        "since": positions, "epoch": epoch}))
        .await;
    assert_eq!(reply["op"], "subscribed", "{reply}");
    assert_eq!(reply["recovered"], true, "{reply}");
    // What `eu` has of `us`'s events is replayed; what its mirror has not received yet
    // follows live.
    let mut got = Vec::new();
    while got.len() < missed.len() {
        let event = within("the missed events", next_event(&mut client)).await;
        advance(&mut positions, &event);
        got.push(key(&event));
    }
    assert_eq!(
        sorted(got),
        sorted(missed),
        "exactly what it missed, from both regions"
    );

    // And live again, nothing twice.
    let after = publish_both(&eu, &us, 1, "after").await;
    let mut got = Vec::new();
    while got.len() < after.len() {
        let event = within("the live events", next_event(&mut client)).await;
        advance(&mut positions, &event);
        got.push(key(&event));
    }
    assert_eq!(sorted(got), sorted(after));

    // A `since` that does not fit the tier says why.
    let reply = client
        .request(json!({"op": "subscribe", "channel": "other", "id": 2, "since": 3}))
        .await;
    assert_eq!(reply["code"], "invalid_request", "{reply}");
    let reply = client
        .request(json!({"op": "subscribe", "channel": "other", "id": 3, "since": {"ap": 3}}))
        .await;
    assert_eq!(reply["code"], "invalid_request", "{reply}");
    assert!(reply["message"].as_str().unwrap().contains("ap"), "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sse_stream_resumes_in_another_region_from_its_cursor() {
    let (_cluster, eu, us) = two_regions().await;
    let mut stream = common::SseClient::connect(&us.ws[0].server(), "channel=room", None)
        .await
        .unwrap();
    assert_eq!(stream.welcome["region"], "us");
    let before = publish_both(&eu, &us, 2, "before").await;
    let mut got = Vec::new();
    while got.len() < before.len() {
        let event = stream.until("event").await;
        got.push(key(&event.data));
    }
    assert_eq!(sorted(got), sorted(before));
    let cursor = stream.last_id.clone().expect("events carry the cursor");
    drop(stream);

    let missed = publish_both(&eu, &us, 2, "missed").await;
    let mut stream = common::SseClient::connect(&eu.ws[0].server(), "", Some(&cursor))
        .await
        .unwrap();
    let resumed = stream.until("resumed").await;
    assert_eq!(resumed.data["recovered"], true, "{:?}", resumed);
    let mut got = Vec::new();
    while got.len() < missed.len() {
        let event = stream.until("event").await;
        got.push(key(&event.data));
    }
    assert_eq!(sorted(got), sorted(missed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_covers_every_region() {
    let (_cluster, eu, us) = two_regions().await;
    let mut bob = Client::connect_url(&eu.ws[0].server().ws_url()).await;
    let reply = bob
        .request(json!({"op": "subscribe", "channel": "office", "presence": true, "id": 1}))
        .await;
    assert_eq!(reply["op"], "subscribed", "{reply}");
    let mut alice = Client::connect_url(&us.ws[0].server().ws_url()).await;
    let reply = alice
        .request(json!({"op": "subscribe", "channel": "office", "presence": true, "id": 1}))
        .await;
    assert_eq!(reply["op"], "subscribed", "{reply}");

    // Bob, in eu, sees Alice join in us.
    let alice_conn = alice.welcome["conn"].as_str().unwrap().to_string();
    let join = within("alice's join", async {
        loop {
            let frame = bob.recv().await;
            if frame["op"] == "join" && frame["conn"] == alice_conn.as_str() {
                return frame;
            }
        }
    })
    .await;
    assert_eq!(join["region"], "us", "{join}");

    // A presence query in either region lists both, each with its region.
    for client in [&mut bob, &mut alice] {
        let answer = client
            .request(json!({"op": "presence", "channel": "office", "id": 9}))
            .await;
        assert_eq!(answer["partial"], false, "{answer}");
        let mut regions: Vec<&str> = answer["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["region"].as_str().unwrap())
            .collect();
        regions.sort();
        assert_eq!(regions, ["eu", "us"], "{answer}");
    }
}

/// What a client that follows "room" across regions got.
#[derive(Debug, Default)]
struct Followed {
    /// (region, seq) in arrival order.
    events: Vec<(String, u64)>,
    subscribed: bool,
    reconnects: usize,
    not_recovered: usize,
}

type Shared = std::sync::Arc<std::sync::Mutex<Followed>>;

/// A client of "room" that connects to the first of `urls` that answers, and when its
/// connection ends, to the next, resuming with its positions in every region (as fanout.js
/// does). Stops when `stop` is cancelled.
fn follower(
    urls: Vec<String>,
    stop: tokio_util::sync::CancellationToken,
) -> (Shared, tokio::task::JoinHandle<()>) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let shared = Shared::default();
    let followed = shared.clone();
    let task = tokio::spawn(async move {
        let mut positions = serde_json::Map::new();
        let mut epoch: Option<String> = None;
        let mut next = 0;
        'connect: while !stop.is_cancelled() {
            let url = &urls[next % urls.len()];
            let Ok((mut socket, _)) = tokio_tungstenite::connect_async(url.as_str()).await else {
                next += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let mut subscribe = json!({"op": "subscribe", "channel": "room", "id": 1});
            if !positions.is_empty() {
                subscribe["since"] = Value::Object(positions.clone());
                subscribe["epoch"] = json!(epoch);
            }
            if socket
                .send(Message::Text(subscribe.to_string().into()))
                .await
                .is_err()
            {
                next += 1;
                continue;
            }
            loop {
                let message = tokio::select! {
                    message = socket.next() => message,
                    _ = stop.cancelled() => break 'connect,
                };
                let Some(Ok(Message::Text(text))) = message else {
                    if matches!(message, Some(Ok(_))) {
                        continue; // ping, pong
                    }
                    // The node is gone: the next one.
                    followed.lock().unwrap().reconnects += 1;
                    next += 1;
                    continue 'connect;
                };
                let frame: Value = serde_json::from_str(&text).unwrap();
                let mut followed = followed.lock().unwrap();
                match frame["op"].as_str() {
                    Some("welcome") => epoch = frame["epoch"].as_str().map(String::from),
                    Some("subscribed") => {
                        followed.subscribed = true;
                        if frame["recovered"] == false {
                            followed.not_recovered += 1
                        }
                    }
                    Some("event") => {
                        let (region, seq) = key(&frame);
                        let last = positions.get(&region).and_then(Value::as_u64).unwrap_or(0);
                        if seq > last {
                            positions.insert(region.clone(), json!(seq));
                        }
                        followed.events.push((region, seq));
                    }
                    _ => {}
                }
            }
        }
    });
    (shared, task)
}

/// Publishes on "room" through `api` at `rate` per second until `stop` (each publish on its
/// own, so that a slow acknowledgement does not slow the rate); returns the acknowledged
/// sequences. A publish that fails (its region is down) is given up: only acknowledged
/// events are promised.
fn publisher(
    api: String,
    rate: u32,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<Vec<u64>> {
    tokio::spawn(async move {
        let http = reqwest::Client::new();
        let url = format!("http://{api}/v1/channels/room/events");
        let start = tokio::time::Instant::now();
        let mut sends = tokio::task::JoinSet::new();
        for i in 0u32.. {
            tokio::select! {
                _ = tokio::time::sleep_until(start + Duration::from_secs(1) * i / rate) => {}
                _ = stop.cancelled() => break,
            }
            let (http, url) = (http.clone(), url.clone());
            sends.spawn(async move {
                let sent = http
                    .post(&url)
                    .timeout(Duration::from_secs(2))
                    .body(format!("{{\"i\":{i}}}"))
                    .send()
                    .await
                    .ok()?;
                if sent.status() != 202 {
                    return None;
                }
                sent.json::<Value>().await.ok()?["seq"].as_u64()
            });
        }
        let mut acked = Vec::new();
        while let Some(done) = sends.join_next().await {
            acked.extend(done.unwrap());
        }
        acked.sort();
        acked
    })
}

/// (missing, duplicates, out of order) of `followed` against the `acked` (region, seq).
fn tally(followed: &Followed, acked: &[(String, u64)]) -> (usize, usize, usize) {
    let got: std::collections::HashSet<&(String, u64)> = followed.events.iter().collect();
    let missing = acked.iter().filter(|e| !got.contains(e)).count();
    let duplicates = followed.events.len() - got.len();
    let mut last: std::collections::HashMap<&str, u64> = Default::default();
    let mut out_of_order = 0;
    for (region, seq) in &followed.events {
        let previous = last.insert(region, *seq).unwrap_or(0);
        if *seq <= previous {
            out_of_order += 1;
        }
    }
    (missing, duplicates, out_of_order)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_dies_and_comes_back_with_nothing_lost() {
    let (mut cluster, eu, mut us) = two_regions().await;
    let (eu_ws, us_ws) = (eu.ws[0].server().ws_url(), us.ws[0].server().ws_url());
    let stop_clients = tokio_util::sync::CancellationToken::new();
    // One client stays in eu; one starts in us and moves to eu when us dies.
    let (steady, steady_task) = follower(vec![eu_ws.clone()], stop_clients.clone());
    let (moving, moving_task) = follower(vec![us_ws, eu_ws.clone()], stop_clients.clone());
    eventually("both clients subscribed", || async {
        steady.lock().unwrap().subscribed && moving.lock().unwrap().subscribed
    })
    .await;
    // A member in us, watched from eu.
    let mut watcher = Client::connect_url(&eu_ws).await;
    let reply = watcher
        .request(json!({"op": "subscribe", "channel": "office", "presence": true, "id": 1}))
        .await;
    assert_eq!(reply["op"], "subscribed", "{reply}");
    let mut member = Client::connect_url(&us.ws[0].server().ws_url()).await;
    let reply = member
        .request(json!({"op": "subscribe", "channel": "office", "presence": true, "id": 1}))
        .await;
    assert_eq!(reply["op"], "subscribed", "{reply}");
    let member_conn = member.welcome["conn"].as_str().unwrap().to_string();
    let presence_of = |op: &'static str| {
        let conn = member_conn.clone();
        move |frame: &Value| frame["op"] == op && frame["conn"] == conn.as_str()
    };
    let joined = presence_of("join");
    within("the us member's join in eu", async {
        while !joined(&watcher.recv().await) {}
    })
    .await;

    let stop_eu = tokio_util::sync::CancellationToken::new();
    let stop_us = tokio_util::sync::CancellationToken::new();
    let publish_eu = publisher(eu.api.addr.clone(), 200, stop_eu.clone());
    let publish_us = publisher(us.api.addr.clone(), 200, stop_us.clone());
    // Both regions publish for a while (time passing, not a state awaited).
    tokio::time::sleep(Duration::from_secs(2)).await;

    // kill -9 every process and NATS server of us; eu goes on publishing alone.
    us.kill();
    cluster.region("us").kill();
    let killed = std::time::Instant::now();
    stop_us.cancel();
    let acked_us = publish_us.await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop_eu.cancel();
    let acked_eu = publish_eu.await.unwrap();
    println!("acknowledged: eu {}, us {}", acked_eu.len(), acked_us.len());
    assert!(!acked_eu.is_empty() && !acked_us.is_empty());
    let survivor: Vec<(String, u64)> = acked_eu.iter().map(|s| ("eu".into(), *s)).collect();
    // The survivor's clients get every survivor event while us is down.
    common::eventually_within(
        Duration::from_secs(30),
        "every eu event at both clients",
        || async {
            tally(&steady.lock().unwrap(), &survivor).0 == 0
                && tally(&moving.lock().unwrap(), &survivor).0 == 0
        },
    )
    .await;

    // eu says the us member left: discovery forgets a node 6 s after its last announcement
    // (docs/protocol.md, "Regions": within 7 s).
    let left = presence_of("leave");
    within("the us member's leave in eu", async {
        while !left(&watcher.recv().await) {}
    })
    .await;
    println!(
        "the us member's leave reached eu {:?} after the kill",
        killed.elapsed()
    );
    drop(member);

    // us comes back with what it had stored; its acknowledged events reach eu, once.
    cluster.restart("us");
    cluster.wait_ready().await;
    let us = Tier::start(&cluster, "us", 1).await;
    us.wait_regions_current().await;
    eu.wait_regions_current().await;
    let mut acked = survivor.clone();
    acked.extend(acked_us.iter().map(|s| ("us".to_string(), *s)));
    common::eventually_within(
        Duration::from_secs(150),
        "every acknowledged event at both clients",
        || async {
            tally(&steady.lock().unwrap(), &acked).0 == 0
                && tally(&moving.lock().unwrap(), &acked).0 == 0
        },
    )
    .await;
    stop_clients.cancel();
    let _ = (steady_task.await, moving_task.await);
    for (name, followed) in [
        ("steady client (eu)", &steady),
        ("moving client (us, then eu)", &moving),
    ] {
        let followed = followed.lock().unwrap();
        let (missing, duplicates, out_of_order) = tally(&followed, &acked);
        println!(
            "{name}: delivered {}, missing {missing}, duplicates {duplicates}, out of order {out_of_order}, reconnects {}, not recovered {}",
            followed.events.len(),
            followed.reconnects,
            followed.not_recovered
        );
        assert_eq!(
            (missing, duplicates, out_of_order, followed.not_recovered),
            (0, 0, 0, 0),
            "{name}"
        );
    }
    assert!(
        moving.lock().unwrap().reconnects >= 1,
        "the moving client moved"
    );
    drop(us);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_and_history_span_the_regions() {
    use crate::control::{call, until_complete};
    let (_cluster, eu, us) = two_regions().await;
    let (eu_api, us_api) = (eu.api.server(), us.api.server());
    let mut ada_eu = Client::connect_url(&format!("{}?user=ada", eu.ws[0].server().ws_url())).await;
    let mut ada_us = Client::connect_url(&format!("{}?user=ada", us.ws[0].server().ws_url())).await;
    until_complete(&eu_api).await;
    until_complete(&us_api).await;

    // A server-side subscription from one region reaches the user in both.
    let (status, answer) = call(
        &eu_api,
        "POST",
        "/v1/users/ada/subscribe",
        Some(json!({"channel": "news"})),
    )
    .await;
    assert_eq!(
        (status, answer["subscribed"].as_u64()),
        (200, Some(2)),
        "{answer}"
    );
    for client in [&mut ada_eu, &mut ada_us] {
        let frame = client.recv().await;
        assert_eq!(
            (frame["op"].as_str(), frame["channel"].as_str()),
            (Some("subscribed"), Some("news"))
        );
    }
    let (_, listed) = call(&us_api, "GET", "/v1/users/ada/connections", None).await;
    let mut regions: Vec<&str> = listed["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["region"].as_str().unwrap())
        .collect();
    regions.sort();
    assert_eq!(regions, ["eu", "us"]);
    let (_, channels) = call(&eu_api, "GET", "/v1/channels?prefix=news", None).await;
    assert_eq!(
        channels["channels"],
        json!([{"channel": "news", "subscribers": 2, "regions": {"eu": 1, "us": 1}}])
    );

    // History: each region's events, with positions per region.
    let first_eu = post(&eu, "log", json!({"n": 1})).await["seq"]
        .as_u64()
        .unwrap();
    let second_eu = post(&eu, "log", json!({"n": 2})).await["seq"]
        .as_u64()
        .unwrap();
    let first_us = post(&us, "log", json!({"n": 3})).await["seq"]
        .as_u64()
        .unwrap();
    let page = within("eu's copy to hold us's event", async {
        loop {
            let page = call(&eu_api, "GET", "/v1/channels/log/history", None)
                .await
                .1;
            if page["events"].as_array().is_some_and(|e| e.len() == 3) {
                return page;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(
        page["first"],
        json!({"eu": first_eu, "us": first_us}),
        "{page}"
    );
    assert_eq!(
        page["last"],
        json!({"eu": second_eu, "us": first_us}),
        "{page}"
    );
    let (_, later) = call(
        &eu_api,
        "GET",
        &format!("/v1/channels/log/history?since=eu:{first_eu},us:{first_us}"),
        None,
    )
    .await;
    let events = later["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{later}");
    assert_eq!(
        (events[0]["region"].as_str(), events[0]["seq"].as_u64()),
        (Some("eu"), Some(second_eu))
    );
    let (status, bad) = call(&eu_api, "GET", "/v1/channels/log/history?since=7", None).await;
    assert_eq!(
        (status, bad["error"]["code"].as_str()),
        (400, Some("invalid_query"))
    );
    // Removed from one region, gone from every copy.
    let (status, _) = call(&us_api, "DELETE", "/v1/channels/log/history", None).await;
    assert_eq!(status, 200);
    for api in [&eu_api, &us_api] {
        let (_, gone) = call(api, "GET", "/v1/channels/log/history", None).await;
        assert_eq!(gone["events"], json!([]), "{gone}");
    }

    // A disconnect from one region closes the user's connections in both.
    let (_, answer) = call(&us_api, "POST", "/v1/users/ada/disconnect", None).await;
    assert_eq!(answer["disconnected"], 2, "{answer}");
    for client in [&mut ada_eu, &mut ada_us] {
        assert_eq!(
            client.closed().await.said(),
            common::Closed::Code(4005, "disconnected by the server".into())
        );
    }
    // A block made in one region refuses the user in the other.
    let (status, _) = call(&eu_api, "POST", "/v1/users/ada/block", None).await;
    assert_eq!(status, 200);
    let url = format!("{}?user=ada", us.ws[0].server().ws_url());
    match tokio_tungstenite::connect_async(url.as_str()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 403)
        }
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
}

/// A publish through `api`: its status, `Retry-After` and body.
async fn publish_answer(api: &common::Server, channel: &str) -> (u16, Option<String>, Value) {
    let response = reqwest::Client::new()
        .post(api.url(&format!("/v1/channels/{channel}/events")))
        .header("content-type", "application/json")
        .body(r#"{"n":1}"#)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let retry = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    (status, retry, response.json().await.unwrap())
}

/// The status of a WebSocket upgrade at `url` (101 when it connects).
async fn upgrade_status(url: &str) -> u16 {
    match tokio_tungstenite::connect_async(url).await {
        Ok(_) => 101,
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("expected an HTTP answer, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evacuated_region_sends_its_clients_away_and_refuses_publishes_until_it_ends() {
    use crate::control::{call, until_complete};
    let (_cluster, eu, us) = two_regions().await;
    let (eu_api, us_api) = (eu.api.server(), us.api.server());
    let (eu_ws, us_ws) = (eu.ws[0].server(), us.ws[0].server());
    until_complete(&us_api).await;
    let mut client = Client::connect_url(&eu_ws.ws_url()).await;
    let epoch = client.welcome["epoch"].as_str().unwrap().to_string();
    client.subscribe("room").await;
    // A position in each region.
    let before = publish_both(&eu, &us, 1, "before").await;
    let mut positions = serde_json::Map::new();
    for _ in &before {
        advance(
            &mut positions,
            &within("the events", next_event(&mut client)).await,
        );
    }

    // Unknown regions are not evacuated.
    let (status, answer) = call(&us_api, "POST", "/v1/regions/ap/evacuate", None).await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (404, Some("unknown_region"))
    );
    let (status, answer) = call(&us_api, "POST", "/v1/regions/eu/evacuate", None).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        (answer["region"].as_str(), answer["evacuated"].as_bool()),
        (Some("eu"), Some(true))
    );

    // The client is sent to the other region, told when.
    let (closed, said) = client.closed().await.directed();
    assert_eq!(
        closed,
        common::Closed::Code(1001, "region evacuated: reconnect to another region".into())
    );
    assert_eq!(said["regions"], json!(["us"]), "{said}");
    // The region's nodes take no one new, and its API no publishes, saying where to go.
    eventually("eu's node to refuse new clients", || async {
        upgrade_status(&eu_ws.ws_url()).await == 503
    })
    .await;
    eventually("eu's API to refuse publishes", || async {
        publish_answer(&eu_api, "room").await.0 == 503
    })
    .await;
    let (_, retry, body) = publish_answer(&eu_api, "room").await;
    assert_eq!(body["error"]["code"], "region_evacuated", "{body}");
    assert_eq!(body["error"]["regions"], json!(["us"]), "{body}");
    assert_eq!(retry.as_deref(), Some("30"));

    // In `us` the client resumes from where it was: nothing missed.
    let during = post(&us, "room", json!("during")).await;
    let mut client = Client::connect_url(&us_ws.ws_url()).await;
    let reply = client
        .request(json!({"op": "subscribe", "channel": "room", "id": 1,
                        "since": positions, "epoch": epoch}))
        .await;
    assert_eq!(reply["recovered"], true, "{reply}");
    // (eu's publishes stored before its API heard of the evacuation come too, in any order.)
    loop {
        let event = within("the event published meanwhile", next_event(&mut client)).await;
        advance(&mut positions, &event);
        if event["region"] == "us" {
            assert_eq!(event["seq"], during["seq"], "{event}");
            break;
        }
    }

    // Ended (from the region itself): clients and publishes are taken again.
    let (status, answer) = call(&eu_api, "DELETE", "/v1/regions/eu/evacuate", None).await;
    assert_eq!(
        (status, answer["evacuated"].as_bool()),
        (200, Some(false)),
        "{answer}"
    );
    assert_eq!(publish_answer(&eu_api, "room").await.0, 202);
    eventually("eu's node to take clients again", || async {
        upgrade_status(&eu_ws.ws_url()).await == 101
    })
    .await;
}
