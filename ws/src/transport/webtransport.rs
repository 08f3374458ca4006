//! The WebTransport transport (HTTP/3 over QUIC, `FANOUT_WEBTRANSPORT_LISTEN`): a session at
//! `https://<node>/wt?user=…&token=…`, checked as `/ws` is ([`admit`]). The client opens one
//! bidirectional stream; the protocol's frames travel on it both ways, each preceded by its
//! length as a QUIC variable-length integer (RFC 9000, section 16). JSON frames, or, when the
//! client offers the `fanout.msgpack` subprotocol (`new WebTransport(url, {protocols:
//! ["fanout.msgpack"]})`), MessagePack ones ([`crate::msgpack`]).
//!
//! Its part of a connection ([`super::connection`]): its outbox is a queue
//! ([`Outbox::queued`]) that the connection's task writes into the stream, since a QUIC
//! stream is not a socket fan-out can write into; a session ends with
//! `CLOSE_WEBTRANSPORT_SESSION`, so a browser reads the close code and reason
//! (`WebTransport.closed`). Refusals before the session answer the CONNECT request with
//! their HTTP status (404 for another path; 401, 403 or 429 as `/ws` refuses).
//!
//! The certificate: `FANOUT_TLS_CERT` / `FANOUT_TLS_KEY`, else a self-signed ECDSA P-256
//! one valid for 13 days (browsers take a hash for at most 14) and renewed every 6, whose
//! SHA-256 the node announces with its URL (`GET /v1/nodes`: `webtransport.cert_hashes`) so
//! that a page can connect to a development node with `serverCertificateHashes`.

use std::{
    borrow::Cow,
    marker::PhantomData,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use fanout::discovery::WebTransportInfo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;
use uuid::Uuid;
use web_transport_quinn::{Session, proto::ConnectResponse, quinn};

use super::{
    admit::{Admitted, admit},
    connection::{Connection, End, Transport, connection_span},
};
use crate::{
    auth::Identity,
    disconnect,
    hub::ConnId,
    msgpack,
    node::Node,
    position::ChannelKey,
    protocol::Rejection,
    session::ReplyTo,
    sink::{Conduit, Datagrams, Framing, Kick, Outbox, Outgoing, Parts, Sink},
};

/// The path of a session.
pub const PATH: &str = "/wt";

/// A self-signed certificate's validity: browsers take `serverCertificateHashes` only for
/// certificates valid for at most 14 days.
const SELF_SIGNED_VALIDITY: Duration = Duration::from_secs(13 * 24 * 3600);

/// How often a self-signed certificate is replaced (the old one stays announced, and valid,
/// for the pages that fetched its hash before).
const RENEW_EVERY: Duration = Duration::from_secs(6 * 24 * 3600);

/// How long a client has to open its stream once the session is accepted.
const STREAM_WAIT: Duration = Duration::from_secs(10);

/// Most bytes read from the stream at once.
const READ_CHUNK: usize = 4096;

/// Most bytes written to the stream in one go from the outbox.
const WRITE_CHUNK: usize = 64 * 1024;

/// WebTransport framing: each frame is its length as a QUIC varint, then its JSON; the same
/// bytes for every connection.
#[derive(Debug, Default)]
pub struct WebTransport;

impl WebTransport {
    /// Its slot in [`Outgoing::framed`].
    const SLOT: usize = 2;
}

impl Framing for WebTransport {
    const TRANSPORT: &'static str = "webtransport";

    fn shared(&self, frame: &Outgoing) -> Bytes {
        frame.framed(Self::SLOT, |_, json| prefixed(json)).clone()
    }

    fn write(&mut self, _: ChannelKey, _: u64, shared: Bytes, out: &mut Parts) {
        out.push(shared);
    }

    fn own(&mut self, _: &str, json: &str) -> Bytes {
        prefixed(json.as_bytes())
    }
}

/// The session's subprotocol for MessagePack frames (the WebTransport constructor's
/// `protocols`, `WT-Available-Protocols` / `WT-Protocol`), as WebSocket's.
pub const MSGPACK: &str = super::websocket::MSGPACK;

/// WebTransport framing of the `fanout.msgpack` subprotocol: each frame is its length as a
/// QUIC varint, then its MessagePack ([`msgpack::from_json`]); a datagram is the MessagePack
/// alone.
#[derive(Debug, Default)]
pub struct WebTransportMsgpack;

impl WebTransportMsgpack {
    /// Its slot in [`Outgoing::framed`].
    const SLOT: usize = 4;
}

impl Framing for WebTransportMsgpack {
    const TRANSPORT: &'static str = "webtransport";

    fn shared(&self, frame: &Outgoing) -> Bytes {
        frame
            .framed(Self::SLOT, |_, json| prefixed(&msgpack::from_json(json)))
            .clone()
    }

    fn write(&mut self, _: ChannelKey, _: u64, shared: Bytes, out: &mut Parts) {
        out.push(shared);
    }

    fn own(&mut self, _: &str, json: &str) -> Bytes {
        prefixed(&msgpack::from_json(json.as_bytes()))
    }

    /// The stream's frame without its length: the same bytes, shared.
    fn datagram(frame: &Outgoing) -> Bytes {
        let framed = WebTransportMsgpack.shared(frame);
        let header = read_varint(&framed).map_or(0, |(_, header)| header);
        framed.slice(header..)
    }
}

/// How a session's frames are encoded: JSON, or (`fanout.msgpack`) MessagePack.
trait Codec: Framing + Default + Send + 'static {
    /// A client's frame as the protocol's JSON text; a rejection to answer with an `error`
    /// frame, or none when the session must close (JSON that is not UTF-8).
    fn text(payload: &[u8]) -> Result<Cow<'_, str>, Option<Rejection>>;
}

impl Codec for WebTransport {
    fn text(payload: &[u8]) -> Result<Cow<'_, str>, Option<Rejection>> {
        std::str::from_utf8(payload)
            .map(Cow::Borrowed)
            .map_err(|_| None)
    }
}

impl Codec for WebTransportMsgpack {
    fn text(payload: &[u8]) -> Result<Cow<'_, str>, Option<Rejection>> {
        msgpack::to_json(payload).map(Cow::Owned).map_err(Some)
    }
}

/// `payload` preceded by its length as a QUIC variable-length integer.
fn prefixed(payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len() + 8);
    put_varint(&mut out, payload.len() as u64);
    out.extend_from_slice(payload);
    out.freeze()
}

/// Appends `n` (below 2^62) as a QUIC variable-length integer (RFC 9000, 16): the shortest
/// of 1, 2, 4 or 8 bytes, the two high bits saying which.
pub fn put_varint(out: &mut BytesMut, n: u64) {
    match n {
        0..=0x3f => out.put_u8(n as u8),
        0x40..=0x3fff => out.put_u16(0x4000 | n as u16),
        0x4000..=0x3fff_ffff => out.put_u32(0x8000_0000 | n as u32),
        _ => out.put_u64(0xc000_0000_0000_0000 | n),
    }
}

/// Reads a QUIC variable-length integer from the front of `buf`: the value and its length,
/// or `None` when `buf` does not hold all of it yet.
pub fn read_varint(buf: &[u8]) -> Option<(u64, usize)> {
    let first = *buf.first()?;
    let len = 1usize << (first >> 6);
    let bytes = buf.get(..len)?;
    let mut value = u64::from(first & 0x3f);
    for byte in &bytes[1..] {
        value = (value << 8) | u64::from(*byte);
    }
    Some((value, len))
}

/// The certificate the listener presents, and the hashes a page may pin it by.
#[derive(Debug)]
pub struct Certificate {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// Made here (self-signed): renewed, and its hash announced.
    self_signed: bool,
}

impl Certificate {
    /// `cert` and `key` (PEM files) when given, else a fresh self-signed one for `names`.
    pub fn load(cert: &str, key: &str, names: &[String]) -> Result<Certificate, String> {
        if cert.is_empty() && key.is_empty() {
            return Certificate::self_signed(names);
        }
        let chain = CertificateDer::pem_file_iter(cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|err| format!("FANOUT_TLS_CERT {cert:?}: {err}"))?;
        if chain.is_empty() {
            return Err(format!("FANOUT_TLS_CERT {cert:?} holds no certificate"));
        }
        let key = PrivateKeyDer::from_pem_file(key)
            .map_err(|err| format!("FANOUT_TLS_KEY {key:?}: {err}"))?;
        Ok(Certificate {
            chain,
            key,
            self_signed: false,
        })
    }

    /// A self-signed ECDSA P-256 certificate for `names`, valid from a minute ago for
    /// [`SELF_SIGNED_VALIDITY`].
    pub fn self_signed(names: &[String]) -> Result<Certificate, String> {
        let fail = |err: rcgen::Error| format!("cannot make a self-signed certificate: {err}");
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(fail)?;
        let mut params = rcgen::CertificateParams::new(names.to_vec()).map_err(fail)?;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now - time::Duration::minutes(1)
            + time::Duration::seconds(SELF_SIGNED_VALIDITY.as_secs() as i64);
        let cert = params.self_signed(&key).map_err(fail)?;
        Ok(Certificate {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::try_from(key.serialize_der()).map_err(|err| err.to_string())?,
            self_signed: true,
        })
    }

    /// The SHA-256 of the leaf certificate, lowercase hex (what `serverCertificateHashes`
    /// takes, as bytes).
    pub fn hash(&self) -> String {
        let digest = ring::digest::digest(&ring::digest::SHA256, &self.chain[0]);
        digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// QUIC's server settings with this certificate: TLS 1.3, the `h3` ALPN, keep-alives
    /// every `keep_alive` so that an idle session stays open (and a dead peer is found).
    fn server_config(&self, keep_alive: Duration) -> Result<quinn::ServerConfig, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|err| err.to_string())?
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|err| format!("the WebTransport certificate: {err}"))?;
        tls.alpn_protocols = vec![web_transport_quinn::ALPN.as_bytes().to_vec()];
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
            .map_err(|err| err.to_string())?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(keep_alive));
        config.transport_config(Arc::new(transport));
        Ok(config)
    }
}

/// The node's WebTransport listener: what it announces, and its accept loop.
#[derive(Debug)]
pub struct Listener {
    endpoint: quinn::Endpoint,
    /// The certificate's hashes, newest first (with a self-signed one: the current and the
    /// one before it).
    hashes: Arc<Mutex<Vec<String>>>,
    url: String,
    renew: Option<Vec<String>>,
}

impl Listener {
    /// Binds `addr` (UDP) with `certificate`; `url` is what the node announces (`{port}`:
    /// the port it got).
    pub fn bind(
        addr: SocketAddr,
        certificate: Certificate,
        url: &str,
        names: Vec<String>,
        keep_alive: Duration,
    ) -> Result<Listener, String> {
        let config = certificate.server_config(keep_alive)?;
        let endpoint = quinn::Endpoint::server(config, addr)
            .map_err(|err| format!("cannot listen on FANOUT_WEBTRANSPORT_LISTEN {addr}: {err}"))?;
        // A page pins only a self-signed certificate; one from a CA is checked as usual.
        let hashes = match certificate.self_signed {
            true => vec![certificate.hash()],
            false => Vec::new(),
        };
        let port = endpoint.local_addr().map_err(|err| err.to_string())?.port();
        Ok(Listener {
            endpoint,
            hashes: Arc::new(Mutex::new(hashes)),
            url: url.replace("{port}", &port.to_string()),
            renew: certificate.self_signed.then_some(names),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// What the node announces, read afresh each time (a renewal changes the hashes): its
    /// URL and the hashes of its certificates.
    pub fn announcement(&self) -> impl Fn() -> WebTransportInfo + Send + Sync + 'static {
        let (url, hashes) = (self.url.clone(), self.hashes.clone());
        move || WebTransportInfo {
            url: url.clone(),
            cert_hashes: hashes.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        }
    }

    /// Accepts sessions until `shutdown`, each a connection of `node` tracked by `tracker`;
    /// renews a self-signed certificate meanwhile.
    pub async fn serve(
        self,
        node: Arc<Node>,
        tracker: TaskTracker,
        shutdown: CancellationToken,
        keep_alive: Duration,
    ) {
        if let Some(names) = self.renew.clone() {
            let (endpoint, hashes) = (self.endpoint.clone(), self.hashes.clone());
            let shutdown = shutdown.clone();
            tracker.spawn(async move {
                let mut every = tokio::time::interval_at(
                    tokio::time::Instant::now() + RENEW_EVERY,
                    RENEW_EVERY,
                );
                loop {
                    tokio::select! {
                        _ = every.tick() => {}
                        _ = shutdown.cancelled() => return,
                    }
                    match Certificate::self_signed(&names)
                        .and_then(|cert| Ok((cert.server_config(keep_alive)?, cert.hash())))
                    {
                        Ok((config, hash)) => {
                            endpoint.set_server_config(Some(config));
                            let mut hashes = hashes.lock().unwrap_or_else(|e| e.into_inner());
                            hashes.insert(0, hash);
                            hashes.truncate(2);
                            tracing::info!("renewed the WebTransport certificate");
                        }
                        Err(err) => {
                            tracing::error!(%err, "cannot renew the WebTransport certificate")
                        }
                    }
                }
            });
        }
        let mut server = web_transport_quinn::Server::new(self.endpoint.clone());
        loop {
            let request = tokio::select! {
                request = server.accept() => match request {
                    Some(request) => request,
                    None => break,
                },
                _ = shutdown.cancelled() => break,
            };
            let node = node.clone();
            tracker.spawn(accept(request, node));
        }
        // New sessions are refused from now on; open ones end with the node's drain.
        self.endpoint.set_server_config(None);
    }
}

/// Starts the node's WebTransport listener when `FANOUT_WEBTRANSPORT_LISTEN` asks for one:
/// what the node then announces about it.
pub fn start(
    node: &Arc<Node>,
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<Option<Box<dyn Fn() -> WebTransportInfo + Send + Sync>>, crate::RunError> {
    let config = node.config();
    let Some(addr) = config.webtransport_addr()? else {
        return Ok(None);
    };
    let names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        node.id().to_string(),
    ];
    let certificate = Certificate::load(&config.tls_cert, &config.tls_key, &names)
        .map_err(crate::RunError::WebTransport)?;
    let url = match config.webtransport_public_url.trim() {
        "" => "https://{host}:{port}/wt".to_string(),
        url => url.replace("{node}", node.id()),
    };
    // QUIC's keep-alives keep an idle session open and find a dead peer; its idle timeout
    // (30 s) must not pass between two of them.
    let keep_alive = config.heartbeat().min(Duration::from_secs(10));
    let listener = Listener::bind(addr, certificate, &url, names, keep_alive)
        .map_err(crate::RunError::WebTransport)?;
    tracing::info!(addr = %listener.local_addr()?, url = %listener.url, "WebTransport listening");
    let announcement = listener.announcement();
    tasks.spawn(listener.serve(node.clone(), tasks.clone(), shutdown.clone(), keep_alive));
    Ok(Some(Box::new(announcement)))
}

/// Checks one session request; accepted, runs its connection.
async fn accept(request: web_transport_quinn::Request, node: Arc<Node>) {
    let peer = request.conn().remote_address();
    if request.url.path() != PATH {
        let _ = request
            .reject(web_transport_quinn::http::StatusCode::NOT_FOUND)
            .await;
        return;
    }
    let query: Vec<(String, String)> = request.url.query_pairs().into_owned().collect();
    let param = |name: &str| {
        query
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    };
    let admitted = admit(
        &node,
        peer,
        &request.headers,
        param("token"),
        param("user"),
        "webtransport",
    )
    .await;
    let Admitted { identity, permit } = match admitted {
        Ok(admitted) => admitted,
        Err(refusal) => {
            tracing::debug!(%peer, code = refusal.code.as_str(), message = %refusal.message, "WebTransport session refused");
            let _ = request.reject(refusal.status).await;
            return;
        }
    };
    let msgpack = request.protocols.iter().any(|p| p == MSGPACK);
    let response = match msgpack {
        true => ConnectResponse::OK.with_protocol(MSGPACK),
        false => ConnectResponse::OK,
    };
    let Ok(session) = request.respond(response).await else {
        return;
    };
    let conn = Uuid::new_v4();
    let span = connection_span(&node, &conn, &identity.user);
    match msgpack {
        true => {
            serve::<WebTransportMsgpack>(session, node, conn, identity)
                .instrument(span)
                .await
        }
        false => {
            serve::<WebTransport>(session, node, conn, identity)
                .instrument(span)
                .await
        }
    }
    drop(permit);
}

/// A session's life: its stream, then the connection on it.
async fn serve<C: Codec>(session: Session, node: Arc<Node>, conn: ConnId, identity: Identity) {
    let (send, recv) = match tokio::time::timeout(STREAM_WAIT, session.accept_bi()).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(_)) => return,
        Err(_) => {
            let reason = disconnect::PROTOCOL_ERROR;
            session.close(
                u32::from(reason.code),
                b"open a bidirectional stream for the protocol's frames",
            );
            return;
        }
    };
    // Volatile events as datagrams, one frame each (its JSON, without a length: a datagram
    // is one frame); one too large for a datagram takes the stream.
    let datagrams = session.clone();
    let datagrams: Datagrams = Box::new(move |json| datagrams.send_datagram(json).is_ok());
    let connection = Connection::queued(node, conn, identity, C::default(), Some(datagrams));
    let transport = Stream::<C> {
        session,
        send,
        recv,
        buf: BytesMut::new(),
        messages: 0,
        codec: PhantomData,
    };
    connection.run(transport, None).await;
}

/// The WebTransport transport's own part of a connection: its stream's frames, read as they
/// come and written from the outbox; its session's close.
struct Stream<C> {
    session: Session,
    send: web_transport_quinn::SendStream,
    recv: web_transport_quinn::RecvStream,
    /// Bytes read and not yet a whole frame.
    buf: BytesMut,
    /// Whole messages so far (which one a pending frame belongs to).
    messages: u64,
    codec: PhantomData<fn() -> C>,
}

/// What the stream gave: bytes, its end, or an error (the session is gone).
type Read = Result<Option<Bytes>, ()>;

impl<C: Codec> Stream<C> {
    /// Acts on every whole frame the buffer holds.
    async fn messages(&mut self, conn: &mut Connection<C>) -> Result<(), End> {
        let max = conn.node.config().max_message_bytes;
        loop {
            let Some((len, header)) = read_varint(&self.buf) else {
                return Ok(());
            };
            if len > max as u64 {
                return Err(End::Close(disconnect::MESSAGE_TOO_BIG));
            }
            let len = len as usize;
            if self.buf.len() < header + len {
                return Ok(());
            }
            self.buf.advance(header);
            let payload = self.buf.split_to(len);
            if self.buf.is_empty() {
                // Give the memory back: an idle connection keeps no read buffer.
                self.buf = BytesMut::new();
            }
            if len == 0 {
                continue; // a keep-alive
            }
            self.messages += 1;
            match C::text(&payload) {
                // Boxed: answering may await a publish or a replay (see websocket.rs).
                Ok(text) => Box::pin(conn.session.handle(&text, ReplyTo::Stream)).await,
                Err(Some(rejection)) => conn.outbox.send("error", &rejection.encode()),
                Err(None) => return Err(End::Close(disconnect::INVALID_DATA)),
            }
            conn.written().await?;
        }
    }

    /// Writes what waits in the outbox into the stream, unless the connection is cut off
    /// first (a client that does not read stalls the stream).
    async fn write_all(&mut self, outbox: &Outbox<C>) -> Result<(), End> {
        let kick: Kick = outbox.kick().clone();
        loop {
            let parts = outbox.drain(WRITE_CHUNK);
            if parts.is_empty() {
                return Ok(());
            }
            for part in parts {
                tokio::select! {
                    biased;
                    written = self.send.write_all(&part) => written.map_err(|_| End::Gone)?,
                    _ = kick.token().cancelled() => return Err(End::Close(kick.reason())),
                }
            }
        }
    }
}

impl<C: Codec> Transport for Stream<C> {
    type Framing = C;
    type Input = Read;

    async fn input(&mut self, _: &Outbox<C>) -> Read {
        match self.recv.read_chunk(READ_CHUNK, true).await {
            Ok(Some(chunk)) => Ok(Some(chunk.bytes)),
            Ok(None) => Ok(None),
            Err(_) => Err(()),
        }
    }

    async fn act(&mut self, read: Read, conn: &mut Connection<C>) -> Result<(), End> {
        match read {
            Ok(Some(bytes)) => {
                self.buf.extend_from_slice(&bytes);
                self.messages(conn).await
            }
            // The client finished its stream: it is leaving.
            Ok(None) => Err(End::ClientClosed(None)),
            Err(()) => Err(End::Gone),
        }
    }

    fn pending(&self) -> Option<u64> {
        (!self.buf.is_empty()).then_some(self.messages)
    }

    fn held(&self) -> usize {
        self.buf.capacity()
    }

    /// QUIC keeps the session alive and finds a dead peer (its keep-alives, its idle
    /// timeout): nothing to write.
    fn heartbeat(&mut self, _: &Connection<C>) -> Result<(), End> {
        Ok(())
    }

    fn goodbye(&self, _: &End, _: &Outbox<C>) {}

    async fn write_out(&mut self, outbox: &Outbox<C>) -> Result<(), End> {
        self.write_all(outbox).await
    }

    async fn close(&mut self, end: &End, outbox: &Outbox<C>) {
        let (code, reason) = match end {
            End::Gone => return,
            End::ClientClosed(code) => (code.unwrap_or(1000), "".into()),
            End::Close(disconnect) => (disconnect.code, disconnect.close_reason()),
        };
        // What is still queued (the last replies), within the goodbye's time.
        let _ = tokio::time::timeout(Duration::from_secs(1), self.write_all(outbox)).await;
        self.session.close(u32::from(code), reason.as_bytes());
        // Held until the connection is closed: dropped earlier, the session's streams would
        // be stopped ahead of the close capsule, and a browser would see "connection lost"
        // instead of the code and reason.
        let _ = tokio::time::timeout(Duration::from_secs(1), self.session.closed()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip_in_their_shortest_form() {
        for (n, len) in [
            (0u64, 1),
            (63, 1),
            (64, 2),
            (16383, 2),
            (16384, 4),
            (1 << 30, 8),
        ] {
            let mut out = BytesMut::new();
            put_varint(&mut out, n);
            assert_eq!(out.len(), len, "{n}");
            assert_eq!(read_varint(&out), Some((n, len)));
            assert_eq!(read_varint(&out[..len - 1]), None, "{n}: incomplete");
        }
        // RFC 9000, A.1's examples.
        assert_eq!(read_varint(&[0x25]), Some((37, 1)));
        assert_eq!(read_varint(&[0x7b, 0xbd]), Some((15293, 2)));
        assert_eq!(read_varint(&[0x9d, 0x7f, 0x3e, 0x7d]), Some((494878333, 4)));
    }

    #[test]
    fn an_event_is_framed_once_for_every_connection() {
        let event = Outgoing::event(7, r#"{"op":"event"}"#);
        let a = WebTransport.shared(&event);
        let b = WebTransport.shared(&event);
        assert_eq!(a.as_ptr(), b.as_ptr());
        assert_eq!(&a[..], b"\x0e{\"op\":\"event\"}");
    }

    #[test]
    fn a_self_signed_certificate_is_short_lived_ecdsa() {
        let cert = Certificate::self_signed(&["localhost".into()]).unwrap();
        assert_eq!(cert.hash().len(), 64);
        assert!(cert.self_signed);
        assert!(cert.server_config(Duration::from_secs(10)).is_ok());
    }
}
