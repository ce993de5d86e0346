//! Configuration: a TOML file, then `ROOMCAST_*` environment overrides, then CLI flags.
//!
//! Everything the service reads at start-up lives in [`Config`]: plain data, with the checks
//! of syntax and range that need nothing but the data, each refusal naming its key. Turning
//! it into the parts the service runs on (and the checks that need them) is `setup.rs`'s, so
//! this module imports nothing else of the crate.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What a configuration problem is, always naming the key it concerns.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

impl ConfigError {
    pub fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub websocket: WebSocketConfig,
    pub kafka: KafkaConfig,
    pub auth: AuthConfig,
    pub resume: ResumeConfig,
    pub records: RecordsConfig,
    pub presence: PresenceConfig,
    pub log: LogConfig,
    /// Routes, one per topic. Empty means the two default routes.
    #[serde(rename = "route", skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteConfig>,
    /// `ROOMCAST_*` variables that set nothing, to be reported (see `apply_env`).
    #[serde(skip)]
    pub ignored_env: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Public listener: `/ws` and the demo page.
    pub listen: String,
    /// Admin listener: metrics, health, readiness, stats. Never exposed on the ingress.
    pub admin_listen: String,
    /// Name of this replica, sent in the welcome frame and used in the consumer group id.
    pub name: String,
    /// Browser origins allowed to open a WebSocket; empty allows any origin.
    pub allowed_origins: Vec<String>,
    pub max_connections: usize,
    /// How long SIGTERM spends closing clients (in paced batches) before exiting.
    pub drain_seconds: f64,
    /// Time a connection has from being accepted to being upgraded (or its HTTP answered);
    /// a peer that sends its request head slowly is closed when it runs out.
    pub handshake_timeout_seconds: f64,
    /// Largest request head (request line and headers) read before the upgrade; a larger
    /// one is answered 431.
    pub max_request_head_bytes: usize,
    /// Connections accepted but not yet upgraded, across all peers; past it a new
    /// connection is answered 503 at once.
    pub max_handshakes: usize,
    /// Connections not yet upgraded from one peer address (0: no limit). Peers listed in
    /// `trusted_proxies` are exempt: they carry many clients.
    pub max_handshakes_per_address: usize,
    /// Open connections of one user of one tenant (0: no limit).
    pub max_connections_per_user: usize,
    /// Open connections from one client address (0: no limit). Behind a proxy the address
    /// is read from `X-Forwarded-For`, but only when the peer is in `trusted_proxies`.
    pub max_connections_per_address: usize,
    /// Addresses or CIDR ranges of proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebSocketConfig {
    /// Seconds between server pings.
    pub heartbeat_seconds: u64,
    /// A peer silent for this long is closed.
    pub idle_timeout_seconds: u64,
    pub max_message_bytes: usize,
    /// At most `max_message_bytes`: a message is at least as large as each of its frames.
    pub max_frame_bytes: usize,
    /// Bytes asked of the socket per read, at least 64.
    pub read_buffer_bytes: u32,
    pub write_buffer_bytes: usize,
    /// The kernel's send buffer per connection (SO_SNDBUF); 0 leaves it to the kernel, which
    /// lets a stalled client's socket take up to `net.ipv4.tcp_wmem`'s maximum (often 4 MB)
    /// before the queue starts to fill and the 4008 close can come.
    pub send_buffer_bytes: u32,
    /// Frames queued for one connection before it is closed as a slow consumer (4008).
    pub queue_frames: usize,
    /// Bytes queued for one connection before it is closed as a slow consumer (4008).
    pub queue_bytes: usize,
    /// Past this many queued frames, `low` priority frames are shed.
    pub shed_low_priority_after: usize,
    pub max_rooms_per_connection: usize,
    /// Malformed client frames tolerated before the connection is closed with 1008.
    pub max_bad_frames: u32,
    /// Client messages (data messages and WebSocket pings) a connection may send per second,
    /// on average: past it they are refused with `rate_limited`.
    pub client_messages_per_second: u32,
    /// Client messages a connection may send at once; as many refused in a row close it
    /// with 4029.
    pub client_burst: u32,
    /// Rooms a connection may join or leave per second, on average, through `subscribe` and
    /// `unsubscribe`: each change may cost a presence record and an event to every listener.
    pub room_changes_per_second: u32,
    /// Room changes a connection may make at once; at least `max_rooms_per_connection`.
    pub room_changes_burst: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct KafkaConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// Consumer group id prefix; the replica name is appended (see docs/OPERATIONS.md).
    pub group_prefix: String,
    /// Seconds between metadata checks for new topics and partitions (1 to 3600).
    pub metadata_refresh_seconds: u64,
    /// Every other key is handed to librdkafka unchanged (security.protocol, sasl.*, ssl.*).
    #[serde(flatten)]
    pub properties: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Algorithm {
    HS256,
    HS384,
    HS512,
    RS256,
    RS384,
    RS512,
    ES256,
    ES384,
    EdDSA,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Pinned: a token signed with any other algorithm is refused.
    pub algorithm: Algorithm,
    /// HMAC secret for the HS* algorithms.
    pub secret: Option<String>,
    /// PEM public key for the RS*, ES* and EdDSA algorithms.
    pub public_key_file: Option<PathBuf>,
    pub audience: Option<String>,
    pub issuer: Option<String>,
    pub leeway_seconds: u64,
    /// Permission name (from the token's `perms`) to the room patterns it grants.
    pub perms: BTreeMap<String, Vec<String>>,
}

/// Nothing lost: the replay buffer, replay from Kafka, and position watermarks.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResumeConfig {
    /// Bytes of recent records kept in memory for replay, shared by all partitions.
    pub buffer_bytes: usize,
    /// Records older than this leave the buffer; it is also the window read back at start.
    pub buffer_max_age_seconds: u64,
    /// Gaps older than this are not replayed from Kafka: the client gets `resync`.
    pub max_age_seconds: u64,
    /// Partitions read back from Kafka at the same time, across all clients.
    pub kafka_concurrency: usize,
    /// Largest range of offsets one partition of one resume may read from Kafka.
    pub max_replay_records: i64,
    /// Seconds between `positions` watermark frames.
    pub positions_interval_seconds: f64,
}

/// Bounds on one Kafka record, checked at routing: a record past any of them is skipped and
/// counted, so that one producer's mistake never reaches, or disconnects, every client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RecordsConfig {
    /// Largest value (plus the event name and exposed rooms it renders): a frame must fit in
    /// a connection's queue (`websocket.queue_bytes`), or every recipient is closed with 4008.
    pub max_bytes: usize,
    /// Most distinct rooms one record may target.
    pub max_rooms: usize,
    /// Deepest nesting of arrays and objects in a value: it is spliced into frames as is,
    /// and many clients' parsers give up on deep documents.
    pub max_depth: usize,
}

/// Presence across replicas through a Kafka topic (docs/PRESENCE.md). Off, nothing of it
/// runs: no topic, no producer, no reader.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PresenceConfig {
    pub enabled: bool,
    /// One partition, compacted, read from its beginning by every replica.
    pub topic: String,
    /// Whether a replica creates the topic at start when it is missing.
    pub create_topic: bool,
    /// How long this replica's changes are gathered into one batch.
    pub interval_seconds: f64,
    /// The longest time without a record: an empty one then renews the lease.
    pub renew_seconds: f64,
    /// How often the replica's whole state is published, for readers that start later.
    pub snapshot_seconds: f64,
    /// How long a replica's entries stand without a record from it (its lease).
    pub expiry_seconds: f64,
    /// Largest presence record; a larger batch is split.
    pub max_record_bytes: usize,
    /// The room whose presence listeners hear a tenant's users come online and go offline;
    /// `{tenant}` stands for the tenant. Empty: no such events.
    pub status_room: String,
    /// The most users a client's query answers with (the first in order, and
    /// `"truncated": true`): the answer is copied under the table's lock.
    pub max_query_users: usize,
    /// Room patterns (`*`, `**`) whose presence is kept: a connection in another room is
    /// not counted in it, and that room can be neither queried nor listened to. Every room
    /// counted costs each replica memory and a key in every snapshot.
    pub rooms: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter such as `info` or `roomcast=debug,rdkafka=warn`.
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub topic: String,
    pub event: String,
    pub rooms: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Send the record's room list to recipients (off: it could tell one user who else got it).
    #[serde(default)]
    pub expose_rooms: bool,
    /// With a `tenant` template, whether a record whose tenant cannot be read goes to the
    /// tenant-less namespace; off, such a record is skipped as malformed (`no_tenant`).
    #[serde(default)]
    pub tenant_optional: bool,
    /// The `[records]` bounds, copied in when the configuration is assembled.
    #[serde(skip)]
    pub limits: RecordsConfig,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "0.0.0.0:8080".into(),
            admin_listen: "0.0.0.0:9090".into(),
            name: host_name(),
            allowed_origins: Vec::new(),
            max_connections: 100_000,
            drain_seconds: 5.0,
            handshake_timeout_seconds: 10.0,
            max_request_head_bytes: 16 * 1024,
            max_handshakes: 4096,
            max_handshakes_per_address: 256,
            max_connections_per_user: 100,
            max_connections_per_address: 0,
            trusted_proxies: Vec::new(),
        }
    }
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        WebSocketConfig {
            heartbeat_seconds: 25,
            idle_timeout_seconds: 60,
            max_message_bytes: 64 * 1024,
            max_frame_bytes: 64 * 1024,
            read_buffer_bytes: 512,
            write_buffer_bytes: 16 * 1024,
            send_buffer_bytes: 0,
            queue_frames: 1024,
            queue_bytes: 4 * 1024 * 1024,
            shed_low_priority_after: 256,
            max_rooms_per_connection: 256,
            max_bad_frames: 10,
            client_messages_per_second: 20,
            client_burst: 50,
            room_changes_per_second: 100,
            room_changes_burst: 1024,
        }
    }
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            group_prefix: "roomcast".into(),
            metadata_refresh_seconds: 10,
            properties: BTreeMap::new(),
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            algorithm: Algorithm::HS256,
            secret: None,
            public_key_file: None,
            audience: None,
            issuer: None,
            leeway_seconds: 5,
            perms: BTreeMap::new(),
        }
    }
}

impl Default for ResumeConfig {
    fn default() -> Self {
        ResumeConfig {
            buffer_bytes: 64 * 1024 * 1024,
            buffer_max_age_seconds: 300,
            max_age_seconds: 3600,
            kafka_concurrency: 4,
            max_replay_records: 100_000,
            positions_interval_seconds: 5.0,
        }
    }
}

impl Default for RecordsConfig {
    fn default() -> Self {
        RecordsConfig {
            max_bytes: 1024 * 1024,
            max_rooms: 1000,
            max_depth: 64,
        }
    }
}

impl PresenceConfig {
    /// The room a tenant's online and offline events go to; none for tokens without a tenant,
    /// or when `status_room` is empty.
    pub fn status_room_of(&self, tenant: Option<&str>) -> Option<String> {
        let tenant = tenant?;
        (!self.status_room.is_empty()).then(|| self.status_room.replace("{tenant}", tenant))
    }
}

impl Default for PresenceConfig {
    fn default() -> Self {
        PresenceConfig {
            enabled: false,
            topic: "roomcast-presence".into(),
            create_topic: true,
            interval_seconds: 0.2,
            renew_seconds: 2.0,
            snapshot_seconds: 30.0,
            expiry_seconds: 10.0,
            max_record_bytes: 256 * 1024,
            status_room: "tenant:{tenant}".into(),
            max_query_users: 10_000,
            rooms: vec!["**".into()],
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// The two routes that work with no configuration: the formats the existing producers use.
pub fn default_routes() -> Vec<RouteConfig> {
    vec![
        RouteConfig {
            topic: "entity-updates".into(),
            event: "{feature}.{entity}.{action}".into(),
            rooms: vec![
                "feature:{feature}".into(),
                "feature:{feature}:entity:{entity}".into(),
                "{entity}:{data.id}".into(),
            ],
            priority: Some("{meta.priority}".into()),
            tenant: Some("{meta.tenantId}".into()),
            expose_rooms: false,
            tenant_optional: false,
            limits: RecordsConfig::default(),
        },
        RouteConfig {
            topic: "task-updates".into(),
            event: "task:update".into(),
            rooms: vec!["user:{userId}".into(), "task:{taskId}".into()],
            priority: None,
            tenant: None,
            expose_rooms: false,
            tenant_optional: false,
            limits: RecordsConfig::default(),
        },
    ]
}

/// Overrides given on the command line; they win over the file and the environment.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<String>,
    pub admin_listen: Option<String>,
    pub brokers: Option<String>,
}

impl Config {
    /// File (if any), then environment, then flags; not validated yet (`Setup::build` does it,
    /// for every command alike).
    pub fn assemble(file: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        Config::assemble_over(Config::default(), file, overrides)
    }

    /// `assemble` with other defaults than `Config::default()` (the demo's listeners):
    /// whatever the file, the environment or the flags set still wins over them.
    pub fn assemble_over(
        base: Config,
        file: Option<&Path>,
        overrides: &Overrides,
    ) -> Result<Config, ConfigError> {
        let mut config = match file {
            Some(path) => base.overlaid_with_file(path)?,
            None => base,
        };
        config.ignored_env = config.apply_env(std::env::vars())?;
        config.apply_overrides(overrides);
        if config.routes.is_empty() {
            config.routes = default_routes();
        }
        for route in &mut config.routes {
            route.limits = config.records;
        }
        Ok(config)
    }

    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        Config::default().overlaid_with_file(path)
    }

    /// This configuration with every key the file sets replaced by the file's value.
    fn overlaid_with_file(&self, path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let parse = |message: String| ConfigError::Parse {
            path: path.to_owned(),
            message,
        };
        // Parsed whole first, for messages that point at the file's line.
        Config::from_toml(&text).map_err(parse)?;
        let file: toml::Table = toml::from_str(&text).map_err(|e| parse(e.to_string()))?;
        let mut whole = toml::Table::try_from(self).map_err(|e| parse(e.to_string()))?;
        for (key, value) in file {
            match (whole.get_mut(&key), value) {
                (Some(toml::Value::Table(section)), toml::Value::Table(keys)) => {
                    section.extend(keys);
                }
                (_, value) => {
                    whole.insert(key, value);
                }
            }
        }
        whole
            .try_into()
            .map_err(|e: toml::de::Error| parse(e.to_string()))
    }

    pub fn from_toml(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Applies `ROOMCAST_*` variables by one rule: `ROOMCAST_<SECTION>_<KEY>` sets
    /// `<section>.<key>` (`ROOMCAST_WEBSOCKET_HEARTBEAT_SECONDS`), a list given comma-separated.
    /// `ROOMCAST_KAFKA_<NAME>` that is not a key of `[kafka]` sets librdkafka's `<name>` with
    /// `_` read as `.`, so `ROOMCAST_KAFKA_SASL_PASSWORD` sets `sasl.password`. The short
    /// names of earlier versions (`ROOMCAST_LISTEN`, `ROOMCAST_JWT_SECRET`, ...) still work.
    ///
    /// A variable that names a section but no key of it, or a key without its section, is
    /// refused: it was meant as a setting and would change nothing. Any other unknown
    /// `ROOMCAST_*` variable is returned, to be reported; Kubernetes' service links and the
    /// tests' own `ROOMCAST_TEST_*` are left alone.
    pub fn apply_env(
        &mut self,
        vars: impl Iterator<Item = (String, String)>,
    ) -> Result<Vec<String>, ConfigError> {
        let mut unknown = Vec::new();
        let mut set_by: BTreeMap<&str, String> = BTreeMap::new();
        for (name, value) in vars {
            let Some(key) = name.strip_prefix("ROOMCAST_") else {
                continue;
            };
            if is_service_link(key) || key.starts_with("TEST_") {
                continue;
            }
            let key = ALIASES
                .iter()
                .find(|(alias, _)| *alias == key)
                .map_or(key, |(_, full)| *full);
            // A short name and its full one both set: which wins would depend on the order
            // of the environment.
            if let Some(first) = ALIASES.iter().find(|(_, full)| *full == key).map(|a| a.1) {
                if let Some(other) = set_by.insert(first, name.clone()) {
                    return Err(ConfigError::invalid(&name, format!("also set as {other}")));
                }
            }
            if self.set_from_env(&name, key, &value)? {
                continue;
            }
            if let Some(full) = self.section_of(key) {
                return Err(ConfigError::invalid(
                    &name,
                    format!("not a setting; did you mean ROOMCAST_{full}?"),
                ));
            }
            unknown.push(name);
        }
        Ok(unknown)
    }

    /// Sets the key `key` (`SECTION_KEY`) names, if it names one; false if it names none.
    fn set_from_env(&mut self, name: &str, key: &str, value: &str) -> Result<bool, ConfigError> {
        let Some((section, field)) = key.split_once('_') else {
            return Ok(false);
        };
        let (section, field) = (section.to_ascii_lowercase(), field.to_ascii_lowercase());
        if section == "route" {
            return Err(ConfigError::invalid(name, "routes are set in the file"));
        }
        if !ENV_SECTIONS.contains(&section.as_str()) {
            return Ok(false);
        }
        if section == "kafka" && !KAFKA_KEYS.contains(&field.as_str()) {
            if is_service_link(&key["KAFKA_".len()..]) {
                return Ok(true);
            }
            self.kafka
                .properties
                .insert(field.replace('_', "."), value.into());
            return Ok(true);
        }
        let mut whole =
            toml::Table::try_from(&*self).map_err(|e| ConfigError::invalid(name, e.to_string()))?;
        let Some(table) = whole.get_mut(&section).and_then(toml::Value::as_table_mut) else {
            return Ok(false);
        };
        let parsed = match table.get(&field) {
            Some(toml::Value::Integer(_)) => toml::Value::Integer(parse_env(name, value)?),
            Some(toml::Value::Float(_)) => toml::Value::Float(parse_env(name, value)?),
            Some(toml::Value::Boolean(_)) => toml::Value::Boolean(parse_env(name, value)?),
            Some(toml::Value::Array(_)) => {
                toml::Value::Array(split_list(value).into_iter().map(Into::into).collect())
            }
            Some(toml::Value::Table(_)) => {
                return Err(ConfigError::invalid(name, "a table is set in the file"));
            }
            // Unset optional keys are strings (secrets, paths, names); a key that is not one
            // is refused below by the sections' `deny_unknown_fields`.
            _ => toml::Value::String(value.into()),
        };
        table.insert(field, parsed);
        *self = whole.try_into().map_err(|e: toml::de::Error| {
            ConfigError::invalid(name, e.message().trim_end().to_string())
        })?;
        Ok(true)
    }

    /// `SECTION_KEY` for a bare `KEY` that is a key of one of the sections.
    fn section_of(&self, key: &str) -> Option<String> {
        let whole = toml::Table::try_from(self).ok()?;
        let field = key.to_ascii_lowercase();
        ENV_SECTIONS.iter().find_map(|section| {
            let table = whole.get(*section)?.as_table()?;
            let known = table.contains_key(&field) || OPTIONAL_KEYS.contains(&(section, &field));
            known.then(|| format!("{}_{key}", section.to_ascii_uppercase()))
        })
    }

    pub fn apply_overrides(&mut self, o: &Overrides) {
        if let Some(v) = &o.listen {
            self.server.listen = v.clone();
        }
        if let Some(v) = &o.admin_listen {
            self.server.admin_listen = v.clone();
        }
        if let Some(v) = &o.brokers {
            self.kafka.brokers = v.clone();
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        parse_addr("server.listen", &self.server.listen)?;
        parse_addr("server.admin_listen", &self.server.admin_listen)?;
        if self.server.name.is_empty() {
            return Err(ConfigError::invalid("server.name", "must not be empty"));
        }
        if self.server.max_connections == 0 || self.server.max_connections > 10_000_000 {
            return Err(ConfigError::invalid(
                "server.max_connections",
                "must be between 1 and 10000000",
            ));
        }
        if !(self.server.drain_seconds >= 0.0 && self.server.drain_seconds <= 3600.0) {
            return Err(ConfigError::invalid(
                "server.drain_seconds",
                "must be between 0 and 3600",
            ));
        }
        self.validate_edge()?;
        self.validate_websocket()?;
        self.validate_resume()?;
        self.validate_records()?;
        self.validate_kafka()?;
        self.validate_presence()?;
        for (i, a) in self.routes.iter().enumerate() {
            if self.routes[..i].iter().any(|b| b.topic == a.topic) {
                return Err(ConfigError::invalid(
                    format!("route[{i}].topic"),
                    format!("topic {:?} has two routes", a.topic),
                ));
            }
        }
        Ok(())
    }

    /// What bounds a connection before it has authenticated.
    fn validate_edge(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        if !(s.handshake_timeout_seconds >= 0.1 && s.handshake_timeout_seconds <= 300.0) {
            return Err(ConfigError::invalid(
                "server.handshake_timeout_seconds",
                "must be between 0.1 and 300",
            ));
        }
        // hyper reads at least 8 KiB at a time and cannot be bounded below that.
        if !(8192..=1024 * 1024).contains(&s.max_request_head_bytes) {
            return Err(ConfigError::invalid(
                "server.max_request_head_bytes",
                "must be between 8192 and 1048576",
            ));
        }
        if s.max_handshakes == 0 {
            return Err(ConfigError::invalid("server.max_handshakes", "must be > 0"));
        }
        Ok(())
    }

    fn validate_websocket(&self) -> Result<(), ConfigError> {
        let ws = &self.websocket;
        let positive = [
            ("websocket.heartbeat_seconds", ws.heartbeat_seconds as usize),
            (
                "websocket.idle_timeout_seconds",
                ws.idle_timeout_seconds as usize,
            ),
            ("websocket.max_message_bytes", ws.max_message_bytes),
            ("websocket.max_frame_bytes", ws.max_frame_bytes),
            ("websocket.write_buffer_bytes", ws.write_buffer_bytes),
            ("websocket.queue_frames", ws.queue_frames),
            ("websocket.queue_bytes", ws.queue_bytes),
            (
                "websocket.max_rooms_per_connection",
                ws.max_rooms_per_connection,
            ),
            (
                "websocket.client_messages_per_second",
                ws.client_messages_per_second as usize,
            ),
            ("websocket.client_burst", ws.client_burst as usize),
            (
                "websocket.room_changes_per_second",
                ws.room_changes_per_second as usize,
            ),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(ConfigError::invalid(key, "must be > 0"));
            }
        }
        // A full subscribe must always pass from a full bucket.
        if (ws.room_changes_burst as usize) < ws.max_rooms_per_connection {
            return Err(ConfigError::invalid(
                "websocket.room_changes_burst",
                "must be at least websocket.max_rooms_per_connection",
            ));
        }
        // Below 64 bytes a read would not hold a frame's header and a little of its payload.
        if ws.read_buffer_bytes < 64 {
            return Err(ConfigError::invalid(
                "websocket.read_buffer_bytes",
                format!("must be between 64 and {}", u32::MAX),
            ));
        }
        if ws.max_frame_bytes > ws.max_message_bytes {
            return Err(ConfigError::invalid(
                "websocket.max_frame_bytes",
                "must not exceed websocket.max_message_bytes",
            ));
        }
        // Deadlines are instants on the runtime's clock: an unbounded one would overflow it.
        if ws.heartbeat_seconds > 3600 {
            return Err(ConfigError::invalid(
                "websocket.heartbeat_seconds",
                "must be between 1 and 3600",
            ));
        }
        if ws.idle_timeout_seconds > 86_400 {
            return Err(ConfigError::invalid(
                "websocket.idle_timeout_seconds",
                "must be between 2 and 86400",
            ));
        }
        if ws.idle_timeout_seconds <= ws.heartbeat_seconds {
            return Err(ConfigError::invalid(
                "websocket.idle_timeout_seconds",
                "must be longer than websocket.heartbeat_seconds",
            ));
        }
        if ws.shed_low_priority_after > ws.queue_frames {
            return Err(ConfigError::invalid(
                "websocket.shed_low_priority_after",
                "must not exceed websocket.queue_frames",
            ));
        }
        Ok(())
    }

    fn validate_resume(&self) -> Result<(), ConfigError> {
        let r = &self.resume;
        if r.kafka_concurrency == 0 {
            return Err(ConfigError::invalid(
                "resume.kafka_concurrency",
                "must be > 0",
            ));
        }
        // Both are subtracted from the wall clock in milliseconds, which they must not pass.
        if r.buffer_max_age_seconds > 604_800 {
            return Err(ConfigError::invalid(
                "resume.buffer_max_age_seconds",
                "must be at most 604800 (a week)",
            ));
        }
        if r.max_age_seconds > 31_536_000 {
            return Err(ConfigError::invalid(
                "resume.max_age_seconds",
                "must be at most 31536000 (a year)",
            ));
        }
        if r.max_replay_records <= 0 {
            return Err(ConfigError::invalid(
                "resume.max_replay_records",
                "must be > 0",
            ));
        }
        if !(r.positions_interval_seconds >= 0.05 && r.positions_interval_seconds <= 3600.0) {
            return Err(ConfigError::invalid(
                "resume.positions_interval_seconds",
                "must be between 0.05 and 3600",
            ));
        }
        Ok(())
    }

    fn validate_records(&self) -> Result<(), ConfigError> {
        let r = &self.records;
        for (key, value) in [
            ("records.max_bytes", r.max_bytes),
            ("records.max_rooms", r.max_rooms),
            ("records.max_depth", r.max_depth),
        ] {
            if value == 0 {
                return Err(ConfigError::invalid(key, "must be > 0"));
            }
        }
        if r.max_bytes > self.websocket.queue_bytes {
            return Err(ConfigError::invalid(
                "records.max_bytes",
                "must not exceed websocket.queue_bytes: a larger frame closes every recipient",
            ));
        }
        Ok(())
    }

    fn validate_kafka(&self) -> Result<(), ConfigError> {
        let k = &self.kafka;
        if k.brokers.trim().is_empty() {
            return Err(ConfigError::invalid("kafka.brokers", "must not be empty"));
        }
        if !(1..=3600).contains(&k.metadata_refresh_seconds) {
            return Err(ConfigError::invalid(
                "kafka.metadata_refresh_seconds",
                "must be between 1 and 3600",
            ));
        }
        for reserved in ["bootstrap.servers", "group.id", "enable.auto.offset.store"] {
            if k.properties.contains_key(reserved) {
                return Err(ConfigError::invalid(
                    format!("kafka.{reserved}"),
                    "is set by roomcast itself (use kafka.brokers / kafka.group_prefix)",
                ));
            }
        }
        Ok(())
    }

    /// Checked even when presence is off, so that turning it on never meets a bad value.
    fn validate_presence(&self) -> Result<(), ConfigError> {
        let p = &self.presence;
        if p.topic.trim().is_empty() {
            return Err(ConfigError::invalid("presence.topic", "must not be empty"));
        }
        if self.routes.iter().any(|r| r.topic == p.topic) {
            return Err(ConfigError::invalid(
                "presence.topic",
                format!("{:?} is also a route's topic", p.topic),
            ));
        }
        let within = |key: &str, value: f64, low: f64, high: f64| {
            if value >= low && value <= high {
                Ok(())
            } else {
                Err(ConfigError::invalid(
                    key,
                    format!("must be between {low} and {high}"),
                ))
            }
        };
        within("presence.interval_seconds", p.interval_seconds, 0.01, 60.0)?;
        within("presence.renew_seconds", p.renew_seconds, 0.1, 3600.0)?;
        within(
            "presence.snapshot_seconds",
            p.snapshot_seconds,
            1.0,
            86_400.0,
        )?;
        within("presence.expiry_seconds", p.expiry_seconds, 1.0, 86_400.0)?;
        if p.renew_seconds < p.interval_seconds {
            return Err(ConfigError::invalid(
                "presence.renew_seconds",
                "must be at least presence.interval_seconds",
            ));
        }
        // A lease renewed only just before it runs out would expire on any delay.
        if p.expiry_seconds < 2.0 * p.renew_seconds {
            return Err(ConfigError::invalid(
                "presence.expiry_seconds",
                "must be at least twice presence.renew_seconds",
            ));
        }
        if !(MIN_PRESENCE_RECORD_BYTES..=16 * 1024 * 1024).contains(&p.max_record_bytes) {
            return Err(ConfigError::invalid(
                "presence.max_record_bytes",
                format!("must be between {MIN_PRESENCE_RECORD_BYTES} and 16777216"),
            ));
        }
        if !(1..=1_000_000).contains(&p.max_query_users) {
            return Err(ConfigError::invalid(
                "presence.max_query_users",
                "must be between 1 and 1000000",
            ));
        }
        if p.status_room.replace("{tenant}", "").contains(['{', '}']) {
            return Err(ConfigError::invalid(
                "presence.status_room",
                "may hold no placeholder but {tenant}",
            ));
        }
        Ok(())
    }

    /// The effective configuration as TOML, with every secret replaced.
    pub fn redacted_toml(&self) -> String {
        let mut shown = self.clone();
        if shown.auth.secret.is_some() {
            shown.auth.secret = Some("<hidden>".into());
        }
        for (key, value) in shown.kafka.properties.iter_mut() {
            if is_secret_property(key) {
                *value = "<hidden>".into();
            }
        }
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

/// This replica's default name: `$HOSTNAME` (a pod's name in Kubernetes), else the host's
/// name, which a shell does not always export.
fn host_name() -> String {
    if let Ok(name) = std::env::var("HOSTNAME") {
        if !name.is_empty() {
            return name;
        }
    }
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; the name is NUL-terminated within it.
    let done = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let len = buf.iter().position(|&b| b == 0).unwrap_or(0);
    match std::str::from_utf8(&buf[..len]) {
        Ok(name) if done && !name.is_empty() => name.to_string(),
        _ => "roomcast".into(),
    }
}

/// The sections a `ROOMCAST_<SECTION>_<KEY>` variable may set.
const ENV_SECTIONS: [&str; 8] = [
    "server",
    "websocket",
    "kafka",
    "auth",
    "resume",
    "records",
    "presence",
    "log",
];

/// The least `presence.max_record_bytes`: one count of the longest room and user always fits.
const MIN_PRESENCE_RECORD_BYTES: usize = 64 * 1024;

/// The keys of `[kafka]` that are roomcast's own; any other name is librdkafka's.
const KAFKA_KEYS: [&str; 3] = ["brokers", "group_prefix", "metadata_refresh_seconds"];

/// Keys left out of a serialized default configuration because they are unset.
const OPTIONAL_KEYS: [(&str, &str); 4] = [
    ("auth", "secret"),
    ("auth", "public_key_file"),
    ("auth", "audience"),
    ("auth", "issuer"),
];

/// Short names kept from earlier versions, and the `SECTION_KEY` each stands for.
const ALIASES: [(&str, &str); 14] = [
    ("LISTEN", "SERVER_LISTEN"),
    ("ADMIN_LISTEN", "SERVER_ADMIN_LISTEN"),
    ("ALLOWED_ORIGINS", "SERVER_ALLOWED_ORIGINS"),
    ("MAX_CONNECTIONS", "SERVER_MAX_CONNECTIONS"),
    ("DRAIN_SECONDS", "SERVER_DRAIN_SECONDS"),
    ("TRUSTED_PROXIES", "SERVER_TRUSTED_PROXIES"),
    (
        "MAX_CONNECTIONS_PER_USER",
        "SERVER_MAX_CONNECTIONS_PER_USER",
    ),
    (
        "MAX_CONNECTIONS_PER_ADDRESS",
        "SERVER_MAX_CONNECTIONS_PER_ADDRESS",
    ),
    ("JWT_SECRET", "AUTH_SECRET"),
    ("JWT_PUBLIC_KEY_FILE", "AUTH_PUBLIC_KEY_FILE"),
    ("JWT_ALGORITHM", "AUTH_ALGORITHM"),
    ("JWT_AUDIENCE", "AUTH_AUDIENCE"),
    ("JWT_ISSUER", "AUTH_ISSUER"),
    ("LOG", "LOG_LEVEL"),
];

/// Kubernetes injects `<SERVICE>_SERVICE_HOST`, `<SERVICE>_SERVICE_PORT[_<NAME>]`,
/// `<SERVICE>_PORT` and `<SERVICE>_PORT_<N>_<PROTO>[_ADDR|_PORT|_PROTO]` for every Service in
/// the namespace (unless `enableServiceLinks: false`): those of a Service called `roomcast`,
/// `roomcast-auth` or `roomcast-kafka-bootstrap` must neither set nor refuse anything.
/// `name` is what follows `ROOMCAST_`.
fn is_service_link(name: &str) -> bool {
    let parts: Vec<&str> = name.split('_').collect();
    parts.iter().enumerate().any(|(i, part)| {
        let rest = &parts[i + 1..];
        match *part {
            "SERVICE" => matches!(rest, ["HOST"]) || rest.first() == Some(&"PORT"),
            "PORT" => match rest {
                [] => true,
                [n, proto, tail @ ..] => {
                    n.bytes().all(|b| b.is_ascii_digit())
                        && matches!(*proto, "TCP" | "UDP" | "SCTP")
                        && matches!(tail, [] | ["ADDR"] | ["PORT"] | ["PROTO"])
                }
                _ => false,
            },
            _ => false,
        }
    })
}

fn is_secret_property(key: &str) -> bool {
    ["password", "secret", "key.pem", "token"]
        .iter()
        .any(|s| key.contains(s))
}

fn split_list(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

fn parse_env<T: std::str::FromStr>(name: &str, value: &str) -> Result<T, ConfigError> {
    value
        .parse()
        .map_err(|_| ConfigError::invalid(name, format!("cannot parse {value:?}")))
}

pub fn parse_addr(key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value
        .parse()
        .map_err(|_| ConfigError::invalid(key, format!("{value:?} is not a host:port address")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hs_config() -> Config {
        let mut c = Config::default();
        c.auth.secret = Some("s3cret-s3cret-s3cret".into());
        c.routes = default_routes();
        c
    }

    #[test]
    fn kafka_properties_pass_through_and_env_maps_underscores() {
        let mut c =
            Config::from_toml("[kafka]\nbrokers = \"b:1\"\n\"security.protocol\" = \"SASL_SSL\"\n")
                .unwrap();
        c.apply_env([("ROOMCAST_KAFKA_SASL_PASSWORD".to_string(), "pw".to_string())].into_iter())
            .unwrap();
        assert_eq!(c.kafka.brokers, "b:1");
        assert_eq!(c.kafka.properties["security.protocol"], "SASL_SSL");
        assert_eq!(c.kafka.properties["sasl.password"], "pw");
    }

    #[test]
    fn invalid_values_name_their_key() {
        let mut c = hs_config();
        c.server.listen = "nowhere".into();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("server.listen:"));

        let err = Config::from_toml("[server]\nlisten_typo = \"x\"\n").unwrap_err();
        assert!(err.contains("listen_typo"), "{err}");
    }

    #[test]
    fn env_errors_name_the_variable() {
        let mut c = hs_config();
        let err = c
            .apply_env([("ROOMCAST_MAX_CONNECTIONS".into(), "many".into())].into_iter())
            .unwrap_err();
        assert!(err.to_string().starts_with("ROOMCAST_MAX_CONNECTIONS:"));
    }

    fn env(c: &mut Config, vars: &[(&str, &str)]) -> Result<Vec<String>, String> {
        let vars = vars.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        c.apply_env(vars).map_err(|e| e.to_string())
    }

    #[test]
    fn every_key_has_an_environment_name_by_one_rule() {
        let mut c = hs_config();
        let ignored = env(
            &mut c,
            &[
                ("ROOMCAST_WEBSOCKET_HEARTBEAT_SECONDS", "7"),
                ("ROOMCAST_WEBSOCKET_IDLE_TIMEOUT_SECONDS", "30"),
                ("ROOMCAST_WEBSOCKET_QUEUE_FRAMES", "99"),
                ("ROOMCAST_RESUME_POSITIONS_INTERVAL_SECONDS", "0.5"),
                (
                    "ROOMCAST_SERVER_ALLOWED_ORIGINS",
                    "https://a.example, https://b.example",
                ),
                ("ROOMCAST_KAFKA_METADATA_REFRESH_SECONDS", "3"),
                ("ROOMCAST_LOG_LEVEL", "debug"),
                ("ROOMCAST_LOG_FORMAT", "json"),
                ("ROOMCAST_AUTH_ALGORITHM", "HS512"),
                ("ROOMCAST_AUTH_ISSUER", "issuer.example"),
            ],
        )
        .unwrap();
        assert!(ignored.is_empty(), "{ignored:?}");
        assert_eq!(c.websocket.heartbeat_seconds, 7);
        assert_eq!(c.websocket.idle_timeout_seconds, 30);
        assert_eq!(c.websocket.queue_frames, 99);
        assert_eq!(c.resume.positions_interval_seconds, 0.5);
        assert_eq!(
            c.server.allowed_origins,
            ["https://a.example", "https://b.example"]
        );
        assert_eq!(c.kafka.metadata_refresh_seconds, 3);
        assert!(c.kafka.properties.is_empty(), "{:?}", c.kafka.properties);
        assert_eq!(
            (c.log.level.as_str(), c.log.format),
            ("debug", LogFormat::Json)
        );
        assert_eq!(c.auth.algorithm, Algorithm::HS512);
        assert_eq!(c.auth.issuer.as_deref(), Some("issuer.example"));
    }

    #[test]
    fn the_short_names_of_earlier_versions_still_work() {
        let mut c = hs_config();
        env(
            &mut c,
            &[
                ("ROOMCAST_LISTEN", "127.0.0.1:1"),
                ("ROOMCAST_MAX_CONNECTIONS", "5"),
                ("ROOMCAST_JWT_SECRET", "another-secret-0123456789"),
                ("ROOMCAST_LOG", "warn"),
            ],
        )
        .unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:1");
        assert_eq!(c.server.max_connections, 5);
        assert_eq!(c.auth.secret.as_deref(), Some("another-secret-0123456789"));
        assert_eq!(c.log.level, "warn");
    }

    #[test]
    fn a_variable_meant_as_a_setting_that_sets_nothing_is_refused() {
        let cases = [
            (
                "ROOMCAST_HEARTBEAT_SECONDS",
                "ROOMCAST_HEARTBEAT_SECONDS: not a setting; did you mean \
                 ROOMCAST_WEBSOCKET_HEARTBEAT_SECONDS?",
            ),
            (
                "ROOMCAST_WEBSOCKET_HEARTBEAT",
                "ROOMCAST_WEBSOCKET_HEARTBEAT: unknown field `heartbeat`",
            ),
            (
                "ROOMCAST_ROUTE_TOPIC",
                "ROOMCAST_ROUTE_TOPIC: routes are set in the file",
            ),
        ];
        for (name, message) in cases {
            let err = env(&mut hs_config(), &[(name, "1")]).unwrap_err();
            assert!(err.starts_with(message), "{err}");
        }
        let err = env(
            &mut hs_config(),
            &[("ROOMCAST_WEBSOCKET_QUEUE_FRAMES", "x")],
        );
        assert_eq!(
            err.unwrap_err(),
            "ROOMCAST_WEBSOCKET_QUEUE_FRAMES: cannot parse \"x\""
        );
    }

    #[test]
    fn other_unknown_variables_are_reported_and_service_links_left_alone() {
        let mut c = hs_config();
        let ignored = env(
            &mut c,
            &[
                ("ROOMCAST_COLOUR", "blue"),
                ("ROOMCAST_PORT", "tcp://10.0.0.1:8080"),
                ("ROOMCAST_SERVICE_HOST", "10.0.0.1"),
                ("ROOMCAST_KAFKA_PORT_9092_TCP", "tcp://10.0.0.2:9092"),
                ("ROOMCAST_TEST_BROKERS", "127.0.0.1:9092"),
            ],
        )
        .unwrap();
        assert_eq!(ignored, ["ROOMCAST_COLOUR"]);
        assert!(c.kafka.properties.is_empty(), "{:?}", c.kafka.properties);
    }

    /// Services named `roomcast-auth`, `roomcast-server`, `roomcast-kafka-bootstrap`, ...
    /// bring variables that look like settings; none of them may set or refuse anything.
    #[test]
    fn kubernetes_service_links_of_any_service_are_left_alone() {
        let mut c = hs_config();
        let before = c.redacted_toml();
        let links = [
            "ROOMCAST_AUTH_SERVICE_HOST",
            "ROOMCAST_AUTH_SERVICE_PORT",
            "ROOMCAST_AUTH_SERVICE_PORT_HTTP",
            "ROOMCAST_SERVER_PORT",
            "ROOMCAST_LOG_PORT_80_TCP",
            "ROOMCAST_WEBSOCKET_PORT_8080_TCP_ADDR",
            "ROOMCAST_RESUME_PORT_53_UDP_PROTO",
            "ROOMCAST_KAFKA_BOOTSTRAP_PORT",
            "ROOMCAST_KAFKA_BOOTSTRAP_PORT_9092_TCP_PORT",
            "ROOMCAST_KAFKA_UI_SERVICE_HOST",
            "ROOMCAST_ADMIN_SERVICE_PORT",
        ];
        let vars: Vec<(&str, &str)> = links.iter().map(|l| (*l, "tcp://10.0.0.5:9092")).collect();
        assert_eq!(env(&mut c, &vars).unwrap(), Vec::<String>::new());
        assert_eq!(c.redacted_toml(), before);
        // A setting that merely mentions a port is still a setting.
        let err = env(&mut hs_config(), &[("ROOMCAST_SERVER_PORTS", "1")]).unwrap_err();
        assert!(err.contains("unknown field `ports`"), "{err}");
    }

    #[test]
    fn a_setting_given_by_its_short_and_its_full_name_is_refused() {
        let err = env(
            &mut hs_config(),
            &[
                ("ROOMCAST_JWT_SECRET", "one-secret-0123456789"),
                ("ROOMCAST_AUTH_SECRET", "two-secret-0123456789"),
            ],
        )
        .unwrap_err();
        assert_eq!(err, "ROOMCAST_AUTH_SECRET: also set as ROOMCAST_JWT_SECRET");
    }

    /// The README's table names each key's variable: every one of them sets its key.
    #[test]
    fn every_variable_the_readme_names_sets_its_key() {
        let readme = include_str!("../README.md");
        let defaults = toml::Table::try_from(hs_config()).unwrap();
        let mut named = 0;
        for row in readme.lines().filter(|l| l.starts_with("| `")) {
            let cells: Vec<&str> = row.split(" | ").collect();
            let (Some(key), Some(var)) = (cells[0].strip_prefix("| `"), cells.get(1)) else {
                continue;
            };
            let Some((section, field)) = key.split('`').next().unwrap().split_once('.') else {
                continue;
            };
            let Some(var) = var.strip_prefix('`').and_then(|v| v.split('`').next()) else {
                continue;
            };
            if field.starts_with('"') || !var.starts_with("ROOMCAST_") {
                continue;
            }
            let value = match defaults[section].get(field) {
                Some(toml::Value::String(s)) => s.clone(),
                Some(toml::Value::Array(_)) | None => "x.example".into(),
                Some(other) => other.to_string(),
            };
            let mut c = hs_config();
            let ignored = env(&mut c, &[(var, &value)]).unwrap_or_else(|e| panic!("{e}"));
            assert!(ignored.is_empty(), "{var} set nothing");
            named += 1;
        }
        assert!(named >= 40, "only {named} variables found in the README");
    }

    #[test]
    fn redaction_hides_secrets() {
        let mut c = hs_config();
        c.kafka
            .properties
            .insert("sasl.password".into(), "hunter2".into());
        let shown = c.redacted_toml();
        assert!(!shown.contains("hunter2"));
        assert!(!shown.contains("s3cret"));
        assert!(shown.contains("<hidden>"));
    }

    #[test]
    fn records_bounds_come_from_file_and_env_and_reach_every_route() {
        let mut c = Config::from_toml("[records]\nmax_bytes = 2048\nmax_depth = 8\n").unwrap();
        let vars = [
            ("ROOMCAST_RECORDS_MAX_ROOMS", "12"),
            ("ROOMCAST_RECORDS_MAX_DEPTH", "9"),
        ];
        c.apply_env(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .unwrap();
        let expected = RecordsConfig {
            max_bytes: 2048,
            max_rooms: 12,
            max_depth: 9,
        };
        assert_eq!(c.records, expected);
        let err = c
            .apply_env([("ROOMCAST_RECORDS_MAX_BYTES".into(), "big".into())].into_iter())
            .unwrap_err();
        assert!(err.to_string().starts_with("ROOMCAST_RECORDS_MAX_BYTES:"));
        let path =
            std::env::temp_dir().join(format!("roomcast-records-{}.toml", std::process::id()));
        std::fs::write(&path, "[records]\nmax_rooms = 7\n").unwrap();
        let assembled = Config::assemble(Some(&path), &Overrides::default());
        std::fs::remove_file(&path).unwrap();
        let assembled = assembled.unwrap();
        assert_eq!(assembled.routes.len(), 2);
        assert!(assembled.routes.iter().all(|r| r.limits.max_rooms == 7));
    }

    #[test]
    fn records_max_bytes_may_not_exceed_the_queue() {
        let mut c = hs_config();
        assert_eq!(c.records.max_bytes, 1024 * 1024);
        c.records.max_bytes = c.websocket.queue_bytes;
        assert!(c.validate().is_ok());
        c.records.max_bytes = c.websocket.queue_bytes + 1;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.starts_with("records.max_bytes:"), "{err}");
        for key in ["max_bytes", "max_rooms", "max_depth"] {
            let mut c = hs_config();
            match key {
                "max_bytes" => c.records.max_bytes = 0,
                "max_rooms" => c.records.max_rooms = 0,
                _ => c.records.max_depth = 0,
            }
            let err = c.validate().unwrap_err().to_string();
            assert!(err.starts_with(&format!("records.{key}:")), "{err}");
        }
    }

    #[test]
    fn tenant_optional_is_off_unless_a_route_says_so() {
        let c = Config::from_toml(
            "[[route]]\ntopic = \"a\"\nevent = \"e\"\nrooms = [\"r\"]\ntenant = \"{t}\"\n\n\
             [[route]]\ntopic = \"b\"\nevent = \"e\"\nrooms = [\"r\"]\ntenant = \"{t}\"\ntenant_optional = true\n",
        )
        .unwrap();
        assert!(!c.routes[0].tenant_optional);
        assert!(c.routes[1].tenant_optional);
        assert!(default_routes().iter().all(|r| !r.tenant_optional));
    }

    fn refusal(c: &Config) -> String {
        c.validate().unwrap_err().to_string()
    }

    #[test]
    fn the_read_buffer_is_refused_below_64_bytes_not_raised_to_it() {
        let mut c = hs_config();
        c.websocket.read_buffer_bytes = 64;
        assert!(c.validate().is_ok());
        c.websocket.read_buffer_bytes = 63;
        assert_eq!(
            refusal(&c),
            "websocket.read_buffer_bytes: must be between 64 and 4294967295"
        );
        let err = Config::from_toml("[websocket]\nread_buffer_bytes = 4294967296\n").unwrap_err();
        assert!(err.contains("read_buffer_bytes"), "{err}");
    }

    #[test]
    fn the_write_buffer_is_refused_at_zero_not_raised_to_one() {
        let mut c = hs_config();
        c.websocket.write_buffer_bytes = 1;
        assert!(c.validate().is_ok());
        c.websocket.write_buffer_bytes = 0;
        assert_eq!(refusal(&c), "websocket.write_buffer_bytes: must be > 0");
    }

    #[test]
    fn the_metadata_refresh_is_refused_outside_one_second_to_an_hour() {
        for ok in [1, 3600] {
            let mut c = hs_config();
            c.kafka.metadata_refresh_seconds = ok;
            assert!(c.validate().is_ok(), "{ok}");
        }
        for bad in [0, 3601, u64::MAX] {
            let mut c = hs_config();
            c.kafka.metadata_refresh_seconds = bad;
            assert_eq!(
                refusal(&c),
                "kafka.metadata_refresh_seconds: must be between 1 and 3600",
                "{bad}"
            );
        }
    }

    #[test]
    fn durations_that_would_overflow_a_clock_are_refused() {
        type Set = fn(&mut Config, u64);
        let cases: [(Set, u64, &str); 4] = [
            (
                |c, v| c.websocket.heartbeat_seconds = v,
                3600,
                "websocket.heartbeat_seconds: must be between 1 and 3600",
            ),
            (
                |c, v| c.websocket.idle_timeout_seconds = v,
                86_400,
                "websocket.idle_timeout_seconds: must be between 2 and 86400",
            ),
            (
                |c, v| c.resume.buffer_max_age_seconds = v,
                604_800,
                "resume.buffer_max_age_seconds: must be at most 604800 (a week)",
            ),
            (
                |c, v| c.resume.max_age_seconds = v,
                31_536_000,
                "resume.max_age_seconds: must be at most 31536000 (a year)",
            ),
        ];
        for (set, max, message) in cases {
            let mut c = hs_config();
            set(&mut c, max);
            c.websocket.idle_timeout_seconds = c.websocket.idle_timeout_seconds.max(3601);
            assert!(c.validate().is_ok(), "{message} at {max}");
            for bad in [max + 1, u64::MAX] {
                let mut c = hs_config();
                set(&mut c, bad);
                assert_eq!(refusal(&c), message, "{bad}");
            }
        }
    }

    #[test]
    fn a_frame_may_not_be_larger_than_a_message() {
        let mut c = hs_config();
        c.websocket.max_frame_bytes = c.websocket.max_message_bytes;
        assert!(c.validate().is_ok());
        c.websocket.max_frame_bytes = c.websocket.max_message_bytes + 1;
        assert_eq!(
            refusal(&c),
            "websocket.max_frame_bytes: must not exceed websocket.max_message_bytes"
        );
    }

    #[test]
    fn the_send_buffer_past_what_the_socket_takes_is_refused_when_read() {
        let c = Config::from_toml("[websocket]\nsend_buffer_bytes = 4294967295\n").unwrap();
        assert_eq!(c.websocket.send_buffer_bytes, u32::MAX);
        let err = Config::from_toml("[websocket]\nsend_buffer_bytes = 4294967296\n").unwrap_err();
        assert!(err.contains("send_buffer_bytes"), "{err}");
    }

    /// Building is `setup.rs`'s: a configuration that imported what it configures would
    /// bring back the circles (config <-> auth, route, kafka, proxy) this module left.
    #[test]
    fn the_configuration_imports_nothing_else_of_the_crate() {
        let source = include_str!("config.rs");
        let code = &source[..source.find("#[cfg(test)]").unwrap()];
        for word in ["crate::", "super::", "roomcast::"] {
            assert!(!code.contains(word), "config.rs uses {word}");
        }
    }

    #[test]
    fn presence_is_off_by_default_and_set_from_the_environment() {
        let mut c = hs_config();
        assert!(!c.presence.enabled);
        env(
            &mut c,
            &[
                ("ROOMCAST_PRESENCE_ENABLED", "true"),
                ("ROOMCAST_PRESENCE_TOPIC", "p1"),
                ("ROOMCAST_PRESENCE_EXPIRY_SECONDS", "5"),
            ],
        )
        .unwrap();
        assert!(c.presence.enabled);
        assert_eq!(c.presence.topic, "p1");
        assert_eq!(c.presence.expiry_seconds, 5.0);
        c.validate().unwrap();
    }

    #[test]
    fn a_room_change_burst_below_the_room_limit_is_refused() {
        let mut c = hs_config();
        c.websocket.room_changes_burst = 255;
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "websocket.room_changes_burst: must be at least websocket.max_rooms_per_connection"
        );
        c.websocket.room_changes_burst = 256;
        c.validate().unwrap();
    }

    #[test]
    fn presence_refusals_name_their_key() {
        let refused = |change: fn(&mut PresenceConfig)| {
            let mut c = hs_config();
            change(&mut c.presence);
            c.validate().unwrap_err().to_string()
        };
        assert_eq!(
            refused(|p| p.topic = " ".into()),
            "presence.topic: must not be empty"
        );
        assert_eq!(
            refused(|p| p.topic = "entity-updates".into()),
            "presence.topic: \"entity-updates\" is also a route's topic"
        );
        assert_eq!(
            refused(|p| p.interval_seconds = 0.0),
            "presence.interval_seconds: must be between 0.01 and 60"
        );
        assert_eq!(
            refused(|p| p.renew_seconds = 0.1),
            "presence.renew_seconds: must be at least presence.interval_seconds"
        );
        assert_eq!(
            refused(|p| p.expiry_seconds = 3.0),
            "presence.expiry_seconds: must be at least twice presence.renew_seconds"
        );
        assert_eq!(
            refused(|p| p.max_record_bytes = 1000),
            "presence.max_record_bytes: must be between 65536 and 16777216"
        );
        assert_eq!(
            refused(|p| p.status_room = "org:{tenant}:{user}".into()),
            "presence.status_room: may hold no placeholder but {tenant}"
        );
    }

    #[test]
    fn the_status_room_is_the_tenants_and_none_without_one() {
        let mut p = PresenceConfig::default();
        assert_eq!(
            p.status_room_of(Some("acme")).as_deref(),
            Some("tenant:acme")
        );
        assert_eq!(p.status_room_of(None), None);
        p.status_room = String::new();
        assert_eq!(p.status_room_of(Some("acme")), None);
    }
}
