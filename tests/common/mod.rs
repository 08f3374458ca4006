//! Shared test helpers: a real nats-server on dynamic ports, the API and ws nodes started
//! in-process on `127.0.0.1:0`, and a small WebSocket client.
//!
//! Every wait is bounded by [`WAIT`]; nothing sleeps to "let things settle".

#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tempfile::TempDir;
use tokio::{net::TcpStream, task::JoinHandle};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, tungstenite::Message};
use tokio_util::sync::CancellationToken;

/// Upper bound for any single wait in a test.
pub const WAIT: Duration = Duration::from_secs(15);

/// Runs `fut` under [`WAIT`], failing the test with `what` if it takes longer.
pub async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {WAIT:?} waiting for {what}"))
}

/// Polls `check` until it returns true, failing after [`WAIT`].
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    within(what, async {
        while !check().await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// The workspace root (this package's manifest directory).
pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// nats-server: `$NATS_SERVER_BIN`, else `.tools/bin/nats-server` (what `make test`
/// installs), else `nats-server` on PATH.
pub fn nats_server_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("NATS_SERVER_BIN") {
        return bin.into();
    }
    let local = workspace().join(".tools/bin/nats-server");
    if local.exists() {
        return local;
    }
    PathBuf::from("nats-server")
}

/// A nats-server with JetStream, on dynamic ports, with its own temp directory. Killed on drop.
pub struct NatsServer {
    child: Option<Child>,
    dir: TempDir,
    pub port: u16,
    pub monitor_port: u16,
}

impl NatsServer {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut server = NatsServer {
            child: None,
            dir,
            port: 0,
            monitor_port: 0,
        };
        server.spawn("-1", "-1");
        server
    }

    fn spawn(&mut self, port: &str, monitor: &str) {
        let ports_dir = self.dir.path().join("ports");
        let _ = std::fs::remove_dir_all(&ports_dir);
        std::fs::create_dir_all(&ports_dir).unwrap();
        let log = std::fs::File::create(self.dir.path().join("nats.log")).unwrap();
        let child = Command::new(nats_server_bin())
            .args(["-a", "127.0.0.1", "-p", port, "-m", monitor, "-js", "-sd"])
            .arg(self.dir.path().join("js"))
            .arg("--ports_file_dir")
            .arg(&ports_dir)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {}: {e}; run `make test` (it installs nats-server) or set NATS_SERVER_BIN",
                    nats_server_bin().display()
                )
            });
        self.child = Some(child);
        let ports = wait_for_ports_file(&ports_dir);
        self.port = port_of(&ports["nats"][0]);
        self.monitor_port = port_of(&ports["monitoring"][0]);
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn monitor_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.monitor_port)
    }

    /// Kills the server (SIGKILL) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same ports with the same storage.
    pub fn restart(&mut self) {
        self.stop();
        let (port, monitor) = (self.port.to_string(), self.monitor_port.to_string());
        self.spawn(&port, &monitor);
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn wait_for_ports_file(dir: &Path) -> Value {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if let Some(entry) = std::fs::read_dir(dir).unwrap().flatten().next()
            && let Ok(text) = std::fs::read_to_string(entry.path())
            && let Ok(value) = serde_json::from_str::<Value>(&text)
        {
            return value;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "nats-server did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn port_of(url: &Value) -> u16 {
    url.as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// A server started in-process; cancelled on drop.
pub struct Server {
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    handle: Option<JoinHandle<()>>,
}

impl Server {
    /// A server this test did not start in-process (a child process, say).
    pub fn external(addr: SocketAddr) -> Self {
        Server {
            addr,
            shutdown: CancellationToken::new(),
            handle: None,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// Cancels the server and waits for `run` to return.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(handle) = self.handle.take() {
            within("the server to stop", handle).await.unwrap();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub fn common(nats: &NatsServer, node_id: &str) -> fanout::Common {
    fanout::Common {
        nats_url: nats.url(),
        node_id: node_id.into(),
        // Tests restart NATS and need no more than a few events of history.
        history_max_age_secs: 60,
        publish_timeout_ms: 2000,
        ..fanout::Common::default()
    }
}

/// Server logs only when asked for (`RUST_LOG=debug cargo test ...`): the test harness
/// cannot capture output from the servers' tasks.
fn logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        fanout::telemetry::init_logging();
    }
}

/// Runs a server's `run` on a fresh `127.0.0.1:0` listener and waits until `/readyz` says
/// ready.
async fn spawn_server<Fut, E>(
    run: impl FnOnce(tokio::net::TcpListener, CancellationToken) -> Fut,
) -> Server
where
    Fut: std::future::Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Debug,
{
    logs();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let serving = run(listener, shutdown.clone());
    let handle = tokio::spawn(async move { serving.await.unwrap() });
    let server = Server {
        addr,
        shutdown,
        handle: Some(handle),
    };
    wait_ready(&server).await;
    server
}

/// Starts `fanout-api` against `nats`.
pub async fn start_api(nats: &NatsServer) -> Server {
    start_api_with(nats, |_| {}).await
}

/// Starts `fanout-api` against `nats`; `tweak` adjusts its settings first.
pub async fn start_api_with(
    nats: &NatsServer,
    tweak: impl FnOnce(&mut fanout_api::Config),
) -> Server {
    let mut config = fanout_api::Config {
        common: common(nats, "api-1"),
        listen: "127.0.0.1:0".into(),
        ..fanout_api::Config::default()
    };
    tweak(&mut config);
    spawn_server(|listener, token| fanout_api::run(config, listener, token)).await
}

/// Starts a `fanout-ws` node against `nats`; `tweak` adjusts its settings first.
pub async fn start_ws(
    nats: &NatsServer,
    node_id: &str,
    tweak: impl FnOnce(&mut fanout_ws::Config),
) -> Server {
    let mut config = fanout_ws::Config {
        common: common(nats, node_id),
        listen: "127.0.0.1:0".into(),
        ..fanout_ws::Config::default()
    };
    tweak(&mut config);
    spawn_server(|listener, token| fanout_ws::run(config, listener, token)).await
}

/// The usual topology: one nats-server, one API, and ws nodes `ws-1` … `ws-N`.
pub struct Tier {
    pub nats: NatsServer,
    pub api: Server,
    pub nodes: Vec<Server>,
}

impl Tier {
    pub async fn start(nodes: usize) -> Tier {
        let nats = NatsServer::start();
        let api = start_api(&nats).await;
        let mut servers = Vec::new();
        for i in 1..=nodes {
            servers.push(start_ws(&nats, &format!("ws-{i}"), |_| {}).await);
        }
        Tier {
            nats,
            api,
            nodes: servers,
        }
    }

    /// A client connected to node `i` (0-based).
    pub async fn client(&self, i: usize) -> Client {
        Client::connect(&self.nodes[i]).await
    }
}

pub async fn wait_ready(server: &Server) {
    let url = server.url("/readyz");
    eventually(&format!("{url} to answer 200"), || async {
        matches!(reqwest::get(&url).await, Ok(r) if r.status() == 200)
    })
    .await;
}

/// POSTs `body` (raw bytes) to `path` and returns status and JSON answer.
pub async fn post_raw(server: &Server, path: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(server.url(path))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("answer to POST {path} is not JSON ({e}): {text:?}"));
    (status, value)
}

/// Publishes `data` to `channel` and returns the accepted `seq`.
pub async fn publish(api: &Server, channel: &str, data: &Value) -> u64 {
    let (status, body) = post_raw(
        api,
        &format!("/v1/channels/{channel}/events"),
        data.to_string(),
    )
    .await;
    assert_eq!(status, 202, "publish to {channel}: {body}");
    body["seq"].as_u64().unwrap()
}

pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A WebSocket client that speaks fanout's JSON protocol.
pub struct Client {
    pub socket: Socket,
    pub welcome: Value,
}

/// How the server ended a connection, as a client sees it.
#[derive(Debug, PartialEq)]
pub enum Closed {
    Code(u16, String),
    /// The TCP connection ended without a close frame.
    Reset,
}

impl Client {
    pub async fn connect(server: &Server) -> Client {
        Self::connect_url(&server.ws_url()).await
    }

    pub async fn connect_url(url: &str) -> Client {
        let (socket, _) = within(
            "the WebSocket handshake",
            tokio_tungstenite::connect_async(url),
        )
        .await
        .unwrap();
        let mut client = Client {
            socket,
            welcome: Value::Null,
        };
        client.welcome = client.recv().await;
        assert_eq!(client.welcome["op"], "welcome", "{}", client.welcome);
        client
    }

    pub async fn send(&mut self, value: Value) {
        self.socket
            .send(Message::Text(value.to_string().into()))
            .await
            .unwrap();
    }

    /// The next JSON frame (pings and pongs are skipped). Panics on close.
    pub async fn recv(&mut self) -> Value {
        within("a frame", async {
            loop {
                match self.socket.next().await {
                    Some(Ok(Message::Text(text))) => return serde_json::from_str(&text).unwrap(),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    other => panic!("expected a text frame, got {other:?}"),
                }
            }
        })
        .await
    }

    /// Sends `request` and returns the next frame (the reply, unless an event comes first).
    pub async fn request(&mut self, request: Value) -> Value {
        self.send(request).await;
        self.recv().await
    }

    pub async fn subscribe(&mut self, channel: &str) {
        let reply = self
            .request(serde_json::json!({"op": "subscribe", "channel": channel}))
            .await;
        assert_eq!(reply["op"], "subscribed", "{reply}");
        assert_eq!(reply["channel"], channel);
    }

    /// The next `event` frame; fails on any other frame.
    pub async fn event(&mut self) -> Value {
        let frame = self.recv().await;
        assert_eq!(frame["op"], "event", "{frame}");
        frame
    }

    /// Reads until the server closes the connection; other frames are dropped.
    pub async fn closed(&mut self) -> Closed {
        within("the connection to close", async {
            loop {
                match self.socket.next().await {
                    Some(Ok(Message::Close(Some(frame)))) => {
                        return Closed::Code(frame.code.into(), frame.reason.to_string());
                    }
                    Some(Ok(Message::Close(None))) => return Closed::Code(1005, String::new()),
                    Some(Ok(_)) => continue,
                    Some(Err(_)) | None => return Closed::Reset,
                }
            }
        })
        .await
    }
}

/// The NATS subjects a ws node's connection holds, read from the server's `/connz?subs=1`.
pub async fn node_subjects(nats: &NatsServer, node_id: &str) -> Vec<String> {
    let connz: Value = reqwest::get(nats.monitor_url("/connz?subs=1"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    connz["connections"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["name"] == node_id)
        .flat_map(|c| {
            c["subscriptions_list"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|s| s.as_str().map(String::from))
        .collect()
}

/// Where `cargo build` put the workspace's binaries (next to this test's `deps/` folder).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (`make test` does)",
        path.display()
    );
    path
}

/// A server binary running as a child process; killed on drop if still running.
pub struct Process {
    pub child: Child,
    pub addr: String,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Process {
    /// Starts `name` with `env`, and reads its log until it says where it listens
    /// (text `addr=…` or JSON `"addr":"…"`).
    pub fn start(name: &str, env: &[(&str, String)]) -> Process {
        let mut child = Command::new(binary(name))
            .env_clear()
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let addr = loop {
            let line = lines
                .next()
                .unwrap_or_else(|| panic!("{name} exited before listening"))
                .unwrap();
            log.lock().unwrap().push(line.clone());
            if !line.contains("listening") {
                continue;
            }
            let text = line
                .split("addr=")
                .nth(1)
                .and_then(|a| a.split_whitespace().next());
            let json = line
                .split("\"addr\":\"")
                .nth(1)
                .and_then(|a| a.split('"').next());
            if let Some(addr) = text.or(json) {
                break addr.to_string();
            }
        };
        // Keep reading so the child never blocks on a full pipe; keep the lines for tests.
        let keep = log.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                keep.lock().unwrap().push(line);
            }
        });
        Process { child, addr, log }
    }

    /// Every log line so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    pub fn server(&self) -> Server {
        Server::external(self.addr.parse().unwrap())
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub async fn exit_code(&mut self) -> i32 {
        within("the process to exit", async {
            loop {
                if let Some(status) = self.child.try_wait().unwrap() {
                    return status.code().unwrap_or(-1);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
