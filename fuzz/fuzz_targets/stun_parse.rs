//! Any datagram: parse, walk attributes, verify integrity, answer as the Binding responder.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::stun::codec::{decode_error_code, decode_u32, decode_xor_address};
use switchboard::stun::{binding, Message};

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Message::parse(data) {
        for a in m.attrs() {
            let _ = decode_xor_address(a.value, &data[4..20]);
            let _ = decode_error_code(a.value);
            let _ = decode_u32(a.value);
        }
        let _ = m.verify_integrity(b"key");
        let _ = m.verify_integrity_sha256(b"key");
        let mut out = Vec::new();
        let src = "192.0.2.1:1234".parse().expect("literal address");
        binding::respond(&m, src, None, "fuzz", true, &mut out);
        if !out.is_empty() {
            assert!(Message::parse(&out).is_ok(), "responses always parse");
        }
    }
});
