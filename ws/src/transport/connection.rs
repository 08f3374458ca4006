//! A connection's life on the node, whatever its transport (centrifuge's `client.go` over its
//! three-method `Transport`): the bounded outbox over the socket, charged to the node's
//! budget; the hub's registration; `welcome`; the heartbeat, the token's expiry and the stall
//! of a half-sent message as timers; being kicked, and closing; the counters; shutdown.
//!
//! A transport ([`Transport`]) brings what is its own: how it reads (what the client sends,
//! and what it is waiting for), its heartbeat, and how it says goodbye. Its framing (how it
//! writes) is its outbox's [`Framing`]. Events do not pass through here: fan-out writes them
//! into the socket.
//!
//! A long-poll is a connection without a socket of its own for as long as it waits
//! ([`Connection::hidden`]): the same set-up and the same joins, collected instead of written.

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use fanout::{Channel, telemetry};
use metrics::counter;
use serde_json::json;
use tokio::{net::TcpStream, time::Sleep};

use crate::{
    auth::Identity,
    disconnect::{self, Disconnect},
    hub::{About, ConnId, Mailbox, Profile},
    node::Node,
    protocol,
    proxy::{Hook, ProxyError, RefreshAnswer, RefreshRequest},
    session::{self, JoinError, Resume, Session},
    sink::{Bounds, Conduit, Datagrams, Framing, Kick, Outbox},
};

/// How long the goodbye (a close frame, a `disconnect` event) may take to be written.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// How a connection ended.
#[derive(Debug)]
pub(crate) enum End {
    /// The socket failed or the client went away: nothing more to say.
    Gone,
    /// The client closed it (a WebSocket close frame, with this code): answer it.
    ClientClosed(Option<u16>),
    /// The node closes it, saying why.
    Close(Disconnect),
}

impl End {
    /// Its label in `fanout_ws_connections_closed_total{reason}`.
    fn reason(&self) -> &'static str {
        match self {
            End::Gone | End::ClientClosed(_) => "client",
            End::Close(disconnect) => disconnect.name,
        }
    }
}

/// A transport's own part of a connection.
pub(crate) trait Transport: Send {
    type Framing: Framing;
    /// What the client sent (or the socket said), for [`Transport::act`].
    type Input: Send;

    /// What follows `welcome` before the loop starts (an SSE stream's channels).
    fn start(
        &mut self,
        _conn: &mut Connection<Self::Framing>,
    ) -> impl Future<Output = Result<(), End>> + Send {
        async { Ok(()) }
    }

    /// Waits for the client's next input (a socket transport reads the outbox's socket).
    fn input(&mut self, outbox: &Outbox<Self::Framing>)
    -> impl Future<Output = Self::Input> + Send;

    /// Acts on it: reads whole requests and answers them.
    fn act(
        &mut self,
        input: Self::Input,
        conn: &mut Connection<Self::Framing>,
    ) -> impl Future<Output = Result<(), End>> + Send;

    /// Whether the client has started a message and not finished it, and which (the number
    /// of whole messages before it): it must finish it within `FANOUT_FRAME_TIMEOUT_MS`
    /// (1008); each message gets its own time.
    fn pending(&self) -> Option<u64> {
        None
    }

    /// Bytes the transport holds for the client (what it sent and is not yet decoded),
    /// charged to the node's budget.
    fn held(&self) -> usize {
        0
    }

    /// The heartbeat, every `FANOUT_HEARTBEAT_SECS`: written to the outbox, or the end when
    /// the last one went unanswered.
    fn heartbeat(&mut self, conn: &Connection<Self::Framing>) -> Result<(), End>;

    /// Writes what the transport says as the connection ends (a close frame, a `disconnect`
    /// event), if anything.
    fn goodbye(&self, end: &End, outbox: &Outbox<Self::Framing>);

    /// Writes out what waits in a queued outbox ([`Outbox::queued`]): for a transport whose
    /// stream is not a socket the outbox writes into (WebTransport). Socket transports never
    /// get here.
    fn write_out(
        &mut self,
        _outbox: &Outbox<Self::Framing>,
    ) -> impl Future<Output = Result<(), End>> + Send {
        async { Ok(()) }
    }

    /// Ends the connection the transport's way once the goodbye is written (a WebTransport
    /// session's close, with its code and reason). Socket transports close the socket.
    fn close(
        &mut self,
        _end: &End,
        _outbox: &Outbox<Self::Framing>,
    ) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// A connection: its id, its node, its outbox and its session.
#[derive(Debug)]
pub(crate) struct Connection<F: Framing> {
    pub conn: ConnId,
    pub node: Arc<Node>,
    pub outbox: Arc<Outbox<F>>,
    pub session: Session,
    kick: Kick,
    /// The app's orders (server-side subscriptions); none for a long-poll.
    mailbox: Option<Arc<Mailbox>>,
}

impl<F: Framing> Connection<F> {
    /// A connection over `stream` written with `framing`: its outbox bounded
    /// (`FANOUT_QUEUE_CAPACITY`, `FANOUT_QUEUE_MAX_BYTES`) and charged to the node's budget,
    /// registered with the hub as `identity`, counted.
    pub fn open(
        node: Arc<Node>,
        conn: ConnId,
        identity: Identity,
        stream: TcpStream,
        framing: F,
    ) -> Connection<F> {
        Self::register(node, conn, identity, |kick, bounds| {
            Outbox::new(stream, framing, kick, bounds)
        })
    }

    /// A connection whose transport writes its outbox out itself ([`Outbox::queued`],
    /// [`Transport::write_out`]), volatile events as `datagrams` when given: otherwise as
    /// [`Connection::open`].
    pub fn queued(
        node: Arc<Node>,
        conn: ConnId,
        identity: Identity,
        framing: F,
        datagrams: Option<Datagrams>,
    ) -> Connection<F> {
        Self::register(node, conn, identity, |kick, bounds| {
            Outbox::queued(framing, kick, bounds, datagrams)
        })
    }

    fn register(
        node: Arc<Node>,
        conn: ConnId,
        identity: Identity,
        outbox: impl FnOnce(Kick, Bounds) -> Outbox<F>,
    ) -> Connection<F> {
        let config = node.config();
        let kick = Kick::new(node.closing_token().child_token());
        let bounds = Bounds {
            frames: config.queue_capacity,
            bytes: config.queue_max_bytes,
        };
        let outbox = Arc::new(outbox(kick.clone(), bounds).charged(node.budget().charge()));
        let profile = Profile {
            user: identity.user.as_str().into(),
            info: identity
                .info
                .as_ref()
                .and_then(|info| serde_json::value::to_raw_value(info).ok()),
        };
        let mailbox = Arc::new(Mailbox::default());
        // The channels the app's connect hook named: joined first thing, by the task.
        for channel in &identity.channels {
            mailbox.post(crate::hub::Order::Subscribe(channel.clone()));
        }
        // One copy of the user id for both.
        let about = about::<F>(profile.user.clone(), &identity, Some(mailbox.clone()));
        node.hub().add_conn(conn, outbox.clone(), profile, about);
        counter!("fanout_ws_connections_opened_total").increment(1);
        tracing::debug!("connected");
        let session = Session::new(conn, node.clone(), outbox.clone(), identity);
        Connection {
            conn,
            node,
            outbox,
            session,
            kick,
            mailbox: Some(mailbox),
        }
    }

    /// A connection without a socket (a long-poll): its outbox keeps at most `bounds` for
    /// whoever takes them, and it is nobody's member for presence. Not counted; gone from the
    /// hub when dropped.
    pub fn hidden(node: Arc<Node>, identity: Identity, framing: F, bounds: Bounds) -> Hidden<F> {
        let conn = ConnId::new_v4();
        let kick = Kick::new(node.closing_token().child_token());
        let outbox = Arc::new(Outbox::collecting(framing, kick.clone(), bounds));
        let user = identity.user.as_str().into();
        node.hub()
            .add_hidden_conn(conn, outbox.clone(), about::<F>(user, &identity, None));
        let session = Session::new(conn, node.clone(), outbox.clone(), identity);
        Hidden(Connection {
            conn,
            node,
            outbox,
            session,
            kick,
            mailbox: None,
        })
    }

    /// Sends `welcome`: who the client is, where, and (an HTTP stream's) the secret of its
    /// session requests.
    pub fn welcome(&self, session: Option<&str>) {
        let node = &self.node;
        let welcome = protocol::welcome(&protocol::Welcome {
            node: node.id(),
            conn: &self.conn.to_string(),
            user: &self.session.identity().user,
            heartbeat: node.config().heartbeat_secs,
            epoch: &node.epoch(),
            region: node.bus().topology().region().map(|r| &**r),
            session,
        });
        self.outbox.send("welcome", &welcome);
    }

    /// Joins each of `channels` as a stream names them, resuming where it says; `resumed`
    /// gets what each resume found. A channel whose history cannot be read now is the end
    /// (`unavailable`: the client comes back with the same positions, and misses nothing);
    /// any other refusal is logged and the others go on.
    pub async fn join_all(
        &self,
        channels: Vec<Start>,
        mut resumed: impl FnMut(&Channel, bool, usize),
    ) -> Result<(), JoinError> {
        for Start {
            channel,
            resume,
            resuming,
        } in channels
        {
            let joined = Box::pin(self.session.join(&channel, resume, |replay| {
                if let Some(replay) = replay.filter(|_| resuming) {
                    resumed(&channel, replay.recovered, replay.events.len());
                }
            }))
            .await;
            match joined {
                Ok(()) => {}
                Err(err @ JoinError::Replay(_)) => return Err(err),
                Err(JoinError::Refused(err)) => {
                    // The app's subscribe hook said no: the client is told (an error frame; on
                    // SSE the event `refused`, as `error` is EventSource's own), and the
                    // others go on.
                    let mut rejection = protocol::Rejection::app(err.code(), err.to_string());
                    rejection.op = Some("subscribe".into());
                    let mut frame: serde_json::Value =
                        serde_json::from_str(&rejection.encode()).expect("an error frame is JSON");
                    frame["channel"] = json!(channel);
                    self.outbox.send("refused", &frame.to_string());
                }
                Err(err) => tracing::warn!(%channel, %err, "cannot follow a stream's channel"),
            }
        }
        Ok(())
    }

    /// Waits until what was sent is written, unless the connection is cut off first: a
    /// client that does not read cannot make the node queue replies without end.
    pub async fn written(&self) -> Result<(), End> {
        if self.outbox.is_written() {
            return Ok(());
        }
        // Boxed: only a connection whose socket is full waits here; inline, the wait would
        // take room in every connection's task.
        Box::pin(self.flush()).await
    }

    async fn flush(&self) -> Result<(), End> {
        tokio::select! {
            biased;
            written = self.outbox.flush() => written.map_err(|_| End::Gone),
            _ = self.kick.token().cancelled() => Err(End::Close(self.kick.reason())),
        }
    }

    /// The connection's life with `transport`: `welcome` (with `session`), the transport's
    /// start, then what the client sends, heartbeats and timers until one side ends it; then
    /// out of the hub, counted, the transport's goodbye, the socket closed.
    ///
    /// (Not an `async fn`: its arguments would be kept twice in every connection's task, as
    /// arguments and as the locals they move into; the block captures them once.)
    pub fn run<'a, T: Transport<Framing = F> + 'a>(
        self,
        transport: T,
        session: Option<&'a str>,
    ) -> impl Future<Output = ()> + Send + 'a
    where
        F: 'a,
    {
        let mut conn = self;
        let mut transport = transport;
        async move {
            conn.welcome(session);
            let end = match transport.start(&mut conn).await {
                Ok(()) => conn.serve(&mut transport).await,
                Err(end) => end,
            };
            // A close the server decided says when to come back (jittered).
            let end = match end {
                End::Close(disconnect) => End::Close(disconnect.directed()),
                end => end,
            };
            conn.node.hub().remove_conn(conn.conn);
            counter!("fanout_ws_connections_closed_total", "reason" => end.reason()).increment(1);
            tracing::debug!(?end, "closing");
            transport.goodbye(&end, &conn.outbox);
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, conn.outbox.flush()).await;
            transport.close(&end, &conn.outbox).await;
            // Presence answers in flight may still hold the outbox: close the socket now.
            if let Some(stream) = conn.outbox.stream() {
                let _ = socket2::SockRef::from(stream).shutdown(std::net::Shutdown::Both);
            }
        }
    }

    async fn serve<T: Transport<Framing = F>>(&mut self, transport: &mut T) -> End {
        if let Err(end) = self.written().await {
            return end;
        }
        let config = self.node.config();
        let heartbeat = config.heartbeat();
        let frame_timeout = config.frame_timeout();
        let mut ticker =
            tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let kick = self.kick.clone();
        let cancelled = kick.token().cancelled();
        tokio::pin!(cancelled);
        let mut expires_at = self.session.identity().expires_at;
        let mut expiry = expires_at.map(deadline);
        // What the transport holds, charged to the node's budget; and while a message is
        // pending, the time by which it must be complete (boxed: most connections never
        // start one that does not complete in the same read).
        let mut holding = self.node.budget().charge();
        let mut stall: Option<(u64, Pin<Box<Sleep>>)> = None;
        let outbox = self.outbox.clone();
        let queued = outbox.is_queued();
        let mailbox = self.mailbox.clone();
        // Failed calls of the refresh hook in a row.
        let mut refreshes = 0;
        loop {
            match transport.pending() {
                None => stall = None,
                Some(message) if stall.as_ref().is_none_or(|(m, _)| *m != message) => {
                    stall = Some((message, Box::pin(tokio::time::sleep(frame_timeout))));
                }
                Some(_) => {}
            }
            if holding.set(transport.held()).is_err() {
                return End::Close(disconnect::TRY_AGAIN_LATER);
            }
            let step = tokio::select! {
                biased;
                _ = &mut cancelled => Err(End::Close(kick.reason())),
                _ = async { stall.as_mut().unwrap().1.as_mut().await }, if stall.is_some() => {
                    Err(End::Close(disconnect::FRAME_TIMEOUT))
                }
                // Boxed, as the orders below: rare, and their state would otherwise take room
                // in every connection's task.
                _ = async { expiry.as_mut().unwrap().await }, if expiry.is_some() => {
                    Box::pin(self.expired(&mut refreshes)).await
                }
                _ = outbox.waiting() => if queued {
                    transport.write_out(&outbox).await
                } else {
                    Box::pin(self.flush()).await
                },
                input = transport.input(&outbox) => transport.act(input, self).await,
                _ = async { mailbox.as_ref().unwrap().ready().await }, if mailbox.is_some() => {
                    Box::pin(self.obey()).await
                }
                _ = ticker.tick() => match transport.heartbeat(self) {
                    Ok(()) => self.written().await,
                    Err(end) => Err(end),
                },
            };
            if let Err(end) = step {
                return end;
            }
            if self.session.identity().expires_at != expires_at {
                // A refresh moved the deadline.
                expires_at = self.session.identity().expires_at;
                expiry = expires_at.map(deadline);
            }
        }
    }
}

/// Calls of the refresh hook that may fail in a row (a second apart) before an expired
/// connection is closed.
const REFRESH_TRIES: u32 = 3;

impl<F: Framing> Connection<F> {
    /// The connection's time is up: with the app's refresh hook, its answer extends it and a
    /// refusal closes it (4004); a backend that fails is asked again a second later, a few
    /// times. Without the hook, it closes (4004: the client should have sent `refresh`).
    async fn expired(&mut self, failures: &mut u32) -> Result<(), End> {
        let proxy = self.node.proxy();
        if !proxy.has(Hook::Refresh) {
            return Err(End::Close(disconnect::TOKEN_EXPIRED));
        }
        let identity = self.session.identity();
        let request = RefreshRequest {
            client: self.conn.to_string(),
            user: &identity.user,
            transport: F::TRANSPORT,
            node: self.node.id(),
        };
        let now = fanout::time::now_ms() / 1000;
        match proxy.call::<RefreshAnswer>(Hook::Refresh, &request).await {
            Ok(RefreshAnswer {
                expire_at: Some(expire_at),
                info,
            }) if expire_at > now => {
                *failures = 0;
                self.session.extend(expire_at, info);
                Ok(())
            }
            Ok(_) | Err(ProxyError::Refused { .. }) => Err(End::Close(disconnect::TOKEN_EXPIRED)),
            Err(err) if *failures + 1 >= REFRESH_TRIES => {
                tracing::debug!(%err, "the refresh hook failed; closing");
                Err(End::Close(disconnect::TOKEN_EXPIRED))
            }
            Err(err) => {
                *failures += 1;
                tracing::debug!(%err, "the refresh hook failed; asking again");
                self.session.extend(now + 1, None);
                Ok(())
            }
        }
    }

    /// Carries out the app's waiting orders, in order.
    async fn obey(&mut self) -> Result<(), End> {
        let orders = self.mailbox.as_ref().map(|m| m.take()).unwrap_or_default();
        for order in orders {
            self.session.obey(order).await;
            self.written().await?;
        }
        Ok(())
    }
}

/// What server-side control knows of a connection of `identity` (`user`) over `F`.
fn about<F: Framing>(user: Arc<str>, identity: &Identity, mailbox: Option<Arc<Mailbox>>) -> About {
    About {
        user,
        transport: F::TRANSPORT,
        since: fanout::time::now_ms(),
        jti: identity.jti.as_deref().map(Into::into),
        issued_at: identity.issued_at,
        mailbox,
    }
}

/// The timer of a token that expires at `unix_secs`.
fn deadline(unix_secs: u64) -> Pin<Box<Sleep>> {
    Box::pin(tokio::time::sleep_until(session::deadline(unix_secs)))
}

/// A long-poll's connection: out of the hub when dropped.
#[derive(Debug)]
pub(crate) struct Hidden<F: Framing>(Connection<F>);

impl<F: Framing> std::ops::Deref for Hidden<F> {
    type Target = Connection<F>;
    fn deref(&self) -> &Connection<F> {
        &self.0
    }
}

impl<F: Framing> Drop for Hidden<F> {
    fn drop(&mut self) {
        self.0.node.hub().remove_conn(self.0.conn);
    }
}

/// Where a stream starts on one of its channels.
#[derive(Debug)]
pub(crate) struct Start {
    pub channel: Channel,
    /// Where it resumes: the cursor's position, else "now" (the stream's last sequence when
    /// it started following the channel), so that a reconnect replays what it missed.
    pub resume: Option<Resume>,
    /// The cursor had a position for it: a `resumed` event says what came of it.
    pub resuming: bool,
}

/// The `resumed` frame of an HTTP stream's channel.
pub(crate) fn resumed(channel: &Channel, recovered: bool, replayed: usize) -> serde_json::Value {
    json!({ "channel": channel, "recovered": recovered, "replayed": replayed })
}

/// The span of a connection's task: it logs only at debug level, so the span (entered on
/// every poll) exists only when those logs are on.
pub(crate) fn connection_span(node: &Node, conn: &uuid::Uuid, user: &str) -> tracing::Span {
    if tracing::enabled!(target: "fanout_ws", tracing::Level::DEBUG) {
        tracing::info_span!(target: telemetry::LOG_CONTEXT, "conn", node_id = %node.id(), %conn, %user)
    } else {
        tracing::Span::none()
    }
}
