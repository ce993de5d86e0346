//! The client's side of the WebSocket wire for the connections that receive at rate: the
//! upgrade request, server frames parsed in place from one read buffer, and masked frames to
//! send.
//!
//! tungstenite allocates, copies and UTF-8-checks every message and costs a task poll per
//! frame. At a million frames a second that made the client, not the server, the first thing
//! to run out of CPU in a broadcast run, so these connections read whatever the socket holds
//! in one call and hand out each frame as a slice of the buffer. Pings are answered here; the
//! rest of the protocol (what a text frame means) is the caller's.

use std::io;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::client::HandshakeError;
use crate::frame::{self, masked, BINARY, CLOSE, PING, PONG, TEXT};

/// The longest response head or frame this side accepts.
const MAX_HEAD: usize = 8 * 1024;
const MAX_FRAME: usize = 16 * 1024 * 1024;

/// What the server sent that this side cannot read.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    #[error("masked frame from the server")]
    Masked,
    #[error("fragmented frame (opcode {0:#x})")]
    Fragmented(u8),
    #[error("frame of {0} bytes")]
    TooLong(u64),
    #[error("unknown opcode {0:#x}")]
    Opcode(u8),
}

/// One frame the caller sees; pings are answered inside, pongs and binary frames skipped.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    Text(&'a [u8]),
    /// The close code (1005 when the frame has none).
    Close(u16),
}

/// A frame's place in the buffer.
struct Header {
    opcode: u8,
    payload: std::ops::Range<usize>,
}

/// Parses the frame at the start of `bytes`: None until all of it is there.
fn header(bytes: &[u8]) -> Result<Option<Header>, WireError> {
    let [b0, b1, ..] = *bytes else {
        return Ok(None);
    };
    let (fin, opcode) = (b0 & 0x80 != 0, b0 & 0x0F);
    if b1 & 0x80 != 0 {
        return Err(WireError::Masked);
    }
    // roomcast and the floor never fragment: a continuation would be a protocol error here.
    if !fin || opcode == 0 {
        return Err(WireError::Fragmented(opcode));
    }
    let Some((at, len)) = frame::lengths(bytes) else {
        return Ok(None);
    };
    if len > MAX_FRAME as u64 {
        return Err(WireError::TooLong(len));
    }
    let end = at + len as usize;
    Ok((bytes.len() >= end).then_some(Header {
        opcode,
        payload: at..end,
    }))
}

/// The opcode and payload range of the whole frame at the start of `bytes`, for callers that
/// read the socket themselves (None until all of it is there).
pub fn parse_frame(bytes: &[u8]) -> Result<Option<(u8, std::ops::Range<usize>)>, WireError> {
    Ok(header(bytes)?.map(|h| (h.opcode, h.payload)))
}

/// One connection after its upgrade.
pub struct Conn {
    tcp: TcpStream,
    /// `buf[start..end]` holds the bytes not parsed yet. The buffer stays initialized, so a
    /// read does not first clear the room it reads into.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Pongs owed for the pings parsed since the last `answer_pings`.
    pongs: Vec<u8>,
    next_key: u32,
}

impl Conn {
    fn new(tcp: TcpStream, capacity: usize, seed: u32) -> Conn {
        Conn {
            tcp,
            buf: vec![0; capacity.max(64)],
            start: 0,
            end: 0,
            pongs: Vec::new(),
            next_key: seed | 1,
        }
    }

    /// The socket and the bytes read but not parsed yet, for a caller that reads and writes
    /// at once from here on.
    pub fn into_parts(self) -> (TcpStream, Vec<u8>) {
        let rest = self.buf[self.start..self.end].to_vec();
        (self.tcp, rest)
    }

    fn unparsed(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Consumes the control frames at the front (owing a pong for each ping); then the
    /// header of the whole text or close frame that follows, if one does.
    fn skip_control(&mut self) -> Result<Option<Header>, WireError> {
        loop {
            let Some(h) = header(self.unparsed())? else {
                return Ok(None);
            };
            let payload = self.start + h.payload.start..self.start + h.payload.end;
            match h.opcode {
                TEXT | CLOSE => return Ok(Some(h)),
                PING => {
                    let key = self.key();
                    let pong = masked(PONG, &self.buf[payload.clone()], key);
                    self.pongs.extend_from_slice(&pong);
                }
                BINARY | PONG => {}
                other => return Err(WireError::Opcode(other)),
            }
            self.start = payload.end;
        }
    }

    /// The next text or close frame already in the buffer, if a whole one is there.
    pub fn buffered(&mut self) -> Result<Option<Frame<'_>>, WireError> {
        let Some(h) = self.skip_control()? else {
            return Ok(None);
        };
        let payload = self.start + h.payload.start..self.start + h.payload.end;
        self.start = payload.end;
        let p = &self.buf[payload];
        Ok(Some(match h.opcode {
            TEXT => Frame::Text(p),
            _ if p.len() >= 2 => Frame::Close(u16::from_be_bytes([p[0], p[1]])),
            _ => Frame::Close(1005),
        }))
    }

    /// The next text or close frame, reading as needed; a stream that ends without a close
    /// frame gives `Close(1006)`.
    pub async fn next(&mut self) -> Result<Frame<'_>, WireError> {
        while self.skip_control()?.is_none() {
            self.answer_pings().await?;
            if self.fill().await? == 0 {
                return Ok(Frame::Close(1006));
            }
        }
        Ok(self.buffered()?.expect("a whole frame is there"))
    }

    /// Waits until the socket has bytes and appends what it holds, up to the buffer's room
    /// (grown only for a frame longer than the buffer). Ok(0) at the end of the stream.
    pub async fn fill(&mut self) -> io::Result<usize> {
        self.make_room();
        loop {
            self.tcp.readable().await?;
            match self.tcp.try_read(&mut self.buf[self.end..]) {
                Ok(n) => {
                    self.end += n;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Moves the unparsed bytes to the front, and grows the buffer if they are the start of
    /// a frame longer than it.
    fn make_room(&mut self) {
        self.buf.copy_within(self.start..self.end, 0);
        (self.start, self.end) = (0, self.end - self.start);
        let need = frame::frame_len(self.unparsed()).map_or(0, |n| n.min(MAX_FRAME + 14));
        // Full without a frame longer than the buffer: a long response head.
        let full = self.end == self.buf.len();
        let size = need.max(if full { 2 * self.buf.len() } else { 0 });
        if size > self.buf.len() {
            self.buf.resize(size, 0);
        }
    }

    /// Sends the pongs owed, if any.
    pub async fn answer_pings(&mut self) -> io::Result<()> {
        if self.pongs.is_empty() {
            return Ok(());
        }
        let pongs = std::mem::take(&mut self.pongs);
        self.tcp.write_all(&pongs).await
    }

    /// Sends a text frame.
    pub async fn send_text(&mut self, text: &str) -> io::Result<()> {
        let key = self.key();
        self.tcp
            .write_all(&masked(TEXT, text.as_bytes(), key))
            .await
    }

    /// Sends an unsolicited pong (a keepalive the server owes no answer to).
    pub async fn send_pong(&mut self) -> io::Result<()> {
        let key = self.key();
        self.tcp.write_all(&masked(PONG, &[], key)).await
    }

    /// Sends a close frame with `code`, as a client that goes away does.
    pub async fn send_close(&mut self, code: u16) -> io::Result<()> {
        let key = self.key();
        self.tcp
            .write_all(&masked(CLOSE, &code.to_be_bytes(), key))
            .await
    }

    fn key(&mut self) -> [u8; 4] {
        // xorshift32: masking keys only need to vary, not to be secret, in a load generator.
        let mut x = self.next_key;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.next_key = x;
        x.to_le_bytes()
    }
}

/// The upgrade to a WebSocket with the token in the subprotocol, then the welcome frame;
/// returns the connection with the welcome's text. `seed` varies the handshake key and the
/// masking keys between connections.
pub async fn upgrade(
    url: &str,
    mut tcp: TcpStream,
    token: &str,
    capacity: usize,
    seed: u32,
) -> Result<(Conn, String), HandshakeError> {
    let (host, path) = host_and_path(url)?;
    let key = frame::client_key(seed);
    let request = frame::Upgrade {
        path,
        host,
        http: "HTTP/1.1",
        version: "13",
        key: &key,
        extra: &format!("Sec-WebSocket-Protocol: roomcast.v1, bearer.{token}\r\n"),
    }
    .request();
    tcp.write_all(request.as_bytes())
        .await
        .map_err(HandshakeError::Connect)?;
    let mut conn = Conn::new(tcp, capacity, seed);
    let head_end = read_head(&mut conn).await?;
    check_response(&conn.buf[..head_end], &key)?;
    conn.start = head_end;
    match conn.next().await {
        Ok(Frame::Text(t)) if t.starts_with(b"{\"type\":\"welcome\"") => {
            let welcome = String::from_utf8_lossy(t).into_owned();
            Ok((conn, welcome))
        }
        other => Err(HandshakeError::NoWelcome(format!("{other:?}"))),
    }
}

/// `ws://host:port/path?query` as (`host:port`, `/path?query`).
fn host_and_path(url: &str) -> Result<(&str, &str), HandshakeError> {
    let rest = url
        .strip_prefix("ws://")
        .ok_or_else(|| HandshakeError::Protocol(format!("not a ws:// URL: {url}")))?;
    Ok(match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    })
}

/// Reads until the response head is complete; returns its length.
async fn read_head(conn: &mut Conn) -> Result<usize, HandshakeError> {
    loop {
        if let Some(i) = memchr::memmem::find(conn.unparsed(), b"\r\n\r\n") {
            return Ok(i + 4);
        }
        if conn.end >= MAX_HEAD {
            return Err(HandshakeError::Protocol("response head too long".into()));
        }
        match conn.fill().await {
            Ok(0) => return Err(HandshakeError::Protocol("closed during the upgrade".into())),
            Ok(_) => {}
            Err(e) => return Err(HandshakeError::Connect(e)),
        }
    }
}

/// 101 with the accept key that answers ours.
fn check_response(head: &[u8], key: &str) -> Result<(), HandshakeError> {
    frame::check_response(&String::from_utf8_lossy(head), key).map_err(|e| match e {
        frame::UpgradeRefused::Status(status) => HandshakeError::Status(status),
        other => HandshakeError::Protocol(other.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    use crate::frame::unmasked as server_frame;

    /// A client frame's first byte and payload, unmasked.
    fn unmask(bytes: &[u8]) -> (u8, Vec<u8>) {
        let h = frame::head(bytes).expect("a whole frame");
        let key = h.mask.expect("client frames are masked");
        let mut payload = bytes[h.payload.clone()].to_vec();
        frame::unmask(&mut payload, key);
        (h.first, payload)
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        (client.unwrap(), accepted.unwrap().0)
    }

    #[test]
    fn masked_frames_carry_their_payload_under_the_key() {
        for len in [0, 5, 125, 126, 200, 65_535, 70_000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let f = masked(TEXT, &payload, [1, 2, 3, 4]);
            assert_eq!(unmask(&f), (0x81, payload), "length {len}");
        }
    }

    #[test]
    fn frames_this_side_cannot_read_are_errors() {
        let mut masked_text = server_frame(TEXT, b"x");
        masked_text[1] |= 0x80;
        assert!(matches!(header(&masked_text), Err(WireError::Masked)));
        let mut first_part = server_frame(TEXT, b"x");
        first_part[0] &= 0x7F;
        assert!(matches!(header(&first_part), Err(WireError::Fragmented(1))));
        let huge = [0x81, 127, 0, 0, 0, 0, 0x10, 0, 0, 0];
        assert!(matches!(header(&huge), Err(WireError::TooLong(_))));
        assert!(header(&server_frame(TEXT, &[b'y'; 300])[..100])
            .unwrap()
            .is_none());
    }

    #[tokio::test]
    async fn frames_split_anywhere_come_out_whole_and_pings_get_pongs() {
        let (client, mut server) = pair().await;
        let texts: Vec<Vec<u8>> = [5, 300, 70_000, 1]
            .iter()
            .map(|&n| (0..n).map(|i| b'a' + (i % 26) as u8).collect())
            .collect();
        let mut stream = server_frame(TEXT, &texts[0]);
        stream.extend(server_frame(PING, b"hi"));
        stream.extend(server_frame(PONG, b""));
        for t in &texts[1..] {
            stream.extend(server_frame(TEXT, t));
        }
        stream.extend(server_frame(CLOSE, &[0x0F, 0xA8, b'x']));
        let writer = tokio::spawn(async move {
            for chunk in stream.chunks(7) {
                server.write_all(chunk).await.unwrap();
            }
            let mut pong = [0u8; 8];
            server.read_exact(&mut pong).await.unwrap();
            pong
        });
        // A buffer smaller than most frames: it has to grow for the long one.
        let mut conn = Conn::new(client, 64, 7);
        let mut got = Vec::new();
        let code = loop {
            match conn.next().await.unwrap() {
                Frame::Text(t) => got.push(t.to_vec()),
                Frame::Close(code) => break code,
            }
        };
        assert_eq!(got, texts);
        assert_eq!(code, 4008);
        let pong = tokio::time::timeout(std::time::Duration::from_secs(5), writer)
            .await
            .expect("the ping is answered")
            .unwrap();
        assert_eq!(unmask(&pong), (0x8A, b"hi".to_vec()));
    }

    #[tokio::test]
    async fn a_close_frame_carries_its_code() {
        let (client, mut server) = pair().await;
        let mut conn = Conn::new(client, 64, 7);
        conn.send_close(1000).await.unwrap();
        drop(conn);
        let mut sent = Vec::new();
        server.read_to_end(&mut sent).await.unwrap();
        assert_eq!(unmask(&sent), (0x88, vec![0x03, 0xE8]));
    }

    #[tokio::test]
    async fn a_stream_that_ends_without_a_close_frame_is_1006() {
        let (client, mut server) = pair().await;
        server
            .write_all(&server_frame(TEXT, b"last"))
            .await
            .unwrap();
        drop(server);
        let mut conn = Conn::new(client, 64, 1);
        assert_eq!(conn.next().await.unwrap(), Frame::Text(b"last"));
        assert_eq!(conn.next().await.unwrap(), Frame::Close(1006));
    }

    /// Answers one upgrade request with `status` and `accept` (None: the right key), then
    /// sends `after` in the same write.
    async fn fake_server(
        status: &'static str,
        accept: Option<&'static str>,
        after: Vec<u8>,
    ) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            while !request.ends_with(b"\r\n\r\n") {
                request.push(s.read_u8().await.unwrap());
            }
            let request = String::from_utf8(request).unwrap();
            assert!(request.starts_with("GET /ws?x=1 HTTP/1.1\r\n"), "{request}");
            assert!(request.contains("Sec-WebSocket-Protocol: roomcast.v1, bearer.TOKEN\r\n"));
            let key = request
                .lines()
                .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
                .unwrap();
            let accept = accept.map_or_else(|| frame::accept_key(key.as_bytes()), String::from);
            let mut answer =
                format!("HTTP/1.1 {status}\r\nSec-WebSocket-Accept: {accept}\r\n\r\n").into_bytes();
            answer.extend(after);
            s.write_all(&answer).await.unwrap();
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
        });
        addr
    }

    #[tokio::test]
    async fn the_upgrade_checks_the_answer_and_keeps_what_came_with_it() {
        let mut after = server_frame(TEXT, br#"{"type":"welcome","conn":"c1"}"#);
        after.extend(server_frame(TEXT, br#"{"type":"event"}"#));
        let addr = fake_server("101 Switching Protocols", None, after).await;
        let url = format!("ws://{addr}/ws?x=1");
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (mut conn, welcome) = upgrade(&url, tcp, "TOKEN", 4096, 3).await.unwrap();
        assert_eq!(welcome, r#"{"type":"welcome","conn":"c1"}"#);
        assert_eq!(
            conn.next().await.unwrap(),
            Frame::Text(br#"{"type":"event"}"#)
        );

        let addr = fake_server("401 Unauthorized", None, Vec::new()).await;
        let tcp = TcpStream::connect(addr).await.unwrap();
        let refused = upgrade(&format!("ws://{addr}/ws?x=1"), tcp, "TOKEN", 4096, 3).await;
        assert!(matches!(refused, Err(HandshakeError::Status(401))));

        let addr = fake_server("101 Switching Protocols", Some("bogus"), Vec::new()).await;
        let tcp = TcpStream::connect(addr).await.unwrap();
        let wrong = upgrade(&format!("ws://{addr}/ws?x=1"), tcp, "TOKEN", 4096, 3).await;
        assert!(matches!(wrong, Err(HandshakeError::Protocol(_))));
    }
}
