//! A record's JSON value as templates read it: parsed once, borrowed, and only as deep as the
//! templates look.
//!
//! The top-level object is split into (key, raw value) pairs that borrow from the record; a
//! nested object is split only when a dotted path goes into it, once per record. Nothing is
//! copied until a template renders a field. Values whose keys need unescaping fall back to a
//! fully parsed `serde_json::Value`, so every valid JSON document still routes the same way.

use std::cell::RefCell;
use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::Value;

/// One JSON object's members, borrowed.
pub struct Fields<'a>(Vec<(&'a str, &'a RawValue)>);

impl<'a> Fields<'a> {
    /// The last member named `key`, as `serde_json::Value` would keep it.
    fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| *v)
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
                while let Some(entry) = map.next_entry::<&'de str, &'de RawValue>()? {
                    fields.push(entry);
                }
                Ok(Fields(fields))
            }
        }
        d.deserialize_map(FieldsVisitor)
    }
}

/// A parsed record value.
pub enum Doc<'a> {
    Borrowed {
        top: Fields<'a>,
        /// Nested objects split so far, by the address of their raw text.
        nested: RefCell<Vec<(usize, Option<Fields<'a>>)>>,
    },
    /// Not an object with plain keys: the general parse.
    Owned(Value),
}

impl<'a> Doc<'a> {
    /// Parses and validates the whole document.
    pub fn parse(payload: &'a [u8]) -> Result<Doc<'a>, String> {
        let text = std::str::from_utf8(payload).map_err(|e| e.to_string())?;
        match serde_json::from_str::<Fields<'a>>(text) {
            Ok(top) => Ok(Doc::Borrowed {
                top,
                nested: RefCell::new(Vec::new()),
            }),
            Err(_) => serde_json::from_str(text)
                .map(Doc::Owned)
                .map_err(|e| e.to_string()),
        }
    }

    /// Appends the scalar at `path` to `out`; false when it is missing, null, empty or not a
    /// scalar (then `out` is left as it was).
    pub fn push_scalar(&self, path: &[String], out: &mut String) -> bool {
        match self {
            Doc::Borrowed { top, nested } => {
                let Some((first, rest)) = path.split_first() else {
                    return false;
                };
                let mut cur = top.get(first);
                for key in rest {
                    cur = cur.and_then(|parent| child(nested, parent, key));
                }
                cur.is_some_and(|raw| push_raw_scalar(raw, out))
            }
            Doc::Owned(value) => {
                let field = path.iter().try_fold(value, |v, key| v.get(key));
                match field {
                    Some(Value::String(s)) if !s.is_empty() => out.push_str(s),
                    Some(Value::Number(n)) => out.push_str(&n.to_string()),
                    Some(Value::Bool(b)) => out.push_str(if *b { "true" } else { "false" }),
                    _ => return false,
                }
                true
            }
        }
    }
}

fn child<'a>(
    nested: &RefCell<Vec<(usize, Option<Fields<'a>>)>>,
    parent: &'a RawValue,
    key: &str,
) -> Option<&'a RawValue> {
    let address = parent.get().as_ptr() as usize;
    let mut cache = nested.borrow_mut();
    if let Some((_, fields)) = cache.iter().find(|(a, _)| *a == address) {
        return fields.as_ref()?.get(key);
    }
    let fields = serde_json::from_str::<Fields<'a>>(parent.get()).ok();
    let found = fields.as_ref().and_then(|f| f.get(key));
    cache.push((address, fields));
    found
}

fn push_raw_scalar(raw: &RawValue, out: &mut String) -> bool {
    let text = raw.get().trim();
    match text.as_bytes().first() {
        Some(b'"') => {
            let s: std::borrow::Cow<'_, str> = match serde_json::from_str::<&str>(text) {
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
        Some(b't') | Some(b'f') => {
            out.push_str(text);
            true
        }
        Some(b'-' | b'0'..=b'9') => {
            out.push_str(text);
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scalar(doc: &Doc<'_>, path: &str) -> Option<String> {
        let path: Vec<String> = path.split('.').map(String::from).collect();
        let mut out = String::new();
        doc.push_scalar(&path, &mut out).then_some(out)
    }

    #[test]
    fn borrowed_and_owned_read_the_same() {
        let plain = br#"{"a":"x","n":7,"f":1.5,"b":true,"z":null,"e":"","o":{"id":"u\"1","deep":{"k":2}},"arr":[1]}"#;
        let escaped_key = br#"{"a\u0062":1,"a":"x","n":7,"f":1.5,"b":true,"z":null,"e":"","o":{"id":"u\"1","deep":{"k":2}},"arr":[1]}"#;
        let borrowed = Doc::parse(plain).unwrap();
        let owned = Doc::parse(escaped_key).unwrap();
        assert!(matches!(borrowed, Doc::Borrowed { .. }));
        assert!(matches!(owned, Doc::Owned(_)));
        for doc in [&borrowed, &owned] {
            assert_eq!(scalar(doc, "a").as_deref(), Some("x"));
            assert_eq!(scalar(doc, "n").as_deref(), Some("7"));
            assert_eq!(scalar(doc, "f").as_deref(), Some("1.5"));
            assert_eq!(scalar(doc, "b").as_deref(), Some("true"));
            assert_eq!(scalar(doc, "o.id").as_deref(), Some("u\"1"));
            assert_eq!(scalar(doc, "o.deep.k").as_deref(), Some("2"));
            for missing in ["z", "e", "o", "arr", "nope", "a.b", "o.nope", "o.deep.k.x"] {
                assert_eq!(scalar(doc, missing), None, "{missing}");
            }
        }
    }

    #[test]
    fn invalid_documents_are_refused() {
        for bad in [
            &b"{"[..],
            b"{\"a\":1} x",
            b"not json",
            b"{\"a\":tru}",
            b"\xff",
        ] {
            assert!(Doc::parse(bad).is_err());
        }
        // Not an object: valid, but no field can be read.
        let doc = Doc::parse(b"[1,2]").unwrap();
        assert_eq!(scalar(&doc, "a"), None);
    }
}
