//! Reading WebSocket frames (RFC 6455): the masked frames clients send, decoded
//! incrementally, with a size limit. (The frames the node sends are encoded where they are
//! written, in `websocket.rs`.)
//!
//! Why not a WebSocket library's stream: fan-out writes each event's frame straight into
//! every recipient's socket from the channel's reader task, without waking the connection's
//! task; that needs the frame bytes up front and the socket shared, which a library stream
//! that owns the socket cannot give.

use bytes::{Buf, BytesMut};

pub const FIN: u8 = 0x80;
/// The first reserved bit: a compressed message (permessage-deflate, RFC 7692).
pub const RSV1: u8 = 0x40;
pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// A message a client sent.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong,
    /// The close code, if any.
    Close(Option<u16>),
}

/// Why a client's bytes cannot be read as WebSocket frames.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("a message larger than {0} bytes")]
    TooBig(usize),
    #[error("a compressed message the node's memory cannot take now")]
    OverBudget,
    #[error("a compressed message that does not inflate")]
    BadDeflate,
    #[error("a text message that is not UTF-8")]
    InvalidUtf8,
    #[error("{0}")]
    Protocol(&'static str),
}

/// Decodes frames from the bytes a client sends. Idle, it holds no memory: the buffers are
/// given back once a message is complete.
#[derive(Debug, Default)]
pub struct Decoder {
    /// Bytes read and not yet decoded.
    pub buf: BytesMut,
    /// permessage-deflate was negotiated: a message whose first frame has RSV1 set is
    /// compressed (each on its own: `client_no_context_takeover`).
    pub deflate: bool,
    /// A fragmented message so far: its opcode, whether it is compressed, and its payload.
    partial: Option<(u8, bool, Vec<u8>)>,
}

impl Decoder {
    /// The next complete message in the buffer, if any; control frames come as soon as they
    /// are complete, even in the middle of a fragmented message.
    pub fn next(&mut self, max: usize) -> Result<Option<Incoming>, FrameError> {
        self.next_within(max, |_| true)
    }

    /// [`Decoder::next`], a compressed message inflated only as far as `grow` allows (the
    /// node's memory budget, asked before each step of growth).
    pub fn next_within(
        &mut self,
        max: usize,
        mut grow: impl FnMut(usize) -> bool,
    ) -> Result<Option<Incoming>, FrameError> {
        loop {
            let Some(frame) = self.frame(max)? else {
                return Ok(None);
            };
            let (fin, compressed, opcode, payload) = frame;
            if compressed && !matches!(opcode, OP_TEXT | OP_BINARY) {
                return Err(FrameError::Protocol(
                    "RSV1 set on a frame that does not start a message",
                ));
            }
            let message = match opcode {
                OP_PING => Some(Incoming::Ping(payload)),
                OP_PONG => Some(Incoming::Pong),
                OP_CLOSE => Some(Incoming::Close(close_code(&payload)?)),
                OP_TEXT | OP_BINARY if self.partial.is_some() => {
                    return Err(FrameError::Protocol(
                        "a new message inside a fragmented one",
                    ));
                }
                OP_TEXT | OP_BINARY if fin => {
                    Some(finish(opcode, compressed, payload, max, &mut grow)?)
                }
                OP_TEXT | OP_BINARY => {
                    self.partial = Some((opcode, compressed, payload));
                    None
                }
                OP_CONTINUATION => {
                    let Some((first, compressed, mut so_far)) = self.partial.take() else {
                        return Err(FrameError::Protocol("a continuation without a message"));
                    };
                    if so_far.len() + payload.len() > max {
                        return Err(FrameError::TooBig(max));
                    }
                    so_far.extend_from_slice(&payload);
                    if fin {
                        Some(finish(first, compressed, so_far, max, &mut grow)?)
                    } else {
                        self.partial = Some((first, compressed, so_far));
                        None
                    }
                }
                _ => return Err(FrameError::Protocol("an unknown opcode")),
            };
            if self.buf.is_empty() {
                // Give the memory back: an idle connection keeps no buffer.
                self.buf = BytesMut::new();
            }
            if let Some(message) = message {
                return Ok(Some(message));
            }
        }
    }

    /// True when nothing of a frame or message is pending: no timer need run.
    pub fn is_idle(&self) -> bool {
        self.buf.is_empty() && self.partial.is_none()
    }

    /// Bytes this decoder holds (what the node's budget is charged).
    pub fn held(&self) -> usize {
        self.buf.capacity() + self.partial.as_ref().map_or(0, |(_, _, p)| p.capacity())
    }

    /// One complete frame: (fin, RSV1, opcode, unmasked payload).
    #[allow(clippy::type_complexity)]
    fn frame(&mut self, max: usize) -> Result<Option<(bool, bool, u8, Vec<u8>)>, FrameError> {
        let buf = &self.buf[..];
        if buf.len() < 2 {
            return Ok(None);
        }
        let (fin, rsv, opcode) = (buf[0] & FIN != 0, buf[0] & 0x70, buf[0] & 0x0F);
        let compressed = rsv == RSV1 && self.deflate;
        if rsv != 0 && !compressed {
            return Err(FrameError::Protocol("reserved bits set"));
        }
        if buf[1] & 0x80 == 0 {
            return Err(FrameError::Protocol("client frames must be masked"));
        }
        let (len, header) = match buf[1] & 0x7F {
            126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4),
            127 if buf.len() >= 10 => (u64::from_be_bytes(buf[2..10].try_into().unwrap()), 10),
            126 | 127 => return Ok(None),
            n => (n as u64, 2),
        };
        if opcode >= OP_CLOSE && (len > 125 || !fin) {
            return Err(FrameError::Protocol(
                "a control frame must be short and whole",
            ));
        }
        if len > max as u64 {
            return Err(FrameError::TooBig(max));
        }
        let len = len as usize;
        if buf.len() < header + 4 + len {
            self.buf.reserve(header + 4 + len - buf.len());
            return Ok(None);
        }
        let mask = [
            buf[header],
            buf[header + 1],
            buf[header + 2],
            buf[header + 3],
        ];
        let start = header + 4;
        let payload: Vec<u8> = buf[start..start + len]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i % 4])
            .collect();
        self.buf.advance(start + len);
        Ok(Some((fin, compressed, opcode, payload)))
    }
}

/// The code of a client's close frame (RFC 6455 5.5.1, 7.4): none, or one a peer may send,
/// followed by a UTF-8 reason.
fn close_code(payload: &[u8]) -> Result<Option<u16>, FrameError> {
    match payload {
        [] => Ok(None),
        [_] => Err(FrameError::Protocol("a close frame with a 1-byte payload")),
        [high, low, reason @ ..] => {
            let code = u16::from_be_bytes([*high, *low]);
            if !may_send(code) {
                return Err(FrameError::Protocol("a close code a peer may not send"));
            }
            std::str::from_utf8(reason).map_err(|_| FrameError::InvalidUtf8)?;
            Ok(Some(code))
        }
    }
}

/// Whether a peer may send close code `code`: the defined codes but 1004–1006 and 1015
/// (reserved, or only for reporting), and the registered (3000–3999) and private (4000–4999)
/// ranges.
pub fn may_send(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// A whole message: inflated first when it came compressed.
fn finish(
    opcode: u8,
    compressed: bool,
    payload: Vec<u8>,
    max: usize,
    grow: impl FnMut(usize) -> bool,
) -> Result<Incoming, FrameError> {
    let payload = match compressed {
        false => payload,
        true => super::deflate::inflate(&payload, max, grow).map_err(|err| match err {
            super::deflate::InflateError::TooBig => FrameError::TooBig(max),
            super::deflate::InflateError::OverBudget => FrameError::OverBudget,
            super::deflate::InflateError::Invalid => FrameError::BadDeflate,
        })?,
    };
    if opcode == OP_BINARY {
        return Ok(Incoming::Binary(payload));
    }
    String::from_utf8(payload)
        .map(Incoming::Text)
        .map_err(|_| FrameError::InvalidUtf8)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client frame: masked.
    fn client(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1, 2, 3, 4];
        let mut out = vec![if fin { FIN | opcode } else { opcode }];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 65535 => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    #[test]
    fn decodes_client_frames_in_pieces() {
        let mut bytes = client(true, OP_TEXT, br#"{"op":"ping"}"#);
        bytes.extend(client(true, OP_PING, b"p"));
        bytes.extend(client(false, OP_TEXT, b"ab"));
        bytes.extend(client(true, OP_PONG, b""));
        bytes.extend(client(true, OP_CONTINUATION, b"cd"));
        bytes.extend(client(true, OP_CLOSE, &1000u16.to_be_bytes()));
        let mut decoder = Decoder::default();
        let mut seen = Vec::new();
        for byte in bytes {
            decoder.buf.extend_from_slice(&[byte]);
            while let Some(message) = decoder.next(1024).unwrap() {
                seen.push(message);
            }
        }
        assert_eq!(
            seen,
            [
                Incoming::Text(r#"{"op":"ping"}"#.into()),
                Incoming::Ping(b"p".to_vec()),
                Incoming::Pong,
                Incoming::Text("abcd".into()),
                Incoming::Close(Some(1000)),
            ]
        );
        assert_eq!(decoder.buf.capacity(), 0, "nothing kept once idle");
    }

    #[test]
    fn refuses_what_breaks_the_rules() {
        let decode = |bytes: Vec<u8>, max| {
            let mut decoder = Decoder::default();
            decoder.buf.extend_from_slice(&bytes);
            decoder.next(max)
        };
        assert_eq!(
            decode(client(true, OP_TEXT, &[b'x'; 200]), 100),
            Err(FrameError::TooBig(100))
        );
        assert_eq!(
            decode(client(true, OP_TEXT, &[0xff, 0xfe]), 100),
            Err(FrameError::InvalidUtf8)
        );
        let mut unmasked = client(true, OP_TEXT, b"a");
        unmasked[1] &= 0x7F;
        assert!(matches!(
            decode(unmasked, 100),
            Err(FrameError::Protocol(_))
        ));
        assert!(matches!(
            decode(client(true, OP_CONTINUATION, b"a"), 100),
            Err(FrameError::Protocol(_))
        ));
        assert_eq!(
            decode(client(true, OP_BINARY, b"a"), 100),
            Ok(Some(Incoming::Binary(b"a".to_vec())))
        );
        for code in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535] {
            assert!(
                matches!(
                    decode(client(true, OP_CLOSE, &code.to_be_bytes()), 100),
                    Err(FrameError::Protocol(_))
                ),
                "{code}"
            );
        }
        for code in [1000u16, 1003, 1007, 1014, 3000, 4999] {
            assert_eq!(
                decode(client(true, OP_CLOSE, &code.to_be_bytes()), 100),
                Ok(Some(Incoming::Close(Some(code))))
            );
        }
        assert!(matches!(
            decode(client(true, OP_CLOSE, &[3]), 100),
            Err(FrameError::Protocol(_))
        ));
        assert_eq!(
            decode(client(true, OP_CLOSE, &[3, 232, 0xff]), 100),
            Err(FrameError::InvalidUtf8)
        );
        // Too big in pieces, too.
        let mut pieces = client(false, OP_TEXT, &[b'x'; 60]);
        pieces.extend(client(true, OP_CONTINUATION, &[b'x'; 60]));
        assert_eq!(decode(pieces, 100), Err(FrameError::TooBig(100)));
    }
}
