//! Encapsulation: IP-in-IP (RFC 2003 for IPv4 outer, RFC 2473 for IPv6
//! outer), or GUE variant 0 (draft-ietf-intarea-gue) in UDP with the
//! alternate hop in its private data. Grow the packet at the front, write
//! a new Ethernet header towards the next hop and the outer headers towards
//! the backend. The inner packet is left byte for byte as it arrived.

use aya_ebpf::{helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{
    gue_alternates_len, Backend, Config, AF_INET, AF_INET6, CONFIG_F_REDIRECT, ETH_HLEN, GUE_ALTERNATE_KIND, GUE_HLEN,
    IPPROTO_IPIP, IPPROTO_IPV6, IPPROTO_UDP, IPV4_HLEN, IPV6_HLEN, UDP_HLEN,
};

use crate::headers::{ptr_at, EthHdr, Ipv4Hdr, Ipv6Hdr, UdpHdr, ETH_P_IP, ETH_P_IPV6};
use crate::outer;
use crate::select::Alternates;

/// How a packet is carried to its backend.
#[derive(Clone, Copy)]
pub enum Tunnel {
    Ipip,
    /// GUE, naming other backends (same family as the destination) that a
    /// backend without a socket for the packet passes it to, in turn.
    Gue {
        alternates: Alternates,
    },
}

/// Bytes the outer headers add for this backend.
#[inline(always)]
pub fn overhead(backend: &Backend, tunnel: Tunnel) -> u32 {
    let v6 = backend.family == AF_INET6;
    let ip = if v6 { IPV6_HLEN } else { IPV4_HLEN };
    let gue = match tunnel {
        Tunnel::Ipip => 0,
        Tunnel::Gue { alternates } => UDP_HLEN + GUE_HLEN + gue_alternates_len(v6, alternates.len),
    };
    (ip + gue) as u32
}

/// What the outer header needs to know about the inner packet.
pub struct Inner {
    pub family: u8,
    pub ip_len: u32,
    pub tos: u8,
    pub hash: u32,
}

/// Encapsulates the packet towards `backend`. `Err` if the kernel refused to
/// grow the packet; the packet is then unchanged.
#[inline(always)]
pub fn encapsulate(ctx: &XdpContext, cfg: &Config, backend: &Backend, inner: &Inner, tunnel: Tunnel) -> Result<(), ()> {
    // Our own MAC is the destination of the frame we received (read it
    // before the headers move), or the backend-facing NIC's with two.
    let eth = ptr_at::<EthHdr>(ctx, 0).ok_or(())?;
    let own_mac = if cfg.flags & CONFIG_F_REDIRECT != 0 { cfg.egress_mac } else { unsafe { (*eth).dst } };

    let outer_len = overhead(backend, tunnel) as usize;
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(outer_len as i32)) } != 0 {
        return Err(());
    }
    let eth = ptr_at::<EthHdr>(ctx, 0).ok_or(())?;
    let outer_proto = if backend.family == AF_INET6 { ETH_P_IPV6 } else { ETH_P_IP };
    unsafe {
        (*eth).dst = cfg.next_hop_mac;
        (*eth).src = own_mac;
        (*eth).proto = outer_proto;
    }
    let inner_proto = if inner.family == AF_INET { IPPROTO_IPIP } else { IPPROTO_IPV6 };
    let gue = matches!(tunnel, Tunnel::Gue { .. });
    let next_header = if gue { IPPROTO_UDP } else { inner_proto };
    // Everything after the outer IP header: the inner packet, and for GUE
    // the UDP and GUE headers and the alternate.
    let ip_payload = inner.ip_len + outer_len as u32 - if backend.family == AF_INET6 { 40 } else { 20 };
    if backend.family == AF_INET6 {
        let ip = ptr_at::<Ipv6Hdr>(ctx, ETH_HLEN).ok_or(())?;
        let mut saddr = cfg.encap_src_v6;
        saddr[3] |= inner.hash & cfg.encap_src_v6_host_mask;
        unsafe { *ip = outer::ipv6(inner.tos, inner.hash, ip_payload, next_header, saddr, backend.addr) };
    } else {
        let ip = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN).ok_or(())?;
        let saddr = cfg.encap_src_v4 | (inner.hash & cfg.encap_src_v4_host_mask);
        unsafe { *ip = outer::ipv4(inner.tos, ip_payload, next_header, saddr, backend.addr[0]) };
    }
    if let Tunnel::Gue { alternates } = tunnel {
        write_gue(ctx, cfg, backend, inner, inner_proto, ip_payload, &alternates)?;
    }
    Ok(())
}

/// The UDP and GUE headers and the alternates, after the outer IP header.
#[inline(always)]
fn write_gue(
    ctx: &XdpContext,
    cfg: &Config,
    backend: &Backend,
    inner: &Inner,
    inner_proto: u8,
    udp_len: u32,
    alternates: &Alternates,
) -> Result<(), ()> {
    let v6 = backend.family == AF_INET6;
    let at = ETH_HLEN + if v6 { IPV6_HLEN } else { IPV4_HLEN };
    let udp = ptr_at::<UdpHdr>(ctx, at).ok_or(())?;
    unsafe { *udp = outer::gue_udp(inner.hash, cfg.gue_port, udp_len) };
    // Ver 0, C 0, Hlen in words of private data; Proto; Flags 0.
    let private_words = gue_alternates_len(v6, alternates.len) / 4;
    let gue = ptr_at::<[u8; GUE_HLEN]>(ctx, at + UDP_HLEN).ok_or(())?;
    unsafe { *gue = [private_words as u8, inner_proto, 0, 0] };
    if alternates.len == 0 {
        return Ok(());
    }
    let private = at + UDP_HLEN + GUE_HLEN;
    let family = if v6 { AF_INET6 } else { AF_INET };
    let head = ptr_at::<[u8; 4]>(ctx, private).ok_or(())?;
    unsafe { *head = [GUE_ALTERNATE_KIND, family, alternates.len as u8, 0] };
    // Unrolled: the verifier checks each write at a constant offset (and
    // no multiply: the NIC's JIT takes none of a 64-bit operand).
    let size = if v6 { 16 } else { 4 };
    let mut at = private + 4;
    for i in 0..lb_common::MAX_ALTERNATES {
        if i >= alternates.len {
            break;
        }
        let addr = crate::select::backend_addr(alternates.ids[i]).ok_or(())?;
        write_addr(ctx, at, &addr, v6)?;
        at += size;
    }
    Ok(())
}

#[inline(always)]
fn write_addr(ctx: &XdpContext, at: usize, addr: &[u32; 4], v6: bool) -> Result<(), ()> {
    if v6 {
        let p = ptr_at::<[u32; 4]>(ctx, at).ok_or(())?;
        unsafe { *p = *addr };
    } else {
        let p = ptr_at::<u32>(ctx, at).ok_or(())?;
        unsafe { *p = addr[0] };
    }
    Ok(())
}

/// Undo of [`encapsulate`] for the bench-only build: BPF_PROG_TEST_RUN
/// with repeat > 1 feeds the program its own output, so the benchmark
/// restores the input to keep every repetition on the same path. A SYN
/// also gets the next source port, so that each repetition is a new flow.
/// (The router's MAC is not restored: the parser does not read it.)
#[cfg(feature = "bench-restore")]
#[inline(always)]
pub fn restore(ctx: &XdpContext, backend: &Backend, tunnel: Tunnel, inner_family: u8, syn: bool) {
    let outer_len = overhead(backend, tunnel) as usize;
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else { return };
    let own_mac = unsafe { (*eth).src };
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, outer_len as i32) } != 0 {
        return;
    }
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else { return };
    let proto = if inner_family == AF_INET6 { ETH_P_IPV6 } else { ETH_P_IP };
    unsafe {
        (*eth).dst = own_mac;
        (*eth).proto = proto;
    }
    if syn {
        let l4 = if inner_family == AF_INET6 {
            ETH_HLEN + IPV6_HLEN
        } else {
            match ptr_at::<u8>(ctx, ETH_HLEN) {
                Some(v) => ETH_HLEN + ((unsafe { *v } & 0x0f) as usize) * 4,
                None => return,
            }
        };
        if let Some(port) = ptr_at::<u16>(ctx, l4) {
            unsafe { *port = (*port).wrapping_add(1) };
        }
    }
}
