//! VLAN tags: one 802.1Q tag, or two (802.1ad QinQ: a service tag, then a
//! customer tag). A tagged frame's tags come off before the program parses
//! it and go back on whatever it sends out or up, so everything in between
//! sees untagged Ethernet. An untagged frame pays one load and two
//! compares.
//!
//! ```text
//! untagged: dst(6) src(6) type(2) ...
//! 802.1Q:   dst(6) src(6) 0x8100 TCI(2) type(2) ...
//! QinQ:     dst(6) src(6) 0x88a8 TCI(2) 0x8100 TCI(2) type(2) ...
//! ```

use aya_ebpf::{helpers::bpf_xdp_adjust_head, programs::XdpContext};

use crate::headers::{ptr_at, EthHdr};

const ETH_P_8021Q: u16 = 0x8100u16.to_be();
const ETH_P_8021AD: u16 = 0x88a8u16.to_be();
/// Where the first tag starts: after the two MAC addresses.
const MACS_LEN: usize = 12;
const TAG_LEN: usize = 4;

/// The tags a frame arrived with, each as its 4 octets (TPID, TCI) in
/// wire order: the outer one in the low half, the inner one (QinQ) in the
/// high half; 0 for an untagged frame. (One word: the balancer's stack is
/// nearly full.)
pub type Tags = u64;

#[inline(always)]
fn is_tag(proto: u16) -> bool {
    proto == ETH_P_8021Q || proto == ETH_P_8021AD
}

/// Takes the frame's tags off: the MAC addresses move forward over them.
/// `Err`: a tag cut short, or a third tag (not ours to parse); the frame
/// is then unchanged.
#[inline(always)]
pub fn pop(ctx: &XdpContext) -> Result<Tags, ()> {
    let eth = ptr_at::<EthHdr>(ctx, 0).ok_or(())?;
    if !is_tag(unsafe { (*eth).proto }) {
        return Ok(0);
    }
    let macs = unsafe { *ptr_at::<[u32; 3]>(ctx, 0).ok_or(())? };
    // The first tag, and the four octets after it: a second tag, or the
    // EtherType (a little-endian load: its first two octets are the low half).
    let [outer, next] = unsafe { *ptr_at::<[u32; 2]>(ctx, MACS_LEN).ok_or(())? };
    let (tags, len) = if is_tag(next as u16) {
        if is_tag(unsafe { *ptr_at::<u16>(ctx, MACS_LEN + 2 * TAG_LEN).ok_or(())? }) {
            return Err(());
        }
        unsafe { *ptr_at::<[u32; 3]>(ctx, 2 * TAG_LEN).ok_or(())? = macs };
        (outer as u64 | (next as u64) << 32, 2 * TAG_LEN)
    } else {
        unsafe { *ptr_at::<[u32; 3]>(ctx, TAG_LEN).ok_or(())? = macs };
        (outer as u64, TAG_LEN)
    };
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, len as i32) } != 0 {
        // Put the frame back as it came (the moved addresses covered the tags).
        unsafe { *ptr_at::<[u32; 3]>(ctx, 0).ok_or(())? = macs };
        unsafe { *ptr_at::<[u32; 2]>(ctx, MACS_LEN).ok_or(())? = [outer, next] };
        return Err(());
    }
    Ok(tags)
}

/// Puts `tags` back on the frame (in front of its EtherType, whatever the
/// program made of it). `Err` only if the kernel refused the room.
#[inline(always)]
pub fn push(ctx: &XdpContext, tags: Tags) -> Result<(), ()> {
    let inner = (tags >> 32) as u32;
    let len = if inner != 0 { 2 * TAG_LEN } else { TAG_LEN };
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(len as i32)) } != 0 {
        return Err(());
    }
    if inner != 0 {
        let macs = unsafe { *ptr_at::<[u32; 3]>(ctx, 2 * TAG_LEN).ok_or(())? };
        unsafe { *ptr_at::<[u32; 3]>(ctx, 0).ok_or(())? = macs };
        unsafe { *ptr_at::<u32>(ctx, MACS_LEN + TAG_LEN).ok_or(())? = inner };
    } else {
        let macs = unsafe { *ptr_at::<[u32; 3]>(ctx, TAG_LEN).ok_or(())? };
        unsafe { *ptr_at::<[u32; 3]>(ctx, 0).ok_or(())? = macs };
    }
    unsafe { *ptr_at::<u32>(ctx, MACS_LEN).ok_or(())? = tags as u32 };
    Ok(())
}

/// The VLAN ID of the innermost tag (the one next to the IP header, which
/// names the subnet). (The decap program keeps tags as they came.)
#[allow(dead_code)]
#[inline(always)]
pub fn innermost_vid(tags: Tags) -> u16 {
    let tag = if tags >> 32 != 0 { (tags >> 32) as u32 } else { tags as u32 };
    // Octets TPID hi, TPID lo, TCI hi, TCI lo, loaded little-endian.
    let tci = u16::from_be((tag >> 16) as u16);
    tci & 0x0fff
}

/// `tags` with the innermost tag's VLAN ID replaced by `vid` (its
/// priority and DEI bits kept).
#[allow(dead_code)]
#[inline(always)]
pub fn with_innermost_vid(tags: Tags, vid: u16) -> Tags {
    let shift = if tags >> 32 != 0 { 32 } else { 0 };
    let tag = (tags >> shift) as u32;
    let tci = u16::from_be((tag >> 16) as u16);
    let tci = (tci & 0xf000) | (vid & 0x0fff);
    let tag = (tag & 0xffff) | (tci.to_be() as u32) << 16;
    (tags & !(0xffff_ffffu64 << shift)) | (tag as u64) << shift
}
