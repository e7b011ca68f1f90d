//! `lbctl decap up|down|status IFACE` on a backend host: attach the decap
//! program with the addresses it strips for (and the GUE port), pinned so
//! it stays after lbctl exits; read its counters.

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
pub async fn up(
    iface: &str,
    addresses: &[IpAddr],
    gue_port: u16,
    mode: ModeChoice,
    pin_root: &Path,
) -> Result<Vec<IpAddr>> {
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
    decap.set_gue_port(gue_port)?;
    let dir = pin_root.join(iface);
    std::fs::create_dir_all(&dir)?;
    let attached = decap
        .pin_stats(&dir.join(STATS_PIN))
        .map_err(anyhow::Error::from)
        .and_then(|()| attach_pinned(decap.program(), iface, mode, &dir.join("link")));
    if let Err(e) = attached {
        remove_pins(&dir);
        return Err(e);
    }
    Ok(addrs)
}

/// Where the counters of the decap program on an interface are pinned.
const STATS_PIN: &str = "stats";

/// The counters of the decap program on `iface`, by name.
pub fn status(iface: &str, pin_root: &Path) -> Result<Vec<(&'static str, u64)>> {
    let pin = pin_root.join(iface).join(STATS_PIN);
    if !pin.exists() {
        bail!("no decap program of lbctl on {iface} (nothing pinned at {})", pin.display());
    }
    let counters = Decap::pinned_stats(&pin).with_context(|| format!("reading {}", pin.display()))?;
    Ok(lb_common::decap_stat::NAMES.into_iter().zip(counters).collect())
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
