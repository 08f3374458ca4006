//! Traces and metrics, against the real binaries (each process has its own tracer and
//! metrics registry): an in-test OTLP/HTTP receiver decodes what they export.

use crate::common;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use axum::{Router, body::Bytes, extract::State, routing::post};
use common::*;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse},
    common::v1::{AnyValue, any_value::Value as Any},
};
use prost::Message;
use serde_json::{Value, json};

/// One received span, flattened.
#[derive(Debug, Clone)]
struct Span {
    service: String,
    instance: String,
    name: String,
    kind: i32,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    attributes: HashMap<String, String>,
}

const SERVER: i32 = 2;
const PRODUCER: i32 = 4;
const CONSUMER: i32 = 5;

fn any(value: &Option<AnyValue>) -> String {
    match value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Any::StringValue(s)) => s.clone(),
        Some(Any::IntValue(i)) => i.to_string(),
        Some(Any::DoubleValue(d)) => d.to_string(),
        Some(Any::BoolValue(b)) => b.to_string(),
        other => format!("{other:?}"),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An OTLP/HTTP (protobuf) trace receiver on 127.0.0.1.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Span>>>,
    requests: Arc<Mutex<usize>>,
}

impl Receiver {
    async fn start(addr: &str) -> (Receiver, SocketAddr) {
        let receiver = Receiver::default();
        let app = Router::new()
            .route("/v1/traces", post(Self::export))
            .with_state(receiver.clone());
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("cannot listen on {addr} for OTLP: {e}"));
        let bound = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (receiver, bound)
    }

    async fn export(State(receiver): State<Receiver>, body: Bytes) -> Vec<u8> {
        *receiver.requests.lock().unwrap() += 1;
        let request = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
        let mut spans = receiver.spans.lock().unwrap();
        for resource_spans in request.resource_spans {
            let resource: HashMap<String, String> = resource_spans
                .resource
                .map(|r| {
                    r.attributes
                        .iter()
                        .map(|kv| (kv.key.clone(), any(&kv.value)))
                        .collect()
                })
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push(Span {
                        service: resource.get("service.name").cloned().unwrap_or_default(),
                        instance: resource
                            .get("service.instance.id")
                            .cloned()
                            .unwrap_or_default(),
                        name: span.name,
                        kind: span.kind,
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                        attributes: span
                            .attributes
                            .iter()
                            .map(|kv| (kv.key.clone(), any(&kv.value)))
                            .collect(),
                    });
                }
            }
        }
        ExportTraceServiceResponse::default().encode_to_vec()
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }
}

fn env(nats: &NatsServer, node: &str, extra: &[(&str, String)]) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("FANOUT_NATS_URL", nats.url()),
        ("FANOUT_NODE_ID", node.to_string()),
        ("FANOUT_LISTEN", "127.0.0.1:0".to_string()),
        ("FANOUT_HISTORY_MAX_AGE_SECS", "60".to_string()),
    ];
    for (k, v) in extra {
        env.push((leak(k), v.clone()));
    }
    env
}

fn leak(s: &str) -> &'static str {
    Box::leak(s.to_string().into_boxed_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_post_is_one_trace_across_the_api_and_every_node() {
    let (receiver, otlp) = Receiver::start("127.0.0.1:0").await;
    let nats = NatsServer::start();
    let tracing = [
        ("FANOUT_OTLP_ENDPOINT", format!("http://{otlp}")),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_string()),
        ("FANOUT_EVENT_TRACE_ID", "true".to_string()),
    ];
    let api = Process::start("fanout-api", &env(&nats, "api-1", &tracing));
    let ws1 = Process::start("fanout-ws", &env(&nats, "ws-1", &tracing));
    let ws2 = Process::start("fanout-ws", &env(&nats, "ws-2", &tracing));
    let (api, ws1s, ws2s) = (api.server(), ws1.server(), ws2.server());
    for server in [&api, &ws1s, &ws2s] {
        wait_ready(server).await;
    }
    let mut a = Client::connect(&ws1s).await;
    let mut b = Client::connect(&ws2s).await;
    a.subscribe("traced").await;
    b.subscribe("traced").await;

    // The caller's own trace: the API continues it.
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let response = reqwest::Client::new()
        .post(api.url("/v1/channels/traced/events"))
        .header("traceparent", format!("00-{caller_trace}-{caller_span}-01"))
        .body(r#"{"traced":true}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    for client in [&mut a, &mut b] {
        let event = client.event().await;
        assert_eq!(
            event["trace"], caller_trace,
            "FANOUT_EVENT_TRACE_ID puts the trace id in frames"
        );
    }

    // Every span asserted on below: each process exports its spans in batches as they end
    // (the HTTP server span ends after the publish span it contains, maybe a batch later).
    let receiver = &receiver;
    eventually("spans from the API and both nodes", || async move {
        let spans = receiver.spans();
        [SERVER, PRODUCER].iter().all(|kind| {
            spans
                .iter()
                .any(|s| s.instance == "api-1" && s.kind == *kind)
        }) && ["ws-1", "ws-2"].iter().all(|node| {
            spans
                .iter()
                .any(|s| s.instance == *node && s.kind == CONSUMER)
        })
    })
    .await;
    let spans: Vec<Span> = receiver
        .spans()
        .into_iter()
        .filter(|s| s.trace_id == caller_trace)
        .collect();
    let find = |what: &str, f: &dyn Fn(&Span) -> bool| {
        spans
            .iter()
            .find(|s| f(s))
            .cloned()
            .unwrap_or_else(|| panic!("no {what} span in trace {caller_trace}: {spans:#?}"))
    };

    let http = find("HTTP server", &|s| s.kind == SERVER);
    assert_eq!(http.service, "fanout-api");
    assert_eq!(http.name, "POST /v1/channels/{channel}/events");
    assert_eq!(
        http.parent_span_id, caller_span,
        "continues the caller's trace"
    );
    assert_eq!(http.attributes["http.response.status_code"], "202");
    assert_eq!(http.attributes["http.request.method"], "POST");

    let publish = find("publish", &|s| s.kind == PRODUCER);
    assert_eq!(publish.parent_span_id, http.span_id);
    assert_eq!(publish.name, "publish fanout.in.traced");
    assert_eq!(publish.attributes["messaging.system"], "nats");
    assert_eq!(publish.attributes["messaging.operation.type"], "send");
    assert_eq!(publish.attributes["messaging.operation.name"], "publish");
    assert_eq!(
        publish.attributes["messaging.destination.name"],
        "fanout.in.traced"
    );

    for node in ["ws-1", "ws-2"] {
        let process = find(node, &|s| s.kind == CONSUMER && s.instance == node);
        assert_eq!(process.service, "fanout-ws");
        assert_eq!(
            process.parent_span_id, publish.span_id,
            "{node}'s span hangs off the publish"
        );
        assert_eq!(process.name, "process fanout.out.traced");
        assert_eq!(process.attributes["messaging.operation.type"], "process");
        assert_eq!(
            process.attributes["messaging.message.id"],
            publish.attributes["messaging.message.id"]
        );
        assert_eq!(process.attributes["fanout.recipients"], "1");
        assert_eq!(process.attributes["fanout.dropped"], "0");
        assert!(process.attributes.contains_key("fanout.fanout_seconds"));
    }
    // One span per node for the event, not one per client.
    assert_eq!(spans.iter().filter(|s| s.kind == CONSUMER).count(), 2);
    // Connections leave no spans either (their span only labels log lines). Close them, wait
    // until both nodes have no connection left, then trace a broadcast: each node exports its
    // spans in the order they end, so a connection's span would arrive no later than that
    // node's span of the broadcast.
    drop((a, b));
    for node in [&ws1s, &ws2s] {
        let url = node.url("/v1/debug/state");
        eventually("the connections to close", || async {
            let state: Value = reqwest::get(&url).await.unwrap().json().await.unwrap();
            state["connections"] == 0
        })
        .await;
    }
    let (status, body) = post_raw(&api, "/v1/broadcast", "\"second\"").await;
    assert_eq!(status, 202, "{body}");
    let seq = &body["seq"].to_string();
    eventually("both nodes' spans of the broadcast", || async move {
        let spans = receiver.spans();
        ["ws-1", "ws-2"].iter().all(|node| {
            spans.iter().any(|s| {
                s.instance == *node
                    && s.kind == CONSUMER
                    && s.attributes.get("fanout.seq") == Some(seq)
            })
        })
    })
    .await;
    let names: Vec<String> = receiver.spans().iter().map(|s| s.name.clone()).collect();
    assert!(
        !names.iter().any(|n| n == "conn" || n == "node"),
        "{names:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_endpoint_nothing_is_exported_and_events_still_flow() {
    // Listen where an unconfigured OTLP exporter would send: the default localhost:4318.
    let (receiver, _) = Receiver::start("127.0.0.1:4318").await;
    let nats = NatsServer::start();
    let mut api = Process::start("fanout-api", &env(&nats, "api-1", &[]));
    let mut ws = Process::start("fanout-ws", &env(&nats, "ws-1", &[]));
    wait_ready(&api.server()).await;
    wait_ready(&ws.server()).await;
    let mut client = Client::connect(&ws.server()).await;
    let (status, _) = post_raw(&api.server(), "/ping", "").await;
    assert_eq!(status, 200);
    let event = client.event().await;
    assert!(event.get("trace").is_none(), "{event}");
    // Stopping flushes any exporter; there is none.
    api.signal("-TERM");
    ws.signal("-TERM");
    assert_eq!(api.exit_code().await, 0);
    assert_eq!(ws.exit_code().await, 0);
    assert_eq!(*receiver.requests.lock().unwrap(), 0);
}

/// The value of the sample `name` whose labels include all of `labels`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            let matches = metric == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            matches.then(|| value.parse().ok()).flatten()
        })
}

async fn scrape(server: &Server) -> String {
    let response = reqwest::get(server.url("/metrics")).await.unwrap();
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    response.text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_expose_the_families_and_move_with_events() {
    let nats = NatsServer::start();
    let api_process = Process::start("fanout-api", &env(&nats, "api-1", &[]));
    let ws_process = Process::start("fanout-ws", &env(&nats, "ws-1", &[]));
    let (api, ws) = (api_process.server(), ws_process.server());
    wait_ready(&api).await;
    wait_ready(&ws).await;
    let mut client = Client::connect(&ws).await;
    client.subscribe("m").await;
    for i in 0..3 {
        publish(&api, "m", &json!({"i": i})).await;
        client.event().await;
    }
    post_raw(&api, "/v1/channels/m/events", "{broken").await;

    let ws_expect: &[(&str, f64)] = &[
        ("fanout_ws_connections", 1.0),
        ("fanout_ws_connections_opened_total", 1.0),
        ("fanout_ws_subscriptions", 1.0),
        ("fanout_ws_channels", 1.0),
        ("fanout_ws_nats_subscriptions", 2.0), // broadcast and m
        ("fanout_ws_events_received_total", 3.0),
        ("fanout_ws_frames_delivered_total", 3.0),
        ("fanout_ws_slow_consumer_disconnects_total", 0.0),
        ("fanout_ws_event_latency_seconds_count", 3.0),
        ("fanout_nats_connected", 1.0),
    ];
    // The node counts a delivery once the frame is written, so the client may read the
    // third event before the counters say 3: wait for them.
    let ws = &ws;
    eventually(
        "the node's counters to show the three events",
        || async move {
            let text = scrape(ws).await;
            ws_expect
                .iter()
                .all(|(name, want)| sample(&text, name, &[]) == Some(*want))
        },
    )
    .await;
    let text = scrape(ws).await;
    assert!(sample(&text, "fanout_ws_bytes_out_total", &[]).unwrap() > 100.0);
    assert!(
        text.contains("fanout_ws_event_latency_seconds_bucket{le=\"0.001\"}"),
        "a histogram:\n{text}"
    );

    let text = scrape(&api).await;
    let accepted = [("class", "channel"), ("duplicate", "false")];
    assert_eq!(
        sample(&text, "fanout_api_events_accepted_total", &accepted),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "fanout_api_publish_duration_seconds_count", &[]),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "fanout_api_errors_total",
            &[("code", "invalid_json")]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(sample(&text, "fanout_nats_connected", &[]), Some(1.0));

    // A client leaving moves the gauges back and counts why it left.
    drop(client);
    eventually("the disconnect to be counted", || async {
        let text = scrape(ws).await;
        sample(
            &text,
            "fanout_ws_connections_closed_total",
            &[("reason", "client")],
        ) == Some(1.0)
            && sample(&text, "fanout_ws_connections", &[]) == Some(0.0)
            && sample(&text, "fanout_ws_subscriptions", &[]) == Some(0.0)
            && sample(&text, "fanout_ws_nats_subscriptions", &[]) == Some(1.0)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_state_shows_the_node() {
    let nats = NatsServer::start();
    let ws = start_ws(&nats, "ws-debug", |_| {}).await;
    let mut a = Client::connect(&ws).await;
    let mut b = Client::connect(&ws).await;
    a.subscribe("x").await;
    b.subscribe("x").await;
    b.subscribe("y").await;
    let state: Value = reqwest::get(ws.url("/v1/debug/state"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(state["node"], "ws-debug");
    assert_eq!(state["connections"], 2);
    assert_eq!(
        state["channels"],
        json!([{"channel": "x", "subscribers": 2}, {"channel": "y", "subscribers": 1}])
    );
    assert_eq!(state["nats"]["state"], "connected");
    assert_eq!(state["nats"]["stream_ready"], true);
    assert!(state["uptime_secs"].is_u64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_trace_id_inside_traced_requests() {
    let nats = NatsServer::start();
    let (_receiver, otlp) = Receiver::start("127.0.0.1:0").await;
    let extra = [
        ("FANOUT_LOG_FORMAT", "json".to_string()),
        ("FANOUT_OTLP_ENDPOINT", format!("http://{otlp}")),
        // Nothing answers here: the publish fails and the API logs why, inside its span.
        ("FANOUT_NATS_URL", "nats://127.0.0.1:1".to_string()),
    ];
    let api = Process::start("fanout-api", &env(&nats, "api-1", &extra));
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let response = reqwest::Client::new()
        .post(api.server().url("/v1/channels/x/events"))
        .header("traceparent", format!("00-{trace}-b7ad6b7169203331-01"))
        .body("1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    let api = &api;
    eventually("the failure to be logged", || async move {
        api.log().iter().any(|l| l.contains("not acknowledged"))
    })
    .await;
    let line = api
        .log()
        .into_iter()
        .find(|l| l.contains("not acknowledged"))
        .unwrap();
    let line: Value = serde_json::from_str(&line).expect("a JSON log line");
    assert_eq!(line["level"], "WARN");
    assert_eq!(line["span"]["trace_id"], trace, "{line}");
}
