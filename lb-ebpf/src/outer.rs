//! The outer headers of an encapsulated packet, as values: the balancer's
//! data and the data-path checks' packets (`probe.rs`) carry the same ones.

use crate::headers::{ipv4_checksum, Ipv4Hdr, Ipv6Hdr, UdpHdr};

/// Outer hop limit / TTL.
const OUTER_TTL: u8 = 64;
/// IPv4 Don't Fragment (RFC 791), wire order: a fragmented outer packet could
/// not be reassembled by the backends' XDP decap, so it must not happen.
const IPV4_DF: u16 = 0x4000u16.to_be();

/// IPv4 outer header (RFC 2003) over `payload_len` bytes, checksum filled.
#[inline(always)]
pub fn ipv4(tos: u8, payload_len: u32, proto: u8, saddr: u32, daddr: u32) -> Ipv4Hdr {
    let mut hdr = Ipv4Hdr {
        ver_ihl: 0x45,
        tos,
        tot_len: ((payload_len + 20) as u16).to_be(),
        id: 0,
        frag_off: IPV4_DF,
        ttl: OUTER_TTL,
        proto,
        check: 0,
        saddr,
        daddr,
    };
    hdr.check = ipv4_checksum(&hdr);
    hdr
}

/// IPv6 outer header (RFC 2473). The flow label carries the flow hash so
/// that routers on the way to the backend can spread flows (RFC 6438).
#[inline(always)]
pub fn ipv6(tos: u8, hash: u32, payload_len: u32, next_hdr: u8, saddr: [u32; 4], daddr: [u32; 4]) -> Ipv6Hdr {
    let first = (6u32 << 28) | ((tos as u32) << 20) | (hash & 0x000f_ffff);
    Ipv6Hdr {
        ver_tc_flow: first.to_be(),
        payload_len: (payload_len as u16).to_be(),
        next_hdr,
        hop_limit: OUTER_TTL,
        saddr,
        daddr,
    }
}

/// The UDP header of a GUE packet of `len` bytes (UDP header included) to
/// `dst_port` (wire order). The source port comes from the flow hash, in the
/// ephemeral range (RFC 6335), so backends' NICs spread flows over their
/// queues (RFC 8086 section 3.2). Checksum 0: optional over IPv4 (RFC
/// 768), and allowed over IPv6 for tunnels whose payload carries its own
/// checksums (RFC 6935, 6936); see the README for the reasons.
#[inline(always)]
pub fn gue_udp(hash: u32, dst_port: u16, len: u32) -> UdpHdr {
    let src = 0xc000 | (hash & 0x3fff) as u16;
    UdpHdr { src: src.to_be(), dst: dst_port, len: (len as u16).to_be(), check: 0 }
}
