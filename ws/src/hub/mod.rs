//! The hub: this node's connections and which channels each one is in, split by owner:
//!
//! - [`conns`]: each connection's sink, who it is, and its channels;
//! - [`subs`]: each channel's members and watchers, and its stretch of interest (generation,
//!   whether its NATS subscription is in place);
//! - [`observer`]: what the hub reports, in order: a channel's first and last local
//!   subscriber ([`Interest`]), presence watching, and every membership change.
//!
//! **Locks.** Connections and channels live in shards (64 each, as centrifuge's `hub.go`),
//! each a std mutex held for a few map operations and never while another lock is taken or a
//! socket is written, so that one busy channel cannot stall the others. A fan-out pass copies
//! the channel's sinks out of its shard ([`Subs::recipients`]) and writes outside every lock:
//! a join, a connect or a subscription elsewhere never waits for it. (A member that leaves
//! during a pass may still be offered that pass's frames; its sink drops them, see
//! [`Sink::leave`].)
//!
//! All changes of one connection's memberships come from that connection's own task, one at
//! a time. It knows neither NATS nor any transport: a connection is a [`Sink`].

mod conns;
mod observer;
mod shard;
mod subs;

pub use conns::{About, Conns, Mailbox, Order, SubscribeError};
pub use observer::{Interest, Membership, Observer, Profile};
pub use subs::{BROADCAST_GENERATION, LocalMember, Subs, Subscribed};

use std::{collections::HashSet, sync::Arc};

use fanout::Channel;
use serde_json::value::RawValue;

use crate::{position::channel_key, sink::Sink};
use conns::Conn;

pub use crate::position::ConnId;

#[derive(Debug)]
pub struct Hub {
    conns: Conns,
    subs: Subs,
    observer: Arc<dyn Observer>,
    max_subscriptions: usize,
}

impl Hub {
    pub fn new(max_subscriptions: usize, observer: Arc<dyn Observer>) -> Self {
        Hub {
            conns: Conns::new(),
            subs: Subs::new(),
            observer,
            max_subscriptions,
        }
    }

    pub fn add_conn(&self, id: ConnId, sink: Arc<dyn Sink>, profile: Profile, about: About) {
        self.insert_conn(id, sink, profile, false, about);
    }

    /// Adds a connection that gets its channels' events but is nobody's member: no presence
    /// change reports it, no presence answer lists it (a long-poll, there only while it
    /// waits).
    pub fn add_hidden_conn(&self, id: ConnId, sink: Arc<dyn Sink>, about: About) {
        let profile = Profile {
            user: "".into(),
            info: None,
        };
        self.insert_conn(id, sink, profile, true, about);
    }

    fn insert_conn(
        &self,
        id: ConnId,
        sink: Arc<dyn Sink>,
        profile: Profile,
        hidden: bool,
        about: About,
    ) {
        self.conns.insert(
            id,
            Conn {
                sink,
                channels: HashSet::new(),
                profile: Arc::new(profile),
                hidden,
                about,
            },
        );
    }

    /// Forgets a connection and leaves all its channels.
    pub fn remove_conn(&self, id: ConnId) {
        let Some(conn) = self.conns.remove(id) else {
            return;
        };
        for channel in conn.channels {
            metrics::gauge!("fanout_ws_subscriptions").decrement(1.0);
            self.leave(id, &channel, &conn.sink);
        }
    }

    /// Adds `id` to `channel` (a join) and, with `presence`, has it receive the channel's
    /// presence changes; subscribing again only changes `presence`. (`broadcast` needs no
    /// subscribe: every connection gets it.)
    pub fn subscribe(
        &self,
        id: ConnId,
        channel: &Channel,
        presence: bool,
    ) -> Result<Subscribed, SubscribeError> {
        self.subscribe_as(id, channel, presence, None)
    }

    /// [`Hub::subscribe`], a member with `info` in this channel (the app's subscribe hook's)
    /// instead of the connection's.
    pub fn subscribe_as(
        &self,
        id: ConnId,
        channel: &Channel,
        presence: bool,
        info: Option<Box<RawValue>>,
    ) -> Result<Subscribed, SubscribeError> {
        let mut joining = self.conns.join(id, channel, self.max_subscriptions)?;
        if let Some(info) = info {
            joining.profile = Arc::new(Profile {
                user: joining.profile.user.clone(),
                info: Some(info),
            });
        }
        let key = channel_key(channel.as_str());
        if joining.new {
            // Before it is a member: from its first frame on, the sink takes the channel's.
            joining.sink.enter(key, channel.as_str());
        }
        Ok(self
            .subs
            .add(channel, key, id, joining, presence, &*self.observer))
    }

    /// Removes `id` from `channel`. Returns whether it was subscribed.
    pub fn unsubscribe(&self, id: ConnId, channel: &Channel) -> bool {
        let Some(sink) = self.conns.leave(id, channel) else {
            return false;
        };
        self.leave(id, channel, &sink);
        true
    }

    fn leave(&self, id: ConnId, channel: &Channel, sink: &Arc<dyn Sink>) {
        let key = channel_key(channel.as_str());
        self.subs.remove(channel, key, id, &*self.observer);
        // No longer a member: nothing of the channel reaches it from now on.
        sink.leave(key);
    }

    /// Marks `channel` as receiving events, if its interest is still the stretch that
    /// `generation` named (it may have ended, and begun again, in the meantime).
    pub fn set_live(&self, channel: &Channel, generation: u64) {
        self.subs.set_live(channel, generation);
    }

    /// Marks `channel`'s presence changes as followed, if `generation` is still the current
    /// stretch of watching.
    pub fn set_watch_live(&self, channel: &Channel, generation: u64) {
        self.subs.set_watch_live(channel, generation);
    }

    /// Replaces connection `id`'s presence info and reports an update in each of its
    /// channels. Returns false for an unknown connection.
    pub fn set_info(&self, id: ConnId, info: Option<Box<RawValue>>) -> bool {
        let Some((profile, channels)) = self.conns.set_info(id, info) else {
            return false;
        };
        for channel in channels {
            self.subs.update(&channel, id, &profile, &*self.observer);
        }
        true
    }

    /// This node's members of `channel`.
    pub fn members(&self, channel: &Channel) -> Vec<LocalMember> {
        self.subs.members(channel)
    }

    /// How many members `channel` has on this node.
    pub fn member_count(&self, channel: &Channel) -> usize {
        self.subs.member_count(channel)
    }

    /// Whether `channel`'s subscription is in place (for its current stretch of interest).
    pub fn is_live(&self, channel: &Channel) -> bool {
        self.subs.is_live(channel)
    }

    /// The memberships: where a channel's reader copies the sinks of its members for a
    /// fan-out pass ([`Subs::recipients`]).
    pub fn memberships(&self) -> &Subs {
        &self.subs
    }

    /// The connections: where `broadcast`'s reader copies every sink ([`Conns::sinks`]).
    pub fn conns(&self) -> &Conns {
        &self.conns
    }

    /// Copies the sinks of `channel`'s members that asked for its presence changes into `out`.
    pub fn watchers(&self, channel: &Channel, out: &mut Vec<Arc<dyn Sink>>) {
        self.subs
            .watchers(channel, channel_key(channel.as_str()), out);
    }

    /// Every connection's cut-off switch (for draining).
    pub fn kicks(&self) -> Vec<crate::sink::Kick> {
        self.conns.kicks()
    }

    /// Number of connections.
    pub fn connections(&self) -> usize {
        self.conns.count()
    }

    /// Channels with at least one local subscriber, with their subscriber counts.
    pub fn channels(&self) -> Vec<(Channel, usize)> {
        self.subs.channels()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        disconnect,
        position::ChannelKey,
        sink::{Bounds, Delivery, Kick, Outbox, Outgoing, Plain, Recipients, offer_all},
    };
    use fanout::presence::ChangeOp;
    use shard::lock;
    use std::sync::Mutex;
    use tokio::sync::mpsc;
    use tokio_util::sync::CancellationToken;
    use uuid::Uuid;

    struct Fixture {
        hub: Hub,
        interest: mpsc::UnboundedReceiver<Interest>,
        membership: mpsc::UnboundedReceiver<Membership>,
    }

    /// Hands the hub's reports to a channel each.
    #[derive(Debug)]
    struct Reports {
        interest: mpsc::UnboundedSender<Interest>,
        membership: mpsc::UnboundedSender<Membership>,
    }

    impl Observer for Reports {
        fn interest(&self, interest: Interest) {
            let _ = self.interest.send(interest);
        }
        fn membership(&self, membership: Membership) {
            let _ = self.membership.send(membership);
        }
    }

    fn fixture(max_subscriptions: usize) -> Fixture {
        let (interest_tx, interest) = mpsc::unbounded_channel();
        let (membership_tx, membership) = mpsc::unbounded_channel();
        let reports = Reports {
            interest: interest_tx,
            membership: membership_tx,
        };
        Fixture {
            hub: Hub::new(max_subscriptions, Arc::new(reports)),
            interest,
            membership,
        }
    }

    /// A fan-out pass of `frames` on `channel` by the reader of stretch `generation`: what
    /// the channel's reader does.
    fn pass(hub: &Hub, channel: &str, generation: u64, frames: &[Outgoing]) -> Delivery {
        let mut recipients = Recipients::new();
        let key = channel_key(channel);
        if channel == "broadcast" {
            hub.conns().sinks(&mut recipients);
        } else if !hub
            .memberships()
            .recipients(&ch(channel), key, generation, &mut recipients)
        {
            return Delivery::default();
        }
        let outcome = offer_all(key, frames, &mut recipients);
        assert!(recipients.is_empty(), "no sink kept after a pass");
        outcome
    }

    /// A connection over a real loopback socket; the client end reads what it gets.
    async fn conn(hub: &Hub, capacity: usize) -> (ConnId, tokio::net::TcpStream, Kick) {
        let (id, client, kick, _) = conn_with_outbox(hub, capacity).await;
        (id, client, kick)
    }

    async fn conn_with_outbox(
        hub: &Hub,
        capacity: usize,
    ) -> (ConnId, tokio::net::TcpStream, Kick, Arc<Outbox<Plain>>) {
        let id = Uuid::new_v4();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let kick = Kick::new(CancellationToken::new());
        let profile = Profile {
            user: format!("user-{id}").into(),
            info: None,
        };
        let bounds = Bounds {
            frames: capacity,
            bytes: usize::MAX,
        };
        let outbox = Arc::new(Outbox::new(server, Plain, kick.clone(), bounds));
        hub.add_conn(id, outbox.clone(), profile, About::default());
        (id, client, kick, outbox)
    }

    /// The next `n` bytes the client end receives (one write or several).
    async fn received(client: &mut tokio::net::TcpStream, n: usize) -> String {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0; n];
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            client.read_exact(&mut buf),
        )
        .await
        .expect("the bytes to arrive")
        .unwrap();
        String::from_utf8(buf).unwrap()
    }

    fn event(seq: u64, text: &str) -> [Outgoing; 1] {
        [Outgoing::event(seq, text.to_string())]
    }

    /// The membership changes reported so far, as (change, channel, conn).
    fn changes(rx: &mut mpsc::UnboundedReceiver<Membership>) -> Vec<(ChangeOp, String, ConnId)> {
        std::iter::from_fn(|| rx.try_recv().ok())
            .filter_map(|m| match m {
                Membership::Changed {
                    change,
                    channel,
                    conn,
                    ..
                } => Some((change, channel.to_string(), conn)),
                Membership::Flush(_) => None,
            })
            .collect()
    }

    fn ch(name: &str) -> Channel {
        Channel::parse(name).unwrap()
    }

    fn add(name: &str, generation: u64) -> Interest {
        Interest::Add {
            channel: ch(name),
            generation,
        }
    }

    fn remove(name: &str) -> Interest {
        Interest::Remove { channel: ch(name) }
    }

    fn drain(rx: &mut mpsc::UnboundedReceiver<Interest>) -> Vec<Interest> {
        std::iter::from_fn(|| rx.try_recv().ok()).collect()
    }

    #[tokio::test]
    async fn reports_first_and_last_local_subscriber() {
        let mut f = fixture(10);
        let (a, _ra, _) = conn(&f.hub, 4).await;
        let (b, _rb, _) = conn(&f.hub, 4).await;
        f.hub.subscribe(a, &ch("x"), false).unwrap();
        f.hub.subscribe(b, &ch("x"), false).unwrap();
        f.hub.subscribe(a, &ch("x"), false).unwrap(); // idempotent
        assert_eq!(drain(&mut f.interest), [add("x", 1)]);
        assert_eq!(
            f.hub.channels(),
            [(ch("x"), 2)],
            "broadcast is no one's channel"
        );
        assert!(f.hub.unsubscribe(a, &ch("x")));
        assert!(!f.hub.unsubscribe(a, &ch("x")));
        assert_eq!(drain(&mut f.interest), []);
        f.hub.remove_conn(b);
        assert_eq!(drain(&mut f.interest), [remove("x")]);
        f.hub.subscribe(a, &ch("x"), false).unwrap();
        assert_eq!(drain(&mut f.interest), [add("x", 2)]);
        assert_eq!(f.hub.channels(), [(ch("x"), 1)]);
    }

    #[tokio::test]
    async fn live_only_for_the_current_generation() {
        let f = fixture(10);
        let (a, _ra, _) = conn(&f.hub, 4).await;
        let first = f.hub.subscribe(a, &ch("x"), false).unwrap().live;
        f.hub.unsubscribe(a, &ch("x"));
        let second = f.hub.subscribe(a, &ch("x"), false).unwrap().live;
        f.hub.set_live(&ch("x"), 1); // the ended stretch: no effect
        assert!(!*second.borrow());
        f.hub.set_live(&ch("x"), 2);
        assert!(*second.borrow());
        assert!(!*first.borrow());
    }

    #[tokio::test]
    async fn limits_subscriptions_per_connection() {
        let f = fixture(2);
        let (a, _ra, _) = conn(&f.hub, 4).await;
        f.hub.subscribe(a, &ch("x"), false).unwrap();
        f.hub.subscribe(a, &ch("y"), false).unwrap();
        assert_eq!(
            f.hub.subscribe(a, &ch("z"), false).unwrap_err(),
            SubscribeError::TooMany(2)
        );
        f.hub.subscribe(a, &ch("y"), false).unwrap(); // re-subscribing is not a new one
        assert_eq!(
            f.hub
                .subscribe(Uuid::new_v4(), &ch("x"), false)
                .unwrap_err(),
            SubscribeError::UnknownConn
        );
    }

    #[tokio::test]
    async fn delivers_to_subscribers_only_and_broadcasts_to_all() {
        let f = fixture(10);
        let (a, mut ra, _) = conn(&f.hub, 4).await;
        let (_b, mut rb, _) = conn(&f.hub, 4).await;
        f.hub.subscribe(a, &ch("x"), false).unwrap();
        let deliver = |channel: &str, generation, seq, text| {
            pass(&f.hub, channel, generation, &event(seq, text)).delivered
        };
        assert_eq!(
            deliver("x", 0, 1, "stale;"),
            0,
            "a stretch of interest that ended"
        );
        assert_eq!(deliver("x", 1, 1, "e1;"), 1);
        assert_eq!(deliver("y", 2, 2, "e2;"), 0);
        assert_eq!(deliver("broadcast", BROADCAST_GENERATION, 3, "b1;"), 2);
        assert_eq!(received(&mut ra, 6).await, "e1;b1;");
        assert_eq!(received(&mut rb, 3).await, "b1;");
    }

    #[tokio::test]
    async fn a_full_queue_cuts_off_only_that_connection() {
        let f = fixture(10);
        let (slow, _never_reads, slow_kick) = conn(&f.hub, 2).await;
        let (fast, mut fast_rx, fast_kick, fast_outbox) = conn_with_outbox(&f.hub, 64).await;
        f.hub.subscribe(slow, &ch("x"), false).unwrap();
        f.hub.subscribe(fast, &ch("x"), false).unwrap();
        // What the fast connection's task would do: write out what waits.
        tokio::spawn(async move {
            loop {
                fast_outbox.waiting().await;
                let _ = fast_outbox.flush().await;
            }
        });
        let blob = "x".repeat(64 * 1024);
        let rounds = 200;
        let reader = tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut buf = vec![0; rounds * 64 * 1024];
            fast_rx.read_exact(&mut buf).await.unwrap();
        });
        let mut slow_count = 0;
        for seq in 1..=rounds as u64 {
            slow_count += pass(&f.hub, "x", 1, &event(seq, &blob)).slow;
            tokio::task::yield_now().await;
        }
        reader.await.unwrap();
        assert_eq!(slow_count, 1, "kicked once, however many frames overflow");
        assert!(slow_kick.token().is_cancelled());
        assert_eq!(slow_kick.reason(), disconnect::SLOW_CONSUMER);
        assert!(!fast_kick.token().is_cancelled());
    }

    #[tokio::test]
    async fn reports_joins_leaves_and_watch_interest() {
        let mut f = fixture(10);
        let (a, _ra, _) = conn(&f.hub, 4).await;
        let (b, mut rb, _) = conn(&f.hub, 4).await;
        f.hub.subscribe(a, &ch("x"), false).unwrap();
        let watching = f.hub.subscribe(b, &ch("x"), true).unwrap();
        f.hub.subscribe(b, &ch("x"), true).unwrap(); // no second join, no second watch
        assert_eq!(
            changes(&mut f.membership),
            [
                (ChangeOp::Join, "x".into(), a),
                (ChangeOp::Join, "x".into(), b)
            ]
        );
        assert_eq!(
            drain(&mut f.interest),
            [
                add("x", 1),
                Interest::Watch {
                    channel: ch("x"),
                    generation: 2
                }
            ]
        );
        let watch_live = watching.watch_live.unwrap();
        f.hub.set_watch_live(&ch("x"), 2);
        assert!(*watch_live.borrow());
        assert_eq!(f.hub.member_count(&ch("x")), 2);
        assert_eq!(f.hub.members(&ch("x")).len(), 2);

        // Presence changes reach only the watching subscriber, never skipped as replayed.
        let frame = Outgoing::other("join", "join;");
        let mut watchers = Recipients::new();
        f.hub.watchers(&ch("x"), &mut watchers);
        assert_eq!(
            offer_all(
                channel_key("x"),
                std::slice::from_ref(&frame),
                &mut watchers
            )
            .delivered,
            1
        );
        assert_eq!(received(&mut rb, 5).await, "join;");

        assert!(
            f.hub
                .set_info(a, Some(RawValue::from_string("{\"n\":1}".into()).unwrap()))
        );
        assert_eq!(
            changes(&mut f.membership),
            [(ChangeOp::Update, "x".into(), a)]
        );
        let info = f
            .hub
            .members(&ch("x"))
            .into_iter()
            .find(|m| m.conn == a)
            .unwrap();
        assert_eq!(info.profile.info.as_ref().unwrap().get(), "{\"n\":1}");

        f.hub.remove_conn(b);
        assert_eq!(
            changes(&mut f.membership),
            [(ChangeOp::Leave, "x".into(), b)]
        );
        assert_eq!(
            drain(&mut f.interest),
            [Interest::Unwatch { channel: ch("x") }]
        );
        f.hub.unsubscribe(a, &ch("x"));
        assert_eq!(
            changes(&mut f.membership),
            [(ChangeOp::Leave, "x".into(), a)]
        );
        assert_eq!(drain(&mut f.interest), [remove("x")]);
    }

    /// A fan-out pass writes outside every lock: a connection that subscribes elsewhere, or
    /// connects, while a pass over a big channel is writing is not held up by it. (Here the
    /// "pass" is a sink that blocks inside `offer` until the subscribe went through.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fan_out_pass_holds_no_lock_while_writing() {
        #[derive(Debug)]
        struct Blocking {
            kick: Kick,
            entered: std::sync::mpsc::SyncSender<()>,
            go: Mutex<std::sync::mpsc::Receiver<()>>,
        }
        impl Sink for Blocking {
            fn offer(&self, _: ChannelKey, _: &[Outgoing], _: &mut Delivery) {
                let _ = self.entered.send(());
                let _ = lock(&self.go).recv();
            }
            fn kick(&self) -> &Kick {
                &self.kick
            }
            fn enter(&self, _: ChannelKey, _: &str) {}
            fn leave(&self, _: ChannelKey) {}
        }
        let f = Arc::new(fixture(10));
        let (entered_tx, entered) = std::sync::mpsc::sync_channel(1);
        let (go, go_rx) = std::sync::mpsc::channel();
        let blocking = Uuid::new_v4();
        let profile = || Profile {
            user: "u".into(),
            info: None,
        };
        f.hub.add_conn(
            blocking,
            Arc::new(Blocking {
                kick: Kick::new(CancellationToken::new()),
                entered: entered_tx,
                go: Mutex::new(go_rx),
            }),
            profile(),
            About::default(),
        );
        f.hub.subscribe(blocking, &ch("big"), false).unwrap();
        let pass = {
            let f = f.clone();
            std::thread::spawn(move || pass(&f.hub, "big", 1, &event(1, "e")))
        };
        entered.recv().unwrap(); // the pass is writing
        let (other, _client, _) = conn(&f.hub, 4).await;
        f.hub.subscribe(other, &ch("elsewhere"), false).unwrap();
        f.hub.subscribe(other, &ch("big"), false).unwrap();
        assert_eq!(f.hub.connections(), 2);
        assert_eq!(f.hub.member_count(&ch("big")), 2);
        go.send(()).unwrap();
        assert_eq!(pass.join().unwrap().recipients, 0);
    }
}
