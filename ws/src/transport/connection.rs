//! A connection's life on the node, whatever its transport.

use fanout::telemetry;

use crate::node::Node;

/// The span of a connection's task: it logs only at debug level, so the span (entered on
/// every poll) exists only when those logs are on.
pub(crate) fn connection_span(node: &Node, conn: &uuid::Uuid, user: &str) -> tracing::Span {
    if tracing::enabled!(target: "fanout_ws", tracing::Level::DEBUG) {
        tracing::info_span!(target: telemetry::LOG_CONTEXT, "conn", node_id = %node.id(), %conn, %user)
    } else {
        tracing::Span::none()
    }
}
