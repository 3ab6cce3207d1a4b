//! The cache key: a stable 128-bit hash of the normalised request. Field order and
//! whitespace do not matter; `stream`, `stream_options`, `user` and other fields that do
//! not change the answer are left out. The same request hashes the same in every
//! gateway process (the key is shared through Redis).

use serde_json::Value;
use xxhash_rust::xxh3::Xxh3;

pub type Key = u128;

/// Top-level fields that do not change the answer.
const IGNORED: &[&str] = &[
    "stream",
    "stream_options",
    "user",
    "metadata",
    "store",
    "safety_identifier",
    "prompt_cache_key",
    "service_tier",
];

/// The key for `body` sent to `chain`, in the tenant `namespace`. `None` if the body is
/// not a JSON object (it was validated before, so this does not happen in practice).
pub fn key(namespace: &[u8], chain: &str, body: &[u8]) -> Option<Key> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let obj = value.as_object()?;
    let mut h = Xxh3::new();
    h.update(b"cascade-cache-v1\0");
    h.update(namespace);
    h.update(b"\0");
    h.update(chain.as_bytes());
    h.update(b"\0");
    let mut fields: Vec<(&String, &Value)> = obj
        .iter()
        .filter(|(k, _)| !IGNORED.contains(&k.as_str()) && k.as_str() != "model")
        .collect();
    fields.sort_unstable_by(|a, b| a.0.cmp(b.0));
    for (k, v) in fields {
        write_str(&mut h, k);
        write_value(&mut h, v);
    }
    Some(h.digest128())
}

fn write_str(h: &mut Xxh3, s: &str) {
    h.update(&(s.len() as u64).to_le_bytes());
    h.update(s.as_bytes());
}

/// Hashes a value canonically: type tags, lengths, object keys sorted.
fn write_value(h: &mut Xxh3, v: &Value) {
    match v {
        Value::Null => h.update(b"n"),
        Value::Bool(b) => h.update(if *b { b"t" } else { b"f" }),
        Value::Number(n) => {
            h.update(b"#");
            // Integers exactly (large seeds must not collide); 1 and 1.0 are the same
            // number to every provider.
            if let Some(i) = n.as_i64() {
                write_str(h, &i.to_string());
            } else if let Some(u) = n.as_u64() {
                write_str(h, &u.to_string());
            } else {
                match n.as_f64() {
                    Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => {
                        write_str(h, &(f as i64).to_string())
                    }
                    Some(f) => write_str(h, &f.to_string()),
                    None => write_str(h, &n.to_string()),
                }
            }
        }
        Value::String(s) => {
            h.update(b"s");
            write_str(h, s);
        }
        Value::Array(a) => {
            h.update(b"[");
            h.update(&(a.len() as u64).to_le_bytes());
            for item in a {
                write_value(h, item);
            }
        }
        Value::Object(o) => {
            h.update(b"{");
            h.update(&(o.len() as u64).to_le_bytes());
            let mut fields: Vec<_> = o.iter().collect();
            fields.sort_unstable_by(|a, b| a.0.cmp(b.0));
            for (k, v) in fields {
                write_str(h, k);
                write_value(h, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(body: &str) -> Key {
        key(b"", "c", body.as_bytes()).unwrap()
    }

    #[test]
    fn order_whitespace_and_ignored_fields_do_not_matter() {
        let a = k(r#"{"model":"x","messages":[{"role":"user","content":"hi"}],"temperature":0}"#);
        let b = k(
            r#"{ "temperature" : 0.0, "messages" : [ { "content":"hi", "role":"user" } ], "model":"x", "stream":true, "user":"u1" }"#,
        );
        assert_eq!(a, b);
        assert_ne!(
            a,
            k(r#"{"model":"x","messages":[{"role":"user","content":"hi!"}],"temperature":0}"#)
        );
        assert_ne!(
            a,
            k(r#"{"model":"x","messages":[{"role":"user","content":"hi"}],"temperature":0.5}"#)
        );
        assert_ne!(
            a,
            key(
                b"",
                "other-chain",
                br#"{"messages":[{"role":"user","content":"hi"}],"temperature":0}"#
            )
            .unwrap()
        );
        assert_ne!(
            a,
            key(
                b"tenant-2",
                "c",
                br#"{"messages":[{"role":"user","content":"hi"}],"temperature":0}"#
            )
            .unwrap()
        );
        // Large seeds stay distinct.
        assert_ne!(
            k(r#"{"seed":9007199254740993}"#),
            k(r#"{"seed":9007199254740992}"#)
        );
        // Array order does matter.
        assert_ne!(k(r#"{"stop":["a","b"]}"#), k(r#"{"stop":["b","a"]}"#));
    }
}
