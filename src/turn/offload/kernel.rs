//! The kernel half: loads bpf/turn_offload.o (built by build.rs), attaches it at TC ingress
//! and keeps its maps in step with [`super::Offload`].

use std::collections::HashMap as StdHashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::sync::{Arc, Mutex, Weak};

use aya::maps::{HashMap, MapData};
use aya::programs::tc::{NlOptions, TcAttachOptions};
use aya::programs::{tc, SchedClassifier, TcAttachType};
use aya::Ebpf;

use super::{ChannelCounters, ChannelRoute, OffloadAttach, OffloadError};

/// The loaded program of each live [`Kernel`], so [`detach_all`] can reach them on the way
/// out of the process whoever still holds the offload.
static ATTACHED: Mutex<Vec<Weak<Mutex<Option<Ebpf>>>>> = Mutex::new(Vec::new());

/// Detach every loaded program now: dropping the `Ebpf` drops its TC links, which removes
/// the clsact filter or closes the TCX link. The maps stay readable; the kernel stops
/// relaying and user space (if still running) gets every datagram.
pub(super) fn detach_all() {
    let mut all = ATTACHED.lock().unwrap_or_else(|p| p.into_inner());
    for w in all.drain(..) {
        if let Some(e) = w.upgrade() {
            drop(e.lock().unwrap_or_else(|p| p.into_inner()).take());
        }
    }
}

/// The object file clang produced; aligned because aya parses it in place.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/turn_offload.o"));

// The map layouts of bpf/turn_offload.c. Addresses and ports are in network byte order as
// they appear in packets; channel numbers in host order.

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct UpKey {
    client_ip: u32,
    listen_ip: u32,
    client_port: u16,
    listen_port: u16,
    channel: u16,
    pad: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct UpVal {
    relay_ip: u32,
    peer_ip: u32,
    relay_port: u16,
    peer_port: u16,
    ifindex: u32,
    id: u32,
    pad: u32,
    deadline_ns: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct DownKey {
    peer_ip: u32,
    relay_ip: u32,
    peer_port: u16,
    relay_port: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct DownVal {
    listen_ip: u32,
    client_ip: u32,
    listen_port: u16,
    client_port: u16,
    channel: u16,
    pad: u16,
    ifindex: u32,
    id: u32,
    deadline_ns: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct Counters {
    up_packets: u64,
    up_bytes: u64,
    down_packets: u64,
    down_bytes: u64,
}

// SAFETY: each type is `repr(C)` and made only of integers laid out without padding (the
// sizes are asserted below), so every byte pattern is a valid value and none is
// uninitialised: exactly what `aya::Pod` requires for copying to and from the kernel.
#[allow(unsafe_code)]
unsafe impl aya::Pod for UpKey {}
// SAFETY: as above.
#[allow(unsafe_code)]
unsafe impl aya::Pod for UpVal {}
// SAFETY: as above.
#[allow(unsafe_code)]
unsafe impl aya::Pod for DownKey {}
// SAFETY: as above.
#[allow(unsafe_code)]
unsafe impl aya::Pod for DownVal {}
// SAFETY: as above.
#[allow(unsafe_code)]
unsafe impl aya::Pod for Counters {}

const _: () = {
    assert!(std::mem::size_of::<UpKey>() == 16);
    assert!(std::mem::size_of::<UpVal>() == 32);
    assert!(std::mem::size_of::<DownKey>() == 12);
    assert!(std::mem::size_of::<DownVal>() == 32);
    assert!(std::mem::size_of::<Counters>() == 32);
};

fn ip_be(a: &SocketAddrV4) -> u32 {
    u32::from_ne_bytes(a.ip().octets())
}

fn port_be(a: &SocketAddrV4) -> u16 {
    a.port().to_be()
}

fn up_key(r: &ChannelRoute) -> UpKey {
    UpKey {
        client_ip: ip_be(&r.client),
        listen_ip: ip_be(&r.listener),
        client_port: port_be(&r.client),
        listen_port: port_be(&r.listener),
        channel: r.channel,
        pad: 0,
    }
}

fn down_key(r: &ChannelRoute) -> DownKey {
    DownKey {
        peer_ip: ip_be(&r.peer),
        relay_ip: ip_be(&r.relay),
        peer_port: port_be(&r.peer),
        relay_port: port_be(&r.relay),
    }
}

struct Maps {
    up: HashMap<MapData, UpKey, UpVal>,
    down: HashMap<MapData, DownKey, DownVal>,
    counters: HashMap<MapData, u32, Counters>,
}

/// The loaded program (its TC links live in `_ebpf`) and its maps.
pub(super) struct Kernel {
    maps: Mutex<Maps>,
    /// A second handle on the COUNTERS map for [`Kernel::read`]: lookups need no `&mut`, so
    /// the counter reader takes no lock that the shards' installs and removals take.
    counters_ro: HashMap<MapData, u32, Counters>,
    /// Local IPv4 address -> interface index, for the egress of each direction.
    ifindex: StdHashMap<Ipv4Addr, u32>,
    interfaces: Vec<String>,
    // Dropped last: closing it detaches the program ([`detach_all`] may do so earlier).
    _ebpf: Arc<Mutex<Option<Ebpf>>>,
}

fn load_err(e: impl std::fmt::Display) -> OffloadError {
    OffloadError::Load(e.to_string())
}

impl Kernel {
    pub(super) fn start(addrs: &[IpAddr], attach: OffloadAttach) -> Result<Kernel, OffloadError> {
        let (ifaces, ifindex) = interfaces_for(addrs);
        if ifaces.is_empty() {
            return Err(OffloadError::NoInterfaces(addrs.to_vec()));
        }
        let mut ebpf = Ebpf::load(OBJECT).map_err(load_err)?;
        let prog: &mut SchedClassifier = ebpf
            .program_mut("turn_ingress")
            .ok_or_else(|| load_err("turn_ingress missing from the object"))?
            .try_into()
            .map_err(load_err)?;
        prog.load().map_err(load_err)?;
        for iface in &ifaces {
            // Kernels before 6.6 attach through the clsact qdisc; it may already exist.
            let _ = tc::qdisc_add_clsact(iface);
            let attached = match attach {
                // A TCX link where the kernel has it (6.6+), which dies with the process.
                OffloadAttach::Auto => prog.attach(iface, TcAttachType::Ingress),
                // A clsact filter, which outlives a process killed without detaching it.
                OffloadAttach::Clsact => prog.attach_with_options(
                    iface,
                    TcAttachType::Ingress,
                    TcAttachOptions::Netlink(NlOptions::default()),
                ),
            };
            attached.map_err(|e| OffloadError::Attach {
                iface: iface.clone(),
                reason: e.to_string(),
            })?;
        }
        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| load_err(format!("map {name} missing from the object")))
        };
        let up = HashMap::try_from(take(&mut ebpf, "UPSTREAM")?).map_err(load_err)?;
        let down = HashMap::try_from(take(&mut ebpf, "DOWNSTREAM")?).map_err(load_err)?;
        let counters: HashMap<MapData, u32, Counters> =
            HashMap::try_from(take(&mut ebpf, "COUNTERS")?).map_err(load_err)?;
        let fd = {
            use aya::maps::IterableMap;
            use std::os::fd::AsFd;
            counters.map().fd().as_fd().try_clone_to_owned()
        }
        .map_err(load_err)?;
        let counters_ro = HashMap::try_from(aya::maps::Map::LruHashMap(
            MapData::from_fd(fd).map_err(load_err)?,
        ))
        .map_err(load_err)?;
        let ebpf = Arc::new(Mutex::new(Some(ebpf)));
        ATTACHED
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::downgrade(&ebpf));
        Ok(Kernel {
            maps: Mutex::new(Maps { up, down, counters }),
            counters_ro,
            ifindex,
            interfaces: ifaces,
            _ebpf: ebpf,
        })
    }

    pub(super) fn interfaces(&self) -> Vec<String> {
        self.interfaces.clone()
    }

    fn egress(&self, ip: &Ipv4Addr) -> Result<u32, OffloadError> {
        self.ifindex
            .get(ip)
            .copied()
            .ok_or(OffloadError::NoInterface(*ip))
    }

    /// Install (or renew) `r` with counter slot `id`, used by the program until `deadline_ns`
    /// (CLOCK_MONOTONIC, see [`monotonic_ns`]).
    pub(super) fn install(
        &self,
        r: &ChannelRoute,
        id: u32,
        deadline_ns: u64,
    ) -> Result<(), OffloadError> {
        if self.ifindex.contains_key(r.peer.ip()) {
            return Err(OffloadError::LocalPeer(*r.peer.ip()));
        }
        let to_peer = self.egress(r.relay.ip())?;
        let to_client = self.egress(r.listener.ip())?;
        let up = UpVal {
            relay_ip: ip_be(&r.relay),
            peer_ip: ip_be(&r.peer),
            relay_port: port_be(&r.relay),
            peer_port: port_be(&r.peer),
            ifindex: to_peer,
            id,
            pad: 0,
            deadline_ns,
        };
        let down = DownVal {
            listen_ip: ip_be(&r.listener),
            client_ip: ip_be(&r.client),
            listen_port: port_be(&r.listener),
            client_port: port_be(&r.client),
            channel: r.channel,
            pad: 0,
            ifindex: to_client,
            id,
            deadline_ns,
        };
        let mut m = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        let map_err = |e: aya::maps::MapError| OffloadError::Map(e.to_string());
        // BPF_NOEXIST keeps the counters of a route that is installed again.
        match m.counters.insert(id, Counters::default(), 1) {
            Ok(()) => {}
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc_eexist()) => {}
            Err(e) => return Err(map_err(e)),
        }
        m.down.insert(down_key(r), down, 0).map_err(map_err)?;
        m.up.insert(up_key(r), up, 0).map_err(map_err)?;
        Ok(())
    }

    pub(super) fn remove(&self, r: &ChannelRoute, both: bool) {
        let mut m = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        // Missing entries (evicted, never installed) are fine.
        let _ = m.down.remove(&down_key(r));
        if both {
            let _ = m.up.remove(&up_key(r));
        }
    }

    pub(super) fn read(&self, id: u32) -> Option<ChannelCounters> {
        let c = self.counters_ro.get(&id, 0).ok()?;
        Some(ChannelCounters {
            up_packets: c.up_packets,
            up_bytes: c.up_bytes,
            down_packets: c.down_packets,
            down_bytes: c.down_bytes,
        })
    }

    pub(super) fn forget(&self, id: u32) {
        let mut m = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        let _ = m.counters.remove(&id);
    }
}

/// Now on the clock `bpf_ktime_get_ns` reads (CLOCK_MONOTONIC), in nanoseconds.
/// On failure (never expected) it reads 0, so every deadline is already past and the kernel
/// hands everything to user space.
pub(super) fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the whole call and CLOCK_MONOTONIC is a
    // clock every Linux kernel has; clock_gettime writes only into `ts`.
    #[allow(unsafe_code)]
    let r = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if r != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// EEXIST without a libc dependency of our own.
fn libc_eexist() -> i32 {
    nix::errno::Errno::EEXIST as i32
}

/// The interfaces to attach to (those holding one of `addrs`, or every non-loopback one
/// with an IPv4 address for a wildcard) and the index of every interface by its IPv4
/// addresses.
fn interfaces_for(addrs: &[IpAddr]) -> (Vec<String>, StdHashMap<Ipv4Addr, u32>) {
    let mut names = Vec::new();
    let mut index = StdHashMap::new();
    let Ok(ifs) = nix::ifaddrs::getifaddrs() else {
        return (names, index);
    };
    let wildcard = addrs.iter().any(|a| a.is_unspecified());
    for i in ifs {
        let Some(v4) = i
            .address
            .as_ref()
            .and_then(|a| a.as_sockaddr_in())
            .map(|s| Ipv4Addr::from(s.ip()))
        else {
            continue;
        };
        let Ok(idx) = nix::net::if_::if_nametoindex(i.interface_name.as_str()) else {
            continue;
        };
        index.insert(v4, idx);
        let loopback = i
            .flags
            .contains(nix::net::if_::InterfaceFlags::IFF_LOOPBACK);
        let wanted = addrs.contains(&IpAddr::V4(v4)) || (wildcard && !loopback);
        if wanted && !names.contains(&i.interface_name) {
            names.push(i.interface_name);
        }
    }
    (names, index)
}
