//! A record's JSON value as templates read it: parsed once, borrowed, and only as deep as the
//! templates look.
//!
//! The top-level object is split into (key, raw value) pairs that borrow from the record; a
//! nested object is split only when a dotted path goes into it, once per record. Nothing is
//! copied until a template renders a field, except a key written with escapes, which is
//! unescaped at any depth, so that every document reads exactly as a full parse would.

use std::borrow::Cow;
use std::cell::RefCell;
use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// An object member's name: borrowed from the record unless it had to be unescaped.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

/// One JSON object's members, borrowed.
struct Fields<'a>(Vec<(Key<'a>, &'a RawValue)>);

impl<'a> Fields<'a> {
    /// The last member named `key`, as `serde_json::Value` would keep it.
    fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k.0 == key)
            .map(|(_, v)| *v)
    }

    /// The members of `text` if it is an object; `text` is known to be valid JSON.
    fn of(text: &'a str) -> Option<Fields<'a>> {
        let is_object = text.trim_start().starts_with('{');
        is_object.then(|| serde_json::from_str(text).ok()).flatten()
    }
}

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct FieldsVisitor;
        impl<'de> Visitor<'de> for FieldsVisitor {
            type Value = Fields<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields<'de>, A::Error> {
                let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(entry) = map.next_entry::<Key<'de>, &'de RawValue>()? {
                    fields.push(entry);
                }
                Ok(Fields(fields))
            }
        }
        d.deserialize_map(FieldsVisitor)
    }
}

/// A parsed record value.
pub struct JsonView<'a> {
    /// The top-level object's members; none when the value is not an object.
    top: Fields<'a>,
    /// Nested objects split so far, by the address of their raw text.
    nested: RefCell<Vec<(usize, Option<Fields<'a>>)>>,
}

impl<'a> JsonView<'a> {
    /// Parses and validates the whole document.
    pub fn parse(payload: &'a [u8]) -> Result<JsonView<'a>, String> {
        let text = std::str::from_utf8(payload).map_err(|e| e.to_string())?;
        let top = match serde_json::from_str::<Fields<'a>>(text) {
            Ok(top) => top,
            // Valid JSON but not an object: no field can be read from it.
            Err(e) if e.is_data() => {
                serde_json::from_str::<&RawValue>(text).map_err(|e| e.to_string())?;
                Fields(Vec::new())
            }
            Err(e) => return Err(e.to_string()),
        };
        Ok(JsonView {
            top,
            nested: RefCell::new(Vec::new()),
        })
    }

    /// Appends the scalar at `path` to `out`; false when it is missing, null, empty or not a
    /// scalar (then `out` is left as it was).
    pub fn push_scalar(&self, path: &[String], out: &mut String) -> bool {
        let Some((first, rest)) = path.split_first() else {
            return false;
        };
        let mut cur = self.top.get(first);
        for key in rest {
            cur = cur.and_then(|parent| self.child(parent, key));
        }
        cur.is_some_and(|raw| push_raw_scalar(raw, out))
    }

    fn child(&self, parent: &'a RawValue, key: &str) -> Option<&'a RawValue> {
        let address = parent.get().as_ptr() as usize;
        let mut cache = self.nested.borrow_mut();
        if let Some((_, fields)) = cache.iter().find(|(a, _)| *a == address) {
            return fields.as_ref()?.get(key);
        }
        let fields = Fields::of(parent.get());
        let found = fields.as_ref().and_then(|f| f.get(key));
        cache.push((address, fields));
        found
    }
}

fn push_raw_scalar(raw: &RawValue, out: &mut String) -> bool {
    let text = raw.get().trim();
    match text.as_bytes().first() {
        Some(b'"') => {
            let s: Cow<'_, str> = match serde_json::from_str::<&str>(text) {
                Ok(s) => s.into(),
                Err(_) => match serde_json::from_str::<String>(text) {
                    Ok(s) => s.into(),
                    Err(_) => return false,
                },
            };
            if s.is_empty() {
                return false;
            }
            out.push_str(&s);
            true
        }
        Some(b't' | b'f' | b'-' | b'0'..=b'9') => {
            out.push_str(text);
            true
        }
        _ => false,
    }
}

/// Whether `payload` nests arrays and objects deeper than `max`: one pass over its bytes,
/// since the splice into frames and serde_json's raw values never look that deep.
pub fn deeper_than(payload: &[u8], max: usize) -> bool {
    // Most records open fewer brackets than the bound: a count the compiler vectorizes rules
    // them out without following strings.
    let opening = payload
        .iter()
        .map(|&b| usize::from(b == b'{' || b == b'['))
        .sum::<usize>();
    if opening <= max {
        return false;
    }
    let mut depth = 0usize;
    let mut bytes = payload.iter();
    while let Some(&b) = bytes.next() {
        match b {
            b'{' | b'[' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            b'"' => skip_string(&mut bytes),
            _ => {}
        }
    }
    false
}

/// Moves past the closing quote of a string whose opening quote was just read.
fn skip_string(bytes: &mut std::slice::Iter<'_, u8>) {
    while let Some(&b) = bytes.next() {
        match b {
            b'"' => return,
            b'\\' => {
                bytes.next();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::Value;

    fn scalar(doc: &JsonView<'_>, path: &str) -> Option<String> {
        let path: Vec<String> = path.split('.').map(String::from).collect();
        let mut out = String::new();
        doc.push_scalar(&path, &mut out).then_some(out)
    }

    #[test]
    fn plain_and_escaped_keys_read_the_same_at_every_depth() {
        let plain = br#"{"a":"x","n":7,"f":1.5,"b":true,"z":null,"e":"","o":{"id":"u\"1","deep":{"k":2}},"arr":[1]}"#;
        let escaped = br#"{"a\u0062":1,"\u0061":"x","n":7,"f":1.5,"b":true,"z":null,"e":"","o":{"i\u0064":"u\"1","d\u0065ep":{"\u006b":2}},"arr":[1]}"#;
        for doc in [
            JsonView::parse(plain).unwrap(),
            JsonView::parse(escaped).unwrap(),
        ] {
            assert_eq!(scalar(&doc, "a").as_deref(), Some("x"));
            assert_eq!(scalar(&doc, "n").as_deref(), Some("7"));
            assert_eq!(scalar(&doc, "f").as_deref(), Some("1.5"));
            assert_eq!(scalar(&doc, "b").as_deref(), Some("true"));
            assert_eq!(scalar(&doc, "o.id").as_deref(), Some("u\"1"));
            assert_eq!(scalar(&doc, "o.deep.k").as_deref(), Some("2"));
            for missing in ["z", "e", "o", "arr", "nope", "a.b", "o.nope", "o.deep.k.x"] {
                assert_eq!(scalar(&doc, missing), None, "{missing}");
            }
        }
    }

    #[test]
    fn a_nested_escaped_tenant_key_is_read() {
        let doc = JsonView::parse(br#"{"meta":{"\u0074enantId":"beta"}}"#).unwrap();
        assert_eq!(scalar(&doc, "meta.tenantId").as_deref(), Some("beta"));
        // The later of two members wins, as in a full parse, whichever of them is escaped.
        let doc =
            JsonView::parse(br#"{"meta":{"tenantId":"alpha","\u0074enantId":"beta"}}"#).unwrap();
        assert_eq!(scalar(&doc, "meta.tenantId").as_deref(), Some("beta"));
    }

    #[test]
    fn invalid_documents_are_refused() {
        for bad in [
            &b"{"[..],
            b"{\"a\":1} x",
            b"[1,2] x",
            b"not json",
            b"{\"a\":tru}",
            b"{\"a\":{\"b\":tru}}",
            b"\xff",
        ] {
            assert!(
                JsonView::parse(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        // Not an object: valid, but no field can be read.
        for other in [&b"[1,2]"[..], b"\"a\"", b"7", b"null"] {
            let doc = JsonView::parse(other).unwrap();
            assert_eq!(scalar(&doc, "a"), None);
        }
    }

    #[test]
    fn depth_is_counted_outside_strings_only() {
        let nested = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert!(!deeper_than(nested(64).as_bytes(), 64));
        assert!(deeper_than(nested(65).as_bytes(), 64));
        let object = |n: usize| format!("{}1{}", r#"{"a":"#.repeat(n), "}".repeat(n));
        assert!(!deeper_than(object(64).as_bytes(), 64));
        assert!(deeper_than(object(65).as_bytes(), 64));
        // Brackets in strings, escaped quotes included, are text.
        let text = format!(r#"{{"s":"\"{}","t":["x"]}}"#, "[{".repeat(100));
        assert!(!deeper_than(text.as_bytes(), 2));
        assert!(deeper_than(text.as_bytes(), 1));
        // Siblings do not add up.
        assert!(!deeper_than(b"[[1],[2],[[3]]]", 3));
    }

    /// What templates must read, per a full parse.
    fn reference(value: &Value, path: &[String]) -> Option<Value> {
        let field = path.iter().try_fold(value, |v, key| v.get(key))?;
        match field {
            Value::String(s) if s.is_empty() => None,
            Value::String(_) | Value::Number(_) | Value::Bool(_) => Some(field.clone()),
            _ => None,
        }
    }

    /// A few names, so that paths often hit and objects often repeat a key.
    const NAMES: [&str; 6] = ["a", "b", "tenantId", "é", "x y", "😀\"\\/"];

    /// `s` as a JSON string: each character, by `mask`, as itself or `\u` escaped (astral
    /// ones as surrogate pairs); quotes, backslashes and controls always escaped somehow.
    fn encode(s: &str, mask: u64) -> String {
        let mut out = String::from("\"");
        for (i, c) in s.chars().enumerate() {
            let escape = mask >> (i % 64) & 1 == 1;
            match c {
                _ if escape => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '/' => out.push_str("\\/"),
                '\n' => out.push_str("\\n"),
                c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04X}", c as u32)),
                c => out.push(c),
            }
        }
        out.push('"');
        out
    }

    /// Mostly plain, so that escaped keys also turn up below plain ones.
    fn escapes() -> impl Strategy<Value = u64> {
        prop_oneof![3 => Just(0), 1 => Just(u64::MAX), 1 => any::<u64>()]
    }

    fn name() -> impl Strategy<Value = String> {
        (0..NAMES.len(), escapes()).prop_map(|(i, mask)| encode(NAMES[i], mask))
    }

    fn space() -> impl Strategy<Value = &'static str> {
        prop_oneof![Just(""), Just(" "), Just("\n\t ")]
    }

    fn leaf() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("null".to_string()),
            Just("true".to_string()),
            Just("false".to_string()),
            Just("\"\"".to_string()),
            prop_oneof![
                Just("0"),
                Just("-0"),
                Just("7"),
                Just("-12"),
                Just("1.5"),
                Just("1.0"),
                Just("1E2"),
                Just("-2.5e-3"),
                Just("18446744073709551615"),
                Just("-9223372036854775808"),
            ]
            .prop_map(String::from),
            ("[a-z\"\\\\/\n\u{1}é😀]{0,6}", escapes()).prop_map(|(s, mask)| encode(&s, mask)),
            name(),
        ]
    }

    fn document() -> impl Strategy<Value = String> {
        let value = leaf().prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec((space(), inner.clone()), 0..4).prop_map(|items| {
                    let items: Vec<String> =
                        items.into_iter().map(|(s, v)| format!("{s}{v}")).collect();
                    format!("[{}]", items.join(","))
                }),
                prop::collection::vec((name(), space(), inner), 0..6).prop_map(|members| {
                    let members: Vec<String> = members
                        .into_iter()
                        .map(|(k, s, v)| format!("{k}:{s}{v}"))
                        .collect();
                    format!("{{{}}}", members.join(","))
                }),
            ]
        });
        (space(), value, space()).prop_map(|(a, v, b)| format!("{a}{v}{b}"))
    }

    fn path() -> impl Strategy<Value = Vec<String>> {
        prop::collection::vec((0..NAMES.len()).prop_map(|i| NAMES[i].to_string()), 1..4)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn templates_read_what_a_full_parse_reads(text in document(), paths in prop::collection::vec(path(), 1..6)) {
            let value: Value = serde_json::from_str(&text).expect("generated JSON is valid");
            let doc = JsonView::parse(text.as_bytes()).expect("valid JSON parses");
            for path in &paths {
                let mut out = String::from("prefix:");
                let read = doc.push_scalar(path, &mut out);
                let expected = reference(&value, path);
                prop_assert_eq!(read, expected.is_some(), "{:?} in {}", path, text);
                match expected {
                    None => prop_assert_eq!(&out, "prefix:"),
                    Some(Value::String(s)) => prop_assert_eq!(&out[7..], s.as_str()),
                    Some(Value::Bool(b)) => prop_assert_eq!(&out[7..], b.to_string()),
                    Some(number) => {
                        let ours: Value = serde_json::from_str(&out[7..]).unwrap();
                        prop_assert_eq!(ours, number);
                    }
                }
            }
        }
    }
}
