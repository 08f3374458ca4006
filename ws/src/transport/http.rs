//! The node's HTTP front: accepts TCP connections and serves each with hyper (HTTP/1.1), the
//! axum router answering, until a handler asks for the connection's socket itself.
//!
//! A WebSocket upgrade or an SSE stream [claims](Takeover::claim) the socket: once hyper has
//! written the response head (the `101`, or the SSE `200`) it lets go of the connection
//! (`without_shutdown` + `into_parts`), with any bytes it had read past the request, and the
//! handler's task gets the plain [`TcpStream`]. From then on fan-out writes into it directly
//! and nothing of hyper stays behind: no buffers, no task, no duplicated descriptor.
//!
//! On shutdown, idle keep-alive connections are closed and those with a request in progress
//! finish it (hyper's graceful shutdown); taken-over connections are the node's to drain.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{Router, extract::ConnectInfo};
use bytes::Bytes;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::oneshot,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::Service;

/// A socket a handler took over from the HTTP server.
#[derive(Debug)]
pub struct Taken {
    pub stream: TcpStream,
    /// What the server had read past the request (a client may send its first WebSocket
    /// frames right behind the handshake).
    pub read_ahead: Bytes,
}

/// Lets a handler take over the connection its request came on (a request extension).
#[derive(Debug, Clone, Default)]
pub struct Takeover(Arc<Mutex<Option<oneshot::Sender<Taken>>>>);

impl Takeover {
    /// Asks for this connection's socket, to be handed over once the response head is
    /// written. The response must end hyper's use of the connection: a `101`, or a response
    /// with `Connection: close` whose body ends at once. The receiver fails if the connection
    /// ended another way.
    pub fn claim(&self) -> oneshot::Receiver<Taken> {
        let (sender, receiver) = oneshot::channel();
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(sender);
        receiver
    }

    fn take(&self) -> Option<oneshot::Sender<Taken>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// How the HTTP front treats connections.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A request's head must arrive within this long (a connection that never finishes its
    /// request is not held forever).
    pub header_read_timeout: Duration,
}

/// Serves `router` on `listener` until `shutdown`; then stops accepting and waits, at most
/// `grace`, for the connections still being served over HTTP to finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: CancellationToken,
    grace: Duration,
) -> std::io::Result<()> {
    let connections = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of descriptors, say: wait a little rather than spin (axum::serve
                    // does the same).
                    tracing::warn!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        connections.spawn(connection(
            stream,
            peer,
            router.clone(),
            limits,
            shutdown.clone(),
        ));
    }
    drop(listener);
    connections.close();
    if tokio::time::timeout(grace, connections.wait())
        .await
        .is_err()
    {
        tracing::debug!("HTTP connections still open after {grace:?}; leaving them");
    }
    Ok(())
}

/// Serves one connection until it ends, or until a handler takes it over.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let takeover = Takeover::default();
    let service = {
        let takeover = takeover.clone();
        service_fn(move |request: hyper::Request<Incoming>| {
            let mut router = router.clone();
            let mut request = request.map(axum::body::Body::new);
            request.extensions_mut().insert(ConnectInfo(peer));
            request.extensions_mut().insert(takeover.clone());
            // Boxed, so that the connection future is `Unpin` (for graceful shutdown below).
            Box::pin(async move { router.call(request).await })
        })
    };
    let mut conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .serve_connection(TokioIo::new(stream), service);
    let mut stopping = false;
    let served = loop {
        tokio::select! {
            served = std::future::poll_fn(|cx| conn.poll_without_shutdown(cx)) => break served,
            _ = shutdown.cancelled(), if !stopping => {
                stopping = true;
                std::pin::Pin::new(&mut conn).graceful_shutdown();
            }
        }
    };
    if let Err(err) = served {
        tracing::debug!(%peer, %err, "HTTP connection ended");
        return;
    }
    if let Some(handover) = takeover.take() {
        let parts = conn.into_parts();
        // Registered with the runtime afresh: the old registration keeps the waker of this
        // task (hyper polled the socket through it), and with it this task's memory, for as
        // long as the connection lives (1.1 KiB each, measured).
        let stream = parts
            .io
            .into_inner()
            .into_std()
            .and_then(TcpStream::from_std);
        match stream {
            Ok(stream) => {
                let _ = handover.send(Taken {
                    stream,
                    read_ahead: parts.read_buf,
                });
            }
            Err(err) => tracing::warn!(%peer, %err, "cannot take over a connection's socket"),
        }
    }
}
