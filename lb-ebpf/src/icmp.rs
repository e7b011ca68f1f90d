//! Echo replies from VIP addresses (RFC 792 type 8 -> 0, RFC 4443 type
//! 128 -> 129), built in place: swap the MACs and the addresses, reset the
//! TTL, change the type, fix the checksums incrementally (RFC 1624).

use aya_ebpf::programs::XdpContext;
use lb_common::{AF_INET6, ETH_HLEN};

use crate::{
    headers::{ptr_at, EthHdr, Ipv4Hdr, Ipv6Hdr},
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
