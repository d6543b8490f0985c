//! JSON written the way Python's `json.dumps` writes it.
//!
//! Celery peers parse any valid JSON, so this is not needed for
//! correctness; it is needed for byte-exact golden tests against captures
//! of real Celery traffic, and it keeps what we store in Redis looking like
//! what a Python worker stores (`", "` and `": "` separators,
//! `ensure_ascii=True`).

use std::io;

use serde::Serialize;
use serde_json::ser::Formatter;

#[derive(Debug, Default, Clone, Copy)]
struct PythonFormatter;

impl Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(b": ")
    }

    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        // ensure_ascii: everything outside ASCII becomes \uXXXX (UTF-16).
        if fragment.is_ascii() {
            return w.write_all(fragment.as_bytes());
        }
        let mut start = 0;
        for (i, ch) in fragment.char_indices() {
            if ch.is_ascii() {
                continue;
            }
            w.write_all(&fragment.as_bytes()[start..i])?;
            let mut units = [0u16; 2];
            for unit in ch.encode_utf16(&mut units) {
                write!(w, "\\u{unit:04x}")?;
            }
            start = i + ch.len_utf8();
        }
        w.write_all(&fragment.as_bytes()[start..])
    }
}

/// Appends `value` as Python's `json.dumps(value)` would write it.
pub fn write_to<T: Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    let mut ser = serde_json::Serializer::with_formatter(out, PythonFormatter);
    value
        .serialize(&mut ser)
        .expect("value must be JSON-serializable");
}

/// Serializes `value` like Python's `json.dumps(value)`.
pub fn to_string<T: Serialize + ?Sized>(value: &T) -> String {
    let mut out = Vec::with_capacity(256);
    let mut ser = serde_json::Serializer::with_formatter(&mut out, PythonFormatter);
    // Serializing to memory cannot fail for `serde_json::Value`-like data;
    // a non-string map key is the only error and is a programming mistake.
    value
        .serialize(&mut ser)
        .expect("value must be JSON-serializable");
    String::from_utf8(out).expect("formatter writes ASCII only")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn separators_match_python() {
        assert_eq!(
            to_string(&json!({"a": [1, 2], "b": null})),
            r#"{"a": [1, 2], "b": null}"#
        );
    }

    #[test]
    fn non_ascii_is_escaped_like_ensure_ascii() {
        assert_eq!(to_string(&json!("é😀\n")), r#""\u00e9\ud83d\ude00\n""#);
    }

    #[test]
    fn empty_containers() {
        assert_eq!(to_string(&json!([[], {}])), "[[], {}]");
    }

    proptest::proptest! {
        #![proptest_config(crate::protocol::strategies::config())]
        /// What the worker writes in Python's layout is JSON that reads
        /// back as the same value (key order included), in ASCII only, and
        /// says the same as serde_json's own output.
        #[test]
        fn output_parses_back_to_the_same_value(
            value in crate::protocol::strategies::json_within(64)
        ) {
            let text = to_string(&value);
            proptest::prop_assert!(text.is_ascii(), "{text}");
            let back: serde_json::Value = serde_json::from_str(&text).unwrap();
            proptest::prop_assert_eq!(&back, &value);
            let plain: serde_json::Value =
                serde_json::from_str(&serde_json::to_string(&value).unwrap()).unwrap();
            proptest::prop_assert_eq!(&back, &plain);
            let mut appended = b"x".to_vec();
            write_to(&mut appended, &value);
            proptest::prop_assert_eq!(&appended[1..], text.as_bytes());
        }
    }
}
