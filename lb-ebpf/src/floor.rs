//! Floors for the benchmarks: the least an XDP program can do on each path,
//! measured in the same run as the balancer so that numbers from these noisy
//! machines can be read as ratios; and the per-core benchmark's sink.
#![no_std]
#![no_main]

#[allow(dead_code)] // the floors use only the Ethernet header
mod headers;
mod object;

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    helpers::bpf_xdp_adjust_head,
    macros::{map, xdp},
    maps::DevMap,
    programs::XdpContext,
};

/// The interface `floor_redirect` sends to.
#[map]
static FLOOR_EGRESS: DevMap = DevMap::with_max_entries(1, 0);

use headers::{ptr_at, EthHdr};

/// Returns XDP_PASS: the cost of running any XDP program at all.
#[xdp]
pub fn floor_pass(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

/// Drops the frame: the far end of the per-core benchmark's veth, so what
/// the program under test transmits is received and thrown away at once.
#[xdp]
pub fn floor_drop(_ctx: XdpContext) -> u32 {
    XDP_DROP
}

/// Swaps the MACs and bounces the frame: the least a forwarder does.
#[xdp]
pub fn floor_tx(ctx: XdpContext) -> u32 {
    swap_macs(&ctx);
    XDP_TX
}

/// floor_tx plus the bench build's grow-and-restore of the headroom: what
/// the balancer's bench build adds to every forwarded packet.
#[xdp]
pub fn floor_restore(ctx: XdpContext) -> u32 {
    if !grow_restore_and_swap(&ctx) {
        return XDP_PASS;
    }
    XDP_TX
}

/// floor_restore, out of another interface (XDP_REDIRECT through a
/// devmap): the least the balancer does with two NICs.
#[xdp]
pub fn floor_redirect(ctx: XdpContext) -> u32 {
    if !grow_restore_and_swap(&ctx) {
        return XDP_PASS;
    }
    FLOOR_EGRESS.redirect(0, XDP_DROP as u64).unwrap_or(XDP_DROP)
}

#[inline(always)]
fn grow_restore_and_swap(ctx: &XdpContext) -> bool {
    unsafe {
        if bpf_xdp_adjust_head(ctx.ctx, -20) != 0 || bpf_xdp_adjust_head(ctx.ctx, 20) != 0 {
            return false;
        }
    }
    swap_macs(ctx);
    true
}

#[inline(always)]
fn swap_macs(ctx: &XdpContext) {
    if let Some(eth) = ptr_at::<EthHdr>(ctx, 0) {
        unsafe {
            let dst = (*eth).dst;
            (*eth).dst = (*eth).src;
            (*eth).src = dst;
        }
    }
}
