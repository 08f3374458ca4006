//! The core bus against a real nats-server: the stream's RePublish headers are what the rest
//! of the design relies on.

use crate::common;

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
        .log()
        .publish(&a, Bytes::from_static(b"1"), None)
        .await
        .unwrap();
    let p2 = bus
        .log()
        .publish(&b, Bytes::from_static(b"2"), None)
        .await
        .unwrap();
    let p3 = bus
        .log()
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_reads_back_one_channel_in_order() {
    let nats = NatsServer::start();
    let bus = Bus::connect(&common(&nats, "bus-test")).await.unwrap();
    eventually("the bus to be ready", || async { bus.is_ready() }).await;
    let a = Channel::parse("a").unwrap();
    let b = Channel::parse("b").unwrap();
    let mut seqs_a = Vec::new();
    for i in 0..5 {
        seqs_a.push(
            bus.log()
                .publish(&a, Bytes::from(i.to_string()), None)
                .await
                .unwrap()
                .seq,
        );
        bus.log()
            .publish(&b, Bytes::from_static(b"0"), None)
            .await
            .unwrap();
    }
    let all: Vec<u64> = bus
        .log()
        .history(&a, 0, 0, None)
        .await
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(all, seqs_a, "only channel a, in order");
    let after: Vec<u64> = bus
        .log()
        .history(&a, 0, seqs_a[1], Some(seqs_a[3]))
        .await
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(after, &seqs_a[2..=3], "after < seq <= until");
    let events = bus.log().history(&a, 0, seqs_a[3], None).await.unwrap();
    assert_eq!(&events[0].data[..], b"4");
    assert!(!events[0].id.is_empty() && events[0].ts > 0);
    assert!(
        bus.log()
            .history(&a, 0, *seqs_a.last().unwrap(), None)
            .await
            .unwrap()
            .is_empty()
    );

    assert!(bus.log().is_stored(&a, 0, seqs_a[0]).await.unwrap());
    assert!(
        !bus.log().is_stored(&b, 0, seqs_a[0]).await.unwrap(),
        "that seq belongs to another channel"
    );
    assert!(!bus.log().is_stored(&a, 0, 10_000).await.unwrap());
    let epoch = bus.log().epoch();
    assert!(!epoch.is_empty());
    assert_eq!(bus.log().refresh_epoch().await, epoch);
    assert_eq!(bus.log().first_sequence(0).await.unwrap(), 1);
}
