//! Silent failures: the delivery path breaks behind fanout's back while every connection
//! stays up. The ws node's canary finds it (`/readyz` 503 with the reason,
//! `fanout_ws_canary_ok` 0), rebuilds the path, is ready again, and its clients get what was
//! published meanwhile (the stream's RePublish removed; the node's subscription permission
//! revoked by a server reload and restored); the API's `/readyz` says whether the stream
//! takes writes.

use crate::common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const INTERVAL_MS: u64 = 300;

async fn readyz(server: &Server) -> (u16, Value) {
    let response = reqwest::get(server.url("/readyz")).await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

/// `/readyz` of `ws` once it answers 503: its body.
async fn until_unready(ws: &Server) -> Value {
    within("the node to find its delivery path broken", async {
        loop {
            let (status, body) = readyz(ws).await;
            if status == 503 {
                return body;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

async fn stream(nats: &NatsServer) -> async_nats::jetstream::Context {
    async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap())
}

/// The stream's configuration as the server has it now.
async fn stream_config(
    js: &async_nats::jetstream::Context,
) -> async_nats::jetstream::stream::Config {
    let stream = js.get_stream("FANOUT").await.unwrap();
    stream.cached_info().config.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_stops_republishing_is_found_and_repaired() {
    let nats = NatsServer::start();
    let api = start_api(&nats).await;
    let ws = start_ws(&nats, "ws-1", |c| c.canary_interval_ms = INTERVAL_MS).await;
    let mut client = Client::connect(&ws).await;
    client.subscribe("news").await;
    let first = publish(&api, "news", &json!("before")).await;
    assert_eq!(client.event().await["seq"], first);
    eventually("the canary's first verdict", || async {
        metric(&ws, "fanout_ws_canary_ok").await == Some(1.0)
    })
    .await;

    // Behind fanout's back: the stream stops republishing, and is kept that way (the node
    // restores it once it notices) until the test has seen the node unready. Nothing
    // disconnects.
    let js = stream(&nats).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let breaker = tokio::spawn({
        let (js, stop) = (js.clone(), stop.clone());
        async move {
            while !stop.is_cancelled() {
                let mut config = stream_config(&js).await;
                if config.republish.take().is_some() {
                    js.update_stream(&config).await.unwrap();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    eventually("RePublish to be gone", || async {
        stream_config(&js).await.republish.is_none()
    })
    .await;
    let broken = Instant::now();
    let mut missed = Vec::new();
    for i in 0..5 {
        missed.push(publish(&api, "news", &json!(format!("during {i}"))).await);
    }

    // Found: not ready, with the reason, and the gauge says so.
    let body = until_unready(&ws).await;
    let reason = body["canary"]["reason"].as_str().unwrap_or("").to_string();
    let found = broken.elapsed();
    stop.cancel();
    breaker.await.unwrap();
    let repairing = Instant::now();
    assert!(reason.contains("did not come back"), "{reason}");
    let failures = metric(&ws, "fanout_ws_canary_failures_total").await;
    assert!(failures >= Some(1.0), "{failures:?}");

    // Repaired by the node itself (it restores the stream's settings), ready again, and the
    // client gets what it missed, in order, then live events.
    eventually("the node to be ready again", || async {
        readyz(&ws).await.0 == 200
    })
    .await;
    let repaired = repairing.elapsed();
    let republish = stream_config(&js).await.republish.clone();
    assert!(republish.is_some(), "the node restored RePublish");
    for seq in &missed {
        assert_eq!(client.event().await["seq"], *seq);
    }
    let after = publish(&api, "news", &json!("after")).await;
    assert_eq!(client.event().await["seq"], after);
    eventually("the gauge to say the path works", || async {
        metric(&ws, "fanout_ws_canary_ok").await == Some(1.0)
    })
    .await;
    let intervals = |d: Duration| d.as_millis() as f64 / INTERVAL_MS as f64;
    println!(
        "found broken after {:.1} intervals, ready again {:.1} intervals after the breaking \
         stopped (interval {INTERVAL_MS} ms)",
        intervals(found),
        intervals(repaired)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_is_unready_while_the_stream_takes_no_writes() {
    let nats = NatsServer::start();
    let api = start_api(&nats).await;
    let (status, body) = readyz(&api).await;
    assert_eq!(
        (status, &body["stream_writable"]),
        (200, &json!(true)),
        "{body}"
    );

    // The stream refuses writes (sealed streams take none), the connection stays up.
    let js = stream(&nats).await;
    let mut config = stream_config(&js).await;
    config.sealed = true;
    js.update_stream(&config).await.unwrap();
    eventually("the API to say the stream takes no writes", || async {
        let (status, body) = readyz(&api).await;
        status == 503
            && body["stream_writable"] == json!(false)
            && body["reason"].as_str().is_some_and(|r| !r.is_empty())
    })
    .await;
    assert_eq!(readyz(&api).await.1["nats"], "connected");
}

/// A nats-server whose `ws` user may lose its permission to subscribe to the event subjects
/// by a configuration reload (SIGHUP): the connection stays up, the subscriptions go.
struct RevocableNats {
    child: std::process::Child,
    dir: tempfile::TempDir,
    port: u16,
}

impl RevocableNats {
    fn start() -> RevocableNats {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut nats = RevocableNats {
            child: std::process::Command::new("true").spawn().unwrap(),
            dir,
            port,
        };
        nats.write_config(false);
        let log = std::fs::File::create(nats.dir.path().join("nats.log")).unwrap();
        nats.child = std::process::Command::new(nats_server_bin())
            .arg("-c")
            .arg(nats.dir.path().join("nats.conf"))
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        nats
    }

    fn write_config(&self, revoked: bool) {
        let deny = if revoked {
            r#", deny: ["fanout.out.news", "fanout.out._fanout.>"]"#
        } else {
            ""
        };
        let conf = format!(
            r#"listen: "127.0.0.1:{port}"
jetstream {{ store_dir: "{store}" }}
authorization {{
  users = [
    {{ user: api, password: api }}
    {{ user: ws, password: ws, permissions: {{ subscribe: {{ allow: [">"]{deny} }} }} }}
  ]
}}
"#,
            port = self.port,
            store = self.dir.path().join("js").display(),
        );
        std::fs::write(self.dir.path().join("nats.conf"), conf).unwrap();
    }

    /// Rewrites the configuration and has the server reload it; returns once it has.
    async fn reload(&self, revoked: bool) {
        self.write_config(revoked);
        let reloads = self.log().matches("Reloaded server configuration").count();
        let pid = self.child.id().to_string();
        let sent = std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap();
        assert!(sent.success());
        eventually("nats-server to reload its configuration", || async {
            self.log().matches("Reloaded server configuration").count() > reloads
        })
        .await;
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
    }

    fn url(&self, user: &str) -> String {
        format!("nats://{user}:{user}@127.0.0.1:{}", self.port)
    }
}

impl Drop for RevocableNats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_permission_revoked_and_restored_is_found_and_caught_up() {
    let nats = RevocableNats::start();
    let common = |user: &str, node: &str| common_at(&nats.url(user), node);
    let api = spawn_api(
        fanout_api::Config {
            common: common("api", "api-1"),
            listen: "127.0.0.1:0".into(),
            ..fanout_api::Config::default()
        },
        WAIT,
    )
    .await;
    let ws = spawn_ws(
        fanout_ws::Config {
            common: common("ws", "ws-1"),
            listen: "127.0.0.1:0".into(),
            canary_interval_ms: INTERVAL_MS,
            ..fanout_ws::Config::default()
        },
        WAIT,
    )
    .await;
    let mut client = Client::connect(&ws).await;
    client.subscribe("news").await;
    let first = publish(&api, "news", &json!("before")).await;
    assert_eq!(client.event().await["seq"], first);

    // The server drops the node's subscriptions to the channel and to its probes; the
    // connection stays up and nothing tells the node.
    nats.reload(true).await;
    let mut missed = Vec::new();
    for i in 0..3 {
        missed.push(publish(&api, "news", &json!(format!("during {i}"))).await);
    }
    let body = until_unready(&ws).await;
    assert_eq!(body["nats"], "connected", "{body}");
    assert_eq!(body["canary"]["ok"], false, "{body}");
    // It cannot repair this itself: it stays unready while the permission is gone.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(INTERVAL_MS)).await;
        assert_eq!(readyz(&ws).await.0, 503);
    }

    // The operator restores the permission: the node subscribes afresh, is ready again, and
    // the client gets what it missed, then live events.
    nats.reload(false).await;
    eventually("the node to be ready again", || async {
        readyz(&ws).await.0 == 200
    })
    .await;
    for seq in &missed {
        assert_eq!(client.event().await["seq"], *seq);
    }
    let after = publish(&api, "news", &json!("after")).await;
    assert_eq!(client.event().await["seq"], after);
}
