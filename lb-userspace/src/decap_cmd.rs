//! `lbctl decap up|down IFACE` on a backend host: attach the decap program
//! with the addresses it strips for, pinned so it stays after lbctl exits.

use std::{net::IpAddr, path::Path};

use anyhow::{bail, Context, Result};
use aya::programs::links::PinnedLink;

use crate::{
    dataplane::Decap,
    netlink::{self, Netlink},
    up::{attach_pinned, ensure_bpffs, remove_pins, ModeChoice},
};

/// Attaches (or atomically replaces) the decap program on `iface`.
/// Without `addresses`, the interface's own addresses are used.
pub async fn up(iface: &str, addresses: &[IpAddr], mode: ModeChoice, pin_root: &Path) -> Result<Vec<IpAddr>> {
    let ifindex =
        netlink::if_index(iface).with_context(|| format!("no interface '{iface}' in this network namespace"))?;
    ensure_bpffs(pin_root)?;
    let mut addrs = addresses.to_vec();
    if addrs.is_empty() {
        let nl = Netlink::open()?;
        addrs = nl.addresses(ifindex).await?.into_iter().map(|(a, _)| a).collect();
        addrs.retain(|a| !matches!(a, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80));
    }
    if addrs.is_empty() {
        bail!("{iface} has no address to decapsulate for: give --address");
    }
    let mut decap = Decap::load()?;
    for a in &addrs {
        decap.add_address(*a)?;
    }
    let dir = pin_root.join(iface);
    std::fs::create_dir_all(&dir)?;
    if let Err(e) = attach_pinned(decap.program(), iface, mode, &dir.join("link")) {
        remove_pins(&dir);
        return Err(e);
    }
    Ok(addrs)
}

/// Detaches the decap program from `iface`.
pub fn down(iface: &str, pin_root: &Path) -> Result<()> {
    let dir = pin_root.join(iface);
    let link_pin = dir.join("link");
    if !link_pin.exists() {
        bail!("no decap program of lbctl on {iface} (nothing pinned at {})", link_pin.display());
    }
    let link = PinnedLink::from_pin(&link_pin).context("opening the pinned decap link")?;
    // Unpinned and dropped: the kernel detaches it.
    drop(link.unpin()?);
    remove_pins(&dir);
    Ok(())
}
