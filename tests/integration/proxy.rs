//! Proxy hooks against a real HTTP backend in the test: connect (who the client is, its
//! forwarded headers, server-side channels, refusals with the app's code, a backend that
//! fails or never answers, the breaker), subscribe (refusal, channel info in presence),
//! publish (refusal, replaced data), refresh (extends, then refuses: 4004) and rpc (over
//! WebSocket, an SSE session and a stateless request), and a JWT checked before the hook.

use crate::common;

use std::sync::{Arc, Mutex};

use axum::{Json, Router, extract::State, http::StatusCode, response::IntoResponse, routing::post};
use common::*;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{client::IntoClientRequest, http::HeaderValue};

/// The app's backend: what it was asked, by hook.
#[derive(Clone, Default)]
pub(crate) struct Backend {
    asked: Arc<Mutex<Vec<(String, Value)>>>,
}

fn refuse(status: StatusCode, code: &str, message: &str) -> axum::response::Response {
    (
        status,
        Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

impl Backend {
    fn record(&self, hook: &str, body: &Value) {
        self.asked
            .lock()
            .unwrap()
            .push((hook.to_string(), body.clone()));
    }

    /// What `hook` was asked, in order.
    pub(crate) fn asked(&self, hook: &str) -> Vec<Value> {
        self.asked
            .lock()
            .unwrap()
            .iter()
            .filter(|(h, _)| h == hook)
            .map(|(_, b)| b.clone())
            .collect()
    }

    /// Serves the hooks on a free port: its base URL.
    pub(crate) async fn start(&self) -> String {
        async fn connect(
            State(b): State<Backend>,
            Json(body): Json<Value>,
        ) -> axum::response::Response {
            b.record("connect", &body);
            let now = fanout::time::now_ms() / 1000;
            match body["user"].as_str().unwrap_or_default() {
                "refused" => refuse(StatusCode::FORBIDDEN, "banned", "go away"),
                "broken" => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
                "slow" => std::future::pending().await,
                "short" => Json(json!({"user": "short", "expire_at": now + 1})).into_response(),
                "" => {
                    // No user named: the backend knows the client by its cookie.
                    let cookie = body["headers"]["cookie"].as_str().unwrap_or_default();
                    match cookie.strip_prefix("session=") {
                        Some(user) => Json(json!({"user": user})).into_response(),
                        None => refuse(StatusCode::UNAUTHORIZED, "login_required", "log in first"),
                    }
                }
                user => Json(json!({
                    "user": user,
                    "info": {"name": user.to_uppercase()},
                    "channels": [format!("inbox:{user}")],
                }))
                .into_response(),
            }
        }
        async fn subscribe(
            State(b): State<Backend>,
            Json(body): Json<Value>,
        ) -> axum::response::Response {
            b.record("subscribe", &body);
            match body["channel"].as_str().unwrap_or_default() {
                "secret" => refuse(StatusCode::FORBIDDEN, "not_allowed", "members only"),
                "room:info" => Json(json!({"info": {"role": "admin"}})).into_response(),
                _ => Json(json!({})).into_response(),
            }
        }
        async fn publish(
            State(b): State<Backend>,
            Json(body): Json<Value>,
        ) -> axum::response::Response {
            b.record("publish", &body);
            match body["channel"].as_str().unwrap_or_default() {
                "censored" => Json(json!({"data": {"text": "***"}})).into_response(),
                "readonly" => refuse(StatusCode::FORBIDDEN, "read_only", "nobody writes here"),
                _ => Json(json!({})).into_response(),
            }
        }
        async fn refresh(
            State(b): State<Backend>,
            Json(body): Json<Value>,
        ) -> axum::response::Response {
            b.record("refresh", &body);
            let times = b.asked("refresh").len();
            match times {
                1 => Json(json!({"expire_at": fanout::time::now_ms() / 1000 + 1})).into_response(),
                _ => refuse(StatusCode::FORBIDDEN, "expired", "your session is over"),
            }
        }
        async fn rpc(
            State(b): State<Backend>,
            Json(body): Json<Value>,
        ) -> axum::response::Response {
            b.record("rpc", &body);
            match body["method"].as_str().unwrap_or_default() {
                "echo" => Json(json!({"result": {"echo": body["data"], "user": body["user"]}}))
                    .into_response(),
                "fail" => refuse(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "bad_input",
                    "no such thing",
                ),
                "slow" => std::future::pending().await,
                _ => Json(json!({"result": null})).into_response(),
            }
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let app = Router::new()
            .route("/connect", post(connect))
            .route("/subscribe", post(subscribe))
            .route("/publish", post(publish))
            .route("/refresh", post(refresh))
            .route("/rpc", post(rpc))
            .with_state(self.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        base
    }
}

/// Every hook on, to `base`, with a short timeout.
pub(crate) fn hooks(base: &str) -> impl Fn(&mut fanout_ws::Config) + '_ {
    move |c| {
        c.proxy_connect_url = format!("{base}/connect");
        c.proxy_subscribe_url = format!("{base}/subscribe");
        c.proxy_publish_url = format!("{base}/publish");
        c.proxy_refresh_url = format!("{base}/refresh");
        c.proxy_rpc_url = format!("{base}/rpc");
        c.proxy_timeout_ms = 300;
        c.proxy_headers = "X-App, cookie".into();
    }
}
async fn readyz(node: &Server) -> Value {
    reqwest::get(node.url("/readyz"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connect_hook_decides_who_connects_and_a_failing_backend_is_never_waited_for() {
    let backend = Backend::default();
    let base = backend.start().await;
    let nats = NatsServer::start();
    let api = start_api(&nats).await;
    let node = start_ws(&nats, "ws-1", hooks(&base)).await;
    let url = |user: &str| format!("{}?user={user}", node.ws_url());

    // Who the client is, its info, and a channel it is in from the start.
    let mut request = url("ada").into_client_request().unwrap();
    request
        .headers_mut()
        .insert("x-app", HeaderValue::from_static("web"));
    request
        .headers_mut()
        .insert("x-other", HeaderValue::from_static("not forwarded"));
    let (socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let mut ada = Client::from_socket(socket).await;
    assert_eq!(ada.welcome["user"], "ada");
    let frame = ada.recv().await;
    assert_eq!(
        (frame["op"].as_str(), frame["channel"].as_str()),
        (Some("subscribed"), Some("inbox:ada")),
        "{frame}"
    );
    let seq = publish(&api, "inbox:ada", &json!({"hi": 1})).await;
    assert_eq!(ada.event().await["seq"], seq);
    let asked = &backend.asked("connect")[0];
    assert_eq!(asked["transport"], "websocket");
    assert_eq!(asked["node"], "ws-1");
    assert_eq!(asked["user"], "ada");
    assert_eq!(asked["headers"], json!({"x-app": "web"}));
    assert!(
        asked["remote_addr"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );

    // Known by a cookie alone, over SSE.
    let sse = SseClient::connect_with(&node, "channel=room", None, &[("Cookie", "session=bo")])
        .await
        .ok()
        .unwrap();
    assert_eq!(sse.welcome["user"], "bo");
    let refusal = SseClient::connect(&node, "channel=room", None)
        .await
        .err()
        .unwrap();
    assert_eq!(refusal.status, 401);
    assert_eq!(
        refusal.body["error"],
        json!({"code": "login_required", "message": "log in first"})
    );

    // Refused with the app's own code and status.
    let (status, body) = refused(url("refused")).await;
    assert_eq!(status, 403);
    assert_eq!(
        body["error"],
        json!({"code": "banned", "message": "go away"})
    );
    let (status, body) = poll(&node, "user=refused&channel=room&timeout=0").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("banned"))
    );

    // A backend that never answers: the client hears within the timeout.
    let (status, body) = refused(url("slow")).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (504, Some("proxy_timeout"))
    );

    // A backend that fails: proxy_unavailable; five in a row open the breaker, which then
    // fails calls at once, whoever connects; after its cool-down the backend is asked again.
    let (status, body) = refused(url("broken")).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (502, Some("proxy_unavailable"))
    );
    for _ in 1..5 {
        refused(url("broken")).await;
    }
    assert_eq!(readyz(&node).await["proxy"]["connect"]["breaker"], "open");
    let asked_before = backend.asked("connect").len();
    let (status, body) = refused(url("ada")).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (502, Some("proxy_unavailable"))
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("again in"),
        "{body}"
    );
    assert_eq!(
        backend.asked("connect").len(),
        asked_before,
        "the breaker asked the backend"
    );
    eventually("the breaker to let a call through", || async {
        readyz(&node).await["proxy"]["connect"]["breaker"] == "closed"
    })
    .await;
    let ada2 = Client::connect_url(&url("ada")).await;
    assert_eq!(ada2.welcome["user"], "ada");
    assert_eq!(readyz(&node).await["proxy"]["connect"]["failures"], 0);
    assert!(
        metric(
            &node,
            "fanout_ws_proxy_requests_total{hook=\"connect\",outcome=\"breaker_open\"}"
        )
        .await
        .is_some_and(|n| n >= 1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_publish_and_rpc_hooks_answer_on_every_transport() {
    let backend = Backend::default();
    let base = backend.start().await;
    let nats = NatsServer::start();
    let api = start_api(&nats).await;
    let node = start_ws(&nats, "ws-1", hooks(&base)).await;
    let mut ada = Client::connect_url(&format!("{}?user=ada", node.ws_url())).await;
    assert_eq!(ada.recv().await["op"], "subscribed"); // inbox:ada, from the connect hook

    let reply = ada
        .request(json!({"op": "subscribe", "channel": "secret", "id": 1}))
        .await;
    assert_eq!(
        (
            reply["op"].as_str(),
            reply["code"].as_str(),
            reply["message"].as_str()
        ),
        (Some("error"), Some("not_allowed"), Some("members only")),
        "{reply}"
    );
    let reply = ada
        .request(json!({"op": "subscribe", "channel": "room:info", "presence": true, "id": 2}))
        .await;
    assert_eq!(reply["op"], "subscribed", "{reply}");
    let asked = backend.asked("subscribe");
    assert_eq!(asked.last().unwrap()["user"], "ada");
    assert_eq!(asked.last().unwrap()["transport"], "websocket");
    let reply = ada
        .request(json!({"op": "presence", "channel": "room:info", "id": 3}))
        .await;
    assert_eq!(
        reply["members"][0]["info"],
        json!({"role": "admin"}),
        "{reply}"
    );

    // Publish: the hook's data instead of the client's; a refusal with the app's code.
    let reply = ada
        .request(json!({"op": "subscribe", "channel": "censored", "id": 4}))
        .await;
    assert_eq!(reply["op"], "subscribed");
    let reply = ada
        .request(json!({"op": "publish", "channel": "censored", "data": {"text": "rude"}, "id": 5}))
        .await;
    assert_eq!(reply["op"], "published", "{reply}");
    let event = within("the censored event", async {
        loop {
            let frame = ada.recv().await;
            if frame["op"] == "event" && frame["channel"] == "censored" {
                return frame;
            }
        }
    })
    .await;
    assert_eq!(event["data"], json!({"text": "***"}));
    assert_eq!(backend.asked("publish")[0]["data"], json!({"text": "rude"}));
    let reply = ada
        .request(json!({"op": "publish", "channel": "readonly", "data": 1, "id": 6}))
        .await;
    assert_eq!(reply["code"], "read_only", "{reply}");

    // rpc over WebSocket: a result, the app's refusal, a backend that never answers.
    let reply = ada
        .request(json!({"op": "rpc", "method": "echo", "data": {"x": 1}, "id": 7}))
        .await;
    assert_eq!(
        reply,
        json!({"op": "rpc", "id": 7, "result": {"echo": {"x": 1}, "user": "ada"}})
    );
    let reply = ada
        .request(json!({"op": "rpc", "method": "fail", "id": 8}))
        .await;
    assert_eq!(
        (
            reply["code"].as_str(),
            reply["message"].as_str(),
            reply["ref"].as_str()
        ),
        (Some("bad_input"), Some("no such thing"), Some("rpc"))
    );
    let reply = ada
        .request(json!({"op": "rpc", "method": "slow", "id": 9}))
        .await;
    assert_eq!(reply["code"], "proxy_timeout", "{reply}");
    let reply = ada.request(json!({"op": "rpc", "id": 10})).await;
    assert_eq!(reply["code"], "invalid_request", "{reply}");

    // rpc over an SSE session and as a stateless request.
    let sse = SseClient::connect(&node, "user=bo&channel=room", None)
        .await
        .ok()
        .unwrap();
    let (status, reply) = sse
        .request(
            &node,
            json!({"op": "rpc", "method": "echo", "data": 2, "id": "a"}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(reply["result"], json!({"echo": 2, "user": "bo"}), "{reply}");
    let response = reqwest::Client::new()
        .post(node.url("/request?user=cy"))
        .body(json!({"op": "rpc", "method": "echo", "data": 3, "id": 1}).to_string())
        .send()
        .await
        .unwrap();
    let reply: Value = response.json().await.unwrap();
    assert_eq!(reply["result"], json!({"echo": 3, "user": "cy"}), "{reply}");

    // A stream's channel the subscribe hook refuses: the stream says so and follows the rest.
    let mut stream = SseClient::connect(&node, "user=bo&channel=secret&channel=open", None)
        .await
        .ok()
        .unwrap();
    let refused = stream.until("refused").await;
    assert_eq!(
        (
            refused.data["code"].as_str(),
            refused.data["channel"].as_str()
        ),
        (Some("not_allowed"), Some("secret")),
        "{:?}",
        refused.data
    );
    let seq = publish(&api, "open", &json!(1)).await;
    assert_eq!(stream.until("event").await.data["seq"], seq);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_refresh_hook_extends_a_connection_until_it_refuses() {
    let backend = Backend::default();
    let base = backend.start().await;
    let nats = NatsServer::start();
    let node = start_ws(&nats, "ws-1", hooks(&base)).await;
    let mut short = Client::connect_url(&format!("{}?user=short", node.ws_url())).await;
    // Extended once, then refused: closed with 4004.
    assert_eq!(
        short.closed().await,
        Closed::Code(4004, "token expired".into())
    );
    let asked = backend.asked("refresh");
    assert_eq!(asked.len(), 2, "{asked:?}");
    assert_eq!(asked[0]["user"], "short");
    assert_eq!(asked[0]["transport"], "websocket");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_is_checked_before_the_connect_hook() {
    use jsonwebtoken::{EncodingKey, Header, encode};
    const SECRET: &str = "test-secret-test-secret-test-secret";
    let backend = Backend::default();
    let base = backend.start().await;
    let nats = NatsServer::start();
    let node = start_ws(&nats, "ws-1", |c| {
        hooks(&base)(c);
        c.auth = fanout_ws::config::AuthMode::Jwt;
        c.jwt_secret = SECRET.into();
    })
    .await;
    let exp = fanout::time::now_ms() / 1000 + 600;
    let token = encode(
        &Header::default(),
        &json!({"sub": "ada", "exp": exp}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let ada = Client::connect_url(&format!("{}?token={token}", node.ws_url())).await;
    assert_eq!(ada.welcome["user"], "ada");
    assert_eq!(backend.asked("connect")[0]["user"], "ada");
    let (status, body) = refused(format!("{}?token=nonsense", node.ws_url())).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("invalid_token"))
    );
    assert_eq!(
        backend.asked("connect").len(),
        1,
        "the hook was asked about a bad token"
    );
    // Without a token, the hook decides (here by a cookie).
    let mut request = node.ws_url().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("cookie", HeaderValue::from_static("session=bo"));
    let (socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let mut bo = Client::from_socket(socket).await;
    assert_eq!(bo.welcome["user"], "bo");
    // Such a client publishes only where the publish hook allows.
    let reply = bo
        .request(json!({"op": "publish", "channel": "readonly", "data": 1, "id": 1}))
        .await;
    assert_eq!(reply["code"], "read_only", "{reply}");
}
