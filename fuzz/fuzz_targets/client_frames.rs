//! The client-frame decoder fed arbitrary bytes, split into reads at arbitrary points.
//!
//! Whatever the bytes, decoding must not panic, must stay within its limits, and must give
//! the same messages, the same error and the same bytes left over whether the stream comes in
//! one read or in many: the socket decides where reads end, never the client.
//!
//! The target compiles `src/ws/wire.rs` (and `src/frame.rs`, whose opcodes it reads) alone
//! rather than depending on the roomcast crate: the decoder needs nothing else, and the crate
//! would bring librdkafka into every fuzz build.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../src/frame.rs"]
mod frame;
#[allow(dead_code)]
#[path = "../../src/ws/wire.rs"]
mod wire;

use wire::{Decoder, Incoming, WireError};

/// Small limits, so that inputs of a few KiB reach them.
const MAX_FRAME: usize = 1024;
const MAX_MESSAGE: usize = 2048;

#[derive(Arbitrary, Debug)]
struct Input {
    /// Where reads end, as offsets into the stream (taken modulo its length, then sorted).
    cuts: Vec<u16>,
    stream: Vec<u8>,
}

/// Every message up to the first error, and without an error, the bytes left undecoded.
type Outcome = (Vec<Result<Incoming, WireError>>, Option<usize>);

fn decode_in(reads: &[&[u8]]) -> Outcome {
    let mut decoder = Decoder::new(MAX_FRAME, MAX_MESSAGE);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for read in reads {
        buf.extend_from_slice(read);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(message)) => {
                    if let Incoming::Text(text) = &message {
                        assert!(text.len() <= MAX_MESSAGE, "a text over the message limit");
                    }
                    out.push(Ok(message));
                }
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

fuzz_target!(|input: Input| {
    let stream = &input.stream[..];
    let whole = decode_in(&[stream]);
    let mut cuts: Vec<usize> = input
        .cuts
        .iter()
        .map(|&c| c as usize % (stream.len() + 1))
        .collect();
    cuts.sort_unstable();
    let mut reads = Vec::with_capacity(cuts.len() + 1);
    let mut start = 0;
    for end in cuts.into_iter().chain([stream.len()]) {
        reads.push(&stream[start..end]);
        start = end;
    }
    assert_eq!(decode_in(&reads), whole);
});
