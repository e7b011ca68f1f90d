//! The balancer: an XDP program that sends each packet for a VIP to a
//! backend chosen by Maglev consistent hashing, encapsulated in IP-in-IP,
//! back out of the NIC it came from (XDP_TX). Read top to bottom, this file
//! is the packet path:
//!
//! 0. a VLAN-tagged frame (802.1Q, QinQ) has its tags taken off here and
//!    put back on whatever leaves or goes up (`vlan.rs`);
//! 1. parse Ethernet / IPv4 / IPv6 / TCP / UDP (anything else: XDP_PASS;
//!    echo requests to a VIP address are answered with XDP_TX);
//! 2. VIP-address filter: an inlined array lookup sends most non-VIP
//!    packets on with no helper call at all; where a stateless VIP has the
//!    address, the VIP is looked up now, and its packets skip step 3;
//! 3. conn table (a bucket of the array `CONNS`, by the flow's digest): an
//!    existing flow keeps its backend, and its entry carries what the
//!    packet needs (VIP id, tunnel, hash kind), so no VIP lookup (a SYN
//!    skips this step and picks afresh);
//! 4. otherwise look up the VIP by (address, port, protocol), then port 0
//!    (in arrays the kernel inlines; the hash map only for a VIP whose
//!    array slot another VIP owns), and let its Maglev ring pick; for a GUE
//!    VIP, a TCP packet that is not a SYN also names the alternate rings'
//!    backends as alternate hops (and is not remembered: its connection
//!    may live on one of those); other new flows are remembered, unless the VIP
//!    is stateless;
//! 5. check the MTU, encapsulate (IP-in-IP or GUE) towards the backend,
//!    XDP_TX (with two NICs, XDP_REDIRECT out of the backend-facing one).
//!
//! Helper calls per packet: 1 (adjust_head) for every forwarded packet
//! (2 more for a tagged one; 1 more, the redirect, with two NICs),
//! established, new or stateless (a 2nd, the clock, for a new flow when the
//! SYN-flood guard has a limit); non-VIP, none unless its address collides
//! in the filter. Array lookups (filter, config, conn table, VIP slots and
//! entries, ring, backend, stats) are inlined by the kernel; a VIP that
//! shares its array slot with another costs one hash-map lookup more.
#![no_std]
#![no_main]

mod encap;
mod headers;
mod icmp;
mod object;
mod outer;
mod parse;
mod quic;
mod select;
mod vlan;

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    helpers::bpf_ktime_get_ns,
    macros::{map, xdp},
    maps::{Array, DevMap, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{
    address_mark, conntrack, flow_digest, flow_hash, source_hash, stat, vip_filter_slot, Backend, BackendStats, Config,
    ConnBucket, ConnValue, FloodBucket, GlobalStats, VipMeta, VipStats, AF_INET, BACKEND_F_RETIRED, CONFIG_F_DEBUG,
    CONFIG_F_REDIRECT, CONN_F_GUE, CONN_F_PAST_SYN, CONN_F_SOURCE_HASH, CONN_WAYS, DEFAULT_CONN_TABLE_SIZE,
    FILTER_STATELESS, FILTER_VIP, IPPROTO_TCP, IPPROTO_UDP, MAX_BACKENDS, MAX_VIPS, VIP_F_GUE, VIP_F_HASH_SRC_ONLY,
    VIP_F_QUIC, VIP_F_STATELESS,
};

use aya_log_ebpf::info;
use encap::{encapsulate, overhead, Inner, Tunnel};
use parse::{parse, Packet, Parsed};

/// The conn table (`lb_common::conntrack`): buckets of flows by digest.
#[map]
static CONNS: Array<ConnBucket> = Array::with_max_entries(DEFAULT_CONN_TABLE_SIZE / CONN_WAYS as u32, 0);
#[map]
static GLOBAL_STATS: PerCpuArray<GlobalStats> = PerCpuArray::with_max_entries(1, 0);
/// The SYN-flood guard's token bucket, per CPU.
#[map]
static FLOOD: PerCpuArray<FloodBucket> = PerCpuArray::with_max_entries(1, 0);
#[map]
static VIP_STATS: PerCpuArray<VipStats> = PerCpuArray::with_max_entries(MAX_VIPS, 0);
#[map]
static BACKEND_STATS: PerCpuArray<BackendStats> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// The backend-facing interface, with two NICs (`CONFIG_F_REDIRECT`).
#[map]
static EGRESS: DevMap = DevMap::with_max_entries(1, 0);

/// Ingress VLAN ID -> the VLAN ID forwarded packets leave with (0: the
/// same), for hosts whose backends sit on another VLAN than their clients.
#[map]
static VLAN_EGRESS: Array<u16> = Array::with_max_entries(4096, 0);

#[xdp]
pub fn lb_balancer(ctx: XdpContext) -> u32 {
    let (Some(stats), Some(cfg)) = (GLOBAL_STATS.get_ptr_mut(0), select::CONFIG.get(0)) else {
        return XDP_PASS;
    };
    let stats = unsafe { &mut (*stats).counters };
    // A tagged frame is balanced untagged and leaves (or goes up) tagged.
    let Ok(tags) = vlan::pop(&ctx) else {
        stats[stat::MALFORMED] += 1;
        return XDP_PASS;
    };
    let (mut action, mut outcome) = balance(&ctx, cfg, stats);
    if tags != 0 {
        let egress = match VLAN_EGRESS.get(vlan::innermost_vid(tags) as u32) {
            Some(&vid) if vid != 0 && outcome == stat::FORWARDED => vlan::with_innermost_vid(tags, vid),
            _ => tags,
        };
        if vlan::push(&ctx, egress).is_err() {
            // Untagged, it would reach another VLAN: drop it instead.
            (action, outcome) = (XDP_DROP, stat::ENCAP_FAILED);
        }
    }
    if let Some(counter) = stats.get_mut(outcome) {
        *counter += 1;
    }
    if cfg.flags & CONFIG_F_DEBUG != 0 {
        // Outcome numbers are lb_common::stat (6 forwarded, 0 not_for_us...).
        info!(&ctx, "lb decision: outcome {} action {} len {}", outcome, action, ctx.data_end() - ctx.data());
    }
    action
}

/// Returns the XDP action and the outcome counter to bump.
#[inline(always)]
fn balance(ctx: &XdpContext, cfg: &Config, stats: &mut [u64; stat::COUNT]) -> (u32, usize) {
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

    // 2. The filter: no VIP has this address. Where a stateless VIP has
    // it, the VIP comes first: its packets must not touch the conn table.
    let not_for_us = if fragment { stat::FRAGMENT } else { stat::NOT_FOR_US };
    let filter = select::VIP_FILTER.get(vip_filter_slot(&pkt.flow.dst)).copied().unwrap_or(0);
    if filter & FILTER_VIP == 0 {
        return (XDP_PASS, not_for_us);
    }
    // (VIPs and backends are pointers into their maps, not copies: copies
    // took 170 of the 512 stack bytes.)
    let looked_up = filter & FILTER_STATELESS != 0 && !fragment;
    let early = if looked_up {
        match select::lookup_vip(cfg, &pkt.flow) {
            Some(vip) => vip,
            None => return (XDP_PASS, not_for_us),
        }
    } else {
        &select::NO_VIP
    };
    let stateless = early.flags & VIP_F_STATELESS != 0;

    // 3. An established flow, or 4. a new one: VIP, then its ring.
    // Fragments skip the conn table: stateless, by addresses and protocol.
    // Without the conn table only the flow hash (the digest's low lane) is
    // needed: its second lane is not computed.
    let f = &pkt.flow;
    let untracked = fragment || stateless;
    let digest = if untracked {
        flow_hash(&f.src, &f.dst, f.src_port, f.dst_port, f.proto) as u64
    } else {
        flow_digest(&f.src, &f.dst, f.src_port, f.dst_port, f.proto)
    };
    // A QUIC VIP's connection ID may name the backend, or (a client's
    // own) pick it from the ring by its hash; neither is remembered: the
    // next packet names it again.
    let mut by_cid = false;
    let mut known = None;
    if early.flags & VIP_F_QUIC != 0 && f.proto == IPPROTO_UDP && !icmp_error {
        known = match quic::route(ctx, pkt.udp_payload, early, stats) {
            quic::Route::Server(id, backend) => Some((id, backend, conn_for(early, id, backend, digest as u32))),
            quic::Route::ClientCid(hash) => {
                pick_from_ring(early, &pkt, hash as u64).map(|(id, backend, conn, _)| (id, backend, conn))
            }
            quic::Route::FiveTuple => None,
        };
        by_cid = known.is_some();
    }
    if !by_cid && !untracked {
        known = lookup_conn(cfg, &pkt, digest);
    }
    // A SYN again for a flow the table already sent to this backend, with
    // nothing from the client in between: the passive signal, counted with
    // the backend's other counters below.
    let mut syn_repeat = false;
    let (backend_id, backend, conn, tunnel) = match known {
        Some((id, backend, conn)) => {
            if by_cid {
                count_vip(early.vip_id, &pkt, 0);
            } else {
                stats[stat::CONN_HIT] += 1;
            }
            // The remembered (or named) backend owns the flow: no alternate needed.
            let tunnel = if conn.flags & CONN_F_GUE != 0 {
                Tunnel::Gue { alternates: select::Alternates::NONE }
            } else {
                Tunnel::Ipip
            };
            (id, backend, conn, tunnel)
        }
        None => {
            let vip = if looked_up {
                early
            } else {
                let found =
                    if fragment { select::lookup_fragment_vip(&pkt.flow) } else { select::lookup_vip(cfg, &pkt.flow) };
                match found {
                    Some(vip) => vip,
                    None => return (XDP_PASS, not_for_us),
                }
            };
            stats[stat::CONN_MISS] += 1;
            let Some((id, backend, conn, slot)) = pick_from_ring(vip, &pkt, digest) else {
                count_vip(vip.vip_id, &pkt, 0);
                return (XDP_DROP, stat::NO_BACKEND);
            };
            let new_flow = !(fragment || icmp_error);
            count_vip(vip.vip_id, &pkt, new_flow as u64);
            // A TCP packet of a GUE VIP that is not a SYN may belong to a
            // connection made under an earlier ring: name the history's backends.
            let midstream = pkt.flow.proto == IPPROTO_TCP && !pkt.syn && new_flow;
            let tunnel = if vip.flags & VIP_F_GUE == 0 {
                Tunnel::Ipip
            } else if midstream {
                let alternates = select::alternates(vip, backend, id, slot);
                if alternates.len > 0 {
                    stats[stat::GUE_ALTERNATE] += 1;
                }
                Tunnel::Gue { alternates }
            } else {
                Tunnel::Gue { alternates: select::Alternates::NONE }
            };
            // Remember new flows, but not a GUE connection met midstream
            // (its owner may be the alternate), nor any of a stateless VIP.
            let gue_midstream = midstream && vip.flags & VIP_F_GUE != 0;
            if new_flow && !stateless && !gue_midstream {
                if may_track(cfg.new_flow_limit) {
                    // A full table evicts its least recently used entry; an error
                    // only means the flow is re-picked next time, to the same backend.
                    syn_repeat = remember(cfg, digest, &conn) && pkt.syn;
                } else {
                    stats[stat::CONN_UNTRACKED] += 1;
                }
            }
            (id, backend, conn, tunnel)
        }
    };
    // 5. MTU, encapsulation, out.
    if pkt.ip_len + overhead(backend, tunnel) > cfg.mtu {
        // Tell the client the size that fits (path-MTU discovery); packets
        // that may be fragmented, fragments and ICMP go to the kernel.
        if pkt.dont_fragment {
            let fits = cfg.mtu - overhead(backend, tunnel);
            let mtu = if pkt.flow.family == AF_INET { fits } else { fits.max(1280) };
            if icmp::too_big(ctx, pkt.flow.family, pkt.ip_len, mtu).is_some() {
                stats[stat::TOO_BIG_ANSWERED] += 1;
                return (XDP_TX, stat::TOO_BIG);
            }
        }
        return (XDP_PASS, stat::TOO_BIG);
    }
    let inner = Inner { family: pkt.flow.family, ip_len: pkt.ip_len, tos: pkt.tos, hash: conn.hash };
    if encapsulate(ctx, cfg, backend, &inner, tunnel).is_err() {
        return (XDP_PASS, stat::ENCAP_FAILED);
    }
    if let Some(s) = BACKEND_STATS.get_ptr_mut(backend_id) {
        unsafe {
            (*s).packets += 1;
            (*s).bytes += pkt.ip_len as u64;
            (*s).syn_repeats += syn_repeat as u64;
        }
    }
    if fragment {
        stats[stat::FRAGMENT_FORWARDED] += 1;
    } else if icmp_error {
        stats[stat::ICMP_ERROR_FORWARDED] += 1;
    }
    #[cfg(feature = "bench-restore")]
    encap::restore(ctx, backend, tunnel, inner.family, pkt.syn);
    if cfg.flags & CONFIG_F_REDIRECT != 0 {
        // Two NICs: out of the backend-facing one (XDP_REDIRECT).
        return (EGRESS.redirect(0, XDP_DROP as u64).unwrap_or(XDP_DROP), stat::FORWARDED);
    }
    (XDP_TX, stat::FORWARDED)
}

/// An echo request to a VIP address is answered here, not by a backend:
/// the address belongs to the LB tier (RFC 792, RFC 4443).
#[inline(always)]
fn answer_echo(ctx: &XdpContext, echo: &parse::Echo) -> (u32, usize) {
    if select::VIP_FILTER.get(vip_filter_slot(&echo.dst)).is_none_or(|f| f & FILTER_VIP == 0)
        || unsafe { select::VIPS.get(&address_mark(echo.dst, echo.family)) }.is_none()
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

/// The flow's remembered backend, if it still exists. A SYN starts a new
/// connection, so it never reuses an entry.
#[inline(always)]
fn lookup_conn(cfg: &Config, pkt: &Packet, digest: u64) -> Option<(u32, &'static Backend, ConnValue)> {
    if pkt.syn {
        return None;
    }
    let bucket = unsafe { &mut *CONNS.get_ptr_mut(conntrack::bucket_index(digest, cfg.conn_buckets))? };
    let (way, found) = conntrack::find(bucket, digest)?;
    // Written once per flow for the flag (and on an LRU move): a SYN that
    // comes again after this is a new connection, not a retransmission.
    let word = found | ((CONN_F_PAST_SYN as u64) << 60);
    if way > 0 || word != found {
        conntrack::put_front(bucket, way, digest, word);
    }
    let hash = if (word >> 60) as u8 & CONN_F_SOURCE_HASH != 0 { source_hash(&pkt.flow.src) } else { digest as u32 };
    let conn = conntrack::unpack(word, hash);
    let backend = select::BACKENDS.get(conn.backend_id)?;
    // A removed backend has cookie 0 (or is retired); a reused id has a new cookie.
    if backend.cookie == 0 || backend.cookie != conn.cookie || backend.flags & BACKEND_F_RETIRED != 0 {
        return None;
    }
    count_vip(conn.vip_id as u32, pkt, 0);
    Some((conn.backend_id, backend, conn))
}

/// Remembers the flow's backend (a full bucket forgets its least recently
/// used flow). Returns whether the table already sent the flow there.
#[inline(always)]
fn remember(cfg: &Config, digest: u64, conn: &ConnValue) -> bool {
    let Some(bucket) = CONNS.get_ptr_mut(conntrack::bucket_index(digest, cfg.conn_buckets)) else {
        return false;
    };
    let word = conntrack::pack(conn);
    conntrack::insert(unsafe { &mut *bucket }, digest, word) == Some(word)
}

/// Maglev (`select::pick`), with the conn-table entry that would remember
/// the choice.
#[inline(always)]
fn pick_from_ring(vip: &VipMeta, pkt: &Packet, digest: u64) -> Option<(u32, &'static Backend, ConnValue, u32)> {
    let picked = select::pick(vip, pkt, digest as u32)?;
    let conn = conn_for(vip, picked.backend_id, picked.backend, picked.hash);
    Some((picked.backend_id, picked.backend, conn, picked.slot))
}

/// The conn-table entry of a flow of `vip` sent to backend `id`; `hash`
/// gives the outer header its flow bits.
#[inline(always)]
fn conn_for(vip: &VipMeta, id: u32, backend: &Backend, hash: u32) -> ConnValue {
    let flags = if vip.flags & VIP_F_GUE != 0 { CONN_F_GUE } else { 0 }
        | if vip.flags & VIP_F_HASH_SRC_ONLY != 0 { CONN_F_SOURCE_HASH } else { 0 };
    ConnValue { backend_id: id, cookie: backend.cookie, vip_id: vip.vip_id as u16, flags, _pad: 0, hash }
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
