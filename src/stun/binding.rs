//! The Binding responder: a pure function from a request and its source to a response.

use super::codec::{attr, method, Class, Encoder, Message};
use std::net::SocketAddr;

/// Attributes a Binding request may carry that we understand (or safely ignore).
const KNOWN: &[u16] = &[
    attr::MAPPED_ADDRESS,
    attr::USERNAME,
    attr::MESSAGE_INTEGRITY,
    attr::MESSAGE_INTEGRITY_SHA256,
    attr::ERROR_CODE,
    attr::UNKNOWN_ATTRIBUTES,
    attr::REALM,
    attr::NONCE,
    attr::PASSWORD_ALGORITHM,
    attr::USERHASH,
    attr::XOR_MAPPED_ADDRESS,
    attr::PRIORITY,
    attr::USE_CANDIDATE,
    attr::PADDING,
    attr::RESPONSE_PORT,
    attr::CHANGE_REQUEST,
];

/// What the responder decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A success response was written.
    Success,
    /// An error response was written with this code.
    Error(u16),
    /// Nothing to send (indication or response class).
    Ignored,
}

impl Outcome {
    /// Short label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Error(_) => "error",
            Outcome::Ignored => "ignored",
        }
    }
}

/// Answer a Binding message from `src`, appending the response to `out`.
///
/// `local` is the address the request arrived on, reported as RESPONSE-ORIGIN when known;
/// `mapped_address` adds MAPPED-ADDRESS for clients that read only that (`turn.mapped_address`).
pub fn respond(
    req: &Message<'_>,
    src: SocketAddr,
    local: Option<SocketAddr>,
    software: &str,
    mapped_address: bool,
    out: &mut Vec<u8>,
) -> Outcome {
    if req.method() != method::BINDING || req.class() != Class::Request {
        return Outcome::Ignored;
    }
    let tid = req.transaction_id();
    let mut unknown = [0u16; 8];
    let mut n = req.unknown_required(KNOWN, &mut unknown);
    // CHANGE-REQUEST asks for RFC 5780 NAT behaviour discovery, which needs a second
    // address; a request with its flags set is refused as "not understood".
    if let Some(v) = req.get(attr::CHANGE_REQUEST) {
        if v.iter().any(|b| *b != 0) && n < unknown.len() {
            unknown[n] = attr::CHANGE_REQUEST;
            n += 1;
        }
    }
    if n > 0 {
        let mut e = Encoder::new(out, method::BINDING, Class::Error, &tid);
        e.error_code(420, "Unknown Attribute");
        e.unknown_attributes(&unknown[..n]);
        e.software(software);
        finish(e, req.has_fingerprint());
        return Outcome::Error(420);
    }
    let mut e = Encoder::new(out, method::BINDING, Class::Success, &tid);
    e.xor_address(attr::XOR_MAPPED_ADDRESS, src);
    if mapped_address {
        e.address(attr::MAPPED_ADDRESS, src);
    }
    if let Some(l) = local.filter(|l| !l.ip().is_unspecified()) {
        e.address(attr::RESPONSE_ORIGIN, l);
    }
    e.software(software);
    finish(e, req.has_fingerprint());
    Outcome::Success
}

fn finish(e: Encoder<'_>, fingerprint: bool) {
    if fingerprint {
        e.finish_with_fingerprint()
    } else {
        e.finish()
    }
}

/// Build a Binding request, for tests, benches and health checks.
pub fn request(tid: &[u8; 12], fingerprint: bool, out: &mut Vec<u8>) {
    let e = Encoder::new(out, method::BINDING, Class::Request, tid);
    finish(e, fingerprint);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stun::codec::decode_address;

    #[test]
    fn success_carries_both_addresses_and_software() {
        let mut req = Vec::new();
        request(&[3; 12], true, &mut req);
        let m = Message::parse(&req).unwrap();
        let src: SocketAddr = "203.0.113.5:40000".parse().unwrap();
        let mut out = Vec::new();
        let o = respond(
            &m,
            src,
            Some("192.0.2.1:3478".parse().unwrap()),
            "sb",
            true,
            &mut out,
        );
        assert_eq!(o, Outcome::Success);
        let r = Message::parse(&out).unwrap();
        assert_eq!(r.class(), Class::Success);
        assert_eq!(r.transaction_id(), [3; 12]);
        assert!(r.has_fingerprint());
        assert_eq!(
            r.xor_address(attr::XOR_MAPPED_ADDRESS).unwrap().unwrap(),
            src
        );
        assert_eq!(
            decode_address(r.get(attr::MAPPED_ADDRESS).unwrap()).unwrap(),
            src
        );
        assert_eq!(r.get(attr::SOFTWARE).unwrap(), b"sb");
    }

    #[test]
    fn lean_answer_has_no_mapped_address_nor_software() {
        let mut req = Vec::new();
        request(&[3; 12], false, &mut req);
        let m = Message::parse(&req).unwrap();
        let src: SocketAddr = "203.0.113.5:40000".parse().unwrap();
        let mut out = Vec::new();
        let local = Some("192.0.2.1:3478".parse().unwrap());
        assert_eq!(
            respond(&m, src, local, "", false, &mut out),
            Outcome::Success
        );
        let r = Message::parse(&out).unwrap();
        assert_eq!(
            r.xor_address(attr::XOR_MAPPED_ADDRESS).unwrap().unwrap(),
            src
        );
        assert!(r.get(attr::MAPPED_ADDRESS).is_none());
        assert!(r.get(attr::SOFTWARE).is_none());
        // Header, XOR-MAPPED-ADDRESS and RESPONSE-ORIGIN (IPv4): 20 + 12 + 12.
        assert_eq!(out.len(), 44);
    }

    #[test]
    fn no_fingerprint_when_request_had_none() {
        let mut req = Vec::new();
        request(&[4; 12], false, &mut req);
        let m = Message::parse(&req).unwrap();
        let mut out = Vec::new();
        respond(
            &m,
            "[2001:db8::1]:5".parse().unwrap(),
            None,
            "sb",
            true,
            &mut out,
        );
        let r = Message::parse(&out).unwrap();
        assert!(!r.has_fingerprint());
        assert_eq!(
            r.xor_address(attr::XOR_MAPPED_ADDRESS).unwrap().unwrap(),
            "[2001:db8::1]:5".parse().unwrap()
        );
    }

    #[test]
    fn unknown_required_attribute_gets_420() {
        let mut req = Vec::new();
        let mut e = Encoder::new(&mut req, method::BINDING, Class::Request, &[5; 12]);
        e.attr(0x7777, b"abcd");
        e.attr(0xC001, b"optional is fine");
        e.finish();
        let m = Message::parse(&req).unwrap();
        let mut out = Vec::new();
        assert_eq!(
            respond(&m, "1.2.3.4:5".parse().unwrap(), None, "sb", true, &mut out),
            Outcome::Error(420)
        );
        let r = Message::parse(&out).unwrap();
        assert_eq!(r.class(), Class::Error);
        assert_eq!(r.get(attr::UNKNOWN_ATTRIBUTES).unwrap(), &[0x77, 0x77]);
        let (code, _) =
            crate::stun::codec::decode_error_code(r.get(attr::ERROR_CODE).unwrap()).unwrap();
        assert_eq!(code, 420);
    }

    #[test]
    fn indications_and_responses_are_ignored() {
        let mut buf = Vec::new();
        Encoder::new(&mut buf, method::BINDING, Class::Indication, &[1; 12]).finish();
        let m = Message::parse(&buf).unwrap();
        let mut out = Vec::new();
        assert_eq!(
            respond(&m, "1.2.3.4:5".parse().unwrap(), None, "sb", true, &mut out),
            Outcome::Ignored
        );
        assert!(out.is_empty());
    }
}
