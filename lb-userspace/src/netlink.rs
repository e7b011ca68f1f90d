//! What the controller asks the kernel over rtnetlink: the default route's
//! gateway, the gateway's MAC (the next hop of every encapsulated packet),
//! an interface's addresses (the default outer source) and the XDP
//! programs attached to it (`lbctl status`).

use std::net::IpAddr;

use futures_util::TryStreamExt;
use netlink_packet_route::{
    address::AddressAttribute,
    link::{LinkAttribute, LinkXdp},
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState},
    route::{RouteAddress, RouteAttribute, RouteMessage},
    AddressFamily,
};
use rtnetlink::Handle;

pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens a netlink connection in the current network namespace.
    pub fn open() -> std::io::Result<Self> {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    /// The next hop towards the backends: the gateway of the main table's
    /// default route, or with two NICs of a route out of interface `via`
    /// (IPv4 first, then IPv6).
    pub async fn gateway(&self, via: Option<u32>) -> Result<Option<IpAddr>, rtnetlink::Error> {
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut request = RouteMessage::default();
            request.header.address_family = family;
            let mut routes = self.handle.route().get(request).execute();
            while let Some(route) = routes.try_next().await? {
                let wanted = match via {
                    Some(ifindex) => route.attributes.contains(&RouteAttribute::Oif(ifindex)),
                    None => route.header.destination_prefix_length == 0,
                };
                if route.header.table != 254 || !wanted {
                    continue;
                }
                for attr in &route.attributes {
                    match attr {
                        RouteAttribute::Gateway(RouteAddress::Inet(a)) => return Ok(Some(IpAddr::V4(*a))),
                        RouteAttribute::Gateway(RouteAddress::Inet6(a)) => return Ok(Some(IpAddr::V6(*a))),
                        _ => {}
                    }
                }
            }
        }
        Ok(None)
    }

    /// The MAC address of interface `ifindex`.
    pub async fn link_mac(&self, ifindex: u32) -> Result<Option<[u8; 6]>, rtnetlink::Error> {
        let mut links = self.handle.link().get().match_index(ifindex).execute();
        while let Some(link) = links.try_next().await? {
            for attr in &link.attributes {
                if let LinkAttribute::Address(mac) = attr {
                    return Ok(mac.as_slice().try_into().ok());
                }
            }
        }
        Ok(None)
    }

    /// The MAC of a neighbour, if the kernel has a usable entry for it.
    pub async fn neighbour_mac(&self, ip: IpAddr) -> Result<Option<[u8; 6]>, rtnetlink::Error> {
        let mut neighbours = self.handle.neighbours().get().execute();
        while let Some(n) = neighbours.try_next().await? {
            if matches!(n.header.state, NeighbourState::Failed | NeighbourState::Incomplete) {
                continue;
            }
            let mut dest = None;
            let mut mac = None;
            for attr in &n.attributes {
                match attr {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => dest = Some(IpAddr::V4(*a)),
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => dest = Some(IpAddr::V6(*a)),
                    NeighbourAttribute::LinkLayerAddress(l) if l.len() == 6 => mac = l.as_slice().try_into().ok(),
                    _ => {}
                }
            }
            if dest == Some(ip) && mac.is_some() {
                return Ok(mac);
            }
        }
        Ok(None)
    }

    /// Addresses (and prefix lengths) of the interface with this index.
    pub async fn addresses(&self, ifindex: u32) -> Result<Vec<(IpAddr, u8)>, rtnetlink::Error> {
        let mut found = Vec::new();
        let mut addrs = self.handle.address().get().set_link_index_filter(ifindex).execute();
        while let Some(a) = addrs.try_next().await? {
            for attr in &a.attributes {
                if let AddressAttribute::Address(ip) = attr {
                    found.push((*ip, a.header.prefix_len));
                }
            }
        }
        Ok(found)
    }

    /// The XDP programs attached to an interface: where each runs and its
    /// id, as the kernel reports them (what `ip link` shows as `xdp`,
    /// `xdpgeneric` and `xdpoffload`).
    pub async fn xdp_programs(&self, ifindex: u32) -> Result<Vec<(&'static str, u32)>, rtnetlink::Error> {
        let mut found = Vec::new();
        let mut links = self.handle.link().get().match_index(ifindex).execute();
        while let Some(link) = links.try_next().await? {
            for attr in &link.attributes {
                let LinkAttribute::Xdp(xdp) = attr else { continue };
                for x in xdp {
                    match x {
                        LinkXdp::HwProgId(id) => found.push(("NIC (offloaded, hardware mode)", *id)),
                        LinkXdp::DrvProgId(id) => found.push(("host (native mode)", *id)),
                        LinkXdp::SkbProgId(id) => found.push(("host (generic mode)", *id)),
                        _ => {}
                    }
                }
            }
        }
        Ok(found)
    }
}

/// Makes the kernel resolve `gateway` by sending one empty UDP datagram to
/// its discard port (RFC 863): the neighbour entry appears as a side effect.
pub fn nudge_resolution(gateway: IpAddr) {
    let bind: IpAddr = if gateway.is_ipv4() { [0, 0, 0, 0].into() } else { [0u16; 8].into() };
    if let Ok(socket) = std::net::UdpSocket::bind((bind, 0)) {
        let _ = socket.send_to(&[], (gateway, 9));
    }
}

pub fn if_index(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (index != 0).then_some(index)
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

pub fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = text.split(':').collect();
    let bytes: Vec<u8> = parts.iter().filter_map(|p| u8::from_str_radix(p, 16).ok().filter(|_| p.len() == 2)).collect();
    bytes.try_into().map_err(|_| format!("'{text}' is not a MAC address like 02:00:00:00:00:01"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_round_trip_and_bad_ones_are_refused() {
        let mac = parse_mac("02:0a:ff:00:00:01").unwrap();
        assert_eq!(mac, [2, 10, 255, 0, 0, 1]);
        assert_eq!(format_mac(&mac), "02:0a:ff:00:00:01");
        for bad in ["02:00:00:00:00", "02:00:00:00:00:01:02", "2:00:00:00:00:01", "zz:00:00:00:00:01"] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
    }
}
