//! Batched UDP I/O for the relay data plane: `recvmmsg` through the maintained `quinn-udp`
//! crate (which also reports each datagram's destination address, so wildcard listeners can
//! answer from the address the client used), and small `sendmmsg` queues of our own, because
//! quinn-udp sends one destination per syscall and a relay turn sends to many clients.
//!
//! The send queues own fixed slots that are filled in place (the relay writes a ChannelData
//! header and receives the payload right behind it), so a steady stream allocates nothing.
//!
//! Both directions use the kernel's UDP segmentation offloads where it has them, invisibly to
//! callers: [`RecvBatch`] splits a GRO-coalesced read back into its datagrams, and a flush sends
//! a run of consecutive datagrams to one destination from one source, all of one size but the
//! last (which may be shorter), as one GSO message (`UDP_SEGMENT`): one trip down the stack
//! for a video frame's packets instead of one each. A kernel or device that refuses GSO gets
//! the datagrams one by one, and the queue stops asking.

use std::io;
use std::io::IoSliceMut;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::OnceLock;

pub use quinn_udp::{RecvMeta, UdpSocketState, BATCH_SIZE as RECV_BATCH};

/// Datagrams one `sendmmsg` call may carry (the kernel's UIO_MAXIOV is far above this).
pub const SEND_BATCH: usize = 64;

/// Bytes one GSO message may carry: an IPv4 datagram's 65,535 less the IP and UDP headers,
/// rounded down.
const MAX_GSO_BYTES: usize = 65_000;

/// Room for one IPv4 or IPv6 packet-info control message and one UDP_SEGMENT message.
const CMSG_ROOM: usize = 64;

#[repr(C, align(8))]
#[derive(Clone, Copy)]
struct Ctrl([u8; CMSG_ROOM]);

/// Segments the kernel takes in one GSO message (1: no GSO), probed once per process.
pub fn max_gso_segments() -> usize {
    static SEGS: OnceLock<usize> = OnceLock::new();
    *SEGS.get_or_init(|| {
        std::net::UdpSocket::bind((std::net::Ipv4Addr::LOCALHOST, 0))
            .ok()
            .and_then(|s| UdpSocketState::new((&s).into()).ok())
            .map(|st| st.max_gso_segments().clamp(1, SEND_BATCH))
            .unwrap_or(1)
    })
}

/// How many datagrams, from `at` on, one GSO message can carry: the run of consecutive
/// datagrams that `same(at, j)` says go to the same destination from the same source, all of
/// `lens[at]` bytes except the last, which may be shorter; at most `max_segs` of them and
/// [`MAX_GSO_BYTES`] in all. Always at least 1 when `at < lens.len()`.
pub fn gso_run(
    lens: &[usize],
    at: usize,
    max_segs: usize,
    same: impl Fn(usize, usize) -> bool,
) -> usize {
    let Some(&seg) = lens.get(at) else {
        return 0;
    };
    if seg == 0 || seg > u16::MAX as usize {
        return 1;
    }
    let mut n = 1;
    let mut bytes = seg;
    while at + n < lens.len() && n < max_segs {
        let j = at + n;
        let len = lens[j];
        // The previous segment must be full-sized: only the last may be short.
        if lens[j - 1] != seg || len > seg || len == 0 || bytes + len > MAX_GSO_BYTES {
            break;
        }
        if !same(at, j) {
            break;
        }
        n += 1;
        bytes += len;
    }
    n
}

/// What one flush did: datagrams the kernel took, and datagrams dropped (full socket buffer or
/// a per-destination error such as an ICMP-reported unreachable port).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Flushed {
    /// Accepted by the kernel.
    pub sent: usize,
    /// Dropped.
    pub dropped: usize,
    /// `sendmmsg` messages used (a GSO message carries several datagrams).
    pub messages: usize,
}

impl std::ops::AddAssign for Flushed {
    fn add_assign(&mut self, o: Flushed) {
        self.sent += o.sent;
        self.dropped += o.dropped;
        self.messages += o.messages;
    }
}

/// The fixed slots both queues fill in place.
struct Slots {
    slot: usize,
    data: Box<[u8]>,
    lens: Vec<usize>,
    dsts: Vec<socket2::SockAddr>,
    srcs: Vec<Option<IpAddr>>,
}

impl Slots {
    fn new(slot: usize) -> Slots {
        Slots {
            slot,
            data: vec![0u8; slot * SEND_BATCH].into_boxed_slice(),
            lens: Vec::with_capacity(SEND_BATCH),
            dsts: Vec::with_capacity(SEND_BATCH),
            srcs: Vec::with_capacity(SEND_BATCH),
        }
    }
    fn slot_mut(&mut self) -> Option<&mut [u8]> {
        let i = self.lens.len();
        if i == SEND_BATCH {
            return None;
        }
        Some(&mut self.data[i * self.slot..(i + 1) * self.slot])
    }
    fn commit(&mut self, len: usize, dst: SocketAddr, src: Option<IpAddr>) -> bool {
        if self.lens.len() < SEND_BATCH {
            self.lens.push(len.min(self.slot));
            self.dsts.push(dst.into());
            self.srcs.push(src);
            true
        } else {
            false
        }
    }
    fn push(&mut self, bytes: &[u8], dst: SocketAddr, src: Option<IpAddr>) -> bool {
        let n = bytes.len();
        match self.slot_mut() {
            Some(s) if n <= s.len() => {
                s[..n].copy_from_slice(bytes);
                self.commit(n, dst, src)
            }
            _ => false,
        }
    }
    fn clear(&mut self) {
        self.lens.clear();
        self.dsts.clear();
        self.srcs.clear();
    }

    /// Send datagrams `from..to` on `fd` with as few syscalls and messages as allowed;
    /// `max_segs` drops to 1 for good when the kernel refuses GSO (EIO: no checksum offload).
    fn send(&self, fd: RawFd, from: usize, to: usize, max_segs: &mut usize) -> Flushed {
        let mut out = Flushed::default();
        let mut iovs: [libc::iovec; SEND_BATCH] = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; SEND_BATCH];
        for (i, iov) in iovs.iter_mut().enumerate().take(to).skip(from) {
            iov.iov_base = self.data[i * self.slot..].as_ptr() as *mut libc::c_void;
            iov.iov_len = self.lens[i];
        }
        let mut ctrls = [Ctrl([0u8; CMSG_ROOM]); SEND_BATCH];
        // (first datagram, datagrams) of each message.
        let mut msgs = [(0usize, 0usize); SEND_BATCH];
        // Datagrams below this index go one per message (a GSO message of theirs failed).
        let mut single_until = from;
        let mut at = from;
        while at < to {
            // SAFETY: mmsghdr is a plain C struct of integers and pointers, for which all-zero
            // is a valid (empty) value.
            #[allow(unsafe_code)]
            let mut hdrs: [libc::mmsghdr; SEND_BATCH] = unsafe { std::mem::zeroed() };
            let mut m = 0;
            let mut i = at;
            while i < to {
                let segs = if i < single_until || *max_segs <= 1 {
                    1
                } else {
                    gso_run(&self.lens[..to], i, *max_segs, |a, b| {
                        self.dsts[a] == self.dsts[b] && self.srcs[a] == self.srcs[b]
                    })
                };
                msgs[m] = (i, segs);
                let h = &mut hdrs[m].msg_hdr;
                h.msg_name = self.dsts[i].as_ptr() as *mut libc::c_void;
                h.msg_namelen = self.dsts[i].len();
                h.msg_iov = iovs[i..].as_mut_ptr();
                h.msg_iovlen = segs as _;
                let mut clen = 0;
                let p = ctrls[m].0.as_mut_ptr();
                if let Some(src) = self.srcs[i] {
                    clen += encode_src(p, src);
                }
                if segs > 1 {
                    // SAFETY: `clen` is at most 40 (one in6_pktinfo message), so the 16-byte
                    // UDP_SEGMENT message fits in the CMSG_ROOM-byte buffer; the offset keeps
                    // the 8-byte alignment CMSG_SPACE rounds to.
                    #[allow(unsafe_code)]
                    let at_p = unsafe { p.add(clen) };
                    clen += write_cmsg(at_p, libc::SOL_UDP, libc::UDP_SEGMENT, self.lens[i] as u16);
                }
                if clen > 0 {
                    h.msg_control = p.cast();
                    h.msg_controllen = clen as _;
                }
                m += 1;
                i += segs;
            }
            // SAFETY: `hdrs[..m]` are initialised above; every pointer they hold (names in
            // `self.dsts`, iovecs in `iovs` pointing into `self.data` within bounds, control
            // buffers in `ctrls`) lives until this function returns and is not moved meanwhile;
            // the kernel only reads the payloads.
            #[allow(unsafe_code)]
            let r = unsafe {
                libc::sendmmsg(fd, hdrs.as_mut_ptr(), m as libc::c_uint, libc::MSG_DONTWAIT)
            };
            if r > 0 {
                let (first, n) = msgs[r as usize - 1];
                out.sent += first + n - at;
                out.messages += r as usize;
                at = first + n;
                continue;
            }
            let e = io::Error::last_os_error();
            let (_, segs) = msgs[0];
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => {
                    // The socket buffer is full: what is left is dropped, as UDP would.
                    out.dropped += to - at;
                    break;
                }
                _ if segs > 1 => {
                    // GSO refused for this message (EIO: the device cannot; EINVAL: a segment
                    // over the path MTU): send its datagrams one by one.
                    if e.raw_os_error() == Some(libc::EIO) {
                        *max_segs = 1;
                    }
                    tracing::debug!(error = %e, segs, "GSO send refused; sending datagrams singly");
                    single_until = at + segs;
                }
                _ => {
                    // The first datagram failed (for example ECONNREFUSED left by an ICMP
                    // error, or an unroutable destination): drop it and go on.
                    tracing::trace!(error = %e, "sendmmsg dropped a datagram");
                    out.dropped += 1;
                    at += 1;
                }
            }
        }
        out
    }
}

/// A queue of outgoing datagrams on one socket, sent with as few `sendmmsg` calls (and GSO
/// messages) as the kernel allows. Why: one syscall per datagram is what a bare forwarder
/// avoids.
pub struct SendQueue {
    slots: Slots,
    max_segs: usize,
}

impl std::fmt::Debug for SendQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendQueue")
            .field("queued", &self.slots.lens.len())
            .field("max_segs", &self.max_segs)
            .finish()
    }
}

impl SendQueue {
    /// A queue of [`SEND_BATCH`] slots of `slot` bytes each, with GSO where the kernel has it.
    pub fn new(slot: usize) -> SendQueue {
        SendQueue {
            slots: Slots::new(slot),
            max_segs: max_gso_segments(),
        }
    }

    /// Turn GSO off (or back on, where the kernel has it): the load tool's plain references.
    pub fn set_gso(&mut self, on: bool) {
        self.max_segs = if on { max_gso_segments() } else { 1 };
    }

    /// Datagrams waiting.
    pub fn len(&self) -> usize {
        self.slots.lens.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.slots.lens.is_empty()
    }

    /// Whether every slot is taken (flush before adding more).
    pub fn is_full(&self) -> bool {
        self.slots.lens.len() == SEND_BATCH
    }

    /// The next free slot, to be filled in place and then claimed with [`SendQueue::commit`];
    /// `None` when the queue is full.
    pub fn slot_mut(&mut self) -> Option<&mut [u8]> {
        self.slots.slot_mut()
    }

    /// Claim the first `len` bytes of the slot returned by [`SendQueue::slot_mut`] as a
    /// datagram to `dst`, sent from `src` when given (wildcard sockets).
    pub fn commit(&mut self, len: usize, dst: SocketAddr, src: Option<IpAddr>) {
        self.slots.commit(len, dst, src);
    }

    /// Copy `bytes` into a slot; false when the queue is full or `bytes` does not fit.
    pub fn push(&mut self, bytes: &[u8], dst: SocketAddr, src: Option<IpAddr>) -> bool {
        self.slots.push(bytes, dst, src)
    }

    /// Send everything queued on `sock` and empty the queue.
    pub fn flush(&mut self, sock: &impl AsFd) -> Flushed {
        let n = self.slots.lens.len();
        if n == 0 {
            return Flushed::default();
        }
        let out = self
            .slots
            .send(sock.as_fd().as_raw_fd(), 0, n, &mut self.max_segs);
        self.slots.clear();
        out
    }
}

/// Client-to-peer datagrams of one event-loop turn, each on its own relay socket, sent at the
/// turn's end: one `sendmmsg` per run of datagrams on one socket, and a video frame's packets
/// to one peer as one GSO message. Why: a send per datagram is the cost GSO takes away.
pub struct PeerSendQueue<S> {
    slots: Slots,
    socks: Vec<S>,
    max_segs: usize,
    /// What flushes forced by a full queue did since the last [`PeerSendQueue::flush`].
    early: Flushed,
}

impl<S> std::fmt::Debug for PeerSendQueue<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerSendQueue")
            .field("queued", &self.slots.lens.len())
            .finish()
    }
}

impl<S: AsFd + Clone> PeerSendQueue<S> {
    /// A queue of [`SEND_BATCH`] slots of `slot` bytes each.
    pub fn new(slot: usize) -> PeerSendQueue<S> {
        PeerSendQueue {
            slots: Slots::new(slot),
            socks: Vec::with_capacity(SEND_BATCH),
            max_segs: max_gso_segments(),
            early: Flushed::default(),
        }
    }

    /// Queue `payload` to `dst` on `sock` (flushing first when full); false when it does not
    /// fit a slot, and the caller sends it itself.
    pub fn push(&mut self, sock: &S, payload: &[u8], dst: SocketAddr) -> bool {
        if payload.len() > self.slots.slot {
            return false;
        }
        if self.slots.lens.len() == SEND_BATCH {
            let f = self.send_all();
            self.early += f;
        }
        self.socks.push(sock.clone());
        self.slots.push(payload, dst, None)
    }

    /// Datagrams waiting.
    pub fn len(&self) -> usize {
        self.slots.lens.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.slots.lens.is_empty()
    }

    /// Send everything queued, each run on its socket; what this and any earlier forced
    /// flush did.
    pub fn flush(&mut self) -> Flushed {
        let mut out = std::mem::take(&mut self.early);
        out += self.send_all();
        out
    }

    fn send_all(&mut self) -> Flushed {
        let n = self.slots.lens.len();
        let mut out = Flushed::default();
        let mut at = 0;
        while at < n {
            let fd = self.socks[at].as_fd().as_raw_fd();
            let mut end = at + 1;
            while end < n && self.socks[end].as_fd().as_raw_fd() == fd {
                end += 1;
            }
            out += self.slots.send(fd, at, end, &mut self.max_segs);
            at = end;
        }
        self.slots.clear();
        self.socks.clear();
        out
    }
}

/// Write an IP_PKTINFO / IPV6_PKTINFO control message choosing `src` as the source address at
/// `p` (the start of a [`Ctrl`] buffer); returns its length.
fn encode_src(p: *mut u8, src: IpAddr) -> usize {
    match src {
        IpAddr::V4(ip) => {
            let info = libc::in_pktinfo {
                ipi_ifindex: 0,
                ipi_spec_dst: libc::in_addr {
                    s_addr: u32::from_ne_bytes(ip.octets()),
                },
                ipi_addr: libc::in_addr { s_addr: 0 },
            };
            write_cmsg(p, libc::IPPROTO_IP, libc::IP_PKTINFO, info)
        }
        IpAddr::V6(ip) => {
            let info = libc::in6_pktinfo {
                ipi6_addr: libc::in6_addr {
                    s6_addr: ip.octets(),
                },
                ipi6_ifindex: 0,
            };
            write_cmsg(p, libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, info)
        }
    }
}

fn write_cmsg<T: Copy>(p: *mut u8, level: i32, ty: i32, value: T) -> usize {
    #[allow(unsafe_code)]
    // SAFETY: `p` points into a CMSG_ROOM-byte buffer aligned to 8 (the alignment of cmsghdr),
    // at an offset that is a multiple of CMSG_SPACE's alignment with room for this message:
    // a pktinfo message takes at most 40 bytes and a UDP_SEGMENT one 16, 56 in all. The header
    // and the data are written with unaligned-safe writes at the offsets CMSG_DATA computes.
    unsafe {
        let space = libc::CMSG_SPACE(std::mem::size_of::<T>() as u32) as usize;
        debug_assert!(space <= CMSG_ROOM);
        let hdr = p.cast::<libc::cmsghdr>();
        (*hdr).cmsg_level = level;
        (*hdr).cmsg_type = ty;
        (*hdr).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<T>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(hdr).cast::<T>(), value);
        space
    }
}

/// A receive batch: [`RECV_BATCH`] buffers of `size` bytes and their metadata, read with one
/// `recvmmsg` through quinn-udp. Why: a failing extra syscall per wake-up and one syscall per
/// datagram is what batching removes.
pub struct RecvBatch {
    size: usize,
    data: Box<[u8]>,
    meta: Vec<RecvMeta>,
    n: usize,
}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch").field("n", &self.n).finish()
    }
}

impl RecvBatch {
    /// Buffers of `size` bytes each (a GRO-coalesced read may fill one with several datagrams:
    /// on a socket with GRO on, `size` must hold 64 KiB or the kernel cuts such reads short).
    pub fn new(size: usize) -> RecvBatch {
        RecvBatch {
            size,
            data: vec![0u8; size * RECV_BATCH].into_boxed_slice(),
            meta: vec![RecvMeta::default(); RECV_BATCH],
            n: 0,
        }
    }

    /// Read what `sock` has queued (up to one batch); `Ok(0)` never happens, `WouldBlock` means
    /// the socket is drained.
    pub fn recv(&mut self, state: &UdpSocketState, sock: &impl AsFd) -> io::Result<usize> {
        self.n = 0;
        let mut bufs: [IoSliceMut<'_>; RECV_BATCH] = {
            let mut it = self.data.chunks_mut(self.size).map(IoSliceMut::new);
            std::array::from_fn(|_| it.next().unwrap_or_else(|| IoSliceMut::new(&mut [])))
        };
        let n = state.recv(sock.into(), &mut bufs, &mut self.meta)?;
        self.n = n;
        Ok(n)
    }

    /// The datagrams of the last read: (payload, source, destination IP), GRO segments split.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], SocketAddr, Option<IpAddr>)> + '_ {
        (0..self.n).flat_map(move |i| {
            let m = &self.meta[i];
            let buf = &self.data[i * self.size..i * self.size + m.len.min(self.size)];
            let stride = if m.stride == 0 {
                buf.len().max(1)
            } else {
                m.stride
            };
            buf.chunks(stride).map(move |d| (d, m.addr, m.dst_ip))
        })
    }
}

/// Turn UDP GRO on `sock` on or off; false when the kernel refused. Why: a relay socket reads
/// a video frame's datagrams from one peer in one go (quinn-udp turns it on only for sockets
/// it builds a state for, and the relay sockets share their shard's).
pub fn set_gro(sock: &impl AsFd, on: bool) -> bool {
    let val: libc::c_int = on.into();
    #[allow(unsafe_code)]
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a live local c_int.
    let r = unsafe {
        libc::setsockopt(
            sock.as_fd().as_raw_fd(),
            libc::SOL_UDP,
            libc::UDP_GRO,
            (&val as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    r == 0
}

/// Turn path-MTU discovery off on `sock` so the kernel fragments large relayed datagrams
/// instead of dropping them: quinn-udp sets DF for QUIC, but a TURN server must not unless the
/// client asked (RFC 8656 §14).
pub fn allow_fragmentation(sock: &impl AsFd, v6: bool) {
    let fd = sock.as_fd().as_raw_fd();
    let (level, name, val) = if v6 {
        (
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU_DISCOVER,
            libc::IPV6_PMTUDISC_DONT,
        )
    } else {
        (
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DONT,
        )
    };
    #[allow(unsafe_code)]
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a live local c_int.
    let _ = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&val as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;

    #[test]
    fn batch_round_trip_with_source_address() {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("0.0.0.0:0").unwrap();
        let state = UdpSocketState::new((&b).into()).unwrap();
        let b_port = b.local_addr().unwrap().port();
        let dst = SocketAddr::from(([127, 0, 0, 1], b_port));
        let mut q = SendQueue::new(256);
        for i in 0..10u8 {
            assert!(q.push(&[i; 5], dst, Some(IpAddr::from([127, 0, 0, 1]))));
        }
        let f = q.flush(&a);
        assert_eq!((f.sent, f.dropped), (10, 0));
        // Ten equal datagrams to one destination: one GSO message where the kernel has GSO.
        let want = if max_gso_segments() > 1 { 1 } else { 10 };
        assert_eq!(f.messages, want);
        assert!(q.is_empty());
        let mut r = RecvBatch::new(2048);
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while got.len() < 10 && std::time::Instant::now() < deadline {
            match r.recv(&state, &b) {
                Ok(_) => got.extend(r.iter().map(|(d, s, ip)| (d.to_vec(), s, ip))),
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
            }
        }
        assert_eq!(got.len(), 10);
        assert_eq!(got[3].0, vec![3u8; 5]);
        assert_eq!(got[0].1, a.local_addr().unwrap());
        // The wildcard socket learns which local address each datagram was sent to.
        assert_eq!(got[0].2, Some(IpAddr::from([127, 0, 0, 1])));
        // And a reply can leave from that address.
        let mut q = SendQueue::new(64);
        q.push(b"pong", got[0].1, got[0].2);
        assert_eq!(q.flush(&b).sent, 1);
        let mut buf = [0u8; 16];
        a.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let (n, from) = a.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"pong");
        assert_eq!(from, dst);
    }

    #[test]
    fn full_queue_refuses_more() {
        let mut q = SendQueue::new(8);
        let dst = SocketAddr::from(([127, 0, 0, 1], 9));
        for _ in 0..SEND_BATCH {
            assert!(q.push(b"x", dst, None));
        }
        assert!(q.is_full());
        assert!(!q.push(b"x", dst, None));
        assert!(!SendQueue::new(2).push(b"toolong", dst, None));
    }

    fn lens_same(lens: &[usize], at: usize, max: usize) -> usize {
        gso_run(lens, at, max, |_, _| true)
    }

    #[test]
    fn gso_runs_take_equal_segments_and_a_shorter_last() {
        // Ten equal, then a short one that ends the run.
        let mut v = vec![1204; 10];
        v.push(400);
        v.push(1204);
        assert_eq!(lens_same(&v, 0, 64), 11);
        // After the short one a new run starts.
        assert_eq!(lens_same(&v, 11, 64), 1);
        // A longer datagram ends a run without joining it.
        assert_eq!(lens_same(&[100, 100, 200, 200], 0, 64), 2);
        assert_eq!(lens_same(&[100, 100, 200, 200], 2, 64), 2);
        // At most max_segs, and never past the byte cap.
        assert_eq!(lens_same(&[100; 10], 0, 4), 4);
        assert_eq!(lens_same(&[100; 10], 8, 4), 2);
        assert_eq!(lens_same(&[30_000; 4], 0, 64), 2);
        // No GSO: one each.
        assert_eq!(lens_same(&[100; 10], 0, 1), 1);
        // Out of range, and empty datagrams, which GSO cannot carry.
        assert_eq!(lens_same(&[100], 1, 64), 0);
        assert_eq!(lens_same(&[0, 0], 0, 64), 1);
        // Another destination or source ends the run.
        let dst = [1, 1, 2, 2, 2];
        assert_eq!(gso_run(&[50; 5], 0, 64, |a, b| dst[a] == dst[b]), 2);
        assert_eq!(gso_run(&[50; 5], 2, 64, |a, b| dst[a] == dst[b]), 3);
    }

    /// Read `want` datagrams from a plain blocking socket (no GRO): what the wire carried.
    fn read_plain(s: &UdpSocket, want: usize) -> Vec<(usize, SocketAddr)> {
        s.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let mut buf = vec![0u8; 65_536];
        let mut got = Vec::new();
        while got.len() < want {
            match s.recv_from(&mut buf) {
                Ok((n, from)) => got.push((n, from)),
                Err(_) => break,
            }
        }
        got
    }

    #[test]
    fn gso_send_arrives_as_separate_datagrams() {
        if max_gso_segments() <= 1 {
            eprintln!("skipped: this kernel has no UDP_SEGMENT (GSO)");
            return;
        }
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let plain = UdpSocket::bind("127.0.0.1:0").unwrap();
        let dst = plain.local_addr().unwrap();
        let mut q = SendQueue::new(2048);
        // A "frame": five full segments and a shorter last one, then a lone datagram.
        for i in 0..5u8 {
            assert!(q.push(&[i; 1200], dst, None));
        }
        assert!(q.push(&[9; 300], dst, None));
        assert!(q.push(&[7; 1500], dst, None));
        let f = q.flush(&a);
        assert_eq!((f.sent, f.dropped, f.messages), (7, 0, 2));
        let got = read_plain(&plain, 7);
        let sizes: Vec<usize> = got.iter().map(|g| g.0).collect();
        assert_eq!(sizes, vec![1200, 1200, 1200, 1200, 1200, 300, 1500]);
        assert!(got.iter().all(|g| g.1 == a.local_addr().unwrap()));
        // A receiver with GRO gets the frame in fewer reads and the batch splits it again.
        let gro = UdpSocket::bind("127.0.0.1:0").unwrap();
        let state = UdpSocketState::new((&gro).into()).unwrap();
        gro.set_nonblocking(true).unwrap();
        for i in 0..5u8 {
            q.push(&[i; 1200], gro.local_addr().unwrap(), None);
        }
        q.push(&[9; 300], gro.local_addr().unwrap(), None);
        assert_eq!(q.flush(&a).sent, 6);
        let mut r = RecvBatch::new(65_536);
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while got.len() < 6 && std::time::Instant::now() < deadline {
            match r.recv(&state, &gro) {
                Ok(_) => got.extend(r.iter().map(|(d, _, _)| (d.len(), d[0]))),
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
            }
        }
        assert_eq!(
            got,
            vec![
                (1200, 0),
                (1200, 1),
                (1200, 2),
                (1200, 3),
                (1200, 4),
                (300, 9)
            ]
        );
    }

    #[test]
    fn peer_queue_sends_each_run_on_its_socket() {
        let r1 = UdpSocket::bind("127.0.0.1:0").unwrap();
        let r2 = UdpSocket::bind("127.0.0.1:0").unwrap();
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = peer.local_addr().unwrap();
        let (r1, r2) = (std::sync::Arc::new(r1), std::sync::Arc::new(r2));
        let mut q: PeerSendQueue<std::sync::Arc<UdpSocket>> = PeerSendQueue::new(1500);
        for _ in 0..3 {
            assert!(q.push(&r1, &[1; 1000], to));
        }
        for _ in 0..2 {
            assert!(q.push(&r2, &[2; 800], to));
        }
        assert!(q.push(&r1, &[3; 100], to));
        assert!(!q.push(&r1, &[0; 1501], to), "larger than a slot");
        assert_eq!(q.len(), 6);
        // More than a batch: the queue flushes itself and reports it with the next flush.
        for _ in 0..SEND_BATCH {
            assert!(q.push(&r2, &[4; 10], to));
        }
        let f = q.flush();
        assert!(q.is_empty());
        assert_eq!((f.sent, f.dropped), (6 + SEND_BATCH, 0));
        if max_gso_segments() > 1 {
            // r1's three, r2's two, r1's one, then r2's 58 and 6 in two runs of its own.
            assert_eq!(f.messages, 5);
        }
        let got = read_plain(&peer, 6 + SEND_BATCH);
        let seen: Vec<(usize, SocketAddr)> = got.into_iter().take(6).collect();
        let (a1, a2) = (r1.local_addr().unwrap(), r2.local_addr().unwrap());
        assert_eq!(
            seen,
            vec![
                (1000, a1),
                (1000, a1),
                (1000, a1),
                (800, a2),
                (800, a2),
                (100, a1)
            ]
        );
    }

    #[test]
    fn gro_can_be_switched() {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        // Kernels without UDP_GRO refuse both; others take both.
        assert_eq!(set_gro(&s, true), set_gro(&s, false));
    }
}
