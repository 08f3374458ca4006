//! Plain HTTP/1.0 GETs on loopback, for monitoring endpoints (nats-server's `/jsz`, a node's
//! `/readyz`): no client library, one connection per request.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An answer: its status and body.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

impl Answer {
    /// The body as JSON (`Null` when it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_default()
    }
}

fn request(authority: &str, path: &str) -> String {
    format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\n\r\n")
}

fn answer(response: &[u8]) -> Option<Answer> {
    let text = String::from_utf8_lossy(response);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some(Answer {
        status,
        body: body.to_string(),
    })
}

/// `GET http://<authority><path>`; `None` when nothing answers within 5 s.
pub async fn get(authority: &str, path: &str) -> Option<Answer> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(authority).await.ok()?;
        stream
            .write_all(request(authority, path).as_bytes())
            .await
            .ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        answer(&response)
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .ok()
        .flatten()
}

/// [`get`] on this thread, without a runtime.
pub fn get_blocking(authority: &str, path: &str) -> Option<Answer> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(authority).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream.write_all(request(authority, path).as_bytes()).ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).ok()?;
    answer(&response)
}

/// Waits until `http://<authority>/readyz` answers 200, at most `bound`.
pub async fn wait_ready(authority: &str, bound: Duration) {
    crate::wait::eventually_within(
        bound,
        &format!("{authority}/readyz to answer 200"),
        || async {
            get(authority, "/readyz")
                .await
                .is_some_and(|a| a.status == 200)
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_status_and_body() {
        let a = answer(b"HTTP/1.1 503 Service Unavailable\r\nx: y\r\n\r\n{\"a\":1}").unwrap();
        assert_eq!(a.status, 503);
        assert_eq!(a.json()["a"], 1);
        assert!(answer(b"HTTP/1.1 200 OK\r\n").is_none());
    }
}
