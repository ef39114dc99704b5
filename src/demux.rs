//! What a connection on the shared port speaks, decided from its first bytes and its ALPN.
//! Pure functions (sans-IO), so the rules are unit-tested and the listener stays a thin shell.

use crate::stun::codec::MAGIC_COOKIE;

/// ALPN for TURN over TLS (RFC 7443).
pub const ALPN_TURN: &[u8] = b"stun.turn";
/// ALPN for HTTP/1.1 (the HTTP server speaks HTTP/1.1 only, so `h2` is not offered).
pub const ALPN_HTTP1: &[u8] = b"http/1.1";
/// Every protocol the shared port offers in ALPN, in the server's order of preference.
pub const ALPN_SHARED: [&[u8]; 2] = [ALPN_TURN, ALPN_HTTP1];

/// Most bytes of a plain HTTP request head read before answering it (the redirect).
pub const HTTP_HEAD_MAX: usize = 4096;

/// What the first bytes of a fresh TCP connection are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opening {
    /// Not enough bytes yet to tell.
    NeedMore,
    /// A TLS record (first byte 0x16, a handshake).
    Tls,
    /// A STUN header (top two bits 0, magic cookie): plain TURN over TCP.
    Stun,
    /// An HTTP/1.x request line: plain HTTP.
    Http,
    /// None of these.
    Garbage,
}

/// Classify the opening bytes of a connection before any TLS.
pub fn classify_opening(buf: &[u8]) -> Opening {
    let Some(&b0) = buf.first() else {
        return Opening::NeedMore;
    };
    if b0 == 0x16 {
        // A STUN type 0x16xx is not a defined method, so 0x16 is always TLS here.
        return Opening::Tls;
    }
    if b0 & 0xC0 == 0 {
        return match stun_header(buf) {
            Some(true) => Opening::Stun,
            Some(false) => Opening::Garbage,
            None => Opening::NeedMore,
        };
    }
    // An HTTP method: 1 to 16 uppercase letters, then a space.
    let method_len = buf.iter().take_while(|b| b.is_ascii_uppercase()).count();
    match buf.get(method_len) {
        Some(b' ') if method_len > 0 => Opening::Http,
        None if method_len < 16 => Opening::NeedMore,
        _ => Opening::Garbage,
    }
}

/// `Some(true)` for a STUN header (top two bits 0, magic cookie), `None` when under 8 bytes.
fn stun_header(buf: &[u8]) -> Option<bool> {
    let head = buf.get(..8)?;
    Some(head[0] & 0xC0 == 0 && head[4..8] == MAGIC_COOKIE.to_be_bytes())
}

/// Where a TLS connection goes once its handshake is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inner {
    /// Not enough application bytes yet to tell (only without ALPN).
    NeedMore,
    /// TURN over TLS.
    Turn,
    /// HTTPS or WSS.
    Http,
    /// An ACME TLS-ALPN-01 validation: the handshake was the whole answer; close.
    AcmeValidation,
}

/// Route a TLS connection: by ALPN when the client sent one, else by its first bytes (a STUN
/// header goes to TURN, anything else to HTTP).
pub fn classify_inner(alpn: Option<&[u8]>, first: &[u8]) -> Inner {
    match alpn {
        Some(ALPN_TURN) => Inner::Turn,
        Some(crate::tls::ALPN_ACME) => Inner::AcmeValidation,
        Some(_) => Inner::Http,
        None => match first.first() {
            None => Inner::NeedMore,
            Some(b) if b & 0xC0 != 0 => Inner::Http,
            Some(_) => match stun_header(first) {
                Some(true) => Inner::Turn,
                Some(false) => Inner::Http,
                None => Inner::NeedMore,
            },
        },
    }
}

/// What to answer a plain HTTP request on the shared port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlainHttp {
    /// The request head is not complete yet.
    NeedMore,
    /// Write these bytes, then close.
    Answer(Vec<u8>),
}

/// Answer a plain HTTP request head with a 308 redirect to the same path over `https://`
/// (on `https_port`), or 400 when it names no usable Host. Never proxies anything.
pub fn plain_http_answer(head: &[u8], https_port: u16) -> PlainHttp {
    let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if head.len() >= HTTP_HEAD_MAX {
            PlainHttp::Answer(bad_request())
        } else {
            PlainHttp::NeedMore
        };
    };
    let Ok(text) = std::str::from_utf8(&head[..end]) else {
        return PlainHttp::Answer(bad_request());
    };
    let mut lines = text.split("\r\n");
    let target = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .filter(|t| t.starts_with('/') && t.bytes().all(|b| b.is_ascii_graphic()));
    let host = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("host"))
        .map(|(_, v)| v.trim())
        .and_then(host_only)
        .filter(|h| {
            !h.is_empty()
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-.[]:".contains(&b))
        });
    let (Some(target), Some(host)) = (target, host) else {
        return PlainHttp::Answer(bad_request());
    };
    let port = if https_port == 443 {
        String::new()
    } else {
        format!(":{https_port}")
    };
    PlainHttp::Answer(
        format!(
            "HTTP/1.1 308 Permanent Redirect\r\nLocation: https://{host}{port}{target}\r\n\
             Content-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .into_bytes(),
    )
}

/// `name:port`, `[v6]:port`, `name` → the host without its port.
fn host_only(h: &str) -> Option<&str> {
    if h.starts_with('[') {
        return h.find(']').map(|i| &h[..=i]);
    }
    Some(match h.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => h,
    })
}

fn bad_request() -> Vec<u8> {
    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first 48 bytes of a ClientHello recorded from `openssl s_client -alpn stun.turn`
    /// (OpenSSL 3.0): record type 0x16, record version TLS 1.0, handshake type 1.
    const OPENSSL_HELLO: &[u8] = &[
        0x16, 0x03, 0x01, 0x01, 0x4d, 0x01, 0x00, 0x01, 0x49, 0x03, 0x03, 0x12, 0x68, 0xc9, 0x43,
        0x12, 0xe3, 0x7e, 0x97, 0xa4, 0xfb, 0x0b, 0x0e, 0x5d, 0xde, 0xd4, 0x1b, 0xe8, 0x9f, 0x24,
        0x26, 0x20, 0xa6, 0x08, 0x81, 0x91, 0xca, 0x8c, 0xa9, 0x45, 0x22, 0xe7, 0x0e, 0x20, 0x5e,
        0x01, 0xa6, 0x9d,
    ];

    fn stun_binding() -> Vec<u8> {
        let mut req = Vec::new();
        crate::stun::binding::request(&[7; 12], true, &mut req);
        req
    }

    /// A ClientHello as rustls really writes it, with the given ALPN list.
    fn rustls_hello(alpn: &[&[u8]]) -> Vec<u8> {
        use std::sync::Arc;
        let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let name = rustls_pki_types::ServerName::try_from("turn.example.com").expect("name");
        let mut c = rustls::ClientConnection::new(Arc::new(cfg), name).expect("client");
        let mut out = Vec::new();
        c.write_tls(&mut out).expect("hello");
        out
    }

    #[test]
    fn tls_is_recognised_from_its_first_byte() {
        assert_eq!(classify_opening(OPENSSL_HELLO), Opening::Tls);
        assert_eq!(classify_opening(&OPENSSL_HELLO[..1]), Opening::Tls);
        assert_eq!(classify_opening(&rustls_hello(&[ALPN_TURN])), Opening::Tls);
        assert_eq!(classify_opening(&rustls_hello(&[])), Opening::Tls);
    }

    #[test]
    fn stun_needs_the_magic_cookie() {
        let req = stun_binding();
        assert_eq!(classify_opening(&req), Opening::Stun);
        assert_eq!(classify_opening(&req[..8]), Opening::Stun);
        for n in 0..8 {
            assert_eq!(classify_opening(&req[..n]), Opening::NeedMore, "{n} bytes");
        }
        let mut bad = req.clone();
        bad[6] ^= 1;
        assert_eq!(classify_opening(&bad), Opening::Garbage);
        // ChannelData (0x40..) before any Allocate is not an opening.
        assert_eq!(classify_opening(b"\x40\x00\x00\x04abcd"), Opening::Garbage);
    }

    #[test]
    fn plain_http_and_garbage() {
        assert_eq!(classify_opening(b"GET / HTTP/1.1\r\n"), Opening::Http);
        assert_eq!(classify_opening(b"OPTIONS "), Opening::Http);
        assert_eq!(classify_opening(b"GE"), Opening::NeedMore);
        assert_eq!(classify_opening(b"get / HTTP/1.1"), Opening::Garbage);
        assert_eq!(classify_opening(b"\xff\xfe"), Opening::Garbage);
        assert_eq!(classify_opening(b"SSH-2.0-OpenSSH"), Opening::Garbage);
        assert_eq!(classify_opening(&[b'A'; 20]), Opening::Garbage);
    }

    #[test]
    fn alpn_decides_when_present() {
        let req = stun_binding();
        assert_eq!(classify_inner(Some(ALPN_TURN), b""), Inner::Turn);
        assert_eq!(classify_inner(Some(ALPN_HTTP1), &req), Inner::Http);
        assert_eq!(classify_inner(Some(b"h2"), b""), Inner::Http);
        assert_eq!(
            classify_inner(Some(b"acme-tls/1"), b""),
            Inner::AcmeValidation
        );
    }

    #[test]
    fn without_alpn_the_first_bytes_decide() {
        let req = stun_binding();
        assert_eq!(classify_inner(None, &req), Inner::Turn);
        assert_eq!(classify_inner(None, &req[..7]), Inner::NeedMore);
        assert_eq!(classify_inner(None, b""), Inner::NeedMore);
        assert_eq!(classify_inner(None, b"GET /v1/ws HTTP/1.1"), Inner::Http);
        // Top bits 0 but no cookie: not STUN, so HTTP (which then refuses it).
        assert_eq!(classify_inner(None, b"\x00\x01\x00\x00abcd"), Inner::Http);
    }

    fn answer(head: &[u8], port: u16) -> String {
        match plain_http_answer(head, port) {
            PlainHttp::Answer(a) => String::from_utf8(a).expect("ascii"),
            PlainHttp::NeedMore => "need more".into(),
        }
    }

    #[test]
    fn plain_http_is_redirected_to_https() {
        let a = answer(
            b"GET /v1/info?x=1 HTTP/1.1\r\nHost: turn.example.com\r\n\r\n",
            443,
        );
        assert!(a.starts_with("HTTP/1.1 308 "), "{a}");
        assert!(
            a.contains("\r\nLocation: https://turn.example.com/v1/info?x=1\r\n"),
            "{a}"
        );
        let a = answer(b"GET / HTTP/1.1\r\nhost: 10.0.0.1:8443\r\n\r\n", 8443);
        assert!(a.contains("Location: https://10.0.0.1:8443/\r\n"), "{a}");
        let a = answer(b"GET / HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n\r\n", 443);
        assert!(a.contains("Location: https://[2001:db8::1]/\r\n"), "{a}");
        assert_eq!(answer(b"GET / HTTP/1.1\r\nHost: a", 443), "need more");
    }

    #[test]
    fn bad_plain_requests_get_400() {
        for head in [
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: evil.com\rX: y\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
            b"GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n",
        ] {
            assert!(answer(head, 443).starts_with("HTTP/1.1 400 "), "{head:?}");
        }
        let big = vec![b'a'; HTTP_HEAD_MAX];
        assert!(answer(&big, 443).starts_with("HTTP/1.1 400 "));
    }
}
