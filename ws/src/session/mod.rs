//! A connection's life in the protocol, whatever carries its bytes: who it is, what it may
//! do, and one handler per request op (the shape of mini-redis's `cmd/`, and of centrifuge's
//! transport-neutral `client.go`).
//!
//! A transport reads requests its own way (WebSocket frames; `POST /session/{conn}` for an SSE
//! stream) and hands each to [`Session::handle`]; the session answers through [`ReplyTo`] and
//! reaches its connection through a [`Conduit`] (events, replays, holding live frames back
//! while it subscribes). Nothing here knows a byte of any wire format beyond the protocol's
//! JSON.
//!
//! - [`state`]: the session (a connection's state in the protocol), how a request is
//!   answered or refused, its request rate (publishes, info updates, presence queries);
//! - this file: dispatch, `ping`, `refresh`;
//! - [`subscribe`] handles `subscribe` (with resume) and `unsubscribe`;
//! - [`publish`] handles `publish`;
//! - [`presence`] handles `presence` queries and `info`;
//! - [`rpc`] handles `rpc`, a request to the app's backend.

mod presence;
mod publish;
mod rpc;
mod state;
mod subscribe;

pub(crate) use state::Bucket;
pub use state::{ReplyTo, Session, deadline};
pub use subscribe::{JoinError, Resume};

use fanout::{Channel, Code};

use crate::{
    hub::Order,
    protocol::{self, Op, Request, RequestId},
};

impl Session {
    /// Joins `channel` outside any request (an HTTP stream's channels, as its URL names
    /// them), resuming from `resume`; `announce` runs with what a replay found, before the
    /// replayed events are written.
    pub async fn join(
        &self,
        channel: &Channel,
        resume: Option<Resume>,
        announce: impl FnOnce(Option<&crate::channel::Replay>),
    ) -> Result<(), JoinError> {
        let info = subscribe::ask(self, channel).await?;
        subscribe::join(self, channel, false, info, resume, announce).await
    }

    /// Joins `channel` with its presence changes, as a member with `info` in it (a Pusher
    /// presence channel's member: its `user_id` and `user_info`, signed by the app).
    pub async fn join_as(
        &self,
        channel: &Channel,
        info: Box<serde_json::value::RawValue>,
    ) -> Result<(), JoinError> {
        subscribe::join(self, channel, true, Some(info), None, |_| {}).await
    }

    /// The connection is `user`'s from now on (a Pusher connection's sign-in, checked by the
    /// dialect): the app's backend reaches it as `user`'s (`POST
    /// /v1/users/{user}/disconnect`, Pusher's `terminate_connections`), and it joins channels
    /// as `user`.
    pub fn sign_in(&mut self, user: &str) {
        self.identity.user = user.to_string();
        self.node.hub().conns().set_user(self.conn, user);
    }

    /// A Pusher client event on `channel` (checked by the dialect: a private or presence
    /// channel the connection is in): published for every other connection in it, within the
    /// publish rate.
    pub async fn client_event(&mut self, channel: Channel, data: fanout::Data) {
        publish::client_event(self, channel, data).await
    }

    /// Acts on one request (the JSON text of one protocol message) and sends its reply to
    /// `to`. A resuming `subscribe` sends its reply, then writes the replayed events, ahead of
    /// the live events it held back meanwhile.
    pub async fn handle(&mut self, text: &str, to: ReplyTo) {
        match protocol::parse(text) {
            Ok(request) => self.act(request, to).await,
            Err(rejection) => self.send(to, rejection.encode()),
        }
    }

    /// Acts on one parsed request and sends its reply to `to`.
    pub async fn act(&mut self, request: Request, to: ReplyTo) {
        let Request { id, op } = request;
        match op {
            Op::Ping => self.send(to, protocol::pong(id.as_ref())),
            Op::Subscribe {
                channel,
                since,
                epoch,
                presence,
                delta,
            } => {
                let request = subscribe::Subscribe {
                    id,
                    channel,
                    since,
                    epoch,
                    presence,
                    delta,
                };
                subscribe::subscribe(self, to, request).await;
            }
            Op::Unsubscribe(channel) => subscribe::unsubscribe(self, to, id, channel),
            Op::Publish {
                channel,
                data,
                volatile,
            } => publish::publish(self, to, id, channel, data, volatile).await,
            Op::Presence {
                channel,
                count_only,
            } => presence::query(self, to, id, channel, count_only),
            Op::Info { info } => presence::info(self, to, id, info),
            Op::Refresh { token } => self.refresh(to, id, &token),
            Op::Rpc { method, data } => rpc::rpc(self, to, id, method, data).await,
        }
    }

    /// Carries out one of the app's orders (`POST /v1/users/{user}/subscribe`,
    /// `/unsubscribe`): the client is told with a `subscribed` or `unsubscribed` frame it did
    /// not ask for (no `id`). A server-side subscription needs no permission of the token:
    /// the app's backend decided.
    pub async fn obey(&mut self, order: Order) {
        match order {
            Order::Subscribe(channel) => {
                let joined = subscribe::join(self, &channel, false, None, None, |replay| {
                    self.conduit
                        .send("subscribed", &subscribe::subscribed(&channel, None, replay));
                })
                .await;
                if let Err(err) = joined {
                    tracing::debug!(%channel, %err, "a server-side subscription failed");
                }
            }
            Order::Unsubscribe(channel) => {
                self.node.unsubscribe(self.conn, &channel);
                self.conduit
                    .send("unsubscribed", &protocol::unsubscribed(&channel, None));
            }
        }
    }

    /// Extends the connection to `expire_at` (unix seconds; the app's refresh hook's answer),
    /// with new presence `info` if it gave one.
    pub fn extend(&mut self, expire_at: u64, info: Option<serde_json::Value>) {
        self.identity.expires_at = Some(expire_at);
        if let Some(info) = info {
            let raw = serde_json::value::to_raw_value(&info).ok();
            self.identity.info = Some(info);
            self.node.set_info(self.conn, raw);
        }
    }

    /// `refresh`: a fresh token for the same user; the connection then runs on it (its new
    /// expiry and permissions).
    fn refresh(&mut self, to: ReplyTo, id: Option<RequestId>, token: &str) {
        match self.node.verifier().identify(Some(token), None) {
            Ok(fresh) if let Some(refused) = self.node.rules().refuses(&fresh) => {
                self.reject(to, id, "refresh", refused.code, refused.message)
            }
            Ok(fresh) if fresh.user == self.identity.user => {
                self.node
                    .hub()
                    .conns()
                    .set_token(self.conn, fresh.jti.as_deref(), fresh.issued_at);
                self.identity = fresh;
                self.send(
                    to,
                    protocol::refreshed(self.identity.expires_at, id.as_ref()),
                );
            }
            Ok(_) => self.reject(
                to,
                id,
                "refresh",
                Code::InvalidToken,
                "the new token is for another user",
            ),
            Err(err) => self.reject(to, id, "refresh", err.code, err.message),
        }
    }
}
