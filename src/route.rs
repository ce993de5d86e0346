//! Routing: turns one Kafka record into a [`Routed`] record: its event name, target rooms,
//! tenant, priority and position, plus the raw JSON payload to splice into the frame.
//!
//! Routes are configuration: templates over the record's JSON fields (`{data.id}`), overridden
//! by Kafka headers (`rooms`, `event`, `priority`, `tenant`) so a producer can target rooms
//! without the service having to understand the value.

use std::collections::HashSet;
use std::fmt;

use crate::config::{RecordsConfig, RouteConfig};
use crate::json_view::{self, JsonView};

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
    #[error("no tenant: the route reads one and the record has none")]
    NoTenant,
    #[error("record of {bytes} bytes or more is larger than records.max_bytes ({max})")]
    TooLarge { bytes: usize, max: usize },
    #[error("record targets more than records.max_rooms ({0}) rooms")]
    TooManyRooms(usize),
    #[error("value nests deeper than records.max_depth ({0})")]
    TooDeep(usize),
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
            RouteError::NoTenant => "no_tenant",
            RouteError::TooLarge { .. } => "too_large",
            RouteError::TooManyRooms(_) => "too_many_rooms",
            RouteError::TooDeep(_) => "too_deep",
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
    pub fn render(&self, doc: Option<&JsonView<'_>>) -> Option<String> {
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
    tenant_optional: bool,
    expose_rooms: bool,
    limits: RecordsConfig,
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
            tenant_optional: c.tenant_optional,
            expose_rooms: c.expose_rooms,
            limits: c.limits,
        })
    }

    /// Routes one record. The value is parsed at most once, and only when a template needs it;
    /// the cheap bounds are checked before it is.
    pub fn apply<'a>(&self, record: &Record<'a>) -> Result<Routed<'a>, RouteError> {
        let payload = record.value.ok_or(RouteError::NoValue)?;
        self.check_size(payload.len())?;
        if json_view::deeper_than(payload, self.limits.max_depth) {
            return Err(RouteError::TooDeep(self.limits.max_depth));
        }
        let header_event = record.header("event")?;
        let header_rooms = record.header("rooms")?;
        let needs_value = (header_event.is_none() && self.event.needs_value())
            || header_rooms.is_none()
            || self.priority.is_some()
            || self.tenant.is_some();
        let parsed = if needs_value {
            Some(JsonView::parse(payload).map_err(RouteError::NotJson)?)
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
            Some(list) => header_room_list(list, self.limits.max_rooms)?,
            None => self.template_rooms(value)?,
        };
        let priority = match record.header("priority")? {
            Some(p) => Priority::parse(p),
            None => self
                .priority
                .as_ref()
                .and_then(|t| t.render(value))
                .map(|p| Priority::parse(&p))
                .unwrap_or_default(),
        };
        let tenant = self.tenant(record, value)?;
        let exposed: usize = match self.expose_rooms {
            true => rooms.iter().map(String::len).sum(),
            false => 0,
        };
        self.check_size(payload.len() + event.len() + exposed)?;
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

    /// A frame larger than a connection's queue would close every recipient with 4008.
    fn check_size(&self, bytes: usize) -> Result<(), RouteError> {
        match bytes > self.limits.max_bytes {
            true => Err(RouteError::TooLarge {
                bytes,
                max: self.limits.max_bytes,
            }),
            false => Ok(()),
        }
    }

    fn template_rooms(&self, value: Option<&JsonView<'_>>) -> Result<Vec<String>, RouteError> {
        // As many candidates as the route has templates: a linear search is the cheapest.
        let mut rooms: Vec<String> = Vec::with_capacity(self.rooms.len());
        for room in self.rooms.iter().filter_map(|t| t.render(value)) {
            if !room.is_empty() && !rooms.contains(&room) {
                rooms.push(room);
            }
        }
        if rooms.is_empty() {
            return Err(RouteError::NoRooms);
        }
        if rooms.len() > self.limits.max_rooms {
            return Err(RouteError::TooManyRooms(self.limits.max_rooms));
        }
        Ok(rooms)
    }

    /// The header's, else the template's. A route that reads a tenant refuses a record without
    /// one unless it says tenant-less records are intended: otherwise a producer's mistake
    /// would show a tenant's record to every tenant-less connection.
    fn tenant(
        &self,
        record: &Record<'_>,
        value: Option<&JsonView<'_>>,
    ) -> Result<Option<String>, RouteError> {
        if let Some(t) = record.header("tenant")? {
            return Ok(Some(t.to_string()));
        }
        let Some(template) = &self.tenant else {
            return Ok(None);
        };
        match template.render(value) {
            Some(t) => Ok(Some(t)),
            None if self.tenant_optional => Ok(None),
            None => Err(RouteError::NoTenant),
        }
    }
}

/// The distinct rooms of a `rooms` header, in order; refused past `max`, before reading on.
fn header_room_list(list: &str, max: usize) -> Result<Vec<String>, RouteError> {
    let mut seen: HashSet<&str> = HashSet::new();
    let mut rooms = Vec::new();
    for room in list.split(',').map(str::trim).filter(|r| !r.is_empty()) {
        if seen.insert(room) {
            if rooms.len() == max {
                return Err(RouteError::TooManyRooms(max));
            }
            rooms.push(room.to_string());
        }
    }
    if rooms.is_empty() {
        return Err(RouteError::NoRooms);
    }
    Ok(rooms)
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
        let render = |json: &str| t.render(Some(&JsonView::parse(json.as_bytes()).unwrap()));
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

    fn limited(mut c: RouteConfig, limits: RecordsConfig) -> Route {
        c.limits = limits;
        Route::from_config(&c).unwrap()
    }

    const ENTITY: &str = r#"{"feature":"users","entity":"user","action":"deleted","data":{"id":"u1"},"meta":{"tenantId":"acme"}}"#;

    #[test]
    fn a_nested_escaped_tenant_key_keeps_its_tenant() {
        let value = br#"{"feature":"users","entity":"user","action":"deleted","data":{"id":"u1"},"meta":{"\u0074enantId":"beta"}}"#;
        let routed = entity_route().apply(&record("e", value, vec![])).unwrap();
        assert_eq!(routed.tenant.as_deref(), Some("beta"));
    }

    #[test]
    fn a_record_without_its_tenant_is_malformed_unless_the_route_allows_it() {
        let base = r#""feature":"users","entity":"user","action":"deleted","data":{"id":"u1""#;
        let missing = [
            format!(r#"{{{base}}}}}"#),
            format!(r#"{{{base}}},"meta":{{}}}}"#),
            format!(r#"{{{base}}},"meta":{{"tenantId":null}}}}"#),
            format!(r#"{{{base}}},"meta":{{"tenantId":""}}}}"#),
            format!(r#"{{{base}}},"meta":{{"tenantId":{{"id":"acme"}}}}}}"#),
            format!(r#"{{{base}}},"meta":"acme"}}"#),
        ];
        let mut optional = default_routes()[0].clone();
        optional.tenant_optional = true;
        let optional = Route::from_config(&optional).unwrap();
        for value in &missing {
            let r = record("e", value.as_bytes(), vec![]);
            assert_eq!(
                entity_route().apply(&r).unwrap_err(),
                RouteError::NoTenant,
                "{value}"
            );
            assert_eq!(optional.apply(&r).unwrap().tenant, None, "{value}");
            // The header still names it.
            let headed = record("e", value.as_bytes(), vec![("tenant", b"acme")]);
            let routed = entity_route().apply(&headed).unwrap();
            assert_eq!(routed.tenant.as_deref(), Some("acme"));
        }
        // A route that reads no tenant is not concerned.
        let task = Route::from_config(&default_routes()[1]).unwrap();
        assert_eq!(
            task.apply(&record("t", br#"{"taskId":1}"#, vec![]))
                .unwrap()
                .tenant,
            None
        );
    }

    #[test]
    fn records_up_to_max_bytes_pass_and_larger_ones_are_refused() {
        // The value and the event name go into the frame.
        let event = "users.user.deleted".len();
        let max = ENTITY.len() + event;
        let limits = RecordsConfig {
            max_bytes: max,
            ..RecordsConfig::default()
        };
        let route = limited(default_routes()[0].clone(), limits);
        assert!(route.apply(&record("e", ENTITY.as_bytes(), vec![])).is_ok());
        let padded = format!("{ENTITY} ");
        assert_eq!(
            route
                .apply(&record("e", padded.as_bytes(), vec![]))
                .unwrap_err(),
            RouteError::TooLarge {
                bytes: max + 1,
                max
            }
        );
        // A value alone over the bound is refused before it is parsed.
        let huge = format!("{ENTITY}{}", " ".repeat(max));
        assert_eq!(
            route
                .apply(&record("e", huge.as_bytes(), vec![]))
                .unwrap_err(),
            RouteError::TooLarge {
                bytes: huge.len(),
                max
            }
        );
        // The event and exposed rooms go into the frame too.
        let mut exposed = default_routes()[0].clone();
        exposed.expose_rooms = true;
        let rooms = "feature:users".len() + "feature:users:entity:user".len() + "user:u1".len();
        let fits = RecordsConfig {
            max_bytes: max + rooms,
            ..RecordsConfig::default()
        };
        assert!(limited(exposed.clone(), fits)
            .apply(&record("e", ENTITY.as_bytes(), vec![]))
            .is_ok());
        let short = RecordsConfig {
            max_bytes: max + rooms - 1,
            ..RecordsConfig::default()
        };
        assert_eq!(
            limited(exposed, short)
                .apply(&record("e", ENTITY.as_bytes(), vec![]))
                .unwrap_err()
                .reason(),
            "too_large"
        );
    }

    #[test]
    fn header_rooms_up_to_max_rooms_pass_and_more_are_refused() {
        let limits = RecordsConfig {
            max_rooms: 3,
            ..RecordsConfig::default()
        };
        let route = limited(default_routes()[1].clone(), limits);
        let apply = |rooms: &str| {
            let headers: Vec<(&str, &[u8])> = vec![("rooms", rooms.as_bytes()), ("event", b"e")];
            route
                .apply(&record("t", b"{}", headers))
                .map(|routed| routed.rooms)
        };
        // Repeats and blanks are not rooms.
        assert_eq!(apply("a,b,a, ,c,b,c").unwrap(), ["a", "b", "c"]);
        assert_eq!(apply("a,b,c,d").unwrap_err(), RouteError::TooManyRooms(3));
        assert_eq!(apply(" , ,").unwrap_err(), RouteError::NoRooms);
        // Templates count too.
        let one = RecordsConfig {
            max_rooms: 1,
            ..RecordsConfig::default()
        };
        let route = limited(default_routes()[1].clone(), one);
        let both = br#"{"userId":"1","taskId":"2"}"#;
        assert_eq!(
            route
                .apply(&record("t", both, vec![]))
                .unwrap_err()
                .reason(),
            "too_many_rooms"
        );
        assert!(route
            .apply(&record("t", br#"{"userId":"1"}"#, vec![]))
            .is_ok());
    }

    #[test]
    fn a_large_rooms_header_is_deduplicated_in_one_pass() {
        let list: Vec<String> = (0..50_000)
            .map(|i| format!("room:{}", i % 25_000))
            .collect();
        let limits = RecordsConfig {
            max_rooms: 25_000,
            ..RecordsConfig::default()
        };
        let route = limited(default_routes()[1].clone(), limits);
        let list = list.join(",");
        let headers: Vec<(&str, &[u8])> = vec![("rooms", list.as_bytes()), ("event", b"e")];
        let routed = route.apply(&record("t", b"{}", headers)).unwrap();
        assert_eq!(routed.rooms.len(), 25_000);
        assert_eq!(routed.rooms[24_999], "room:24999");
    }

    #[test]
    fn values_up_to_max_depth_pass_and_deeper_ones_are_refused() {
        let limits = RecordsConfig {
            max_depth: 4,
            ..RecordsConfig::default()
        };
        let route = limited(default_routes()[1].clone(), limits);
        // The record itself is the first level.
        let at = br#"{"userId":"1","x":[[{"y":1}]]}"#;
        let over = br#"{"userId":"1","x":[[{"y":[]}]]}"#;
        assert!(route.apply(&record("t", at, vec![])).is_ok());
        assert_eq!(
            route.apply(&record("t", over, vec![])).unwrap_err(),
            RouteError::TooDeep(4)
        );
        // Whether or not a template reads the value.
        let headers = || -> Vec<(&str, &[u8])> { vec![("rooms", b"a"), ("event", b"e")] };
        assert!(route.apply(&record("t", at, headers())).is_ok());
        assert_eq!(
            route
                .apply(&record("t", over, headers()))
                .unwrap_err()
                .reason(),
            "too_deep"
        );
        // The default bound, against the depth that once reached clients.
        let deep = format!(
            r#"{{"userId":"1","x":{}{}}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        let route = Route::from_config(&default_routes()[1]).unwrap();
        assert_eq!(
            route
                .apply(&record("t", deep.as_bytes(), vec![]))
                .unwrap_err(),
            RouteError::TooDeep(64)
        );
    }

    #[test]
    fn every_refusal_has_a_bounded_reason() {
        let errors = [
            RouteError::NoValue,
            RouteError::NotJson("x".into()),
            RouteError::NoEvent,
            RouteError::NoRooms,
            RouteError::BadHeader("rooms"),
            RouteError::NoTenant,
            RouteError::TooLarge { bytes: 2, max: 1 },
            RouteError::TooManyRooms(1),
            RouteError::TooDeep(1),
        ];
        let reasons: HashSet<&str> = errors.iter().map(RouteError::reason).collect();
        assert_eq!(reasons.len(), errors.len());
        // Exported at zero from the start, so an alert sees the first one.
        let metrics = crate::metrics::Metrics::new();
        metrics.prime(&["t"]);
        let text = metrics.render();
        for reason in reasons {
            let series =
                format!("roomcast_records_malformed_total{{reason=\"{reason}\",topic=\"t\"}} 0");
            assert!(text.contains(&series), "{series}");
        }
    }
}
