//! Data-path health checks: a tc egress program on the LB host's interface
//! that encapsulates the packets of the controller's check sockets (those
//! marked `PROBE_MARK_BASE + id`) as the balancer encapsulates the VIP's
//! packets: IP-in-IP or GUE, from the tier's outer source, to one backend,
//! through the next hop. The check's packets are addressed to the VIP, so
//! the backend's decap, its VIP on `lo`, its server and its route back
//! (DSR, to this host's address) are all tested. Every other packet passes
//! after one load and one compare; the balancer's XDP path is not touched.
//!
//! Per check packet: one map lookup and one helper (`bpf_skb_adjust_room`).
#![no_std]
#![no_main]

#[allow(dead_code)] // the probe writes headers; it parses none
mod headers;
mod object;
mod outer;

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, BPF_ADJ_ROOM_ENCAP_L2_SHIFT, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4,
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV6, BPF_F_ADJ_ROOM_ENCAP_L4_UDP, TC_ACT_SHOT, TC_ACT_UNSPEC,
    },
    macros::{classifier, map},
    maps::Array,
    programs::TcContext,
};
use lb_common::{
    ProbeRoute, AF_INET, AF_INET6, ETH_HLEN, GUE_HLEN, IPPROTO_IPIP, IPPROTO_IPV6, IPPROTO_UDP, IPV4_HLEN, IPV6_HLEN,
    MAX_PROBES, PROBE_MARK_BASE, UDP_HLEN,
};

use headers::{EthHdr, Ipv4Hdr, Ipv6Hdr, UdpHdr, ETH_P_IP, ETH_P_IPV6};

#[map]
static PROBE_ROUTES: Array<ProbeRoute> = Array::with_max_entries(MAX_PROBES, 0);

/// Returns TC_ACT_UNSPEC ("next") for every packet it lets through: on tcx
/// (and cls_bpf) the next program on egress, if any, still runs; TC_ACT_OK
/// would end the chain there.
#[classifier]
pub fn probe_encap(ctx: TcContext) -> i32 {
    let mark = unsafe { (*ctx.skb.skb).mark };
    let id = mark.wrapping_sub(PROBE_MARK_BASE);
    if id >= MAX_PROBES {
        return TC_ACT_UNSPEC;
    }
    // A check packet that cannot be encapsulated is dropped: sent as it is,
    // it would reach the VIP through the tier and pass for any backend.
    match encapsulate(&ctx, id) {
        Some(()) => TC_ACT_UNSPEC,
        None => TC_ACT_SHOT as i32,
    }
}

#[inline(always)]
fn encapsulate(ctx: &TcContext, id: u32) -> Option<()> {
    let route = PROBE_ROUTES.get(id)?;
    let inner_proto = match ctx.skb.protocol() as u16 {
        ETH_P_IP => IPPROTO_IPIP,
        ETH_P_IPV6 => IPPROTO_IPV6,
        _ => return None,
    };
    let v6 = match route.family {
        AF_INET => false,
        AF_INET6 => true,
        _ => return None,
    };
    let ip_hlen = if v6 { IPV6_HLEN } else { IPV4_HLEN };
    let gue = route.gue_port != 0;
    let added = ip_hlen + if gue { UDP_HLEN + GUE_HLEN } else { 0 };
    // The ENCAP flags let the kernel (and GSO, and checksum offload) find
    // the inner headers again; skb->protocol becomes the outer family.
    let mut flags = if v6 { BPF_F_ADJ_ROOM_ENCAP_L3_IPV6 } else { BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 } as u64;
    if gue {
        flags |= BPF_F_ADJ_ROOM_ENCAP_L4_UDP as u64 | ((GUE_HLEN as u64) << BPF_ADJ_ROOM_ENCAP_L2_SHIFT);
    }
    ctx.adjust_room(added as i32, BPF_ADJ_ROOM_MAC, flags).ok()?;

    // Everything after the outer IP header: (UDP, GUE and) the inner packet.
    let ip_payload = ctx.len().checked_sub((ETH_HLEN + ip_hlen) as u32)?;
    // The socket's flow hash spreads checks as the flow hash spreads data.
    let hash = unsafe { (*ctx.skb.skb).hash };
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    unsafe {
        (*eth).dst = route.next_hop_mac;
        (*eth).proto = if v6 { ETH_P_IPV6 } else { ETH_P_IP };
    }
    let next_header = if gue { IPPROTO_UDP } else { inner_proto };
    // Outer headers as the balancer's (`outer`), TOS 0: the check's own.
    if v6 {
        let ip = ptr_at::<Ipv6Hdr>(ctx, ETH_HLEN)?;
        unsafe { *ip = outer::ipv6(0, hash, ip_payload, next_header, route.saddr, route.daddr) };
    } else {
        let ip = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN)?;
        unsafe { *ip = outer::ipv4(0, ip_payload, next_header, route.saddr[0], route.daddr[0]) };
    }
    if gue {
        let at = ETH_HLEN + ip_hlen;
        let udp = ptr_at::<UdpHdr>(ctx, at)?;
        unsafe { *udp = outer::gue_udp(hash, route.gue_port, ip_payload) };
        // GUE variant 0, no private data: a check names no alternates.
        let head = ptr_at::<[u8; GUE_HLEN]>(ctx, at + UDP_HLEN)?;
        unsafe { *head = [0, inner_proto, 0, 0] };
    }
    Some(())
}

/// A pointer to a `T` at `offset` of the packet's linear part, if it holds
/// all of it (the headers just added always are linear).
#[inline(always)]
fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    if start + offset + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *mut T)
}
