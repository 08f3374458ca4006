//! permessage-deflate (RFC 7692) for the WebSocket dialects: the negotiation, one message
//! compressed for every connection that negotiated it, and a client's compressed message
//! inflated within the message limit.
//!
//! fanout always answers with `server_no_context_takeover` and `client_no_context_takeover`:
//! each message is compressed on its own, so one compressed frame serves every recipient
//! (compressed once per event, where the frame is made), and no connection holds a
//! compression context between messages (an idle connection costs what it did).
//! `server_max_window_bits=N` is honoured without a compressor per window size: a message
//! compressed with the full window refers back at most its own length, so it is valid for
//! any window at least that long; longer messages go to such a connection uncompressed.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// What one connection negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deflate {
    /// The client's `server_max_window_bits` (15 when it named none).
    pub server_max_window_bits: u8,
}

impl Deflate {
    /// Whether a message of `len` bytes, compressed with the full window, is valid for this
    /// connection.
    pub fn fits(&self, len: usize) -> bool {
        self.server_max_window_bits >= 15 || len <= 1 << self.server_max_window_bits
    }
}

/// One extension offer's parameters, as RFC 7692 7.1 reads them; none when the offer
/// breaks a rule (then it is declined, and the next one considered).
fn accept(params: &[&str]) -> Option<(Deflate, String)> {
    let mut seen: Vec<&str> = Vec::new();
    let mut server_bits = None;
    for param in params {
        let (name, value) = match param.split_once('=') {
            Some((name, value)) => (name.trim(), Some(value.trim().trim_matches('"'))),
            None => (param.trim(), None),
        };
        if seen.contains(&name) {
            return None; // a parameter twice
        }
        seen.push(name);
        let bits = |value: Option<&str>| -> Option<u8> {
            let bits: u8 = value?.parse().ok()?;
            (8..=15).contains(&bits).then_some(bits)
        };
        match name {
            "server_no_context_takeover" | "client_no_context_takeover" if value.is_none() => {}
            "server_max_window_bits" => server_bits = Some(bits(value)?),
            // Without a value: the client can limit its window if asked; with one: a hint.
            "client_max_window_bits" if value.is_none() || bits(value).is_some() => {}
            _ => return None,
        }
    }
    let mut answer =
        String::from("permessage-deflate; server_no_context_takeover; client_no_context_takeover");
    if let Some(bits) = server_bits {
        answer.push_str(&format!("; server_max_window_bits={bits}"));
    }
    let deflate = Deflate {
        server_max_window_bits: server_bits.unwrap_or(15),
    };
    Some((deflate, answer))
}

/// The first acceptable permessage-deflate offer among `Sec-WebSocket-Extensions` values:
/// what it negotiates and the header to answer with; none when nothing is offered or
/// acceptable (the connection goes uncompressed).
pub fn negotiate<'a>(offers: impl IntoIterator<Item = &'a str>) -> Option<(Deflate, String)> {
    offers
        .into_iter()
        .flat_map(|value| value.split(','))
        .find_map(|offer| {
            let mut parts = offer.split(';').map(str::trim);
            match parts.next() {
                Some("permessage-deflate") => accept(&parts.collect::<Vec<_>>()),
                _ => None,
            }
        })
}

/// How hard each message is compressed (zlib's default): it is compressed once for all its
/// recipients, so a better ratio is worth the time.
const LEVEL: u32 = 6;

/// `payload` compressed on its own (raw deflate, the final empty block's `00 00 ff ff` taken
/// off, RFC 7692 7.2.1), or none when that would not make it smaller.
pub fn compress(payload: &[u8]) -> Option<Vec<u8>> {
    let mut compressor = Compress::new(Compression::new(LEVEL), false);
    let mut out = Vec::with_capacity(payload.len() / 2 + 64);
    loop {
        let consumed = compressor.total_in() as usize;
        out.reserve(payload.len().max(64));
        let status = compressor
            .compress_vec(&payload[consumed..], &mut out, FlushCompress::Sync)
            .ok()?;
        if compressor.total_in() as usize == payload.len()
            && out.ends_with(&[0, 0, 0xff, 0xff])
            && status == Status::Ok
        {
            break;
        }
        if out.len() > payload.len() + 64 {
            return None;
        }
    }
    out.truncate(out.len() - 4);
    (out.len() < payload.len()).then_some(out)
}

/// Why a client's compressed message cannot be taken.
#[derive(Debug, PartialEq, Eq)]
pub enum InflateError {
    /// It inflates past the message limit (a deflate bomb): 1009.
    TooBig,
    /// The node's memory budget cannot take what it inflates to: 1013.
    OverBudget,
    /// It is not deflate data: 1007.
    Invalid,
}

/// A client's compressed message, inflated: at most `max` bytes, each step of growth first
/// allowed by `grow` (the node's memory budget: false ends it).
pub fn inflate(
    compressed: &[u8],
    max: usize,
    mut grow: impl FnMut(usize) -> bool,
) -> Result<Vec<u8>, InflateError> {
    let mut input = Vec::with_capacity(compressed.len() + 4);
    input.extend_from_slice(compressed);
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut inflater = Decompress::new(false);
    let mut out: Vec<u8> = Vec::new();
    loop {
        let step = (out.len().max(4096)).min(max + 1 - out.len());
        if !grow(out.len() + step) {
            return Err(InflateError::OverBudget);
        }
        out.reserve_exact(step);
        let before = (inflater.total_in(), inflater.total_out());
        let status = inflater
            .decompress_vec(
                &input[inflater.total_in() as usize..],
                &mut out,
                FlushDecompress::Sync,
            )
            .map_err(|_| InflateError::Invalid)?;
        if out.len() > max {
            return Err(InflateError::TooBig);
        }
        let all_in = inflater.total_in() as usize == input.len();
        let progress = (inflater.total_in(), inflater.total_out()) != before;
        if (all_in && out.len() < out.capacity()) || status == Status::StreamEnd {
            return Ok(out);
        }
        if !progress && out.len() < out.capacity() {
            return Err(InflateError::Invalid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offers_are_read_as_rfc_7692_says() {
        let (d, answer) = negotiate(["permessage-deflate; client_max_window_bits"]).unwrap();
        assert_eq!(d.server_max_window_bits, 15);
        assert_eq!(
            answer,
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        );
        let (d, answer) = negotiate([
            "permessage-deflate; server_max_window_bits=10; client_no_context_takeover",
        ])
        .unwrap();
        assert_eq!(d.server_max_window_bits, 10);
        assert!(answer.ends_with("; server_max_window_bits=10"), "{answer}");
        assert!(d.fits(1024) && !d.fits(1025));
        // The first acceptable offer of several, in one header or several.
        let offers = ["permessage-deflate; server_max_window_bits=16, permessage-deflate"];
        assert_eq!(negotiate(offers).unwrap().0.server_max_window_bits, 15);
        let offers = [
            "x-webkit-deflate-frame",
            "permessage-deflate; server_max_window_bits=9",
        ];
        assert_eq!(negotiate(offers).unwrap().0.server_max_window_bits, 9);
        // Declined: unknown or repeated parameters, bad values, values where none belong.
        for bad in [
            "permessage-deflate; foo",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=7",
            "permessage-deflate; client_max_window_bits=16",
            "permessage-deflate; server_no_context_takeover=1",
            "deflate-frame",
            "",
        ] {
            assert_eq!(negotiate([bad]), None, "{bad}");
        }
    }

    #[test]
    fn a_message_is_compressed_on_its_own_and_inflates_back() {
        let message = br#"{"op":"event","channel":"match","data":{"score":[1,0],"minute":42,"home":"Arsenal","away":"Chelsea","home_players":["a","b","c","d"],"away_players":["a","b","c","d"]}}"#.repeat(4);
        let compressed = compress(&message).unwrap();
        assert!(compressed.len() < message.len() / 3, "{}", compressed.len());
        assert_eq!(inflate(&compressed, 1 << 20, |_| true).unwrap(), message);
        // Nothing gained: none.
        assert_eq!(compress(b"{}"), None);
    }

    #[test]
    fn a_deflate_bomb_stops_at_the_limit() {
        let bomb = compress(&vec![b'a'; 10 << 20]).unwrap();
        assert!(bomb.len() < 20_000);
        assert_eq!(
            inflate(&bomb, 64 * 1024, |_| true),
            Err(InflateError::TooBig)
        );
        // The budget says no before the limit does.
        assert_eq!(
            inflate(&bomb, 1 << 30, |n| n < 100_000),
            Err(InflateError::OverBudget)
        );
        assert_eq!(
            inflate(b"\xff\xff\xff garbage", 1024, |_| true),
            Err(InflateError::Invalid)
        );
    }
}
