//! Routing: turns one Kafka record into a [`Routed`] record: its event name, target rooms,
//! tenant, priority and position, plus the raw JSON payload to splice into the frame.
//!
//! Routes are configuration: templates over the record's JSON fields (`{data.id}`), overridden
//! by Kafka headers (`rooms`, `event`, `priority`, `tenant`) so a producer can target rooms
//! without the service having to understand the value.

use std::fmt;

use crate::config::RouteConfig;
use crate::doc::Doc;

/// Why a record could not be routed. Each one is counted and the consumer moves on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("record has no value")]
    NoValue,
    #[error("value is not JSON: {0}")]
    NotJson(String),
    #[error("no event: the event template refers to a missing field")]
    NoEvent,
    #[error("no room: every room template refers to a missing field")]
    NoRooms,
    #[error("header {0:?} is not UTF-8")]
    BadHeader(&'static str),
}

impl RouteError {
    /// A short, bounded label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            RouteError::NoValue => "no_value",
            RouteError::NotJson(_) => "not_json",
            RouteError::NoEvent => "no_event",
            RouteError::NoRooms => "no_rooms",
            RouteError::BadHeader(_) => "bad_header",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Priority {
    Low,
    #[default]
    Normal,
    High,
    Critical,
}

impl Priority {
    /// Unknown names fall back to normal: a typo must never get a record shed.
    pub fn parse(s: &str) -> Priority {
        match s.trim().to_ascii_lowercase().as_str() {
            "low" => Priority::Low,
            "high" => Priority::High,
            "critical" => Priority::Critical,
            _ => Priority::Normal,
        }
    }
}

/// One piece of a template: literal text or a dotted path into the record's JSON value.
#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Field(Vec<String>),
}

/// A string with `{dotted.path}` placeholders, e.g. `feature:{feature}:entity:{entity}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    parts: Vec<Part>,
}

impl Template {
    pub fn parse(source: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = source;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_string()));
            }
            let after = &rest[open + 1..];
            let close = after
                .find('}')
                .ok_or_else(|| format!("template {source:?}: '{{' without '}}'"))?;
            let path = &after[..close];
            if path.is_empty() || path.split('.').any(str::is_empty) || path.contains('{') {
                return Err(format!("template {source:?}: bad field {path:?}"));
            }
            parts.push(Part::Field(path.split('.').map(String::from).collect()));
            rest = &after[close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("template {source:?}: '}}' without '{{'"));
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        if parts.is_empty() {
            return Err("template is empty".into());
        }
        Ok(Template { parts })
    }

    pub fn needs_value(&self) -> bool {
        self.parts.iter().any(|p| matches!(p, Part::Field(_)))
    }

    /// Renders against `doc`; `None` when a field is missing, null, empty or not a scalar.
    pub fn render(&self, doc: Option<&Doc<'_>>) -> Option<String> {
        // Room and event names are short: one allocation instead of several growths.
        let mut out = String::with_capacity(32);
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Field(path) => {
                    if !doc?.push_scalar(path, &mut out) {
                        return None;
                    }
                }
            }
        }
        Some(out)
    }
}

/// Where a record sits in Kafka: `topic:partition:offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.topic, self.partition, self.offset)
    }
}

/// A Kafka record as routing sees it: borrowed from the consumer's message.
pub struct Record<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
    pub value: Option<&'a [u8]>,
    pub headers: Vec<(&'a str, &'a [u8])>,
}

impl Record<'_> {
    fn header(&self, name: &'static str) -> Result<Option<&str>, RouteError> {
        match self.headers.iter().rev().find(|(k, _)| *k == name) {
            None => Ok(None),
            Some((_, v)) => std::str::from_utf8(v)
                .map(|s| Some(s.trim()).filter(|s| !s.is_empty()))
                .map_err(|_| RouteError::BadHeader(name)),
        }
    }
}

/// The outcome of routing one record.
#[derive(Debug, Clone, PartialEq)]
pub struct Routed<'a> {
    pub event: String,
    pub rooms: Vec<String>,
    pub tenant: Option<String>,
    pub priority: Priority,
    pub position: Position,
    pub timestamp_ms: Option<i64>,
    /// The record's value, checked to be one JSON document, spliced as is into the frame.
    pub payload: &'a [u8],
    pub expose_rooms: bool,
}

/// A compiled route for one topic.
#[derive(Debug, Clone)]
pub struct Route {
    pub topic: String,
    event: Template,
    rooms: Vec<Template>,
    priority: Option<Template>,
    tenant: Option<Template>,
    expose_rooms: bool,
}

impl Route {
    pub fn from_config(c: &RouteConfig) -> Result<Route, String> {
        if c.topic.is_empty() {
            return Err("topic must not be empty".into());
        }
        if c.rooms.is_empty() {
            return Err("rooms: at least one room template is needed".into());
        }
        let optional = |t: &Option<String>| t.as_deref().map(Template::parse).transpose();
        Ok(Route {
            topic: c.topic.clone(),
            event: Template::parse(&c.event).map_err(|e| format!("event: {e}"))?,
            rooms: c
                .rooms
                .iter()
                .map(|r| Template::parse(r))
                .collect::<Result<_, _>>()
                .map_err(|e| format!("rooms: {e}"))?,
            priority: optional(&c.priority).map_err(|e| format!("priority: {e}"))?,
            tenant: optional(&c.tenant).map_err(|e| format!("tenant: {e}"))?,
            expose_rooms: c.expose_rooms,
        })
    }

    /// Routes one record. The value is parsed at most once, and only when a template needs it.
    pub fn apply<'a>(&self, record: &Record<'a>) -> Result<Routed<'a>, RouteError> {
        let payload = record.value.ok_or(RouteError::NoValue)?;
        let header_event = record.header("event")?;
        let header_rooms = record.header("rooms")?;
        let needs_value = (header_event.is_none() && self.event.needs_value())
            || header_rooms.is_none()
            || self.priority.is_some()
            || self.tenant.is_some();
        let parsed = if needs_value {
            Some(Doc::parse(payload).map_err(RouteError::NotJson)?)
        } else {
            // Spliced into the frame as is, so it must still be exactly one JSON document.
            serde_json::from_slice::<&serde_json::value::RawValue>(payload)
                .map_err(|e| RouteError::NotJson(e.to_string()))?;
            None
        };
        let value = parsed.as_ref();
        let event = match header_event {
            Some(e) => e.to_string(),
            None => self.event.render(value).ok_or(RouteError::NoEvent)?,
        };
        let rooms = match header_rooms {
            Some(list) => dedup(list.split(',').map(|r| r.trim().to_string())),
            None => dedup(self.rooms.iter().filter_map(|t| t.render(value))),
        };
        if rooms.is_empty() {
            return Err(RouteError::NoRooms);
        }
        let priority = match record.header("priority")? {
            Some(p) => Priority::parse(p),
            None => self
                .priority
                .as_ref()
                .and_then(|t| t.render(value))
                .map(|p| Priority::parse(&p))
                .unwrap_or_default(),
        };
        let tenant = match record.header("tenant")? {
            Some(t) => Some(t.to_string()),
            None => self.tenant.as_ref().and_then(|t| t.render(value)),
        };
        Ok(Routed {
            event,
            rooms,
            tenant,
            priority,
            position: Position {
                topic: record.topic.to_string(),
                partition: record.partition,
                offset: record.offset,
            },
            timestamp_ms: record.timestamp_ms,
            payload,
            expose_rooms: self.expose_rooms,
        })
    }
}

fn dedup(rooms: impl Iterator<Item = String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for room in rooms.filter(|r| !r.is_empty()) {
        if !out.contains(&room) {
            out.push(room);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::default_routes;

    fn record<'a>(
        topic: &'a str,
        value: &'a [u8],
        headers: Vec<(&'a str, &'a [u8])>,
    ) -> Record<'a> {
        Record {
            topic,
            partition: 3,
            offset: 1234,
            timestamp_ms: Some(1_763_880_000_123),
            value: Some(value),
            headers,
        }
    }

    fn entity_route() -> Route {
        Route::from_config(&default_routes()[0]).unwrap()
    }

    #[test]
    fn templates_render_dotted_paths_and_scalars() {
        let t = Template::parse("{entity}:{data.id}").unwrap();
        let render = |json: &str| t.render(Some(&Doc::parse(json.as_bytes()).unwrap()));
        assert_eq!(
            render(r#"{"entity": "user", "data": {"id": 7}}"#).as_deref(),
            Some("user:7")
        );
        assert_eq!(render(r#"{"entity": "user", "data": {}}"#), None);
        assert_eq!(render(r#"{"entity": {"x": 1}, "data": {"id": 1}}"#), None);
        assert_eq!(
            Template::parse("plain").unwrap().render(None).as_deref(),
            Some("plain")
        );
    }

    #[test]
    fn bad_templates_are_refused() {
        for bad in ["{", "a}", "{}", "{a..b}", "", "{a{b}}"] {
            assert!(Template::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn entity_updates_route_to_feature_entity_and_id_rooms() {
        let value = br#"{"feature":"users","entity":"user","action":"deleted","data":{"id":"u1"},"meta":{"priority":"low","tenantId":"acme"}}"#;
        let routed = entity_route()
            .apply(&record("entity-updates", value, vec![]))
            .unwrap();
        assert_eq!(routed.event, "users.user.deleted");
        assert_eq!(
            routed.rooms,
            ["feature:users", "feature:users:entity:user", "user:u1"]
        );
        assert_eq!(routed.priority, Priority::Low);
        assert_eq!(routed.tenant.as_deref(), Some("acme"));
        assert_eq!(routed.position.to_string(), "entity-updates:3:1234");
        assert_eq!(routed.payload, value);
    }

    #[test]
    fn task_updates_route_to_user_and_task_rooms() {
        let route = Route::from_config(&default_routes()[1]).unwrap();
        let value = br#"{"type":"progress","taskId":9,"userId":"42","progress":50}"#;
        let routed = route.apply(&record("task-updates", value, vec![])).unwrap();
        assert_eq!(routed.event, "task:update");
        assert_eq!(routed.rooms, ["user:42", "task:9"]);
        assert_eq!(routed.tenant, None);
        assert_eq!(routed.priority, Priority::Normal);
    }

    #[test]
    fn missing_room_fields_are_skipped_and_no_room_is_malformed() {
        let route = Route::from_config(&default_routes()[1]).unwrap();
        let only_task = route
            .apply(&record("t", br#"{"taskId":"9"}"#, vec![]))
            .unwrap();
        assert_eq!(only_task.rooms, ["task:9"]);
        let err = route
            .apply(&record("t", br#"{"type":"x"}"#, vec![]))
            .unwrap_err();
        assert_eq!(err, RouteError::NoRooms);
    }

    #[test]
    fn malformed_values_are_refused() {
        let route = entity_route();
        assert!(matches!(
            route.apply(&record("e", b"not json", vec![])),
            Err(RouteError::NotJson(_))
        ));
        assert_eq!(
            route
                .apply(&record("e", br#"{"feature":"users"}"#, vec![]))
                .unwrap_err(),
            RouteError::NoEvent
        );
        let mut r = record("e", b"", vec![]);
        r.value = None;
        assert_eq!(route.apply(&r).unwrap_err(), RouteError::NoValue);
    }

    #[test]
    fn headers_override_templates() {
        let route = Route::from_config(&default_routes()[1]).unwrap();
        let headers: Vec<(&str, &[u8])> = vec![
            ("rooms", b"room:a, room:b,room:a"),
            ("event", b"custom.event"),
            ("priority", b"critical"),
            ("tenant", b"t1"),
        ];
        let routed = route.apply(&record("t", br#"[1,2]"#, headers)).unwrap();
        assert_eq!(routed.rooms, ["room:a", "room:b"]);
        assert_eq!(routed.event, "custom.event");
        assert_eq!(routed.priority, Priority::Critical);
        assert_eq!(routed.tenant.as_deref(), Some("t1"));
        // Even when no template needs it, the value must be JSON to be spliced into a frame.
        let headers: Vec<(&str, &[u8])> = vec![("rooms", b"a"), ("event", b"e")];
        assert!(route.apply(&record("t", b"{oops", headers)).is_err());
    }
}
