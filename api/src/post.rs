//! The webhook sender's HTTP client: one `POST` per batch over HTTP/1.1, on a connection of its
//! own, plain or TLS (tokio-rustls on ring, the system's roots plus `FANOUT_WEBHOOK_CA`), the
//! whole exchange bounded by the timeout.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::net::TcpStream;

/// Where webhooks go, and how.
#[derive(Clone)]
pub struct Poster {
    host: String,
    port: u16,
    /// Path and query, as the request line carries them.
    target: String,
    tls: Option<tokio_rustls::TlsConnector>,
    timeout: Duration,
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
    /// certificates in `ca` (a file; empty: none).
    pub fn new(url: &str, ca: &str, timeout: Duration) -> Result<Poster, String> {
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
            true => Some(connector(ca)?),
        };
        Ok(Poster {
            host: host.to_string(),
            port,
            target,
            tls,
            timeout,
        })
    }

    /// POSTs `body` with `headers`: the answer's status, or why there is none.
    pub async fn post(&self, headers: &[(&str, String)], body: Bytes) -> Result<u16, String> {
        tokio::time::timeout(self.timeout, self.exchange(headers, body))
            .await
            .map_err(|_| format!("no answer within {:?}", self.timeout))?
    }

    async fn exchange(&self, headers: &[(&str, String)], body: Bytes) -> Result<u16, String> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => self.request(TokioIo::new(tcp), headers, body).await,
            Some(tls) => {
                let name = ServerName::try_from(self.host.clone())
                    .map_err(|e| format!("server name: {e}"))?;
                let stream = tls
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS: {e}"))?;
                self.request(TokioIo::new(stream), headers, body).await
            }
        }
    }

    async fn request<T>(
        &self,
        io: T,
        headers: &[(&str, String)],
        body: Bytes,
    ) -> Result<u16, String>
    where
        T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| format!("HTTP: {e}"))?;
        let connection = tokio::spawn(connection);
        let host = match (self.tls.is_some(), self.port) {
            (false, 80) | (true, 443) => self.host.clone(),
            (_, port) => format!("{}:{port}", self.host),
        };
        let mut request = hyper::Request::post(&self.target).header("host", host);
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let request = request
            .body(Full::new(body))
            .map_err(|e| format!("request: {e}"))?;
        let status = sender
            .send_request(request)
            .await
            .map(|response| response.status().as_u16())
            .map_err(|e| format!("HTTP: {e}"));
        connection.abort();
        status
    }
}

/// A TLS connector trusting the system's roots and the certificates in `ca`.
fn connector(ca: &str) -> Result<tokio_rustls::TlsConnector, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if !ca.is_empty() {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
            .map_err(|e| format!("FANOUT_WEBHOOK_CA {ca:?}: {e}"))?
            .collect::<Result<_, _>>()
            .map_err(|e| format!("FANOUT_WEBHOOK_CA {ca:?}: {e}"))?;
        if certs.is_empty() {
            return Err(format!("FANOUT_WEBHOOK_CA {ca:?} holds no certificate"));
        }
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| format!("FANOUT_WEBHOOK_CA {ca:?}: {e}"))?;
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
        let p = Poster::new("http://example.com:8080/hooks?x=1", "", t).unwrap();
        assert_eq!(
            (p.host.as_str(), p.port, p.target.as_str()),
            ("example.com", 8080, "/hooks?x=1")
        );
        let p = Poster::new("http://example.com", "", t).unwrap();
        assert_eq!((p.port, p.target.as_str()), (80, "/"));
        let p = Poster::new("https://[::1]:8443/h", "", t).unwrap();
        assert_eq!(
            (p.host.as_str(), p.port, p.tls.is_some()),
            ("::1", 8443, true)
        );
        assert!(Poster::new("ftp://x/", "", t).is_err());
        assert!(Poster::new("http://:80/", "", t).is_err());
        assert!(Poster::new("https://x/", "/nonexistent.pem", t).is_err());
    }
}
