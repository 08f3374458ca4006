//! `POST /v1/batch`: many events in one request, each stored and answered on its own, in
//! the request's order; a bad event fails alone.

use crate::common;

use common::*;
use serde_json::{Value, json};

fn code(result: &Value) -> &str {
    result["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("not an error result: {result}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_stores_every_good_event_and_answers_each_in_order() {
    let tier = Tier::start(1).await;
    let mut client = tier.client(0).await;
    client.subscribe("room.a").await;
    client.subscribe("room.b").await;

    let big = "x".repeat(64 * 1024);
    let batch = json!({"events": [
        {"channel": "room.a", "data": {"n": 1}},
        {"channel": "room.b", "data": "two", "idempotency_key": "k-1"},
        {"channel": "a b", "data": 1},
        {"channel": "room.a", "data": [3, {"deep": true}]},
        {"channel": "_fanout.canary.ws-1", "data": 1},
        {"channel": "room.a"},
        {"channel": "room.a", "data": 1, "extra": 1},
        "not an event",
        {"channel": "room.b", "data": 1, "idempotency_key": "has space"},
        {"channel": "room.a", "data": big},
        {"channel": "room.b", "data": "again", "idempotency_key": "k-1"},
        {"channel": "room.a", "data": 4},
    ]});
    let (status, body) = post_raw(&tier.api, "/v1/batch", batch.to_string()).await;
    assert_eq!(status, 202, "{body}");
    let results = body["results"].as_array().expect("results");
    assert_eq!(results.len(), 12, "{body}");
    for (i, channel) in [(0, "room.a"), (1, "room.b"), (3, "room.a"), (11, "room.a")] {
        assert_eq!(results[i]["channel"], channel, "{}", results[i]);
        assert!(results[i]["seq"].as_u64().unwrap() > 0);
        assert!(!results[i]["id"].as_str().unwrap().is_empty());
        assert!(results[i].get("error").is_none());
    }
    let seqs: Vec<u64> = [0, 3, 11]
        .iter()
        .map(|&i| results[i]["seq"].as_u64().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert_eq!(code(&results[2]), "invalid_channel");
    assert_eq!(code(&results[4]), "reserved_channel");
    assert_eq!(code(&results[5]), "invalid_event");
    assert_eq!(code(&results[6]), "invalid_event");
    assert_eq!(code(&results[7]), "invalid_event");
    assert_eq!(code(&results[8]), "invalid_idempotency_key");
    assert_eq!(code(&results[9]), "payload_too_large");
    for i in [2, 4, 5, 6, 7, 8, 9] {
        assert!(!results[i]["error"]["message"].as_str().unwrap().is_empty());
    }
    // The repeated key stored nothing new: the first event's id and seq, marked.
    assert_eq!(results[10]["duplicate"], true, "{}", results[10]);
    assert_eq!(results[10]["id"], results[1]["id"]);
    assert_eq!(results[10]["seq"], results[1]["seq"]);

    // Delivered as stored: room.a in the batch's order, room.b once, data as sent. (The
    // protocol orders events within a channel, not across channels.)
    let (mut a, mut b) = (Vec::new(), Vec::new());
    while a.len() < 3 || b.is_empty() {
        let event = client.event().await;
        match event["channel"].as_str().unwrap() {
            "room.a" => a.push(event["data"].clone()),
            "room.b" => b.push(event["data"].clone()),
            other => panic!("event on {other}"),
        }
    }
    assert_eq!(a, [json!({"n": 1}), json!([3, {"deep": true}]), json!(4)]);
    assert_eq!(b, [json!("two")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_is_not_a_batch_fails_as_a_whole() {
    let nats = NatsServer::start();
    let api = start_api_with(&nats, |config| {
        config.batch_max_events = 3;
        config.batch_max_bytes = 1024;
    })
    .await;
    for bad in [
        "",
        "{",
        "[]",
        r#"{"events":1}"#,
        r#"{"events":[],"more":1}"#,
        r#"{"nothing":[]}"#,
    ] {
        let (status, body) = post_raw(&api, "/v1/batch", bad).await;
        assert_eq!(status, 400, "{bad:?}: {body}");
        assert_eq!(code(&body), "invalid_batch", "{bad:?}: {body}");
    }
    let four =
        json!({"events": (0..4).map(|n| json!({"channel": "c", "data": n})).collect::<Vec<_>>()});
    let (status, body) = post_raw(&api, "/v1/batch", four.to_string()).await;
    assert_eq!((status, code(&body)), (413, "batch_too_large"), "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("FANOUT_BATCH_MAX_EVENTS")
    );
    let large = json!({"events": [{"channel": "c", "data": "x".repeat(2000)}]});
    let (status, body) = post_raw(&api, "/v1/batch", large.to_string()).await;
    assert_eq!((status, code(&body)), (413, "payload_too_large"), "{body}");
    // No events: nothing to do, nothing wrong.
    let (status, body) = post_raw(&api, "/v1/batch", r#"{"events":[]}"#).await;
    assert_eq!((status, body), (202, json!({"results": []})));
    let response = reqwest::get(api.url("/v1/batch")).await.unwrap();
    assert_eq!(response.status(), 405);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_without_nats_is_refused_whole() {
    let mut nats = NatsServer::start();
    let api = start_api(&nats).await;
    let batch = json!({"events": [{"channel": "c", "data": 1}]}).to_string();
    let (status, _) = post_raw(&api, "/v1/batch", batch.clone()).await;
    assert_eq!(status, 202);
    nats.stop();
    eventually("the API to see NATS gone", || {
        let batch = batch.clone();
        let api = &api;
        async move {
            let (status, body) = post_raw(api, "/v1/batch", batch).await;
            status == 503 && body["error"]["code"] == "bus_unavailable"
        }
    })
    .await;
}

/// The stream refuses every write (sealed): each event gets the stream's refusal as its
/// error, none is reported stored, and the request still answers in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_refuses_writes_fails_each_event_with_its_reason() {
    let nats = NatsServer::start();
    let api = start_api(&nats).await;
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let mut config = js
        .get_stream("FANOUT")
        .await
        .unwrap()
        .cached_info()
        .config
        .clone();
    config.sealed = true;
    js.update_stream(&config).await.unwrap();
    let batch = json!({"events": [
        {"channel": "c", "data": 1},
        {"channel": "a b", "data": 2},
        {"channel": "c", "data": 3},
    ]});
    let (status, body) = post_raw(&api, "/v1/batch", batch.to_string()).await;
    assert_eq!(status, 202, "{body}");
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    assert_eq!(code(&results[0]), "bus_unavailable", "{body}");
    assert_eq!(code(&results[1]), "invalid_channel");
    assert_eq!(code(&results[2]), "bus_unavailable");
    assert!(
        results[0]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("sealed"),
        "{body}"
    );
}

/// The stream is gone: the batch's events fail (no one answers on the stream's subjects),
/// which wakes the API's stream keeper; the stream is back for the next batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_into_a_missing_stream_fails_and_brings_the_stream_back() {
    let nats = NatsServer::start();
    let api = start_api(&nats).await;
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    js.delete_stream("FANOUT").await.unwrap();
    let batch = json!({"events": [{"channel": "c", "data": 1}, {"channel": "c", "data": 2}]});
    let (status, body) = post_raw(&api, "/v1/batch", batch.to_string()).await;
    assert_eq!(status, 202, "{body}");
    for result in body["results"].as_array().unwrap() {
        assert_eq!(code(result), "bus_unavailable", "{body}");
        assert!(
            result["error"]["message"]
                .as_str()
                .unwrap()
                .contains("does not exist"),
            "{body}"
        );
    }
    eventually("a batch to be stored again", || {
        let (api, batch) = (&api, batch.to_string());
        async move {
            let (status, body) = post_raw(api, "/v1/batch", batch).await;
            status == 202 && body["results"][1]["seq"].is_u64()
        }
    })
    .await;
}
