//! Identity and auth: JWT (HS256, RS256, EdDSA), channel permissions, token expiry and
//! refresh, origins, the per-IP limit, client publish and its rate limit, API keys.

use crate::common;

use std::process::Command;

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{client::IntoClientRequest, http::HeaderValue};

const SECRET: &str = "test-secret-test-secret-test-secret";

fn now() -> u64 {
    fanout::time::now_ms() / 1000
}

fn token(claims: Value, algorithm: Algorithm, key: &EncodingKey) -> String {
    encode(&Header::new(algorithm), &claims, key).unwrap()
}

fn hs256(claims: Value) -> String {
    token(
        claims,
        Algorithm::HS256,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
}
async fn jwt_node(nats: &NatsServer, tweak: impl FnOnce(&mut fanout_ws::Config)) -> Server {
    start_ws(nats, "ws-1", |c| {
        c.auth = fanout_ws::config::AuthMode::Jwt;
        c.jwt_secret = SECRET.into();
        tweak(c);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_connections_and_every_rejection() {
    let nats = NatsServer::start();
    let api = start_api(&nats).await;
    let ws = jwt_node(&nats, |_| {}).await;
    let claims = json!({"sub": "ada", "exp": now() + 600, "channels": ["room:*"], "publish": ["room:maths"]});
    let mut client = Client::connect_url(&format!("{}?token={}", ws.ws_url(), hs256(claims))).await;
    assert_eq!(client.welcome["user"], "ada");

    // Permissions: room:* may be subscribed, others not; broadcast always.
    client.subscribe("room:maths").await;
    client.subscribe("broadcast").await;
    let reply = client
        .request(json!({"op": "subscribe", "channel": "secret", "id": 1}))
        .await;
    assert_eq!(
        (reply["code"].as_str(), reply["ref"].as_str()),
        (Some("forbidden"), Some("subscribe"))
    );
    publish(&api, "secret", &json!("hidden")).await;
    let seq = publish(&api, "room:maths", &json!("visible")).await;
    assert_eq!(
        client.event().await["seq"],
        seq,
        "nothing from the forbidden channel"
    );

    // Client publish: allowed by the token's publish patterns, through the stream.
    let reply = client
        .request(json!({"op": "publish", "channel": "room:maths", "data": {"x": 1}, "id": "p"}))
        .await;
    assert_eq!(reply["op"], "published", "{reply}");
    assert_eq!(reply["id"], "p");
    let event = client.event().await;
    assert_eq!(
        (&event["seq"], &event["data"]),
        (&reply["seq"], &json!({"x": 1}))
    );
    let reply = client
        .request(json!({"op": "publish", "channel": "room:art", "data": 1}))
        .await;
    assert_eq!(reply["code"], "forbidden");

    // Rejections at the upgrade: 401 with a JSON reason.
    let url = ws.ws_url();
    let cases = [
        (url.clone(), "missing_token"),
        (format!("{url}?token=not.a.jwt"), "invalid_token"),
        (
            format!(
                "{url}?token={}",
                token(
                    json!({"sub": "x", "exp": now() + 60}),
                    Algorithm::HS256,
                    &EncodingKey::from_secret(b"another secret")
                )
            ),
            "invalid_signature",
        ),
        (
            format!(
                "{url}?token={}",
                token(
                    json!({"sub": "x", "exp": now() + 60}),
                    Algorithm::HS384,
                    &EncodingKey::from_secret(SECRET.as_bytes())
                )
            ),
            "wrong_algorithm",
        ),
        (
            format!(
                "{url}?token={}",
                hs256(json!({"sub": "x", "exp": now() - 3600}))
            ),
            "token_expired",
        ),
        (
            format!("{url}?token={}", hs256(json!({"sub": "x"}))),
            "invalid_token",
        ),
    ];
    for (url, code) in cases {
        let (status, body) = refused(&url).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (401, Some(code)),
            "{url}"
        );
    }
}

/// Generates a key pair with openssl; returns (private PEM, path of the public PEM).
fn keypair(dir: &std::path::Path, kind: &str) -> (Vec<u8>, std::path::PathBuf) {
    let private = dir.join(format!("{kind}.pem"));
    let public = dir.join(format!("{kind}.pub.pem"));
    let gen_args: &[&str] = if kind == "rsa" {
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
        ]
    } else {
        &["genpkey", "-algorithm", "ed25519"]
    };
    let status = Command::new("openssl")
        .args(gen_args)
        .arg("-out")
        .arg(&private)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let status = Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&private)
        .arg("-out")
        .arg(&public)
        .status()
        .unwrap();
    assert!(status.success());
    (std::fs::read(private).unwrap(), public)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_and_eddsa_tokens_verify_with_a_public_key() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    for (kind, algorithm) in [("rsa", Algorithm::RS256), ("ed25519", Algorithm::EdDSA)] {
        let (private, public) = keypair(dir.path(), kind);
        let key = match algorithm {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&private).unwrap(),
            _ => EncodingKey::from_ed_pem(&private).unwrap(),
        };
        let path = public.display().to_string();
        let ws = start_ws(&nats, kind, |c| {
            c.auth = fanout_ws::config::AuthMode::Jwt;
            c.jwt_public_key = path;
        })
        .await;
        let good = token(
            json!({"sub": format!("{kind}-user"), "exp": now() + 60}),
            algorithm,
            &key,
        );
        let client = Client::connect_url(&format!("{}?token={good}", ws.ws_url())).await;
        assert_eq!(client.welcome["user"], format!("{kind}-user"));
        // An HS256 token is refused by a node that verifies with a public key.
        let (status, body) = refused(&format!(
            "{}?token={}",
            ws.ws_url(),
            hs256(json!({"sub": "x", "exp": now() + 60}))
        ))
        .await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (401, Some("wrong_algorithm"))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiring_token_is_refreshed_or_the_connection_closed_with_4004() {
    let nats = NatsServer::start();
    let ws = jwt_node(&nats, |_| {}).await;
    // Both first tokens lapse at the same second.
    let lapse = now() + 2;
    let short = |sub: &str| hs256(json!({"sub": sub, "exp": lapse}));
    let mut lapsing = Client::connect_url(&format!("{}?token={}", ws.ws_url(), short("ada"))).await;
    let mut refreshing =
        Client::connect_url(&format!("{}?token={}", ws.ws_url(), short("bob"))).await;

    // Another user's token is refused; the user's own fresh token is taken.
    let reply = refreshing
        .request(json!({"op": "refresh", "token": hs256(json!({"sub": "eve", "exp": now() + 60}))}))
        .await;
    assert_eq!(reply["code"], "invalid_token");
    let expires = now() + 60;
    let reply = refreshing
        .request(json!({"op": "refresh", "token": hs256(json!({"sub": "bob", "exp": expires})), "id": 9}))
        .await;
    assert_eq!(
        reply,
        json!({"op": "refreshed", "expires_at": expires, "id": 9})
    );

    assert_eq!(
        lapsing.closed().await,
        Closed::Code(4004, "token expired".into())
    );
    // Bob's first token has lapsed too (the node's expiry timers fire within the second
    // after `exp`: wait until that second is over), and he is still connected.
    eventually("bob's first token to be past its expiry", || async {
        fanout::time::now_ms() >= (lapse + 1) * 1000
    })
    .await;
    assert_eq!(
        refreshing.request(json!({"op": "ping"})).await,
        json!({"op": "pong"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origins_per_ip_limit_and_publish_rate_limit() {
    let nats = NatsServer::start();
    let ws = start_ws(&nats, "ws-1", |c| {
        c.allowed_origins = "https://good.example".into();
        c.max_connections_per_ip = 2;
        c.publish_rate_per_sec = 3;
    })
    .await;
    let with_origin = |origin: &'static str| {
        let mut request = ws.ws_url().into_client_request().unwrap();
        request
            .headers_mut()
            .insert("Origin", HeaderValue::from_static(origin));
        request
    };
    match tokio_tungstenite::connect_async(with_origin("https://evil.example")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403)
        }
        other => panic!("a foreign origin was not refused: {other:?}"),
    }
    let (good, _) = tokio_tungstenite::connect_async(with_origin("https://good.example"))
        .await
        .unwrap();
    // No Origin header (not a browser): allowed. That makes two from 127.0.0.1, the limit.
    let mut second = Client::connect(&ws).await;
    let (status, body) = refused(&ws.ws_url()).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (429, Some("too_many_connections"))
    );
    drop(good);
    let ws_ref = &ws;
    eventually("the slot to be given back", || async move {
        tokio_tungstenite::connect_async(ws_ref.ws_url())
            .await
            .is_ok()
    })
    .await;

    // Publishing: a burst of 3, then 3 per second. Eight publishes sent at once: the first
    // three are taken, and no more than the budget refilled while they were answered (the
    // time it took is measured, not assumed); the others are refused and the connection stays.
    let started = std::time::Instant::now();
    for i in 0..8 {
        second
            .send(json!({"op": "publish", "channel": "rl", "data": i, "id": i}))
            .await;
    }
    let mut replies = Vec::new();
    while replies.len() < 8 {
        let frame = second.recv().await;
        if !is_push(&frame) {
            replies.push(frame);
        }
    }
    let refilled = (started.elapsed().as_secs_f64() * 3.0).floor() as usize;
    replies.sort_by_key(|r| r["id"].as_u64());
    let published = replies.iter().filter(|r| r["op"] == "published").count();
    assert!(
        replies[..3].iter().all(|r| r["op"] == "published"),
        "the burst is taken: {replies:?}"
    );
    assert!(
        published <= 3 + refilled,
        "{published} published: {replies:?}"
    );
    for refused in replies.iter().filter(|r| r["op"] != "published") {
        assert_eq!(
            (refused["code"].as_str(), refused["ref"].as_str()),
            (Some("rate_limited"), Some("publish")),
            "{refused}"
        );
    }
    assert_eq!(
        second.request(json!({"op": "ping", "id": "after"})).await,
        json!({"op": "pong", "id": "after"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_guard_the_http_api() {
    let nats = NatsServer::start();
    let guarded = start_api_with(&nats, |c| c.api_keys = "key-one, key-two".into()).await;
    let http = reqwest::Client::new();
    let post = |key: Option<&str>, path: &str| {
        let mut request = http.post(guarded.url(path)).body("1");
        if let Some(key) = key {
            request = request.header("Authorization", format!("Bearer {key}"));
        }
        request.send()
    };
    let response = post(None, "/v1/channels/x/events").await.unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthorized");
    let response = post(Some("key-three"), "/v1/channels/x/events")
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    assert_eq!(
        response.json::<Value>().await.unwrap()["error"]["code"],
        "forbidden"
    );
    assert_eq!(
        post(Some("key-two"), "/v1/channels/x/events")
            .await
            .unwrap()
            .status(),
        202
    );
    assert_eq!(
        post(None, "/ping").await.unwrap().status(),
        401,
        "the demo ping is guarded too"
    );
    // Presence and discovery are /v1 endpoints too.
    for path in ["/v1/channels/x/presence", "/v1/nodes"] {
        let status = |key: Option<&'static str>| {
            let mut request = http.get(guarded.url(path));
            if let Some(key) = key {
                request = request.header("Authorization", format!("Bearer {key}"));
            }
            async move { request.send().await.unwrap().status().as_u16() }
        };
        assert_eq!(status(None).await, 401, "{path}");
        assert_eq!(status(Some("nope")).await, 403, "{path}");
        assert_eq!(status(Some("key-one")).await, 200, "{path}");
    }
    assert_eq!(
        reqwest::get(guarded.url("/healthz"))
            .await
            .unwrap()
            .status(),
        200
    );

    let open_ping = start_api_with(&nats, |c| {
        c.api_keys = "key-one".into();
        c.public_ping = true;
    })
    .await;
    let response = http.post(open_ping.url("/ping")).send().await.unwrap();
    assert_eq!(
        response.status(),
        200,
        "FANOUT_PUBLIC_PING keeps the demo open"
    );
}
