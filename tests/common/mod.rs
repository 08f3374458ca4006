//! Shared test helpers: a real nats-server on dynamic ports, the API and ws nodes started
//! in-process on `127.0.0.1:0`, and a small WebSocket client.
//!
//! Every wait is bounded by [`WAIT`]; nothing sleeps to "let things settle".

#![allow(dead_code)]

pub mod browser;
pub mod docker;
pub mod geo;
pub mod http;
#[allow(unused_imports)]
pub use fanout_testkit::{
    NatsCluster, NatsServer, Process, WAIT, binary, eventually, eventually_within,
    nats::nats_server_bin, process::workspace, raw, within,
};
#[allow(unused_imports)]
pub use http::*;

use std::{net::SocketAddr, path::PathBuf, process::Command, time::Duration};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::{net::TcpStream, task::JoinHandle};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, tungstenite::Message};
use tokio_util::sync::CancellationToken;

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
    common_at(&nats.url(), node_id)
}

/// Test settings for a process that reaches NATS at `nats_url` (comma-separated servers).
pub fn common_at(nats_url: &str, node_id: &str) -> fanout::Common {
    fanout::Common {
        nats_url: nats_url.into(),
        node_id: node_id.into(),
        // Tests restart NATS and need no more than a few events of history.
        history_max_age_secs: 60,
        publish_timeout_ms: 2000,
        ..fanout::Common::default()
    }
}

/// The environment of a `fanout-ws` child process reaching NATS at `nats_url`: the same
/// stream settings as the in-process servers ([`common_at`]), draining over `drain_ms`.
pub fn ws_process_env(nats_url: &str, node: &str, drain_ms: u64) -> Vec<(&'static str, String)> {
    vec![
        ("FANOUT_NATS_URL", nats_url.to_string()),
        ("FANOUT_NODE_ID", node.to_string()),
        ("FANOUT_LISTEN", "127.0.0.1:0".to_string()),
        ("FANOUT_HISTORY_MAX_AGE_SECS", "60".to_string()),
        ("FANOUT_PUBLISH_TIMEOUT_MS", "2000".to_string()),
        ("FANOUT_DRAIN_WINDOW_MS", drain_ms.to_string()),
    ]
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
    bound: Duration,
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
    wait_ready_for(&server, bound).await;
    server
}

/// Starts `fanout-api` with exactly `config`; waits at most `bound` for it to be ready.
pub async fn spawn_api(config: fanout_api::Config, bound: Duration) -> Server {
    spawn_server(bound, |listener, token| {
        fanout_api::run(config, listener, token)
    })
    .await
}

/// Starts `fanout-ws` with exactly `config`; waits at most `bound` for it to be ready.
pub async fn spawn_ws(config: fanout_ws::Config, bound: Duration) -> Server {
    spawn_server(bound, |listener, token| {
        fanout_ws::run(config, listener, token)
    })
    .await
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
    spawn_server(WAIT, |listener, token| {
        fanout_api::run(config, listener, token)
    })
    .await
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
    spawn_server(WAIT, |listener, token| {
        fanout_ws::run(config, listener, token)
    })
    .await
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

/// The value of the metric sample `series` (a name, with its labels if it has any:
/// `fanout_ws_replayed_events_total{from="memory"}`) in a server's `/metrics`; `None` when
/// it is not there (a counter never incremented).
pub async fn metric(server: &Server, series: &str) -> Option<f64> {
    let text = reqwest::get(server.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let prefix = format!("{series} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .map(|v| v.trim().parse().unwrap())
}

pub async fn wait_ready(server: &Server) {
    wait_ready_for(server, WAIT).await;
}

/// [`wait_ready`] with a longer bound, for what legitimately takes long on a loaded machine
/// (a NATS cluster electing its JetStream leaders).
pub async fn wait_ready_for(server: &Server, bound: Duration) {
    fanout_testkit::http::wait_ready(&server.addr.to_string(), bound).await
}

/// Makes a throwaway CA and certificates for `name` (scripts/certs.sh) in `dir`.
pub fn test_certs(dir: &std::path::Path, name: &str) {
    let status = std::process::Command::new("bash")
        .arg(workspace().join("scripts/certs.sh"))
        .arg(dir)
        .arg(name)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "scripts/certs.sh failed");
}

/// GETs `path` and returns status and JSON answer.
pub async fn get_json(server: &Server, path: &str) -> (u16, Value) {
    let response = reqwest::get(server.url(path)).await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("answer to GET {path} is not JSON ({e}): {text:?}"));
    (status, value)
}

/// POSTs `body` (raw bytes) to `path` and returns status and JSON answer.
pub async fn post_raw(server: &Server, path: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
    post_typed(server, path, "application/json", body).await
}

/// POSTs `body` as `application/octet-stream` (bytes to publish) to `path`: status and answer.
pub async fn post_bytes(
    server: &Server,
    path: &str,
    body: impl Into<reqwest::Body>,
) -> (u16, Value) {
    post_typed(server, path, "application/octet-stream", body).await
}

async fn post_typed(
    server: &Server,
    path: &str,
    content_type: &str,
    body: impl Into<reqwest::Body>,
) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(server.url(path))
        .header("content-type", content_type)
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
    publish_json(api, channel, data).await["seq"]
        .as_u64()
        .unwrap()
}

/// Publishes `data` to `channel` and returns the API's whole `202` answer.
pub async fn publish_json(api: &Server, channel: &str, data: &Value) -> Value {
    let (status, body) = post_raw(
        api,
        &format!("/v1/channels/{channel}/events"),
        data.to_string(),
    )
    .await;
    assert_eq!(status, 202, "publish to {channel}: {body}");
    body
}

pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Tries a WebSocket upgrade that must be refused: the HTTP status and JSON body.
pub async fn refused(
    request: impl tokio_tungstenite::tungstenite::client::IntoClientRequest + Unpin,
) -> (u16, Value) {
    match within("a refusal", tokio_tungstenite::connect_async(request)).await {
        Ok(_) => panic!("the upgrade was accepted"),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let status = response.status().as_u16();
            let body = response.body().clone().unwrap_or_default();
            (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
        }
        Err(other) => panic!("expected an HTTP refusal, got {other}"),
    }
}

/// A WebSocket client that speaks fanout's JSON protocol.
///
/// The protocol orders the events of one channel, and puts `subscribed` before the frames of
/// its channel; it does not order a reply against other frames (docs/protocol.md,
/// "Ordering"). So [`Client::request`] finds its reply by id and keeps what it reads past;
/// every other read takes the kept frames first, in the order they came.
pub struct Client {
    pub socket: Socket,
    pub welcome: Value,
    /// Frames read past while waiting for a reply, oldest first.
    kept: std::collections::VecDeque<Value>,
}

/// How the server ended a connection, as a client sees it.
#[derive(Debug, PartialEq)]
pub enum Closed {
    Code(u16, String),
    /// The TCP connection ended without a close frame.
    Reset,
}

impl Closed {
    /// A close the server decided, whose reason is JSON (`{"reason", "reconnect_after_ms",
    /// "nodes"?, "regions"?}`): as the code and the reason's text, once checked that it
    /// says when to come back (within a minute).
    pub fn said(self) -> Closed {
        self.directed().0
    }

    /// [`Closed::said`], and the whole JSON reason.
    pub fn directed(self) -> (Closed, Value) {
        let Closed::Code(code, reason) = self else {
            panic!("closed without a code: {self:?}");
        };
        let said: Value = serde_json::from_str(&reason)
            .unwrap_or_else(|e| panic!("{code}'s reason is not JSON ({e}): {reason:?}"));
        let after = said["reconnect_after_ms"].as_u64();
        assert!(after.is_some_and(|ms| ms < 60_000), "{said}");
        let text = said["reason"].as_str().unwrap_or_default().to_string();
        (Closed::Code(code, text), said)
    }
}

/// Frames the server sends on its own (events and presence changes), as opposed to replies.
pub fn is_push(frame: &Value) -> bool {
    matches!(
        frame["op"].as_str(),
        Some("event" | "join" | "leave" | "update")
    )
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
        Self::from_socket(socket).await
    }

    /// A client over a socket already open (a handshake with headers of the test's own),
    /// once it has read `welcome`.
    pub async fn from_socket(socket: Socket) -> Client {
        let mut client = Client {
            socket,
            welcome: Value::Null,
            kept: Default::default(),
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

    /// The next JSON frame from the socket, skipping WebSocket pings and pongs. Panics on
    /// close.
    async fn read(&mut self) -> Value {
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

    /// The next JSON frame: a kept one first, else from the socket (WebSocket pings and
    /// pongs are skipped). Panics on close.
    pub async fn recv(&mut self) -> Value {
        match self.kept.pop_front() {
            Some(frame) => frame,
            None => self.read().await,
        }
    }

    /// Sends `request` and returns its reply: the first frame that is not a push
    /// ([`is_push`]) and, when the request has an `id`, carries that `id`. Every other frame
    /// read meanwhile is kept for the next reads, in order.
    pub async fn request(&mut self, request: Value) -> Value {
        let id = request.get("id").cloned();
        let is_reply =
            |frame: &Value| !is_push(frame) && id.as_ref().is_none_or(|id| &frame["id"] == id);
        self.send(request).await;
        if let Some(i) = self.kept.iter().position(is_reply) {
            return self.kept.remove(i).unwrap();
        }
        loop {
            let frame = self.read().await;
            if is_reply(&frame) {
                return frame;
            }
            self.kept.push_back(frame);
        }
    }

    pub async fn subscribe(&mut self, channel: &str) {
        let reply = self
            .request(serde_json::json!({"op": "subscribe", "channel": channel}))
            .await;
        assert_eq!(reply["op"], "subscribed", "{reply}");
        assert_eq!(reply["channel"], channel);
    }

    /// The next frame ([`Client::recv`]), which must be an `event`.
    pub async fn event(&mut self) -> Value {
        let frame = self.recv().await;
        assert_eq!(frame["op"], "event", "{frame}");
        frame
    }

    /// Reads until the server closes the connection; every other frame (kept ones included)
    /// is dropped.
    pub async fn closed(&mut self) -> Closed {
        self.kept.clear();
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

/// What tests ask of a [`Process`] beyond the test kit's.
pub trait ProcessExt {
    /// The process as a [`Server`] (its address).
    fn server(&self) -> Server;
}

impl ProcessExt for Process {
    fn server(&self) -> Server {
        Server::external(self.addr.parse().unwrap())
    }
}

/// A client that resumes, as `clients/js/fanout.js` does: on any disconnect it moves to the next URL
/// and subscribes with `since` = the last seq it received (0 before the first: the test
/// channels are fresh). It records every delivery as it arrives, duplicates included.
pub struct Resumer {
    handle: JoinHandle<Received>,
    stop: tokio::sync::watch::Sender<bool>,
    pub count: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// `subscribed` replies so far: 1 after the first subscribe, +1 per resume.
    pub subscribed: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// What a [`Resumer`] saw.
#[derive(Debug, Default)]
pub struct Received {
    pub seqs: Vec<u64>,
    pub reconnects: usize,
    pub not_recovered: usize,
    pub close_codes: Vec<u16>,
}

/// Options of a [`Resumer`].
#[derive(Debug, Clone, Default)]
pub struct ResumerOptions {
    /// Stop reading once, after this many events, until the gate opens (bounded by [`WAIT`]):
    /// to become a slow consumer until the node has cut it off.
    pub stall: Option<(usize, tokio::sync::watch::Receiver<bool>)>,
    /// Disconnect after this many events and stay away this long before resuming.
    pub offline: Option<(usize, Duration)>,
    /// How it reaches the nodes.
    pub transport: Transport,
}

impl ResumerOptions {
    /// What a client does after its `n`th event: stall once at the gate (see `stall`), and
    /// say how long to stay away when it is time to go offline (see `offline`).
    async fn after_event(&mut self, n: usize) -> Option<Duration> {
        if let Some((after, gate)) = &self.stall
            && n >= *after
        {
            let mut gate = gate.clone();
            self.stall = None;
            let _ = tokio::time::timeout(WAIT, gate.wait_for(|open| *open)).await;
        }
        match self.offline {
            Some((after, away)) if n >= after => {
                self.offline = None;
                Some(away)
            }
            _ => None,
        }
    }
}

/// The transports a client can take.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Transport {
    /// `GET /ws`, resuming with `subscribe` + `since`, as `clients/js/fanout.js` does.
    #[default]
    WebSocket,
    /// `GET /sse`, resuming with `Last-Event-ID`, as `EventSource` does.
    Sse,
    /// `GET /poll` with the last answer's cursor, every poll to the next node.
    Poll,
}

impl Transport {
    pub const ALL: [Transport; 3] = [Transport::WebSocket, Transport::Sse, Transport::Poll];
}

impl Resumer {
    /// Connects to `urls[first]` (then the next ones on each reconnect) and subscribes.
    /// Returns once subscribed.
    pub async fn start(
        urls: Vec<String>,
        first: usize,
        channel: &str,
        options: ResumerOptions,
    ) -> Resumer {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let subscribed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let handle = tokio::spawn(resume_loop(
            urls,
            first,
            channel.to_string(),
            options,
            stopped,
            (count.clone(), subscribed.clone()),
            ready_tx,
        ));
        within("the resuming client to subscribe", ready_rx)
            .await
            .unwrap();
        Resumer {
            handle,
            stop,
            count,
            subscribed,
        }
    }

    pub fn received(&self) -> usize {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub async fn stop(self) -> Received {
        let _ = self.stop.send(true);
        within("the resuming client to stop", self.handle)
            .await
            .unwrap()
    }
}

type Counters = (
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
);

async fn resume_loop(
    urls: Vec<String>,
    first: usize,
    channel: String,
    options: ResumerOptions,
    stopped: tokio::sync::watch::Receiver<bool>,
    counters: Counters,
    ready: tokio::sync::oneshot::Sender<()>,
) -> Received {
    match options.transport {
        Transport::WebSocket => {
            ws_resume_loop(urls, first, channel, options, stopped, counters, ready).await
        }
        Transport::Sse => {
            sse_resume_loop(urls, first, channel, options, stopped, counters, ready).await
        }
        Transport::Poll => {
            poll_resume_loop(urls, first, channel, options, stopped, counters, ready).await
        }
    }
}

/// The node at `url` (`ws://host:port/ws`), as a server to make HTTP requests to.
fn node_of(url: &str) -> Server {
    let addr = url
        .trim_start_matches("ws://")
        .trim_end_matches("/ws")
        .parse()
        .unwrap();
    Server::external(addr)
}

/// An SSE client that resumes as `EventSource` does, with `Last-Event-ID`, on the next node
/// each time.
async fn sse_resume_loop(
    urls: Vec<String>,
    first: usize,
    channel: String,
    mut options: ResumerOptions,
    mut stopped: tokio::sync::watch::Receiver<bool>,
    (count, subscribed): Counters,
    ready: tokio::sync::oneshot::Sender<()>,
) -> Received {
    use std::sync::atomic::Ordering::{Relaxed, SeqCst};
    let mut ready = Some(ready);
    let mut received = Received::default();
    let mut last_id: Option<String> = None;
    let mut attempt = first;
    'connect: loop {
        if *stopped.borrow() {
            break;
        }
        let node = node_of(&urls[attempt % urls.len()]);
        attempt += 1;
        let query = format!("channel={}", http::escape(&channel));
        let opened = tokio::time::timeout(
            Duration::from_secs(3),
            SseClient::connect(&node, &query, last_id.as_deref()),
        )
        .await;
        let Ok(Ok(mut stream)) = opened else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        // Its channels are joined once `welcome` is out: from then on nothing is missed.
        subscribed.fetch_add(1, SeqCst);
        if let Some(ready) = ready.take() {
            let _ = ready.send(());
        }
        loop {
            let event = tokio::select! {
                event = stream.next() => event,
                _ = stopped.changed() => break 'connect,
            };
            let Some(event) = event else { break };
            // As `EventSource`: the last id seen, heartbeats' included.
            if let Some(id) = &stream.last_id {
                last_id = Some(id.clone());
            }
            match event.event.as_str() {
                "resumed"
                    if event.data["recovered"] == false
                        && event.data["channel"] == channel.as_str() =>
                {
                    received.not_recovered += 1
                }
                "disconnect" => {
                    received
                        .close_codes
                        .push(event.data["code"].as_u64().unwrap() as u16);
                }
                "event" if event.data["channel"] == channel.as_str() => {
                    received.seqs.push(event.data["seq"].as_u64().unwrap());
                    let n = count.fetch_add(1, Relaxed) + 1;
                    if let Some(away) = options.after_event(n).await {
                        drop(stream);
                        tokio::time::sleep(away).await;
                        received.reconnects += 1;
                        continue 'connect;
                    }
                }
                _ => {}
            }
        }
        received.reconnects += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    received
}

/// A long-polling client: each poll to the next node, with the last answer's cursor.
async fn poll_resume_loop(
    urls: Vec<String>,
    first: usize,
    channel: String,
    mut options: ResumerOptions,
    stopped: tokio::sync::watch::Receiver<bool>,
    (count, subscribed): Counters,
    ready: tokio::sync::oneshot::Sender<()>,
) -> Received {
    use std::sync::atomic::Ordering::{Relaxed, SeqCst};
    let mut ready = Some(ready);
    let mut received = Received::default();
    let mut cursor: Option<String> = None;
    let mut attempt = first;
    let http = reqwest::Client::new();
    while !*stopped.borrow() {
        let node = node_of(&urls[attempt % urls.len()]);
        attempt += 1;
        let mut query = format!("channel={}&timeout=1", http::escape(&channel));
        if let Some(cursor) = &cursor {
            query.push_str(&format!("&cursor={cursor}"));
        }
        let answer = http
            .get(node.url(&format!("/poll?{query}")))
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        let answer: Value = match answer {
            Ok(response) if response.status() == 200 => match response.json().await {
                Ok(answer) => answer,
                Err(_) => continue,
            },
            _ => {
                received.reconnects += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        cursor = answer["cursor"].as_str().map(String::from);
        for resumed in answer["resumed"].as_array().into_iter().flatten() {
            if resumed["recovered"] == false && resumed["channel"] == channel.as_str() {
                received.not_recovered += 1;
            }
        }
        if cursor.is_some() {
            subscribed.fetch_add(1, SeqCst);
            if let Some(ready) = ready.take() {
                let _ = ready.send(());
            }
        }
        for event in answer["events"].as_array().into_iter().flatten() {
            if event["channel"] != channel.as_str() {
                continue;
            }
            received.seqs.push(event["seq"].as_u64().unwrap());
            let n = count.fetch_add(1, Relaxed) + 1;
            if let Some(away) = options.after_event(n).await {
                tokio::time::sleep(away).await;
            }
        }
    }
    received
}

async fn ws_resume_loop(
    urls: Vec<String>,
    first: usize,
    channel: String,
    mut options: ResumerOptions,
    mut stopped: tokio::sync::watch::Receiver<bool>,
    (count, subscribed): Counters,
    ready: tokio::sync::oneshot::Sender<()>,
) -> Received {
    let mut ready = Some(ready);
    let mut received = Received::default();
    let mut epoch: Option<String> = None;
    let mut attempt = first;
    'connect: loop {
        if *stopped.borrow() {
            break;
        }
        let url = &urls[attempt % urls.len()];
        attempt += 1;
        let connected = tokio::time::timeout(
            Duration::from_secs(2),
            tokio_tungstenite::connect_async(url.as_str()),
        )
        .await;
        let Ok(Ok((mut socket, _))) = connected else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let since = received.seqs.iter().copied().max().unwrap_or(0);
        let mut request =
            serde_json::json!({"op": "subscribe", "channel": channel, "since": since});
        if let Some(epoch) = &epoch {
            request["epoch"] = serde_json::json!(epoch);
        }
        if socket
            .send(Message::Text(request.to_string().into()))
            .await
            .is_err()
        {
            continue;
        }
        loop {
            let message = tokio::select! {
                message = socket.next() => message,
                _ = stopped.changed() => break 'connect,
            };
            let text = match message {
                Some(Ok(Message::Text(text))) => text,
                Some(Ok(Message::Close(frame))) => {
                    received
                        .close_codes
                        .push(frame.map_or(1005, |f| f.code.into()));
                    break;
                }
                Some(Ok(_)) => continue,
                _ => break,
            };
            let frame: Value = serde_json::from_str(&text).unwrap();
            match frame["op"].as_str() {
                Some("welcome") => epoch = frame["epoch"].as_str().map(String::from),
                // The node could not replay now (NATS electing a leader): come back and
                // resume again, as fanout.js does.
                Some("error") if frame["ref"] == "subscribe" => {
                    received.close_codes.push(0);
                    break;
                }
                Some("subscribed") => {
                    if frame["recovered"] == false {
                        received.not_recovered += 1;
                    }
                    subscribed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if let Some(ready) = ready.take() {
                        let _ = ready.send(());
                    }
                }
                Some("event") => {
                    received.seqs.push(frame["seq"].as_u64().unwrap());
                    let n = count.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                    if let Some(away) = options.after_event(n).await {
                        drop(socket);
                        tokio::time::sleep(away).await;
                        received.reconnects += 1;
                        continue 'connect;
                    }
                }
                _ => {}
            }
        }
        received.reconnects += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    received
}

/// Publishes `count` events to `channel` at `rate` per second; each event is retried with
/// the same `Idempotency-Key` until the API acknowledges it (an outage gives 503s).
/// Returns the acknowledged sequences, in publish order.
pub fn steady_publisher(
    api: SocketAddr,
    channel: &str,
    rate: u32,
    count: usize,
    pad: usize,
) -> JoinHandle<Vec<u64>> {
    let url = format!("http://{api}/v1/channels/{channel}/events");
    let pad = "x".repeat(pad);
    tokio::spawn(async move {
        let http = reqwest::Client::new();
        let start = tokio::time::Instant::now();
        let mut acked = Vec::with_capacity(count);
        for i in 0..count {
            tokio::time::sleep_until(start + Duration::from_secs(1) * i as u32 / rate).await;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            loop {
                let sent = http
                    .post(&url)
                    .header("Idempotency-Key", format!("event-{i}"))
                    .timeout(Duration::from_secs(3))
                    .body(format!("{{\"i\":{i},\"pad\":\"{pad}\"}}"))
                    .send()
                    .await;
                if let Ok(response) = sent
                    && response.status() == 202
                {
                    let body: Value = response.json().await.unwrap();
                    acked.push(body["seq"].as_u64().unwrap());
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "event {i} never acknowledged"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        acked
    })
}

/// Compares what each client got with what the API acknowledged, prints the totals, and
/// fails on any missing, duplicate or reordered delivery.
pub fn verify(scenario: &str, acked: &[u64], clients: &[Received]) {
    let mut bad = Vec::new();
    println!("{scenario}: acknowledged {}", acked.len());
    for (i, client) in clients.iter().enumerate() {
        let got: std::collections::HashSet<u64> = client.seqs.iter().copied().collect();
        let missing = acked.iter().filter(|s| !got.contains(s)).count();
        let duplicates = client.seqs.len() - got.len();
        let out_of_order = client.seqs.windows(2).filter(|w| w[0] >= w[1]).count();
        let unexpected = got.iter().filter(|s| !acked.contains(s)).count();
        println!(
            "{scenario}: client {i}: delivered {}, missing {missing}, duplicates {duplicates}, out of order {out_of_order}, unexpected {unexpected}, reconnects {}, not recovered {}, close codes {:?}",
            client.seqs.len(),
            client.reconnects,
            client.not_recovered,
            client.close_codes
        );
        if missing + duplicates + out_of_order + unexpected > 0 {
            let lost: Vec<&u64> = acked.iter().filter(|s| !got.contains(s)).take(10).collect();
            println!(
                "{scenario}: client {i}: first missing {lost:?}, got {:?}",
                client.seqs
            );
            bad.push(i);
        }
    }
    assert!(
        bad.is_empty(),
        "{scenario}: clients {bad:?} did not get every event exactly once, in order"
    );
}

/// How long each fault scenario publishes (`FAULT_SECONDS`, default 3; `make soak` sets more).
pub fn fault_seconds() -> u32 {
    std::env::var("FAULT_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
}

/// Runs `command`; panics with its output unless it succeeds. Returns (stdout, stderr).
pub fn succeeds(command: &mut Command) -> (String, String) {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    );
    assert!(
        output.status.success(),
        "{command:?} failed:\n{stdout}\n{stderr}"
    );
    (stdout, stderr)
}

/// A tool of `.tools/venv` (the PyPI checkers; `make test` installs them).
pub fn venv_tool(name: &str) -> PathBuf {
    let path = workspace().join(".tools/venv/bin").join(name);
    assert!(
        path.exists(),
        "{} is missing: `make py-checks` (or `make test`) installs it",
        path.display()
    );
    path
}

/// What `GET /v1/nodes` on `api` answers: `{"nodes": [...], "partial"}`.
pub async fn discovery(api: &Server) -> Value {
    reqwest::get(api.url("/v1/nodes"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// A ws node's WebTransport listener as discovery announces it (`GET /v1/nodes` on `api`):
/// its URL with `{host}` as 127.0.0.1, and its certificate hashes (hex), once announced.
pub async fn webtransport_of(api: &Server, node: &str) -> (String, Vec<String>) {
    within("the node's WebTransport announcement", async {
        loop {
            let info = discovery(api).await["nodes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|n| n["id"] == node)
                .and_then(|n| n.get("webtransport"))
                .cloned();
            if let Some(info) = info {
                let hashes = info["cert_hashes"].as_array().unwrap().iter();
                return (
                    info["url"].as_str().unwrap().replace("{host}", "127.0.0.1"),
                    hashes.map(|h| h.as_str().unwrap().to_string()).collect(),
                );
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await
}
