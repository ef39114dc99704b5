//! STUN message codec (RFC 8489): borrowed zero-copy parsing and append-only encoding.
//!
//! Parsing never allocates and never panics on any input; encoding appends to a
//! caller-owned `Vec<u8>` so a reused buffer makes the hot path allocation-free.

use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::Sha256;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Fixed value in every STUN header since RFC 5389.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// Size of the STUN header.
pub const HEADER_LEN: usize = 20;
/// XOR constant of the FINGERPRINT attribute.
const FINGERPRINT_XOR: u32 = 0x5354_554e;

/// STUN and TURN method numbers.
pub mod method {
    /// RFC 8489 Binding.
    pub const BINDING: u16 = 0x001;
    /// RFC 8656 Allocate.
    pub const ALLOCATE: u16 = 0x003;
    /// RFC 8656 Refresh.
    pub const REFRESH: u16 = 0x004;
    /// RFC 8656 Send (indication).
    pub const SEND: u16 = 0x006;
    /// RFC 8656 Data (indication).
    pub const DATA: u16 = 0x007;
    /// RFC 8656 CreatePermission.
    pub const CREATE_PERMISSION: u16 = 0x008;
    /// RFC 8656 ChannelBind.
    pub const CHANNEL_BIND: u16 = 0x009;
    /// RFC 6062 Connect.
    pub const CONNECT: u16 = 0x00a;
    /// RFC 6062 ConnectionBind.
    pub const CONNECTION_BIND: u16 = 0x00b;
    /// RFC 6062 ConnectionAttempt (indication).
    pub const CONNECTION_ATTEMPT: u16 = 0x00c;
}

/// Attribute type numbers used by STUN and TURN.
pub mod attr {
    #![allow(missing_docs)]
    pub const MAPPED_ADDRESS: u16 = 0x0001;
    pub const CHANGE_REQUEST: u16 = 0x0003;
    pub const USERNAME: u16 = 0x0006;
    pub const MESSAGE_INTEGRITY: u16 = 0x0008;
    pub const ERROR_CODE: u16 = 0x0009;
    pub const UNKNOWN_ATTRIBUTES: u16 = 0x000A;
    pub const CHANNEL_NUMBER: u16 = 0x000C;
    pub const LIFETIME: u16 = 0x000D;
    pub const XOR_PEER_ADDRESS: u16 = 0x0012;
    pub const DATA: u16 = 0x0013;
    pub const REALM: u16 = 0x0014;
    pub const NONCE: u16 = 0x0015;
    pub const XOR_RELAYED_ADDRESS: u16 = 0x0016;
    pub const REQUESTED_ADDRESS_FAMILY: u16 = 0x0017;
    pub const EVEN_PORT: u16 = 0x0018;
    pub const REQUESTED_TRANSPORT: u16 = 0x0019;
    pub const DONT_FRAGMENT: u16 = 0x001A;
    pub const MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
    pub const PASSWORD_ALGORITHM: u16 = 0x001D;
    pub const USERHASH: u16 = 0x001E;
    pub const XOR_MAPPED_ADDRESS: u16 = 0x0020;
    pub const RESERVATION_TOKEN: u16 = 0x0022;
    pub const PRIORITY: u16 = 0x0024;
    pub const USE_CANDIDATE: u16 = 0x0025;
    pub const PADDING: u16 = 0x0026;
    pub const RESPONSE_PORT: u16 = 0x0027;
    pub const CONNECTION_ID: u16 = 0x002A;
    pub const ADDITIONAL_ADDRESS_FAMILY: u16 = 0x8000;
    pub const ADDRESS_ERROR_CODE: u16 = 0x8001;
    pub const PASSWORD_ALGORITHMS: u16 = 0x8002;
    pub const ALTERNATE_DOMAIN: u16 = 0x8003;
    pub const ICMP: u16 = 0x8004;
    pub const SOFTWARE: u16 = 0x8022;
    pub const ALTERNATE_SERVER: u16 = 0x8023;
    pub const CACHE_TIMEOUT: u16 = 0x8027;
    pub const FINGERPRINT: u16 = 0x8028;
    pub const ICE_CONTROLLED: u16 = 0x8029;
    pub const ICE_CONTROLLING: u16 = 0x802A;
    pub const RESPONSE_ORIGIN: u16 = 0x802B;
    pub const OTHER_ADDRESS: u16 = 0x802C;

    /// Attributes below 0x8000 must be understood or the request is rejected with 420.
    pub fn comprehension_required(t: u16) -> bool {
        t < 0x8000
    }
}

/// The four STUN message classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Expects a response.
    Request,
    /// Fire and forget.
    Indication,
    /// Success response.
    Success,
    /// Error response.
    Error,
}

impl Class {
    fn bits(self) -> u16 {
        match self {
            Class::Request => 0b00,
            Class::Indication => 0b01,
            Class::Success => 0b10,
            Class::Error => 0b11,
        }
    }
    fn from_bits(b: u16) -> Class {
        match b & 0b11 {
            0b00 => Class::Request,
            0b01 => Class::Indication,
            0b10 => Class::Success,
            _ => Class::Error,
        }
    }
}

/// Pack method and class into the 14-bit message type.
pub fn message_type(method: u16, class: Class) -> u16 {
    let c = class.bits();
    (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((c & 0b01) << 4)
        | ((c & 0b10) << 7)
}

fn split_type(t: u16) -> (u16, Class) {
    let method = (t & 0x000F) | ((t >> 1) & 0x0070) | ((t >> 2) & 0x0F80);
    let class = ((t >> 4) & 0b01) | ((t >> 7) & 0b10);
    (method, Class::from_bits(class))
}

/// Why bytes are not a well-formed STUN message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Fewer than 20 bytes, or fewer than the header length says.
    #[error("message truncated")]
    Truncated,
    /// The top two bits are not zero (it is ChannelData or not STUN at all).
    #[error("not a STUN message")]
    NotStun,
    /// The magic cookie is wrong.
    #[error("bad magic cookie")]
    BadCookie,
    /// The header length is not a multiple of 4 or disagrees with the datagram.
    #[error("bad message length")]
    BadLength,
    /// An attribute runs past the end of the message.
    #[error("attribute overruns message")]
    AttributeOverrun,
    /// FINGERPRINT is not last, or does not match.
    #[error("bad fingerprint")]
    BadFingerprint,
}

/// A parsed STUN message borrowing the datagram it came from.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    raw: &'a [u8],
    method: u16,
    class: Class,
    /// Offset of the MESSAGE-INTEGRITY attribute header, if any.
    integrity: Option<usize>,
    /// Offset of the MESSAGE-INTEGRITY-SHA256 attribute header, if any.
    integrity_sha256: Option<usize>,
    /// Whether a valid FINGERPRINT closed the message.
    fingerprint: bool,
    /// End of the attributes covered by integrity (attributes after it are ignored).
    covered_end: usize,
}

/// One raw attribute: type and unpadded value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawAttr<'a> {
    /// Attribute type.
    pub typ: u16,
    /// Value without padding.
    pub value: &'a [u8],
}

/// Length of the message at the start of `buf` as its header declares, for stream framing.
pub fn frame_len(buf: &[u8]) -> Option<usize> {
    if buf.len() < 4 || buf[0] & 0xC0 != 0 {
        return None;
    }
    Some(HEADER_LEN + u16::from_be_bytes([buf[2], buf[3]]) as usize)
}

/// Cheap check used to demultiplex STUN from ChannelData and junk.
pub fn looks_like_stun(buf: &[u8]) -> bool {
    buf.len() >= HEADER_LEN && buf[0] & 0xC0 == 0 && buf[4..8] == MAGIC_COOKIE.to_be_bytes()
}

impl<'a> Message<'a> {
    /// Parse and structurally validate one complete STUN message.
    ///
    /// `buf` must hold exactly one message (a UDP datagram or a framed stream chunk).
    /// A present FINGERPRINT is verified here; integrity is checked later with a key.
    pub fn parse(buf: &'a [u8]) -> Result<Message<'a>, DecodeError> {
        if buf.len() < HEADER_LEN {
            return Err(DecodeError::Truncated);
        }
        if buf[0] & 0xC0 != 0 {
            return Err(DecodeError::NotStun);
        }
        if buf[4..8] != MAGIC_COOKIE.to_be_bytes() {
            return Err(DecodeError::BadCookie);
        }
        let len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
        if len % 4 != 0 {
            return Err(DecodeError::BadLength);
        }
        if HEADER_LEN + len > buf.len() {
            return Err(DecodeError::Truncated);
        }
        if HEADER_LEN + len != buf.len() {
            return Err(DecodeError::BadLength);
        }
        let (method, class) = split_type(u16::from_be_bytes([buf[0], buf[1]]));
        let mut msg = Message {
            raw: buf,
            method,
            class,
            integrity: None,
            integrity_sha256: None,
            fingerprint: false,
            covered_end: buf.len(),
        };
        let mut off = HEADER_LEN;
        let mut after_integrity = false;
        while off < buf.len() {
            if off + 4 > buf.len() {
                return Err(DecodeError::AttributeOverrun);
            }
            let typ = u16::from_be_bytes([buf[off], buf[off + 1]]);
            let alen = u16::from_be_bytes([buf[off + 2], buf[off + 3]]) as usize;
            let end = off + 4 + alen;
            let padded = off + 4 + ((alen + 3) & !3);
            if end > buf.len() || padded > buf.len() {
                return Err(DecodeError::AttributeOverrun);
            }
            match typ {
                attr::FINGERPRINT => {
                    if alen != 4 || padded != buf.len() {
                        return Err(DecodeError::BadFingerprint);
                    }
                    let want = u32::from_be_bytes([
                        buf[off + 4],
                        buf[off + 5],
                        buf[off + 6],
                        buf[off + 7],
                    ]);
                    if crc32fast::hash(&buf[..off]) ^ FINGERPRINT_XOR != want {
                        return Err(DecodeError::BadFingerprint);
                    }
                    msg.fingerprint = true;
                    if !after_integrity {
                        msg.covered_end = off;
                    }
                }
                attr::MESSAGE_INTEGRITY if msg.integrity.is_none() && !after_integrity => {
                    if alen != 20 {
                        return Err(DecodeError::AttributeOverrun);
                    }
                    msg.integrity = Some(off);
                    msg.covered_end = padded;
                }
                attr::MESSAGE_INTEGRITY_SHA256
                    if msg.integrity_sha256.is_none() && !after_integrity =>
                {
                    if !(16..=32).contains(&alen) || alen % 4 != 0 {
                        return Err(DecodeError::AttributeOverrun);
                    }
                    msg.integrity_sha256 = Some(off);
                    msg.covered_end = padded;
                    after_integrity = true;
                }
                _ => {}
            }
            if msg.integrity.is_some() && typ != attr::MESSAGE_INTEGRITY {
                // Only MESSAGE-INTEGRITY-SHA256 and FINGERPRINT may follow MESSAGE-INTEGRITY;
                // anything else after it is ignored (RFC 8489 section 14.5).
                after_integrity = true;
            }
            off = padded;
        }
        Ok(msg)
    }

    /// The whole message.
    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }
    /// Method number (see [`method`]).
    pub fn method(&self) -> u16 {
        self.method
    }
    /// Message class.
    pub fn class(&self) -> Class {
        self.class
    }
    /// The 96-bit transaction id.
    pub fn transaction_id(&self) -> [u8; 12] {
        let mut t = [0u8; 12];
        t.copy_from_slice(&self.raw[8..20]);
        t
    }
    /// Whether the message carried a valid FINGERPRINT.
    pub fn has_fingerprint(&self) -> bool {
        self.fingerprint
    }
    /// Whether the message carried MESSAGE-INTEGRITY (SHA-1).
    pub fn has_integrity(&self) -> bool {
        self.integrity.is_some()
    }
    /// Whether the message carried MESSAGE-INTEGRITY-SHA256.
    pub fn has_integrity_sha256(&self) -> bool {
        self.integrity_sha256.is_some()
    }

    /// Attributes covered by integrity, in order (FINGERPRINT and integrity attributes included).
    pub fn attrs(&self) -> AttrIter<'a> {
        AttrIter {
            raw: self.raw,
            off: HEADER_LEN,
            end: self.covered_end,
        }
    }

    /// First attribute of a type, ignoring those after the integrity attributes.
    pub fn get(&self, typ: u16) -> Option<&'a [u8]> {
        self.attrs().find(|a| a.typ == typ).map(|a| a.value)
    }

    /// First comprehension-required attribute type not in `known`, for 420 responses.
    pub fn unknown_required(&self, known: &[u16], out: &mut [u16; 8]) -> usize {
        let mut n = 0;
        for a in self.attrs() {
            if attr::comprehension_required(a.typ)
                && !known.contains(&a.typ)
                && n < out.len()
                && !out[..n].contains(&a.typ)
            {
                out[n] = a.typ;
                n += 1;
            }
        }
        n
    }

    /// Decode an XOR-encoded address attribute of `typ`.
    pub fn xor_address(&self, typ: u16) -> Option<Result<SocketAddr, AttrError>> {
        self.get(typ)
            .map(|v| decode_xor_address(v, &self.raw[4..20]))
    }

    /// Every XOR-encoded address attribute of `typ` (CreatePermission may carry several).
    pub fn xor_addresses(
        &self,
        typ: u16,
    ) -> impl Iterator<Item = Result<SocketAddr, AttrError>> + 'a {
        let tid = &self.raw[4..20];
        self.attrs()
            .filter(move |a| a.typ == typ)
            .map(move |a| decode_xor_address(a.value, tid))
    }

    /// Verify MESSAGE-INTEGRITY (HMAC-SHA1) with a long-term or short-term key.
    pub fn verify_integrity(&self, key: &[u8]) -> bool {
        let Some(off) = self.integrity else {
            return false;
        };
        let mut mac = match <Hmac<Sha1> as Mac>::new_from_slice(key) {
            Ok(m) => m,
            Err(_) => return false,
        };
        self.feed_covered(&mut mac, off, 24);
        mac.verify_slice(&self.raw[off + 4..off + 24]).is_ok()
    }

    /// Verify MESSAGE-INTEGRITY-SHA256, which may be truncated to 16..32 bytes.
    pub fn verify_integrity_sha256(&self, key: &[u8]) -> bool {
        let Some(off) = self.integrity_sha256 else {
            return false;
        };
        let alen = u16::from_be_bytes([self.raw[off + 2], self.raw[off + 3]]) as usize;
        let mut mac = match <Hmac<Sha256> as Mac>::new_from_slice(key) {
            Ok(m) => m,
            Err(_) => return false,
        };
        self.feed_covered(&mut mac, off, 4 + alen);
        mac.verify_truncated_left(&self.raw[off + 4..off + 4 + alen])
            .is_ok()
    }

    /// Feed the header (with the length adjusted to end at the integrity attribute) and the
    /// attributes before it into a MAC.
    fn feed_covered<M: Mac>(&self, mac: &mut M, off: usize, attr_len: usize) {
        let len = (off + attr_len - HEADER_LEN) as u16;
        mac.update(&self.raw[0..2]);
        mac.update(&len.to_be_bytes());
        mac.update(&self.raw[4..off]);
    }
}

/// Iterator over raw attributes of a parsed message.
#[derive(Debug, Clone)]
pub struct AttrIter<'a> {
    raw: &'a [u8],
    off: usize,
    end: usize,
}

impl<'a> Iterator for AttrIter<'a> {
    type Item = RawAttr<'a>;
    fn next(&mut self) -> Option<RawAttr<'a>> {
        // Bounds were validated by `Message::parse`; `get` keeps this panic-free regardless.
        let hdr = self.raw.get(self.off..self.off + 4)?;
        if self.off >= self.end {
            return None;
        }
        let typ = u16::from_be_bytes([hdr[0], hdr[1]]);
        let alen = u16::from_be_bytes([hdr[2], hdr[3]]) as usize;
        let value = self.raw.get(self.off + 4..self.off + 4 + alen)?;
        self.off += 4 + ((alen + 3) & !3);
        Some(RawAttr { typ, value })
    }
}

/// Why an attribute value is malformed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AttrError {
    /// Wrong length for its type.
    #[error("bad attribute length")]
    Length,
    /// Unknown address family.
    #[error("bad address family")]
    Family,
    /// Not valid UTF-8 where text is required.
    #[error("bad text")]
    Text,
}

/// Decode a plain (MAPPED-ADDRESS style) address value.
pub fn decode_address(v: &[u8]) -> Result<SocketAddr, AttrError> {
    decode_addr_inner(v, None)
}

/// Decode an XOR-encoded address value; `cookie_tid` is header bytes 4..20.
pub fn decode_xor_address(v: &[u8], cookie_tid: &[u8]) -> Result<SocketAddr, AttrError> {
    decode_addr_inner(v, Some(cookie_tid))
}

fn decode_addr_inner(v: &[u8], xor: Option<&[u8]>) -> Result<SocketAddr, AttrError> {
    if v.len() < 4 {
        return Err(AttrError::Length);
    }
    let mut port = u16::from_be_bytes([v[2], v[3]]);
    if xor.is_some() {
        port ^= (MAGIC_COOKIE >> 16) as u16;
    }
    match v[1] {
        0x01 => {
            if v.len() != 8 {
                return Err(AttrError::Length);
            }
            let mut b = [v[4], v[5], v[6], v[7]];
            if let Some(x) = xor {
                for i in 0..4 {
                    b[i] ^= x[i];
                }
            }
            Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(b)), port))
        }
        0x02 => {
            if v.len() != 20 {
                return Err(AttrError::Length);
            }
            let mut b = [0u8; 16];
            b.copy_from_slice(&v[4..20]);
            if let Some(x) = xor {
                for i in 0..16 {
                    b[i] ^= x[i];
                }
            }
            Ok(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(b)), port))
        }
        _ => Err(AttrError::Family),
    }
}

/// Decode ERROR-CODE into (code, reason).
pub fn decode_error_code(v: &[u8]) -> Result<(u16, &str), AttrError> {
    if v.len() < 4 {
        return Err(AttrError::Length);
    }
    let code = (v[2] & 0x7) as u16 * 100 + v[3] as u16;
    let reason = std::str::from_utf8(&v[4..]).map_err(|_| AttrError::Text)?;
    Ok((code, reason))
}

/// Read a 32-bit attribute value (LIFETIME and the like).
pub fn decode_u32(v: &[u8]) -> Result<u32, AttrError> {
    let b: [u8; 4] = v.try_into().map_err(|_| AttrError::Length)?;
    Ok(u32::from_be_bytes(b))
}

/// Appends one STUN message to a buffer; finish with one of the `finish*` methods.
pub struct Encoder<'b> {
    buf: &'b mut Vec<u8>,
    start: usize,
    /// An attribute did not fit the 16-bit length fields; the message is dropped at finish.
    overflow: bool,
}

/// Why a message could not be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// An attribute or the whole message is longer than its 16-bit length field can say.
    #[error("STUN message longer than 65,535 bytes after the header")]
    TooLong,
}

/// Largest message body (everything after the 20-byte header) a STUN length can describe.
const MAX_BODY: usize = u16::MAX as usize;

impl<'b> Encoder<'b> {
    /// Start a message at the end of `buf`.
    pub fn new(buf: &'b mut Vec<u8>, method: u16, class: Class, tid: &[u8; 12]) -> Self {
        let start = buf.len();
        buf.extend_from_slice(&message_type(method, class).to_be_bytes());
        buf.extend_from_slice(&[0, 0]);
        buf.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        buf.extend_from_slice(tid);
        Encoder {
            buf,
            start,
            overflow: false,
        }
    }

    fn set_len(&mut self) {
        let len = (self.buf.len() - self.start - HEADER_LEN) as u16;
        self.buf[self.start + 2..self.start + 4].copy_from_slice(&len.to_be_bytes());
    }

    /// Whether `extra` more bytes still fit the body's 16-bit length.
    fn fits(&self, extra: usize) -> bool {
        self.buf.len() - self.start - HEADER_LEN + extra <= MAX_BODY
    }

    fn cookie_tid(&self) -> [u8; 16] {
        let mut x = [0u8; 16];
        x.copy_from_slice(&self.buf[self.start + 4..self.start + 20]);
        x
    }

    /// Append an attribute with padding. A value that would not fit the message's 16-bit
    /// length is never truncated: the encoder marks itself overflowed and `finish` drops the
    /// whole message (see [`Encoder::try_finish`]).
    pub fn attr(&mut self, typ: u16, value: &[u8]) -> &mut Self {
        let len = value.len();
        let pad = (4 - len % 4) % 4;
        if self.overflow || len > MAX_BODY - 4 || !self.fits(4 + len + pad) {
            self.overflow = true;
            return self;
        }
        self.buf.extend_from_slice(&typ.to_be_bytes());
        self.buf.extend_from_slice(&(len as u16).to_be_bytes());
        self.buf.extend_from_slice(value);
        self.buf.extend_from_slice(&[0u8; 3][..pad]);
        self
    }

    /// Append SOFTWARE, unless `name` is empty (`turn.software = ""` keeps answers lean).
    pub fn software(&mut self, name: &str) -> &mut Self {
        if name.is_empty() {
            return self;
        }
        self.attr(attr::SOFTWARE, name.as_bytes())
    }

    /// Append a 32-bit attribute.
    pub fn u32_attr(&mut self, typ: u16, v: u32) -> &mut Self {
        self.attr(typ, &v.to_be_bytes())
    }

    /// Append a plain address attribute (MAPPED-ADDRESS, ALTERNATE-SERVER).
    pub fn address(&mut self, typ: u16, addr: SocketAddr) -> &mut Self {
        self.addr_inner(typ, addr, false)
    }

    /// Append an XOR-encoded address attribute.
    pub fn xor_address(&mut self, typ: u16, addr: SocketAddr) -> &mut Self {
        self.addr_inner(typ, addr, true)
    }

    fn addr_inner(&mut self, typ: u16, addr: SocketAddr, xor: bool) -> &mut Self {
        let x = self.cookie_tid();
        let mut port = addr.port();
        if xor {
            port ^= (MAGIC_COOKIE >> 16) as u16;
        }
        match addr.ip() {
            IpAddr::V4(ip) => {
                let mut v = [0u8; 8];
                v[1] = 0x01;
                v[2..4].copy_from_slice(&port.to_be_bytes());
                v[4..8].copy_from_slice(&ip.octets());
                if xor {
                    for i in 0..4 {
                        v[4 + i] ^= x[i];
                    }
                }
                self.attr(typ, &v)
            }
            IpAddr::V6(ip) => {
                let mut v = [0u8; 20];
                v[1] = 0x02;
                v[2..4].copy_from_slice(&port.to_be_bytes());
                v[4..20].copy_from_slice(&ip.octets());
                if xor {
                    for i in 0..16 {
                        v[4 + i] ^= x[i];
                    }
                }
                self.attr(typ, &v)
            }
        }
    }

    /// Append ERROR-CODE with a reason phrase.
    pub fn error_code(&mut self, code: u16, reason: &str) -> &mut Self {
        let r = reason.as_bytes();
        let r = &r[..r.len().min(763)];
        self.buf.extend_from_slice(&attr::ERROR_CODE.to_be_bytes());
        let len = 4 + r.len();
        self.buf.extend_from_slice(&(len as u16).to_be_bytes());
        self.buf
            .extend_from_slice(&[0, 0, (code / 100) as u8, (code % 100) as u8]);
        self.buf.extend_from_slice(r);
        let pad = (4 - len % 4) % 4;
        self.buf.extend_from_slice(&[0u8; 3][..pad]);
        self
    }

    /// Append UNKNOWN-ATTRIBUTES.
    pub fn unknown_attributes(&mut self, types: &[u16]) -> &mut Self {
        let mut v = [0u8; 16];
        let n = types.len().min(8);
        for (i, t) in types[..n].iter().enumerate() {
            v[2 * i..2 * i + 2].copy_from_slice(&t.to_be_bytes());
        }
        self.attr(attr::UNKNOWN_ATTRIBUTES, &v[..2 * n])
    }

    /// Append MESSAGE-INTEGRITY (HMAC-SHA1 over everything so far).
    pub fn integrity(&mut self, key: &[u8]) -> &mut Self {
        let off = self.buf.len();
        let len = (off - self.start - HEADER_LEN + 24) as u16;
        self.buf[self.start + 2..self.start + 4].copy_from_slice(&len.to_be_bytes());
        let tag = match <Hmac<Sha1> as Mac>::new_from_slice(key) {
            Ok(mut mac) => {
                mac.update(&self.buf[self.start..off]);
                mac.finalize().into_bytes()
            }
            Err(_) => Default::default(),
        };
        self.attr(attr::MESSAGE_INTEGRITY, &tag)
    }

    /// Append MESSAGE-INTEGRITY-SHA256 (full 32 bytes).
    pub fn integrity_sha256(&mut self, key: &[u8]) -> &mut Self {
        let off = self.buf.len();
        let len = (off - self.start - HEADER_LEN + 36) as u16;
        self.buf[self.start + 2..self.start + 4].copy_from_slice(&len.to_be_bytes());
        let tag = match <Hmac<Sha256> as Mac>::new_from_slice(key) {
            Ok(mut mac) => {
                mac.update(&self.buf[self.start..off]);
                mac.finalize().into_bytes()
            }
            Err(_) => Default::default(),
        };
        self.attr(attr::MESSAGE_INTEGRITY_SHA256, &tag)
    }

    /// Close the message without FINGERPRINT; a message that overflowed is removed from the
    /// buffer instead (use [`Encoder::try_finish`] where that can happen).
    pub fn finish(self) {
        let _ = self.try_finish();
    }

    /// Close the message without FINGERPRINT, or remove it and say why it cannot be sent.
    pub fn try_finish(mut self) -> Result<(), EncodeError> {
        if self.overflow {
            self.buf.truncate(self.start);
            return Err(EncodeError::TooLong);
        }
        self.set_len();
        Ok(())
    }

    /// Close the message with FINGERPRINT (an overflowed message is removed, as in `finish`).
    pub fn finish_with_fingerprint(mut self) {
        if self.overflow || !self.fits(8) {
            self.buf.truncate(self.start);
            return;
        }
        let off = self.buf.len();
        let len = (off - self.start - HEADER_LEN + 8) as u16;
        self.buf[self.start + 2..self.start + 4].copy_from_slice(&len.to_be_bytes());
        let crc = crc32fast::hash(&self.buf[self.start..off]) ^ FINGERPRINT_XOR;
        self.attr(attr::FINGERPRINT, &crc.to_be_bytes());
        self.set_len();
    }
}

/// RFC 8489 long-term key: MD5(username ":" realm ":" password).
pub fn long_term_key(username: &str, realm: &str, password: &str) -> [u8; 16] {
    use md5::{Digest, Md5};
    let mut h = Md5::new();
    h.update(username.as_bytes());
    h.update(b":");
    h.update(realm.as_bytes());
    h.update(b":");
    h.update(password.as_bytes());
    h.finalize().into()
}

/// RFC 8489 long-term key for MESSAGE-INTEGRITY-SHA256 with PASSWORD-ALGORITHM SHA-256.
pub fn long_term_key_sha256(username: &str, realm: &str, password: &str) -> [u8; 32] {
    use sha2::Digest;
    let mut h = Sha256::new();
    h.update(username.as_bytes());
    h.update(b":");
    h.update(realm.as_bytes());
    h.update(b":");
    h.update(password.as_bytes());
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| c.is_ascii_hexdigit()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    // RFC 5769 section 2.1: sample request, short-term password "VOkJxbRl1RmTxUk/WvJxBt".
    const REQUEST: &str = "
        00 01 00 58 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
        80 22 00 10 53 54 55 4e 20 74 65 73 74 20 63 6c 69 65 6e 74
        00 24 00 04 6e 00 01 ff 80 29 00 08 93 2f f9 b1 51 26 3b 36
        00 06 00 09 65 76 74 6a 3a 68 36 76 59 20 20 20 00 08 00 14
        9a ea a7 0c bf d8 cb 56 78 1e f2 b5 b2 d3 f2 49 c1 b5 71 a2
        80 28 00 04 e5 7a 3b cf";
    const RESPONSE_V4: &str = "
        01 01 00 3c 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
        80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20 00 20 00 08
        00 01 a1 47 e1 12 a6 43 00 08 00 14 2b 91 f5 99 fd 9e 90 c3
        8c 74 89 f9 2a f9 ba 53 f0 6b e7 d7 80 28 00 04 c0 7d 4c 96";
    const RESPONSE_V6: &str = "
        01 01 00 48 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
        80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20 00 20 00 14
        00 02 a1 47 01 13 a9 fa a5 d3 f1 79 bc 25 f4 b5 be d2 b9 d9
        00 08 00 14 a3 82 95 4e 4b e6 7b f1 17 84 c9 7c 82 92 c2 75
        bf e3 ed 41 80 28 00 04 c8 fb 0b 4c";
    const LONG_TERM: &str = "
        00 01 00 60 21 12 a4 42 78 ad 34 33 c6 ad 72 c0 29 da 41 2e
        00 06 00 12 e3 83 9e e3 83 88 e3 83 aa e3 83 83 e3 82 af e3
        82 b9 00 00 00 15 00 1c 66 2f 2f 34 39 39 6b 39 35 34 64 36
        4f 4c 33 34 6f 4c 39 46 53 54 76 79 36 34 73 41 00 14 00 0b
        65 78 61 6d 70 6c 65 2e 6f 72 67 00 00 08 00 14 f6 70 24 65
        6d d6 4a 3e 02 b8 e0 71 2e 85 c9 a2 8c a8 96 66";

    #[test]
    fn rfc5769_request() {
        let raw = unhex(REQUEST);
        let m = Message::parse(&raw).unwrap();
        assert_eq!(m.method(), method::BINDING);
        assert_eq!(m.class(), Class::Request);
        assert!(m.has_fingerprint());
        assert_eq!(m.get(attr::USERNAME), Some(&b"evtj:h6vY"[..]));
        assert_eq!(m.get(attr::SOFTWARE), Some(&b"STUN test client"[..]));
        assert!(m.verify_integrity(b"VOkJxbRl1RmTxUk/WvJxBt"));
        assert!(!m.verify_integrity(b"wrong"));
    }

    #[test]
    fn rfc5769_ipv4_response() {
        let raw = unhex(RESPONSE_V4);
        let m = Message::parse(&raw).unwrap();
        assert_eq!(m.class(), Class::Success);
        assert!(m.has_fingerprint());
        let a = m.xor_address(attr::XOR_MAPPED_ADDRESS).unwrap().unwrap();
        assert_eq!(a, "192.0.2.1:32853".parse().unwrap());
        assert!(m.verify_integrity(b"VOkJxbRl1RmTxUk/WvJxBt"));
    }

    #[test]
    fn rfc5769_ipv6_response() {
        let raw = unhex(RESPONSE_V6);
        let m = Message::parse(&raw).unwrap();
        let a = m.xor_address(attr::XOR_MAPPED_ADDRESS).unwrap().unwrap();
        assert_eq!(
            a,
            "[2001:db8:1234:5678:11:2233:4455:6677]:32853"
                .parse()
                .unwrap()
        );
        assert!(m.verify_integrity(b"VOkJxbRl1RmTxUk/WvJxBt"));
    }

    #[test]
    fn rfc5769_long_term_auth() {
        let raw = unhex(LONG_TERM);
        let m = Message::parse(&raw).unwrap();
        let user = std::str::from_utf8(m.get(attr::USERNAME).unwrap()).unwrap();
        assert_eq!(user, "\u{30DE}\u{30C8}\u{30EA}\u{30C3}\u{30AF}\u{30B9}");
        let realm = std::str::from_utf8(m.get(attr::REALM).unwrap()).unwrap();
        assert_eq!(realm, "example.org");
        assert_eq!(m.get(attr::NONCE).unwrap(), b"f//499k954d6OL34oL9FSTvy64sA");
        // RFC 5769 gives the SASLprep'ed password "TheMatrIX".
        let key = long_term_key(user, realm, "TheMatrIX");
        assert!(m.verify_integrity(&key));
    }

    #[test]
    fn encoder_reproduces_rfc5769_ipv4_response() {
        let want = unhex(RESPONSE_V4);
        let tid: [u8; 12] = want[8..20].try_into().unwrap();
        let mut buf = Vec::new();
        let mut e = Encoder::new(&mut buf, method::BINDING, Class::Success, &tid);
        // RFC 5769 pads SOFTWARE with a space byte rather than zero; reproduce it.
        e.attr(attr::SOFTWARE, b"test vector");
        e.xor_address(attr::XOR_MAPPED_ADDRESS, "192.0.2.1:32853".parse().unwrap());
        e.integrity(b"VOkJxbRl1RmTxUk/WvJxBt");
        e.finish_with_fingerprint();
        // Differences can only come from the padding byte of SOFTWARE (offset 35).
        let mut patched = buf.clone();
        patched[35] = 0x20;
        let m = Message::parse(&buf).unwrap();
        assert!(m.has_fingerprint());
        assert!(m.verify_integrity(b"VOkJxbRl1RmTxUk/WvJxBt"));
        assert_eq!(&patched[..36], &want[..36]);
        assert_eq!(
            m.xor_address(attr::XOR_MAPPED_ADDRESS).unwrap().unwrap(),
            "192.0.2.1:32853".parse().unwrap()
        );
    }

    #[test]
    fn type_packing_round_trips() {
        for m in [0x001u16, 0x003, 0x009, 0x00c, 0xfff] {
            for c in [
                Class::Request,
                Class::Indication,
                Class::Success,
                Class::Error,
            ] {
                assert_eq!(split_type(message_type(m, c)), (m, c));
            }
        }
        assert_eq!(message_type(method::BINDING, Class::Success), 0x0101);
        assert_eq!(message_type(method::ALLOCATE, Class::Error), 0x0113);
        assert_eq!(message_type(method::DATA, Class::Indication), 0x0017);
    }

    #[test]
    fn malformed_inputs_are_errors_not_panics() {
        let good = unhex(REQUEST);
        assert_eq!(
            Message::parse(&good[..19]).unwrap_err(),
            DecodeError::Truncated
        );
        let mut bad = good.clone();
        bad[4] = 0;
        assert_eq!(Message::parse(&bad).unwrap_err(), DecodeError::BadCookie);
        let mut bad = good.clone();
        bad[3] = 0x59;
        assert_eq!(Message::parse(&bad).unwrap_err(), DecodeError::BadLength);
        let mut bad = good.clone();
        bad[0] = 0x40;
        assert_eq!(Message::parse(&bad).unwrap_err(), DecodeError::NotStun);
        let mut bad = good.clone();
        let n = bad.len();
        bad[n - 1] ^= 1;
        assert_eq!(
            Message::parse(&bad).unwrap_err(),
            DecodeError::BadFingerprint
        );
        // Attribute length past the end.
        let mut bad = good.clone();
        bad[22] = 0x7f;
        assert_eq!(
            Message::parse(&bad).unwrap_err(),
            DecodeError::AttributeOverrun
        );
        // Every truncation and every single-byte corruption must be handled.
        for i in 0..good.len() {
            let _ = Message::parse(&good[..i]);
            for x in [0x01u8, 0x80, 0xff] {
                let mut c = good.clone();
                c[i] ^= x;
                if let Ok(m) = Message::parse(&c) {
                    for a in m.attrs() {
                        let _ = decode_xor_address(a.value, &c[4..20]);
                    }
                }
            }
        }
    }

    /// Deterministic mutation fuzzing: parse must never panic, and whatever parses must
    /// iterate and decode within bounds.
    #[test]
    fn mutation_fuzz_never_panics() {
        let seeds = [
            unhex(REQUEST),
            unhex(RESPONSE_V4),
            unhex(RESPONSE_V6),
            unhex(LONG_TERM),
        ];
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut parsed = 0;
        for i in 0..50_000 {
            let mut m = seeds[i % seeds.len()].clone();
            for _ in 0..1 + rnd() % 4 {
                let pos = (rnd() as usize) % m.len();
                match rnd() % 4 {
                    0 => m[pos] = rnd() as u8,
                    1 => m.truncate(pos.max(1)),
                    2 => m.insert(pos, rnd() as u8),
                    _ => {
                        // Fix the header length so mutations reach the attribute walker.
                        let len = (m.len().saturating_sub(HEADER_LEN)) as u16;
                        if m.len() >= 4 {
                            m[2..4].copy_from_slice(&len.to_be_bytes());
                        }
                    }
                }
            }
            if let Ok(msg) = Message::parse(&m) {
                parsed += 1;
                for a in msg.attrs() {
                    let _ = decode_xor_address(a.value, &m[4..20]);
                    let _ = decode_error_code(a.value);
                    let _ = decode_u32(a.value);
                }
                let _ = msg.verify_integrity(b"k");
                let _ = msg.verify_integrity_sha256(b"k");
                let mut unknown = [0u16; 8];
                let _ = msg.unknown_required(&[], &mut unknown);
            }
        }
        assert!(parsed > 0, "some mutations must still parse");
    }

    #[test]
    fn sha256_integrity_round_trips() {
        let mut buf = Vec::new();
        let tid = [7u8; 12];
        let key = long_term_key_sha256("u", "r", "p");
        let mut e = Encoder::new(&mut buf, method::ALLOCATE, Class::Request, &tid);
        e.attr(attr::USERNAME, b"u");
        e.integrity(&long_term_key("u", "r", "p"));
        e.integrity_sha256(&key);
        e.finish_with_fingerprint();
        let m = Message::parse(&buf).unwrap();
        assert!(m.verify_integrity(&long_term_key("u", "r", "p")));
        assert!(m.verify_integrity_sha256(&key));
        assert!(!m.verify_integrity_sha256(&[0u8; 32]));
    }

    #[test]
    fn error_code_round_trips() {
        let mut buf = Vec::new();
        let mut e = Encoder::new(&mut buf, method::ALLOCATE, Class::Error, &[1; 12]);
        e.error_code(438, "Stale Nonce");
        e.finish();
        let m = Message::parse(&buf).unwrap();
        assert_eq!(
            decode_error_code(m.get(attr::ERROR_CODE).unwrap()).unwrap(),
            (438, "Stale Nonce")
        );
    }

    #[test]
    fn oversized_attributes_are_an_error_not_a_wrapped_length() {
        let tid = [7u8; 12];
        // The largest DATA that fits: body = 4 + 65_528 + 0 padding = 65_532 <= 65_535.
        let mut buf = vec![0xAA];
        let mut e = Encoder::new(&mut buf, method::DATA, Class::Indication, &tid);
        e.attr(attr::DATA, &vec![1u8; 65_528]);
        assert_eq!(e.try_finish(), Ok(()));
        let m = Message::parse(&buf[1..]).unwrap();
        assert_eq!(m.get(attr::DATA).unwrap().len(), 65_528);
        // An IPv6 peer address plus 65_527 bytes does not fit: an error, and nothing is left
        // in the buffer for a stream client to misread as further frames.
        let mut buf = vec![0xAA];
        let mut e = Encoder::new(&mut buf, method::DATA, Class::Indication, &tid);
        e.xor_address(
            attr::XOR_PEER_ADDRESS,
            "[2001:db8::1]:5000".parse().unwrap(),
        );
        e.attr(attr::DATA, &vec![1u8; 65_527]);
        assert_eq!(e.try_finish(), Err(EncodeError::TooLong));
        assert_eq!(buf, vec![0xAA]);
        let mut e = Encoder::new(&mut buf, method::DATA, Class::Indication, &tid);
        e.attr(attr::DATA, &vec![1u8; 70_000]);
        e.finish_with_fingerprint();
        assert_eq!(buf, vec![0xAA]);
    }
}
