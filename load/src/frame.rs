//! RFC 6455 framing, byte by byte and without I/O: frames built masked (as a client sends
//! them) or not (as a server does), a frame's head parsed from the front of a buffer, the
//! upgrade's accept key and request. The load tool's client (`wire.rs`), the floor and the
//! service's raw-wire tests all frame through this one module, so a mistake here shows up in
//! every one of them instead of hiding in one copy.

use std::ops::Range;

use base64::Engine;
use sha1::{Digest, Sha1};

pub const FIN: u8 = 0x80;
pub const TEXT: u8 = 0x1;
pub const BINARY: u8 = 0x2;
pub const CLOSE: u8 = 0x8;
pub const PING: u8 = 0x9;
pub const PONG: u8 = 0xA;

/// The GUID RFC 6455 (1.3) appends to the client's key to derive the accept value.
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// A frame whose first byte is `first` (FIN, reserved bits and opcode, as the caller wants
/// them), its length in whichever of the three forms it needs, masked under `mask` if given.
pub fn encode(first: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let bit = if mask.is_some() { 0x80 } else { 0 };
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(first);
    match payload.len() {
        n if n < 126 => out.push(bit | n as u8),
        n if n <= u16::MAX as usize => {
            out.push(bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(key) => {
            out.extend_from_slice(&key);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i & 3]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// A whole client frame: always masked (RFC 6455, 5.3).
#[inline]
pub fn masked(opcode: u8, payload: &[u8], key: [u8; 4]) -> Vec<u8> {
    encode(FIN | opcode, payload, Some(key))
}

/// A whole server frame: never masked.
#[inline]
pub fn unmasked(opcode: u8, payload: &[u8]) -> Vec<u8> {
    encode(FIN | opcode, payload, None)
}

/// Undoes (or applies) a mask in place.
#[inline]
pub fn unmask(payload: &mut [u8], key: [u8; 4]) {
    for (i, b) in payload.iter_mut().enumerate() {
        *b ^= key[i & 3];
    }
}

/// Where the frame at the start of `bytes` has its mask key (if any) and payload, and the
/// payload's length, once the length field is there.
#[inline]
pub fn lengths(bytes: &[u8]) -> Option<(usize, u64)> {
    Some(match *bytes.get(1)? & 0x7F {
        126 => (
            4,
            u16::from_be_bytes([*bytes.get(2)?, *bytes.get(3)?]) as u64,
        ),
        127 => (10, u64::from_be_bytes(bytes.get(2..10)?.try_into().ok()?)),
        n => (2, n as u64),
    })
}

/// The whole length of the frame at the start of `bytes`, once its length field is there.
#[inline]
pub fn frame_len(bytes: &[u8]) -> Option<usize> {
    let (at, len) = lengths(bytes)?;
    let key = if bytes[1] & 0x80 != 0 { 4 } else { 0 };
    Some((at + key).saturating_add(usize::try_from(len).unwrap_or(usize::MAX)))
}

/// A whole frame's place at the start of a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// FIN, reserved bits and opcode.
    pub first: u8,
    pub mask: Option<[u8; 4]>,
    /// The payload's bytes (still masked, if `mask` is set).
    pub payload: Range<usize>,
}

impl Head {
    #[inline]
    pub fn fin(&self) -> bool {
        self.first & FIN != 0
    }

    #[inline]
    pub fn opcode(&self) -> u8 {
        self.first & 0x0F
    }

    /// Where the next frame starts.
    #[inline]
    pub fn end(&self) -> usize {
        self.payload.end
    }
}

/// The head of the frame at the start of `bytes`: None until all of the frame is there.
#[inline]
pub fn head(bytes: &[u8]) -> Option<Head> {
    let (mut at, len) = lengths(bytes)?;
    let mask = if bytes[1] & 0x80 != 0 {
        let key: [u8; 4] = bytes.get(at..at + 4)?.try_into().ok()?;
        at += 4;
        Some(key)
    } else {
        None
    };
    let end = at.checked_add(usize::try_from(len).ok()?)?;
    (bytes.len() >= end).then_some(Head {
        first: bytes[0],
        mask,
        payload: at..end,
    })
}

/// The `Sec-WebSocket-Accept` value that answers a client's `Sec-WebSocket-Key`.
pub fn accept_key(key: &[u8]) -> String {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// A client's `Sec-WebSocket-Key`: 16 bytes from `seed`, in base64.
pub fn client_key(seed: u32) -> String {
    base64::engine::general_purpose::STANDARD.encode(seed.to_le_bytes().repeat(4))
}

/// An upgrade request, with the parts a test may spoil and the headers (each ending in
/// `\r\n`) that carry the token.
pub struct Upgrade<'a> {
    pub path: &'a str,
    pub host: &'a str,
    pub http: &'a str,
    pub version: &'a str,
    pub key: &'a str,
    pub extra: &'a str,
}

impl Upgrade<'_> {
    pub fn request(&self) -> String {
        let Upgrade {
            path,
            host,
            http,
            version,
            key,
            extra,
        } = self;
        format!(
            "GET {path} {http}\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: {version}\r\n{extra}\r\n"
        )
    }
}

/// The value of header `name` in a request or response head.
pub fn header_value<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Why a response head is not the 101 that answers `key`.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum UpgradeRefused {
    #[error("not an HTTP response: {0:?}")]
    NotHttp(String),
    #[error("HTTP status {0}")]
    Status(u16),
    #[error("wrong Sec-WebSocket-Accept")]
    WrongAccept,
}

/// Checks a response head: status 101 with the accept value that answers `key`.
pub fn check_response(head: &str, key: &str) -> Result<(), UpgradeRefused> {
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| UpgradeRefused::NotHttp(head.to_string()))?;
    if status != 101 {
        return Err(UpgradeRefused::Status(status));
    }
    match header_value(head, "sec-websocket-accept") {
        Some(accept) if accept == accept_key(key.as_bytes()) => Ok(()),
        _ => Err(UpgradeRefused::WrongAccept),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_6455_examples_are_built_and_parsed() {
        // RFC 6455, 5.7: a single-frame masked and unmasked text message.
        let key = [0x37, 0xfa, 0x21, 0x3d];
        let hello = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        assert_eq!(masked(TEXT, b"Hello", key), hello);
        assert_eq!(unmasked(TEXT, b"Hello"), b"\x81\x05Hello");
        let h = head(&hello).unwrap();
        assert_eq!((h.fin(), h.opcode(), h.mask), (true, TEXT, Some(key)));
        let mut payload = hello[h.payload].to_vec();
        unmask(&mut payload, key);
        assert_eq!(payload, b"Hello");
        // RFC 6455, 1.3.
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn every_length_form_is_whole_only_with_its_last_byte() {
        for len in [0, 125, 126, 65_535, 65_536, 70_000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            for frame in [
                unmasked(PONG, &payload),
                masked(PONG, &payload, [1, 2, 3, 4]),
            ] {
                assert_eq!(frame_len(&frame), Some(frame.len()), "{len}");
                assert_eq!(head(&frame[..frame.len() - 1]), None, "{len}: incomplete");
                let h = head(&frame).unwrap();
                assert_eq!(h.end(), frame.len(), "{len}");
                let mut got = frame[h.payload.clone()].to_vec();
                if let Some(key) = h.mask {
                    unmask(&mut got, key);
                }
                assert_eq!(got, payload, "{len}");
            }
        }
    }

    #[test]
    fn a_response_is_checked_for_its_status_and_accept_value() {
        let key = client_key(7);
        let ok = format!(
            "HTTP/1.1 101 Switching Protocols\r\nsec-websocket-accept: {}\r\n\r\n",
            accept_key(key.as_bytes())
        );
        assert_eq!(check_response(&ok, &key), Ok(()));
        let refused = "HTTP/1.1 401 Unauthorized\r\n\r\n";
        assert_eq!(
            check_response(refused, &key),
            Err(UpgradeRefused::Status(401))
        );
        let wrong = "HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: x\r\n\r\n";
        assert_eq!(
            check_response(wrong, &key),
            Err(UpgradeRefused::WrongAccept)
        );
        assert!(matches!(
            check_response("garbage", &key),
            Err(UpgradeRefused::NotHttp(_))
        ));
    }
}
