//! fanout over a NATS server that requires TLS (with client certificates) and users with the
//! least-privilege permissions of deploy/nats/permissions.conf; and what start-up says when
//! the certificate or the credentials are wrong.

use crate::common;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use common::{
    Client, Process, ProcessExt, WAIT, nats_server_bin, publish, wait_ready_for, within, workspace,
};
use serde_json::json;

const API_PASSWORD: &str = "api-secret-pw";
const WS_PASSWORD: &str = "ws-secret-pw";

/// A nats-server with TLS required (client certificates verified) and fanout's two users.
struct SecureNats {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Drop for SecureNats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn certs(dir: &Path) -> PathBuf {
    let out = dir.join("certs");
    let status = Command::new("bash")
        .arg(workspace().join("scripts/certs.sh"))
        .arg(&out)
        .arg("nats")
        .stdout(Stdio::null())
        .status()
        .expect("bash and openssl");
    assert!(status.success(), "scripts/certs.sh failed");
    out
}

impl SecureNats {
    fn start() -> SecureNats {
        let dir = tempfile::tempdir().unwrap();
        let certs = certs(dir.path());
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        std::fs::copy(
            workspace().join("deploy/nats/permissions.conf"),
            dir.path().join("permissions.conf"),
        )
        .unwrap();
        let conf = dir.path().join("nats.conf");
        std::fs::write(
            &conf,
            format!(
                r#"listen: 127.0.0.1:{port}
jetstream {{ store_dir: "{store}" }}
tls {{
  cert_file: "{certs}/nats.pem"
  key_file: "{certs}/nats.key"
  ca_file: "{certs}/ca.pem"
  verify: true
}}
include "permissions.conf"
authorization {{
  users: [
    {{ user: fanout-api, password: "{API_PASSWORD}", permissions: $FANOUT_API }}
    {{ user: fanout-ws, password: "{WS_PASSWORD}", permissions: $FANOUT_WS }}
  ]
}}
"#,
                store = dir.path().join("js").display(),
                certs = certs.display(),
            ),
        )
        .unwrap();
        let check = Command::new(nats_server_bin())
            .arg("-t")
            .arg("-c")
            .arg(&conf)
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "nats-server -t: {}",
            String::from_utf8_lossy(&check.stderr)
        );
        let log = std::fs::File::create(dir.path().join("nats.log")).unwrap();
        let child = Command::new(nats_server_bin())
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let nats = SecureNats { child, port, dir };
        let deadline = std::time::Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "nats-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        nats
    }

    fn certs(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
    }

    /// A process's environment: `user:password` in a `tls://` URL, the CA and a client
    /// certificate.
    fn env(&self, user: &str, password: &str, node: &str) -> Vec<(&'static str, String)> {
        let certs = self.certs();
        vec![
            (
                "FANOUT_NATS_URL",
                format!("tls://{user}:{password}@127.0.0.1:{}", self.port),
            ),
            (
                "FANOUT_NATS_TLS_CA",
                certs.join("ca.pem").display().to_string(),
            ),
            (
                "FANOUT_NATS_TLS_CERT",
                certs.join("client.pem").display().to_string(),
            ),
            (
                "FANOUT_NATS_TLS_KEY",
                certs.join("client.key").display().to_string(),
            ),
            ("FANOUT_NODE_ID", node.to_string()),
            ("FANOUT_LISTEN", "127.0.0.1:0".to_string()),
            ("FANOUT_DRAIN_WINDOW_MS", "0".to_string()),
        ]
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tier_runs_over_tls_with_least_privilege_users() {
    let nats = SecureNats::start();
    let api = Process::start("fanout-api", &nats.env("fanout-api", API_PASSWORD, "api-1"));
    let ws = Process::start("fanout-ws", &nats.env("fanout-ws", WS_PASSWORD, "ws-1"));
    wait_ready_for(&api.server(), WAIT).await;
    wait_ready_for(&ws.server(), WAIT).await;

    let mut alice = Client::connect(&ws.server()).await;
    let reply = alice
        .request(json!({"op": "subscribe", "channel": "room", "presence": true, "id": 1}))
        .await;
    assert_eq!(reply["op"], "subscribed", "{reply}");
    let seq = publish(&api.server(), "room", &json!({"hello": "tls"})).await;
    let event = within("the event", alice.event()).await;
    assert_eq!(event["seq"], seq);
    // A repeat (a direct get by the API), a client publish, volatile publishes, a presence
    // query through the API, a resume (a stream read by the ws node): every path the
    // permissions allow.
    let url = api.server().url("/v1/channels/room/events");
    let http = reqwest::Client::new();
    for _ in 0..2 {
        let answer = http
            .post(&url)
            .header("Idempotency-Key", "k1")
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 202);
    }
    let reply = alice
        .request(json!({"op": "publish", "channel": "room", "data": {"from": "alice"}, "id": 2}))
        .await;
    assert_eq!(reply["op"], "published", "{reply}");
    // Volatile events, from the API and from a client: straight to the nodes' subjects.
    let (status, answer) =
        common::post_raw(&api.server(), "/v1/channels/room/volatile", "{}").await;
    assert_eq!(status, 202, "{answer}");
    let reply = alice
        .request(json!({"op": "publish", "channel": "room", "data": 1, "volatile": true, "id": 3}))
        .await;
    assert_eq!(reply["volatile"], true, "{reply}");
    // (Partial until the API has heard every node announce itself.)
    common::eventually("a complete presence answer through the API", || async {
        let presence: serde_json::Value = http
            .get(api.server().url("/v1/channels/room/presence"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        presence["partial"] == false && presence["members"].as_array().map(Vec::len) == Some(1)
    })
    .await;
    let mut bob = Client::connect(&ws.server()).await;
    let reply = bob
        .request(
            json!({"op": "subscribe", "channel": "room", "since": 0, "id": 1,
                        "epoch": bob.welcome["epoch"].clone()}),
        )
        .await;
    assert_eq!(reply["recovered"], true, "{reply}");
    assert!(reply["replayed"].as_u64().unwrap() >= 3, "{reply}");
    // Server-side control: a command to the nodes, a rule in the bucket (a block the node
    // follows and enforces), history read and removed.
    use crate::control::call;
    let (status, answer) = call(
        &api.server(),
        "POST",
        "/v1/users/blocked-one/block",
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let url = format!("{}?user=blocked-one", ws.server().ws_url());
    common::eventually("the node to refuse a blocked user", || async {
        tokio_tungstenite::connect_async(url.as_str())
            .await
            .is_err()
    })
    .await;
    let (_, listed) = call(&api.server(), "GET", "/v1/users/anyone/connections", None).await;
    assert_eq!(listed["partial"], false, "{listed}");
    let (status, page) = call(&api.server(), "GET", "/v1/channels/room/history", None).await;
    assert_eq!(status, 200, "{page}");
    assert!(page["events"].as_array().unwrap().len() >= 3, "{page}");
    let (status, answer) = call(&api.server(), "DELETE", "/v1/channels/room/history", None).await;
    assert_eq!(status, 200, "{answer}");
    let log = nats.log();
    assert!(
        !log.contains("Violation"),
        "a documented permission is missing:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_webhooks_run_with_least_privilege_users() {
    use axum::{Router, extract::State, routing::post};
    use std::sync::{Arc, Mutex};
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    async fn take(State(seen): State<Arc<Mutex<Vec<String>>>>, body: String) -> &'static str {
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        for event in body["events"].as_array().unwrap() {
            seen.lock()
                .unwrap()
                .push(event["name"].as_str().unwrap().to_string());
        }
        "ok"
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hooks", listener.local_addr().unwrap());
    let app = Router::new()
        .route("/hooks", post(take))
        .with_state(seen.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let nats = SecureNats::start();
    let with_hooks = |mut env: Vec<(&'static str, String)>| {
        env.push(("FANOUT_WEBHOOK_URL", url.clone()));
        env.push(("FANOUT_WEBHOOK_DEBOUNCE_MS", "0".to_string()));
        env.push(("FANOUT_WEBHOOK_BATCH_MS", "50".to_string()));
        env
    };
    let api = Process::start(
        "fanout-api",
        &with_hooks(nats.env("fanout-api", API_PASSWORD, "api-1")),
    );
    let ws = Process::start(
        "fanout-ws",
        &with_hooks(nats.env("fanout-ws", WS_PASSWORD, "ws-1")),
    );
    wait_ready_for(&api.server(), WAIT).await;
    wait_ready_for(&ws.server(), WAIT).await;
    let mut alice = Client::connect_url(&format!("{}?user=alice", ws.server().ws_url())).await;
    alice.subscribe("room").await;
    let names = |seen: &Arc<Mutex<Vec<String>>>| seen.lock().unwrap().clone();
    common::eventually("occupied and added", || async { names(&seen).len() >= 2 }).await;
    drop(alice);
    common::eventually("removed and vacated", || async { names(&seen).len() >= 4 }).await;
    assert_eq!(
        names(&seen),
        [
            "channel_occupied",
            "member_added",
            "member_removed",
            "channel_vacated"
        ]
    );
    let log = nats.log();
    assert!(
        !log.contains("Violation"),
        "a documented permission is missing:\n{log}"
    );
}

/// Starts `binary` with `env` and returns its exit code and everything it wrote (it must
/// exit within [`WAIT`]; it is killed otherwise).
async fn refused(binary: &str, env: &[(&str, String)]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.log");
    let mut child = Command::new(common::binary(binary))
        .env_clear()
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(dir.path().join("err.log")).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let text = std::fs::read_to_string(dir.path().join("err.log")).unwrap_or_default()
        + &std::fs::read_to_string(&out).unwrap_or_default();
    (code, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_or_certificates_stop_start_up_with_a_clear_message() {
    let nats = SecureNats::start();
    // A wrong password.
    let (code, text) = refused(
        "fanout-ws",
        &nats.env("fanout-ws", "not-the-password", "ws-x"),
    )
    .await;
    assert!(code.is_some_and(|c| c != 0), "{code:?} {text}");
    assert!(text.contains("authorization violation"), "{text}");
    assert!(
        !text.contains("not-the-password"),
        "the secret is printed: {text}"
    );

    // A CA that did not sign the server's certificate.
    let other = tempfile::tempdir().unwrap();
    let other_certs = certs(other.path());
    let mut env = nats.env("fanout-api", API_PASSWORD, "api-x");
    env.retain(|(k, _)| *k != "FANOUT_NATS_TLS_CA");
    env.push((
        "FANOUT_NATS_TLS_CA",
        other_certs.join("ca.pem").display().to_string(),
    ));
    let (code, text) = refused("fanout-api", &env).await;
    assert!(code.is_some_and(|c| c != 0), "{code:?} {text}");
    assert!(text.contains("FANOUT_NATS_TLS_CA"), "{text}");
    assert!(
        !text.contains(API_PASSWORD),
        "the secret is printed: {text}"
    );

    // A file that is not a certificate.
    let mut env = nats.env("fanout-api", API_PASSWORD, "api-y");
    env.retain(|(k, _)| *k != "FANOUT_NATS_TLS_CA");
    env.push(("FANOUT_NATS_TLS_CA", "/etc/hostname".to_string()));
    let (code, text) = refused("fanout-api", &env).await;
    assert!(code.is_some_and(|c| c != 0), "{code:?} {text}");
    assert!(text.contains("not a PEM file"), "{text}");
}
