//! The honest floor for the publish path: a plain NATS client storing events straight into
//! a JetStream stream with fanout's settings (file storage, history window, duplicate
//! window, direct gets, RePublish to `<prefix>.out.>`), acknowledgements pipelined, the same
//! headers on every message as fanout's API sets on an event without an idempotency key
//! (event id, timestamp). What nats-server spends here per event is the floor that fanout's
//! API adds its own cost to.

use std::time::{Duration, Instant};

use crate::{outcome::JetStream, tier};
use async_nats::{
    HeaderMap,
    jetstream::{
        self,
        stream::{Config, Republish, StorageType},
    },
};

/// `publishers` tasks on one NATS connection, each keeping `window` publishes in flight,
/// for `secs`. Reports acknowledged events/s and nats-server's CPU per event.
pub async fn baseline(publishers: usize, window: usize, secs: u64, size: usize) -> JetStream {
    let nats = tier::NatsServer::start();
    let client = async_nats::connect(nats.url())
        .await
        .expect("connect to NATS");
    let js = jetstream::new(client);
    js.create_stream(Config {
        name: "RAW".into(),
        subjects: vec!["raw.in.>".into()],
        republish: Some(Republish {
            source: "raw.in.>".into(),
            destination: "raw.out.>".into(),
            headers_only: false,
        }),
        max_age: Duration::from_secs(120),
        max_messages_per_subject: 1000,
        storage: StorageType::File,
        allow_direct: true,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .expect("create the stream");
    let before = nats.cpu_seconds();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let tasks: Vec<_> = (0..publishers)
        .map(|p| {
            let js = js.clone();
            tokio::spawn(async move {
                let subject = format!("raw.in.pub{p}");
                let mut pending = std::collections::VecDeque::with_capacity(window);
                let (mut acked, mut failed, mut n) = (0u64, 0u64, 0u64);
                while Instant::now() < deadline {
                    n += 1;
                    let id = uuid::Uuid::new_v4().to_string();
                    let mut headers = HeaderMap::new();
                    headers.insert("Fanout-Id", id.as_str());
                    headers.insert("Fanout-Ts", crate::worker::now_us().to_string().as_str());
                    let data = crate::load::body(n, size);
                    match js
                        .publish_with_headers(subject.clone(), headers, data.into())
                        .await
                    {
                        Ok(ack) => pending.push_back(ack),
                        Err(_) => failed += 1,
                    }
                    if pending.len() >= window {
                        match pending.pop_front().unwrap().await {
                            Ok(_) => acked += 1,
                            Err(_) => failed += 1,
                        }
                    }
                }
                for ack in pending {
                    match ack.await {
                        Ok(_) => acked += 1,
                        Err(_) => failed += 1,
                    }
                }
                (acked, failed)
            })
        })
        .collect();
    let (mut acked, mut errors) = (0, 0);
    for task in tasks {
        let (a, e) = task.await.unwrap();
        acked += a;
        errors += e;
    }
    let used = nats.cpu_seconds() - before;
    JetStream {
        publishers,
        window,
        seconds: secs,
        acked,
        errors,
        acked_per_sec: acked as f64 / secs as f64,
        server_cpu_us_per_event: used * 1e6 / acked.max(1) as f64,
    }
}
