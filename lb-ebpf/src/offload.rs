//! The offload flavor of the balancer: what a NIC's XDP JIT can run (the
//! nfp's: array and hash maps, map lookups and `xdp_adjust_head` only, no
//! plain stores to map values, 32-bit multiplies; `lbctl offload-check`
//! holds it to those rules). It balances the packets of stateless VIPs,
//! TCP and UDP, exactly as the full balancer does (the same maps, lookup,
//! Maglev pick, alternate hop and encapsulation, from the same source) and
//! sends them back out (XDP_TX), VLAN tags kept. Everything else it leaves untouched to the
//! full balancer on the host (XDP_PASS): VIPs with a conn table, non-VIP
//! traffic, fragments, ICMP, echo requests, packets too big, VIPs without a
//! backend. Counters are plain arrays written by atomic adds (a NIC has no
//! per-CPU memory).
#![no_std]
#![no_main]
// The BPF target has no atomic read-modify-write methods; the intrinsic
// compiles to BPF's atomic add.
#![allow(internal_features)]
#![feature(core_intrinsics)]

// Shared with the full balancer, which uses more of them (fragments, ICMP).
#[allow(dead_code)]
mod encap;
#[allow(dead_code)]
mod headers;
mod object;
#[allow(dead_code)]
mod outer;
#[allow(dead_code)]
mod parse;
#[allow(dead_code)]
mod select;
mod vlan;

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    macros::{map, xdp},
    maps::Array,
    programs::XdpContext,
};
use lb_common::{
    flow_hash, vip_filter_slot, BackendStats, VipStats, FILTER_STATELESS, IPPROTO_TCP, MAX_BACKENDS, MAX_VIPS,
    VIP_F_GUE, VIP_F_QUIC, VIP_F_STATELESS,
};

use encap::{encapsulate, overhead, Inner, Tunnel};
use parse::{parse, Parsed};

#[map]
static OFFLOAD_VIP_STATS: Array<VipStats> = Array::with_max_entries(MAX_VIPS, 0);
#[map]
static OFFLOAD_BACKEND_STATS: Array<BackendStats> = Array::with_max_entries(MAX_BACKENDS, 0);

#[xdp]
pub fn lb_offload(ctx: XdpContext) -> u32 {
    // A tagged frame is balanced untagged and leaves (or goes up) with its
    // tags as they came (`--vlan-map` is the host balancer's).
    let Ok(tags) = vlan::pop(&ctx) else { return XDP_PASS };
    let action = forward(&ctx).unwrap_or(XDP_PASS);
    if tags != 0 && vlan::push(&ctx, tags).is_err() {
        return XDP_DROP;
    }
    action
}

/// XDP_TX for a stateless VIP's packet, `None` (XDP_PASS) for the host.
#[inline(always)]
fn forward(ctx: &XdpContext) -> Option<u32> {
    let cfg = select::CONFIG.get(0)?;
    let Parsed::Flow(pkt) = parse(ctx) else { return None };
    let filter = *select::VIP_FILTER.get(vip_filter_slot(&pkt.flow.dst))?;
    if filter & FILTER_STATELESS == 0 {
        return None;
    }
    let vip = select::lookup_vip(cfg, &pkt.flow)?;
    // QUIC VIPs read connection IDs: the host's balancer does.
    if vip.flags & VIP_F_STATELESS == 0 || vip.flags & VIP_F_QUIC != 0 {
        return None;
    }
    let f = &pkt.flow;
    let picked = select::pick(&vip, &pkt, flow_hash(&f.src, &f.dst, f.src_port, f.dst_port, f.proto))?;
    let tunnel = if vip.flags & VIP_F_GUE == 0 {
        Tunnel::Ipip
    } else if f.proto == IPPROTO_TCP && !pkt.syn {
        Tunnel::Gue { alternates: select::alternates(&vip, picked.backend, picked.backend_id, picked.slot) }
    } else {
        Tunnel::Gue { alternates: select::Alternates::NONE }
    };
    // Too big: the host answers with the ICMP error.
    if pkt.ip_len + overhead(picked.backend, tunnel) > cfg.mtu {
        return None;
    }
    let inner = Inner { family: f.family, ip_len: pkt.ip_len, tos: pkt.tos, hash: picked.hash };
    encapsulate(ctx, cfg, picked.backend, &inner, tunnel).ok()?;
    let bytes = pkt.ip_len as u64;
    if let Some(s) = OFFLOAD_VIP_STATS.get_ptr_mut(vip.vip_id) {
        add(unsafe { &raw mut (*s).packets }, 1);
        add(unsafe { &raw mut (*s).bytes }, bytes);
        add(unsafe { &raw mut (*s).new_flows }, 1);
    }
    if let Some(s) = OFFLOAD_BACKEND_STATS.get_ptr_mut(picked.backend_id) {
        add(unsafe { &raw mut (*s).packets }, 1);
        add(unsafe { &raw mut (*s).bytes }, bytes);
    }
    #[cfg(feature = "bench-restore")]
    encap::restore(ctx, picked.backend, tunnel, f.family, pkt.syn);
    Some(XDP_TX)
}

/// An atomic add to a counter in a map value (the only write a NIC's JIT
/// takes there; its result is unused, so no fetch).
#[inline(always)]
fn add(counter: *mut u64, n: u64) {
    unsafe { core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(counter, n) };
}
