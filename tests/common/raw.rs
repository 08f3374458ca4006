//! A WebSocket client by hand (RFC 6455), to send what a library would refuse to: frames of
//! any length encoding, unmasked frames, reserved bits and opcodes, broken close frames,
//! fragments split anywhere.

use std::net::SocketAddr;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

pub const HANDSHAKE: &str = "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

pub const CONTINUATION: u8 = 0x0;
pub const TEXT: u8 = 0x1;
pub const BINARY: u8 = 0x2;
pub const CLOSE: u8 = 0x8;
pub const PING: u8 = 0x9;
pub const PONG: u8 = 0xA;

/// A client frame, masked (or not).
pub fn frame(fin: bool, opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    frame_with(if fin { 0x80 } else { 0 } | opcode, payload, masked)
}

/// A client frame whose first byte (FIN, RSV1–3, opcode) is `first`, as given.
pub fn frame_with(first: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mask = [7, 1, 9, 3];
    let bit = if masked { 0x80 } else { 0 };
    let mut out = vec![first];
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
    if masked {
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

/// A close frame's payload: the code, then the reason's bytes.
pub fn close_payload(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(reason);
    payload
}

/// One frame the server sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
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

/// A raw connection: the socket, and what was read and not yet parsed.
pub struct Conn {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    /// Connects and reads the 101 and the `welcome` frame.
    pub async fn open(addr: SocketAddr) -> Conn {
        let (stream, buf) = connect(addr, &[]).await;
        let mut conn = Conn { stream, buf };
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
        super::within("a frame from the server", async {
            loop {
                if let Some(frame) = self.parse() {
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

    fn parse(&mut self) -> Option<Frame> {
        let buf = &self.buf;
        if buf.len() < 2 {
            return None;
        }
        assert_eq!(buf[1] & 0x80, 0, "server frames are never masked");
        let (len, header) = match buf[1] & 0x7F {
            126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
            127 if buf.len() >= 10 => (
                u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize,
                10,
            ),
            126 | 127 => return None,
            n => (n as usize, 2),
        };
        if buf.len() < header + len {
            return None;
        }
        let frame = Frame {
            fin: buf[0] & 0x80 != 0,
            opcode: buf[0] & 0x0F,
            payload: buf[header..header + len].to_vec(),
        };
        self.buf.drain(..header + len);
        Some(frame)
    }
}

/// Connects, sending `after` in the same write as the handshake; returns the socket and
/// what came after the 101 response.
pub async fn connect(addr: SocketAddr, after: &[u8]) -> (TcpStream, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut request = HANDSHAKE.as_bytes().to_vec();
    request.extend_from_slice(after);
    stream.write_all(&request).await.unwrap();
    let mut buf = Vec::new();
    loop {
        let mut chunk = [0u8; 4096];
        let n = super::within("the handshake's answer", stream.read(&mut chunk))
            .await
            .unwrap();
        assert!(n > 0, "closed before answering the handshake: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            assert!(buf.starts_with(b"HTTP/1.1 101"));
            buf.drain(..end + 4);
            return (stream, buf);
        }
    }
}
