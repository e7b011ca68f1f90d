//! Data-path checks, the host side: the `lb-probe` tc egress program beside
//! the balancer, and one route per running data-path check. A check's
//! socket is marked `PROBE_MARK_BASE + id`; the program encapsulates its
//! packets as `PROBE_ROUTES[id]` says (see lb-ebpf/src/probe.rs).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use aya::{
    maps::{Array, MapData},
    programs::{
        links::LinkOrder,
        tc::{TcAttachOptions, TcAttachType},
        SchedClassifier,
    },
    Ebpf,
};
use lb_common::{map_names, ProbeRoute, MAX_PROBES, PROBE_MARK_BASE};

use crate::{
    addr,
    services::{Encap, Settings, VipAddr},
};

/// The egress program, attached for as long as this value lives (a tcx
/// link: it goes with the process, and a new controller attaches anew).
struct Attached {
    _ebpf: Ebpf,
    routes: Array<MapData, ProbeRoute>,
}

/// The running data-path checks and the ids their marks carry.
pub struct ProbePaths {
    attached: Result<Attached, String>,
    ids: BTreeMap<(VipAddr, IpAddr), u32>,
}

impl ProbePaths {
    /// Loads the egress program and attaches it to `iface`. A failure is
    /// kept, not returned: the balancer runs without it, and every
    /// data-path check then fails with this reason.
    pub fn attach(iface: &str) -> Self {
        let attached = attach(iface)
            .map_err(|e| format!("data-path checks cannot run: the probe program is not attached to {iface} ({e})"));
        Self { attached, ids: BTreeMap::new() }
    }

    /// The reason data-path checks cannot run, if they cannot.
    pub fn unavailable(&self) -> Option<&str> {
        self.attached.as_ref().err().map(String::as_str)
    }

    /// For `status`: ready, or why data-path checks cannot run.
    pub fn summary(&self) -> String {
        match &self.attached {
            Ok(_) => "ready (tc egress program attached)".to_string(),
            Err(why) => why.clone(),
        }
    }

    /// Routes the check of `backend` on `vip` (`route` makes its route
    /// from the id) and returns the mark its socket carries. A check keeps
    /// its id; ids of checks not `running` are freed first.
    pub fn open(
        &mut self,
        vip: &VipAddr,
        backend: IpAddr,
        running: impl Fn(&(VipAddr, IpAddr)) -> bool,
        route: impl Fn(u32) -> ProbeRoute,
    ) -> Result<u32, String> {
        let attached = self.attached.as_mut().map_err(|e| e.clone())?;
        let id = match self.ids.get(&(*vip, backend)) {
            Some(id) => *id,
            None => {
                // Ended checks leave their ids here; a new one frees them
                // (their routes then drop whatever a late packet carries).
                for (key, id) in std::mem::take(&mut self.ids) {
                    if running(&key) {
                        self.ids.insert(key, id);
                    } else {
                        let _ = attached.routes.set(id, ProbeRoute::default(), 0);
                    }
                }
                let used: BTreeSet<u32> = self.ids.values().copied().collect();
                (0..MAX_PROBES)
                    .find(|id| !used.contains(id))
                    .ok_or_else(|| format!("more than {MAX_PROBES} data-path checks on one LB host"))?
            }
        };
        attached.routes.set(id, route(id), 0).map_err(|e| format!("cannot write the check's route: {e}"))?;
        self.ids.insert((*vip, backend), id);
        Ok(PROBE_MARK_BASE + id)
    }
}

fn attach(iface: &str) -> Result<Attached, String> {
    let mut ebpf = Ebpf::load(crate::object::PROBE).map_err(|e| e.to_string())?;
    let program: &mut SchedClassifier = ebpf
        .program_mut("probe_encap")
        .ok_or("no probe_encap in the object")?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| e.to_string())?;
    program.load().map_err(|e| e.to_string())?;
    // First on egress: other programs there (VLAN tagging, say) see the
    // check's packet encapsulated, as they see the balancer's.
    let first = TcAttachOptions::TcxOrder(LinkOrder::first());
    program.attach_with_options(iface, TcAttachType::Egress, first).map_err(|e| e.to_string())?;
    let map = ebpf.take_map(map_names::PROBE_ROUTES).ok_or("no PROBE_ROUTES map")?;
    let routes = Array::try_from(map).map_err(|e| e.to_string())?;
    Ok(Attached { _ebpf: ebpf, routes })
}

/// The route a data-path check to `backend` takes: as the balancer sends
/// the VIP's packets (its encapsulation, the tier's outer source, the next
/// hop). The outer source's host bits, which carry flow-hash bits in data
/// packets, carry the check's id here.
pub fn route(settings: &Settings, encap: Encap, backend: IpAddr, id: u32) -> ProbeRoute {
    let source = match backend {
        IpAddr::V4(_) => {
            let (prefix, len) = settings.encap_src_v4;
            IpAddr::V4(Ipv4Addr::from(u32::from(prefix) | (id & addr::source_host_mask(len, 32))))
        }
        IpAddr::V6(_) => {
            let (prefix, len) = settings.encap_src_v6;
            IpAddr::V6(Ipv6Addr::from(u128::from(prefix) | (id & addr::source_host_mask(len, 128)) as u128))
        }
    };
    let (saddr, family) = addr::words(source);
    ProbeRoute {
        saddr,
        daddr: addr::words(backend).0,
        next_hop_mac: settings.next_hop_mac,
        gue_port: if encap == Encap::Gue { settings.gue_port.to_be() } else { 0 },
        family,
        _pad: [0; 3],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_carries_the_tier_source_with_the_id_in_its_host_bits() {
        let settings = Settings {
            next_hop_mac: [2, 0, 0, 0, 0, 1],
            encap_src_v4: ("198.51.100.0".parse().unwrap(), 30),
            encap_src_v6: ("2001:db8:a1::".parse().unwrap(), 126),
            mtu: 1500,
            debug: false,
            new_flow_limit: 0,
            gue_port: 6080,
            egress_mac: None,
        };
        let wire = |octets: &[u8]| -> Vec<u32> {
            octets.chunks(4).map(|c| u32::from_ne_bytes(c.try_into().unwrap())).collect()
        };
        // Id 5 in a /30: host bits 01 (5 & 3).
        let v4 = route(&settings, Encap::Gue, "198.51.100.34".parse().unwrap(), 5);
        assert_eq!(v4.saddr.to_vec(), [wire(&[198, 51, 100, 1]), vec![0, 0, 0]].concat());
        assert_eq!(v4.daddr[0], wire(&[198, 51, 100, 34])[0]);
        assert_eq!((v4.family, v4.gue_port, v4.next_hop_mac), (4, 6080u16.to_be(), [2, 0, 0, 0, 0, 1]));
        let v6 = route(&settings, Encap::Ipip, "2001:db8:b2::2".parse().unwrap(), 6);
        let mut source = [0u8; 16];
        source[..6].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0x00, 0xa1]);
        source[15] = 2; // 6 & 3
        assert_eq!(v6.saddr.to_vec(), wire(&source));
        assert_eq!((v6.family, v6.gue_port), (6, 0), "IP-in-IP: no GUE port");
    }
}
