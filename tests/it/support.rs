//! Test bed: a real Kafka broker (started by scripts/kafka.sh, address in
//! ROOMCAST_TEST_BROKERS), the real `roomcast` binary, and real WebSocket clients.
//! Every test makes its own topics, tokens and server, so tests never share state.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use roomcast::auth::{now_secs, sign_hs256, Claims};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const SECRET: &str = "integration-test-secret-0123456789";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("it-{prefix}-{}-{n}-{nanos}", std::process::id())
}

pub fn brokers() -> String {
    std::env::var("ROOMCAST_TEST_BROKERS").expect(
        "ROOMCAST_TEST_BROKERS is not set: run the tests through scripts/test, \
         or start a broker with scripts/kafka.sh start and export its address",
    )
}

fn admin() -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("admin client")
}

pub async fn create_topic(name: &str, partitions: i32) {
    let admin = admin();
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(20)));
    let results = admin
        .create_topics([&topic], &opts)
        .await
        .expect("create topics");
    for r in results {
        r.expect("topic created");
    }
}

pub async fn delete_topic(name: &str) {
    let admin = admin();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(20)));
    for r in admin
        .delete_topics(&[name], &opts)
        .await
        .expect("delete topics")
    {
        r.expect("topic deleted");
    }
}

/// Creates a topic; false if the broker refused (e.g. it is still being deleted).
pub async fn try_create_topic(name: &str, partitions: i32) -> bool {
    let admin = admin();
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(20)));
    match admin.create_topics([&topic], &opts).await {
        Ok(results) => results.iter().all(|r| r.is_ok()),
        Err(_) => false,
    }
}

pub struct Producer(FutureProducer);

impl Producer {
    pub fn new() -> Producer {
        let p = ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .set("linger.ms", "0")
            .set("enable.idempotence", "true")
            .create()
            .expect("producer");
        Producer(p)
    }

    pub async fn send(&self, topic: &str, value: &[u8]) {
        self.send_to(topic, None, value, &[]).await
    }

    pub async fn send_json(&self, topic: &str, value: Value) {
        self.send(topic, value.to_string().as_bytes()).await
    }

    pub async fn send_to(
        &self,
        topic: &str,
        partition: Option<i32>,
        value: &[u8],
        headers: &[(&str, &str)],
    ) {
        let mut hs = OwnedHeaders::new();
        for (k, v) in headers {
            hs = hs.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        let mut record = FutureRecord::<(), [u8]>::to(topic)
            .payload(value)
            .headers(hs);
        if let Some(p) = partition {
            record = record.partition(p);
        }
        self.0
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)
            .expect("record produced");
    }
}

/// A token for `sub` with the given room grants, valid for an hour.
pub fn token(sub: &str, rooms: &[&str]) -> String {
    token_with(Claims {
        sub: sub.into(),
        exp: now_secs() + 3600,
        rooms: rooms.iter().map(|r| r.to_string()).collect(),
        ..Claims::default()
    })
}

pub fn token_with(claims: Claims) -> String {
    sign_hs256(SECRET, &claims)
}

/// The two default routes' formats, on this test's own topics.
pub fn entity_route(topic: &str) -> String {
    format!(
        r#"
[[route]]
topic = "{topic}"
event = "{{feature}}.{{entity}}.{{action}}"
rooms = ["feature:{{feature}}", "feature:{{feature}}:entity:{{entity}}", "{{entity}}:{{data.id}}"]
priority = "{{meta.priority}}"
tenant = "{{meta.tenantId}}"
"#
    )
}

/// The entity route with `tenant_optional = true`: for tests that send records naming no
/// tenant to connections without one (the default route would skip them as `no_tenant`).
pub fn tenantless_entity_route(topic: &str) -> String {
    format!("{}tenant_optional = true\n", entity_route(topic))
}

pub fn task_route(topic: &str) -> String {
    format!(
        r#"
[[route]]
topic = "{topic}"
event = "task:update"
rooms = ["user:{{userId}}", "task:{{taskId}}"]
"#
    )
}

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_roomcast"))
}

/// A running `roomcast serve` with its own config.
pub struct Server {
    child: Child,
    pub public: String,
    pub admin: String,
    /// Every line the binary logged, as it logged it.
    log: Arc<Mutex<Vec<String>>>,
    _dir: Option<TempDir>,
}

impl Server {
    /// Starts the binary with `routes` plus `extra` TOML, and waits until it is ready.
    pub async fn start(routes: &str, extra: &str) -> Server {
        Server::start_with(routes, extra, &[]).await
    }

    /// Like `start`, with extra environment variables for the process.
    pub async fn start_with(routes: &str, extra: &str, env: &[(&str, &str)]) -> Server {
        Server::start_keys(routes, "", extra, env).await
    }

    /// Like `start_with`, with `server_keys` added to the `[server]` table.
    pub async fn start_keys(
        routes: &str,
        server_keys: &str,
        extra: &str,
        env: &[(&str, &str)],
    ) -> Server {
        let server = Server::launch(routes, server_keys, extra, env);
        server.wait_ready().await;
        server
    }

    /// Like `start_keys`, returning as soon as the binary listens: the replica may still be
    /// discovering its partitions and reading them up to their head.
    pub fn launch(routes: &str, server_keys: &str, extra: &str, env: &[(&str, &str)]) -> Server {
        let dir = TempDir::new();
        let config = format!(
            r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
name = "{name}"
drain_seconds = 1.0
{server_keys}

[kafka]
brokers = "{brokers}"
metadata_refresh_seconds = 1

[auth]
secret = "{SECRET}"

[auth.perms]
"users:read" = ["feature:users", "feature:users:**"]
{extra}
{routes}
"#,
            name = unique("server"),
            brokers = brokers(),
        );
        let path = dir.0.join("roomcast.toml");
        std::fs::write(&path, config).unwrap();
        let mut server = Server::spawn(&path, env);
        server._dir = Some(dir);
        server
    }

    /// Starts the binary on a config file without waiting for readiness.
    pub fn spawn(config: &std::path::Path, env: &[(&str, &str)]) -> Server {
        let mut child = Command::new(binary())
            .arg("serve")
            .arg("--config")
            .arg(config)
            .env("ROOMCAST_LOG_FORMAT", "json")
            .env(
                "ROOMCAST_LOG",
                std::env::var("IT_ROOMCAST_LOG").unwrap_or("info,rdkafka=warn".into()),
            )
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("roomcast starts");
        let log = Arc::default();
        let (public, admin) = listening_addrs(&mut child, &log);
        Server {
            child,
            public,
            admin,
            log,
            _dir: None,
        }
    }

    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = http_get(&self.admin, "/readyz").await {
                return;
            }
            assert!(Instant::now() < deadline, "server never became ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The logged JSON lines whose `message` is `message`.
    pub fn logged(&self, message: &str) -> Vec<Value> {
        let log = self.log.lock().unwrap();
        log.iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["message"] == message)
            .collect()
    }

    pub async fn metrics(&self) -> String {
        http_get(&self.admin, "/metrics").await.expect("metrics").1
    }

    /// The value of one sample in /metrics, e.g. `roomcast_records_malformed_total{...}`.
    pub async fn metric(&self, series: &str) -> f64 {
        self.metrics()
            .await
            .lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0.0)
    }

    /// Waits until the server has read `n` records of `topic`.
    pub async fn wait_consumed(&self, topic: &str, n: u64) {
        let series = format!("roomcast_records_consumed_total{{topic=\"{topic}\"}}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while (self.metric(&series).await as u64) < n {
            assert!(
                Instant::now() < deadline,
                "server read fewer than {n} records of {topic}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.public)
    }

    pub async fn connect(&self, token: &str) -> Client {
        Client::connect(&self.ws_url(), token)
            .await
            .unwrap_or_else(|(status, body)| panic!("refused: {status} {body}"))
    }

    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit; None if it did not within `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// `kill -9`: the process ends at once, saying nothing to anyone.
    pub fn kill(&mut self) {
        self.child.kill().expect("SIGKILL sent");
        self.child.wait().expect("killed process reaped");
    }

    /// Starts the binary again on its own config, so under the same server name (on new
    /// ports), and waits until it is ready.
    pub async fn restart(&mut self) {
        let dir = self
            ._dir
            .take()
            .expect("a server launched from its own config");
        let mut next = Server::spawn(&dir.0.join("roomcast.toml"), &[]);
        next._dir = Some(dir);
        *self = next;
        self.wait_ready().await;
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads the binary's JSON logs until the `listening` line; the rest keeps draining to our
/// stderr so a failing test shows the server's logs.
fn listening_addrs(child: &mut Child, log: &Arc<Mutex<Vec<String>>>) -> (String, String) {
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let log = log.clone();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            log.lock().unwrap().push(line.clone());
            if !sent {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if v["message"] == "listening" {
                        let addrs = (
                            v["public"].as_str().unwrap().to_string(),
                            v["admin"].as_str().unwrap().to_string(),
                        );
                        sent = tx.send(addrs).is_ok();
                        continue;
                    }
                }
            }
            eprintln!("[roomcast] {line}");
        }
    });
    rx.recv_timeout(Duration::from_secs(20))
        .expect("roomcast printed its listening addresses")
}

/// A minimal HTTP/1.0 GET: status and body.
pub async fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// A refused upgrade's status and trimmed body.
pub fn refusal(
    resp: &tokio_tungstenite::tungstenite::http::Response<Option<Vec<u8>>>,
) -> (u16, String) {
    let body = resp
        .body()
        .as_ref()
        .map(|b| String::from_utf8_lossy(b).trim().to_string())
        .unwrap_or_default();
    (resp.status().as_u16(), body)
}

pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub welcome: Value,
    next_id: u64,
    /// What this client would keep to resume, updated by every frame it reads.
    pub tracker: Tracker,
    /// Return `positions` frames from `frame()` too (by default they only update `tracker`).
    pub see_positions: bool,
    /// Presence events that came before a subscribe's answer (a listener may hear a join
    /// told while it subscribes), returned first by `frame()`.
    early: std::collections::VecDeque<Value>,
}

pub const WAIT: Duration = Duration::from_secs(15);

impl Client {
    /// Connects with the token in the `bearer.` subprotocol; a refusal gives status and body.
    pub async fn connect(url: &str, token: &str) -> Result<Client, (u16, String)> {
        let mut req = url.into_client_request().unwrap();
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            format!("roomcast.v1, bearer.{token}").parse().unwrap(),
        );
        Client::connect_request(req).await
    }

    /// Connects like `connect`, with a small socket receive buffer, so a client that stops
    /// reading fills up the server's side quickly.
    pub async fn connect_small_buffer(url: &str, token: &str) -> Client {
        let mut req = url.into_client_request().unwrap();
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            format!("roomcast.v1, bearer.{token}").parse().unwrap(),
        );
        let addr: std::net::SocketAddr = req.uri().authority().unwrap().as_str().parse().unwrap();
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(8 * 1024).unwrap();
        let stream = socket.connect(addr).await.unwrap();
        let (ws, _) = tokio_tungstenite::client_async(req, MaybeTlsStream::Plain(stream))
            .await
            .expect("connected");
        let mut c = Client::new(ws);
        c.read_welcome().await;
        c
    }

    fn new(ws: WebSocketStream<MaybeTlsStream<TcpStream>>) -> Client {
        Client {
            ws,
            welcome: Value::Null,
            next_id: 100,
            tracker: Tracker::default(),
            see_positions: false,
            early: Default::default(),
        }
    }

    async fn read_welcome(&mut self) {
        self.welcome = self.frame().await.expect("welcome frame");
        assert_eq!(self.welcome["type"], "welcome");
        if let Some(tracker) = Tracker::from_welcome(&self.welcome) {
            self.tracker = tracker;
        }
    }

    pub async fn connect_request(
        req: tokio_tungstenite::tungstenite::handshake::client::Request,
    ) -> Result<Client, (u16, String)> {
        use tokio_tungstenite::tungstenite::Error;
        match tokio_tungstenite::connect_async(req).await {
            Ok((ws, _)) => {
                let mut c = Client::new(ws);
                c.read_welcome().await;
                Ok(c)
            }
            Err(Error::Http(resp)) => Err(refusal(&resp)),
            Err(e) => panic!("connect failed: {e}"),
        }
    }

    pub async fn send(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).await.unwrap();
    }

    pub async fn send_raw(&mut self, m: Message) {
        self.ws.send(m).await.unwrap();
    }

    /// The next JSON frame, or None on close or after WAIT.
    pub async fn frame(&mut self) -> Option<Value> {
        self.frame_within(WAIT).await
    }

    pub async fn frame_within(&mut self, limit: Duration) -> Option<Value> {
        if let Some(early) = self.early.pop_front() {
            return Some(early);
        }
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match self.message_until(deadline).await? {
                Message::Text(t) => {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap();
                    self.tracker.see(&v);
                    if v["type"] == "positions" && !self.see_positions {
                        continue;
                    }
                    return Some(v);
                }
                Message::Close(_) => return None,
                _ => continue,
            }
        }
    }

    /// The next WebSocket message (None: closed, broken, or nothing before `deadline`).
    async fn message_until(&mut self, deadline: tokio::time::Instant) -> Option<Message> {
        let m = tokio::time::timeout_at(deadline, self.ws.next())
            .await
            .ok()??;
        m.ok()
    }

    /// Reads until the server's next WebSocket ping and says when it came (None: closed, or
    /// nothing within `limit`). Other frames are dropped.
    pub async fn next_ping(&mut self, limit: Duration) -> Option<tokio::time::Instant> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match self.message_until(deadline).await? {
                Message::Ping(_) => return Some(tokio::time::Instant::now()),
                Message::Close(_) => return None,
                _ => continue,
            }
        }
    }

    /// Sends a request with the id `id` and returns its answer. Presence events heard before
    /// it are kept, for `frame()` to return next.
    pub async fn request(&mut self, mut frame: Value, id: u64) -> Value {
        frame["id"] = json!(id);
        self.send(frame).await;
        let held = std::mem::take(&mut self.early);
        let mut heard = Vec::new();
        let answer = loop {
            let f = self.frame().await.expect("an answer");
            if f["id"] == id {
                break f;
            }
            assert!(
                f["type"] == "event" && f.get("pos").is_none(),
                "unexpected {f}"
            );
            heard.push(f);
        };
        self.early = held;
        self.early.extend(heard);
        answer
    }

    /// Subscribes and returns (per-room error frames, the final frame: ok or a roomless error).
    pub async fn subscribe(&mut self, mut frame: Value) -> (Vec<Value>, Value) {
        self.next_id += 1;
        let id = self.next_id;
        frame["type"] = json!("subscribe");
        frame["id"] = json!(id);
        self.send(frame).await;
        let mut errors = Vec::new();
        // Read past what is already held, which stays first in line.
        let held = std::mem::take(&mut self.early);
        let mut heard = Vec::new();
        let answer = loop {
            let f = self.frame().await.expect("subscribe answer");
            match f["type"].as_str() {
                Some("error") if f["id"] == id && f.get("room").is_none() => break f,
                Some("error") if f["id"] == id => errors.push(f),
                Some("ok") if f["id"] == id => break f,
                Some("event") if f.get("pos").is_none() => heard.push(f),
                Some("event") => panic!("event before the subscribe answer: {f}"),
                _ => panic!("unexpected frame {f}"),
            }
        };
        self.early = held;
        self.early.extend(heard);
        (errors, answer)
    }

    /// Subscribes to rooms that must all be granted.
    pub async fn join(&mut self, rooms: &[&str]) {
        let (errors, ok) = self.subscribe(json!({ "rooms": rooms })).await;
        assert!(errors.is_empty(), "refused: {errors:?}");
        assert_eq!(ok["rooms"], json!(rooms));
    }

    /// Exactly `n` event frames (panics on anything else or a timeout).
    pub async fn events(&mut self, n: usize) -> Vec<Value> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let f = self.frame().await.unwrap_or_else(|| {
                let last = out.last().map(|e: &Value| e["pos"].clone());
                panic!("got {} of {n} events, the last at {last:?}", out.len())
            });
            assert_eq!(f["type"], "event", "expected an event, got {}", short(&f));
            out.push(f);
        }
        out
    }

    /// Asserts nothing arrives for `d`.
    pub async fn expect_silence(&mut self, d: Duration) {
        if let Some(f) = self.frame_within(d).await {
            panic!("expected nothing, got {}", short(&f));
        }
    }

    /// The next JSON frame, or Err(close code) when the server closes.
    pub async fn next_or_close(&mut self) -> Result<Value, Option<u16>> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap();
                    self.tracker.see(&v);
                    return Ok(v);
                }
                Ok(Some(Ok(Message::Close(c)))) => return Err(c.map(|c| u16::from(c.code))),
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(_))) | Ok(None) => return Err(None),
                Err(_) => panic!("nothing within {WAIT:?}"),
            }
        }
    }

    /// Reads until the server's close frame; returns it (None if the socket just ended).
    /// After a close frame: reads on, which sends the close reply, until the server ends the
    /// connection. True if it did within the wait.
    pub async fn finish_close(&mut self) -> bool {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(_))) | Ok(None) => return true,
                Err(_) => return false,
            }
        }
    }

    pub async fn close_frame(&mut self) -> Option<CloseFrame> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Ok(Some(Ok(Message::Close(c)))) => return c,
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(_))) | Ok(None) => return None,
                Err(_) => panic!("no close frame within {WAIT:?}"),
            }
        }
    }
}

/// What a client keeps to resume, as PROTOCOL.md says: the welcome's positions (a welcome
/// has them only on a connection not opened to resume), updated by every event and every
/// `positions` frame it receives.
#[derive(Debug, Clone, Default)]
pub struct Tracker {
    pub positions: BTreeMap<String, i64>,
}

impl Tracker {
    /// Starts the map from a welcome's positions; None if the welcome has none.
    pub fn from_welcome(welcome: &Value) -> Option<Tracker> {
        let positions = welcome.get("positions")?;
        let positions = serde_json::from_value(positions.clone()).unwrap();
        Some(Tracker { positions })
    }

    pub fn see(&mut self, frame: &Value) {
        match frame["type"].as_str() {
            // A presence event has no position.
            Some("event") if frame.get("pos").is_some() => {
                let (key, offset) = split_pos(frame["pos"].as_str().unwrap());
                self.positions.insert(key, offset);
            }
            Some("positions") => {
                let map: BTreeMap<String, i64> =
                    serde_json::from_value(frame["positions"].clone()).unwrap();
                self.positions.extend(map);
            }
            _ => {}
        }
    }
}

/// `topic:partition:offset` into (`topic:partition`, offset).
pub fn split_pos(pos: &str) -> (String, i64) {
    let (key, offset) = pos.rsplit_once(':').unwrap();
    (key.to_string(), offset.parse().unwrap())
}

impl Client {
    /// Connects with `?resume=1` and resumes from `tracker`: returns every frame up to the
    /// resume's final answer (replayed events, `resync`, `positions`, then `ok`).
    pub async fn resume(
        server: &Server,
        token: &str,
        tracker: &Tracker,
        rooms: &[&str],
    ) -> (Client, Vec<Value>) {
        let url = format!("{}?resume=1", server.ws_url());
        let mut c = Client::connect(&url, token)
            .await
            .unwrap_or_else(|(s, b)| panic!("refused: {s} {b}"));
        c.tracker = tracker.clone();
        c.send(json!({"type": "resume", "id": 1, "positions": tracker.positions, "rooms": rooms}))
            .await;
        let mut frames = Vec::new();
        c.see_positions = true;
        loop {
            let f = c.frame().await.expect("resume answer");
            let done = f["type"] == "ok" && f["id"] == 1;
            frames.push(f);
            if done {
                c.see_positions = false;
                return (c, frames);
            }
        }
    }
}

/// A frame for a failure message: its first 300 characters.
pub fn short(v: &Value) -> String {
    v.to_string().chars().take(300).collect()
}

/// Event frames only.
pub fn only_events(frames: &[Value]) -> Vec<Value> {
    frames
        .iter()
        .filter(|f| f["type"] == "event")
        .cloned()
        .collect()
}

/// Payload field `key` of each event.
pub fn payload_field(events: &[Value], key: &str) -> Vec<Value> {
    events.iter().map(|e| e["payload"][key].clone()).collect()
}

pub fn event_names(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["event"].as_str().unwrap().to_string())
        .collect()
}

/// Labels of every sample in a Prometheus text exposition, by label name.
pub fn label_names(metrics: &str) -> BTreeMap<String, usize> {
    let mut names = BTreeMap::new();
    for line in metrics.lines().filter(|l| !l.starts_with('#')) {
        if let Some((_, rest)) = line.split_once('{') {
            let labels = rest.split('}').next().unwrap_or("");
            for pair in labels.split(',').filter(|p| !p.is_empty()) {
                let name = pair.split('=').next().unwrap().trim().to_string();
                *names.entry(name).or_default() += 1;
            }
        }
    }
    names
}

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        let dir = std::env::temp_dir().join(unique("dir"));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the binary with `args` (a command that prints, such as `token` or `check-config`)
/// and returns its standard output, failing the test with its standard error if it fails.
pub fn run_ok(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = Command::new(binary())
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("roomcast runs");
    assert!(
        out.status.success(),
        "roomcast {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}
