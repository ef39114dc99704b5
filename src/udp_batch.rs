//! Batched UDP I/O for the relay data plane: `recvmmsg` through the maintained `quinn-udp`
//! crate (which also reports each datagram's destination address, so wildcard listeners can
//! answer from the address the client used), and a small `sendmmsg` queue of our own, because
//! quinn-udp sends one destination per syscall and a relay turn sends to many clients.
//!
//! The send queue owns fixed slots that are filled in place (the relay writes a ChannelData
//! header and receives the payload right behind it), so a steady stream allocates nothing.

use std::io;
use std::io::IoSliceMut;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd};

pub use quinn_udp::{RecvMeta, UdpSocketState, BATCH_SIZE as RECV_BATCH};

/// Datagrams one `sendmmsg` call may carry (the kernel's UIO_MAXIOV is far above this).
pub const SEND_BATCH: usize = 64;

/// Room for one IPv4 or IPv6 packet-info control message.
const CMSG_ROOM: usize = 64;

#[repr(C, align(8))]
#[derive(Clone, Copy)]
struct Ctrl([u8; CMSG_ROOM]);

/// What one flush did: datagrams the kernel took, and datagrams dropped (full socket buffer or
/// a per-destination error such as an ICMP-reported unreachable port).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Flushed {
    /// Accepted by the kernel.
    pub sent: usize,
    /// Dropped.
    pub dropped: usize,
}

/// A queue of outgoing datagrams on one socket, sent with as few `sendmmsg` calls as the kernel
/// allows. Why: one syscall per datagram is what a bare forwarder avoids.
pub struct SendQueue {
    slot: usize,
    data: Box<[u8]>,
    lens: Vec<usize>,
    dsts: Vec<socket2::SockAddr>,
    srcs: Vec<Option<IpAddr>>,
}

impl std::fmt::Debug for SendQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendQueue")
            .field("queued", &self.lens.len())
            .finish()
    }
}

impl SendQueue {
    /// A queue of [`SEND_BATCH`] slots of `slot` bytes each.
    pub fn new(slot: usize) -> SendQueue {
        SendQueue {
            slot,
            data: vec![0u8; slot * SEND_BATCH].into_boxed_slice(),
            lens: Vec::with_capacity(SEND_BATCH),
            dsts: Vec::with_capacity(SEND_BATCH),
            srcs: Vec::with_capacity(SEND_BATCH),
        }
    }

    /// Datagrams waiting.
    pub fn len(&self) -> usize {
        self.lens.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.lens.is_empty()
    }

    /// Whether every slot is taken (flush before adding more).
    pub fn is_full(&self) -> bool {
        self.lens.len() == SEND_BATCH
    }

    /// The next free slot, to be filled in place and then claimed with [`SendQueue::commit`];
    /// `None` when the queue is full.
    pub fn slot_mut(&mut self) -> Option<&mut [u8]> {
        let i = self.lens.len();
        if i == SEND_BATCH {
            return None;
        }
        Some(&mut self.data[i * self.slot..(i + 1) * self.slot])
    }

    /// Claim the first `len` bytes of the slot returned by [`SendQueue::slot_mut`] as a
    /// datagram to `dst`, sent from `src` when given (wildcard sockets).
    pub fn commit(&mut self, len: usize, dst: SocketAddr, src: Option<IpAddr>) {
        if self.lens.len() < SEND_BATCH {
            self.lens.push(len.min(self.slot));
            self.dsts.push(dst.into());
            self.srcs.push(src);
        }
    }

    /// Copy `bytes` into a slot; false when the queue is full or `bytes` does not fit.
    pub fn push(&mut self, bytes: &[u8], dst: SocketAddr, src: Option<IpAddr>) -> bool {
        let n = bytes.len();
        match self.slot_mut() {
            Some(s) if n <= s.len() => {
                s[..n].copy_from_slice(bytes);
                self.commit(n, dst, src);
                true
            }
            _ => false,
        }
    }

    /// Send everything queued on `sock` and empty the queue.
    pub fn flush(&mut self, sock: &impl AsFd) -> Flushed {
        let n = self.lens.len();
        let mut out = Flushed::default();
        if n == 0 {
            return out;
        }
        let fd = sock.as_fd().as_raw_fd();
        let mut iovs: [libc::iovec; SEND_BATCH] = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; SEND_BATCH];
        let mut ctrls = [Ctrl([0u8; CMSG_ROOM]); SEND_BATCH];
        // SAFETY: mmsghdr is a plain C struct of integers and pointers, for which all-zero is a
        // valid (empty) value.
        #[allow(unsafe_code)]
        let mut hdrs: [libc::mmsghdr; SEND_BATCH] = unsafe { std::mem::zeroed() };
        for i in 0..n {
            iovs[i].iov_base = self.data[i * self.slot..].as_mut_ptr().cast();
            iovs[i].iov_len = self.lens[i];
            let h = &mut hdrs[i].msg_hdr;
            h.msg_name = self.dsts[i].as_ptr() as *mut libc::c_void;
            h.msg_namelen = self.dsts[i].len();
            h.msg_iov = &mut iovs[i];
            h.msg_iovlen = 1;
            if let Some(src) = self.srcs[i] {
                let len = encode_src(&mut ctrls[i], src);
                h.msg_control = ctrls[i].0.as_mut_ptr().cast();
                h.msg_controllen = len as _;
            }
        }
        let mut at = 0;
        while at < n {
            // SAFETY: `hdrs[at..n]` are initialised above; every pointer they hold (names in
            // `self.dsts`, iovecs in `iovs` pointing into `self.data` within bounds, control
            // buffers in `ctrls`) lives until this function returns and is not moved meanwhile.
            #[allow(unsafe_code)]
            let r = unsafe {
                libc::sendmmsg(
                    fd,
                    hdrs[at..].as_mut_ptr(),
                    (n - at) as libc::c_uint,
                    libc::MSG_DONTWAIT,
                )
            };
            if r > 0 {
                out.sent += r as usize;
                at += r as usize;
                continue;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => {
                    // The socket buffer is full: what is left is dropped, as UDP would.
                    out.dropped += n - at;
                    break;
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
        self.lens.clear();
        self.dsts.clear();
        self.srcs.clear();
        out
    }
}

/// Write an IP_PKTINFO / IPV6_PKTINFO control message choosing `src` as the source address;
/// returns its length.
fn encode_src(buf: &mut Ctrl, src: IpAddr) -> usize {
    let p = buf.0.as_mut_ptr();
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
    // SAFETY: `p` points to a CMSG_ROOM-byte buffer aligned to 8 (the alignment of cmsghdr);
    // CMSG_SPACE of a 20-byte in6_pktinfo is 40 bytes, well inside it. The header and the data
    // are written with unaligned-safe writes at the offsets CMSG_DATA computes.
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
    /// Buffers of `size` bytes each (a GRO-coalesced read may fill one with several datagrams).
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
        assert_eq!(
            q.flush(&a),
            Flushed {
                sent: 10,
                dropped: 0
            }
        );
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
}
