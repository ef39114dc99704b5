// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0
//
// switchboard's kernel fast path for TURN ChannelData (RFC 8656 §12), attached at TC ingress.
//
// Client -> peer: an IPv4/UDP datagram from a client 4-tuple carrying ChannelData on a bound
// channel loses its 4-byte header and leaves from the relay address towards the peer.
// Peer -> client: a datagram from a peer to a relay address gains the ChannelData header and
// leaves from the listener address towards the client. Both are redirected to the egress
// interface with bpf_redirect_neigh (route and neighbour lookup by the kernel, no forwarding
// sysctl needed). Everything else, and every case this program does not fully understand,
// returns TC_ACT_OK untouched: user space is the fallback for all of it.
//
// The maps mirror the control plane's forwarding table; user space installs and removes the
// entries and reads the per-channel counters. Each entry carries a deadline (CLOCK_MONOTONIC
// nanoseconds, as bpf_ktime_get_ns reads it) that user space keeps pushing forward while it
// lives; past it the entry is ignored and the datagram goes up the stack. So a process that
// died without detaching the program (SIGKILL, with the clsact attachment of kernels before
// 6.6) stops being relayed for by its deadline instead of never.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "Dual MIT/GPL";

#define MAX_ENTRIES 65536

// Client -> server ChannelData: what arrives (addresses and ports in network order).
struct up_key {
	__u32 client_ip;
	__u32 listen_ip;
	__u16 client_port;
	__u16 listen_port;
	__u16 channel; // host order
	__u16 pad;
};

// Where it goes: from the relay socket's address to the peer.
struct up_val {
	__u32 relay_ip;
	__u32 peer_ip;
	__u16 relay_port;
	__u16 peer_port;
	__u32 ifindex; // egress towards the peer
	__u32 id;      // counter slot
	__u32 pad;
	__u64 deadline_ns; // bpf_ktime_get_ns after which the entry is not used
};

// Peer -> relay socket: what arrives.
struct down_key {
	__u32 peer_ip;
	__u32 relay_ip;
	__u16 peer_port;
	__u16 relay_port;
};

// Where it goes: from the listener address to the client, on `channel`.
struct down_val {
	__u32 listen_ip;
	__u32 client_ip;
	__u16 listen_port;
	__u16 client_port;
	__u16 channel; // host order
	__u16 pad;
	__u32 ifindex; // egress towards the client
	__u32 id;
	__u64 deadline_ns;
};

// Per channel binding, payload bytes (what user space would have relayed).
struct counters {
	__u64 up_packets;
	__u64 up_bytes;
	__u64 down_packets;
	__u64 down_bytes;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_ENTRIES);
	__type(key, struct up_key);
	__type(value, struct up_val);
} UPSTREAM SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_ENTRIES);
	__type(key, struct down_key);
	__type(value, struct down_val);
} DOWNSTREAM SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_ENTRIES);
	__type(key, __u32);
	__type(value, struct counters);
} COUNTERS SEC(".maps");

// Ethernet + IPv4 without options + UDP, as one read.
struct headers {
	struct ethhdr eth;
	struct iphdr ip;
	struct udphdr udp;
} __attribute__((packed));

#define L3_OFF ((int)sizeof(struct ethhdr))
#define L4_OFF ((int)(sizeof(struct ethhdr) + sizeof(struct iphdr)))
#define PAYLOAD_OFF ((int)sizeof(struct headers))

// Ones' complement helpers over raw 16-bit words as they sit in the packet.
static __always_inline __u32 csum_add16(__u32 sum, __u16 w)
{
	return sum + w;
}

static __always_inline __u32 csum_sub16(__u32 sum, __u16 w)
{
	return sum + (__u16)~w;
}

static __always_inline __u32 csum_add32(__u32 sum, __u32 v)
{
	return sum + (v & 0xffff) + (v >> 16);
}

static __always_inline __u32 csum_sub32(__u32 sum, __u32 v)
{
	return csum_sub16(csum_sub16(sum, v & 0xffff), v >> 16);
}

static __always_inline __u16 csum_fold(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)sum;
}

// Full IPv4 header checksum (20 bytes, check field taken as zero).
static __always_inline __u16 ip_checksum(struct iphdr *ip)
{
	__u16 *w = (__u16 *)ip;
	__u32 sum = 0;
	ip->check = 0;
#pragma unroll
	for (int i = 0; i < 10; i++)
		sum += w[i];
	return ~csum_fold(sum);
}

// The UDP checksum of the rewritten datagram, derived from the old one. `sum` starts as the
// difference of everything the caller added and removed; a zero (absent) IPv4 UDP checksum
// stays absent.
static __always_inline __u16 udp_checksum(__u16 old, __u32 sum)
{
	if (old == 0)
		return 0;
	__u16 c = ~csum_fold(csum_add16(sum, (__u16)~old));
	return c == 0 ? 0xffff : c;
}

// A locally generated datagram (CHECKSUM_PARTIAL, e.g. from a container on this host)
// carries only the pseudo-header sum in its checksum field; moving the UDP header would
// leave the kernel's csum_start behind, so such packets stay with user space. A real
// checksum equals this value only by chance (1 in 65536), and then the packet merely takes
// the slow path.
static __always_inline int looks_partial(const struct headers *h)
{
	__u32 sum = 0;
	sum = csum_add32(sum, h->ip.saddr);
	sum = csum_add32(sum, h->ip.daddr);
	sum = csum_add16(sum, bpf_htons(IPPROTO_UDP));
	sum = csum_add16(sum, h->udp.len);
	return h->udp.check == csum_fold(sum);
}

static __always_inline void count(__u32 id, int up, __u64 bytes)
{
	struct counters *c = bpf_map_lookup_elem(&COUNTERS, &id);
	if (c) {
		if (up) {
			__sync_fetch_and_add(&c->up_packets, 1);
			__sync_fetch_and_add(&c->up_bytes, bytes);
		} else {
			__sync_fetch_and_add(&c->down_packets, 1);
			__sync_fetch_and_add(&c->down_bytes, bytes);
		}
		return;
	}
	// Evicted or not yet created: start again; user space reads a drop as a reset.
	struct counters n = {};
	if (up) {
		n.up_packets = 1;
		n.up_bytes = bytes;
	} else {
		n.down_packets = 1;
		n.down_bytes = bytes;
	}
	bpf_map_update_elem(&COUNTERS, &id, &n, BPF_NOEXIST);
}

// Client -> peer: strip the ChannelData header. Returns -1 when the datagram is not a
// ChannelData on an installed channel (the caller then tries the other direction).
static __always_inline int upstream(struct __sk_buff *skb, struct headers *h, __u32 udp_len)
{
	__u16 cd[2]; // channel number, length (network order)
	if (udp_len < sizeof(struct udphdr) + 4)
		return -1;
	if (bpf_skb_load_bytes(skb, PAYLOAD_OFF, cd, 4) < 0)
		return -1;
	__u16 channel = bpf_ntohs(cd[0]);
	if ((channel & 0xc000) != 0x4000)
		return -1;
	struct up_key k = {
		.client_ip = h->ip.saddr,
		.listen_ip = h->ip.daddr,
		.client_port = h->udp.source,
		.listen_port = h->udp.dest,
		.channel = channel,
	};
	struct up_val *v = bpf_map_lookup_elem(&UPSTREAM, &k);
	if (!v)
		return -1;
	if (bpf_ktime_get_ns() > v->deadline_ns)
		return TC_ACT_OK; // past its deadline: user space (if alive) relays it
	__u32 data_len = bpf_ntohs(cd[1]);
	__u32 extra = udp_len - sizeof(struct udphdr) - 4;
	if (data_len > extra)
		return TC_ACT_OK; // truncated: user space answers it
	__u32 pad = extra - data_len;
	if (pad > 3)
		return TC_ACT_OK;
	if (pad) {
		// Only zero padding is dropped here (it adds nothing to the checksum).
		__u8 p[4] = {};
		if (bpf_skb_load_bytes(skb, PAYLOAD_OFF + 4 + data_len, p, pad) < 0)
			return TC_ACT_OK;
		if (p[0] | p[1] | p[2])
			return TC_ACT_OK;
	}

	__u16 new_len = bpf_htons(sizeof(struct udphdr) + data_len);
	__u16 new_tot = bpf_htons(sizeof(struct iphdr) + sizeof(struct udphdr) + data_len);
	__u32 sum = 0;
	// Pseudo-header: addresses and length.
	sum = csum_sub32(sum, h->ip.saddr);
	sum = csum_sub32(sum, h->ip.daddr);
	sum = csum_add32(sum, v->relay_ip);
	sum = csum_add32(sum, v->peer_ip);
	sum = csum_sub16(sum, h->udp.len);
	sum = csum_add16(sum, new_len);
	// UDP header: ports and length.
	sum = csum_sub16(sum, h->udp.source);
	sum = csum_sub16(sum, h->udp.dest);
	sum = csum_add16(sum, v->relay_port);
	sum = csum_add16(sum, v->peer_port);
	sum = csum_sub16(sum, h->udp.len);
	sum = csum_add16(sum, new_len);
	// The ChannelData header leaves the payload.
	sum = csum_sub16(sum, cd[0]);
	sum = csum_sub16(sum, cd[1]);

	struct udphdr udp = {
		.source = v->relay_port,
		.dest = v->peer_port,
		.len = new_len,
		.check = udp_checksum(h->udp.check, sum),
	};
	struct iphdr ip = h->ip;
	ip.saddr = v->relay_ip;
	ip.daddr = v->peer_ip;
	ip.tot_len = new_tot;
	ip.ttl = 64;
	ip.check = ip_checksum(&ip);
	__u32 ifindex = v->ifindex;
	__u32 id = v->id;
	__u32 new_skb_len = sizeof(struct headers) + data_len;

	// Removes the 4 bytes right after the IP header (the old ports); the 8 bytes from there
	// on are then overwritten with the new UDP header, which swallows the ChannelData header.
	// Until this succeeds the packet is untouched.
	if (bpf_skb_adjust_room(skb, -4, BPF_ADJ_ROOM_NET, 0) < 0)
		return TC_ACT_OK;
	// Padding and any Ethernet trailer.
	if (skb->len != new_skb_len && bpf_skb_change_tail(skb, new_skb_len, 0) < 0)
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, L3_OFF, &ip, sizeof(ip), BPF_F_RECOMPUTE_CSUM) < 0 ||
	    bpf_skb_store_bytes(skb, L4_OFF, &udp, sizeof(udp), BPF_F_RECOMPUTE_CSUM) < 0)
		return TC_ACT_SHOT;
	count(id, 1, data_len);
	return bpf_redirect_neigh(ifindex, NULL, 0, 0);
}

// Peer -> client: prepend the ChannelData header.
static __always_inline int downstream(struct __sk_buff *skb, struct headers *h, __u32 udp_len)
{
	struct down_key k = {
		.peer_ip = h->ip.saddr,
		.relay_ip = h->ip.daddr,
		.peer_port = h->udp.source,
		.relay_port = h->udp.dest,
	};
	struct down_val *v = bpf_map_lookup_elem(&DOWNSTREAM, &k);
	if (!v)
		return TC_ACT_OK;
	if (bpf_ktime_get_ns() > v->deadline_ns)
		return TC_ACT_OK; // past its deadline: not ours any more
	__u32 data_len = udp_len - sizeof(struct udphdr);
	if (data_len > 0xffff - 4 - sizeof(struct udphdr) - sizeof(struct iphdr))
		return TC_ACT_OK;
	__u32 mtu_len = 0;
	if (bpf_check_mtu(skb, v->ifindex, &mtu_len, 4, 0) != BPF_MTU_CHK_RET_SUCCESS)
		return TC_ACT_OK; // too big once framed: user space decides

	__u16 cd[2] = {bpf_htons(v->channel), bpf_htons(data_len)};
	__u16 new_len = bpf_htons(sizeof(struct udphdr) + 4 + data_len);
	__u16 new_tot = bpf_htons(sizeof(struct iphdr) + sizeof(struct udphdr) + 4 + data_len);
	__u32 sum = 0;
	sum = csum_sub32(sum, h->ip.saddr);
	sum = csum_sub32(sum, h->ip.daddr);
	sum = csum_add32(sum, v->listen_ip);
	sum = csum_add32(sum, v->client_ip);
	sum = csum_sub16(sum, h->udp.len);
	sum = csum_add16(sum, new_len);
	sum = csum_sub16(sum, h->udp.source);
	sum = csum_sub16(sum, h->udp.dest);
	sum = csum_add16(sum, v->listen_port);
	sum = csum_add16(sum, v->client_port);
	sum = csum_sub16(sum, h->udp.len);
	sum = csum_add16(sum, new_len);
	sum = csum_add16(sum, cd[0]);
	sum = csum_add16(sum, cd[1]);

	struct {
		struct udphdr udp;
		__u16 cd[2];
	} l4 = {
		.udp = {
			.source = v->listen_port,
			.dest = v->client_port,
			.len = new_len,
			.check = udp_checksum(h->udp.check, sum),
		},
		.cd = {cd[0], cd[1]},
	};
	struct iphdr ip = h->ip;
	ip.saddr = v->listen_ip;
	ip.daddr = v->client_ip;
	ip.tot_len = new_tot;
	ip.ttl = 64;
	ip.check = ip_checksum(&ip);
	__u32 ifindex = v->ifindex;
	__u32 id = v->id;
	__u32 new_skb_len = sizeof(struct headers) + 4 + data_len;

	// Inserts 4 zero bytes right after the IP header; the new UDP header and the ChannelData
	// header then cover them and the old UDP header (no helper inserts after L4).
	if (bpf_skb_adjust_room(skb, 4, BPF_ADJ_ROOM_NET, 0) < 0)
		return TC_ACT_OK;
	if (skb->len != new_skb_len && bpf_skb_change_tail(skb, new_skb_len, 0) < 0)
		return TC_ACT_SHOT; // an Ethernet trailer that cannot be cut
	if (bpf_skb_store_bytes(skb, L3_OFF, &ip, sizeof(ip), BPF_F_RECOMPUTE_CSUM) < 0 ||
	    bpf_skb_store_bytes(skb, L4_OFF, &l4, sizeof(l4), BPF_F_RECOMPUTE_CSUM) < 0)
		return TC_ACT_SHOT;
	count(id, 0, data_len);
	return bpf_redirect_neigh(ifindex, NULL, 0, 0);
}

SEC("classifier")
int turn_ingress(struct __sk_buff *skb)
{
	if (skb->protocol != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	if (skb->gso_size)
		return TC_ACT_OK; // aggregated datagrams: not ours
	struct headers h;
	if (bpf_skb_load_bytes(skb, 0, &h, sizeof(h)) < 0)
		return TC_ACT_OK;
	if (h.ip.version != 4 || h.ip.ihl != 5 || h.ip.protocol != IPPROTO_UDP)
		return TC_ACT_OK;
	if (h.ip.frag_off & bpf_htons(0x3fff))
		return TC_ACT_OK; // fragments
	__u32 tot = bpf_ntohs(h.ip.tot_len);
	__u32 udp_len = bpf_ntohs(h.udp.len);
	// skb->len may exceed the IP length by an Ethernet trailer (short frames).
	if (udp_len < sizeof(struct udphdr) || tot != sizeof(struct iphdr) + udp_len ||
	    skb->len < sizeof(struct ethhdr) + tot)
		return TC_ACT_OK;
	if (looks_partial(&h))
		return TC_ACT_OK;
	int r = upstream(skb, &h, udp_len);
	if (r >= 0)
		return r;
	return downstream(skb, &h, udp_len);
}
