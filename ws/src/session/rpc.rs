//! `rpc`: a client's request to the app's backend through its realtime connection
//! (`FANOUT_PROXY_RPC_URL`), on every transport; the reply carries the backend's `result`.

use fanout::Code;
use serde_json::Value;

use super::state::{ReplyTo, Session};
use crate::{
    protocol::{self, RequestId},
    proxy::{Hook, RpcAnswer, RpcRequest},
};

pub(super) async fn rpc(
    session: &mut Session,
    to: ReplyTo,
    id: Option<RequestId>,
    method: String,
    data: Value,
) {
    let proxy = session.node.proxy();
    if !proxy.has(Hook::Rpc) {
        let message = "rpc goes to the app's backend, and this node has none \
                       (FANOUT_PROXY_RPC_URL)";
        return session.reject(to, id, "rpc", Code::UnsupportedOp, message);
    }
    if !session.requests.take() {
        return session.rate_limited(to, id, "rpc");
    }
    let request = RpcRequest {
        client: session.conn.to_string(),
        user: &session.identity.user,
        method: &method,
        data: &data,
    };
    match proxy.call::<RpcAnswer>(Hook::Rpc, &request).await {
        Ok(answer) => session.send(to, protocol::rpc_result(&answer.result, id.as_ref())),
        Err(err) => session.refuse(to, id, "rpc", err),
    }
}
