//! The encoded server frame: a WebSocket (RFC 6455) header in front of its text, written once
//! when the frame is built, so every recipient's write is the very same bytes, with no framing,
//! copy or buffer per connection. Server frames are never masked and never fragmented. Both
//! the live path (`ws/`) and the replay (`resume/`) hold frames; neither owns the type.

use bytes::Bytes;

/// Bytes kept free in front of a frame being built: the longest header.
const HEADER_ROOM: usize = 10;

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
pub(crate) fn header(op: u8, len: usize) -> ([u8; HEADER_ROOM], usize) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
