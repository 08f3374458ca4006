//! The `fanout.msgpack` encoding of the protocol: every frame a MessagePack map with the JSON
//! frames' ops and fields (keys by name), in which `data` may be bytes (bin). Pure functions
//! between the two encodings; the node keeps speaking JSON inside.
//!
//! - Node → client ([`from_json`]): a JSON frame's MessagePack; binary data, which JSON frames
//!   carry as `"data":"<base64>","encoding":"base64"`, becomes `data` as bin (and no
//!   `encoding`).
//! - Client → node ([`to_json`]): a MessagePack frame as the JSON frame the parser reads; bin
//!   `data` becomes base64 with `"encoding":"base64"`, which is how JSON clients publish bytes.

use base64::{Engine, engine::general_purpose::STANDARD};
use fanout::Code;
use rmpv::Value as Packed;
use serde_json::{Map, Number, Value};

use crate::protocol::Rejection;

/// Deepest nesting a client's frame may have (arrays and maps), so that a hostile frame cannot
/// exhaust the stack.
const MAX_DEPTH: usize = 64;

/// `json` (one frame the node made) as MessagePack. Empty if `json` is not JSON, which the
/// node never makes.
pub fn from_json(json: &[u8]) -> Vec<u8> {
    let Ok(Value::Object(mut fields)) = serde_json::from_slice::<Value>(json) else {
        return Vec::new();
    };
    let bytes = match (fields.get("encoding"), fields.get("data")) {
        (Some(Value::String(encoding)), Some(Value::String(data))) if encoding == "base64" => {
            STANDARD.decode(data).ok()
        }
        _ => None,
    };
    let mut bytes = bytes;
    if bytes.is_some() {
        fields.remove("encoding");
    }
    let mut map = Vec::with_capacity(fields.len());
    for (key, value) in fields {
        let value = match bytes.take_if(|_| key == "data") {
            Some(bytes) => Packed::Binary(bytes),
            None => pack(value),
        };
        map.push((Packed::from(key), value));
    }
    let mut out = Vec::with_capacity(json.len());
    rmpv::encode::write_value(&mut out, &Packed::Map(map)).expect("writing to a Vec succeeds");
    out
}

fn pack(value: Value) -> Packed {
    match value {
        Value::Null => Packed::Nil,
        Value::Bool(b) => Packed::Boolean(b),
        Value::Number(n) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => Packed::from(u),
            (None, Some(i)) => Packed::from(i),
            _ => Packed::F64(n.as_f64().unwrap_or_default()),
        },
        Value::String(s) => Packed::from(s),
        Value::Array(items) => Packed::Array(items.into_iter().map(pack).collect()),
        Value::Object(fields) => Packed::Map(
            fields
                .into_iter()
                .map(|(k, v)| (Packed::from(k), pack(v)))
                .collect(),
        ),
    }
}

/// A client's MessagePack frame as the protocol's JSON text, or why it cannot be read: it must
/// be one map with string keys; bytes are allowed only as its `data`.
pub fn to_json(payload: &[u8]) -> Result<String, Rejection> {
    let invalid = |why: String| Rejection::new(Code::InvalidJson, why);
    let mut rest = payload;
    let value = rmpv::decode::read_value_with_max_depth(&mut rest, MAX_DEPTH)
        .map_err(|err| invalid(format!("not a MessagePack frame: {err}")))?;
    if !rest.is_empty() {
        return Err(invalid(format!(
            "a MessagePack frame holds one value; {} bytes follow it",
            rest.len()
        )));
    }
    let Packed::Map(entries) = value else {
        return Err(invalid("a request must be a MessagePack map".into()));
    };
    let mut fields = Map::new();
    for (key, value) in entries {
        let key = string_key(key)?;
        let value = match value {
            Packed::Binary(bytes) if key == "data" => {
                fields.insert("encoding".into(), Value::from("base64"));
                Value::String(STANDARD.encode(bytes))
            }
            value => unpack(value)?,
        };
        fields.insert(key, value);
    }
    Ok(Value::Object(fields).to_string())
}

fn string_key(key: Packed) -> Result<String, Rejection> {
    match key {
        Packed::String(s) => s
            .into_str()
            .ok_or_else(|| Rejection::new(Code::InvalidJson, "a map key is not UTF-8")),
        _ => Err(Rejection::new(
            Code::InvalidJson,
            "map keys must be strings",
        )),
    }
}

fn unpack(value: Packed) -> Result<Value, Rejection> {
    let invalid = |why: &str| Rejection::new(Code::InvalidJson, why);
    Ok(match value {
        Packed::Nil => Value::Null,
        Packed::Boolean(b) => Value::Bool(b),
        Packed::Integer(i) => match (i.as_u64(), i.as_i64()) {
            (Some(u), _) => Value::from(u),
            (None, Some(i)) => Value::from(i),
            _ => return Err(invalid("an integer out of range")),
        },
        Packed::F32(f) => float(f64::from(f))?,
        Packed::F64(f) => float(f)?,
        Packed::String(s) => Value::String(
            s.into_str()
                .ok_or_else(|| invalid("a string is not UTF-8"))?,
        ),
        Packed::Binary(_) => {
            return Err(invalid(
                "bytes (bin) are allowed only as a frame's \"data\"",
            ));
        }
        Packed::Array(items) => {
            Value::Array(items.into_iter().map(unpack).collect::<Result<_, _>>()?)
        }
        Packed::Map(entries) => Value::Object(
            entries
                .into_iter()
                .map(|(k, v)| Ok((string_key(k)?, unpack(v)?)))
                .collect::<Result<_, Rejection>>()?,
        ),
        Packed::Ext(..) => return Err(invalid("MessagePack extension types are not used")),
    })
}

fn float(f: f64) -> Result<Value, Rejection> {
    Number::from_f64(f)
        .map(Value::Number)
        .ok_or_else(|| Rejection::new(Code::InvalidJson, "NaN and infinities are not JSON numbers"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_data_is_bin_both_ways() {
        let json = br#"{"op":"event","channel":"a","seq":3,"data":"AAEC/w==","encoding":"base64"}"#;
        let packed = from_json(json);
        let Packed::Map(entries) = rmpv::decode::read_value(&mut &packed[..]).unwrap() else {
            panic!("not a map");
        };
        let get = |name: &str| {
            entries
                .iter()
                .find(|(k, _)| k.as_str() == Some(name))
                .map(|(_, v)| v.clone())
        };
        assert_eq!(get("data"), Some(Packed::Binary(vec![0, 1, 2, 255])));
        assert_eq!(get("encoding"), None);
        assert_eq!(get("seq"), Some(Packed::from(3u64)));
        let back: Value = serde_json::from_str(&to_json(&packed).unwrap()).unwrap();
        assert_eq!(
            back,
            serde_json::json!({"op":"event","channel":"a","seq":3,"data":"AAEC/w==","encoding":"base64"})
        );
    }

    #[test]
    fn json_data_keeps_its_types() {
        let json = br#"{"op":"event","data":{"n":-1,"f":1.5,"s":"x","l":[true,null]}}"#;
        let back: Value = serde_json::from_str(&to_json(&from_json(json)).unwrap()).unwrap();
        assert_eq!(back, serde_json::from_slice::<Value>(json).unwrap());
    }

    #[test]
    fn refuses_what_json_cannot_say() {
        let frame = |value: Packed| {
            let mut out = Vec::new();
            rmpv::encode::write_value(&mut out, &value).unwrap();
            out
        };
        let map = |k: Packed, v: Packed| frame(Packed::Map(vec![(k, v)]));
        assert!(to_json(&frame(Packed::from(1))).is_err());
        assert!(to_json(&map(Packed::from(1), Packed::Nil)).is_err());
        assert!(to_json(&map(Packed::from("info"), Packed::Binary(vec![1]))).is_err());
        assert!(to_json(&map(Packed::from("x"), Packed::F64(f64::NAN))).is_err());
        assert!(to_json(&map(Packed::from("x"), Packed::Ext(1, vec![1]))).is_err());
        assert!(to_json(b"\xc1").is_err());
        let mut trailing = map(Packed::from("op"), Packed::from("ping"));
        trailing.push(0xc0);
        assert!(to_json(&trailing).is_err());
        let mut deep = vec![0x91; 100_000];
        deep.push(0xc0);
        assert!(to_json(&frame(Packed::Map(vec![]))).is_ok());
        assert!(to_json(&deep).is_err());
    }
}
