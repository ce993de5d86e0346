//! WebSocket framing (RFC 6455), server side, in both directions.
//!
//! A server [`Frame`] carries its WebSocket header in front of its JSON, written once when the
//! frame is built: every recipient's write is then the very same bytes, with no framing, copy
//! or buffer per connection. Server frames are never masked and never fragmented.
//!
//! Client frames are read by [`Decoder`] from whatever the socket has given so far. Anything
//! RFC 6455 forbids a client to send (unmasked frames, reserved bits or opcodes, fragmented or
//! long control frames, a continuation out of place) is a [`WireError::Protocol`].

use bytes::{Buf, Bytes, BytesMut};

/// Bytes kept free in front of a frame being built: the longest header.
const HEADER_ROOM: usize = 10;
/// Control frames carry at most this many payload bytes.
const MAX_CONTROL: usize = 125;

pub mod opcode {
    pub const CONTINUATION: u8 = 0x0;
    pub const TEXT: u8 = 0x1;
    pub const BINARY: u8 = 0x2;
    pub const CLOSE: u8 = 0x8;
    pub const PING: u8 = 0x9;
    pub const PONG: u8 = 0xA;
}

/// One encoded text frame, header included; cheap to clone and shared by every recipient.
#[derive(Clone, PartialEq, Eq)]
pub struct Frame {
    wire: Bytes,
    header: u8,
}

impl Frame {
    /// A buffer to write a frame's text into, with room for the header in front.
    pub fn buffer(capacity: usize) -> Vec<u8> {
        let mut buf = Vec::with_capacity(HEADER_ROOM + capacity);
        buf.resize(HEADER_ROOM, 0);
        buf
    }

    /// Finishes a buffer from [`Frame::buffer`] whose text is valid UTF-8.
    pub fn from_buffer(mut buf: Vec<u8>) -> Frame {
        let (header, n) = header(opcode::TEXT, buf.len() - HEADER_ROOM);
        let start = HEADER_ROOM - n;
        buf[start..HEADER_ROOM].copy_from_slice(&header[..n]);
        Frame {
            wire: Bytes::from(buf).slice(start..),
            header: n as u8,
        }
    }

    /// The bytes that go on the wire.
    pub fn wire(&self) -> &Bytes {
        &self.wire
    }

    /// Bytes on the wire, header included.
    pub fn len(&self) -> usize {
        self.wire.len()
    }

    pub fn is_empty(&self) -> bool {
        self.wire.is_empty()
    }

    /// A binary message's frame. The service sends none: the conformance harness
    /// (`examples/autobahn_echo.rs`) echoes with it. Its [`Frame::as_str`] means nothing.
    #[doc(hidden)]
    pub fn binary(payload: &[u8]) -> Frame {
        let (header, n) = header(opcode::BINARY, payload.len());
        let mut buf = Vec::with_capacity(n + payload.len());
        buf.extend_from_slice(&header[..n]);
        buf.extend_from_slice(payload);
        Frame {
            wire: Bytes::from(buf),
            header: n as u8,
        }
    }

    /// The frame's text.
    pub fn as_str(&self) -> &str {
        // Built only from &str or from buffers whose text was checked to be UTF-8.
        std::str::from_utf8(&self.wire[self.header as usize..]).unwrap_or("")
    }
}

impl From<&str> for Frame {
    fn from(text: &str) -> Frame {
        let mut buf = Frame::buffer(text.len());
        buf.extend_from_slice(text.as_bytes());
        Frame::from_buffer(buf)
    }
}

impl From<String> for Frame {
    fn from(text: String) -> Frame {
        Frame::from(text.as_str())
    }
}

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Frame").field(&self.as_str()).finish()
    }
}

/// A final frame's header for `len` payload bytes: the bytes and how many of them are used.
fn header(op: u8, len: usize) -> ([u8; HEADER_ROOM], usize) {
    let mut h = [0u8; HEADER_ROOM];
    h[0] = 0x80 | op;
    if len < 126 {
        h[1] = len as u8;
        (h, 2)
    } else if len <= u16::MAX as usize {
        h[1] = 126;
        h[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        (h, 4)
    } else {
        h[1] = 127;
        h[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        (h, 10)
    }
}

fn control(op: u8, payload: &[u8]) -> Bytes {
    let payload = &payload[..payload.len().min(MAX_CONTROL)];
    let mut out = Vec::with_capacity(2 + payload.len());
    out.extend_from_slice(&[0x80 | op, payload.len() as u8]);
    out.extend_from_slice(payload);
    Bytes::from(out)
}

/// A close frame; the reason is cut to fit, at a character boundary.
pub fn close(code: u16, reason: &str) -> Bytes {
    let mut end = reason.len().min(MAX_CONTROL - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    control(opcode::CLOSE, &payload)
}

pub fn ping() -> Bytes {
    Bytes::from_static(&[0x80 | opcode::PING, 0])
}

pub fn pong(payload: &[u8]) -> Bytes {
    control(opcode::PONG, payload)
}

/// A whole message from the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    Text(String),
    Binary(Vec<u8>),
    Ping(Bytes),
    Pong,
    /// The client's close frame, with its code if it gave one.
    Close(Option<u16>),
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("message too big")]
    TooBig,
    #[error("invalid UTF-8 in a text message")]
    Utf8,
}

/// Reassembles client messages from frames; bounded by the frame and message limits.
#[derive(Debug)]
pub struct Decoder {
    max_frame: usize,
    max_message: usize,
    /// A fragmented message so far: its opcode and bytes.
    partial: Option<(u8, Vec<u8>)>,
}

struct RawFrame {
    fin: bool,
    op: u8,
    payload: BytesMut,
}

impl Decoder {
    pub fn new(max_frame: usize, max_message: usize) -> Decoder {
        Decoder {
            max_frame,
            max_message,
            partial: None,
        }
    }

    /// The next whole message in `buf`, consuming its frames; None until one is complete.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Incoming>, WireError> {
        while let Some(frame) = self.frame(buf)? {
            if let Some(message) = self.assemble(frame)? {
                return Ok(Some(message));
            }
        }
        Ok(None)
    }

    fn frame(&self, buf: &mut BytesMut) -> Result<Option<RawFrame>, WireError> {
        if buf.len() < 2 {
            return Ok(None);
        }
        let (b0, b1) = (buf[0], buf[1]);
        if b0 & 0x70 != 0 {
            return Err(WireError::Protocol("reserved bits set"));
        }
        if b1 & 0x80 == 0 {
            return Err(WireError::Protocol("unmasked client frame"));
        }
        let (fin, op) = (b0 & 0x80 != 0, b0 & 0x0F);
        let (len, at) = match b1 & 0x7F {
            126 if buf.len() < 4 => return Ok(None),
            126 => (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4),
            127 if buf.len() < 10 => return Ok(None),
            127 => {
                let mut n = [0u8; 8];
                n.copy_from_slice(&buf[2..10]);
                (u64::from_be_bytes(n), 10)
            }
            n => (n as u64, 2),
        };
        if op >= opcode::CLOSE && (!fin || len > MAX_CONTROL as u64) {
            return Err(WireError::Protocol("fragmented or long control frame"));
        }
        if len > self.max_frame as u64 {
            return Err(WireError::TooBig);
        }
        let len = len as usize;
        if buf.len() < at + 4 + len {
            return Ok(None);
        }
        let mask = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
        buf.advance(at + 4);
        let mut payload = buf.split_to(len);
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i & 3];
        }
        Ok(Some(RawFrame { fin, op, payload }))
    }

    fn assemble(&mut self, f: RawFrame) -> Result<Option<Incoming>, WireError> {
        match f.op {
            opcode::CLOSE => close_code(&f.payload).map(|code| Some(Incoming::Close(code))),
            opcode::PING => Ok(Some(Incoming::Ping(f.payload.freeze()))),
            opcode::PONG => Ok(Some(Incoming::Pong)),
            opcode::CONTINUATION => {
                let (op, mut data) = self
                    .partial
                    .take()
                    .ok_or(WireError::Protocol("continuation without a message"))?;
                if data.len() + f.payload.len() > self.max_message {
                    return Err(WireError::TooBig);
                }
                data.extend_from_slice(&f.payload);
                self.complete(f.fin, op, data)
            }
            opcode::TEXT | opcode::BINARY => {
                if self.partial.is_some() {
                    return Err(WireError::Protocol("new message inside a fragmented one"));
                }
                if f.payload.len() > self.max_message {
                    return Err(WireError::TooBig);
                }
                self.complete(f.fin, f.op, f.payload.to_vec())
            }
            _ => Err(WireError::Protocol("reserved opcode")),
        }
    }

    fn complete(
        &mut self,
        fin: bool,
        op: u8,
        data: Vec<u8>,
    ) -> Result<Option<Incoming>, WireError> {
        if !fin {
            self.partial = Some((op, data));
            return Ok(None);
        }
        match op {
            opcode::TEXT => String::from_utf8(data)
                .map(|t| Some(Incoming::Text(t)))
                .map_err(|_| WireError::Utf8),
            _ => Ok(Some(Incoming::Binary(data))),
        }
    }
}

/// A close frame's code; its reason must be UTF-8.
fn close_code(payload: &[u8]) -> Result<Option<u16>, WireError> {
    match payload.len() {
        0 => Ok(None),
        1 => Err(WireError::Protocol("close frame of one byte")),
        _ => {
            std::str::from_utf8(&payload[2..]).map_err(|_| WireError::Utf8)?;
            Ok(Some(u16::from_be_bytes([payload[0], payload[1]])))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client frame as a browser sends it: masked.
    fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let mut out = vec![first];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xFFFF => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        out
    }

    fn decoder() -> Decoder {
        Decoder::new(1000, 1500)
    }

    #[test]
    fn server_frames_have_the_shortest_header() {
        for (len, header) in [(5, 2), (125, 2), (126, 4), (65_535, 4), (65_536, 10)] {
            let text = "x".repeat(len);
            let f = Frame::from(text.as_str());
            assert_eq!(f.len(), len + header);
            assert_eq!(f.wire()[0], 0x81);
            assert_eq!(f.as_str(), text);
        }
        assert_eq!(&Frame::from("hi").wire()[..], b"\x81\x02hi");
        assert_eq!(&Frame::binary(&[0, 255]).wire()[..], &[0x82, 2, 0, 255]);
        assert_eq!(&Frame::binary(&[1; 300]).wire()[..4], &[0x82, 126, 1, 44]);
        assert_eq!(
            &Frame::from("x".repeat(300)).wire()[..4],
            &[0x81, 126, 1, 44]
        );
    }

    #[test]
    fn control_frames() {
        assert_eq!(&close(1000, "")[..], &[0x88, 2, 0x03, 0xE8]);
        let long = close(4008, &"é".repeat(100));
        assert!(long.len() <= 127);
        assert!(std::str::from_utf8(&long[4..]).is_ok());
        assert_eq!(&ping()[..], &[0x89, 0]);
        assert_eq!(&pong(b"ab")[..], &[0x8A, 2, b'a', b'b']);
    }

    #[test]
    fn a_message_arriving_in_pieces_is_decoded_once_whole() {
        let wire = masked(0x81, br#"{"type":"ping"}"#);
        let mut d = decoder();
        let mut buf = BytesMut::new();
        for (i, b) in wire.iter().enumerate() {
            buf.extend_from_slice(&[*b]);
            let got = d.decode(&mut buf).unwrap();
            if i + 1 < wire.len() {
                assert_eq!(got, None);
            } else {
                assert_eq!(got, Some(Incoming::Text(r#"{"type":"ping"}"#.into())));
            }
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn fragments_and_interleaved_control_frames() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&masked(0x01, b"hel"));
        buf.extend_from_slice(&masked(0x89, b"p"));
        buf.extend_from_slice(&masked(0x80, b"lo"));
        buf.extend_from_slice(&masked(0x88, &[0x03, 0xE9]));
        let mut d = decoder();
        assert_eq!(
            d.decode(&mut buf).unwrap(),
            Some(Incoming::Ping(Bytes::from_static(b"p")))
        );
        assert_eq!(
            d.decode(&mut buf).unwrap(),
            Some(Incoming::Text("hello".into()))
        );
        assert_eq!(
            d.decode(&mut buf).unwrap(),
            Some(Incoming::Close(Some(1001)))
        );
        assert_eq!(d.decode(&mut buf).unwrap(), None);
    }

    #[test]
    fn what_a_client_may_not_send() {
        let cases: Vec<(Vec<u8>, WireError)> = vec![
            (
                b"\x81\x02hi".to_vec(),
                WireError::Protocol("unmasked client frame"),
            ),
            (masked(0xC1, b"x"), WireError::Protocol("reserved bits set")),
            (masked(0x83, b"x"), WireError::Protocol("reserved opcode")),
            (
                masked(0x80, b"x"),
                WireError::Protocol("continuation without a message"),
            ),
            (
                masked(0x09, b"x"),
                WireError::Protocol("fragmented or long control frame"),
            ),
            (
                masked(0x89, &[0; 126]),
                WireError::Protocol("fragmented or long control frame"),
            ),
            (
                masked(0x88, &[3]),
                WireError::Protocol("close frame of one byte"),
            ),
            (masked(0x81, &[0xFF, 0xFE]), WireError::Utf8),
            (masked(0x81, &[b'x'; 1001]), WireError::TooBig),
        ];
        for (wire, error) in cases {
            let mut buf = BytesMut::from(&wire[..]);
            assert_eq!(decoder().decode(&mut buf), Err(error));
        }
        // Too big is known from the header, before the payload has arrived.
        let mut buf = BytesMut::from(&masked(0x81, &[b'x'; 1001])[..8]);
        assert_eq!(decoder().decode(&mut buf), Err(WireError::TooBig));
        // A message over the limit in fragments that are each within it.
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&masked(0x01, &[b'x'; 900]));
        buf.extend_from_slice(&masked(0x80, &[b'x'; 900]));
        assert_eq!(decoder().decode(&mut buf), Err(WireError::TooBig));
        // A second message started inside a fragmented one.
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&masked(0x01, b"a"));
        buf.extend_from_slice(&masked(0x81, b"b"));
        assert_eq!(
            decoder().decode(&mut buf),
            Err(WireError::Protocol("new message inside a fragmented one"))
        );
    }

    #[test]
    fn binary_and_long_lengths() {
        let mut d = Decoder::new(100_000, 100_000);
        let mut buf = BytesMut::from(&masked(0x82, &[7; 70_000])[..]);
        assert_eq!(
            d.decode(&mut buf).unwrap(),
            Some(Incoming::Binary(vec![7; 70_000]))
        );
        let text = "y".repeat(300);
        let mut buf = BytesMut::from(&masked(0x81, text.as_bytes())[..]);
        assert_eq!(d.decode(&mut buf).unwrap(), Some(Incoming::Text(text)));
    }
}
