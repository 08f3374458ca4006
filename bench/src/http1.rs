//! A minimal HTTP/1.1 keep-alive client for the publishers: one request at a time per
//! connection, `Content-Length` answers only (what the API sends). It costs the load
//! generator a fraction of a general client's CPU, which on a 2-core machine is CPU left to
//! the servers being measured (the same reason `wrk` is used for such figures).

use std::io;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

pub struct Http1 {
    stream: TcpStream,
    host: String,
    buf: Vec<u8>,
    /// The server said `Connection: close` (Sockudo does after every answer): the next
    /// request goes on a new connection.
    closing: bool,
}

impl Http1 {
    /// `base`: `http://host:port`.
    pub async fn connect(base: &str) -> io::Result<Http1> {
        let host = base.trim_start_matches("http://").trim_end_matches('/');
        let stream = TcpStream::connect(host).await?;
        stream.set_nodelay(true)?;
        Ok(Http1 {
            stream,
            host: host.to_string(),
            buf: Vec::with_capacity(16 * 1024),
            closing: false,
        })
    }

    /// POSTs `body` as JSON to `path`; returns the status and the answer's body.
    pub async fn post(&mut self, path: &str, body: &[u8]) -> io::Result<(u16, Vec<u8>)> {
        let mut request = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.host,
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(body);
        if self.closing {
            *self = Http1::connect(&self.host).await?;
        }
        self.stream.write_all(&request).await?;
        self.read_answer().await
    }

    async fn read_answer(&mut self) -> io::Result<(u16, Vec<u8>)> {
        let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, why.to_string());
        let head_end = loop {
            if let Some(at) = find(&self.buf, b"\r\n\r\n") {
                break at + 4;
            }
            self.fill().await?;
        };
        let head = std::str::from_utf8(&self.buf[..head_end]).map_err(|_| bad("head not UTF-8"))?;
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("no status"))?;
        let length = content_length(head).ok_or_else(|| bad("no Content-Length"))?;
        self.closing = head.lines().any(|line| {
            line.split_once(':').is_some_and(|(name, value)| {
                name.eq_ignore_ascii_case("connection")
                    && value.trim().eq_ignore_ascii_case("close")
            })
        });
        while self.buf.len() < head_end + length {
            self.fill().await?;
        }
        let body = self.buf[head_end..head_end + length].to_vec();
        self.buf.drain(..head_end + length);
        Ok((status, body))
    }

    async fn fill(&mut self) -> io::Result<()> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

/// The `Content-Length` of an HTTP answer's head.
pub fn content_length(head: &str) -> Option<usize> {
    head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse().ok())?
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
