//! The JSON frames of the WebSocket protocol: parsing what clients send and encoding what the
//! node answers. Pure functions, no I/O (the transport moves the bytes).
//!
//! Client → node: `subscribe`, `unsubscribe`, `ping`, `publish`, `refresh`, `presence`,
//! `info`, each with an optional `id` (a JSON number or string) that the reply echoes.
//! Node → client: `welcome`, the replies (`subscribed`, `unsubscribed`, `pong`, `published`,
//! `refreshed`, `presence`, `info_updated`), the presence changes (`join`, `leave`,
//! `update`) and `error`. (The `event` frame is the channel reader's: encoded once per event,
//! where it is read.)

use fanout::{Channel, Code};
use serde::Serialize;
use serde_json::{Value, value::RawValue};

/// Largest presence `info` a client may set, in bytes of JSON.
pub const MAX_INFO_BYTES: usize = 2048;

/// A request id as the client sent it: a JSON number or string, echoed verbatim.
pub type RequestId = Value;

#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// With `since`, the node first replays the stored events after it (resume).
    Subscribe {
        channel: Channel,
        since: Option<Since>,
        /// The stream epoch the client's `since` belongs to (from `welcome`/`subscribed`).
        epoch: Option<String>,
        /// Also receive the channel's `join` / `leave` / `update` frames.
        presence: bool,
        /// Events as fossil deltas of the one before (`"delta":"fossil"`), where the channel
        /// allows it (`FANOUT_DELTA_CHANNELS`).
        delta: bool,
    },
    /// Who is in `channel`, across every node (or only how many).
    Presence {
        channel: Channel,
        count_only: bool,
    },
    /// Replace this connection's presence info (a JSON object, or null), as JSON text.
    Info {
        info: Option<String>,
    },
    Unsubscribe(Channel),
    Ping,
    /// Publish `data` (any JSON, or bytes: base64 with `"encoding":"base64"`) to `channel`
    /// through the stream, like the HTTP API; with `volatile`, straight to the nodes instead:
    /// not stored, no seq, at most once.
    Publish {
        channel: Channel,
        data: fanout::Data,
        volatile: bool,
    },
    /// A fresh token before the current one expires.
    Refresh {
        token: String,
    },
    /// A request to the app's backend through the connection (`FANOUT_PROXY_RPC_URL`):
    /// `method` and any JSON `data`; the reply carries the backend's `result`.
    Rpc {
        method: String,
        data: Value,
    },
}

/// Longest `rpc` method name.
pub const MAX_METHOD: usize = 128;

/// A resuming `subscribe`'s position: a seq (one region), or a seq per region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Since {
    Seq(u64),
    Regions(std::collections::BTreeMap<String, u64>),
}

/// Most regions a `since` object may name.
const MAX_SINCE_REGIONS: usize = 16;

/// What a resuming `subscribe` found, for its reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resumed<'a> {
    /// False when history no longer reaches back to `since` (or `since` belongs to another
    /// epoch): events may be missing and the client must reload its state another way.
    pub recovered: bool,
    pub replayed: usize,
    pub epoch: &'a str,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub id: Option<RequestId>,
    pub op: Op,
}

/// A request the node cannot act on. Encoded as an `error` frame; the connection stays open.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub code: Code,
    /// The app's own code (a proxy hook's refusal), sent instead of `code`.
    pub app_code: Option<String>,
    pub message: String,
    /// The `op` of the offending request, when it had one.
    pub op: Option<String>,
    pub id: Option<RequestId>,
}

impl Rejection {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Rejection {
            code,
            app_code: None,
            message: message.into(),
            op: None,
            id: None,
        }
    }

    /// A refusal with the app's own code (a proxy hook's).
    pub fn app(code: impl Into<String>, message: impl Into<String>) -> Self {
        Rejection {
            app_code: Some(code.into()),
            ..Rejection::new(Code::Forbidden, message)
        }
    }

    fn about(mut self, op: Option<&str>, id: Option<&RequestId>) -> Self {
        self.op = op.map(String::from);
        self.id = id.cloned();
        self
    }

    pub fn encode(&self) -> String {
        #[derive(Serialize)]
        struct ErrorFrame<'a> {
            op: &'static str,
            code: &'a str,
            message: &'a str,
            #[serde(rename = "ref")]
            reference: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            id: Option<&'a RequestId>,
        }
        to_json(&ErrorFrame {
            op: "error",
            code: self.app_code.as_deref().unwrap_or(self.code.as_str()),
            message: &self.message,
            reference: self.op.as_deref(),
            id: self.id.as_ref(),
        })
    }
}

/// A `publish`'s `data`: JSON as it is, or, with `"encoding":"base64"`, the bytes a base64
/// string holds.
fn publish_data(fields: &serde_json::Map<String, Value>) -> Result<fanout::Data, Rejection> {
    let invalid = |why: &str| Rejection::new(Code::InvalidRequest, why);
    let data = fields
        .get("data")
        .ok_or_else(|| invalid("\"publish\" needs \"data\""))?;
    match fields.get("encoding") {
        None | Some(Value::Null) => Ok(bytes::Bytes::from(data.to_string()).into()),
        Some(Value::String(encoding)) if encoding == "base64" => {
            let Value::String(text) = data else {
                return Err(invalid(
                    "with \"encoding\":\"base64\", \"data\" must be a base64 string",
                ));
            };
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .map(fanout::Data::binary)
                .map_err(|err| {
                    Rejection::new(
                        Code::InvalidRequest,
                        format!("\"data\" is not base64 (RFC 4648, padded): {err}"),
                    )
                })
        }
        Some(_) => Err(invalid(
            "\"encoding\" may only be \"base64\" (bytes); leave it out for JSON data",
        )),
    }
}

/// Parses one text frame from a client.
pub fn parse(text: &str) -> Result<Request, Rejection> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| Rejection::new(Code::InvalidJson, format!("not valid JSON: {e}")))?;
    let Value::Object(mut fields) = value else {
        return Err(Rejection::new(
            Code::InvalidJson,
            "a request must be a JSON object",
        ));
    };
    let id = match fields.remove("id") {
        None => None,
        Some(id @ (Value::Number(_) | Value::String(_))) => Some(id),
        Some(_) => {
            return Err(Rejection::new(
                Code::InvalidRequest,
                "\"id\" must be a number or a string",
            ));
        }
    };
    let op = match fields.get("op") {
        Some(Value::String(op)) => op.as_str(),
        _ => {
            return Err(
                Rejection::new(Code::InvalidRequest, "a request needs \"op\", a string")
                    .about(None, id.as_ref()),
            );
        }
    };
    let channel = || match fields.get("channel") {
        Some(Value::String(name)) => {
            Channel::parse(name).map_err(|e| Rejection::new(Code::InvalidChannel, e.to_string()))
        }
        Some(_) => Err(Rejection::new(
            Code::InvalidChannel,
            "\"channel\" must be a string",
        )),
        None => Err(Rejection::new(
            Code::InvalidRequest,
            format!("{op:?} needs \"channel\""),
        )),
    };
    let since = match fields.get("since") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(regions)) if regions.len() <= MAX_SINCE_REGIONS => regions
            .iter()
            .map(|(region, seq)| seq.as_u64().map(|seq| (region.clone(), seq)))
            .collect::<Option<_>>()
            .map(|regions| Some(Since::Regions(regions)))
            .ok_or_else(|| {
                Rejection::new(
                    Code::InvalidRequest,
                    "\"since\" must map each region to a non-negative integer (a seq)",
                )
            }),
        Some(value) => value.as_u64().map(|seq| Some(Since::Seq(seq))).ok_or_else(|| {
            Rejection::new(
                Code::InvalidRequest,
                "\"since\" must be a non-negative integer (a seq) or an object of seqs by region",
            )
        }),
    };
    let epoch = match fields.get("epoch") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(epoch)) => Ok(Some(epoch.clone())),
        Some(_) => Err(Rejection::new(
            Code::InvalidRequest,
            "\"epoch\" must be a string",
        )),
    };
    let flag = |name: &str| match fields.get(name) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(flag)) => Ok(*flag),
        Some(_) => Err(Rejection::new(
            Code::InvalidRequest,
            format!("{name:?} must be true or false"),
        )),
    };
    let parsed = match op {
        "subscribe" => channel().and_then(|channel| {
            let delta = match fields.get("delta") {
                None | Some(Value::Null) => Ok(false),
                Some(Value::String(kind)) if kind == "fossil" => Ok(true),
                Some(_) => Err(Rejection::new(
                    Code::InvalidRequest,
                    "\"delta\" must be \"fossil\" (the only delta encoding)",
                )),
            };
            Ok(Op::Subscribe {
                channel,
                since: since?,
                epoch: epoch?,
                presence: flag("presence")?,
                delta: delta?,
            })
        }),
        "presence" => channel().and_then(|channel| {
            Ok(Op::Presence {
                channel,
                count_only: flag("count_only")?,
            })
        }),
        "info" => match fields.get("info") {
            Some(Value::Null) => Ok(Op::Info { info: None }),
            Some(info @ Value::Object(_)) => {
                let info = info.to_string();
                if info.len() > MAX_INFO_BYTES {
                    Err(Rejection::new(
                        Code::InfoTooLarge,
                        format!("\"info\" may be at most {MAX_INFO_BYTES} bytes of JSON"),
                    ))
                } else {
                    Ok(Op::Info { info: Some(info) })
                }
            }
            _ => Err(Rejection::new(
                Code::InvalidRequest,
                "\"info\" needs \"info\", a JSON object or null",
            )),
        },
        "unsubscribe" => channel().map(Op::Unsubscribe),
        "ping" => Ok(Op::Ping),
        "publish" => channel().and_then(|channel| {
            Ok(Op::Publish {
                channel,
                data: publish_data(&fields)?,
                volatile: flag("volatile")?,
            })
        }),
        "rpc" => match fields.get("method") {
            Some(Value::String(method)) if !method.is_empty() && method.len() <= MAX_METHOD => {
                Ok(Op::Rpc {
                    method: method.clone(),
                    data: fields.get("data").cloned().unwrap_or(Value::Null),
                })
            }
            _ => Err(Rejection::new(
                Code::InvalidRequest,
                format!("\"rpc\" needs \"method\", a string of 1-{MAX_METHOD} bytes"),
            )),
        },
        "refresh" => match fields.get("token") {
            Some(Value::String(token)) => Ok(Op::Refresh {
                token: token.clone(),
            }),
            _ => Err(Rejection::new(
                Code::InvalidRequest,
                "\"refresh\" needs \"token\", a string",
            )),
        },
        _ => Err(Rejection::new(
            Code::UnknownOp,
            format!(
                "unknown op {op:?}; expected subscribe, unsubscribe, publish, presence, info, \
                 refresh, rpc or ping"
            ),
        )),
    };
    match parsed {
        Ok(op) => Ok(Request { id, op }),
        Err(rejection) => Err(rejection.about(Some(op), id.as_ref())),
    }
}

fn to_json(value: &impl Serialize) -> String {
    serde_json::to_string(value).expect("protocol frames always serialize")
}

/// The first frame: who the node is, who the connection is.
#[derive(Debug, Serialize)]
pub struct Welcome<'a> {
    pub node: &'a str,
    pub conn: &'a str,
    pub user: &'a str,
    pub heartbeat: u64,
    pub epoch: &'a str,
    /// The node's region (none with one region).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<&'a str>,
    /// For an SSE stream: the secret that authorizes its `POST /session/{conn}` requests.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<&'a str>,
}

pub fn welcome(welcome: &Welcome<'_>) -> String {
    #[derive(Serialize)]
    struct Frame<'a> {
        op: &'static str,
        #[serde(flatten)]
        welcome: &'a Welcome<'a>,
    }
    to_json(&Frame {
        op: "welcome",
        welcome,
    })
}

/// `published`: a client's event was stored (`seq`), or, volatile (no `seq`), handed to NATS.
pub fn published(
    channel: &Channel,
    seq: Option<u64>,
    region: Option<&str>,
    event_id: &str,
    id: Option<&RequestId>,
) -> String {
    #[derive(Serialize)]
    struct Published<'a> {
        op: &'static str,
        channel: &'a Channel,
        #[serde(skip_serializing_if = "Option::is_none")]
        seq: Option<u64>,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        volatile: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        region: Option<&'a str>,
        event: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RequestId>,
    }
    to_json(&Published {
        op: "published",
        channel,
        seq,
        volatile: seq.is_none(),
        region,
        event: event_id,
        id,
    })
}

/// `refreshed`: the connection now runs on the new token.
pub fn refreshed(expires_at: Option<u64>, id: Option<&RequestId>) -> String {
    #[derive(Serialize)]
    struct Refreshed<'a> {
        op: &'static str,
        expires_at: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RequestId>,
    }
    to_json(&Refreshed {
        op: "refreshed",
        expires_at,
        id,
    })
}

/// `subscribed`, with what a resume found when the request had `since`.
pub fn subscribed(
    channel: &Channel,
    id: Option<&RequestId>,
    resumed: Option<Resumed<'_>>,
) -> String {
    #[derive(Serialize)]
    struct Subscribed<'a> {
        op: &'static str,
        channel: &'a Channel,
        #[serde(skip_serializing_if = "Option::is_none")]
        recovered: Option<bool>,
        #[serde(skip_serializing_if = "Option::is_none")]
        replayed: Option<usize>,
        #[serde(skip_serializing_if = "Option::is_none")]
        epoch: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RequestId>,
    }
    to_json(&Subscribed {
        op: "subscribed",
        channel,
        recovered: resumed.as_ref().map(|r| r.recovered),
        replayed: resumed.as_ref().map(|r| r.replayed),
        epoch: resumed.as_ref().map(|r| r.epoch),
        id,
    })
}

/// A presence change (`join`, `leave`, `update`) of one member, as every watching client
/// receives it.
#[derive(Debug, Serialize)]
pub struct PresenceChange<'a> {
    pub op: &'static str,
    pub channel: &'a str,
    pub user: &'a str,
    pub conn: &'a str,
    pub node: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<&'a str>,
    pub info: Option<&'a RawValue>,
    pub joined_at: u64,
}

pub fn presence_change(change: &PresenceChange<'_>) -> String {
    to_json(change)
}

/// The reply to `presence`: the members across every node, or only their count.
pub fn presence(answer: &fanout::presence::Presence, id: Option<&RequestId>) -> String {
    #[derive(Serialize)]
    struct Reply<'a> {
        op: &'static str,
        #[serde(flatten)]
        answer: &'a fanout::presence::Presence,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RequestId>,
    }
    to_json(&Reply {
        op: "presence",
        answer,
        id,
    })
}

/// `info_updated`: the connection's presence info is now `info`.
pub fn info_updated(info: Option<&RawValue>, id: Option<&RequestId>) -> String {
    #[derive(Serialize)]
    struct Reply<'a> {
        op: &'static str,
        info: Option<&'a RawValue>,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RequestId>,
    }
    to_json(&Reply {
        op: "info_updated",
        info,
        id,
    })
}

/// `unsubscribed`: the reply to leaving a channel.
pub fn unsubscribed(channel: &Channel, id: Option<&RequestId>) -> String {
    channel_reply("unsubscribed", channel, id)
}

fn channel_reply(op: &'static str, channel: &Channel, id: Option<&RequestId>) -> String {
    #[derive(Serialize)]
    struct Reply<'a> {
        op: &'static str,
        channel: &'a Channel,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RequestId>,
    }
    to_json(&Reply { op, channel, id })
}

/// The reply to an `rpc`: the app's backend's `result`.
pub fn rpc_result(result: &Value, id: Option<&RequestId>) -> String {
    #[derive(Serialize)]
    struct Rpc<'a> {
        op: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RequestId>,
        result: &'a Value,
    }
    to_json(&Rpc {
        op: "rpc",
        id,
        result,
    })
}

pub fn pong(id: Option<&RequestId>) -> String {
    #[derive(Serialize)]
    struct Pong<'a> {
        op: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RequestId>,
    }
    to_json(&Pong { op: "pong", id })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn reject(text: &str) -> Value {
        serde_json::from_str(&parse(text).unwrap_err().encode()).unwrap()
    }

    #[test]
    fn parses_requests() {
        let r = parse(r#"{"op":"subscribe","channel":"maths","id":7}"#).unwrap();
        let maths = Channel::parse("maths").unwrap();
        assert_eq!(
            r.op,
            Op::Subscribe {
                channel: maths.clone(),
                since: None,
                epoch: None,
                presence: false,
                delta: false,
            }
        );
        assert_eq!(r.id, Some(json!(7)));
        let r = parse(r#"{"op":"subscribe","channel":"maths","since":41,"epoch":"e1"}"#).unwrap();
        assert_eq!(
            r.op,
            Op::Subscribe {
                channel: maths.clone(),
                since: Some(Since::Seq(41)),
                epoch: Some("e1".into()),
                presence: false,
                delta: false,
            }
        );
        let r = parse(r#"{"op":"subscribe","channel":"maths","presence":true}"#).unwrap();
        assert!(matches!(r.op, Op::Subscribe { presence: true, .. }));
        let r = parse(r#"{"op":"subscribe","channel":"maths","delta":"fossil"}"#).unwrap();
        assert!(matches!(r.op, Op::Subscribe { delta: true, .. }));
        let r = parse(r#"{"op":"subscribe","channel":"maths","delta":"xdelta"}"#).unwrap_err();
        assert_eq!(r.code, Code::InvalidRequest);
        let r = parse(r#"{"op":"presence","channel":"maths","count_only":true}"#).unwrap();
        assert_eq!(
            r.op,
            Op::Presence {
                channel: maths,
                count_only: true
            }
        );
        assert_eq!(
            parse(r#"{"op":"info","info":{"name":"Ada"}}"#).unwrap().op,
            Op::Info {
                info: Some(r#"{"name":"Ada"}"#.into())
            }
        );
        let r = parse(r#"{"op":"unsubscribe","channel":"a.b","id":"x"}"#).unwrap();
        assert_eq!(r.op, Op::Unsubscribe(Channel::parse("a.b").unwrap()));
        assert_eq!(parse(r#"{"op":"ping"}"#).unwrap().op, Op::Ping);
        let r = parse(r#"{"op":"publish","channel":"a","data":{"x":1}}"#).unwrap();
        assert_eq!(
            r.op,
            Op::Publish {
                channel: Channel::parse("a").unwrap(),
                data: bytes::Bytes::from_static(br#"{"x":1}"#).into(),
                volatile: false,
            }
        );
        let r = parse(r#"{"op":"publish","channel":"a","data":"AP8=","encoding":"base64"}"#);
        assert_eq!(
            r.unwrap().op,
            Op::Publish {
                channel: Channel::parse("a").unwrap(),
                data: fanout::Data::binary(vec![0, 255]),
                volatile: false,
            }
        );
        for bad in [
            r#"{"op":"publish","channel":"a","data":"AP8","encoding":"base64"}"#,
            r#"{"op":"publish","channel":"a","data":[0],"encoding":"base64"}"#,
            r#"{"op":"publish","channel":"a","data":"x","encoding":"hex"}"#,
        ] {
            assert_eq!(parse(bad).unwrap_err().code, Code::InvalidRequest, "{bad}");
        }
        assert_eq!(
            parse(r#"{"op":"refresh","token":"t"}"#).unwrap().op,
            Op::Refresh { token: "t".into() }
        );
    }

    #[test]
    fn rejections_are_error_frames() {
        let e = reject("{nope");
        assert_eq!(e["op"], "error");
        assert_eq!(e["code"], "invalid_json");
        assert_eq!(e["ref"], Value::Null);
        assert_eq!(reject("[1]")["code"], "invalid_json");
        assert_eq!(reject(r#"{"channel":"x"}"#)["code"], "invalid_request");
        let e = reject(r#"{"op":"dance","id":3}"#);
        assert_eq!(
            (e["code"].clone(), e["ref"].clone(), e["id"].clone()),
            (json!("unknown_op"), json!("dance"), json!(3))
        );
        let e = reject(r#"{"op":"subscribe","channel":"a b"}"#);
        assert_eq!(
            (e["code"].clone(), e["ref"].clone()),
            (json!("invalid_channel"), json!("subscribe"))
        );
        assert_eq!(
            reject(r#"{"op":"subscribe","channel":5}"#)["code"],
            "invalid_channel"
        );
        assert_eq!(reject(r#"{"op":"subscribe"}"#)["code"], "invalid_request");
        assert_eq!(
            reject(r#"{"op":"ping","id":{"a":1}}"#)["code"],
            "invalid_request"
        );
        assert_eq!(
            reject(r#"{"op":"subscribe","channel":"a","presence":"yes"}"#)["code"],
            "invalid_request"
        );
        assert_eq!(
            reject(r#"{"op":"info","info":[1]}"#)["code"],
            "invalid_request"
        );
        let big = format!(
            r#"{{"op":"info","info":{{"x":"{}"}}}}"#,
            "a".repeat(MAX_INFO_BYTES)
        );
        assert_eq!(reject(&big)["code"], "info_too_large");
    }

    #[test]
    fn replies_echo_the_id() {
        let ch = Channel::parse("maths").unwrap();
        assert_eq!(
            subscribed(&ch, Some(&json!("r1")), None),
            r#"{"op":"subscribed","channel":"maths","id":"r1"}"#
        );
        let resumed = Resumed {
            recovered: true,
            replayed: 3,
            epoch: "e1",
        };
        assert_eq!(
            subscribed(&ch, None, Some(resumed)),
            r#"{"op":"subscribed","channel":"maths","recovered":true,"replayed":3,"epoch":"e1"}"#
        );
        assert_eq!(
            unsubscribed(&ch, None),
            r#"{"op":"unsubscribed","channel":"maths"}"#
        );
        assert_eq!(pong(None), r#"{"op":"pong"}"#);
        let w = Welcome {
            node: "ws-1",
            conn: "c",
            user: "ada",
            heartbeat: 25,
            epoch: "e1",
            region: None,
            session: None,
        };
        assert_eq!(
            welcome(&w),
            r#"{"op":"welcome","node":"ws-1","conn":"c","user":"ada","heartbeat":25,"epoch":"e1"}"#
        );
        assert_eq!(
            published(&ch, Some(7), None, "e", None),
            r#"{"op":"published","channel":"maths","seq":7,"event":"e"}"#
        );
        assert_eq!(
            published(&ch, None, None, "e", None),
            r#"{"op":"published","channel":"maths","volatile":true,"event":"e"}"#
        );
    }
}
