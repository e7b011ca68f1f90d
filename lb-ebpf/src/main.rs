//! The balancer: an XDP program that sends each packet for a VIP to a
//! backend chosen by Maglev consistent hashing, encapsulated in IP-in-IP,
//! back out of the NIC it came from (XDP_TX). Read top to bottom, this file
//! is the packet path:
//!
//! 1. parse Ethernet / IPv4 / IPv6 / TCP / UDP (anything else: XDP_PASS;
//!    echo requests to a VIP address are answered with XDP_TX);
//! 2. VIP-address filter: an inlined array lookup sends most non-VIP
//!    packets on with no helper call at all;
//! 3. conn table: an existing flow keeps its backend, and its entry carries
//!    what the packet needs (VIP id, hash), so no VIP lookup (a SYN skips
//!    this step and picks afresh);
//! 4. otherwise look up the VIP by (address, port, protocol), then port 0,
//!    and let its Maglev ring pick; the flow is remembered;
//! 5. check the MTU, encapsulate towards the backend, XDP_TX.
//!
//! Helper calls per packet: established, 2 (conn-table lookup,
//! adjust_head); new flow, 3 (VIP lookup, conn-table update, adjust_head;
//! a 4th, the clock, when the SYN-flood guard has a limit);
//! non-VIP, none unless its address collides in the filter. Array lookups
//! (filter, config, ring, backend, stats) are inlined by the kernel.
#![no_std]
#![no_main]

mod encap;
mod headers;
mod icmp;
mod object;
mod parse;

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    helpers::bpf_ktime_get_ns,
    macros::{map, xdp},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{
    address_mark, flow_hash, fragment_key, source_hash, stat, vip_filter_slot, Backend, BackendStats, Config,
    ConnValue, FloodBucket, FlowKey, GlobalStats, VipKey, VipMeta, VipStats, AF_INET, CONFIG_F_DEBUG,
    CONFIG_F_PORT0_V4, CONFIG_F_PORT0_V6, DEFAULT_CONN_TABLE_SIZE, DEFAULT_RING_CAPACITY, MAX_BACKENDS, MAX_VIPS,
    VIP_FILTER_SLOTS, VIP_F_HASH_SRC_ONLY,
};

use aya_log_ebpf::info;
use encap::{encapsulate, overhead, Inner};
use parse::{parse, Packet, Parsed};

/// BPF_F_NO_COMMON_LRU: one LRU list per CPU, no shared lock on insert.
const BPF_F_NO_COMMON_LRU: u32 = 1 << 1;

/// VIPs, one address mark per VIP address (`address_mark`) and one
/// fragment entry per address and protocol (`fragment_key`).
#[map]
static VIPS: HashMap<VipKey, VipMeta> = HashMap::with_max_entries(3 * MAX_VIPS, 0);
/// 1 where some VIP address hashes to the slot (`vip_filter_slot`).
#[map]
static VIP_FILTER: Array<u8> = Array::with_max_entries(VIP_FILTER_SLOTS, 0);
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
/// The SYN-flood guard's token bucket, per CPU.
#[map]
static FLOOD: PerCpuArray<FloodBucket> = PerCpuArray::with_max_entries(1, 0);
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
    if CONFIG.get(0).is_some_and(|c| c.flags & CONFIG_F_DEBUG != 0) {
        // Outcome numbers are lb_common::stat (6 forwarded, 0 not_for_us...).
        info!(&ctx, "lb decision: outcome {} action {} len {}", outcome, action, ctx.data_end() - ctx.data());
    }
    action
}

/// Returns the XDP action and the outcome counter to bump.
#[inline(always)]
fn balance(ctx: &XdpContext, stats: &mut [u64; stat::COUNT]) -> (u32, usize) {
    // 1. Parse.
    // Fragments and ICMP errors are balanced but never remembered.
    let (pkt, fragment, icmp_error) = match parse(ctx) {
        Parsed::Flow(pkt) => (pkt, false, false),
        Parsed::Fragment(pkt) => (pkt, true, false),
        Parsed::IcmpError(pkt) => (pkt, false, true),
        Parsed::NotForUs => return (XDP_PASS, stat::NOT_FOR_US),
        Parsed::Malformed => return (XDP_PASS, stat::MALFORMED),
        Parsed::OtherFragment => return (XDP_PASS, stat::FRAGMENT),
        Parsed::Echo(echo) => return answer_echo(ctx, &echo),
    };

    // 2. The filter: no VIP has this address.
    let not_for_us = if fragment { stat::FRAGMENT } else { stat::NOT_FOR_US };
    if VIP_FILTER.get(vip_filter_slot(&pkt.flow.dst)).copied() != Some(1) {
        return (XDP_PASS, not_for_us);
    }
    let Some(cfg) = CONFIG.get(0) else {
        return (XDP_PASS, stat::NOT_FOR_US);
    };

    // 3. An established flow, or 4. a new one: VIP, then its ring.
    // Fragments skip the conn table: stateless, by addresses and protocol.
    let known = if fragment { None } else { lookup_conn(&pkt) };
    let (backend_id, backend, conn) = match known {
        Some(found) => {
            stats[stat::CONN_HIT] += 1;
            found
        }
        None => {
            let vip = if fragment { lookup_fragment_vip(&pkt.flow) } else { lookup_vip(cfg, &pkt.flow) };
            let Some(vip) = vip else {
                return (XDP_PASS, not_for_us);
            };
            stats[stat::CONN_MISS] += 1;
            let Some(picked) = pick_from_ring(&vip, &pkt) else {
                count_vip(vip.vip_id, &pkt, 0);
                return (XDP_DROP, stat::NO_BACKEND);
            };
            let new_flow = !(fragment || icmp_error);
            count_vip(vip.vip_id, &pkt, new_flow as u64);
            if new_flow {
                if may_track(cfg.new_flow_limit) {
                    // A full table evicts its least recently used entry; an error
                    // only means the flow is re-picked next time, to the same backend.
                    let _ = CONNS.insert(&pkt.flow, &picked.2, 0);
                } else {
                    stats[stat::CONN_UNTRACKED] += 1;
                }
            }
            picked
        }
    };
    // 5. MTU, encapsulation, out.
    if pkt.ip_len + overhead(&backend) > cfg.mtu {
        // Tell the client the size that fits (path-MTU discovery); packets
        // that may be fragmented, fragments and ICMP go to the kernel.
        if pkt.dont_fragment {
            let fits = cfg.mtu - overhead(&backend);
            let mtu = if pkt.flow.family == AF_INET { fits } else { fits.max(1280) };
            if icmp::too_big(ctx, pkt.flow.family, pkt.ip_len, mtu).is_some() {
                stats[stat::TOO_BIG_ANSWERED] += 1;
                return (XDP_TX, stat::TOO_BIG);
            }
        }
        return (XDP_PASS, stat::TOO_BIG);
    }
    let inner = Inner { family: pkt.flow.family, ip_len: pkt.ip_len, tos: pkt.tos, hash: conn.hash };
    if encapsulate(ctx, cfg, &backend, &inner).is_err() {
        return (XDP_PASS, stat::ENCAP_FAILED);
    }
    if let Some(s) = BACKEND_STATS.get_ptr_mut(backend_id) {
        unsafe {
            (*s).packets += 1;
            (*s).bytes += pkt.ip_len as u64;
        }
    }
    if fragment {
        stats[stat::FRAGMENT_FORWARDED] += 1;
    } else if icmp_error {
        stats[stat::ICMP_ERROR_FORWARDED] += 1;
    }
    #[cfg(feature = "bench-restore")]
    encap::restore(ctx, &backend, inner.family, pkt.syn);
    (XDP_TX, stat::FORWARDED)
}

/// An echo request to a VIP address is answered here, not by a backend:
/// the address belongs to the LB tier (RFC 792, RFC 4443).
#[inline(always)]
fn answer_echo(ctx: &XdpContext, echo: &parse::Echo) -> (u32, usize) {
    if VIP_FILTER.get(vip_filter_slot(&echo.dst)).copied() != Some(1)
        || unsafe { VIPS.get(&address_mark(echo.dst, echo.family)) }.is_none()
    {
        return (XDP_PASS, stat::NOT_FOR_US);
    }
    match icmp::reply(ctx, echo) {
        Some(()) => (XDP_TX, stat::ECHO_REPLIED),
        None => (XDP_PASS, stat::MALFORMED),
    }
}

/// Per-VIP packets, bytes and new flows.
#[inline(always)]
fn count_vip(vip_id: u32, pkt: &Packet, new_flows: u64) {
    if let Some(s) = VIP_STATS.get_ptr_mut(vip_id) {
        unsafe {
            (*s).packets += 1;
            (*s).bytes += pkt.ip_len as u64;
            (*s).new_flows += new_flows;
        }
    }
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

/// The VIP that takes fragments for this address and protocol (userspace
/// names one per pair: the port-0 VIP, else the lowest port).
#[inline(always)]
fn lookup_fragment_vip(flow: &FlowKey) -> Option<VipMeta> {
    unsafe { VIPS.get(&fragment_key(flow.dst, flow.proto, flow.family)) }.copied()
}

/// The flow's remembered backend, if it still exists. A SYN starts a new
/// connection, so it never reuses an entry.
#[inline(always)]
fn lookup_conn(pkt: &Packet) -> Option<(u32, Backend, ConnValue)> {
    if pkt.syn {
        return None;
    }
    let conn = *unsafe { CONNS.get(&pkt.flow) }?;
    let backend = BACKENDS.get(conn.backend_id)?;
    // A removed backend has cookie 0; a reused id has a new cookie.
    if backend.cookie == 0 || backend.cookie != conn.cookie {
        return None;
    }
    count_vip(conn.vip_id, pkt, 0);
    Some((conn.backend_id, *backend, conn))
}

/// Maglev: the ring slot of the flow's hash names the backend. Returns it
/// with the conn-table entry that would remember the choice.
#[inline(always)]
fn pick_from_ring(vip: &VipMeta, pkt: &Packet) -> Option<(u32, Backend, ConnValue)> {
    if vip.ring_size == 0 {
        return None;
    }
    let f = &pkt.flow;
    let hash = if vip.flags & VIP_F_HASH_SRC_ONLY != 0 {
        source_hash(&f.src)
    } else {
        flow_hash(&f.src, &f.dst, f.src_port, f.dst_port, f.proto)
    };
    let backend_id = *RINGS.get(vip.ring_offset + hash % vip.ring_size)?;
    let backend = *BACKENDS.get(backend_id)?;
    if backend.cookie == 0 {
        return None;
    }
    let conn = ConnValue { backend_id, cookie: backend.cookie, vip_id: vip.vip_id, hash };
    Some((backend_id, backend, conn))
}

/// The SYN-flood guard: whether this CPU may remember one more new flow.
/// Costs one helper call (the clock), and only when a limit is set.
#[inline(always)]
fn may_track(limit: u32) -> bool {
    if limit == 0 {
        return true;
    }
    let Some(bucket) = FLOOD.get_ptr_mut(0) else {
        return true;
    };
    let bucket = unsafe { &mut *bucket };
    let now = unsafe { bpf_ktime_get_ns() };
    let full = limit as u64 * 1_000_000_000;
    // More than a second of idle time fills the bucket anyway; capping it
    // keeps the product within 64 bits (limit <= 10^9).
    let earned = now.wrapping_sub(bucket.last_ns).min(1_000_000_000) * limit as u64;
    let credit = bucket.credit.saturating_add(earned).min(full);
    bucket.last_ns = now;
    if credit >= 1_000_000_000 {
        bucket.credit = credit - 1_000_000_000;
        true
    } else {
        bucket.credit = credit;
        false
    }
}
