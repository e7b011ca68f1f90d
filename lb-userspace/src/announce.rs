//! Route handoff to a routing daemon: one host route (/32, /128) per VIP
//! address that can serve, in a kernel routing table of the operator's
//! choice, marked with a protocol number of its own ([`ROUTE_PROTOCOL`]).
//! A routing daemon (BIRD's `kernel` protocol with `learn`, FRR's
//! `import-table`) imports that table and announces what it holds over BGP.
//! The LB never speaks BGP itself.
//!
//! Only routes of that table with that protocol are read or changed:
//! whatever else the table holds is never touched.

use std::{collections::BTreeSet, net::IpAddr};

use futures_util::TryStreamExt;
use netlink_packet_route::{
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType},
    AddressFamily,
};
use rtnetlink::{Handle, RouteMessageBuilder};

/// The `proto` of every route the controller writes (`ip route show table
/// N proto 252`; /etc/iproute2/rt_protos.d/lbctl.conf names it `lbctl`).
pub const ROUTE_PROTOCOL: u8 = 252;

#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    #[error("netlink: {0}")]
    Netlink(#[from] rtnetlink::Error),
    #[error("cannot open a netlink socket: {0}")]
    Open(std::io::Error),
    #[error("there is no loopback interface to route VIPs to")]
    NoLoopback,
}

/// The routes of one table.
pub struct RouteTable {
    handle: Handle,
    table: u32,
    loopback: u32,
}

impl RouteTable {
    pub fn open(table: u32) -> Result<Self, AnnounceError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(AnnounceError::Open)?;
        tokio::spawn(connection);
        let loopback = crate::netlink::if_index("lo").ok_or(AnnounceError::NoLoopback)?;
        Ok(Self { handle, table, loopback })
    }

    pub fn table(&self) -> u32 {
        self.table
    }

    /// The host routes this controller wrote (by table and protocol).
    pub async fn ours(&self) -> Result<BTreeSet<IpAddr>, AnnounceError> {
        let mut found = BTreeSet::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut request = RouteMessage::default();
            request.header.address_family = family;
            let mut routes = self.handle.route().get(request).execute();
            while let Some(route) = routes.try_next().await? {
                if route_table(&route) != self.table || route.header.protocol != RouteProtocol::Other(ROUTE_PROTOCOL) {
                    continue;
                }
                let full = if family == AddressFamily::Inet { 32 } else { 128 };
                if route.header.destination_prefix_length != full {
                    continue;
                }
                for attr in &route.attributes {
                    match attr {
                        RouteAttribute::Destination(RouteAddress::Inet(a)) => found.insert(IpAddr::V4(*a)),
                        RouteAttribute::Destination(RouteAddress::Inet6(a)) => found.insert(IpAddr::V6(*a)),
                        _ => false,
                    };
                }
            }
        }
        Ok(found)
    }

    /// Makes the table hold exactly `want` among this controller's routes.
    /// Returns what was added and what was removed.
    pub async fn sync(&self, want: &BTreeSet<IpAddr>) -> Result<(Vec<IpAddr>, Vec<IpAddr>), AnnounceError> {
        let have = self.ours().await?;
        let added: Vec<IpAddr> = want.difference(&have).copied().collect();
        let removed: Vec<IpAddr> = have.difference(want).copied().collect();
        for addr in &removed {
            self.handle.route().del(self.message(*addr)).execute().await?;
        }
        for addr in &added {
            self.handle.route().add(self.message(*addr)).replace().execute().await?;
        }
        Ok((added, removed))
    }

    /// `ADDR/32 dev lo table N proto 252 scope link`.
    fn message(&self, addr: IpAddr) -> RouteMessage {
        let full = if addr.is_ipv4() { 32 } else { 128 };
        RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(addr, full)
            .expect("a host prefix of the address's own family")
            .output_interface(self.loopback)
            .table_id(self.table)
            .protocol(RouteProtocol::Other(ROUTE_PROTOCOL))
            .scope(RouteScope::Link)
            .kind(RouteType::Unicast)
            .build()
    }
}

/// A route's table: the attribute when present (tables above 255), else the header.
fn route_table(route: &RouteMessage) -> u32 {
    route
        .attributes
        .iter()
        .find_map(|a| if let RouteAttribute::Table(t) = a { Some(*t) } else { None })
        .unwrap_or(route.header.table as u32)
}

/// What is announced and why: the controller's side of the handoff.
#[derive(Clone, Debug, Default)]
pub struct AnnounceState {
    /// `lbctl announce withdraw`: out of ECMP while still forwarding.
    pub maintenance: bool,
    /// The controller is stopping: everything is withdrawn.
    pub stopping: bool,
    /// The addresses the table holds, as of the last sync.
    pub announced: BTreeSet<IpAddr>,
    /// The last sync's error, if it failed (retried every second).
    pub error: Option<String>,
}

pub struct Announcer {
    routes: RouteTable,
    changed: tokio::sync::Notify,
    state: std::sync::Mutex<AnnounceState>,
}

impl Announcer {
    pub fn new(routes: RouteTable, maintenance: bool) -> Self {
        let state = AnnounceState { maintenance, ..AnnounceState::default() };
        Self { routes, changed: tokio::sync::Notify::new(), state: std::sync::Mutex::new(state) }
    }

    pub fn table(&self) -> u32 {
        self.routes.table()
    }

    pub fn state(&self) -> AnnounceState {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AnnounceState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Something that decides what serves has changed: sync soon.
    pub fn changed(&self) {
        self.changed.notify_one();
    }

    pub fn set_maintenance(&self, on: bool) {
        self.lock().maintenance = on;
        self.changed();
    }

    /// Keeps the table equal to `serving()` (nothing in maintenance or
    /// while stopping): at once after each change, and every second, so
    /// that a route someone else removed comes back.
    pub async fn run(&self, serving: impl Fn() -> BTreeSet<IpAddr>) {
        loop {
            self.sync(&serving()).await;
            tokio::select! {
                _ = self.changed.notified() => {}
                _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            }
        }
    }

    /// Withdraws every route for good (the controller is stopping);
    /// returns how many there were.
    pub async fn withdraw_all(&self) -> usize {
        self.lock().stopping = true;
        let before = self.lock().announced.len();
        self.sync(&BTreeSet::new()).await;
        before
    }

    async fn sync(&self, serving: &BTreeSet<IpAddr>) {
        let want = {
            let st = self.lock();
            if st.maintenance || st.stopping {
                BTreeSet::new()
            } else {
                serving.clone()
            }
        };
        match self.routes.sync(&want).await {
            Ok((added, removed)) => {
                for addr in added {
                    tracing::info!(address = %addr, table = self.table(), "route announced");
                }
                for addr in removed {
                    tracing::info!(address = %addr, table = self.table(), "route withdrawn");
                }
                let mut st = self.lock();
                st.announced = want;
                st.error = None;
            }
            Err(e) => {
                let text = e.to_string();
                let mut st = self.lock();
                if st.error.as_ref() != Some(&text) {
                    tracing::warn!(table = self.table(), error = %text, "cannot update the announce table; retrying");
                }
                st.error = Some(text);
            }
        }
    }
}
