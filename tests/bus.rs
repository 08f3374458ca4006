//! The core bus against a real nats-server: the stream's RePublish headers are what the rest
//! of the design relies on.

mod common;

use bytes::Bytes;
use common::*;
use fanout::{Bus, Channel};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn republished_events_carry_sequence_and_the_channels_previous_sequence() {
    let nats = NatsServer::start();
    let bus = Bus::connect(&common(&nats, "bus-test")).await.unwrap();
    eventually("the bus to be ready", || async { bus.is_ready() }).await;
    let a = Channel::parse("a").unwrap();
    let b = Channel::parse("b").unwrap();
    let mut sub_a = bus.subscribe(&a).await.unwrap();
    let mut sub_b = bus.subscribe(&b).await.unwrap();

    let p1 = bus
        .publish(&a, Bytes::from_static(b"1"), None)
        .await
        .unwrap();
    let p2 = bus
        .publish(&b, Bytes::from_static(b"2"), None)
        .await
        .unwrap();
    let p3 = bus
        .publish(&a, Bytes::from_static(b"{\"n\":3}"), None)
        .await
        .unwrap();
    assert!(p1.seq < p2.seq && p2.seq < p3.seq);

    let e1 = within("event 1", sub_a.next()).await.unwrap().unwrap();
    let e3 = within("event 3", sub_a.next()).await.unwrap().unwrap();
    let e2 = within("event 2", sub_b.next()).await.unwrap().unwrap();
    assert_eq!((e1.seq, e1.last_seq), (p1.seq, 0), "first on its channel");
    assert_eq!((e2.seq, e2.last_seq), (p2.seq, 0), "first on its channel");
    assert_eq!(
        (e3.seq, e3.last_seq),
        (p3.seq, p1.seq),
        "previous on the same channel"
    );
    assert_eq!(e3.id, p3.id);
    assert_eq!(&e3.data[..], b"{\"n\":3}");
    assert_eq!(e3.channel, a);
    assert!(e3.ts >= e1.ts);
    bus.drain().await;
}
