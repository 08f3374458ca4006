//! Lifecycle events end to end (`fanout-bench lifecycle`): a tier with webhooks to a receiver
//! in this process, `clients` WebSocket clients each joining a channel of its own (each join:
//! `channel_occupied` and `member_added`), then leaving at a steady pace (each leave:
//! `member_removed` and `channel_vacated`), with no debounce. Figures: events decided and
//! delivered per second while the joins come as fast as they can, and the time from a client's
//! leave to the webhook carrying its channel's `channel_vacated` (p50 / p99).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{Router, extract::State, http::StatusCode, routing::post};
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use serde_json::Value;

use crate::{suite::FanoutTier, tier::Paths};

/// What the receiver saw: each event's channel and name, and when it arrived.
#[derive(Default)]
struct Seen {
    events: Vec<(String, String, Instant)>,
}

async fn take(State(seen): State<Arc<Mutex<Seen>>>, body: String) -> StatusCode {
    let now = Instant::now();
    let Ok(body) = serde_json::from_str::<Value>(&body) else {
        return StatusCode::BAD_REQUEST;
    };
    let mut seen = seen.lock().unwrap();
    for event in body["events"].as_array().into_iter().flatten() {
        seen.events.push((
            event["channel"].as_str().unwrap_or_default().to_string(),
            event["name"].as_str().unwrap_or_default().to_string(),
            now,
        ));
    }
    StatusCode::OK
}

#[derive(Debug, Serialize)]
pub struct Lifecycle {
    pub clients: usize,
    pub nodes: usize,
    /// Joins as fast as the clients connect: events (occupied + added) per second, from the
    /// first join to the last of their webhooks.
    pub join_events_per_sec: f64,
    /// Leaves at `leave_rate` per second: from a leave to its channel's `channel_vacated`
    /// webhook, ms.
    pub leave_rate: u64,
    pub vacated_ms_p50: f64,
    pub vacated_ms_p99: f64,
    pub vacated_ms_max: f64,
    pub events: usize,
}

async fn wait_for(seen: &Arc<Mutex<Seen>>, name: &str, count: usize, bound: Duration) -> bool {
    let deadline = Instant::now() + bound;
    while Instant::now() < deadline {
        let n = seen
            .lock()
            .unwrap()
            .events
            .iter()
            .filter(|(_, n, _)| n == name)
            .count();
        if n >= count {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

pub async fn run(paths: &Paths, clients: usize, nodes: usize, leave_rate: u64) -> Lifecycle {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hooks", listener.local_addr().unwrap());
    let app = Router::new()
        .route("/hooks", post(take))
        .with_state(seen.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let env = [
        ("FANOUT_WEBHOOK_URL".to_string(), url),
        ("FANOUT_WEBHOOK_DEBOUNCE_MS".to_string(), "0".to_string()),
    ];
    let tier = FanoutTier::start_with(paths, nodes, &env).await;
    // Discovery first: the API must know the nodes before it can tell a dead one.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let urls = tier.ws_urls();

    // Joins from 100 clients at a time, as fast as they connect.
    let started = Instant::now();
    let mut sockets = Vec::with_capacity(clients);
    for wave in (0..clients).collect::<Vec<_>>().chunks(100) {
        let joins = wave.iter().map(|&i| {
            let url = format!("{}?user=u{i}", urls[i % urls.len()]);
            async move {
                let (mut socket, _) = tokio_tungstenite::connect_async(url.as_str())
                    .await
                    .expect("a client connects");
                let request = format!(r#"{{"op":"subscribe","channel":"lc{i}"}}"#);
                socket
                    .send(tokio_tungstenite::tungstenite::Message::Text(
                        request.into(),
                    ))
                    .await
                    .unwrap();
                socket
            }
        });
        sockets.extend(futures_util::future::join_all(joins).await);
    }
    let joined = wait_for(&seen, "member_added", clients, Duration::from_secs(120)).await
        && wait_for(&seen, "channel_occupied", clients, Duration::from_secs(60)).await;
    assert!(joined, "not every join's webhook came");
    let last = seen
        .lock()
        .unwrap()
        .events
        .iter()
        .map(|e| e.2)
        .max()
        .unwrap();
    let join_secs = last.duration_since(started).as_secs_f64();
    println!(
        "  {clients} joins: {} events delivered in {join_secs:.2} s",
        2 * clients
    );

    // Leaves at a steady pace, each channel's vacated timed from its leave.
    let mut left: HashMap<String, Instant> = HashMap::new();
    let every = Duration::from_secs_f64(1.0 / leave_rate as f64);
    let mut tick = tokio::time::interval(every);
    for (i, mut socket) in sockets.into_iter().enumerate() {
        tick.tick().await;
        left.insert(format!("lc{i}"), Instant::now());
        let _ = socket.close(None).await;
        // Read until the server's close, so the leave is the server's to see now.
        tokio::spawn(async move { while socket.next().await.is_some() {} });
    }
    let vacated = wait_for(&seen, "channel_vacated", clients, Duration::from_secs(120)).await;
    assert!(vacated, "not every leave's webhook came");
    let mut ms: Vec<f64> = seen
        .lock()
        .unwrap()
        .events
        .iter()
        .filter(|(_, name, _)| name == "channel_vacated")
        .filter_map(|(channel, _, at)| {
            Some(at.duration_since(*left.get(channel)?).as_secs_f64() * 1000.0)
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    let quantile = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
    let events = seen.lock().unwrap().events.len();
    drop(tier);
    Lifecycle {
        clients,
        nodes,
        join_events_per_sec: (2 * clients) as f64 / join_secs,
        leave_rate,
        vacated_ms_p50: quantile(0.5),
        vacated_ms_p99: quantile(0.99),
        vacated_ms_max: quantile(1.0),
        events,
    }
}
