//! IP-in-IP encapsulation (RFC 2003 for IPv4 outer, RFC 2473 for IPv6
//! outer): grow the packet at the front by one IP header, write a new
//! Ethernet header towards the next hop and the outer IP header towards the
//! backend. The inner packet is left byte for byte as it arrived.

use aya_ebpf::{helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{Backend, Config, AF_INET, AF_INET6, ETH_HLEN, IPPROTO_IPIP, IPPROTO_IPV6, IPV4_HLEN, IPV6_HLEN};

use crate::headers::{ptr_at, EthHdr, Ipv4Hdr, Ipv6Hdr, ETH_P_IP, ETH_P_IPV6};

/// Outer hop limit / TTL.
const OUTER_TTL: u8 = 64;
/// IPv4 Don't Fragment (RFC 791), wire order: a fragmented outer packet could
/// not be reassembled by the backends' XDP decap, so it must not happen.
const IPV4_DF: u16 = 0x4000u16.to_be();

/// Bytes the outer header adds for this backend.
#[inline(always)]
pub fn overhead(backend: &Backend) -> u32 {
    if backend.family == AF_INET6 {
        IPV6_HLEN as u32
    } else {
        IPV4_HLEN as u32
    }
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
pub fn encapsulate(ctx: &XdpContext, cfg: &Config, backend: &Backend, inner: &Inner) -> Result<(), ()> {
    // Our own MAC is the destination of the frame we received; read it
    // before the headers move.
    let eth = ptr_at::<EthHdr>(ctx, 0).ok_or(())?;
    let own_mac = unsafe { (*eth).dst };

    let outer_len = overhead(backend) as usize;
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
    let next_header = if inner.family == AF_INET { IPPROTO_IPIP } else { IPPROTO_IPV6 };
    if backend.family == AF_INET6 {
        let ip = ptr_at::<Ipv6Hdr>(ctx, ETH_HLEN).ok_or(())?;
        // The flow label carries the flow hash so that routers on the way to
        // the backend can spread flows (RFC 6438).
        let first = (6u32 << 28) | ((inner.tos as u32) << 20) | (inner.hash & 0x000f_ffff);
        let mut saddr = cfg.encap_src_v6;
        saddr[3] |= inner.hash & cfg.encap_src_v6_host_mask;
        unsafe {
            *ip = Ipv6Hdr {
                ver_tc_flow: first.to_be(),
                payload_len: (inner.ip_len as u16).to_be(),
                next_hdr: next_header,
                hop_limit: OUTER_TTL,
                saddr,
                daddr: backend.addr,
            };
        }
    } else {
        let ip = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN).ok_or(())?;
        let mut hdr = Ipv4Hdr {
            ver_ihl: 0x45,
            tos: inner.tos,
            tot_len: ((inner.ip_len + IPV4_HLEN as u32) as u16).to_be(),
            id: 0,
            frag_off: IPV4_DF,
            ttl: OUTER_TTL,
            proto: next_header,
            check: 0,
            saddr: cfg.encap_src_v4 | (inner.hash & cfg.encap_src_v4_host_mask),
            daddr: backend.addr[0],
        };
        hdr.check = ipv4_checksum(&hdr);
        unsafe { *ip = hdr };
    }
    Ok(())
}

/// RFC 1071 checksum of a 20-byte IPv4 header whose `check` field is 0.
#[inline(always)]
pub fn ipv4_checksum(hdr: &Ipv4Hdr) -> u16 {
    let words = unsafe { &*(hdr as *const Ipv4Hdr as *const [u16; 10]) };
    let mut sum = 0u32;
    for w in words {
        sum += *w as u32;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Undo of [`encapsulate`] for the bench-only build: BPF_PROG_TEST_RUN
/// with repeat > 1 feeds the program its own output, so the benchmark
/// restores the input to keep every repetition on the same path. A SYN
/// also gets the next source port, so that each repetition is a new flow.
/// (The router's MAC is not restored: the parser does not read it.)
#[cfg(feature = "bench-restore")]
#[inline(always)]
pub fn restore(ctx: &XdpContext, backend: &Backend, inner_family: u8, syn: bool) {
    let outer_len = overhead(backend) as usize;
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
