//! The balancer: an XDP program that sends each packet for a VIP to a
//! backend chosen by Maglev consistent hashing, encapsulated in IP-in-IP,
//! back out of the NIC it came from (XDP_TX). Read top to bottom, this file
//! is the packet path:
//!
//! 1. parse Ethernet / IPv4 / IPv6 / TCP / UDP (anything else: XDP_PASS);
//! 2. look up the VIP by (address, port, protocol), then port 0;
//! 3. conn table: an existing flow keeps its backend (a SYN picks afresh);
//! 4. otherwise the VIP's Maglev ring picks, and the flow is remembered;
//! 5. check the MTU, encapsulate towards the backend, XDP_TX.
//!
//! Per established packet: two hash lookups (VIP, conn table) and one
//! adjust_head helper call; array lookups (config, backend, stats) are
//! inlined by the kernel. A new flow adds a conn-table update.
#![no_std]
#![no_main]

mod encap;
mod headers;
mod parse;

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    macros::{map, xdp},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{
    flow_hash, source_hash, stat, Backend, BackendStats, Config, ConnValue, FlowKey, GlobalStats, VipKey, VipMeta,
    VipStats, AF_INET, CONFIG_F_PORT0_V4, CONFIG_F_PORT0_V6, DEFAULT_CONN_TABLE_SIZE, DEFAULT_RING_CAPACITY,
    MAX_BACKENDS, MAX_VIPS, VIP_F_HASH_SRC_ONLY,
};

use encap::{encapsulate, overhead, Inner};
use parse::{parse, Packet, Parsed};

/// BPF_F_NO_COMMON_LRU: one LRU list per CPU, no shared lock on insert.
const BPF_F_NO_COMMON_LRU: u32 = 1 << 1;

#[map]
static VIPS: HashMap<VipKey, VipMeta> = HashMap::with_max_entries(MAX_VIPS, 0);
#[map]
static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);
/// Every VIP's Maglev ring(s), back to back: slot -> backend id.
#[map]
static RINGS: Array<u32> = Array::with_max_entries(DEFAULT_RING_CAPACITY, 0);
#[map]
static CONNS: LruHashMap<FlowKey, ConnValue> =
    LruHashMap::with_max_entries(DEFAULT_CONN_TABLE_SIZE, BPF_F_NO_COMMON_LRU);
#[map]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);
#[map]
static GLOBAL_STATS: PerCpuArray<GlobalStats> = PerCpuArray::with_max_entries(1, 0);
#[map]
static VIP_STATS: PerCpuArray<VipStats> = PerCpuArray::with_max_entries(MAX_VIPS, 0);
#[map]
static BACKEND_STATS: PerCpuArray<BackendStats> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

#[xdp]
pub fn lb_balancer(ctx: XdpContext) -> u32 {
    let Some(stats) = GLOBAL_STATS.get_ptr_mut(0) else {
        return XDP_PASS;
    };
    let stats = unsafe { &mut (*stats).counters };
    let (action, outcome) = balance(&ctx, stats);
    if let Some(counter) = stats.get_mut(outcome) {
        *counter += 1;
    }
    action
}

/// Returns the XDP action and the outcome counter to bump.
#[inline(always)]
fn balance(ctx: &XdpContext, stats: &mut [u64; stat::COUNT]) -> (u32, usize) {
    // 1. Parse.
    let pkt = match parse(ctx) {
        Parsed::Flow(pkt) => pkt,
        Parsed::NotForUs => return (XDP_PASS, stat::NOT_FOR_US),
        Parsed::Malformed => return (XDP_PASS, stat::MALFORMED),
        Parsed::Fragment => return (XDP_PASS, stat::FRAGMENT),
    };
    let Some(cfg) = CONFIG.get(0) else {
        return (XDP_PASS, stat::NOT_FOR_US);
    };

    // 2. VIP lookup.
    let Some(vip) = lookup_vip(cfg, &pkt.flow) else {
        return (XDP_PASS, stat::NOT_FOR_US);
    };
    let vip_stats = VIP_STATS.get_ptr_mut(vip.vip_id);
    if let Some(s) = vip_stats {
        unsafe {
            (*s).packets += 1;
            (*s).bytes += pkt.ip_len as u64;
        }
    }
    let hash = if vip.flags & VIP_F_HASH_SRC_ONLY != 0 {
        source_hash(&pkt.flow.src)
    } else {
        let f = &pkt.flow;
        flow_hash(&f.src, &f.dst, f.src_port, f.dst_port, f.proto)
    };

    // 3. and 4. Conn table, else the ring.
    let (backend_id, backend) = match lookup_conn(&pkt) {
        Some(found) => {
            stats[stat::CONN_HIT] += 1;
            found
        }
        None => {
            stats[stat::CONN_MISS] += 1;
            let Some(picked) = pick_from_ring(&vip, &pkt, hash) else {
                return (XDP_DROP, stat::NO_BACKEND);
            };
            if let Some(s) = vip_stats {
                unsafe { (*s).new_flows += 1 };
            }
            picked
        }
    };

    // 5. MTU, encapsulation, out.
    let cfg = *cfg;
    if pkt.ip_len + overhead(&backend) > cfg.mtu {
        return (XDP_PASS, stat::TOO_BIG);
    }
    let inner = Inner { family: pkt.flow.family, ip_len: pkt.ip_len, tos: pkt.tos, hash };
    if encapsulate(ctx, &cfg, &backend, &inner).is_err() {
        return (XDP_PASS, stat::ENCAP_FAILED);
    }
    if let Some(s) = BACKEND_STATS.get_ptr_mut(backend_id) {
        unsafe {
            (*s).packets += 1;
            (*s).bytes += pkt.ip_len as u64;
        }
    }
    #[cfg(feature = "bench-restore")]
    encap::restore(ctx, &backend, inner.family, pkt.syn);
    (XDP_TX, stat::FORWARDED)
}

/// The VIP for this destination: exact port first, then the port-0 VIP of
/// the address if the config says one exists for this family. The value is
/// copied: a concurrent ring swap replaces the map element.
#[inline(always)]
fn lookup_vip(cfg: &Config, flow: &FlowKey) -> Option<VipMeta> {
    let mut key = VipKey { addr: flow.dst, port: flow.dst_port, proto: flow.proto, family: flow.family };
    if let Some(vip) = unsafe { VIPS.get(&key) } {
        return Some(*vip);
    }
    let port0 = if flow.family == AF_INET { CONFIG_F_PORT0_V4 } else { CONFIG_F_PORT0_V6 };
    if cfg.flags & port0 == 0 {
        return None;
    }
    key.port = 0;
    unsafe { VIPS.get(&key) }.copied()
}

/// The flow's remembered backend, if it has one that still exists. A SYN
/// starts a new connection, so it never reuses an entry.
#[inline(always)]
fn lookup_conn(pkt: &Packet) -> Option<(u32, Backend)> {
    if pkt.syn {
        return None;
    }
    let conn = unsafe { CONNS.get(&pkt.flow) }?;
    let conn = *conn;
    let backend = BACKENDS.get(conn.backend_id)?;
    // A removed backend has cookie 0; a reused id has a new cookie.
    if backend.cookie == 0 || backend.cookie != conn.cookie {
        return None;
    }
    Some((conn.backend_id, *backend))
}

/// Maglev: the ring slot of the flow's hash names the backend; the choice is
/// remembered in the conn table.
#[inline(always)]
fn pick_from_ring(vip: &VipMeta, pkt: &Packet, hash: u32) -> Option<(u32, Backend)> {
    if vip.ring_size == 0 {
        return None;
    }
    let slot = vip.ring_offset + hash % vip.ring_size;
    let backend_id = *RINGS.get(slot)?;
    let backend = *BACKENDS.get(backend_id)?;
    if backend.cookie == 0 {
        return None;
    }
    let conn = ConnValue { backend_id, cookie: backend.cookie };
    // A full table evicts its least recently used entry; an error here only
    // means the flow is re-picked next time, to the same backend.
    let _ = CONNS.insert(&pkt.flow, &conn, 0);
    Some((backend_id, backend))
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
