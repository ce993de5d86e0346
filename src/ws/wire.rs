//! WebSocket framing (RFC 6455), server side: control frames out, client frames in. Data
//! frames out are [`Frame`]s (`frame.rs`), encoded once for every recipient.
//!
//! Client frames are read by [`Decoder`] from whatever the socket has given so far. Anything
//! RFC 6455 forbids a client to send (unmasked frames, reserved bits or opcodes, fragmented or
//! long control frames, a continuation out of place, a 64-bit length with its top bit set, a
//! close code no endpoint may send) is a [`WireError::Protocol`]. Text is checked as it
//! arrives: a fragment that cannot begin or continue valid UTF-8 fails the message at once,
//! not when its last fragment comes.

use bytes::{Buf, Bytes, BytesMut};

/// Control frames carry at most this many payload bytes.
const MAX_CONTROL: usize = 125;

use crate::frame::opcode;

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
    /// A fragmented message so far. Boxed: every idle session holds a decoder, and few
    /// messages come in fragments.
    partial: Option<Box<Partial>>,
    /// A close frame came, valid or not: the client has ended its side of the handshake.
    peer_closed: bool,
}

/// The fragments of a message received so far.
#[derive(Debug)]
struct Partial {
    op: u8,
    data: Vec<u8>,
    /// For text: where the unchecked bytes start. Everything before is whole, valid UTF-8;
    /// from here on lies at most an unfinished sequence of up to 3 bytes that the next
    /// fragment may complete.
    checked: usize,
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
            peer_closed: false,
        }
    }

    /// Whether the client has sent a close frame, even one refused as malformed: no close
    /// reply will follow it, so a connection failed because of it has nothing left to wait for.
    pub fn peer_closed(&self) -> bool {
        self.peer_closed
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
                let len = u64::from_be_bytes(n);
                // RFC 6455 5.2: the most significant bit must be 0. Such a length is not a
                // big message but a malformed frame, whatever the limits.
                if len >> 63 != 0 {
                    return Err(WireError::Protocol("64-bit length with its top bit set"));
                }
                (len, 10)
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
            opcode::CLOSE => {
                self.peer_closed = true;
                close_code(&f.payload).map(|code| Some(Incoming::Close(code)))
            }
            opcode::PING => Ok(Some(Incoming::Ping(f.payload.freeze()))),
            opcode::PONG => Ok(Some(Incoming::Pong)),
            opcode::CONTINUATION => {
                let mut partial = self
                    .partial
                    .take()
                    .ok_or(WireError::Protocol("continuation without a message"))?;
                if partial.data.len() + f.payload.len() > self.max_message {
                    return Err(WireError::TooBig);
                }
                partial.data.extend_from_slice(&f.payload);
                self.complete(f.fin, partial)
            }
            opcode::TEXT | opcode::BINARY => {
                if self.partial.is_some() {
                    return Err(WireError::Protocol("new message inside a fragmented one"));
                }
                if f.payload.len() > self.max_message {
                    return Err(WireError::TooBig);
                }
                let partial = Box::new(Partial {
                    op: f.op,
                    data: f.payload.to_vec(),
                    checked: 0,
                });
                self.complete(f.fin, partial)
            }
            _ => Err(WireError::Protocol("reserved opcode")),
        }
    }

    fn complete(
        &mut self,
        fin: bool,
        mut partial: Box<Partial>,
    ) -> Result<Option<Incoming>, WireError> {
        if !fin {
            if partial.op == opcode::TEXT {
                partial.checked = check_text_so_far(&partial.data, partial.checked)?;
            }
            self.partial = Some(partial);
            return Ok(None);
        }
        match partial.op {
            opcode::TEXT => String::from_utf8(partial.data)
                .map(|t| Some(Incoming::Text(t)))
                .map_err(|_| WireError::Utf8),
            _ => Ok(Some(Incoming::Binary(partial.data))),
        }
    }
}

/// Checks the text of an unfinished message from `from` on, and returns where the next check
/// starts: its end, or the start of a sequence the next fragment may still complete. Only the
/// bytes not yet known valid are read again, so a message is checked in linear time.
fn check_text_so_far(data: &[u8], from: usize) -> Result<usize, WireError> {
    match std::str::from_utf8(&data[from..]) {
        Ok(_) => Ok(data.len()),
        // `error_len` is None only for a valid sequence cut short by the end of the input.
        Err(e) if e.error_len().is_none() => Ok(from + e.valid_up_to()),
        Err(_) => Err(WireError::Utf8),
    }
}

/// A close frame's code, one a client may send; its reason must be UTF-8.
fn close_code(payload: &[u8]) -> Result<Option<u16>, WireError> {
    match payload.len() {
        0 => Ok(None),
        1 => Err(WireError::Protocol("close frame of one byte")),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !sendable_close_code(code) {
                return Err(WireError::Protocol("invalid close code"));
            }
            std::str::from_utf8(&payload[2..]).map_err(|_| WireError::Utf8)?;
            Ok(Some(code))
        }
    }
}

/// RFC 6455 7.4: the codes defined for an endpoint to send, and the ranges left to libraries
/// (3000-3999) and applications (4000-4999). 1004 is reserved, 1005, 1006 and 1015 must never
/// be sent, and the rest of 0-2999 is unassigned.
fn sendable_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
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
    fn close_codes_a_client_may_send() {
        for code in [
            1000, 1001, 1002, 1003, 1007, 1010, 1011, 1014, 3000, 3999, 4000, 4999,
        ] {
            let mut buf = BytesMut::from(&masked(0x88, &code_payload(code, b"bye"))[..]);
            assert_eq!(
                decoder().decode(&mut buf),
                Ok(Some(Incoming::Close(Some(code)))),
                "{code}"
            );
        }
        let mut buf = BytesMut::from(&masked(0x88, b"")[..]);
        assert_eq!(decoder().decode(&mut buf), Ok(Some(Incoming::Close(None))));
    }

    #[test]
    fn close_codes_no_endpoint_may_send() {
        let invalid = [
            0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
        ];
        for code in invalid {
            let mut buf = BytesMut::from(&masked(0x88, &code_payload(code, b""))[..]);
            assert_eq!(
                decoder().decode(&mut buf),
                Err(WireError::Protocol("invalid close code")),
                "{code}"
            );
        }
        let mut buf = BytesMut::from(&masked(0x88, &code_payload(1000, &[0xCE, 0xBA, 0xFF]))[..]);
        assert_eq!(decoder().decode(&mut buf), Err(WireError::Utf8));
    }

    #[test]
    fn a_refused_close_frame_still_ends_the_clients_side() {
        for payload in [
            &[0x03][..],
            &code_payload(999, b""),
            &code_payload(1000, &[0xFF]),
        ] {
            let mut d = decoder();
            assert!(!d.peer_closed());
            let mut buf = BytesMut::from(&masked(0x88, payload)[..]);
            assert!(d.decode(&mut buf).is_err());
            assert!(d.peer_closed(), "{payload:?}");
        }
        let mut d = decoder();
        let mut buf = BytesMut::from(&masked(0x81, b"\xFF")[..]);
        assert_eq!(d.decode(&mut buf), Err(WireError::Utf8));
        assert!(!d.peer_closed(), "a bad text message is no close");
    }

    fn code_payload(code: u16, reason: &[u8]) -> Vec<u8> {
        let mut payload = code.to_be_bytes().to_vec();
        payload.extend_from_slice(reason);
        payload
    }

    #[test]
    fn a_64_bit_length_with_its_top_bit_set_is_malformed() {
        let mut wire = vec![0x81, 0x80 | 127];
        wire.extend_from_slice(&(1u64 << 63 | 5).to_be_bytes());
        wire.extend_from_slice(&[0; 4]);
        let mut buf = BytesMut::from(&wire[..]);
        assert_eq!(
            decoder().decode(&mut buf),
            Err(WireError::Protocol("64-bit length with its top bit set"))
        );
        // Without the top bit, a length as absurd is only too big.
        wire[2..10].copy_from_slice(&(1u64 << 62 | 5).to_be_bytes());
        let mut buf = BytesMut::from(&wire[..]);
        assert_eq!(decoder().decode(&mut buf), Err(WireError::TooBig));
    }

    /// Feeds fragments one at a time; what each one gave.
    fn fragments(frames: &[Vec<u8>]) -> Vec<Result<Option<Incoming>, WireError>> {
        let mut d = decoder();
        let mut buf = BytesMut::new();
        frames
            .iter()
            .map(|f| {
                buf.extend_from_slice(f);
                d.decode(&mut buf)
            })
            .collect()
    }

    #[test]
    fn invalid_text_fails_at_the_fragment_that_breaks_it() {
        // Autobahn 6.4.1: the second fragment holds U+110000, past the last code point.
        let got = fragments(&[
            masked(0x01, "κόσμε".as_bytes()),
            masked(0x00, &[0xF4, 0x90, 0x80, 0x80]),
        ]);
        assert_eq!(got, [Ok(None), Err(WireError::Utf8)]);
        // A fragment that ends in a sequence no byte can complete fails at once too.
        for tail in [
            &[0xC0][..],
            &[0xF4, 0x90],
            &[0xE0, 0x80],
            &[0xED, 0xA0],
            &[0x80],
        ] {
            let mut first = b"ok".to_vec();
            first.extend_from_slice(tail);
            assert_eq!(
                fragments(&[masked(0x01, &first)]),
                [Err(WireError::Utf8)],
                "{tail:x?}"
            );
        }
        // A continuation that does not continue the sequence left open.
        let got = fragments(&[masked(0x01, &[b'a', 0xE2, 0x82]), masked(0x00, b"b")]);
        assert_eq!(got, [Ok(None), Err(WireError::Utf8)]);
    }

    #[test]
    fn a_character_may_straddle_fragments_until_the_last() {
        // U+1F600 in one byte per fragment, then a final fragment.
        let smile = "\u{1F600}".as_bytes();
        let mut frames: Vec<Vec<u8>> = vec![masked(0x01, &[b'<', smile[0]])];
        frames.extend(smile[1..].iter().map(|b| masked(0x00, &[*b])));
        frames.push(masked(0x80, b">"));
        let got = fragments(&frames);
        assert!(got[..4].iter().all(|r| *r == Ok(None)), "{got:?}");
        assert_eq!(got[4], Ok(Some(Incoming::Text("<\u{1F600}>".into()))));
        // Still unfinished when the message ends.
        let got = fragments(&[masked(0x01, b"a"), masked(0x80, &[0xE2, 0x82])]);
        assert_eq!(got, [Ok(None), Err(WireError::Utf8)]);
        // Binary messages are not text.
        let got = fragments(&[masked(0x02, &[0xFF]), masked(0x80, &[0xFE])]);
        assert_eq!(
            got,
            [Ok(None), Ok(Some(Incoming::Binary(vec![0xFF, 0xFE])))]
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

/// Decoding must not depend on how the socket happens to cut the stream into reads.
#[cfg(test)]
mod split_reads {
    use proptest::prelude::*;
    use proptest::sample::Index;

    use super::*;

    /// What a stream of client frames decodes to, read in `chunks` as the session reads them:
    /// every message up to the first error, and without an error, the bytes left undecoded.
    fn decode_in(chunks: &[&[u8]]) -> (Vec<Result<Incoming, WireError>>, Option<usize>) {
        let mut decoder = Decoder::new(256, 512);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for chunk in chunks {
            buf.extend_from_slice(chunk);
            loop {
                match decoder.decode(&mut buf) {
                    Ok(Some(message)) => out.push(Ok(message)),
                    Ok(None) => break,
                    Err(e) => {
                        out.push(Err(e));
                        return (out, None);
                    }
                }
            }
        }
        (out, Some(buf.len()))
    }

    /// A frame's bytes: masked with `mask`, or unmasked when it is None.
    fn frame(first: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut out = vec![first];
        let masked = if mask.is_some() { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => out.push(masked | n as u8),
            n if n <= 0xFFFF => {
                out.push(masked | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(masked | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        match mask {
            Some(mask) => {
                out.extend_from_slice(&mask);
                out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
            }
            None => out.extend_from_slice(payload),
        }
        out
    }

    fn mask() -> impl Strategy<Value = Option<[u8; 4]>> {
        prop_oneof![39 => any::<[u8; 4]>().prop_map(Some), 1 => Just(None)]
    }

    /// Text (now and then with one byte changed, so often no longer UTF-8) or binary.
    fn content() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            6 => "\\PC{0,120}".prop_map(String::into_bytes),
            2 => ("\\PC{1,120}", any::<Index>(), any::<u8>()).prop_map(|(text, at, byte)| {
                let mut bytes = text.into_bytes();
                let at = at.index(bytes.len());
                bytes[at] = byte;
                bytes
            }),
            1 => prop::collection::vec(any::<u8>(), 0..300),
        ]
    }

    /// A piece of a client's stream: a message in fragments (cut anywhere, even inside a
    /// character), a control frame, or bytes that need not be a frame at all.
    fn piece() -> impl Strategy<Value = Vec<u8>> {
        let message = (
            prop_oneof![Just(opcode::TEXT), Just(opcode::BINARY)],
            content(),
            prop::collection::vec(any::<Index>(), 0..4),
            prop::collection::vec(mask(), 5),
        )
            .prop_map(|(op, payload, cuts, masks)| {
                let mut cuts: Vec<usize> =
                    cuts.iter().map(|c| c.index(payload.len() + 1)).collect();
                cuts.sort_unstable();
                cuts.dedup();
                cuts.push(payload.len());
                let mut out = Vec::new();
                let mut start = 0;
                for (n, end) in cuts.iter().enumerate() {
                    let fin = if n + 1 == cuts.len() { 0x80 } else { 0 };
                    let op = if n == 0 { op } else { opcode::CONTINUATION };
                    out.extend(frame(fin | op, &payload[start..*end], masks[n]));
                    start = *end;
                }
                out
            });
        let control = (
            prop_oneof![
                Just(opcode::PING),
                Just(opcode::PONG),
                Just(opcode::CLOSE),
                Just(opcode::CLOSE | 0x70),
                Just(0x3),
            ],
            prop::collection::vec(any::<u8>(), 0..130),
            prop::bool::weighted(0.9),
            mask(),
        )
            .prop_map(|(op, payload, fin, mask)| {
                frame(op | if fin { 0x80 } else { 0 }, &payload, mask)
            });
        prop_oneof![
            8 => message,
            3 => control,
            1 => prop::collection::vec(any::<u8>(), 0..12),
        ]
    }

    /// A stream and where its reads end.
    fn stream_and_reads() -> impl Strategy<Value = (Vec<u8>, Vec<usize>)> {
        (
            prop::collection::vec(piece(), 1..8),
            prop::collection::vec(any::<Index>(), 0..24),
        )
            .prop_map(|(pieces, cuts)| {
                let stream = pieces.concat();
                let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(stream.len() + 1)).collect();
                cuts.sort_unstable();
                (stream, cuts)
            })
    }

    fn reads<'a>(stream: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
        let mut out = Vec::new();
        let mut start = 0;
        for &end in cuts.iter().chain([stream.len()].iter()) {
            out.push(&stream[start..end]);
            start = end;
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn decoding_does_not_depend_on_how_reads_cut_the_stream((stream, cuts) in stream_and_reads()) {
            let whole = decode_in(&[&stream]);
            prop_assert_eq!(&decode_in(&reads(&stream, &cuts)), &whole);
            let bytes: Vec<&[u8]> = stream.chunks(1).collect();
            prop_assert_eq!(&decode_in(&bytes), &whole);
        }
    }
}
