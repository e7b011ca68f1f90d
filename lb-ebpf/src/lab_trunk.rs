//! A lab component, not part of the product: the two ends of the lab's
//! VLAN trunk (the router's link to lb2, and lb2's) tag and untag with
//! this pair of tc programs, because the lab's kernel has no 802.1Q
//! devices. Egress tags every frame the kernel sends with the trunk's VLAN;
//! ingress takes the tag off what the kernel receives (after XDP, which
//! sees frames tagged as they came). Both return "next" (TC_ACT_UNSPEC), so
//! other tc programs on the interface (the data-path checks') still run.
#![no_std]
#![no_main]

mod object;

use aya_ebpf::{
    bindings::TC_ACT_UNSPEC,
    helpers::{bpf_skb_vlan_pop, bpf_skb_vlan_push},
    macros::{classifier, map},
    maps::Array,
    programs::TcContext,
};

/// [0]: the trunk's VLAN ID.
#[map]
static TRUNK_VLAN: Array<u16> = Array::with_max_entries(1, 0);

const ETH_P_8021Q: u16 = 0x8100;

#[classifier]
pub fn trunk_tag(ctx: TcContext) -> i32 {
    if let Some(&vid) = TRUNK_VLAN.get(0) {
        unsafe { bpf_skb_vlan_push(ctx.skb.skb, ETH_P_8021Q.to_be(), vid) };
    }
    TC_ACT_UNSPEC
}

#[classifier]
pub fn trunk_untag(ctx: TcContext) -> i32 {
    unsafe { bpf_skb_vlan_pop(ctx.skb.skb) };
    TC_ACT_UNSPEC
}
