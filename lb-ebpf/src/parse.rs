//! The parser: Ethernet, IPv4 (with options), IPv6, and
//! the TCP/UDP ports. Every read is bounds-checked against `data_end`, which
//! is also what the verifier demands.

use aya_ebpf::programs::XdpContext;

use crate::headers::{ptr_at, EthHdr, Ipv4Hdr, Ipv6Hdr, ETH_P_IP, ETH_P_IPV6};
use lb_common::{
    FlowKey, AF_INET, AF_INET6, ETH_HLEN, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, UDP_HLEN,
};

/// IPv6 Fragment extension header (RFC 8200, section 4.5).
const IPPROTO_FRAGMENT: u8 = 44;
/// IPv4 MF flag and fragment offset bits, and DF (RFC 791), in wire order.
const IPV4_FRAG_MASK: u16 = 0x3fffu16.to_be();
const IPV4_DF: u16 = 0x4000u16.to_be();
/// TCP flags byte (RFC 9293): SYN and ACK bits.
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// The first bytes of TCP and UDP: both start with the two ports.
#[repr(C)]
struct Ports {
    src: u16,
    dst: u16,
}

/// A TCP or UDP packet, ready for the VIP lookup.
pub struct Packet {
    pub flow: FlowKey,
    /// Length of the IP packet (header and payload) as its header says;
    /// Ethernet padding after it is not counted.
    pub ip_len: u32,
    /// IPv4 TOS or IPv6 traffic class, copied to the outer header.
    pub tos: u8,
    /// A TCP SYN without ACK: the first packet of a connection.
    pub syn: bool,
    /// May not be fragmented: IPv4 with DF (RFC 791), and all IPv6.
    pub dont_fragment: bool,
    /// Offset in the frame of the payload, if the packet is UDP.
    pub udp_payload: usize,
}

pub enum Parsed {
    /// Not IP, or an IP protocol the balancer does not serve.
    NotForUs,
    Malformed,
    /// A fragment of a TCP or UDP datagram: ports unknown (zero in the
    /// flow), so it is balanced on addresses and protocol (RFC 791, 8200).
    Fragment(Packet),
    /// A fragment of another protocol.
    OtherFragment,
    Flow(Packet),
    /// An ICMP or ICMPv6 echo request: answered if it is for a VIP address.
    Echo(Echo),
    /// A path-MTU error about a VIP flow: the packet goes whole to the
    /// backend that owns the quoted flow (given here as the client sends it).
    IcmpError(Packet),
}

pub struct Echo {
    pub dst: [u32; 4],
    pub family: u8,
    /// Offset of the ICMP header in the frame.
    pub icmp_offset: usize,
}

/// ICMP echo request types (RFC 792, RFC 4443).
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMPV6_ECHO_REQUEST: u8 = 128;

/// ICMP errors that path-MTU discovery depends on: "fragmentation needed"
/// (RFC 792 type 3 code 4, RFC 1191) and "packet too big" (RFC 4443 type 2).
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;

/// An ICMP message to this host: an echo request, a path-MTU error about a
/// TCP/UDP flow (returned as the flow it quotes, reversed: the flow as the
/// client sends it, so it finds the backend that owns it), or other.
#[inline(always)]
fn icmp(ctx: &XdpContext, dst: [u32; 4], family: u8, icmp_offset: usize, ip_len: u32, tos: u8) -> Parsed {
    let Some(header) = ptr_at::<[u8; 8]>(ctx, icmp_offset) else {
        return Parsed::Malformed;
    };
    let (kind, code) = unsafe { ((*header)[0], (*header)[1]) };
    let (echo_request, mtu_error) = if family == AF_INET6 {
        (kind == ICMPV6_ECHO_REQUEST, kind == ICMPV6_PACKET_TOO_BIG)
    } else {
        (kind == ICMP_ECHO_REQUEST, kind == ICMP_DEST_UNREACH && code == ICMP_FRAG_NEEDED)
    };
    if echo_request {
        return Parsed::Echo(Echo { dst, family, icmp_offset });
    }
    if !mtu_error {
        return Parsed::NotForUs;
    }
    match quoted_flow(ctx, family, icmp_offset + 8) {
        Some(flow) => Parsed::IcmpError(Packet { flow, ip_len, tos, syn: false, dont_fragment: false, udp_payload: 0 }),
        None => Parsed::NotForUs,
    }
}

/// The flow of the packet an ICMP error quotes (sent by a backend from the
/// VIP), reversed. `None` if it is not TCP/UDP or is cut short.
#[inline(always)]
fn quoted_flow(ctx: &XdpContext, family: u8, offset: usize) -> Option<FlowKey> {
    let (src, dst, proto, ports_offset) = if family == AF_INET6 {
        let ip = unsafe { &*ptr_at::<Ipv6Hdr>(ctx, offset)? };
        (ip.saddr, ip.daddr, ip.next_hdr, offset + 40)
    } else {
        let ip = unsafe { &*ptr_at::<Ipv4Hdr>(ctx, offset)? };
        let header_len = ((ip.ver_ihl & 0x0f) as usize) * 4;
        if header_len < 20 {
            return None;
        }
        ([ip.saddr, 0, 0, 0], [ip.daddr, 0, 0, 0], ip.proto, offset + header_len)
    };
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return None;
    }
    let ports = ptr_at::<Ports>(ctx, ports_offset)?;
    let (src_port, dst_port) = unsafe { ((*ports).src, (*ports).dst) };
    Some(FlowKey { src: dst, dst: src, src_port: dst_port, dst_port: src_port, proto, family, _pad: [0; 2] })
}

#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Parsed {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Parsed::Malformed;
    };
    let proto = unsafe { (*eth).proto };
    if proto == ETH_P_IP {
        parse_ipv4(ctx)
    } else if proto == ETH_P_IPV6 {
        parse_ipv6(ctx)
    } else {
        Parsed::NotForUs
    }
}

#[inline(always)]
fn parse_ipv4(ctx: &XdpContext) -> Parsed {
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN) else {
        return Parsed::Malformed;
    };
    let ip = unsafe { &*ip };
    // RFC 791: IHL counts 32-bit words, at least 5; options may follow.
    let header_len = ((ip.ver_ihl & 0x0f) as usize) * 4;
    let ip_len = u16::from_be(ip.tot_len) as u32;
    let available = (ctx.data_end() - ctx.data() - ETH_HLEN) as u32;
    if ip.ver_ihl >> 4 != 4 || header_len < 20 || ip_len < header_len as u32 || ip_len > available {
        return Parsed::Malformed;
    }
    let fragment = ip.frag_off & IPV4_FRAG_MASK != 0;
    if ip.proto == IPPROTO_ICMP && !fragment {
        return icmp(ctx, [ip.daddr, 0, 0, 0], AF_INET, ETH_HLEN + header_len, ip_len, ip.tos);
    }
    if ip.proto != IPPROTO_TCP && ip.proto != IPPROTO_UDP {
        return if fragment { Parsed::OtherFragment } else { Parsed::NotForUs };
    }
    let mut flow = FlowKey {
        src: [ip.saddr, 0, 0, 0],
        dst: [ip.daddr, 0, 0, 0],
        proto: ip.proto,
        family: AF_INET,
        ..FlowKey::default()
    };
    let tos = ip.tos;
    if fragment {
        // Even the first fragment, which has the ports: all fragments of a
        // datagram must hash alike to meet at one backend.
        return Parsed::Fragment(Packet { flow, ip_len, tos, syn: false, dont_fragment: false, udp_payload: 0 });
    }
    let l4 = ETH_HLEN + header_len;
    let Some(syn) = parse_ports(ctx, l4, &mut flow, ip_len - header_len as u32) else {
        return Parsed::Malformed;
    };
    let dont_fragment = ip.frag_off & IPV4_DF != 0;
    Parsed::Flow(Packet { flow, ip_len, tos, syn, dont_fragment, udp_payload: l4 + UDP_HLEN })
}

#[inline(always)]
fn parse_ipv6(ctx: &XdpContext) -> Parsed {
    let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, ETH_HLEN) else {
        return Parsed::Malformed;
    };
    let ip = unsafe { &*ip };
    let first = u32::from_be(ip.ver_tc_flow);
    let payload_len = u16::from_be(ip.payload_len) as u32;
    let available = (ctx.data_end() - ctx.data() - ETH_HLEN) as u32;
    if first >> 28 != 6 || payload_len + 40 > available {
        return Parsed::Malformed;
    }
    if ip.next_hdr == IPPROTO_FRAGMENT {
        // RFC 8200 4.5: the fragment header's first byte names the upper
        // protocol of the reassembled datagram.
        let Some(frag) = ptr_at::<[u8; 8]>(ctx, ETH_HLEN + 40) else {
            return Parsed::Malformed;
        };
        let proto = unsafe { (*frag)[0] };
        if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
            return Parsed::OtherFragment;
        }
        let flow = FlowKey { src: ip.saddr, dst: ip.daddr, proto, family: AF_INET6, ..FlowKey::default() };
        let tos = (first >> 20) as u8;
        let ip_len = payload_len + 40;
        return Parsed::Fragment(Packet { flow, ip_len, tos, syn: false, dont_fragment: false, udp_payload: 0 });
    }
    if ip.next_hdr == IPPROTO_ICMPV6 {
        return icmp(ctx, ip.daddr, AF_INET6, ETH_HLEN + 40, payload_len + 40, (first >> 20) as u8);
    }
    // Other extension headers are not walked: such packets go to the kernel.
    if ip.next_hdr != IPPROTO_TCP && ip.next_hdr != IPPROTO_UDP {
        return Parsed::NotForUs;
    }
    let mut flow = FlowKey { src: ip.saddr, dst: ip.daddr, proto: ip.next_hdr, family: AF_INET6, ..FlowKey::default() };
    let tos = (first >> 20) as u8;
    let Some(syn) = parse_ports(ctx, ETH_HLEN + 40, &mut flow, payload_len) else {
        return Parsed::Malformed;
    };
    let udp_payload = ETH_HLEN + 40 + UDP_HLEN;
    Parsed::Flow(Packet { flow, ip_len: payload_len + 40, tos, syn, dont_fragment: true, udp_payload })
}

/// Reads the ports into `flow` and tells whether it is a TCP SYN. `None`
/// when the L4 header is shorter than its minimum (TCP 20 bytes, RFC 9293;
/// UDP 8 bytes, RFC 768), in the packet or in what the IP length claims.
#[inline(always)]
fn parse_ports(ctx: &XdpContext, offset: usize, flow: &mut FlowKey, l4_len: u32) -> Option<bool> {
    let ports = ptr_at::<Ports>(ctx, offset)?;
    let mut syn = false;
    if flow.proto == IPPROTO_TCP {
        let tcp = ptr_at::<[u8; 20]>(ctx, offset)?;
        if l4_len < 20 {
            return None;
        }
        let flags = unsafe { (*tcp)[13] };
        syn = flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    } else {
        ptr_at::<[u8; 8]>(ctx, offset)?;
        if l4_len < 8 {
            return None;
        }
    }
    unsafe {
        flow.src_port = (*ports).src;
        flow.dst_port = (*ports).dst;
    }
    Some(syn)
}
