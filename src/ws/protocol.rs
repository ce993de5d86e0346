//! Wire protocol v1: the only place that knows the JSON of frames and the words in them.
//!
//! Server frames are encoded once into a [`Frame`] (shared, immutable bytes); every recipient
//! gets a cheap clone. An event frame splices the record's value in as is: it was checked to be
//! JSON when routed, so no recipient ever pays for re-serialization. Every other server frame
//! is a [`ServerFrame`], serialized field by field in the order its variant declares, so the
//! frames' field order is this file's and no map's. Error codes ([`ErrorCode`]), resume
//! sources ([`Source`]) and request ids ([`RequestId`]) are typed here: other modules name
//! them, never spell them.

use crate::presence::live::RoomView;
use std::collections::BTreeMap;

use crate::route::Routed;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Number, Value};

pub const PROTOCOL_VERSION: u32 = 1;
pub const SUBPROTOCOL: &str = "roomcast.v1";

/// One encoded server frame, WebSocket header included, shared by every connection it goes to.
use crate::frame::Frame;

/// Close codes the server sends (docs/PROTOCOL.md, "Close codes"; 4003 is reserved there).
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL: u16 = 1002;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL: u16 = 1011;
    /// Try again later (RFC 6455's registry): this replica cannot serve the request yet.
    pub const TRY_AGAIN: u16 = 1013;
    pub const TOKEN: u16 = 4001;
    pub const SLOW_CONSUMER: u16 = 4008;
    pub const TOO_MANY: u16 = 4029;
}

/// A frame sent by a client.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum ClientFrame {
    Subscribe {
        #[serde(default)]
        id: RequestId,
        #[serde(default)]
        rooms: Vec<String>,
        /// Seed compatibility: `features: ["users"]` means room `feature:users`.
        #[serde(default)]
        features: Vec<String>,
        #[serde(default)]
        events: Option<Vec<String>>,
        #[serde(default)]
        token: Option<String>,
        /// Whether to hear who joins and leaves these rooms (docs/PRESENCE.md).
        #[serde(default)]
        presence: bool,
    },
    Unsubscribe {
        #[serde(default)]
        id: RequestId,
        #[serde(default)]
        rooms: Vec<String>,
        #[serde(default)]
        features: Vec<String>,
    },
    /// Subscribe to `rooms` as of `positions`: replay what was missed, then go live.
    Resume {
        #[serde(default)]
        id: RequestId,
        positions: BTreeMap<String, i64>,
        #[serde(default)]
        rooms: Vec<String>,
        #[serde(default)]
        features: Vec<String>,
        #[serde(default)]
        events: Option<Vec<String>>,
        #[serde(default)]
        token: Option<String>,
        #[serde(default)]
        presence: bool,
    },
    /// Who is in `room` now, on any replica.
    Presence {
        #[serde(default)]
        id: RequestId,
        room: String,
        #[serde(default)]
        token: Option<String>,
    },
    Ping {
        #[serde(default)]
        id: RequestId,
    },
    Refresh {
        #[serde(default)]
        id: RequestId,
        token: String,
    },
}

impl ClientFrame {
    /// A refused frame still names its request when its `id` can be read, so that the
    /// client waiting on that id gets its answer.
    pub fn parse(text: &str) -> Result<ClientFrame, BadFrame> {
        serde_json::from_str(text).map_err(|e| BadFrame {
            id: recover_id(text),
            reason: e.to_string(),
        })
    }
}

/// A client frame refused whole (`bad_request`).
#[derive(Debug, PartialEq, thiserror::Error)]
#[error("invalid frame: {reason}")]
pub struct BadFrame {
    /// The request's id, if the frame is a JSON object with a valid one.
    pub id: RequestId,
    pub reason: String,
}

const INVALID_ID: &str = "id must be a number or a string";

/// A request's `id`, sent back as it came: a number or a string. `null` or no `id` at all is
/// no id, answered with `"id":null`. An `id` of any other type could not be told apart from a
/// field the client did not mean as its id: the frame is refused, and answered without one.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum RequestId {
    #[default]
    None,
    Number(Number),
    Text(String),
}

impl RequestId {
    /// The id a JSON value makes; None (the error) for one that cannot be an id.
    fn from_value(v: Value) -> Option<RequestId> {
        match v {
            Value::Null => Some(RequestId::None),
            Value::Number(n) => Some(RequestId::Number(n)),
            Value::String(s) => Some(RequestId::Text(s)),
            _ => None,
        }
    }
}

impl<'de> Deserialize<'de> for RequestId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<RequestId, D::Error> {
        RequestId::from_value(Value::deserialize(d)?)
            .ok_or_else(|| serde::de::Error::custom(INVALID_ID))
    }
}

impl Serialize for RequestId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            RequestId::None => s.serialize_unit(),
            RequestId::Number(n) => n.serialize(s),
            RequestId::Text(t) => s.serialize_str(t),
        }
    }
}

/// The `id` of a JSON object, whatever else is wrong with it; other fields are skipped, not
/// built.
fn recover_id(text: &str) -> RequestId {
    #[derive(Deserialize)]
    struct IdOnly {
        #[serde(default)]
        id: Value,
    }
    serde_json::from_str::<IdOnly>(text)
        .ok()
        .and_then(|only| RequestId::from_value(only.id))
        .unwrap_or_default()
}

/// Rooms named by `rooms` plus the seed-style `features`.
pub fn requested_rooms(rooms: Vec<String>, features: Vec<String>) -> Vec<String> {
    let mut all = rooms;
    all.extend(features.into_iter().map(|f| format!("feature:{f}")));
    all
}

/// Why a room name was refused (`invalid_room`).
pub const INVALID_ROOM_MESSAGE: &str =
    "room names are 1 to 200 bytes, with no '*' and no control or invisible formatting characters";

/// A room name a client may ask for: bounded, and nothing in it that is not what it looks
/// like. A `*` would only ever join a room literally named so, never the rooms a client
/// meant by it; an invisible character makes a name that reads like another.
pub fn valid_room_name(room: &str) -> bool {
    !room.is_empty() && room.len() <= 200 && !room.chars().any(refused_in_room_name)
}

fn refused_in_room_name(c: char) -> bool {
    c == '*' || c.is_control() || matches!(c, '\u{2028}' | '\u{2029}') || is_format(c)
}

/// Unicode general category Cf (format characters: zero-width, bidirectional overrides,
/// byte order mark, soft hyphen, tags, ...), as of Unicode 15.
fn is_format(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{0600}'..='\u{0605}'
            | '\u{061C}'
            | '\u{06DD}'
            | '\u{070F}'
            | '\u{0890}'..='\u{0891}'
            | '\u{08E2}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{206F}'
            | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}'
            | '\u{110BD}'
            | '\u{110CD}'
            | '\u{13430}'..='\u{1343F}'
            | '\u{1BCA0}'..='\u{1BCA3}'
            | '\u{1D173}'..='\u{1D17A}'
            | '\u{E0001}'
            | '\u{E0020}'..='\u{E007F}'
    )
}

/// Encodes an event frame for a routed record: one buffer, the payload spliced in as is.
pub fn event(routed: &Routed<'_>) -> Result<Frame, std::str::Utf8Error> {
    let payload = std::str::from_utf8(routed.payload)?.trim();
    let pos = &routed.position;
    let mut out = Text(Frame::buffer(
        payload.len() + routed.event.len() + pos.topic.len() + 96,
    ));
    out.push_str("{\"type\":\"event\",\"event\":");
    push_json_string(&mut out, &routed.event);
    out.push_str(",\"pos\":");
    out.push('"');
    push_escaped(&mut out, &pos.topic);
    let mut number = itoa::Buffer::new();
    out.push(':');
    out.push_str(number.format(pos.partition));
    out.push(':');
    out.push_str(number.format(pos.offset));
    out.push('"');
    if let Some(ts) = routed.timestamp_ms {
        out.push_str(",\"ts\":");
        out.push_str(number.format(ts));
    }
    if routed.expose_rooms {
        out.push_str(",\"rooms\":[");
        for (i, room) in routed.rooms.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            push_json_string(&mut out, room);
        }
        out.push(']');
    }
    out.push_str(",\"payload\":");
    out.push_str(payload);
    out.push('}');
    Ok(Frame::from_buffer(out.0))
}

/// Text appended to a frame's buffer: only ever whole `&str`s and `char`s, so it stays UTF-8.
struct Text(Vec<u8>);

impl Text {
    fn push_str(&mut self, s: &str) {
        self.0.extend_from_slice(s.as_bytes());
    }

    fn push(&mut self, c: char) {
        self.push_str(c.encode_utf8(&mut [0; 4]));
    }
}

impl std::fmt::Write for Text {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.push_str(s);
        Ok(())
    }
}

/// Appends `s` as a JSON string literal.
fn push_json_string(out: &mut Text, s: &str) {
    out.push('"');
    push_escaped(out, s);
    out.push('"');
}

/// Appends `s` escaped for the inside of a JSON string.
fn push_escaped(out: &mut Text, s: &str) {
    use std::fmt::Write;
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
}

/// The codes of `error` frames (docs/PROTOCOL.md's table of them, checked by a test below).
/// One list makes the variants, their words and [`ErrorCode::ALL`], so they cannot differ.
macro_rules! error_codes {
    ($($(#[$doc:meta])* $variant:ident = $word:literal,)*) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum ErrorCode {
            $($(#[$doc])* $variant,)*
        }

        impl ErrorCode {
            pub const ALL: &[ErrorCode] = &[$(ErrorCode::$variant,)*];

            pub fn as_str(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => $word,)*
                }
            }
        }
    };
}

error_codes! {
    /// The token does not grant this room.
    Forbidden = "forbidden",
    /// A room name that is not one (see [`valid_room_name`]).
    InvalidRoom = "invalid_room",
    /// The connection's room limit reached.
    TooManyRooms = "too_many_rooms",
    /// A subscription or refresh token refused.
    InvalidToken = "invalid_token",
    /// Messages over the client's budget are being dropped.
    RateLimited = "rate_limited",
    /// A resume this replica cannot serve yet: it has not read as far as the client.
    Lagging = "lagging",
    /// A frame refused whole.
    BadRequest = "bad_request",
    /// A presence query or `presence: true` on a replica with presence off.
    PresenceDisabled = "presence_disabled",
}

impl Serialize for ErrorCode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Where a resume was served from, as its `ok` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Nothing was missing.
    Nothing,
    Memory,
    Kafka,
    /// The gap could not be replayed: the client was told to refetch its state.
    Resync,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Nothing => "nothing",
            Source::Memory => "memory",
            Source::Kafka => "kafka",
            Source::Resync => "resync",
        }
    }
}

impl Serialize for Source {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

pub struct Welcome<'a> {
    pub connection: u64,
    pub user: &'a str,
    pub tenant: Option<&'a str>,
    pub rooms: &'a [String],
    pub heartbeat_seconds: u64,
    /// None on a connection opened to resume: the head positions are not what such a client
    /// has received, and a client that stored them would skip its gap on its next resume.
    pub positions: Option<&'a BTreeMap<String, i64>>,
    pub server: &'a str,
}

/// Every server frame but the event, field by field in wire order. Optional fields are left
/// out when absent, except `tenant` and `id`, which are sent as null.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum ServerFrame<'a> {
    Welcome {
        connection: String,
        user: &'a str,
        tenant: Option<&'a str>,
        rooms: &'a [String],
        heartbeat: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        positions: Option<&'a BTreeMap<String, i64>>,
        server: &'a str,
        protocol: u32,
    },
    Ok {
        id: &'a RequestId,
        #[serde(skip_serializing_if = "Option::is_none")]
        rooms: Option<&'a [String]>,
    },
    #[serde(rename = "ok")]
    Resumed {
        id: &'a RequestId,
        rooms: &'a [String],
        replayed: usize,
        source: Source,
    },
    Positions {
        positions: &'a BTreeMap<String, i64>,
    },
    Resync {
        reason: &'a str,
    },
    Error {
        id: &'a RequestId,
        code: ErrorCode,
        message: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        room: Option<&'a str>,
    },
    Pong {
        id: &'a RequestId,
    },
    #[serde(rename = "ok")]
    PresenceOk {
        id: &'a RequestId,
        room: &'a str,
        users: &'a BTreeMap<String, u32>,
        ready: bool,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        truncated: bool,
    },
    #[serde(rename = "event")]
    PresenceEvent {
        event: &'a str,
        ts: i64,
        payload: PresencePayload<'a>,
    },
}

#[derive(Serialize)]
struct PresencePayload<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    room: Option<&'a str>,
    user: &'a str,
}

pub fn welcome(w: &Welcome<'_>) -> Frame {
    to_frame(&ServerFrame::Welcome {
        connection: w.connection.to_string(),
        user: w.user,
        tenant: w.tenant,
        rooms: w.rooms,
        heartbeat: w.heartbeat_seconds,
        positions: w.positions,
        server: w.server,
        protocol: PROTOCOL_VERSION,
    })
}

pub fn ok(id: &RequestId, rooms: Option<&[String]>) -> Frame {
    to_frame(&ServerFrame::Ok { id, rooms })
}

/// The answer to a resume, after the replayed events.
pub fn resumed(id: &RequestId, rooms: &[String], replayed: usize, source: Source) -> Frame {
    to_frame(&ServerFrame::Resumed {
        id,
        rooms,
        replayed,
        source,
    })
}

/// A watermark: everything up to these positions has been delivered or does not concern
/// the connection. It travels through the connection's queue, behind what it covers.
pub fn positions(positions: &BTreeMap<String, i64>) -> Frame {
    to_frame(&ServerFrame::Positions { positions })
}

/// The gap cannot be replayed: the client must refetch its state.
pub fn resync(reason: &str) -> Frame {
    to_frame(&ServerFrame::Resync { reason })
}

/// An error: about one `room` of a request, or the request's final answer.
pub fn error(id: &RequestId, code: ErrorCode, room: Option<&str>, message: &str) -> Frame {
    to_frame(&ServerFrame::Error {
        id,
        code,
        message,
        room,
    })
}

pub fn pong(id: &RequestId) -> Frame {
    to_frame(&ServerFrame::Pong { id })
}

/// The answer to a presence query: the room's users and their connections on any replica.
pub fn presence_ok(id: &RequestId, room: &str, view: &RoomView) -> Frame {
    to_frame(&ServerFrame::PresenceOk {
        id,
        room,
        users: &view.users,
        ready: view.ready,
        truncated: view.truncated,
    })
}

/// A presence event (`presence.join` and `.leave` name the room; `.online` and `.offline`
/// do not). No `pos`: it is no record of a log, and a resume does not replay it.
pub fn presence_event(event: &str, ts: i64, room: Option<&str>, user: &str) -> Frame {
    to_frame(&ServerFrame::PresenceEvent {
        event,
        ts,
        payload: PresencePayload { room, user },
    })
}

fn to_frame(frame: &ServerFrame<'_>) -> Frame {
    let mut buf = Frame::buffer(128);
    serde_json::to_writer(&mut buf, frame).expect("a server frame always serializes");
    Frame::from_buffer(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::{Position, Priority};
    use serde_json::json;

    fn id(v: Value) -> RequestId {
        RequestId::from_value(v).expect("a valid id")
    }

    #[test]
    fn event_frame_splices_the_payload() {
        let routed = Routed {
            event: "users.user.deleted".into(),
            rooms: vec!["feature:users".into()],
            tenant: None,
            priority: Priority::Normal,
            position: Position {
                topic: "entity-updates".into(),
                partition: 3,
                offset: 1234,
            },
            timestamp_ms: Some(1_763_880_000_123),
            payload: br#" {"a":[1,"\u00e9"]} "#,
            expose_rooms: false,
        };
        let frame = event(&routed).unwrap();
        assert_eq!(
            frame.as_str(),
            r#"{"type":"event","event":"users.user.deleted","pos":"entity-updates:3:1234","ts":1763880000123,"payload":{"a":[1,"\u00e9"]}}"#
        );
        let with_rooms = event(&Routed {
            expose_rooms: true,
            ..routed
        })
        .unwrap();
        let v: Value = serde_json::from_str(with_rooms.as_str()).unwrap();
        assert_eq!(v["rooms"], json!(["feature:users"]));
    }

    #[test]
    fn a_welcome_names_positions_only_when_given_them() {
        let positions = BTreeMap::from([("t:0".to_string(), 41)]);
        let rooms = ["user:u".to_string()];
        let welcome_with = |positions| {
            let frame = welcome(&Welcome {
                connection: 7,
                user: "u",
                tenant: None,
                rooms: &rooms,
                heartbeat_seconds: 25,
                positions,
                server: "r0",
            });
            serde_json::from_str::<Value>(frame.as_str()).unwrap()
        };
        assert_eq!(
            welcome_with(Some(&positions)),
            json!({"type": "welcome", "connection": "7", "user": "u", "tenant": null,
                   "rooms": ["user:u"], "heartbeat": 25, "positions": {"t:0": 41},
                   "server": "r0", "protocol": 1})
        );
        assert_eq!(
            welcome_with(None),
            json!({"type": "welcome", "connection": "7", "user": "u", "tenant": null,
                   "rooms": ["user:u"], "heartbeat": 25, "server": "r0", "protocol": 1})
        );
    }

    /// The frames' fields go out in the order the protocol documents them, whatever
    /// serde_json's maps would do: the builders write no map.
    #[test]
    fn server_frames_keep_their_field_order() {
        let rooms = ["user:u".to_string(), "task:7".to_string()];
        let cut = BTreeMap::from([("t:1".to_string(), 9), ("a:0".to_string(), -1)]);
        let users = BTreeMap::from([("7".to_string(), 1), ("42".to_string(), 2)]);
        let view = RoomView {
            users,
            ready: true,
            truncated: false,
        };
        let truncated = RoomView {
            users: BTreeMap::from([("42".to_string(), 2)]),
            ready: false,
            truncated: true,
        };
        let frames = [
            (
                ok(&id(json!(7)), Some(&rooms[1..])),
                r#"{"type":"ok","id":7,"rooms":["task:7"]}"#,
            ),
            (ok(&RequestId::None, None), r#"{"type":"ok","id":null}"#),
            (
                resumed(&id(json!("r-1")), &rooms, 3, Source::Kafka),
                r#"{"type":"ok","id":"r-1","rooms":["user:u","task:7"],"replayed":3,"source":"kafka"}"#,
            ),
            (
                positions(&cut),
                r#"{"type":"positions","positions":{"a:0":-1,"t:1":9}}"#,
            ),
            (
                resync("t:0: too old"),
                r#"{"type":"resync","reason":"t:0: too old"}"#,
            ),
            (
                error(&id(json!(1e3)), ErrorCode::Forbidden, Some("task:9"), "no"),
                r#"{"type":"error","id":1000.0,"code":"forbidden","message":"no","room":"task:9"}"#,
            ),
            (
                error(&RequestId::None, ErrorCode::RateLimited, None, "slow down"),
                r#"{"type":"error","id":null,"code":"rate_limited","message":"slow down"}"#,
            ),
            (pong(&id(json!(-2))), r#"{"type":"pong","id":-2}"#),
            (
                presence_ok(&id(json!(8)), "task:9", &view),
                r#"{"type":"ok","id":8,"room":"task:9","users":{"42":2,"7":1},"ready":true}"#,
            ),
            (
                presence_ok(&id(json!(9)), "r", &truncated),
                r#"{"type":"ok","id":9,"room":"r","users":{"42":2},"ready":false,"truncated":true}"#,
            ),
            (
                presence_event("presence.join", 17, Some("task:9"), "42"),
                r#"{"type":"event","event":"presence.join","ts":17,"payload":{"room":"task:9","user":"42"}}"#,
            ),
            (
                presence_event("presence.offline", 18, None, "7"),
                r#"{"type":"event","event":"presence.offline","ts":18,"payload":{"user":"7"}}"#,
            ),
        ];
        for (frame, text) in frames {
            assert_eq!(frame.as_str(), text);
        }
        let welcome = welcome(&Welcome {
            connection: 7,
            user: "u",
            tenant: Some("acme"),
            rooms: &rooms[..1],
            heartbeat_seconds: 25,
            positions: Some(&cut),
            server: "r0",
        });
        assert_eq!(
            welcome.as_str(),
            r#"{"type":"welcome","connection":"7","user":"u","tenant":"acme","rooms":["user:u"],"heartbeat":25,"positions":{"a:0":-1,"t:1":9},"server":"r0","protocol":1}"#
        );
    }

    /// PROTOCOL.md's table of error codes lists exactly the codes the server sends.
    #[test]
    fn the_error_table_lists_every_error_code() {
        let doc = include_str!("../../docs/PROTOCOL.md");
        let table = doc
            .lines()
            .skip_while(|l| !l.starts_with("| code | with `room` |"))
            .skip(2)
            .take_while(|l| l.starts_with('|'));
        let mut documented: Vec<&str> = table
            .map(|row| {
                let cell = row.split('|').nth(1).expect("a first cell").trim();
                cell.trim_matches('`')
            })
            .collect();
        let mut sent: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        documented.sort_unstable();
        sent.sort_unstable();
        assert_eq!(documented, sent);
    }

    #[test]
    fn json_strings_are_escaped() {
        for s in [
            "plain",
            "q\"uote",
            "back\\slash",
            "line\nbreak",
            "ctl\u{1}",
            "é✓",
        ] {
            let mut out = Text(Vec::new());
            push_json_string(&mut out, s);
            assert_eq!(serde_json::from_slice::<String>(&out.0).unwrap(), s);
        }
    }

    #[test]
    fn client_frames_parse() {
        let f = ClientFrame::parse(
            r#"{"type":"subscribe","id":7,"rooms":["task:9"],"events":["users.*"]}"#,
        )
        .unwrap();
        assert_eq!(
            f,
            ClientFrame::Subscribe {
                id: id(json!(7)),
                rooms: vec!["task:9".into()],
                features: vec![],
                events: Some(vec!["users.*".into()]),
                token: None,
                presence: false,
            }
        );
        assert_eq!(
            ClientFrame::parse(r#"{"type":"presence","id":8,"room":"task:9"}"#).unwrap(),
            ClientFrame::Presence {
                id: id(json!(8)),
                room: "task:9".into(),
                token: None,
            }
        );
        let ClientFrame::Subscribe { presence, .. } =
            ClientFrame::parse(r#"{"type":"subscribe","rooms":["a"],"presence":true}"#).unwrap()
        else {
            panic!("not a subscribe")
        };
        assert!(presence);
        let seed =
            ClientFrame::parse(r#"{"type":"subscribe","features":["users","rbac"]}"#).unwrap();
        let ClientFrame::Subscribe {
            rooms, features, ..
        } = seed
        else {
            panic!("not a subscribe")
        };
        assert_eq!(
            requested_rooms(rooms, features),
            ["feature:users", "feature:rbac"]
        );
        assert!(ClientFrame::parse(r#"{"type":"dance"}"#).is_err());
        assert!(ClientFrame::parse("{").is_err());
        assert!(ClientFrame::parse(r#"{"type":"refresh"}"#).is_err());
    }

    /// Every refused frame that carries a valid id is answered with it.
    #[test]
    fn a_refused_frame_keeps_its_id() {
        let refused = |text: &str| ClientFrame::parse(text).unwrap_err();
        let cases = [
            (
                r#"{"type":"subscribe","id":11,"rooms":["x"],"bogus":1}"#,
                json!(11),
                "unknown field `bogus`, expected one of `id`, `rooms`, `features`, `events`, `token`",
            ),
            (
                r#"{"type":"dance","id":"d-1"}"#,
                json!("d-1"),
                "unknown variant `dance`, expected one of `subscribe`, `unsubscribe`, `resume`, `presence`, `ping`, `refresh`",
            ),
            (
                r#"{"id":12.5,"type":"subscribe","rooms":"x"}"#,
                json!(12.5),
                "invalid type: string \"x\", expected a sequence",
            ),
            (
                r#"{"type":"refresh","id":13}"#,
                json!(13),
                "missing field `token`",
            ),
            (r#"{"id":14,"rooms":[]}"#, json!(14), "missing field `type`"),
            (
                r#"{"type":"resume","id":-15,"positions":{"t:0":"x"}}"#,
                json!(-15),
                "invalid type: string \"x\", expected i64",
            ),
        ];
        for (text, expected, reason) in cases {
            let e = refused(text);
            assert_eq!(e.id, id(expected), "{text}");
            assert!(e.reason.starts_with(reason), "{text}: {}", e.reason);
        }
        assert_eq!(
            refused(r#"{"type":"dance","id":16}"#).to_string(),
            "invalid frame: unknown variant `dance`, expected one of `subscribe`, `unsubscribe`, \
             `resume`, `presence`, `ping`, `refresh` at line 1 column 15"
        );
    }

    /// No id, or one that is not a number or a string: nothing to answer with but null.
    #[test]
    fn a_frame_without_a_valid_id_is_answered_with_none() {
        for text in [
            r#"{"type":"ping","id":true}"#,
            r#"{"type":"ping","id":[1]}"#,
            r#"{"type":"ping","id":{"n":1}}"#,
            r#"{"type":"dance","id":null}"#,
            r#"{"type":"dance"}"#,
            r#"{"type":"ping","id":17"#,
            r#"[{"id":18}]"#,
            r#""id""#,
            "{",
            "",
        ] {
            assert_eq!(
                ClientFrame::parse(text).unwrap_err().id,
                RequestId::None,
                "{text}"
            );
        }
        assert_eq!(
            ClientFrame::parse(r#"{"type":"ping","id":true}"#)
                .unwrap_err()
                .reason,
            "id must be a number or a string"
        );
        for (text, id) in [
            (r#"{"type":"ping","id":null}"#, RequestId::None),
            (r#"{"type":"ping"}"#, RequestId::None),
            (r#"{"type":"ping","id":"p"}"#, id(json!("p"))),
            (r#"{"type":"ping","id":1e3}"#, id(json!(1e3))),
        ] {
            assert_eq!(
                ClientFrame::parse(text),
                Ok(ClientFrame::Ping { id }),
                "{text}"
            );
        }
    }

    #[test]
    fn room_names_are_checked() {
        assert!(valid_room_name("task:9"));
        assert!(!valid_room_name(""));
        assert!(!valid_room_name("a\u{1}b"));
        assert!(!valid_room_name(&"x".repeat(201)));
        assert!(valid_room_name(&"x".repeat(200)));
    }

    #[test]
    fn patterns_are_not_room_names() {
        for room in ["feature:*", "task:**", "*", "task-*", "a*b"] {
            assert!(!valid_room_name(room), "{room:?}");
        }
    }

    #[test]
    fn invisible_characters_are_not_in_room_names() {
        let refused = [
            '\u{0}',
            '\u{7f}',
            '\u{85}',
            '\u{2028}',
            '\u{2029}',
            '\u{ad}',
            '\u{61c}',
            '\u{180e}',
            '\u{200b}',
            '\u{200c}',
            '\u{200d}',
            '\u{200e}',
            '\u{200f}',
            '\u{202a}',
            '\u{202e}',
            '\u{2060}',
            '\u{2064}',
            '\u{2066}',
            '\u{206f}',
            '\u{feff}',
            '\u{fff9}',
            '\u{fffb}',
            '\u{e0001}',
            '\u{e0020}',
            '\u{e007f}',
            '\u{600}',
            '\u{110bd}',
            '\u{1d173}',
        ];
        for c in refused {
            assert!(
                !valid_room_name(&format!("task:a{c}b")),
                "U+{:04X}",
                c as u32
            );
        }
        // Visible characters, including neighbours of the refused ranges.
        let kept = [
            "task:é",
            "room:日本",
            "task:🙂",
            "a\u{2010}b",
            "a\u{2027}b",
            "a\u{fffc}b",
        ];
        for room in kept {
            assert!(valid_room_name(room), "{room:?}");
        }
    }
}
