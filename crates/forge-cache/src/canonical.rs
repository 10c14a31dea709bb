//! Canonical JSON: the one serialization a fingerprint is hashed in.
//!
//! Object keys are sorted (whatever map type produced them), there is no whitespace, strings
//! use serde_json's escaping and numbers its shortest round-trip form. Never hash `Debug`
//! output or a `HashMap`'s iteration order.

use serde_json::Value;

pub fn to_vec(value: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    write(value, &mut out);
    out
}

pub fn to_string(value: &Value) -> String {
    String::from_utf8(to_vec(value)).expect("canonical JSON is UTF-8")
}

fn write(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, k).expect("strings serialize");
                out.push(b':');
                write(&map[k], out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write(v, out);
            }
            out.push(b']');
        }
        scalar => serde_json::to_writer(&mut *out, scalar).expect("scalars serialize"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sorts_keys_at_every_depth() {
        let a = json!({"b": 1, "a": {"z": [1, {"y": 2, "x": 3}], "c": "é\n"}});
        assert_eq!(to_string(&a), r#"{"a":{"c":"é\n","z":[1,{"x":3,"y":2}]},"b":1}"#);
    }

    #[test]
    fn numbers_keep_their_type() {
        assert_eq!(to_string(&json!([1, 1.0, 2e-4, -0.5])), "[1,1.0,0.0002,-0.5]");
    }
}
