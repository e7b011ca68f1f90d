//! The backends' decapsulator: strips the outer headers of IP-in-IP and GUE
//! packets addressed to one of this host's decap addresses and passes the
//! inner packet to the kernel (XDP_PASS), which delivers it to the socket
//! bound to the VIP. Everything else passes untouched. Needed because the
//! kernel here has no ipip/ip6tnl/fou devices (see PLATFORM.md).
//!
//! The second chance: a GUE packet may name alternate backends (what the
//! balancer's alternate rings chose). If it is a TCP packet that is not a
//! SYN and no local socket owns it (no established or request socket, and
//! no listener that takes it as a valid SYN cookie), the connection lives
//! on an alternate: the packet goes back out (XDP_TX, to the neighbour it
//! came from) with the first alternate as its outer destination and that
//! alternate removed from the list, so it is passed on at most once per
//! alternate.
#![no_std]
#![no_main]

mod headers;
mod object;
mod vlan;

use aya_ebpf::{
    bindings::{
        bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2,
        xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
        BPF_F_CURRENT_NETNS,
    },
    helpers::{bpf_sk_release, bpf_skc_lookup_tcp, bpf_tcp_check_syncookie, bpf_xdp_adjust_head},
    macros::{map, xdp},
    maps::{Array, HashMap, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{
    decap_stat, gue_alternates_len, DecapAddr, DecapConfig, DecapStats, AF_INET, AF_INET6, ETH_HLEN,
    GUE_ALTERNATE_KIND, GUE_HLEN, IPPROTO_IPIP, IPPROTO_IPV6, IPPROTO_TCP, IPPROTO_UDP, IPV4_HLEN, IPV6_HLEN,
    MAX_ALTERNATES, UDP_HLEN,
};

use headers::{ptr_at, EthHdr, Ipv4Hdr, Ipv6Hdr, UdpHdr, ETH_P_IP, ETH_P_IPV6};

/// Outer destinations this host decapsulates.
#[map]
static DECAP_ADDRS: HashMap<DecapAddr, u8> = HashMap::with_max_entries(64, 0);
#[map]
static DECAP_CONFIG: Array<DecapConfig> = Array::with_max_entries(1, 0);
#[map]
static DECAP_STATS: PerCpuArray<DecapStats> = PerCpuArray::with_max_entries(1, 0);

/// TCP flags (RFC 9293): SYN, ACK.
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
/// Linux's TCP_LISTEN socket state (include/net/tcp_states.h).
const TCP_LISTEN: u32 = 10;

#[xdp]
pub fn lb_decap(ctx: XdpContext) -> u32 {
    // A tagged frame is decapsulated untagged; what goes up or back out
    // carries its tags again.
    let Ok(tags) = vlan::pop(&ctx) else { return XDP_PASS };
    let done = decap(&ctx);
    if tags != 0 && vlan::push(&ctx, tags).is_err() {
        return XDP_DROP;
    }
    let (action, counter) = match done {
        Some(Done::Passed) => (XDP_PASS, decap_stat::DECAPSULATED),
        Some(Done::AlternateUnused) => (XDP_PASS, decap_stat::ALTERNATE_UNUSED),
        Some(Done::Redirected) => (XDP_TX, decap_stat::REDIRECTED),
        None => return XDP_PASS,
    };
    if let Some(stats) = DECAP_STATS.get_ptr_mut(0) {
        if let Some(n) = unsafe { (*stats).counters.get_mut(counter) } {
            *n += 1;
        }
    }
    action
}

enum Done {
    /// Decapsulated, inner packet passed up.
    Passed,
    /// Decapsulated although it named an alternate: a local socket owns it.
    AlternateUnused,
    /// Sent on to the alternate.
    Redirected,
}

/// The outer headers of a packet for this host.
struct Outer {
    /// Bytes before the inner packet, Ethernet excluded.
    len: usize,
    /// EtherType of the inner packet.
    inner_proto: u16,
    v6: bool,
    /// GUE private data bytes, when they name alternates.
    alternate_len: usize,
    /// How many alternates they name.
    alternates: u8,
}

#[inline(always)]
fn decap(ctx: &XdpContext) -> Option<Done> {
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    let (dst_mac, src_mac, proto) = unsafe { ((*eth).dst, (*eth).src, (*eth).proto) };
    let outer = if proto == ETH_P_IP {
        let ip = unsafe { &*ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN)? };
        // The balancer never adds IPv4 options; anything else is not ours.
        if ip.ver_ihl != 0x45 {
            return None;
        }
        let key = DecapAddr { addr: [ip.daddr, 0, 0, 0], family: AF_INET, _pad: [0; 3] };
        outer(ctx, ip.proto, &key, false)?
    } else if proto == ETH_P_IPV6 {
        let ip = unsafe { &*ptr_at::<Ipv6Hdr>(ctx, ETH_HLEN)? };
        let key = DecapAddr { addr: ip.daddr, family: AF_INET6, _pad: [0; 3] };
        outer(ctx, ip.next_hdr, &key, true)?
    } else {
        return None;
    };
    let mut done = Done::Passed;
    if outer.alternate_len != 0 {
        if !owned_here(ctx, ETH_HLEN + outer.len, outer.inner_proto)? {
            redirect(ctx, &outer)?;
            return Some(Done::Redirected);
        }
        done = Done::AlternateUnused;
    }
    // Cut the outer headers off, then write the Ethernet header in front of
    // the inner packet (the bytes there are the old outer headers' tail).
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, outer.len as i32) } != 0 {
        return None;
    }
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    unsafe {
        (*eth).dst = dst_mac;
        (*eth).src = src_mac;
        (*eth).proto = outer.inner_proto;
    }
    Some(done)
}

/// What follows the outer IP header, if the packet is for one of our
/// addresses: IP-in-IP, or GUE variant 0 on our port with flags zero.
#[inline(always)]
fn outer(ctx: &XdpContext, next_header: u8, key: &DecapAddr, v6: bool) -> Option<Outer> {
    let ip_len = if v6 { IPV6_HLEN } else { IPV4_HLEN };
    let inner_ethertype = |proto: u8| match proto {
        IPPROTO_IPIP => Some(ETH_P_IP),
        IPPROTO_IPV6 => Some(ETH_P_IPV6),
        _ => None,
    };
    if next_header != IPPROTO_UDP {
        let inner_proto = inner_ethertype(next_header)?;
        unsafe { DECAP_ADDRS.get(key) }?;
        return Some(Outer { len: ip_len, inner_proto, v6, alternate_len: 0, alternates: 0 });
    }
    let udp = unsafe { &*ptr_at::<UdpHdr>(ctx, ETH_HLEN + ip_len)? };
    let port = DECAP_CONFIG.get(0)?.gue_port;
    if port == 0 || udp.dst != port {
        return None;
    }
    unsafe { DECAP_ADDRS.get(key) }?;
    // Version 0, C 0, no flags: what the balancer sends (draft-ietf-intarea-gue 3.1).
    let gue = unsafe { *ptr_at::<[u8; GUE_HLEN]>(ctx, ETH_HLEN + ip_len + UDP_HLEN)? };
    if gue[0] & 0xe0 != 0 || gue[2] != 0 || gue[3] != 0 {
        return None;
    }
    let inner_proto = inner_ethertype(gue[1])?;
    let private_len = (gue[0] & 0x1f) as usize * 4;
    let private = ETH_HLEN + ip_len + UDP_HLEN + GUE_HLEN;
    // Ours names 1 to MAX_ALTERNATES alternates of the outer header's family
    // (a count of 0 with one address is what balancers before the ring
    // history sent: one alternate).
    let family = if v6 { AF_INET6 } else { AF_INET };
    let (alternate_len, alternates) = match ptr_at::<[u8; 4]>(ctx, private) {
        Some(head) => {
            let head = unsafe { *head };
            let count = if head[2] == 0 { 1 } else { head[2] };
            let ours = head[0] == GUE_ALTERNATE_KIND
                && head[1] == family
                && count as usize <= MAX_ALTERNATES
                && private_len == gue_alternates_len(v6, count as usize);
            if ours {
                (private_len, count)
            } else {
                (0, 0)
            }
        }
        None => (0, 0),
    };
    Some(Outer { len: ip_len + UDP_HLEN + GUE_HLEN + private_len, inner_proto, v6, alternate_len, alternates })
}

/// Whether the inner packet at `at` belongs here: anything but a TCP
/// segment without SYN does; such a segment does if a socket of this
/// namespace owns it. `None`: too short to tell.
#[inline(always)]
fn owned_here(ctx: &XdpContext, at: usize, inner_proto: u16) -> Option<bool> {
    // Zeroed whole: the lookup reads the size it is given, never garbage.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let (ip_len, tuple_len) = if inner_proto == ETH_P_IP {
        let ip = unsafe { &*ptr_at::<Ipv4Hdr>(ctx, at)? };
        if ip.ver_ihl != 0x45 || ip.proto != IPPROTO_TCP {
            return Some(true);
        }
        let ports = unsafe { *ptr_at::<[u16; 2]>(ctx, at + IPV4_HLEN)? };
        tuple.__bindgen_anon_1.ipv4 = bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
            saddr: ip.saddr,
            daddr: ip.daddr,
            sport: ports[0],
            dport: ports[1],
        };
        (IPV4_HLEN, core::mem::size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>())
    } else {
        let ip = unsafe { &*ptr_at::<Ipv6Hdr>(ctx, at)? };
        if ip.next_hdr != IPPROTO_TCP {
            return Some(true);
        }
        let ports = unsafe { *ptr_at::<[u16; 2]>(ctx, at + IPV6_HLEN)? };
        tuple.__bindgen_anon_1.ipv6 = bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 {
            saddr: ip.saddr,
            daddr: ip.daddr,
            sport: ports[0],
            dport: ports[1],
        };
        (IPV6_HLEN, core::mem::size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2>())
    };
    let tcp = ptr_at::<[u8; 20]>(ctx, at + ip_len)?;
    let flags = unsafe { (*tcp)[13] };
    if flags & TCP_SYN != 0 && flags & TCP_ACK == 0 {
        return Some(true);
    }
    let ip = ptr_at::<u8>(ctx, at)?;
    // Between lookup and release nothing may return early: the verifier
    // refuses a socket reference that could leak.
    let sk =
        unsafe { bpf_skc_lookup_tcp(ctx.ctx as *mut _, &mut tuple, tuple_len as u32, BPF_F_CURRENT_NETNS as u64, 0) };
    if sk.is_null() {
        return Some(false);
    }
    // A listener owns only an ACK that completes a SYN-cookie handshake.
    let owned = unsafe { (*sk).state } != TCP_LISTEN
        || unsafe { bpf_tcp_check_syncookie(sk as *mut _, ip as *mut _, ip_len as u32, tcp as *mut _, 20) } == 0;
    unsafe { bpf_sk_release(sk as *mut _) };
    Some(owned)
}

/// Sends the packet on to its first alternate: outer destination
/// rewritten, hop limit lowered, that address removed from the private
/// data (the whole private data, GUE Hlen 0, when it was the last), back to
/// the neighbour it came from.
#[inline(always)]
fn redirect(ctx: &XdpContext, outer: &Outer) -> Option<()> {
    let eth = unsafe { *ptr_at::<EthHdr>(ctx, 0)? };
    let ip_len = if outer.v6 { IPV6_HLEN } else { IPV4_HLEN };
    let size = if outer.v6 { 16 } else { 4 };
    let last = outer.alternates <= 1;
    let cut = if last { outer.alternate_len } else { size };
    let private = ETH_HLEN + ip_len + UDP_HLEN + GUE_HLEN;
    let mut udp = unsafe { *ptr_at::<UdpHdr>(ctx, ETH_HLEN + ip_len)? };
    let mut gue = unsafe { *ptr_at::<[u8; GUE_HLEN]>(ctx, ETH_HLEN + ip_len + UDP_HLEN)? };
    let mut head = unsafe { *ptr_at::<[u8; 4]>(ctx, private)? };
    udp.len = (u16::from_be(udp.len) - cut as u16).to_be();
    gue[0] = ((outer.alternate_len - cut) / 4) as u8;
    head[2] = outer.alternates.wrapping_sub(1);
    if outer.v6 {
        let mut ip = unsafe { *ptr_at::<Ipv6Hdr>(ctx, ETH_HLEN)? };
        ip.daddr = unsafe { *ptr_at::<[u32; 4]>(ctx, private + 4)? };
        ip.payload_len = (u16::from_be(ip.payload_len) - cut as u16).to_be();
        ip.hop_limit = ip.hop_limit.checked_sub(1).filter(|h| *h > 0)?;
        shift(ctx, cut)?;
        unsafe { *ptr_at::<Ipv6Hdr>(ctx, ETH_HLEN)? = ip };
    } else {
        let mut ip = unsafe { *ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN)? };
        ip.daddr = unsafe { *ptr_at::<u32>(ctx, private + 4)? };
        ip.tot_len = (u16::from_be(ip.tot_len) - cut as u16).to_be();
        ip.ttl = ip.ttl.checked_sub(1).filter(|t| *t > 0)?;
        ip.check = 0;
        ip.check = headers::ipv4_checksum(&ip);
        shift(ctx, cut)?;
        unsafe { *ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN)? = ip };
    }
    unsafe {
        *ptr_at::<UdpHdr>(ctx, ETH_HLEN + ip_len)? = udp;
        *ptr_at::<[u8; GUE_HLEN]>(ctx, ETH_HLEN + ip_len + UDP_HLEN)? = gue;
        // The rest of the list now starts where the first address did end.
        if !last {
            *ptr_at::<[u8; 4]>(ctx, private)? = head;
        }
        *ptr_at::<EthHdr>(ctx, 0)? = EthHdr { dst: eth.src, src: eth.dst, proto: eth.proto };
    }
    Some(())
}

/// Drops `cut` bytes from the front; the caller rewrites every header that
/// sat before the private data.
#[inline(always)]
fn shift(ctx: &XdpContext, cut: usize) -> Option<()> {
    (unsafe { bpf_xdp_adjust_head(ctx.ctx, cut as i32) } == 0).then_some(())
}
