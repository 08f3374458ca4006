//! Clients of the HTTP transports: an SSE stream read by hand (every field as `EventSource`
//! parses it), long-polls, and `POST /session`.

use std::time::Duration;

use serde_json::Value;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use super::{Server, WAIT, within};

/// One event of an SSE stream.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    /// The `event:` field (`message` when absent, as in `EventSource`).
    pub event: String,
    pub data: Value,
    /// The `id:` field, if the event had one.
    pub id: Option<String>,
}

/// A client of `GET /sse`.
pub struct SseClient {
    stream: TcpStream,
    buf: Vec<u8>,
    /// The `welcome` event's data.
    pub welcome: Value,
    /// The last `id:` seen: what `EventSource` would send as `Last-Event-ID`.
    pub last_id: Option<String>,
    /// Comment lines (heartbeats) read so far.
    pub comments: usize,
    /// The response head, as sent.
    pub head: String,
}

/// An HTTP answer that was not a stream: its status and JSON body.
#[derive(Debug)]
pub struct Refused {
    pub status: u16,
    pub body: Value,
    pub head: String,
}

impl SseClient {
    /// Opens `/sse?<query>` on `server` (with `Last-Event-ID: <last_event_id>`), and reads
    /// up to its `welcome`.
    pub async fn connect(
        server: &Server,
        query: &str,
        last_event_id: Option<&str>,
    ) -> Result<SseClient, Refused> {
        Self::connect_with(server, query, last_event_id, &[]).await
    }

    /// [`SseClient::connect`] with extra request headers.
    pub async fn connect_with(
        server: &Server,
        query: &str,
        last_event_id: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Result<SseClient, Refused> {
        within("an SSE stream to open", async {
            let mut stream = TcpStream::connect(server.addr).await.unwrap();
            let mut request = format!("GET /sse?{query} HTTP/1.1\r\nHost: test\r\n");
            if let Some(id) = last_event_id {
                request.push_str(&format!("Last-Event-ID: {id}\r\n"));
            }
            for (name, value) in headers {
                request.push_str(&format!("{name}: {value}\r\n"));
            }
            request.push_str("\r\n");
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut buf = Vec::new();
            let end = loop {
                if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break end;
                }
                let mut chunk = [0u8; 4096];
                let n = stream.read(&mut chunk).await.unwrap();
                assert!(n > 0, "closed before answering: {buf:?}");
                buf.extend_from_slice(&chunk[..n]);
            };
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            buf.drain(..end + 4);
            let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
            if status != 200 {
                // The rest is a JSON body of Content-Length bytes.
                let length: usize = head
                    .lines()
                    .find_map(|l| {
                        let (name, value) = l.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                while buf.len() < length {
                    let mut chunk = [0u8; 4096];
                    let n = stream.read(&mut chunk).await.unwrap();
                    assert!(n > 0);
                    buf.extend_from_slice(&chunk[..n]);
                }
                let body = serde_json::from_slice(&buf[..length]).unwrap_or(Value::Null);
                return Err(Refused { status, body, head });
            }
            let mut client = SseClient {
                stream,
                buf,
                welcome: Value::Null,
                last_id: last_event_id.map(String::from),
                comments: 0,
                head: String::new(),
            };
            let first = client.next().await.expect("a welcome");
            assert_eq!(first.event, "welcome", "{first:?}");
            client.welcome = first.data;
            client.head = head;
            Ok(client)
        })
        .await
    }

    /// The next event (comments are counted and skipped); `None` once the stream ended.
    pub async fn next(&mut self) -> Option<SseEvent> {
        let (mut event, mut data, mut id) = (None::<String>, Vec::<String>::new(), None::<String>);
        loop {
            while let Some(end) = self.buf.iter().position(|b| *b == b'\n') {
                let line = String::from_utf8(self.buf[..end].to_vec()).expect("UTF-8 lines");
                self.buf.drain(..=end);
                let line = line.strip_suffix('\r').unwrap_or(&line).to_string();
                if line.is_empty() {
                    // As `EventSource`: the id is taken even from an event with no data
                    // (which is not dispatched).
                    if let Some(id) = &id {
                        self.last_id = Some(id.clone());
                    }
                    if data.is_empty() && event.is_none() {
                        id = None;
                        continue;
                    }
                    let data = data.join("\n");
                    return Some(SseEvent {
                        event: event.unwrap_or_else(|| "message".into()),
                        data: serde_json::from_str(&data)
                            .unwrap_or_else(|e| panic!("data is not JSON ({e}): {data:?}")),
                        id,
                    });
                }
                if line.starts_with(':') {
                    self.comments += 1;
                    continue;
                }
                let (field, value) = line.split_once(':').unwrap_or((&line, ""));
                let value = value.strip_prefix(' ').unwrap_or(value).to_string();
                match field {
                    "event" => event = Some(value),
                    "data" => data.push(value),
                    "id" => id = Some(value),
                    _ => {}
                }
            }
            let mut chunk = [0u8; 8192];
            match self.stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The next event, bounded by [`WAIT`]; panics if the stream ends first.
    pub async fn recv(&mut self) -> SseEvent {
        within("an SSE event", self.next())
            .await
            .expect("the stream ended")
    }

    /// The next `event` event's frame (other events are not expected).
    pub async fn event(&mut self) -> Value {
        let event = self.recv().await;
        assert_eq!(event.event, "event", "{event:?}");
        event.data
    }

    /// The next event whose `event:` is `name`, skipping others.
    pub async fn until(&mut self, name: &str) -> SseEvent {
        loop {
            let event = self.recv().await;
            if event.event == name {
                return event;
            }
        }
    }

    /// Reads until the stream ends; returns the `disconnect` event's data, if one came.
    pub async fn ended(&mut self) -> Option<Value> {
        within("the stream to end", async {
            let mut disconnect = None;
            while let Some(event) = self.next().await {
                if event.event == "disconnect" {
                    disconnect = Some(event.data);
                }
            }
            disconnect
        })
        .await
    }

    pub fn conn(&self) -> String {
        self.welcome["conn"].as_str().unwrap().to_string()
    }

    pub fn secret(&self) -> String {
        self.welcome["session"].as_str().unwrap().to_string()
    }

    /// `POST /session/{conn}` with this stream's secret: (status, answer).
    pub async fn request(&self, server: &Server, request: Value) -> (u16, Value) {
        session_request(
            server,
            &self.conn(),
            Some(&self.secret()),
            &request.to_string(),
        )
        .await
    }
}

/// `POST /session/{conn}` with `secret` (if any) and `body`: (status, JSON answer).
pub async fn session_request(
    server: &Server,
    conn: &str,
    secret: Option<&str>,
    body: &str,
) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .post(server.url(&format!("/session/{conn}")))
        .body(body.to_string());
    if let Some(secret) = secret {
        request = request.header("Authorization", format!("Bearer {secret}"));
    }
    let response = within("a session request", request.send()).await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// One `GET /poll?<query>`: (status, JSON answer).
pub async fn poll(server: &Server, query: &str) -> (u16, Value) {
    let response = tokio::time::timeout(
        WAIT + Duration::from_secs(60),
        reqwest::get(server.url(&format!("/poll?{query}"))),
    )
    .await
    .expect("a poll answer")
    .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// `s`, escaped for a query string.
pub fn escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
