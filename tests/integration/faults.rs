//! Fault scenarios: clients that resume, over every transport (WebSocket like `clients/js/fanout.js`,
//! SSE like `EventSource`, long-polls with their cursor, each poll to the next node), a
//! publisher at a steady rate (200 events/s for `FAULT_SECONDS`, default 3), a fault in the
//! middle, and at the end, per client: every acknowledged event, once, in order. Each prints
//! its totals (`cargo test --test faults -- --nocapture`). Loopback only; every wait bounded.

use crate::common;

use std::time::Duration;

use common::*;

const RATE: u32 = 200;

fn total() -> usize {
    (RATE * fault_seconds()) as usize
}

fn ws_env(nats_url: &str, node: &str) -> Vec<(&'static str, String)> {
    ws_process_env(nats_url, node, 500)
}

fn ws_url(server: &Server) -> String {
    server.ws_url()
}

/// The clients of the node-fault scenarios: four over WebSocket (0 to 3), two over SSE (4,
/// 5), two long-polling (6, 7); client `i` starts on node `i % nodes`.
const MIX: [Transport; 8] = [
    Transport::WebSocket,
    Transport::WebSocket,
    Transport::WebSocket,
    Transport::WebSocket,
    Transport::Sse,
    Transport::Sse,
    Transport::Poll,
    Transport::Poll,
];

/// Resuming clients over `urls`, one per transport of `transports`, spread across them.
async fn clients(
    urls: &[String],
    transports: &[Transport],
    channel: &str,
    options: ResumerOptions,
) -> Vec<Resumer> {
    let mut clients = Vec::new();
    for (i, transport) in transports.iter().enumerate() {
        let options = ResumerOptions {
            transport: *transport,
            ..options.clone()
        };
        clients.push(Resumer::start(urls.to_vec(), i, channel, options).await);
    }
    clients
}

/// Waits until `client` has received `n` events.
async fn until_received(client: &Resumer, n: usize) {
    eventually(&format!("{n} deliveries"), || async {
        client.received() >= n
    })
    .await;
}

/// Waits for the publisher and for the clients to catch up (bounded), stops them, verifies.
async fn finish(
    scenario: &str,
    publisher: tokio::task::JoinHandle<Vec<u64>>,
    clients: Vec<Resumer>,
) -> Vec<Received> {
    let acked = within("the publisher", publisher).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while clients.iter().any(|c| c.received() < acked.len())
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut received = Vec::new();
    for client in clients {
        received.push(client.stop().await);
    }
    verify(scenario, &acked, &received);
    received
}

/// Two ws node processes, the [`MIX`] of resuming clients across them and a steady publisher;
/// a third of the way through, node 1 gets `signal`. Returns what the clients got, and node 1.
async fn signal_a_node(scenario: &str, channel: &str, signal: &str) -> (Vec<Received>, Process) {
    let nats = NatsServer::start();
    let api = start_api(&nats).await;
    let ws1 = Process::start("fanout-ws", &ws_env(&nats.url(), "ws-1"));
    let ws2 = Process::start("fanout-ws", &ws_env(&nats.url(), "ws-2"));
    wait_ready(&ws1.server()).await;
    wait_ready(&ws2.server()).await;
    let urls = [ws_url(&ws1.server()), ws_url(&ws2.server())];
    let clients = clients(&urls, &MIX, channel, ResumerOptions::default()).await;
    let publisher = steady_publisher(api.addr, channel, RATE, total(), 0);
    until_received(&clients[0], total() / 3).await;
    ws1.signal(signal);
    (finish(scenario, publisher, clients).await, ws1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_a_ws_node_clients_fail_over() {
    let (received, _) = signal_a_node("kill -9 a ws node", "k9", "-KILL").await;
    assert!(
        received[0].reconnects >= 1,
        "client 0 was on ws-1 and failed over"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_ws_node_without_loss() {
    let (received, mut ws1) = signal_a_node("SIGTERM drain", "drain", "-TERM").await;
    assert_eq!(ws1.exit_code().await, 0);
    // Clients 0 and 2 (WebSocket) and 4 (SSE) started on ws-1.
    for client in [&received[0], &received[2], &received[4]] {
        assert_eq!(
            client.close_codes,
            [1001],
            "drained with 1001 (reconnect elsewhere)"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_cluster_loses_a_server() {
    let mut cluster = NatsCluster::start();
    let mut api = fanout_api::Config {
        common: common_at(&cluster.urls(0), "api-1"),
        listen: "127.0.0.1:0".into(),
        ..fanout_api::Config::default()
    };
    api.common.history_replicas = 3;
    // A three-node cluster elects its JetStream leaders first; on a loaded machine that takes
    // a while.
    let formation = Duration::from_secs(60);
    let api = spawn_api(api, formation).await;
    let mut nodes = Vec::new();
    for i in 1..=2 {
        let mut config = fanout_ws::Config {
            common: common_at(&cluster.urls(i), &format!("ws-{i}")),
            listen: "127.0.0.1:0".into(),
            ..fanout_ws::Config::default()
        };
        config.common.history_replicas = 3;
        nodes.push(spawn_ws(config, formation).await);
    }
    let urls: Vec<String> = nodes.iter().map(ws_url).collect();
    let clients = clients(&urls, &MIX, "cluster", ResumerOptions::default()).await;
    let publisher = steady_publisher(api.addr, "cluster", RATE, total(), 0);
    until_received(&clients[0], total() / 3).await;
    // ws-1 is connected to server 1: it must reconnect elsewhere and catch up on its own.
    cluster.kill(1);
    let received = finish("NATS cluster loses a server", publisher, clients).await;
    assert!(
        received[..6].iter().all(|c| c.reconnects == 0),
        "the ws nodes kept their streaming clients"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_nats_server_restarts() {
    let mut nats = NatsServer::start();
    let api = start_api(&nats).await;
    let ws1 = start_ws(&nats, "ws-1", |_| {}).await;
    let ws2 = start_ws(&nats, "ws-2", |_| {}).await;
    let urls = [ws_url(&ws1), ws_url(&ws2)];
    let clients = clients(&urls, &MIX, "restart", ResumerOptions::default()).await;
    let publisher = steady_publisher(api.addr, "restart", RATE, total(), 0);
    until_received(&clients[0], total() / 3).await;
    nats.restart();
    finish("NATS restart", publisher, clients).await;
}

/// A slow consumer over `transport` is cut off and resumes complete; a normal client on the
/// same node is not disturbed.
async fn slow_consumer(transport: Transport, channel: &str) {
    let nats = NatsServer::start();
    let api = start_api(&nats).await;
    // A small queue (64 frames of 32 KiB), so the stall below overflows it; large enough to
    // absorb the live events that arrive while a resume's replay is written.
    let ws = start_ws(&nats, "ws-1", |c| c.queue_capacity = 64).await;
    let urls = [ws_url(&ws)];
    let options = ResumerOptions {
        transport,
        ..ResumerOptions::default()
    };
    let normal = Resumer::start(urls.to_vec(), 0, channel, options.clone()).await;
    // Stops reading after 100 events until the node has cut it off (the channel's subscriber
    // count falls back to the normal client's): the 700 events of 32 KiB after them
    // overflow the socket buffers and the queue, however fast or slow the publisher goes.
    let (cut_off, gate) = tokio::sync::watch::channel(false);
    let stall = ResumerOptions {
        stall: Some((100, gate)),
        ..options
    };
    let slow = Resumer::start(urls.to_vec(), 0, channel, stall).await;
    let state = ws.url("/v1/debug/state");
    let watched = channel.to_string();
    let (joined, both_joined) = tokio::sync::oneshot::channel();
    let mut joined = Some(joined);
    tokio::spawn(async move {
        // Both in the channel first (a stream may still be joining its channels after its
        // welcome), then one: the slow client's cut-off.
        let mut both = false;
        loop {
            let state: serde_json::Value =
                reqwest::get(&state).await.unwrap().json().await.unwrap();
            let subscribers = state["channels"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["channel"] == watched.as_str())
                .map(|c| c["subscribers"].clone());
            if subscribers == Some(serde_json::json!(2)) {
                both = true;
                if let Some(joined) = joined.take() {
                    let _ = joined.send(());
                }
            }
            if both && subscribers == Some(serde_json::json!(1)) {
                let _ = cut_off.send(true);
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    within("both clients in the channel", both_joined)
        .await
        .unwrap();
    let publisher = steady_publisher(api.addr, channel, RATE, total().max(800), 32 * 1024);
    let scenario = format!("slow consumer ({transport:?})");
    let received = finish(&scenario, publisher, vec![normal, slow]).await;
    assert_eq!(
        received[0].reconnects, 0,
        "the normal client was not disturbed"
    );
    assert!(
        received[1].reconnects >= 1,
        "the slow client was cut off: {:?}",
        received[1]
    );
    assert!(
        received[1].close_codes.iter().all(|c| *c == 4001),
        "{:?}",
        received[1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_cut_off_and_resumes_complete() {
    slow_consumer(Transport::WebSocket, "slow").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_sse_stream_is_cut_off_and_resumes_complete() {
    slow_consumer(Transport::Sse, "slow-sse").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_offline_within_the_window_resumes_complete() {
    let tier = Tier::start(1).await;
    let urls = [ws_url(&tier.nodes[0])];
    let mut clients = Vec::new();
    for transport in Transport::ALL {
        let away = ResumerOptions {
            offline: Some((100, Duration::from_secs(1))),
            transport,
            ..ResumerOptions::default()
        };
        clients.push(Resumer::start(urls.to_vec(), 0, "offline", away).await);
    }
    let publisher = steady_publisher(tier.api.addr, "offline", RATE, total(), 0);
    let received = finish("offline within the window", publisher, clients).await;
    for (client, transport) in received.iter().zip(Transport::ALL) {
        assert_eq!(client.not_recovered, 0, "{transport:?}: {client:?}");
    }
    assert_eq!(received[0].reconnects, 1, "WebSocket");
    assert_eq!(received[1].reconnects, 1, "SSE");
}

/// A client that comes back to more than its queue holds (16 frames here) is cut off (4001)
/// in the middle of its replay, again and again, and still ends with every event, once, in
/// order: nothing is written behind a frame the queue dropped (a live frame after such a gap
/// once made a resuming client skip what it never got).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_bigger_than_the_queue_still_completes() {
    let nats = NatsServer::start();
    let api = start_api(&nats).await;
    let ws = start_ws(&nats, "ws-1", |c| c.queue_capacity = 16).await;
    let mut clients = Vec::new();
    for transport in Transport::ALL {
        let away = ResumerOptions {
            offline: Some((100, Duration::from_secs(1))),
            transport,
            ..ResumerOptions::default()
        };
        clients.push(Resumer::start(vec![ws_url(&ws)], 0, "small-queue", away).await);
    }
    let publisher = steady_publisher(api.addr, "small-queue", RATE, total(), 0);
    finish("a resume bigger than the queue", publisher, clients).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_offline_longer_than_the_window_is_told_so() {
    let nats = NatsServer::start();
    let api = start_api_with(&nats, |c| c.common.history_max_age_secs = 1).await;
    let ws = start_ws(&nats, "ws-1", |c| c.common.history_max_age_secs = 1).await;
    let mut clients = Vec::new();
    for transport in Transport::ALL {
        let away = ResumerOptions {
            offline: Some((20, Duration::from_secs(3))),
            transport,
            ..ResumerOptions::default()
        };
        clients.push(Resumer::start(vec![ws_url(&ws)], 0, "expired", away).await);
    }
    let publisher = steady_publisher(api.addr, "expired", RATE, 100, 0);
    let acked = within("the publisher", publisher).await.unwrap();
    for (client, transport) in clients.iter().zip(Transport::ALL) {
        // Resumed after being away: a second subscribe (WebSocket, SSE), or a poll after it.
        let resumed = || async {
            client.subscribed.load(std::sync::atomic::Ordering::SeqCst) >= 2
                && client.received() >= 20
        };
        eventually(&format!("{transport:?}'s resume to be answered"), resumed).await;
    }
    // The poller's first poll after being away may still be under way: wait for it to tell.
    let poller = &clients[2];
    let counted = poller.subscribed.load(std::sync::atomic::Ordering::SeqCst);
    eventually("the poller's next answer", || async {
        poller.subscribed.load(std::sync::atomic::Ordering::SeqCst) > counted
    })
    .await;
    for (client, transport) in clients.into_iter().zip(Transport::ALL) {
        let delivered = client.received();
        let received = client.stop().await;
        println!(
            "offline longer than the window ({transport:?}): acknowledged {}, delivered {delivered}, not recovered {}",
            acked.len(),
            received.not_recovered
        );
        assert_eq!(
            received.not_recovered, 1,
            "{transport:?}: the history no longer reaches its position: recovered false"
        );
    }
}
