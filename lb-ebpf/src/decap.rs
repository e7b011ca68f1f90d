//! The backends' decapsulator: strips the outer IP header of IP-in-IP
//! packets addressed to one of this host's decap addresses and passes the
//! inner packet to the kernel (XDP_PASS), which delivers it to the socket
//! bound to the VIP. Everything else passes untouched. Needed because the
//! kernel here has no ipip/ip6tnl tunnel devices (see PLATFORM.md).
#![no_std]
#![no_main]

mod headers;
mod object;

use aya_ebpf::{
    bindings::xdp_action::XDP_PASS,
    helpers::bpf_xdp_adjust_head,
    macros::{map, xdp},
    maps::HashMap,
    programs::XdpContext,
};
use lb_common::{DecapAddr, AF_INET, AF_INET6, ETH_HLEN, IPPROTO_IPIP, IPPROTO_IPV6, IPV4_HLEN, IPV6_HLEN};

use headers::{ptr_at, EthHdr, Ipv4Hdr, Ipv6Hdr, ETH_P_IP, ETH_P_IPV6};

/// Outer destinations this host decapsulates.
#[map]
static DECAP_ADDRS: HashMap<DecapAddr, u8> = HashMap::with_max_entries(64, 0);

#[xdp]
pub fn lb_decap(ctx: XdpContext) -> u32 {
    let _ = decap(&ctx);
    XDP_PASS
}

#[inline(always)]
fn decap(ctx: &XdpContext) -> Option<()> {
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    let (dst_mac, src_mac, proto) = unsafe { ((*eth).dst, (*eth).src, (*eth).proto) };
    let (outer_len, inner_proto) = if proto == ETH_P_IP {
        let ip = unsafe { &*ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN)? };
        // The balancer never adds IPv4 options; anything else is not ours.
        if ip.ver_ihl != 0x45 {
            return None;
        }
        let key = DecapAddr { addr: [ip.daddr, 0, 0, 0], family: AF_INET, _pad: [0; 3] };
        (IPV4_HLEN, accepted(ip.proto, &key)?)
    } else if proto == ETH_P_IPV6 {
        let ip = unsafe { &*ptr_at::<Ipv6Hdr>(ctx, ETH_HLEN)? };
        let key = DecapAddr { addr: ip.daddr, family: AF_INET6, _pad: [0; 3] };
        (IPV6_HLEN, accepted(ip.next_hdr, &key)?)
    } else {
        return None;
    };
    // Cut the outer header off, then write the Ethernet header in front of
    // the inner packet (the bytes there are the old outer header's tail).
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, outer_len as i32) } != 0 {
        return None;
    }
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    unsafe {
        (*eth).dst = dst_mac;
        (*eth).src = src_mac;
        (*eth).proto = inner_proto;
    }
    Some(())
}

/// The inner EtherType if `next_header` is IP-in-IP and the outer
/// destination is one of ours.
#[inline(always)]
fn accepted(next_header: u8, key: &DecapAddr) -> Option<u16> {
    let inner = match next_header {
        IPPROTO_IPIP => ETH_P_IP,
        IPPROTO_IPV6 => ETH_P_IPV6,
        _ => return None,
    };
    unsafe { DECAP_ADDRS.get(key) }?;
    Some(inner)
}
