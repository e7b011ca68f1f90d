//! Types shared by the XDP programs and userspace: map keys and values, map
//! names, flags, and the one flow-hash function both sides must agree on.
//!
//! Byte order: addresses and ports are stored exactly as they appear on the
//! wire (network order), read as native-endian integers. The hash works on
//! those raw words, so userspace must build them the same way (see
//! [`addr_words_v4`], [`addr_words_v6`], [`port_raw`]).
#![no_std]

pub mod conntrack;
pub mod hash;
pub mod quic;

pub use conntrack::{ConnBucket, ConnSlot, CONN_F_GUE, CONN_F_PAST_SYN, CONN_F_SOURCE_HASH, CONN_WAYS};
pub use hash::{cid_hash, flow_digest, flow_hash, ring_slot, source_hash};

/// Map names, as the programs declare them and userspace looks them up.
pub mod map_names {
    pub const VIPS: &str = "VIPS";
    pub const BACKENDS: &str = "BACKENDS";
    pub const RINGS: &str = "RINGS";
    pub const CONNS: &str = "CONNS";
    pub const CONFIG: &str = "CONFIG";
    pub const GLOBAL_STATS: &str = "GLOBAL_STATS";
    pub const VIP_STATS: &str = "VIP_STATS";
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    pub const DECAP_ADDRS: &str = "DECAP_ADDRS";
    pub const DECAP_CONFIG: &str = "DECAP_CONFIG";
    pub const DECAP_STATS: &str = "DECAP_STATS";
    pub const VIP_FILTER: &str = "VIP_FILTER";
    pub const FLOOD: &str = "FLOOD";
    pub const PROBE_ROUTES: &str = "PROBE_ROUTES";
    /// The offload flavor's counters: plain arrays, written by atomic adds.
    pub const OFFLOAD_VIP_STATS: &str = "OFFLOAD_VIP_STATS";
    pub const OFFLOAD_BACKEND_STATS: &str = "OFFLOAD_BACKEND_STATS";
    pub const VIP_SLOTS: &str = "VIP_SLOTS";
    pub const VIP_ENTRIES: &str = "VIP_ENTRIES";
    pub const QUIC_SERVERS: &str = "QUIC_SERVERS";
    /// Ingress VLAN ID -> egress VLAN ID (`lbctl up --vlan-map`); not
    /// pinned: written from the options at every start.
    pub const VLAN_EGRESS: &str = "VLAN_EGRESS";
    /// The backend-facing interface (`lbctl up --backend-iface`): a devmap
    /// of one entry; not pinned, written at every start.
    pub const EGRESS: &str = "EGRESS";
    /// The balancer's maps: what a controller pins and a restart adopts.
    pub const BALANCER_MAPS: [&str; 12] = [
        VIPS,
        VIP_SLOTS,
        VIP_ENTRIES,
        VIP_FILTER,
        BACKENDS,
        RINGS,
        CONNS,
        CONFIG,
        GLOBAL_STATS,
        VIP_STATS,
        BACKEND_STATS,
        QUIC_SERVERS,
    ];
}

/// Program names (the function names in `lb-ebpf`).
pub mod program_names {
    pub const BALANCER: &str = "lb_balancer";
    pub const OFFLOAD: &str = "lb_offload";
    pub const DECAP: &str = "lb_decap";
}

/// How many VIPs and backends the maps hold. Backend and VIP ids index arrays.
pub const MAX_VIPS: u32 = 1024;
/// Backend ids fit in the ring array's 16-bit slots. Each VIP's backend
/// takes an id of its own: 512 VIPs x 100 backends fit.
pub const MAX_BACKENDS: u32 = 1 << 16;
/// Default Maglev ring size: a prime, as Maglev needs (paper, section 3.4).
pub const DEFAULT_RING_SIZE: u32 = 65537;
/// Ring slots per element of the ring array. An array map rounds every
/// element up to 8 bytes, so four 16-bit backend ids share one: a ring
/// takes a quarter of the memory (and of the cache lines a new flow can
/// miss) that one id per element would.
pub const RING_SLOTS_PER_WORD: u32 = 4;
/// One element of the ring array: four consecutive slots.
pub type RingWord = [u16; RING_SLOTS_PER_WORD as usize];

/// Slots a ring of `size` occupies: whole words, so that every ring starts
/// on a word.
pub const fn ring_stride(size: u32) -> u32 {
    size.div_ceil(RING_SLOTS_PER_WORD) * RING_SLOTS_PER_WORD
}

/// Map flag (uapi bpf.h): the array's values can be mmap()ed.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;
/// Rings a VIP may keep in the ring array: the live ring, the
/// [`ALTERNATE_RINGS`], and a free one where the next ring is written
/// before it goes live (rings that are equal share one).
pub const RINGS_PER_VIP: u32 = 2 + ALTERNATE_RINGS as u32;
/// Rings every VIP is sure of: the live ring and the free one. Alternate
/// rings take what room is left, and give it back to a VIP that needs it.
pub const RESERVED_RINGS_PER_VIP: u32 = 2;
/// VIPs of the default ring size the default ring capacity holds.
pub const DEFAULT_RING_VIPS: u32 = 512;
/// Default number of ring slots in the shared ring array (2 bytes each).
/// Userspace may change it.
pub const DEFAULT_RING_CAPACITY: u32 = RESERVED_RINGS_PER_VIP * DEFAULT_RING_VIPS * ring_stride(DEFAULT_RING_SIZE);
/// Default conn-table entries. Userspace may change it at load.
pub const DEFAULT_CONN_TABLE_SIZE: u32 = 262_144;
/// Default MTU of the path to backends (outer packet, without Ethernet).
pub const DEFAULT_MTU: u32 = 1500;

pub const AF_INET: u8 = 4;
pub const AF_INET6: u8 = 6;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_IPV6: u8 = 41;
pub const IPPROTO_ICMPV6: u8 = 58;

/// Sizes of the headers the balancer adds.
pub const ETH_HLEN: usize = 14;
pub const IPV4_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;
pub const UDP_HLEN: usize = 8;
/// GUE variant 0 base header (draft-ietf-intarea-gue section 3.1).
pub const GUE_HLEN: usize = 4;
/// Default UDP port of GUE packets towards backends.
pub const DEFAULT_GUE_PORT: u16 = 6080;

/// GUE private data of this project (counted by Hlen, flags zero, so a
/// stock receiver skips it): one word `[GUE_ALTERNATE_KIND, family, count,
/// 0]`, then `count` alternate backends' addresses (4 or 16 bytes each), in
/// the order a backend without a socket for the packet tries them. A
/// backend that passes the packet on removes the first address and lowers
/// `count` (the whole private data when it was the last), so a packet is
/// passed on at most `count` times.
pub const GUE_ALTERNATE_KIND: u8 = 1;
/// Declared rings a VIP keeps (its ring history): the current declared
/// ring (every wanted backend, health ignored) and the previous ones. Every
/// LB host given the same declared changes has the same history.
pub const HISTORY_RINGS: usize = 4;
/// Rings a GUE packet's alternates come from: the history and the
/// previous live ring (which health changes make; it is this host's own).
/// Their choices, where they differ from the live ring's, are the
/// alternates.
pub const ALTERNATE_RINGS: usize = HISTORY_RINGS + 1;
/// At most one alternate per alternate ring.
pub const MAX_ALTERNATES: usize = ALTERNATE_RINGS;

/// Bytes of GUE private data naming `count` alternates (0: none at all).
pub const fn gue_alternates_len(v6: bool, count: usize) -> usize {
    // One constant factor per branch: shifts, no multiply (NIC JITs
    // take no 64-bit multiply).
    if count == 0 {
        0
    } else if v6 {
        4 + count * 16
    } else {
        4 + count * 4
    }
}

/// Key of the VIP map: destination address, port and protocol of a packet.
/// A VIP with port 0 catches every port of its address and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VipKey {
    /// IPv4 uses `addr[0]`; the other words are zero.
    pub addr: [u32; 4],
    /// Network byte order, as on the wire.
    pub port: u16,
    pub proto: u8,
    /// [`AF_INET`] or [`AF_INET6`]: keeps 2001:db8:: apart from 32.1.13.184.
    pub family: u8,
}

/// The VIP-map key that marks an address some VIP has (protocol ICMP or
/// ICMPv6, port 0), so that echo requests to it are answered. Its value has
/// ring size 0 and a stats index past the VIPs'.
pub fn address_mark(addr: [u32; 4], family: u8) -> VipKey {
    let proto = if family == AF_INET6 { IPPROTO_ICMPV6 } else { IPPROTO_ICMP };
    VipKey { addr, port: 0, proto, family }
}

/// The VIP-map key under which the VIP that takes the fragments of an
/// address and protocol is found (fragments after the first have no ports).
/// The family's top bit keeps it apart from a port-0 VIP's key.
pub fn fragment_key(addr: [u32; 4], proto: u8, family: u8) -> VipKey {
    VipKey { addr, port: 0, proto, family: family | 0x80 }
}

/// VIP flag: hash on the source address only (session affinity).
pub const VIP_F_HASH_SRC_ONLY: u32 = 1;
/// VIP flag: encapsulate in GUE (UDP) instead of IP-in-IP; non-SYN TCP
/// packets carry the history rings' backends as alternate hops.
pub const VIP_F_GUE: u32 = 2;
/// VIP flag: packets never read or write the conn table; every one is
/// balanced by the live ring (and, for GUE TCP, carries the alternate).
pub const VIP_F_STATELESS: u32 = 4;
/// VIP flag: UDP packets are QUIC; a connection ID that names a server
/// (QUIC-LB, [`quic`]) picks the backend, whatever the addresses.
pub const VIP_F_QUIC: u32 = 8;

/// Value of the VIP map. Replaced whole by one map update, which the kernel
/// makes atomic for hash maps: that is how a ring swap becomes visible.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipMeta {
    /// Index into the per-VIP stats array.
    pub vip_id: u32,
    pub flags: u32,
    /// First slot of this VIP's live ring inside the ring array.
    pub ring_offset: u32,
    /// Number of slots (a prime); 0 means the VIP has no usable backend.
    pub ring_size: u32,
    /// How many of `alt_rings` are set.
    pub alt_rings_len: u32,
    /// First slots of the rings (same size) a GUE packet's alternate hops
    /// come from, in the order they are named: the history, newest first,
    /// then the previous live ring (see [`ALTERNATE_RINGS`]).
    pub alt_rings: [u32; ALTERNATE_RINGS],
    /// With [`VIP_F_QUIC`]: how its connection IDs name servers.
    pub quic: quic::QuicLb,
}

/// One backend, indexed by backend id in the backends array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// IPv4 uses `addr[0]`.
    pub addr: [u32; 4],
    /// Non-zero while the id is in use; changes each time an id is reused,
    /// so a conn-table entry made for a removed backend never matches the
    /// next backend that gets the same id.
    pub cookie: u32,
    /// [`AF_INET`] or [`AF_INET6`]: the outer header the backend needs.
    pub family: u8,
    /// [`BACKEND_F_RETIRED`].
    pub flags: u8,
    pub _pad: [u8; 2],
}

/// Backend flag: removed from its VIP but still named by a history
/// ring, so GUE packets may still name it as an alternate hop (its
/// connections get their second chance); conn-table entries for it are
/// not followed, as for a removed backend.
pub const BACKEND_F_RETIRED: u8 = 1;

/// A flow as it arrives.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    /// Network byte order.
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// A conn-table entry (packed into 64 bits in the table, see
/// [`conntrack`]). It carries what an established packet needs besides its
/// backend, so that such a packet skips the VIP lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnValue {
    pub backend_id: u32,
    /// The backend's cookie when the entry was made.
    pub cookie: u32,
    /// The VIP the flow was balanced for (its stats index).
    pub vip_id: u16,
    /// [`CONN_F_GUE`], [`CONN_F_SOURCE_HASH`].
    pub flags: u8,
    pub _pad: u8,
    /// The flow hash: outer source bits and IPv6 flow label (not stored).
    pub hash: u32,
}

/// The VIP lookup in arrays, which the kernel inlines (a hash-map lookup
/// is a helper call, about a third of a stateless packet's cost):
/// `VIP_SLOTS[vip_slot(key)]` holds `index + 1` of the `VIP_ENTRIES` entry
/// of the one VIP that owns the slot (0: none). Entries are double-buffered
/// per VIP (index `2 * vip_id + half`): a change is written to the other
/// half, then the slot word (one aligned 32-bit store) points at it, so a
/// packet reads a whole old entry or a whole new one. VIPs whose slot
/// another VIP owns are found in the `VIPS` hash map, which always holds
/// every VIP.
pub const VIP_SLOTS: u32 = 4096;

/// One VIP, as the array lookup holds it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipEntry {
    pub key: VipKey,
    pub meta: VipMeta,
}

/// The `VIP_SLOTS` slot of a VIP key. Multiplicative hashing over the
/// key's words; collisions only send the later VIP to the hash map.
#[inline(always)]
pub fn vip_slot(key: &VipKey) -> u32 {
    let words = key.addr[0] ^ key.addr[1].rotate_left(7) ^ key.addr[2].rotate_left(13) ^ key.addr[3].rotate_left(19);
    let rest = ((key.port as u32) << 16) | ((key.proto as u32) << 8) | key.family as u32;
    (words ^ rest.wrapping_mul(0x85eb_ca6b)).wrapping_mul(0x9e37_79b1) >> (32 - 12)
}

/// Slots of the VIP-address filter: an array of `u8`, [`FILTER_VIP`] where
/// some VIP's address hashes to the slot (and [`FILTER_STATELESS`] if one of
/// them is stateless). Most packets on an edge NIC are not for a
/// VIP; this inlined array lookup sends them on without any helper call.
pub const VIP_FILTER_SLOTS: u32 = 1 << 16;

pub const FILTER_VIP: u8 = 1;
/// Some VIP of an address in this slot is stateless: the VIP is looked up
/// before the conn table, so that its packets never touch the table.
pub const FILTER_STATELESS: u8 = 2;

/// The filter slot of a destination address (raw words). Multiplicative
/// hashing; collisions only cost the colliding packets a full lookup.
#[inline(always)]
pub fn vip_filter_slot(addr: &[u32; 4]) -> u32 {
    (addr[0] ^ addr[1] ^ addr[2] ^ addr[3]).wrapping_mul(0x9e37_79b1) >> 16
}

/// Config flag: some IPv4 (IPv6) VIP has port 0, so a miss on the exact
/// port needs a second lookup with port 0. Without it, a non-VIP packet
/// costs one lookup.
pub const CONFIG_F_PORT0_V4: u32 = 1;
pub const CONFIG_F_PORT0_V6: u32 = 2;
/// Config flag: log every packet decision through aya-log (debugging only;
/// `lbctl debug on|off` flips it without reloading the program).
pub const CONFIG_F_DEBUG: u32 = 4;
/// Config flag: encapsulated packets leave through the backend-facing
/// interface (`lbctl up --backend-iface`: `XDP_REDIRECT` to the one entry of
/// the `EGRESS` devmap, from `egress_mac`), not back out of the NIC they
/// came in on (`XDP_TX`).
pub const CONFIG_F_REDIRECT: u32 = 8;

/// The balancer's settings: one entry of an array map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Destination MAC of every encapsulated packet (the next hop).
    pub next_hop_mac: [u8; 6],
    /// UDP destination port of GUE packets, network order.
    pub gue_port: u16,
    pub flags: u32,
    /// Largest outer packet (IP header and up) the path to backends carries.
    pub mtu: u32,
    /// Outer IPv4 source: `prefix | (flow hash & host_mask)`, network order.
    pub encap_src_v4: u32,
    pub encap_src_v4_host_mask: u32,
    /// Outer IPv6 source: the hash fills the last word under its host mask.
    pub encap_src_v6: [u32; 4],
    pub encap_src_v6_host_mask: u32,
    /// SYN-flood guard: new flows per second per CPU that are remembered in
    /// the conn table (above it they are balanced but not remembered, so a
    /// flood cannot evict established flows); 0 = no limit.
    pub new_flow_limit: u32,
    /// Buckets of the conn table (its array's size; set by the loader).
    pub conn_buckets: u32,
    /// With [`CONFIG_F_REDIRECT`]: the backend-facing interface's MAC, the
    /// source of encapsulated packets.
    pub egress_mac: [u8; 6],
    pub _pad: u16,
}

/// The guard's per-CPU token bucket (a per-CPU array of one entry).
/// `credit` counts nanoseconds x limit: a new flow costs 10^9, a nanosecond
/// earns `limit`, and it holds at most one second's worth (the burst).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FloodBucket {
    pub credit: u64,
    pub last_ns: u64,
}

/// Global counters: one per-CPU array entry of [`GlobalStats`], indexed by
/// these reasons. Every packet ends in exactly one *outcome* (indices below
/// [`stat::OUTCOMES`]), so their sum is the number of packets seen.
pub mod stat {
    /// Not IP, not a VIP, or a protocol the balancer does not serve: passed.
    pub const NOT_FOR_US: usize = 0;
    /// Truncated or invalid headers: passed to the kernel, which drops them.
    pub const MALFORMED: usize = 1;
    /// IP fragments not for a VIP (or of another protocol): passed.
    pub const FRAGMENT: usize = 2;
    /// VIP without any usable backend: dropped.
    pub const NO_BACKEND: usize = 3;
    /// Too large for the MTU once encapsulated: answered with an ICMP
    /// "too big" when it may not be fragmented, else passed to the kernel.
    pub const TOO_BIG: usize = 4;
    /// The kernel refused to grow the packet (no headroom): passed.
    pub const ENCAP_FAILED: usize = 5;
    /// Encapsulated and sent back out (XDP_TX).
    pub const FORWARDED: usize = 6;
    /// ICMP/ICMPv6 echo requests to a VIP address, answered (XDP_TX).
    pub const ECHO_REPLIED: usize = 7;
    pub const OUTCOMES: usize = 8;
    /// VIP packets whose conn-table entry was found and still valid.
    pub const CONN_HIT: usize = 8;
    /// VIP packets that picked a backend from the ring (new or re-picked flow).
    pub const CONN_MISS: usize = 9;
    /// New flows balanced but not remembered: the SYN-flood guard was over
    /// its rate (not an outcome).
    pub const CONN_UNTRACKED: usize = 10;
    /// Fragments of VIP datagrams, balanced on addresses and protocol and
    /// forwarded (also counted as `FORWARDED`).
    pub const FRAGMENT_FORWARDED: usize = 11;
    /// ICMP "fragmentation needed" / ICMPv6 "packet too big" about a VIP
    /// flow, sent on to the backend that owns the flow (also `FORWARDED`).
    pub const ICMP_ERROR_FORWARDED: usize = 12;
    /// `TOO_BIG` packets answered with ICMP "fragmentation needed" /
    /// ICMPv6 "packet too big" (XDP_TX) instead of passed.
    pub const TOO_BIG_ANSWERED: usize = 13;
    /// GUE packets sent with at least one alternate hop (a history ring's
    /// backend that differs from the live ring's).
    pub const GUE_ALTERNATE: usize = 14;
    /// QUIC VIPs: packets whose connection ID named a live backend.
    pub const QUIC_BY_SERVER_ID: usize = 15;
    /// QUIC VIPs: long-header packets whose destination CID names no
    /// server (the client chose it), balanced by its hash.
    pub const QUIC_BY_CLIENT_CID: usize = 16;
    /// QUIC VIPs, short header, balanced by the 5-tuple because the CID's
    /// config rotation codepoint is not the VIP's ...
    pub const QUIC_UNKNOWN_CONFIG: usize = 17;
    /// ... or its server ID names no live backend ...
    pub const QUIC_UNKNOWN_SERVER: usize = 18;
    /// ... or the packet cannot hold the CID (also long headers whose CID
    /// length is past QUIC's 20 octets).
    pub const QUIC_UNDECODABLE: usize = 19;
    pub const COUNT: usize = 20;
    pub const NAMES: [&str; COUNT] = [
        "not_for_us",
        "malformed",
        "fragment",
        "no_backend",
        "too_big",
        "encap_failed",
        "forwarded",
        "echo_replied",
        "conn_hit",
        "conn_miss",
        "conn_untracked",
        "fragment_forwarded",
        "icmp_error_forwarded",
        "too_big_answered",
        "gue_alternate",
        "quic_by_server_id",
        "quic_by_client_cid",
        "quic_unknown_config",
        "quic_unknown_server",
        "quic_undecodable",
    ];
}

/// The global counters of one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GlobalStats {
    pub counters: [u64; stat::COUNT],
}

/// Per-VIP counters (per-CPU array indexed by `vip_id`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipStats {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

/// Per-backend counters (per-CPU array indexed by backend id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendStats {
    pub packets: u64,
    pub bytes: u64,
    /// SYNs of a flow the conn table already sent to this backend: the
    /// client did not get a SYN-ACK and tried again (or reused the ports).
    /// With direct return, the first sign of a backend that takes packets
    /// and answers none. Conntrack VIPs only.
    pub syn_repeats: u64,
}

impl BackendStats {
    pub fn plus(self, other: BackendStats) -> BackendStats {
        BackendStats {
            packets: self.packets + other.packets,
            bytes: self.bytes + other.bytes,
            syn_repeats: self.syn_repeats + other.syn_repeats,
        }
    }
}

/// Key of the decap program's address map: an outer destination it strips.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DecapAddr {
    pub addr: [u32; 4],
    pub family: u8,
    pub _pad: [u8; 3],
}

/// The decap program's settings (an array of one entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecapConfig {
    /// UDP destination port of GUE packets, network order; 0: no GUE.
    pub gue_port: u16,
    pub _pad: [u8; 2],
}

/// Data-path health checks: a check's socket carries the mark
/// `PROBE_MARK_BASE + id`, and the egress program (`lb-probe`) encapsulates
/// its packets as `PROBE_ROUTES[id]` says, so that they reach the backend
/// the way the VIP's packets do. Marks outside the range are not touched.
pub const PROBE_MARK_BASE: u32 = 0x4c42_0000;
/// Data-path checks one LB host can run at once (ids 0..MAX_PROBES).
pub const MAX_PROBES: u32 = 16384;

/// Where one data-path check's packets go, with every field the egress
/// program writes already resolved by the controller.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeRoute {
    /// Outer source and destination, network order (IPv4: word 0).
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    pub next_hop_mac: [u8; 6],
    /// GUE destination port, network order; 0: IP-in-IP.
    pub gue_port: u16,
    /// Outer family, [`AF_INET`] or [`AF_INET6`]; 0: no check has this id
    /// (its packets are dropped, never sent unencapsulated).
    pub family: u8,
    pub _pad: [u8; 3],
}

/// The decap program's counters: one per-CPU array entry of [`DecapStats`].
pub mod decap_stat {
    /// IP-in-IP or GUE packets for this host, stripped and passed up.
    pub const DECAPSULATED: usize = 0;
    /// GUE packets with an alternate that a local socket owned: passed up.
    pub const ALTERNATE_UNUSED: usize = 1;
    /// GUE packets with an alternate that no local socket owned: sent on to
    /// the first alternate (the second chance), which it drops from the list.
    pub const REDIRECTED: usize = 2;
    pub const COUNT: usize = 3;
    pub const NAMES: [&str; COUNT] = ["decapsulated", "alternate_unused", "redirected"];
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecapStats {
    pub counters: [u64; decap_stat::COUNT],
}

/// Raw words of an IPv4 address as the program reads them from the packet.
pub fn addr_words_v4(octets: [u8; 4]) -> [u32; 4] {
    [u32::from_ne_bytes(octets), 0, 0, 0]
}

/// Raw words of an IPv6 address as the program reads them from the packet.
pub fn addr_words_v6(octets: [u8; 16]) -> [u32; 4] {
    let w = |i: usize| u32::from_ne_bytes([octets[i], octets[i + 1], octets[i + 2], octets[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}

/// A port as the program reads it from the packet (network order in memory).
pub fn port_raw(port: u16) -> u16 {
    u16::from_ne_bytes(port.to_be_bytes())
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all are repr(C), made of integers, with explicit padding.
    unsafe impl aya::Pod for VipKey {}
    unsafe impl aya::Pod for ProbeRoute {}
    unsafe impl aya::Pod for VipMeta {}
    unsafe impl aya::Pod for VipEntry {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for ConnBucket {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for GlobalStats {}
    unsafe impl aya::Pod for VipStats {}
    unsafe impl aya::Pod for BackendStats {}
    unsafe impl aya::Pod for DecapAddr {}
    unsafe impl aya::Pod for DecapConfig {}
    unsafe impl aya::Pod for DecapStats {}
    unsafe impl aya::Pod for FloodBucket {}
    unsafe impl aya::Pod for quic::QuicServerKey {}
    unsafe impl aya::Pod for quic::QuicServer {}
}
