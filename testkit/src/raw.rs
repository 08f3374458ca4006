//! One WebSocket client by hand (RFC 6455), for the tests and the load generator alike: the
//! tests send what a library would refuse to (frames of any length encoding, unmasked frames,
//! reserved bits and opcodes, broken close frames, fragments split anywhere); the load
//! generator does the same small work per frame against fanout and against nats-server.
//!
//! The wire pieces ([`frame_with`], [`parse`], [`upgrade`], [`read_head`]) are shared; [`Conn`]
//! is the tests' connection over them (every wait bounded by [`crate::WAIT`]).

use std::{net::SocketAddr, ops::Range};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

pub const CONTINUATION: u8 = 0x0;
pub const TEXT: u8 = 0x1;
pub const BINARY: u8 = 0x2;
pub const CLOSE: u8 = 0x8;
pub const PING: u8 = 0x9;
pub const PONG: u8 = 0xA;

/// The mask [`frame`] applies (any mask is allowed; an all-zero one is free to apply).
pub const MASK: [u8; 4] = [7, 1, 9, 3];

/// The opening handshake for `path` on `authority`.
pub fn upgrade(authority: &str, path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// The handshake the tests send (`/ws` on any host).
pub fn handshake() -> String {
    upgrade("x", "/ws")
}

/// A client frame, masked with [`MASK`] (or not).
pub fn frame(fin: bool, opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    frame_with(
        if fin { 0x80 } else { 0 } | opcode,
        payload,
        masked.then_some(MASK),
    )
}

/// A frame whose first byte (FIN, RSV1–3, opcode) is `first`, as given, masked with `mask`.
pub fn frame_with(first: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let bit = if mask.is_some() { 0x80 } else { 0 };
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(first);
    match payload.len() {
        n if n < 126 => out.push(bit | n as u8),
        n if n <= 65535 => {
            out.push(bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(mask) => {
            out.extend_from_slice(&mask);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// A close frame's payload: the code, then the reason's bytes.
pub fn close_payload(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(reason);
    payload
}

/// A complete server frame at the front of a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub fin: bool,
    /// RSV1: a compressed message (permessage-deflate).
    pub rsv1: bool,
    pub opcode: u8,
    /// Where its payload is in the buffer.
    pub payload: Range<usize>,
    /// Its length on the wire: what to drop from the buffer.
    pub len: usize,
}

/// The first frame of `buf`, if it is complete. Server frames are never masked: a masked one
/// is reported as `Err`.
pub fn parse(buf: &[u8]) -> Result<Option<Parsed>, &'static str> {
    if buf.len() < 2 {
        return Ok(None);
    }
    if buf[1] & 0x80 != 0 {
        return Err("a server frame is masked");
    }
    let (len, header) = match buf[1] & 0x7F {
        126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
        127 if buf.len() >= 10 => (
            u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes")) as usize,
            10,
        ),
        126 | 127 => return Ok(None),
        n => (n as usize, 2),
    };
    if buf.len() < header + len {
        return Ok(None);
    }
    Ok(Some(Parsed {
        fin: buf[0] & 0x80 != 0,
        rsv1: buf[0] & 0x40 != 0,
        opcode: buf[0] & 0x0F,
        payload: header..header + len,
        len: header + len,
    }))
}

/// Sends `request` and reads the answer's head (up to the empty line) into `buf`, which must
/// start with `status`; returns the head and leaves what followed it in `buf`.
pub async fn read_head<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    request: &[u8],
    status: &str,
) -> Result<String, String> {
    stream.write_all(request).await.map_err(|e| e.to_string())?;
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            if !head.starts_with(status) {
                return Err(format!(
                    "HTTP error: {}",
                    head.lines().next().unwrap_or_default()
                ));
            }
            buf.drain(..end + 4);
            return Ok(head);
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(16 * 1024);
        }
        match stream.read_buf(buf).await {
            Ok(0) => return Err(format!("closed before answering: {buf:?}")),
            Ok(_) => {}
            Err(err) => return Err(err.to_string()),
        }
    }
}

/// One frame the server sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    /// RSV1: a compressed message (permessage-deflate).
    pub rsv1: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl Frame {
    /// A close frame's code (1005, "none", for an empty one).
    pub fn close_code(&self) -> u16 {
        match self.payload[..] {
            [high, low, ..] => u16::from_be_bytes([high, low]),
            _ => 1005,
        }
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

/// A test's raw connection: the socket, and what was read and not yet parsed.
pub struct Conn {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    /// Connects and reads the 101 and the `welcome` frame.
    pub async fn open(addr: SocketAddr) -> Conn {
        let mut conn = Conn::with_early(addr, &[]).await;
        let welcome = conn.next().await.expect("a welcome frame");
        assert!(welcome.text().contains("welcome"), "{welcome:?}");
        conn
    }

    /// Connects, sending `after` in the same write as the handshake; nothing is read past
    /// the 101.
    pub async fn with_early(addr: SocketAddr, after: &[u8]) -> Conn {
        let (stream, buf) = connect(addr, after).await;
        Conn { stream, buf }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// The next frame, or `None` when the server closed the socket (bounded by `WAIT`).
    pub async fn next(&mut self) -> Option<Frame> {
        crate::within("a frame from the server", async {
            loop {
                if let Some(p) = parse(&self.buf).unwrap() {
                    let frame = Frame {
                        fin: p.fin,
                        rsv1: p.rsv1,
                        opcode: p.opcode,
                        payload: self.buf[p.payload].to_vec(),
                    };
                    self.buf.drain(..p.len);
                    return Some(frame);
                }
                let mut chunk = [0u8; 16384];
                match self.stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await
    }

    /// The next frame of `opcode`, skipping others (pings, events).
    pub async fn until(&mut self, opcode: u8) -> Frame {
        loop {
            match self.next().await {
                Some(frame) if frame.opcode == opcode => return frame,
                Some(_) => {}
                None => panic!("closed before a frame with opcode {opcode:#x}"),
            }
        }
    }

    /// How the server ends the connection: its close frame's code (skipping other frames),
    /// then the socket closes; `None` when it closed the socket without a close frame.
    pub async fn closed(&mut self) -> Option<u16> {
        loop {
            match self.next().await {
                Some(frame) if frame.opcode == CLOSE => {
                    let code = frame.close_code();
                    // After its close frame the server closes the socket.
                    while self.next().await.is_some() {}
                    return Some(code);
                }
                Some(_) => {}
                None => return None,
            }
        }
    }
}

impl Conn {
    /// Connects with `request` (a whole upgrade request), and reads its answer's head, which
    /// must be `HTTP/1.1 101`: the connection and that head.
    pub async fn upgraded(addr: SocketAddr, request: &str) -> (Conn, String) {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut buf = Vec::new();
        let head = crate::within(
            "the handshake's answer",
            read_head(&mut stream, &mut buf, request.as_bytes(), "HTTP/1.1 101"),
        )
        .await
        .unwrap();
        (Conn { stream, buf }, head)
    }
}

/// Connects, sending `after` in the same write as the handshake; returns the socket and
/// what came after the 101 response.
pub async fn connect(addr: SocketAddr, after: &[u8]) -> (TcpStream, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut request = handshake().into_bytes();
    request.extend_from_slice(after);
    let mut buf = Vec::new();
    crate::within(
        "the handshake's answer",
        read_head(&mut stream, &mut buf, &request, "HTTP/1.1 101"),
    )
    .await
    .unwrap();
    (stream, buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_in_every_length_encoding() {
        for len in [0, 125, 126, 65535, 65536] {
            let payload = vec![b'x'; len];
            let wire = frame_with(0x81, &payload, None);
            let p = parse(&wire).unwrap().unwrap();
            assert_eq!((p.fin, p.opcode, p.len), (true, TEXT, wire.len()));
            assert_eq!(&wire[p.payload], &payload[..]);
            assert_eq!(parse(&wire[..wire.len() - 1]).unwrap(), None);
        }
        assert!(parse(&frame(true, TEXT, b"hi", true)).is_err());
    }
}
