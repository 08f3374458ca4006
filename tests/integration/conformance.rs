//! RFC 6455 conformance of the ws node's framing, table-driven, with a hand-made client
//! (tests/common/raw.rs). The cases follow the groups of the Autobahn test suite's fuzzing
//! client (which cannot be installed here): 1 framing and sizes, 2 pings and pongs, 3
//! reserved bits, 4 opcodes, 5 fragmentation, 6 UTF-8, 7 close handling, 9 limits.
//!
//! Every case runs on a connection of its own; a case that does not close the connection
//! ends by checking that the connection still answers (an op `ping` gets its `pong`).

use crate::common;

use common::{raw::*, *};

/// What a case must get.
#[derive(Debug, Clone)]
enum Expect {
    /// A text frame containing this, then the connection stays open.
    Answer(&'static str),
    /// These text frames' contents, in this order (pongs to pings in between skipped).
    Answers(Vec<&'static str>),
    /// A pong with this payload, then open.
    Pong(Vec<u8>),
    /// Nothing (an unsolicited pong): the connection stays open.
    Nothing,
    /// A close frame with this code, then the socket closes.
    Close(u16),
}

/// A text message of exactly `len` bytes that is an op `ping` (with `id`), padded; shorter
/// than the smallest such op: spaces, which are not JSON.
fn ping_of(len: usize, id: u32) -> Vec<u8> {
    let head = format!(r#"{{"op":"ping","id":{id},"pad":""#);
    if len < head.len() + 2 {
        return vec![b' '; len];
    }
    let mut out = head.into_bytes();
    out.resize(len - 2, b'x');
    out.extend_from_slice(b"\"}");
    out
}

const LIMIT: usize = 64 * 1024; // the default FANOUT_MAX_MESSAGE_BYTES

fn text(payload: &[u8]) -> Vec<u8> {
    frame(true, TEXT, payload, true)
}

fn cases() -> Vec<(String, Vec<u8>, Expect)> {
    let mut cases: Vec<(String, Vec<u8>, Expect)> = Vec::new();
    let mut case = |name: String, bytes: Vec<u8>, expect: Expect| cases.push((name, bytes, expect));
    let pong = r#""op":"pong","id":1"#;

    // 1: frame sizes, across the 7-bit, 16-bit and 64-bit length encodings, up to the limit.
    for len in [0, 125, 126, 127, 65535, 65536] {
        let expect = if len == 0 {
            Expect::Answer(r#""code":"invalid_json""#)
        } else {
            Expect::Answer(pong)
        };
        case(
            format!("1 text of {len} bytes"),
            text(&ping_of(len, 1)),
            expect,
        );
    }
    for len in [0, 125, 65536] {
        case(
            format!("1 binary of {len} bytes"),
            frame(true, BINARY, &vec![0xfe; len], true),
            Expect::Answer(r#""code":"unsupported_frame""#),
        );
    }
    case(
        "1 an unmasked frame".into(),
        frame(true, TEXT, &ping_of(30, 1), false),
        Expect::Close(1002),
    );

    // 2: pings and pongs.
    case(
        "2 empty ping".into(),
        frame(true, PING, b"", true),
        Expect::Pong(vec![]),
    );
    case(
        "2 ping of 125 bytes".into(),
        frame(true, PING, &[0xab; 125], true),
        Expect::Pong(vec![0xab; 125]),
    );
    case(
        "2 ping of 126 bytes".into(),
        frame(true, PING, &[0xab; 126], true),
        Expect::Close(1002),
    );
    case(
        "2 unsolicited pong".into(),
        frame(true, PONG, b"hello", true),
        Expect::Nothing,
    );
    case(
        "2 fragmented ping".into(),
        frame(false, PING, b"a", true),
        Expect::Close(1002),
    );
    let mut pings = Vec::new();
    for _ in 0..10 {
        pings.extend(frame(true, PING, b"p", true));
    }
    pings.extend(text(&ping_of(40, 1)));
    case("2 ten pings at once".into(), pings, Expect::Answer(pong));

    // 3: reserved bits, on data and control frames.
    for (rsv, name) in [(0x40, "RSV1"), (0x20, "RSV2"), (0x10, "RSV3")] {
        case(
            format!("3 {name} on text"),
            frame_with(0x80 | rsv | TEXT, &ping_of(30, 1), Some(MASK)),
            Expect::Close(1002),
        );
        case(
            format!("3 {name} on ping"),
            frame_with(0x80 | rsv | PING, b"", Some(MASK)),
            Expect::Close(1002),
        );
    }

    // 4: reserved opcodes.
    for opcode in [3u8, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF] {
        case(
            format!("4 opcode {opcode:#x}"),
            frame(true, opcode, b"x", true),
            Expect::Close(1002),
        );
    }

    // 5: fragmentation.
    let message = ping_of(60, 1);
    let mut two = frame(false, TEXT, &message[..20], true);
    two.extend(frame(true, CONTINUATION, &message[20..], true));
    case("5 text in two fragments".into(), two, Expect::Answer(pong));
    let mut bytewise = frame(false, TEXT, &message[..1], true);
    for byte in &message[1..message.len() - 1] {
        bytewise.extend(frame(false, CONTINUATION, &[*byte], true));
    }
    bytewise.extend(frame(
        true,
        CONTINUATION,
        &message[message.len() - 1..],
        true,
    ));
    case(
        "5 text in one-byte fragments".into(),
        bytewise,
        Expect::Answer(pong),
    );
    let mut with_ping = frame(false, TEXT, &message[..20], true);
    with_ping.extend(frame(true, PING, b"mid", true));
    with_ping.extend(frame(false, CONTINUATION, &message[20..40], true));
    with_ping.extend(frame(true, PONG, b"", true));
    with_ping.extend(frame(true, CONTINUATION, &message[40..], true));
    case(
        "5 control frames between fragments".into(),
        with_ping,
        Expect::Answer(pong),
    );
    let mut empty_fragments = frame(false, TEXT, b"", true);
    empty_fragments.extend(frame(false, CONTINUATION, &message, true));
    empty_fragments.extend(frame(true, CONTINUATION, b"", true));
    case(
        "5 empty first and last fragments".into(),
        empty_fragments,
        Expect::Answer(pong),
    );
    case(
        "5 a continuation with nothing to continue".into(),
        frame(true, CONTINUATION, b"x", true),
        Expect::Close(1002),
    );
    let mut nested = frame(false, TEXT, &message[..20], true);
    nested.extend(text(&ping_of(30, 1)));
    case(
        "5 a new message inside a fragmented one".into(),
        nested,
        Expect::Close(1002),
    );
    let mut binary_then_text = frame(false, BINARY, b"ab", true);
    binary_then_text.extend(frame(true, CONTINUATION, b"cd", true));
    binary_then_text.extend(text(&ping_of(40, 2)));
    case(
        "5 fragmented binary, then text".into(),
        binary_then_text,
        Expect::Answers(vec![
            r#""code":"unsupported_frame""#,
            r#""op":"pong","id":2"#,
        ]),
    );

    // 6: UTF-8.
    let accented = r#"{"op":"ping","id":1,"pad":"κόσμε €𝄞"}"#.as_bytes().to_vec();
    case(
        "6 valid multi-byte text".into(),
        text(&accented),
        Expect::Answer(pong),
    );
    for split in [28, 39, 40, 42, 43, 44] {
        // Each split point falls inside a multi-byte sequence (2, 3 and 4 bytes long).
        assert!(std::str::from_utf8(&accented[..split]).is_err(), "{split}");
        let mut split_frames = frame(false, TEXT, &accented[..split], true);
        split_frames.extend(frame(true, CONTINUATION, &accented[split..], true));
        case(
            format!("6 text split inside a UTF-8 sequence at byte {split}"),
            split_frames,
            Expect::Answer(pong),
        );
    }
    for (name, bad) in [
        ("a lone continuation byte", &b"\"\x80\""[..]),
        ("an overlong encoding", b"\"\xc0\xaf\""),
        ("a UTF-16 surrogate", b"\"\xed\xa0\x80\""),
        ("a code point past U+10FFFF", b"\"\xf4\x90\x80\x80\""),
        ("a truncated sequence", b"\"\xe2\x82\""),
    ] {
        case(format!("6 {name}"), text(bad), Expect::Close(1007));
    }
    let mut bad_fragments = frame(false, TEXT, b"\"ok", true);
    bad_fragments.extend(frame(true, CONTINUATION, b"\xff\"", true));
    case(
        "6 invalid UTF-8 in a later fragment".into(),
        bad_fragments,
        Expect::Close(1007),
    );

    // 7: close frames.
    case(
        "7 empty close".into(),
        frame(true, CLOSE, b"", true),
        Expect::Close(1000),
    );
    for code in [
        1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999,
        4000, 4999,
    ] {
        case(
            format!("7 close {code}"),
            frame(true, CLOSE, &close_payload(code, b"bye"), true),
            Expect::Close(code),
        );
    }
    for code in [
        0u16, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
    ] {
        case(
            format!("7 close with code {code}, which a peer may not send"),
            frame(true, CLOSE, &close_payload(code, b""), true),
            Expect::Close(1002),
        );
    }
    case(
        "7 close with a 1-byte payload".into(),
        frame(true, CLOSE, &[0x03], true),
        Expect::Close(1002),
    );
    case(
        "7 close with a reason that is not UTF-8".into(),
        frame(true, CLOSE, &close_payload(1000, b"\xce\xba\xe1\xbd"), true),
        Expect::Close(1007),
    );
    case(
        "7 close with a 123-byte reason".into(),
        frame(true, CLOSE, &close_payload(1000, &[b'r'; 123]), true),
        Expect::Close(1000),
    );
    case(
        "7 close with a 124-byte reason (payload over 125)".into(),
        frame(true, CLOSE, &close_payload(1000, &[b'r'; 124]), true),
        Expect::Close(1002),
    );
    let mut then_data = frame(true, CLOSE, &close_payload(1000, b""), true);
    then_data.extend(text(&ping_of(40, 1)));
    case(
        "7 data after close is not answered".into(),
        then_data,
        Expect::Close(1000),
    );

    // 9: limits.
    case(
        format!("9 text of {} bytes (the limit + 1)", LIMIT + 1),
        text(&ping_of(LIMIT + 1, 1)),
        Expect::Close(1009),
    );
    let big = ping_of(LIMIT + 1, 1);
    let mut fragments = frame(false, TEXT, &big[..LIMIT / 2], true);
    fragments.extend(frame(true, CONTINUATION, &big[LIMIT / 2..], true));
    case(
        "9 fragments adding up past the limit".into(),
        fragments,
        Expect::Close(1009),
    );
    let mut huge = vec![0x81, 0x80 | 127];
    huge.extend_from_slice(&(1u64 << 62).to_be_bytes());
    huge.extend_from_slice(&[1, 2, 3, 4]);
    case(
        "9 a header announcing 2^62 bytes".into(),
        huge,
        Expect::Close(1009),
    );
    cases
}

/// Checks that `conn` still answers requests, skipping frames the case left behind.
async fn still_answers(conn: &mut Conn, name: &str) {
    conn.send(&text(br#"{"op":"ping","id":99}"#)).await;
    loop {
        let frame = conn
            .next()
            .await
            .unwrap_or_else(|| panic!("{name}: closed, expected it to stay open"));
        assert_ne!(
            frame.opcode,
            CLOSE,
            "{name}: closed with {}",
            frame.close_code()
        );
        if frame.opcode == TEXT && frame.text().contains(r#""id":99"#) {
            return;
        }
    }
}

/// Sends `bytes` on a connection of its own (in one write, or one byte per write) and
/// checks that the node answers as `expect` says.
async fn run_case(ws: &Server, name: &str, bytes: &[u8], expect: &Expect, bytewise: bool) {
    let mut conn = Conn::open(ws.addr).await;
    if bytewise {
        for byte in bytes {
            conn.send(std::slice::from_ref(byte)).await;
        }
    } else {
        conn.send(bytes).await;
    }
    let needles = match expect {
        Expect::Answer(needle) => std::slice::from_ref(needle),
        Expect::Answers(needles) => &needles[..],
        _ => &[],
    };
    for needle in needles {
        let frame = conn.until(TEXT).await;
        let text = frame.text();
        assert!(text.contains(needle), "{name}: got {text}");
    }
    match expect {
        Expect::Close(code) => assert_eq!(conn.closed().await, Some(*code), "{name}"),
        Expect::Pong(payload) => {
            assert_eq!(&conn.until(PONG).await.payload, payload, "{name}");
            still_answers(&mut conn, name).await;
        }
        _ => still_answers(&mut conn, name).await,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc6455_cases() {
    let nats = NatsServer::start();
    let ws = start_ws(&nats, "ws-1", |_| {}).await;
    let cases = cases();
    for (name, bytes, expect) in &cases {
        run_case(&ws, name, bytes, expect, false).await;
    }
    // The same bytes delivered one at a time: nothing may depend on how reads split them.
    for (name, bytes, expect) in cases.iter().filter(|(_, b, _)| b.len() < 1024) {
        let name = format!("{name}, byte by byte");
        run_case(&ws, &name, bytes, expect, true).await;
    }
    println!(
        "{} RFC 6455 cases, each whole and byte by byte",
        cases.len()
    );
}
