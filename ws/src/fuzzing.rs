//! Entry points for the fuzz targets (`fuzz/`, `make fuzz`) and for their corpus replay in
//! `make test` (`tests/integration/fuzz_corpus.rs`): each takes arbitrary bytes, runs one of the parsers
//! that hostile input reaches first, checks what must hold whatever the input, and must
//! never panic. Not an API: the names may change with the targets.

use std::sync::OnceLock;

use axum::http::{HeaderMap, HeaderName, HeaderValue, Method};

use crate::{
    auth::Verifier,
    config::Config,
    cursor::Cursor,
    protocol,
    transport::{frame::Decoder, websocket},
};

/// WebSocket frames as a client sends them. The first byte sets how the rest is cut into
/// reads (1 to 64 bytes each), and, its high bit, whether permessage-deflate was negotiated
/// (compressed messages inflate within the limit): no answer may depend on where the reads
/// fall.
pub fn frames(data: &[u8]) {
    let Some((&cut, bytes)) = data.split_first() else {
        return;
    };
    const MAX: usize = 4096;
    let decode = |chunk: usize| {
        let mut decoder = Decoder::default();
        decoder.deflate = cut & 0x80 != 0;
        let mut out = Vec::new();
        for piece in bytes.chunks(chunk) {
            decoder.buf.extend_from_slice(piece);
            loop {
                match decoder.next(MAX) {
                    Ok(Some(message)) => out.push(Ok(format!("{message:?}"))),
                    Ok(None) => break,
                    Err(err) => {
                        out.push(Err(err.to_string()));
                        return out;
                    }
                }
            }
            // What it holds is the frame in progress, never more than a frame's worth.
            assert!(decoder.held() <= 2 * (MAX + 14 + piece.len()) + 4096);
        }
        out
    };
    assert_eq!(decode(cut as usize % 64 + 1), decode(bytes.len().max(1)));
}

/// An HTTP request head sent to `/ws`: parsed as hyper parses it, then checked as the
/// upgrade checks it.
pub fn upgrade(data: &[u8]) {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(_)) = request.parse(data) else {
        return;
    };
    let Ok(method) = Method::from_bytes(request.method.unwrap_or("GET").as_bytes()) else {
        return;
    };
    let mut map = HeaderMap::new();
    for header in request.headers.iter() {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(header.name.as_bytes()),
            HeaderValue::from_bytes(header.value),
        ) {
            map.append(name, value);
        }
    }
    if let Ok(key) = websocket::handshake(&method, &map) {
        assert_eq!(websocket::accept_key(&key).len(), 28);
    }
    // The permessage-deflate offers: declined, or answered without context takeover.
    let offers = map
        .get_all("sec-websocket-extensions")
        .iter()
        .filter_map(|v| v.to_str().ok());
    if let Some((deflate, answer)) = crate::transport::deflate::negotiate(offers) {
        assert!(answer.starts_with(
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        ));
        assert!((8..=15).contains(&deflate.server_max_window_bits));
    }
}

/// A protocol request frame's text: parsed, or refused with an error frame that is JSON.
pub fn op(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(rejection) = protocol::parse(text) {
        let frame = rejection.encode();
        serde_json::from_str::<serde_json::Value>(&frame).expect("an error frame is JSON");
    }
}

/// An SSE `Last-Event-ID` or long-poll cursor: decoded with one region and with two; what
/// decodes encodes back to a cursor that decodes the same.
pub fn cursor(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let none: &[&str] = &[];
    for regions in [none, &["eu", "us"]] {
        if let Ok(cursor) = Cursor::decode(text, regions) {
            let again = Cursor::decode(&cursor.encode(regions), regions).expect("re-decodes");
            assert_eq!(format!("{cursor:?}"), format!("{again:?}"));
        }
    }
}

/// A JWT as a client presents it (`?token=`, `Authorization`, `refresh`), against an HS256
/// verifier.
pub fn jwt(data: &[u8]) {
    static VERIFIER: OnceLock<Verifier> = OnceLock::new();
    let verifier = VERIFIER.get_or_init(|| {
        let config = Config {
            auth: crate::config::AuthMode::Jwt,
            jwt_secret: "fuzzing-secret".into(),
            ..Config::default()
        };
        Verifier::from_config(&config).expect("a valid verifier")
    });
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = verifier.identify(Some(text), None);
}
