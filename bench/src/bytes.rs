//! `fanout-bench bytes`: what each event costs on the wire, measured on the socket (every
//! byte a client reads, WebSocket framing included), for each way a client can take a
//! channel: JSON, MessagePack, each with permessage-deflate, with fossil deltas, and with
//! both; for two workloads: a re-creation of Centrifugo's football-match test (a match's
//! state, about 1.3 KB of JSON, 30 messages each changing a few fields) and the bench's
//! usual 100-byte payload. Centrifugo's published percentages of the JSON bytes stand beside
//! the football rows.

use std::{io::Write, time::Duration};

use fanout_testkit::raw;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::{suite::FanoutTier, tier::Paths};

/// One way of taking a channel.
#[derive(Debug, Clone, Copy)]
struct Mode {
    name: &'static str,
    msgpack: bool,
    deflate: bool,
    delta: bool,
    /// Centrifugo's published share of the JSON bytes for the football test, where it has one.
    centrifugo: Option<f64>,
}

const MODES: [Mode; 8] = [
    Mode {
        name: "JSON",
        msgpack: false,
        deflate: false,
        delta: false,
        centrifugo: Some(100.0),
    },
    Mode {
        name: "JSON + deflate",
        msgpack: false,
        deflate: true,
        delta: false,
        centrifugo: Some(38.9),
    },
    Mode {
        name: "JSON + delta",
        msgpack: false,
        deflate: false,
        delta: true,
        centrifugo: Some(15.0),
    },
    Mode {
        name: "JSON + delta + deflate",
        msgpack: false,
        deflate: true,
        delta: true,
        centrifugo: Some(13.3),
    },
    Mode {
        name: "MessagePack",
        msgpack: true,
        deflate: false,
        delta: false,
        centrifugo: None,
    },
    Mode {
        name: "MessagePack + deflate",
        msgpack: true,
        deflate: true,
        delta: false,
        centrifugo: None,
    },
    Mode {
        name: "MessagePack + delta",
        msgpack: true,
        deflate: false,
        delta: true,
        centrifugo: Some(11.0),
    },
    Mode {
        name: "MessagePack + delta + deflate",
        msgpack: true,
        deflate: true,
        delta: true,
        centrifugo: None,
    },
];

/// A workload: its name, and its `n`th event's data.
type Workload = (&'static str, fn(usize) -> Value);

/// One row of the answer.
#[derive(Debug, Serialize)]
pub struct Row {
    pub workload: &'static str,
    pub mode: &'static str,
    pub messages: usize,
    /// The events' data as published, bytes (the JSON the API was given).
    pub published_bytes: usize,
    /// Bytes the client read while the events came, all of them.
    pub wire_bytes: usize,
    pub bytes_per_delivery: f64,
    /// `wire_bytes` as a share of the JSON mode's.
    pub percent_of_json: f64,
    /// Centrifugo's (football, protobuf for the MessagePack + delta row: about 11%).
    pub centrifugo_percent: Option<f64>,
}

/// A football match's state at message `n`: two teams of 11 with their stats, the score, the
/// minute and the last event; each message changes a few fields.
fn football(n: usize) -> Value {
    let team = |side: usize, name: &str| {
        let players: Vec<Value> = (0..11)
            .map(|p| {
                let scored = usize::from((n + p + side).is_multiple_of(13) && n > 0);
                json!({"id": side * 100 + p, "name": format!("{name} {}", p + 1),
                    "goals": scored + (n / 20) * usize::from(p == 9),
                    "yellow": usize::from(n > 15 && p == 4 + side), "red": 0})
            })
            .collect();
        json!({"name": name, "score": (n + side) / 11, "players": players})
    };
    let kind = ["pass", "shot", "corner", "foul"][n % 4];
    let status = if n < 29 { "live" } else { "ended" };
    json!({"match": 1042, "minute": n * 3, "status": status,
        "last": {"kind": kind, "minute": n * 3},
        "home": team(0, "Home"), "away": team(1, "Away")})
}

/// The bench's usual payload (`load::body`), as JSON.
fn usual(n: usize) -> Value {
    serde_json::from_str(&crate::load::body(n as u64, 100)).expect("JSON")
}

/// A client's socket, counting what it reads.
struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
    read: usize,
}

impl Client {
    async fn open(addr: &str, mode: Mode) -> Client {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).unwrap();
        let mut request = raw::upgrade(addr, "/ws?user=bytes");
        request.truncate(request.len() - 2);
        if mode.msgpack {
            request.push_str("Sec-WebSocket-Protocol: fanout.msgpack\r\n");
        }
        if mode.deflate {
            request.push_str("Sec-WebSocket-Extensions: permessage-deflate\r\n");
        }
        request.push_str("\r\n");
        let mut buf = Vec::new();
        let head = raw::read_head(&mut stream, &mut buf, request.as_bytes(), "HTTP/1.1 101")
            .await
            .expect("upgraded");
        assert_eq!(
            head.to_ascii_lowercase().contains("permessage-deflate"),
            mode.deflate,
            "{head}"
        );
        Client {
            stream,
            buf,
            read: 0,
        }
    }

    /// The next message as JSON (inflated, decoded from MessagePack).
    async fn next(&mut self) -> Value {
        loop {
            if let Ok(Some(frame)) = raw::parse(&self.buf) {
                let payload = self.buf[frame.payload.clone()].to_vec();
                self.buf.drain(..frame.len);
                let payload = match frame.rsv1 {
                    true => inflate(&payload),
                    false => payload,
                };
                if frame.opcode == raw::BINARY {
                    let value = rmpv::decode::read_value(&mut &payload[..]).expect("MessagePack");
                    return value_of(&value);
                }
                if frame.opcode == raw::TEXT {
                    return serde_json::from_slice(&payload).expect("JSON");
                }
                continue;
            }
            let mut chunk = [0u8; 65536];
            let n = self.stream.read(&mut chunk).await.expect("read");
            assert!(n > 0, "closed");
            self.read += n;
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    async fn send(&mut self, request: &Value, msgpack: bool) {
        let frame = match msgpack {
            true => {
                let mut out = Vec::new();
                rmpv::encode::write_value(&mut out, &msgpack_of(request)).unwrap();
                raw::frame(true, raw::BINARY, &out, true)
            }
            false => raw::frame(true, raw::TEXT, request.to_string().as_bytes(), true),
        };
        self.stream.write_all(&frame).await.unwrap();
    }
}

fn msgpack_of(value: &Value) -> rmpv::Value {
    match value {
        Value::Object(map) => rmpv::Value::Map(
            map.iter()
                .map(|(k, v)| (rmpv::Value::from(k.as_str()), msgpack_of(v)))
                .collect(),
        ),
        Value::String(s) => rmpv::Value::from(s.as_str()),
        Value::Number(n) => rmpv::Value::from(n.as_u64().unwrap_or_default()),
        Value::Bool(b) => rmpv::Value::from(*b),
        _ => rmpv::Value::Nil,
    }
}

fn value_of(value: &rmpv::Value) -> Value {
    match value {
        rmpv::Value::Map(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.as_str().unwrap_or_default().to_string(), value_of(v)))
                .collect(),
        ),
        rmpv::Value::Array(items) => Value::Array(items.iter().map(value_of).collect()),
        rmpv::Value::String(s) => Value::from(s.as_str().unwrap_or_default()),
        rmpv::Value::Integer(n) => Value::from(n.as_u64().unwrap_or_default()),
        rmpv::Value::Boolean(b) => Value::from(*b),
        _ => Value::Null,
    }
}

fn inflate(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut decoder = flate2::write::DeflateDecoder::new(&mut out);
    decoder.write_all(payload).unwrap();
    decoder.write_all(&[0, 0, 0xff, 0xff]).unwrap();
    decoder.flush().unwrap();
    drop(decoder);
    out
}

/// Publishes `data` to `channel` through the API, waiting for its acknowledgement.
async fn publish(http: &reqwest::Client, api: &str, channel: &str, data: &Value) {
    let answer = http
        .post(format!("{api}/v1/channels/{channel}/events"))
        .header("content-type", "application/json")
        .body(data.to_string())
        .send()
        .await
        .expect("publish");
    assert_eq!(answer.status(), 202);
}

/// Every mode, for both workloads, `messages` events each.
pub async fn run(paths: &Paths, messages: usize) -> Vec<Row> {
    let env = [("FANOUT_DELTA_CHANNELS".to_string(), "bytes:*".to_string())];
    let tier = FanoutTier::start_with(paths, 1, &env).await;
    let addr = tier.nodes[0].addr.to_string();
    let api = tier.api_url();
    let http = reqwest::Client::new();
    let mut rows = Vec::new();
    let workloads: [Workload; 2] = [
        ("football (re-created)", football),
        ("usual 100-byte payload", usual),
    ];
    for (w, (workload, make)) in workloads.iter().enumerate() {
        let published: usize = (0..messages).map(|n| make(n).to_string().len()).sum();
        let mut json_bytes = 0;
        for (m, mode) in MODES.iter().enumerate() {
            let channel = format!("bytes:{w}-{m}");
            let mut client = Client::open(&addr, *mode).await;
            client.next().await; // welcome
            let mut subscribe = json!({"op": "subscribe", "channel": channel, "id": "s"});
            if mode.delta {
                subscribe["delta"] = json!("fossil");
            }
            client.send(&subscribe, mode.msgpack).await;
            loop {
                let reply = client.next().await;
                if reply["op"] == "subscribed" {
                    assert_eq!(reply.get("delta").is_some(), mode.delta, "{reply}");
                    break;
                }
            }
            let before = client.read;
            for n in 0..messages {
                publish(&http, &api, &channel, &make(n)).await;
            }
            let mut events = 0;
            while events < messages {
                let frame = tokio::time::timeout(Duration::from_secs(10), client.next())
                    .await
                    .expect("an event");
                if frame["op"] == "event" {
                    events += 1;
                }
            }
            let wire = client.read - before;
            if m == 0 {
                json_bytes = wire;
            }
            let row = Row {
                workload,
                mode: mode.name,
                messages,
                published_bytes: published,
                wire_bytes: wire,
                bytes_per_delivery: wire as f64 / messages as f64,
                percent_of_json: wire as f64 * 100.0 / json_bytes.max(1) as f64,
                centrifugo_percent: mode.centrifugo.filter(|_| w == 0),
            };
            println!(
                "  {:<24} {:<30} {:>8} bytes  {:>8.1} per delivery  {:>5.1}% of JSON{}",
                row.workload,
                row.mode,
                row.wire_bytes,
                row.bytes_per_delivery,
                row.percent_of_json,
                row.centrifugo_percent
                    .map(|p| format!("  (Centrifugo: {p}%)"))
                    .unwrap_or_default()
            );
            rows.push(row);
        }
    }
    rows
}
