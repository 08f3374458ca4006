//! The HTTP client of fanout's calls to the app's backend: lifecycle webhooks (the API's
//! sender, one `POST` per batch) and proxy hooks (a ws node's `connect`, `subscribe`, ...).
//! `POST`s over HTTP/1.1, plain or TLS (tokio-rustls on ring with its own provider, the
//! system's roots plus a CA file), the whole exchange bounded by the timeout. Connections are
//! kept and reused (at most [`IDLE`] idle): a proxy hook runs on every connect, and a new TCP
//! (and TLS) connection per call would be most of its cost.
//!
//! Hand-written over hyper's connection API rather than reqwest: reqwest's rustls needs a
//! process-wide crypto provider, and this is the one request shape fanout makes.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::net::TcpStream;

/// Most idle connections a [`Poster`] keeps.
pub const IDLE: usize = 64;
/// Largest answer body read.
pub const MAX_ANSWER: usize = 1 << 20;

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// Where requests go, and how. Cheap to clone (the idle connections are shared).
#[derive(Clone)]
pub struct Poster {
    host: String,
    port: u16,
    /// Path and query, as the request line carries them.
    target: String,
    tls: Option<tokio_rustls::TlsConnector>,
    timeout: Duration,
    idle: Arc<Mutex<Vec<Sender>>>,
}

/// Why a call has no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PostError {
    /// Nothing within the timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The connection, TLS or HTTP failed (the message says which).
    #[error("{0}")]
    Failed(String),
}

impl std::fmt::Debug for Poster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Poster")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("target", &self.target)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl Poster {
    /// For `url` (`http://` or `https://`), trusting the system's roots and the PEM
    /// certificates in `ca` (a file; empty: none; `ca_setting` names it in errors).
    pub fn new(url: &str, ca: &str, ca_setting: &str, timeout: Duration) -> Result<Poster, String> {
        let (https, rest) = match url.split_once("://") {
            Some(("http", rest)) => (false, rest),
            Some(("https", rest)) => (true, rest),
            _ => return Err(format!("{url:?} is not an http:// or https:// URL")),
        };
        let (authority, target) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].to_string()),
            None => (rest, "/".to_string()),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) if !host.ends_with(']') || authority.starts_with('[') => (
                host.trim_start_matches('[').trim_end_matches(']'),
                port.parse::<u16>()
                    .map_err(|_| format!("{url:?}: the port is not a number"))?,
            ),
            _ => (authority, if https { 443 } else { 80 }),
        };
        if host.is_empty() {
            return Err(format!("{url:?} has no host"));
        }
        let tls = match https {
            false => None,
            true => Some(connector(ca, ca_setting)?),
        };
        Ok(Poster {
            host: host.to_string(),
            port,
            target,
            tls,
            timeout,
            idle: Arc::default(),
        })
    }

    /// POSTs `body` with `headers`: the answer's status, or why there is none.
    pub async fn post(&self, headers: &[(&str, String)], body: Bytes) -> Result<u16, String> {
        self.call(headers, body)
            .await
            .map(|(status, _)| status)
            .map_err(|err| err.to_string())
    }

    /// POSTs `body` with `headers`: the answer's status and body (at most [`MAX_ANSWER`]
    /// bytes), or why there is none, within the timeout.
    pub async fn call(
        &self,
        headers: &[(&str, String)],
        body: Bytes,
    ) -> Result<(u16, Bytes), PostError> {
        tokio::time::timeout(self.timeout, self.exchange(headers, body))
            .await
            .map_err(|_| PostError::Timeout(self.timeout))?
            .map_err(PostError::Failed)
    }

    async fn exchange(
        &self,
        headers: &[(&str, String)],
        body: Bytes,
    ) -> Result<(u16, Bytes), String> {
        let request = self.request(headers, body)?;
        // An idle connection first; one the server closed meanwhile is not ready (nothing is
        // sent on it: a request is never sent twice), and the request goes on the next.
        while let Some(mut sender) = self.take_idle() {
            if sender.ready().await.is_err() {
                continue;
            }
            let answer = self.send(&mut sender, request).await?;
            self.keep(sender);
            return Ok(answer);
        }
        let mut sender = self.connect().await?;
        let answer = self.send(&mut sender, request).await?;
        self.keep(sender);
        Ok(answer)
    }

    fn request(
        &self,
        headers: &[(&str, String)],
        body: Bytes,
    ) -> Result<hyper::Request<Full<Bytes>>, String> {
        let host = match (self.tls.is_some(), self.port) {
            (false, 80) | (true, 443) => self.host.clone(),
            (_, port) => format!("{}:{port}", self.host),
        };
        let mut request = hyper::Request::post(&self.target).header("host", host);
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        request
            .body(Full::new(body))
            .map_err(|e| format!("request: {e}"))
    }

    async fn send(
        &self,
        sender: &mut Sender,
        request: hyper::Request<Full<Bytes>>,
    ) -> Result<(u16, Bytes), String> {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("HTTP: {e}"))?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        Ok((status, body))
    }

    fn take_idle(&self) -> Option<Sender> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }

    fn keep(&self, sender: Sender) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < IDLE && !sender.is_closed() {
            idle.push(sender);
        }
    }

    async fn connect(&self) -> Result<Sender, String> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => handshake(TokioIo::new(tcp)).await,
            Some(tls) => {
                let name = ServerName::try_from(self.host.clone())
                    .map_err(|e| format!("server name: {e}"))?;
                let stream = tls
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS: {e}"))?;
                handshake(TokioIo::new(stream)).await
            }
        }
    }
}

/// An HTTP/1.1 connection over `io`: its sender; the connection runs until the sender is
/// dropped (or the server closes it).
async fn handshake<T>(io: T) -> Result<Sender, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// A TLS connector trusting the system's roots and the certificates in `ca` (`setting`).
fn connector(ca: &str, setting: &str) -> Result<tokio_rustls::TlsConnector, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if !ca.is_empty() {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
            .map_err(|e| format!("{setting} {ca:?}: {e}"))?
            .collect::<Result<_, _>>()
            .map_err(|e| format!("{setting} {ca:?}: {e}"))?;
        if certs.is_empty() {
            return Err(format!("{setting} {ca:?} holds no certificate"));
        }
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| format!("{setting} {ca:?}: {e}"))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_read_or_refused() {
        let t = Duration::from_secs(1);
        let p = Poster::new("http://example.com:8080/hooks?x=1", "", "CA", t).unwrap();
        assert_eq!(
            (p.host.as_str(), p.port, p.target.as_str()),
            ("example.com", 8080, "/hooks?x=1")
        );
        let p = Poster::new("http://example.com", "", "CA", t).unwrap();
        assert_eq!((p.port, p.target.as_str()), (80, "/"));
        let p = Poster::new("https://[::1]:8443/h", "", "CA", t).unwrap();
        assert_eq!(
            (p.host.as_str(), p.port, p.tls.is_some()),
            ("::1", 8443, true)
        );
        assert!(Poster::new("ftp://x/", "", "CA", t).is_err());
        assert!(Poster::new("http://:80/", "", "CA", t).is_err());
        assert!(Poster::new("https://x/", "/nonexistent.pem", "CA", t).is_err());
    }
}
