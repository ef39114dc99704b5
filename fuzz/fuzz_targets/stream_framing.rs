//! Any byte stream: the STUN/ChannelData framer must consume it or reject it, never loop or panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::listener::tcp::{next_frame, Frame};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some(f)) = next_frame(rest) {
        let n = match f {
            Frame::Stun(n) => n,
            Frame::ChannelData { consumed, .. } => consumed,
        };
        assert!(n > 0 && n <= rest.len());
        rest = &rest[n..];
    }
});
