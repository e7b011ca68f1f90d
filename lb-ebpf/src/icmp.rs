//! ICMP the LB answers itself: echo replies from VIP addresses (RFC 792
//! type 8 -> 0, RFC 4443 type 128 -> 129), built in place with checksums
//! fixed incrementally (RFC 1624); and "too big" errors for VIP packets that
//! would not fit the path to the backends once encapsulated.

use aya_ebpf::{
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{AF_INET6, ETH_HLEN, IPV4_HLEN, IPV6_HLEN};

use crate::{
    headers::{ipv4_checksum, ptr_at, EthHdr, Ipv4Hdr, Ipv6Hdr, ETH_P_IP, ETH_P_IPV6},
    parse::Echo,
};

const REPLY_TTL: u8 = 64;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMPV6_ECHO_REPLY: u8 = 129;

/// RFC 1624 eqn. 3: the checksum after a 16-bit word (host order) changed.
#[inline(always)]
fn checksum_replace(check: u16, old: u16, new: u16) -> u16 {
    let mut sum = (!u16::from_be(check) as u32) + (!old as u32) + new as u32;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_be()
}

/// Turns the echo request in the frame into its reply. `None` if a header
/// is not where the parser saw it (cannot happen; the verifier wants it).
#[inline(always)]
pub fn reply(ctx: &XdpContext, echo: &Echo) -> Option<()> {
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    unsafe {
        let dst = (*eth).dst;
        (*eth).dst = (*eth).src;
        (*eth).src = dst;
    }
    let icmp = ptr_at::<[u8; 4]>(ctx, echo.icmp_offset)?;
    let icmp = unsafe { &mut *icmp };
    let code = icmp[1] as u16;
    let mut check = u16::from_ne_bytes([icmp[2], icmp[3]]);
    if echo.family == AF_INET6 {
        let ip = unsafe { &mut *ptr_at::<Ipv6Hdr>(ctx, ETH_HLEN)? };
        // The pseudo-header sums the same with the addresses swapped.
        core::mem::swap(&mut ip.saddr, &mut ip.daddr);
        ip.hop_limit = REPLY_TTL;
        check = checksum_replace(check, ((icmp[0] as u16) << 8) | code, ((ICMPV6_ECHO_REPLY as u16) << 8) | code);
        icmp[0] = ICMPV6_ECHO_REPLY;
    } else {
        let ip = unsafe { &mut *ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN)? };
        core::mem::swap(&mut ip.saddr, &mut ip.daddr);
        let old = ((ip.ttl as u16) << 8) | ip.proto as u16;
        ip.ttl = REPLY_TTL;
        ip.check = checksum_replace(ip.check, old, ((REPLY_TTL as u16) << 8) | ip.proto as u16);
        check = checksum_replace(check, ((icmp[0] as u16) << 8) | code, ((ICMP_ECHO_REPLY as u16) << 8) | code);
        icmp[0] = ICMP_ECHO_REPLY;
    }
    let bytes = check.to_ne_bytes();
    icmp[2] = bytes[0];
    icmp[3] = bytes[1];
    Some(())
}

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
/// What the reply quotes of the packet: its IP header and 8 bytes (RFC 792;
/// enough for the sender's kernel to find the socket, RFC 4443 2.4(c)).
const QUOTE_V4: usize = IPV4_HLEN + 8;
const QUOTE_V6: usize = IPV6_HLEN + 8;

/// Turns a VIP packet too big for the path to the backends into ICMP
/// "fragmentation needed" (IPv4, RFC 1191) or "packet too big" (IPv6, RFC
/// 4443) from the VIP back to the client, announcing `mtu`; `ip_len` is the
/// packet's IP length (larger than the quote: it is too big). The frame grows
/// by the new headers at the front, so the quote is already in place, and
/// is cut after the quote. `None`: not possible (IPv4 options), leave it.
#[inline(always)]
pub fn too_big(ctx: &XdpContext, family: u8, ip_len: u32, mtu: u32) -> Option<()> {
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    let (router_mac, own_mac) = unsafe { ((*eth).src, (*eth).dst) };
    let (head, quote) = if family == AF_INET6 { (IPV6_HLEN + 8, QUOTE_V6) } else { (IPV4_HLEN + 8, QUOTE_V4) };
    if family != AF_INET6 {
        let ip = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN)?;
        if unsafe { (*ip).ver_ihl } != 0x45 {
            return None;
        }
    }
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(head as i32)) } != 0 {
        return None;
    }
    // Cut all of the packet after the quote (Ethernet padding, if any,
    // stays: receivers go by the IP length). The verifier allows no
    // arithmetic on data_end, so the cut comes from the IP length.
    let cut = ip_len as i32 - quote as i32;
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, -cut) } != 0 {
        return None;
    }
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    unsafe {
        (*eth).dst = router_mac;
        (*eth).src = own_mac;
        (*eth).proto = if family == AF_INET6 { ETH_P_IPV6 } else { ETH_P_IP };
    }
    let quoted = ETH_HLEN + head;
    let (icmp, check) = if family == AF_INET6 {
        let q = unsafe { &*ptr_at::<Ipv6Hdr>(ctx, quoted)? };
        let (client, vip) = (q.saddr, q.daddr);
        let ip = ptr_at::<Ipv6Hdr>(ctx, ETH_HLEN)?;
        let len = (8 + quote) as u16;
        unsafe {
            (*ip).ver_tc_flow = (6u32 << 28).to_be();
            (*ip).payload_len = len.to_be();
            (*ip).next_hdr = lb_common::IPPROTO_ICMPV6;
            (*ip).hop_limit = REPLY_TTL;
            (*ip).saddr = vip;
            (*ip).daddr = client;
        }
        let icmp = ptr_at::<[u8; 8]>(ctx, ETH_HLEN + IPV6_HLEN)?;
        unsafe {
            *icmp = [ICMPV6_PACKET_TOO_BIG, 0, 0, 0, (mtu >> 24) as u8, (mtu >> 16) as u8, (mtu >> 8) as u8, mtu as u8]
        };
        // RFC 4443 2.3: over the pseudo-header (RFC 8200 8.1) and the message.
        let halves = |a: &[u32; 4]| {
            (a[0] & 0xffff)
                + (a[0] >> 16)
                + (a[1] & 0xffff)
                + (a[1] >> 16)
                + (a[2] & 0xffff)
                + (a[2] >> 16)
                + (a[3] & 0xffff)
                + (a[3] >> 16)
        };
        let mut sum = halves(&vip) + halves(&client);
        sum += (len as u32).to_be() >> 16; // upper-layer length, as a wire word pair
        sum += (lb_common::IPPROTO_ICMPV6 as u32) << 8;
        let msg = ptr_at::<[u16; (8 + QUOTE_V6) / 2]>(ctx, ETH_HLEN + IPV6_HLEN)?;
        for w in unsafe { &*msg } {
            sum += *w as u32;
        }
        (icmp, fold(sum))
    } else {
        let q = unsafe { &*ptr_at::<Ipv4Hdr>(ctx, quoted)? };
        let (client, vip, tos) = (q.saddr, q.daddr, q.tos);
        let ip = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN)?;
        let mut hdr = Ipv4Hdr {
            ver_ihl: 0x45,
            tos,
            tot_len: ((IPV4_HLEN + 8 + quote) as u16).to_be(),
            id: 0,
            frag_off: 0,
            ttl: REPLY_TTL,
            proto: lb_common::IPPROTO_ICMP,
            check: 0,
            saddr: vip,
            daddr: client,
        };
        hdr.check = ipv4_checksum(&hdr);
        unsafe { *ip = hdr };
        let icmp = ptr_at::<[u8; 8]>(ctx, ETH_HLEN + IPV4_HLEN)?;
        unsafe { *icmp = [ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, 0, 0, 0, 0, (mtu >> 8) as u8, mtu as u8] };
        let msg = ptr_at::<[u16; (8 + QUOTE_V4) / 2]>(ctx, ETH_HLEN + IPV4_HLEN)?;
        let mut sum = 0u32;
        for w in unsafe { &*msg } {
            sum += *w as u32;
        }
        (icmp, fold(sum))
    };
    let bytes = check.to_ne_bytes();
    unsafe {
        (*icmp)[2] = bytes[0];
        (*icmp)[3] = bytes[1];
    }
    Some(())
}

/// RFC 1071: fold the carries and complement (wire order in, wire order out).
#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
