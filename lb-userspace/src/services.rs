//! The VIP and backend model, and how it becomes map contents. Every change
//! is validated in full before any map is touched; a change whose map write
//! fails leaves the model as it was.
//!
//! Order of writes matters for packets in flight: a backend's entry is
//! written before any ring names it, a new ring is written to the VIP's idle
//! half before one VIP-map update makes it live, and a removed backend's
//! entry is cleared only after the ring no longer names it.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use lb_common::{
    flow_hash,
    quic::{server_id_word, QuicServer, QuicServerKey},
    source_hash, Backend, Config, FlowKey, VipKey, VipMeta, ALTERNATE_RINGS, CONFIG_F_PORT0_V4, CONFIG_F_PORT0_V6,
    CONFIG_F_REDIRECT, FILTER_STATELESS, FILTER_VIP, HISTORY_RINGS, IPPROTO_TCP, IPPROTO_UDP, MAX_BACKENDS, MAX_VIPS,
    RESERVED_RINGS_PER_VIP, RINGS_PER_VIP, VIP_F_HASH_SRC_ONLY,
};

use serde::{Deserialize, Serialize};

use crate::{
    addr,
    dataplane::{Dataplane, DataplaneError},
    maglev::{self, RingMember},
    quic::{QuicSpec, ServerId},
    rings::{Extent, RingSpace},
};

/// Largest ring a VIP may ask for (a prime just under 2^20).
pub const MAX_RING_SIZE: u32 = 1_048_573;
/// Largest backend weight.
pub const MAX_WEIGHT: u32 = 10_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => IPPROTO_TCP,
            Proto::Udp => IPPROTO_UDP,
        }
    }
}

/// What the flow hash of a VIP covers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HashMode {
    /// Source and destination address and port, and protocol.
    #[default]
    FiveTuple,
    /// The source address only: every flow of a client to one backend.
    SourceIp,
}

impl fmt::Display for HashMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HashMode::FiveTuple => "5tuple",
            HashMode::SourceIp => "src-ip",
        })
    }
}

/// What identifies a VIP: address, port (0: every port) and protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct VipAddr {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: Proto,
}

impl VipAddr {
    pub fn key(&self) -> VipKey {
        let (addr, family) = addr::words(self.addr);
        VipKey { addr, port: lb_common::port_raw(self.port), proto: self.proto.number(), family }
    }
}

impl fmt::Display for VipAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = match self.proto {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        };
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}:{}/{proto}", self.port),
            IpAddr::V6(a) => write!(f, "[{a}]:{}/{proto}", self.port),
        }
    }
}

impl std::str::FromStr for VipAddr {
    type Err = String;

    /// `ADDR:PORT/PROTO`, IPv6 in brackets: `203.0.113.10:80/tcp`,
    /// `[2001:db8::10]:443/tcp`, `203.0.113.10:0/udp` (every port).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (sock, proto) = s
            .rsplit_once('/')
            .ok_or_else(|| format!("VIP '{s}' has no protocol: write ADDR:PORT/tcp or ADDR:PORT/udp"))?;
        let proto = match proto.to_ascii_lowercase().as_str() {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            other => return Err(format!("VIP '{s}': protocol '{other}' is not tcp or udp")),
        };
        let sock: std::net::SocketAddr = sock
            .parse()
            .map_err(|_| format!("VIP '{s}': '{sock}' is not ADDR:PORT (IPv6 is written [2001:db8::10]:80)"))?;
        Ok(VipAddr { addr: sock.ip(), port: sock.port(), proto })
    }
}

/// How a VIP's packets travel to its backends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Encap {
    /// IP-in-IP (RFC 2003, RFC 2473).
    #[default]
    Ipip,
    /// GUE in UDP, with the alternate hop for the second chance.
    Gue,
}

impl fmt::Display for Encap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Encap::Ipip => "ipip",
            Encap::Gue => "gue",
        })
    }
}

impl std::str::FromStr for Encap {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "" | "ipip" => Ok(Encap::Ipip),
            "gue" => Ok(Encap::Gue),
            other => Err(format!("encap '{other}' is not ipip or gue")),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipSpec {
    pub vip: VipAddr,
    pub hash: HashMode,
    /// Maglev ring size: a prime, at most [`MAX_RING_SIZE`].
    pub ring_size: u32,
    #[serde(default)]
    pub encap: Encap,
    /// Never read or write the conn table: every packet follows the ring.
    #[serde(default)]
    pub stateless: bool,
    /// QUIC-aware (UDP only): connection IDs name the backend (QUIC-LB).
    #[serde(default)]
    pub quic: Option<QuicSpec>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    pub addr: IpAddr,
    /// 0 keeps existing flows but takes no new ones, like drain.
    pub weight: u32,
    /// A QUIC VIP's server ID for it, by hand (else from its address).
    pub server_id: Option<ServerId>,
}

/// Host-wide data-plane settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    pub next_hop_mac: [u8; 6],
    /// Outer IPv4 source prefix; the host bits carry flow-hash bits.
    pub encap_src_v4: (Ipv4Addr, u8),
    /// Outer IPv6 source prefix; up to the last 32 host bits carry hash bits.
    pub encap_src_v6: (Ipv6Addr, u8),
    /// Largest outer packet (from the IP header on) towards backends.
    pub mtu: u32,
    /// Log every packet decision through aya-log (`lbctl debug on`).
    #[serde(default)]
    pub debug: bool,
    /// SYN-flood guard: new flows per second per CPU remembered in the conn
    /// table; 0 = no limit.
    #[serde(default)]
    pub new_flow_limit: u32,
    /// UDP destination port of GUE packets.
    #[serde(default = "default_gue_port")]
    pub gue_port: u16,
    /// Two NICs: the backend-facing interface's MAC; encapsulated packets
    /// leave through it (the `EGRESS` devmap) with this source.
    #[serde(default)]
    pub egress_mac: Option<[u8; 6]>,
}

fn default_gue_port() -> u16 {
    lb_common::DEFAULT_GUE_PORT
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("VIP {0} already exists")]
    VipExists(VipAddr),
    #[error("no VIP {0}")]
    NoSuchVip(VipAddr),
    #[error("backend {1} already exists in VIP {0}")]
    BackendExists(VipAddr, IpAddr),
    #[error("no backend {1} in VIP {0}")]
    NoSuchBackend(VipAddr, IpAddr),
    #[error("ring size {0} is not a prime (Maglev needs one; 65537 is the default)")]
    RingSizeNotPrime(u32),
    #[error("ring size {0} is larger than the maximum {MAX_RING_SIZE}")]
    RingSizeTooLarge(u32),
    #[error("no room for a ring of {needed} slots (largest free run {free}); remove a VIP or load with a larger ring capacity")]
    RingSpaceFull { needed: u32, free: u32 },
    #[error(
        "the ring capacity takes {fit} of the {vips} VIPs to add (each needs {needed} slots: {RESERVED_RINGS_PER_VIP} rings); \
         nothing was changed: start lbctl up with a larger --ring-capacity"
    )]
    RingSpaceWanting { fit: usize, vips: usize, needed: u32 },
    #[error("all {MAX_VIPS} VIP slots are in use")]
    TooManyVips,
    #[error("all {MAX_BACKENDS} backend slots are in use")]
    TooManyBackends,
    #[error("weight {0} is out of range 0..={MAX_WEIGHT}")]
    WeightOutOfRange(u32),
    #[error("backend {backend} is IPv4 but VIP {vip} is IPv6: IPv6 cannot be carried in an IPv4 outer header here")]
    FamilyMismatch { vip: VipAddr, backend: IpAddr },
    #[error("prefix length {0} is too long for its address family")]
    BadPrefix(u8),
    #[error("VIP {0}: {1}")]
    BadQuic(VipAddr, String),
    #[error("VIP {0} is not QUIC: a backend there has no server ID")]
    ServerIdWithoutQuic(VipAddr),
    #[error("server ID {id} of backend {backend} is taken by {holder} in VIP {vip}: give one by hand (--server-id)")]
    ServerIdTaken { vip: VipAddr, backend: IpAddr, id: String, holder: IpAddr },
    #[error("server ID {id:#x} of backend {backend} does not fit VIP {vip}'s {len}-octet server IDs")]
    ServerIdTooLong { vip: VipAddr, backend: IpAddr, id: u64, len: u8 },
    #[error("ring history of VIP {0}: {1}")]
    History(VipAddr, String),
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
}

/// A backend as the model keeps it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendState {
    pub id: u32,
    pub cookie: u32,
    pub weight: u32,
    pub drained: bool,
    /// As health checks last said (true when unchecked).
    pub healthy: bool,
    /// Its server ID, in a QUIC VIP.
    #[serde(default)]
    pub server_id: Option<ServerId>,
}

impl BackendState {
    /// The operator's say: weight above 0 and not drained.
    fn wanted(&self) -> bool {
        self.weight > 0 && !self.drained
    }
}

/// One declared generation of a VIP: the backends the operator wanted
/// (weight above 0, not drained) with their weights, after a change set
/// (one API call, one `apply`, one config reload). Health is not part of
/// it, so every LB host given the same declared changes has the same
/// generations, whatever its checks saw and whenever it started.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generation {
    /// Address -> weight.
    pub members: BTreeMap<IpAddr, u32>,
    /// [`ring_fingerprint`] of its ring.
    pub fingerprint: u64,
    /// Unix seconds when it became the declared state on this host.
    pub since: u64,
    /// Where its ring starts in the ring array; `None` when the ring array
    /// had no room to keep it (GUE packets take no alternate from it).
    slot: Option<u32>,
    /// Its ring (not saved: rebuilt from `members`).
    #[serde(skip)]
    ring: Ring,
}

impl Generation {
    /// A generation as another host exported it, to import.
    pub fn declared(members: BTreeMap<IpAddr, u32>, since: u64, fingerprint: u64) -> Self {
        Self { members, fingerprint, since, slot: None, ring: Ring::default() }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VipState {
    pub spec: VipSpec,
    pub id: u32,
    /// Where the ring slots this VIP owns start in the ring array (absent
    /// from older state files, which are replayed, not adopted): at least
    /// two (see [`RESERVED_RINGS_PER_VIP`]), at most [`RINGS_PER_VIP`].
    #[serde(default)]
    slots: Vec<u32>,
    /// Which of them holds the live ring.
    live_slot: u32,
    /// The declared generations, newest first, at most [`HISTORY_RINGS`]:
    /// where GUE packets take their alternate hops from.
    #[serde(default)]
    history: Vec<Generation>,
    /// The live ring before the last swap, when health or a declared change
    /// replaced it: GUE packets name its backends last. This host's own
    /// (health is not declared), so it is not exported.
    #[serde(default)]
    prev_live: Option<Generation>,
    /// The live ring has lasted beyond a change set (or came from a health
    /// change): when it is replaced it becomes `prev_live`. Rings that only
    /// lived inside one `apply` do not (they served for microseconds).
    #[serde(skip, default = "settled")]
    live_settled: bool,
    /// Removed backends an alternate ring may still name: kept in the
    /// backends map, marked retired, until no ring does.
    #[serde(default)]
    retired: BTreeMap<u32, IpAddr>,
    /// The live ring (empty when no backend takes new flows). Not saved:
    /// it is rebuilt from the backends, deterministically.
    #[serde(skip)]
    ring: Ring,
    /// Every wanted backend is unhealthy, so all of them serve (fail open).
    pub fail_open: bool,
    /// [`ring_fingerprint`] of the live ring (0 without one).
    #[serde(default)]
    pub fingerprint: u64,
    pub backends: BTreeMap<IpAddr, BackendState>,
}

fn settled() -> bool {
    true
}

impl VipState {
    /// Ring-array slots one of this VIP's rings takes.
    fn stride(&self) -> u32 {
        lb_common::ring_stride(self.spec.ring_size)
    }

    /// The slots of the rings GUE alternates come from: the history,
    /// newest first, then the previous live ring; a ring in the live ring's
    /// slot, one already listed or one not kept is left out (it would name
    /// nothing new, and each costs packets a read).
    fn alt_rings(&self, live: u32, history: &[Generation], prev_live: Option<&Generation>) -> Vec<u32> {
        let mut slots: Vec<u32> = Vec::new();
        for slot in history.iter().chain(prev_live).filter_map(|g| g.slot) {
            if slot != live && !slots.contains(&slot) {
                slots.push(slot);
            }
        }
        slots
    }

    fn meta(&self, live: u32, history: &[Generation], prev_live: Option<&Generation>, ring_size: u32) -> VipMeta {
        let mut flags = match self.spec.hash {
            HashMode::FiveTuple => 0,
            HashMode::SourceIp => VIP_F_HASH_SRC_ONLY,
        };
        if self.spec.encap == Encap::Gue {
            flags |= lb_common::VIP_F_GUE;
        }
        if self.spec.stateless {
            flags |= lb_common::VIP_F_STATELESS;
        }
        if self.spec.quic.is_some() {
            flags |= lb_common::VIP_F_QUIC;
        }
        let alt_rings = self.alt_rings(live, history, prev_live);
        let mut offsets = [0; ALTERNATE_RINGS];
        offsets[..alt_rings.len()].copy_from_slice(&alt_rings);
        VipMeta {
            vip_id: self.id,
            flags,
            ring_offset: live,
            ring_size,
            alt_rings_len: alt_rings.len() as u32,
            alt_rings: offsets,
            quic: self.spec.quic.map(|q| q.entry()).unwrap_or_default(),
        }
    }

    /// The alternate rings' slot offsets, as packets read them.
    pub fn alt_ring_offsets(&self) -> Vec<u32> {
        self.alt_rings(self.live_slot, &self.history, self.prev_live.as_ref())
    }

    pub fn history(&self) -> &[Generation] {
        &self.history
    }

    pub fn ring(&self) -> &[u16] {
        &self.ring
    }

    /// The VIP-map value packets see now.
    fn live_meta(&self) -> VipMeta {
        let ring_size = if self.ring.is_empty() { 0 } else { self.spec.ring_size };
        self.meta(self.live_slot, &self.history, self.prev_live.as_ref(), ring_size)
    }

    /// Whether a backend is in the ring now.
    pub fn in_ring(&self, backend: &BackendState) -> bool {
        backend.wanted() && (backend.healthy || self.fail_open)
    }

    /// Takes the rings back from the mapped ring array. False, and nothing
    /// taken, where it cannot: the array is not mapped, a kept ring has no
    /// slot, or the state file has no fingerprint of the live ring (an
    /// older release's).
    fn read_rings(&mut self, dp: &Dataplane) -> bool {
        let (members, fail_open) = live_members(&self.backends);
        let kept = self.history.iter().chain(&self.prev_live);
        if members.is_empty() || self.fingerprint == 0 || kept.clone().any(|g| g.slot.is_none()) {
            return false;
        }
        let Some(live) = dp.read_ring(self.live_slot, self.spec.ring_size).map(Ring::from) else { return false };
        let read = |slot: u32| match slot == self.live_slot {
            true => Some(live.clone()),
            false => dp.read_ring(slot, self.spec.ring_size).map(Ring::from),
        };
        let Some(rings) = kept.map(|g| read(g.slot.expect("checked above"))).collect::<Option<Vec<Ring>>>() else {
            return false;
        };
        for (generation, ring) in self.history.iter_mut().chain(self.prev_live.as_mut()).zip(rings) {
            generation.ring = ring;
        }
        self.ring = live;
        self.fail_open = fail_open;
        true
    }

    /// Builds the live ring and the kept ones from the backends and the
    /// generations' members.
    fn build_rings(&mut self) {
        let (ring, fail_open, fingerprint) = plan_ring(&self.backends, self.spec.ring_size);
        self.ring = ring;
        self.fingerprint = fingerprint;
        self.fail_open = fail_open;
        for i in 0..self.history.len() {
            let ring = self.ring_of_known(&self.history[i].members).0;
            self.history[i].ring = ring;
        }
        if let Some(members) = self.prev_live.as_ref().map(|p| p.members.clone()) {
            let ring = self.ring_of_known(&members).0;
            self.prev_live.as_mut().expect("just read").ring = ring;
        }
    }

    /// Whether packets may read a ring in `slot`: the live ring's or an
    /// alternate ring's.
    fn slot_in_use(&self, slot: u32) -> bool {
        slot == self.live_slot || self.history.iter().chain(&self.prev_live).any(|g| g.slot == Some(slot))
    }

    /// A slot no packet reads, to write the next ring to: an idle one of
    /// this VIP's, else one more from `space` (up to [`RINGS_PER_VIP`]),
    /// else the slot of its oldest alternate ring, which is then no longer
    /// kept (its generation stays in the history, without a ring here).
    fn spare_slot(&mut self, space: &mut RingSpace) -> u32 {
        if let Some(idle) = self.slots.iter().copied().find(|s| !self.slot_in_use(*s)) {
            return idle;
        }
        if self.slots.len() < RINGS_PER_VIP as usize {
            if let Some(extent) = space.alloc(self.stride()) {
                self.slots.push(extent.offset);
                return extent.offset;
            }
        }
        let live = self.live_slot;
        let oldest = (self.history.iter().rev().chain(&self.prev_live).filter_map(|g| g.slot))
            .find(|s| *s != live)
            .expect("a VIP owns two slots or more, so one that is busy and not live holds an alternate ring");
        self.forget_slots(|slot| slot == oldest);
        tracing::info!(vip = %self.spec.vip, "ring space full: an alternate ring of this VIP is no longer kept");
        oldest
    }

    /// Stops keeping the alternate rings in the slots `which` picks.
    fn forget_slots(&mut self, which: impl Fn(u32) -> bool) {
        for generation in self.history.iter_mut().chain(self.prev_live.as_mut()) {
            if generation.slot.is_some_and(&which) {
                generation.slot = None;
            }
        }
    }

    /// Gives the idle slots back to `space`, all but one: the spare the
    /// next ring is written to.
    fn release_idle_slots(&mut self, space: &mut RingSpace) {
        let idle: Vec<u32> = self.slots.iter().copied().filter(|s| !self.slot_in_use(*s)).skip(1).collect();
        self.slots.retain(|s| !idle.contains(s));
        for offset in idle {
            space.free(Extent { offset, len: self.stride() });
        }
    }

    /// A slot that holds `ring`: the live ring's or a kept alternate
    /// ring's when it is equal, else a spare one, written now (no packet
    /// reads it yet).
    fn slot_for(&mut self, space: &mut RingSpace, dp: &mut Dataplane, ring: &Ring) -> Result<u32, ServiceError> {
        if *ring == self.ring {
            return Ok(self.live_slot);
        }
        if let Some(same) = self.history.iter().chain(&self.prev_live).filter(|g| g.ring == *ring).find_map(|g| g.slot)
        {
            return Ok(same);
        }
        let spare = self.spare_slot(space);
        dp.write_ring(spare, ring)?;
        Ok(spare)
    }

    /// Addresses `generations` name that have no backend id here.
    fn unknown_members(&self, generations: &[Generation]) -> std::collections::BTreeSet<IpAddr> {
        generations.iter().flat_map(|g| g.members.keys()).filter(|a| self.id_of(a).is_none()).copied().collect()
    }

    /// The backend id of an address: a member, else a retired backend.
    fn id_of(&self, addr: &IpAddr) -> Option<u32> {
        self.backends
            .get(addr)
            .map(|b| b.id)
            .or_else(|| self.retired.iter().find(|(_, a)| *a == addr).map(|(id, _)| *id))
    }

    /// [`VipState::ring_of`], taken from the live ring or a generation when
    /// one has the same members (Maglev is deterministic): a declared
    /// ring is most often the live one.
    fn ring_of_known(&self, members: &BTreeMap<IpAddr, u32>) -> (Ring, u64) {
        if !self.ring.is_empty() && live_members(&self.backends).0 == *members {
            return (self.ring.clone(), self.fingerprint);
        }
        match self.history.iter().chain(&self.prev_live).find(|g| g.members == *members && !g.ring.is_empty()) {
            Some(same) => (same.ring.clone(), same.fingerprint),
            None => self.ring_of(members),
        }
    }

    /// A ring of `members` by backend id (every member must have an id).
    fn ring_of(&self, members: &BTreeMap<IpAddr, u32>) -> (Ring, u64) {
        let (ring, fingerprint) = ring_by_address(members, self.spec.ring_size);
        let ids: Vec<u32> = members.keys().map(|a| self.id_of(a).expect("every member has an id")).collect();
        (by_id(&ring, &ids), fingerprint)
    }
}

/// The declared members of a backend set: the wanted ones, by weight.
fn declared_members(backends: &BTreeMap<IpAddr, BackendState>) -> BTreeMap<IpAddr, u32> {
    backends.iter().filter(|(_, b)| b.wanted()).map(|(a, b)| (*a, b.weight)).collect()
}

/// Maglev over `members` (address -> weight): slots as indexes into
/// `members` in address order, and the ring's fingerprint.
fn ring_by_address(members: &BTreeMap<IpAddr, u32>, ring_size: u32) -> (Vec<u32>, u64) {
    let ring_members: Vec<RingMember> =
        members.iter().map(|(a, w)| RingMember { identity: identity(*a), weight: *w }).collect();
    match maglev::build(&ring_members, ring_size) {
        Some(slots) => {
            let identities: Vec<&[u8]> = slots.iter().map(|&i| ring_members[i as usize].identity.as_slice()).collect();
            let fingerprint = ring_fingerprint(&identities);
            (slots, fingerprint)
        }
        None => (Vec::new(), 0),
    }
}

/// The ring for `backends`: the wanted and healthy ones or, when every
/// wanted one is unhealthy, all wanted ones (fail open). Returns the ring of
/// backend ids (empty if none is wanted) and whether it failed open.
fn plan_ring(backends: &BTreeMap<IpAddr, BackendState>, ring_size: u32) -> (Ring, bool, u64) {
    let (members, fail_open) = live_members(backends);
    let (slots, fingerprint) = ring_by_address(&members, ring_size);
    let ids: Vec<u32> = members.keys().map(|a| backends[a].id).collect();
    (by_id(&slots, &ids), fail_open, fingerprint)
}

/// A ring of backend ids, shared: the live ring and a declared one are
/// most often the same, and a VIP's rings are 128 KiB each at 65537.
type Ring = Arc<[u16]>;

/// A ring of member indexes made a ring of their backend ids.
fn by_id(slots: &[u32], ids: &[u32]) -> Ring {
    slots.iter().map(|&i| u16::try_from(ids[i as usize]).expect("backend ids are below MAX_BACKENDS")).collect()
}

/// `f` on every item, the items shared out over the machine's cores (ring
/// builds: each is its own work, milliseconds long); results in order.
fn on_every_core<T: Send, R: Send>(items: &mut [T], f: impl Fn(&mut T) -> R + Sync) -> Vec<R> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = items.len().div_ceil(cores).max(1);
    let f = &f;
    std::thread::scope(|scope| {
        let workers: Vec<_> = items
            .chunks_mut(chunk)
            .map(|part| scope.spawn(move || part.iter_mut().map(f).collect::<Vec<R>>()))
            .collect();
        workers.into_iter().flat_map(|w| w.join().expect("a ring build does not panic")).collect()
    })
}

/// The members of the live ring (address -> weight): the wanted and
/// healthy backends or, when every wanted one is unhealthy, all wanted ones;
/// and whether it failed open.
fn live_members(backends: &BTreeMap<IpAddr, BackendState>) -> (BTreeMap<IpAddr, u32>, bool) {
    let wanted = declared_members(backends);
    let fail_open = !wanted.is_empty() && wanted.keys().all(|a| !backends[a].healthy);
    let members = wanted.into_iter().filter(|(a, _)| backends[a].healthy || fail_open).collect();
    (members, fail_open)
}

/// A hash of a live ring by the addresses in its slots (not the backend
/// ids, which each host allocates itself): LB hosts with the same ring have
/// the same fingerprint, so operators and alerts can compare them.
fn ring_fingerprint(slots: &[&[u8]]) -> u64 {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    hasher.update(&(slots.len() as u32).to_le_bytes());
    for identity in slots {
        hasher.update(identity);
    }
    hasher.digest()
}

/// Where a flow goes, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explanation {
    pub vip: VipAddr,
    pub backend: IpAddr,
    pub backend_id: u32,
    pub hash: u32,
    pub via: Via,
    /// GUE VIPs: the history rings' backends for this flow where they
    /// differ, carried by TCP packets that are not SYNs (the second chance).
    pub alternates: Vec<IpAddr>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// The conn table remembers this flow.
    ConnTable,
    /// A new flow: this slot of the VIP's Maglev ring.
    Ring { slot: u32 },
}

/// Everything needed to take over maps that a previous controller filled:
/// saved after every change, read back on restart.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Snapshot<V = VipState> {
    settings: Settings,
    vips: Vec<V>,
    #[serde(with = "id_runs")]
    free_vip_ids: VecDeque<u32>,
    #[serde(with = "id_runs")]
    free_backend_ids: VecDeque<u32>,
    ring_space: RingSpace,
    next_cookie: u32,
}

/// A queue of free ids saved as runs `[first, count]` of consecutive
/// ones: 65,536 free backend ids are one run, not 400 KB of numbers. Older
/// state files list every id, which still reads.
mod id_runs {
    use std::collections::VecDeque;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(ids: &VecDeque<u32>, to: S) -> Result<S::Ok, S::Error> {
        let mut runs: Vec<[u32; 2]> = Vec::new();
        for &id in ids {
            match runs.last_mut() {
                Some([first, count]) if first.checked_add(*count) == Some(id) => *count += 1,
                _ => runs.push([id, 1]),
            }
        }
        runs.serialize(to)
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Item {
        Run([u32; 2]),
        Id(u32),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(from: D) -> Result<VecDeque<u32>, D::Error> {
        let items = Vec::<Item>::deserialize(from)?;
        let mut ids = VecDeque::new();
        for item in items {
            match item {
                Item::Run([first, count]) => ids.extend((0..count).map(|i| first + i)),
                Item::Id(id) => ids.push_back(id),
            }
        }
        Ok(ids)
    }
}

impl<V> Snapshot<V> {
    pub fn vips(&self) -> &[V] {
        &self.vips
    }

    /// The same snapshot with each VIP made by `f`.
    pub fn try_map_vips<W, E>(self, f: impl FnMut(V) -> Result<W, E>) -> Result<Snapshot<W>, E> {
        Ok(Snapshot {
            settings: self.settings,
            vips: self.vips.into_iter().map(f).collect::<Result<_, _>>()?,
            free_vip_ids: self.free_vip_ids,
            free_backend_ids: self.free_backend_ids,
            ring_space: self.ring_space,
            next_cookie: self.next_cookie,
        })
    }
}

/// The VIPs and backends of one balancer, kept in step with its maps.
pub struct Services {
    settings: Settings,
    vips: BTreeMap<VipAddr, VipState>,
    free_vip_ids: VecDeque<u32>,
    /// Freed ids go to the back: an id is reused as late as possible.
    free_backend_ids: VecDeque<u32>,
    ring_space: RingSpace,
    next_cookie: u32,
    /// Rings built and made live since start, and the time that took.
    pub ring_swaps: u64,
    pub ring_swap_seconds: f64,
    /// While a change set defers its rings ([`Services::defer_rings`]): the
    /// VIPs whose ring waits, each with the backends its live ring was
    /// built from.
    deferred: Option<BTreeMap<VipAddr, BTreeMap<IpAddr, BackendState>>>,
    /// See [`Services::take_changed`].
    changed: BTreeSet<VipAddr>,
}

impl Services {
    /// Starts with no VIP and writes `settings` to the data plane.
    pub fn new(dp: &mut Dataplane, settings: Settings) -> Result<Self, ServiceError> {
        let services = Self {
            settings,
            vips: BTreeMap::new(),
            free_vip_ids: (0..MAX_VIPS).collect(),
            free_backend_ids: (0..MAX_BACKENDS).collect(),
            ring_space: RingSpace::new(dp.ring_capacity()),
            next_cookie: 1,
            ring_swaps: 0,
            ring_swap_seconds: 0.0,
            deferred: None,
            changed: BTreeSet::new(),
        };
        services.write_config(dp)?;
        Ok(services)
    }

    pub fn snapshot(&self) -> Snapshot {
        self.snapshot_as(VipState::clone)
    }

    /// The snapshot with each VIP as `each` gives it (the state file takes
    /// each VIP's JSON as last written, when the VIP has not changed).
    pub fn snapshot_as<V>(&self, each: impl FnMut(&VipState) -> V) -> Snapshot<V> {
        Snapshot {
            settings: self.settings,
            vips: self.vips.values().map(each).collect(),
            free_vip_ids: self.free_vip_ids.clone(),
            free_backend_ids: self.free_backend_ids.clone(),
            ring_space: self.ring_space.clone(),
            next_cookie: self.next_cookie,
        }
    }

    /// Takes over maps that already hold `snapshot`: nothing is written,
    /// so packets and conn-table entries are not disturbed. The rings are
    /// read back from the mapped ring array, as packets read them, or else
    /// rebuilt (Maglev is deterministic; on every core).
    pub fn restore(snapshot: Snapshot, dp: &Dataplane) -> Self {
        let mut states = snapshot.vips;
        let mut rebuild: Vec<&mut VipState> =
            states.iter_mut().filter_map(|s| (!s.read_rings(dp)).then_some(s)).collect();
        on_every_core(&mut rebuild, |state| state.build_rings());
        let vips = states.into_iter().map(|state| (state.spec.vip, state)).collect();
        Self {
            settings: snapshot.settings,
            vips,
            free_vip_ids: snapshot.free_vip_ids,
            free_backend_ids: snapshot.free_backend_ids,
            ring_space: snapshot.ring_space,
            next_cookie: snapshot.next_cookie,
            ring_swaps: 0,
            ring_swap_seconds: 0.0,
            deferred: None,
            changed: BTreeSet::new(),
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn set_settings(&mut self, dp: &mut Dataplane, settings: Settings) -> Result<(), ServiceError> {
        let old = std::mem::replace(&mut self.settings, settings);
        let written = self.write_config(dp);
        if written.is_err() {
            self.settings = old;
        }
        written
    }

    pub fn vips(&self) -> impl Iterator<Item = &VipState> {
        self.vips.values()
    }

    pub fn vip(&self, vip: &VipAddr) -> Result<&VipState, ServiceError> {
        self.vips.get(vip).ok_or(ServiceError::NoSuchVip(*vip))
    }

    /// A VIP to change: it is saved again at the next save.
    fn vip_mut(&mut self, vip: &VipAddr) -> Result<&mut VipState, ServiceError> {
        self.changed.insert(*vip);
        self.vips.get_mut(vip).ok_or(ServiceError::NoSuchVip(*vip))
    }

    /// The VIPs added, removed or changed since the last call.
    pub fn take_changed(&mut self) -> BTreeSet<VipAddr> {
        std::mem::take(&mut self.changed)
    }

    /// Whether the ring space takes `added` once `removed` are gone, as the
    /// allocator will place them: checked before a change set writes
    /// anything, so a state that does not fit is refused at once, whole.
    pub fn check_ring_space(&self, removed: &[VipAddr], added: &[VipSpec]) -> Result<(), ServiceError> {
        let reserve = |ring_size: u32| RESERVED_RINGS_PER_VIP as u64 * lb_common::ring_stride(ring_size) as u64;
        let mut reserved: u64 =
            self.vips.values().filter(|v| !removed.contains(&v.spec.vip)).map(|v| reserve(v.spec.ring_size)).sum();
        for (placed, spec) in added.iter().enumerate() {
            reserved += reserve(spec.ring_size);
            if reserved > self.ring_space.capacity as u64 {
                let needed = reserve(spec.ring_size) as u32;
                return Err(ServiceError::RingSpaceWanting { fit: placed, vips: added.len(), needed });
            }
        }
        Ok(())
    }

    /// A ring's room in the ring array, made by taking other VIPs'
    /// alternate rings back when there is none (their GUE packets lose
    /// those alternates; live rings are never touched).
    fn alloc_slot(&mut self, dp: &mut Dataplane, len: u32) -> Result<u32, ServiceError> {
        loop {
            if let Some(extent) = self.ring_space.alloc(len) {
                return Ok(extent.offset);
            }
            let most = self.vips.values().filter(|v| v.slots.len() > RESERVED_RINGS_PER_VIP as usize);
            let Some(vip) = most.max_by_key(|v| v.slots.len()).map(|v| v.spec.vip) else {
                return Err(ServiceError::RingSpaceFull { needed: len, free: self.ring_space.largest_free() });
            };
            self.changed.insert(vip);
            let state = self.vips.get_mut(&vip).expect("just found");
            state.forget_slots(|_| true);
            dp.set_vip(&vip.key(), &state.live_meta())?;
            state.release_idle_slots(&mut self.ring_space);
            tracing::info!(%vip, "ring space full: the alternate rings of this VIP are no longer kept, for a new VIP");
            self.sync_fragment_entry(dp, &vip)?;
        }
    }

    pub fn add_vip(&mut self, dp: &mut Dataplane, spec: VipSpec) -> Result<(), ServiceError> {
        if self.vips.contains_key(&spec.vip) {
            return Err(ServiceError::VipExists(spec.vip));
        }
        check_ring_size(spec.ring_size)?;
        check_quic(&spec)?;
        let vip_id = *self.free_vip_ids.front().ok_or(ServiceError::TooManyVips)?;
        let stride = lb_common::ring_stride(spec.ring_size);
        let mut slots = Vec::new();
        for _ in 0..RESERVED_RINGS_PER_VIP {
            match self.alloc_slot(dp, stride) {
                Ok(slot) => slots.push(slot),
                Err(e) => {
                    slots.into_iter().for_each(|offset| self.ring_space.free(Extent { offset, len: stride }));
                    return Err(e);
                }
            }
        }
        let state = VipState {
            spec,
            id: vip_id,
            live_slot: slots[0],
            slots,
            history: Vec::new(),
            prev_live: None,
            live_settled: true,
            fingerprint: 0,
            retired: BTreeMap::new(),
            ring: Ring::default(),
            fail_open: false,
            backends: BTreeMap::new(),
        };
        // The VIP entry first, then the filter slot that lets packets reach it.
        let written = dp
            .reset_vip_stats(vip_id)
            .and_then(|()| dp.set_vip(&spec.vip.key(), &state.meta(state.live_slot, &[], None, 0)))
            .and_then(|()| dp.set_vip(&address_mark(&spec.vip), &ADDRESS_MARK))
            .and_then(|()| {
                let slot = filter_slot(&spec.vip);
                dp.set_vip_filter(slot, self.slot_value(slot) | filter_bits(&spec))
            });
        if let Err(e) = written {
            state.slots.iter().for_each(|&offset| self.ring_space.free(Extent { offset, len: stride }));
            return Err(e.into());
        }
        self.free_vip_ids.pop_front();
        self.vips.insert(spec.vip, state);
        self.changed.insert(spec.vip);
        self.sync_fragment_entry(dp, &spec.vip)?;
        self.write_config(dp)
    }

    pub fn remove_vip(&mut self, dp: &mut Dataplane, vip: &VipAddr) -> Result<(), ServiceError> {
        if !self.vips.contains_key(vip) {
            return Err(ServiceError::NoSuchVip(*vip));
        }
        dp.remove_vip(&vip.key())?;
        let state = self.vips.remove(vip).expect("checked above");
        if let Some(quic) = &state.spec.quic {
            write_quic_servers(dp, &quic_servers(state.id, &state.backends, state.fail_open, quic), &BTreeMap::new())?;
        }
        self.changed.insert(*vip);
        if let Some(deferred) = &mut self.deferred {
            deferred.remove(vip);
        }
        self.sync_fragment_entry(dp, vip)?;
        // Other VIPs may share the address (other ports) or the slot.
        if !self.vips.keys().any(|v| v.addr == vip.addr) {
            dp.remove_vip(&address_mark(vip))?;
        }
        // The slot's value follows the VIPs left in it (0 when none is).
        let slot = filter_slot(vip);
        dp.set_vip_filter(slot, self.slot_value(slot))?;
        for id in state.backends.values().map(|b| b.id).chain(state.retired.keys().copied()) {
            self.release_backend(dp, id)?;
        }
        for &offset in &state.slots {
            self.ring_space.free(Extent { offset, len: state.stride() });
        }
        self.free_vip_ids.push_back(state.id);
        self.write_config(dp)
    }

    pub fn add_backend(&mut self, dp: &mut Dataplane, vip: &VipAddr, spec: BackendSpec) -> Result<(), ServiceError> {
        let state = self.vips.get(vip).ok_or(ServiceError::NoSuchVip(*vip))?;
        if state.backends.contains_key(&spec.addr) {
            return Err(ServiceError::BackendExists(*vip, spec.addr));
        }
        check_weight(spec.weight)?;
        if vip.addr.is_ipv6() && spec.addr.is_ipv4() {
            return Err(ServiceError::FamilyMismatch { vip: *vip, backend: spec.addr });
        }
        // A retired backend (removed, still named by a history ring) comes
        // back under its id: one id per address, so alternates never name
        // the chosen backend again under another id.
        let retired = state.retired.iter().find(|(_, a)| **a == spec.addr).map(|(id, _)| *id);
        let id = match retired {
            Some(id) => id,
            None => *self.free_backend_ids.front().ok_or(ServiceError::TooManyBackends)?,
        };
        let server_id = server_id_for(vip, state, &spec)?;
        let cookie = self.next_cookie;
        let (words, family) = addr::words(spec.addr);
        if retired.is_none() {
            dp.reset_backend_stats(id)?;
        }
        dp.set_backend(id, &Backend { addr: words, cookie, family, flags: 0, _pad: [0; 2] })?;
        let mut backends = state.backends.clone();
        let added = BackendState { id, cookie, weight: spec.weight, drained: false, healthy: true, server_id };
        backends.insert(spec.addr, added);
        if let Some(id) = retired {
            self.vip_mut(vip).expect("looked up above").retired.remove(&id);
        }
        if let Err(e) = self.swap_ring(dp, vip, backends, "backend added") {
            // The entry is in no live ring: putting back what it was undoes the add.
            let undo = match retired {
                Some(id) => {
                    self.vip_mut(vip).expect("looked up above").retired.insert(id, spec.addr);
                    Backend { addr: words, cookie, family, flags: lb_common::BACKEND_F_RETIRED, _pad: [0; 2] }
                }
                None => Backend::default(),
            };
            let _ = dp.set_backend(id, &undo);
            return Err(e);
        }
        if retired.is_none() {
            self.free_backend_ids.pop_front();
        }
        self.next_cookie = self.next_cookie.checked_add(1).unwrap_or(1);
        Ok(())
    }

    pub fn remove_backend(&mut self, dp: &mut Dataplane, vip: &VipAddr, addr: IpAddr) -> Result<(), ServiceError> {
        let mut backends = self.vip(vip)?.backends.clone();
        let removed = backends.remove(&addr).ok_or(ServiceError::NoSuchBackend(*vip, addr))?;
        self.swap_ring(dp, vip, backends, "backend removed")?;
        // Retired, not released: an alternate ring may name it as the
        // alternate of connections that still live on it.
        let (words, family) = addr::words(addr);
        let retired =
            Backend { addr: words, cookie: removed.cookie, family, flags: lb_common::BACKEND_F_RETIRED, _pad: [0; 2] };
        dp.set_backend(removed.id, &retired)?;
        self.vip_mut(vip).expect("swapped above").retired.insert(removed.id, addr);
        self.release_retired(dp, vip)
    }

    /// Releases the retired backends of `vip` that no ring names any more.
    fn release_retired(&mut self, dp: &mut Dataplane, vip: &VipAddr) -> Result<(), ServiceError> {
        let state = self.vip_mut(vip)?;
        // Named by a ring, or a member of a generation (too light to be in
        // its ring, but restore rebuilds the ring from the members).
        let named = |id: &u32, addr: &IpAddr| {
            let id = &(*id as u16);
            state.ring.contains(id)
                || state
                    .history
                    .iter()
                    .chain(&state.prev_live)
                    .any(|g| g.ring.contains(id) || g.members.contains_key(addr))
        };
        let unnamed: Vec<u32> = state.retired.iter().filter(|(id, a)| !named(id, a)).map(|(id, _)| *id).collect();
        for id in unnamed {
            self.vip_mut(vip).expect("looked up above").retired.remove(&id);
            self.release_backend(dp, id)?;
        }
        Ok(())
    }

    /// Drained: existing flows stay, new flows go elsewhere.
    pub fn drain_backend(&mut self, dp: &mut Dataplane, vip: &VipAddr, addr: IpAddr) -> Result<(), ServiceError> {
        self.change_backend(dp, vip, addr, "backend drained", |b| b.drained = true)
    }

    pub fn undrain_backend(&mut self, dp: &mut Dataplane, vip: &VipAddr, addr: IpAddr) -> Result<(), ServiceError> {
        self.change_backend(dp, vip, addr, "backend undrained", |b| b.drained = false)
    }

    /// Health checks changed their verdict on a backend.
    pub fn set_health(
        &mut self,
        dp: &mut Dataplane,
        vip: &VipAddr,
        addr: IpAddr,
        healthy: bool,
    ) -> Result<(), ServiceError> {
        let cause = if healthy { "backend up" } else { "backend down" };
        self.change_backend(dp, vip, addr, cause, |b| b.healthy = healthy)?;
        // A health change is a change set of its own.
        self.vip_mut(vip).expect("changed above").live_settled = true;
        Ok(())
    }

    pub fn set_weight(
        &mut self,
        dp: &mut Dataplane,
        vip: &VipAddr,
        addr: IpAddr,
        weight: u32,
    ) -> Result<(), ServiceError> {
        check_weight(weight)?;
        self.change_backend(dp, vip, addr, "weight changed", |b| b.weight = weight)
    }

    /// A QUIC VIP backend's server ID: given, or (None) from its address.
    pub fn set_server_id(
        &mut self,
        dp: &mut Dataplane,
        vip: &VipAddr,
        addr: IpAddr,
        server_id: Option<ServerId>,
    ) -> Result<(), ServiceError> {
        let state = self.vip(vip)?;
        let spec = BackendSpec { addr, weight: 0, server_id };
        let id = server_id_for(vip, state, &spec)?;
        self.change_backend(dp, vip, addr, "server ID changed", |b| b.server_id = id)
    }

    fn change_backend(
        &mut self,
        dp: &mut Dataplane,
        vip: &VipAddr,
        addr: IpAddr,
        cause: &str,
        change: impl FnOnce(&mut BackendState),
    ) -> Result<(), ServiceError> {
        let mut backends = self.vip(vip)?.backends.clone();
        change(backends.get_mut(&addr).ok_or(ServiceError::NoSuchBackend(*vip, addr))?);
        self.swap_ring(dp, vip, backends, cause)
    }

    /// From now until [`Services::build_deferred_rings`], backend changes
    /// update the model only: each VIP's ring is built once, at the end of
    /// the change set, however many of its backends changed.
    pub fn defer_rings(&mut self) {
        self.deferred.get_or_insert_with(BTreeMap::new);
    }

    /// Builds the rings of the VIPs changed since [`Services::defer_rings`]
    /// (Maglev on every core, as each ring is its own work) and makes each
    /// live in turn. Rings are not deferred after this.
    pub fn build_deferred_rings(&mut self, dp: &mut Dataplane) -> Result<(), ServiceError> {
        let Some(mut deferred) = self.deferred.take() else { return Ok(()) };
        let started = std::time::Instant::now();
        let mut work: Vec<(VipAddr, &BTreeMap<IpAddr, BackendState>, u32)> = deferred
            .keys()
            .filter_map(|vip| self.vips.get(vip).map(|s| (*vip, &s.backends, s.spec.ring_size)))
            .collect();
        let planned = on_every_core(&mut work, |(vip, backends, size)| (*vip, plan_ring(backends, *size)));
        self.ring_swap_seconds += started.elapsed().as_secs_f64();
        for (vip, plan) in planned {
            let live_backends = deferred.remove(&vip).unwrap_or_default();
            let backends = self.vips[&vip].backends.clone();
            self.install_ring(dp, &vip, backends, &live_backends, plan, "change set", std::time::Instant::now())?;
        }
        Ok(())
    }

    /// Makes `backends` the VIP's: its ring built and made live now, or,
    /// while rings are deferred, at the end of the change set.
    fn swap_ring(
        &mut self,
        dp: &mut Dataplane,
        vip: &VipAddr,
        backends: BTreeMap<IpAddr, BackendState>,
        cause: &str,
    ) -> Result<(), ServiceError> {
        self.changed.insert(*vip);
        let state = self.vips.get_mut(vip).ok_or(ServiceError::NoSuchVip(*vip))?;
        if let Some(deferred) = &mut self.deferred {
            deferred.entry(*vip).or_insert_with(|| state.backends.clone());
            state.backends = backends;
            return Ok(());
        }
        let started = std::time::Instant::now();
        let live_backends = state.backends.clone();
        let plan = plan_ring(&backends, state.spec.ring_size);
        self.install_ring(dp, vip, backends, &live_backends, plan, cause, started)
    }

    /// Writes a planned ring to a free ring slot (or names the history ring
    /// that equals it) and makes it live with one VIP-map update; then the
    /// model takes `backends`. `live_backends` built the outgoing ring;
    /// the time since `started` counts as this swap's.
    #[allow(clippy::too_many_arguments)]
    fn install_ring(
        &mut self,
        dp: &mut Dataplane,
        vip: &VipAddr,
        backends: BTreeMap<IpAddr, BackendState>,
        live_backends: &BTreeMap<IpAddr, BackendState>,
        (ring, fail_open, fingerprint): (Ring, bool, u64),
        cause: &str,
        started: std::time::Instant,
    ) -> Result<(), ServiceError> {
        self.changed.insert(*vip);
        let state = self.vips.get_mut(vip).ok_or(ServiceError::NoSuchVip(*vip))?;
        if let Some(quic) = &state.spec.quic {
            let old = quic_servers(state.id, &state.backends, state.fail_open, quic);
            write_quic_servers(dp, &old, &quic_servers(state.id, &backends, fail_open, quic))?;
        }
        if ring == state.ring {
            state.backends = backends;
            state.fail_open = fail_open;
            return Ok(());
        }
        let live = if ring.is_empty() { state.live_slot } else { state.slot_for(&mut self.ring_space, dp, &ring)? };
        // The outgoing ring becomes the previous live one: connections made
        // under it (while a backend was down, say) keep an alternate.
        let prev_live = (state.live_settled && !state.ring.is_empty()).then(|| Generation {
            members: live_members(live_backends).0,
            fingerprint: state.fingerprint,
            since: unix_now(),
            slot: Some(state.live_slot),
            ring: std::mem::take(&mut state.ring),
        });
        let ring_size = if ring.is_empty() { 0 } else { state.spec.ring_size };
        if let Err(e) = dp.set_vip(&vip.key(), &state.meta(live, &state.history, prev_live.as_ref(), ring_size)) {
            state.ring = prev_live.map(|p| p.ring).unwrap_or_default();
            return Err(e.into());
        }
        if prev_live.is_some() {
            state.prev_live = prev_live;
        }
        state.live_settled = false;
        state.live_slot = live;
        let in_ring = backends.values().filter(|b| b.wanted() && (b.healthy || fail_open)).count();
        state.ring = ring;
        state.fingerprint = fingerprint;
        state.backends = backends;
        state.fail_open = fail_open;
        state.release_idle_slots(&mut self.ring_space);
        let took = started.elapsed().as_secs_f64();
        self.ring_swaps += 1;
        self.ring_swap_seconds += took;
        tracing::info!(%vip, cause, in_ring, fail_open, took_ms = took * 1000.0, "ring swapped");
        self.sync_fragment_entry(dp, vip)?;
        self.release_retired(dp, vip)
    }

    /// Ends a change set: every VIP whose declared members differ from its
    /// newest generation gets a new one (the oldest beyond
    /// [`HISTORY_RINGS`] goes), and every live ring is settled. Health
    /// changes never make a generation.
    pub fn commit_history(&mut self, dp: &mut Dataplane) -> Result<(), ServiceError> {
        // The declared rings are taken from the live ones where they are
        // the same: those must be built first.
        self.build_deferred_rings(dp)?;
        let changed: Vec<(VipAddr, BTreeMap<IpAddr, u32>)> = self
            .vips
            .values()
            .map(|v| (v.spec.vip, declared_members(&v.backends)))
            .filter(|(vip, members)| {
                let newest = self.vips[vip].history.first().map(|g| &g.members);
                !members.is_empty() && newest != Some(members)
            })
            .collect();
        for (vip, members) in changed {
            self.push_generation(dp, &vip, members, unix_now())?;
            self.release_retired(dp, &vip)?;
        }
        for state in self.vips.values_mut() {
            state.live_settled = true;
        }
        Ok(())
    }

    /// Makes `members` the newest generation of `vip`: its ring goes to a
    /// free slot (or shares the slot of an equal live or history ring),
    /// then one VIP-map update names it. Every member must have an id; the
    /// caller releases what no ring names any more.
    fn push_generation(
        &mut self,
        dp: &mut Dataplane,
        vip: &VipAddr,
        members: BTreeMap<IpAddr, u32>,
        since: u64,
    ) -> Result<(), ServiceError> {
        self.changed.insert(*vip);
        self.changed.insert(*vip);
        let state = self.vips.get_mut(vip).ok_or(ServiceError::NoSuchVip(*vip))?;
        let (ring, fingerprint) = state.ring_of_known(&members);
        let slot = Some(state.slot_for(&mut self.ring_space, dp, &ring)?);
        let mut history = vec![Generation { members, fingerprint, since, slot, ring }];
        history.extend(state.history.iter().take(HISTORY_RINGS - 1).cloned());
        let ring_size = if state.ring.is_empty() { 0 } else { state.spec.ring_size };
        dp.set_vip(&vip.key(), &state.meta(state.live_slot, &history, state.prev_live.as_ref(), ring_size))?;
        tracing::info!(%vip, fingerprint = %format!("{fingerprint:016x}"), backends = history[0].members.len(), "declared ring recorded in the history");
        state.history = history;
        state.release_idle_slots(&mut self.ring_space);
        self.sync_fragment_entry(dp, vip)
    }

    /// Whether `generations` (newest first) may become the ring history of
    /// `vip`: at most [`HISTORY_RINGS`], none empty, weights and families
    /// valid, each ring's fingerprint the one given (the same ring size and
    /// Maglev), and the newest the VIP's declared backends now, so a host
    /// never claims a history its own desired state contradicts.
    pub fn check_history(&self, vip: &VipAddr, generations: &[Generation]) -> Result<(), ServiceError> {
        let state = self.vip(vip)?;
        let bad = |why: String| Err(ServiceError::History(*vip, why));
        if generations.len() > HISTORY_RINGS {
            return bad(format!("{} generations, at most {HISTORY_RINGS}", generations.len()));
        }
        if let Some(newest) = generations.first() {
            if newest.members != declared_members(&state.backends) {
                return bad("its newest generation is not this host's backends and weights: apply the same \
                            desired state first"
                    .into());
            }
        }
        for generation in generations {
            if generation.members.is_empty() {
                return bad("a generation without backends".into());
            }
            for (addr, weight) in &generation.members {
                check_weight(*weight)?;
                if vip.addr.is_ipv6() && addr.is_ipv4() {
                    return Err(ServiceError::FamilyMismatch { vip: *vip, backend: *addr });
                }
            }
            let fingerprint = ring_by_address(&generation.members, state.spec.ring_size).1;
            if fingerprint != generation.fingerprint {
                return bad(format!(
                    "generation {:016x} gives ring {fingerprint:016x} here (ring size {}): the VIPs differ",
                    generation.fingerprint, state.spec.ring_size
                ));
            }
        }
        if state.unknown_members(generations).len() > self.free_backend_ids.len() {
            return Err(ServiceError::TooManyBackends);
        }
        Ok(())
    }

    /// Replaces the ring history of `vip` with `generations` (newest
    /// first, see [`Self::check_history`]), as exported by another LB host
    /// or saved before a restart. Addresses that are no longer backends come
    /// back as retired ones.
    pub fn import_history(
        &mut self,
        dp: &mut Dataplane,
        vip: &VipAddr,
        generations: &[Generation],
    ) -> Result<(), ServiceError> {
        self.check_history(vip, generations)?;
        // Entries before any ring names them: retired, as removed backends.
        for addr in self.vip(vip)?.unknown_members(generations) {
            let id = self.free_backend_ids.pop_front().expect("counted by check_history");
            let (words, family) = addr::words(addr);
            let cookie = self.next_cookie;
            self.next_cookie = self.next_cookie.checked_add(1).unwrap_or(1);
            dp.reset_backend_stats(id)?;
            dp.set_backend(
                id,
                &Backend { addr: words, cookie, family, flags: lb_common::BACKEND_F_RETIRED, _pad: [0; 2] },
            )?;
            self.vip_mut(vip).expect("looked up above").retired.insert(id, addr);
        }
        // Oldest first: each push keeps the rings packets read intact.
        for generation in generations.iter().rev() {
            self.push_generation(dp, vip, generation.members.clone(), generation.since)?;
        }
        self.changed.insert(*vip);
        let state = self.vips.get_mut(vip).expect("looked up above");
        state.history.truncate(generations.len().max(1));
        state.release_idle_slots(&mut self.ring_space);
        let meta = state.live_meta();
        dp.set_vip(&vip.key(), &meta)?;
        self.sync_fragment_entry(dp, vip)?;
        self.release_retired(dp, vip)
    }

    /// Fragments after the first carry no ports, so one VIP per address and
    /// protocol takes them all: the port-0 VIP, else the lowest port. Its
    /// live VIP-map value is copied under the fragment key.
    fn sync_fragment_entry(&self, dp: &mut Dataplane, vip: &VipAddr) -> Result<(), ServiceError> {
        let (words, family) = addr::words(vip.addr);
        let key = lb_common::fragment_key(words, vip.proto.number(), family);
        let chosen = self
            .vips
            .values()
            .filter(|v| v.spec.vip.addr == vip.addr && v.spec.vip.proto == vip.proto)
            .min_by_key(|v| v.spec.vip.port);
        match chosen {
            Some(v) => dp.set_vip(&key, &v.live_meta())?,
            None => dp.remove_vip(&key)?,
        }
        Ok(())
    }

    fn release_backend(&mut self, dp: &mut Dataplane, id: u32) -> Result<(), ServiceError> {
        dp.set_backend(id, &Backend::default())?;
        self.free_backend_ids.push_back(id);
        Ok(())
    }

    /// Where the data plane sends `flow` now: the VIP it matches (exact port,
    /// then port 0), its conn-table entry if still valid, else the ring.
    pub fn explain(&self, dp: &mut Dataplane, flow: &FlowKey) -> Result<Option<Explanation>, ServiceError> {
        let Some(state) = self.vip_for(flow) else {
            return Ok(None);
        };
        let hash = match state.spec.hash {
            HashMode::SourceIp => source_hash(&flow.src),
            HashMode::FiveTuple => flow_hash(&flow.src, &flow.dst, flow.src_port, flow.dst_port, flow.proto),
        };
        let by_id = |id: u32| state.backends.iter().find(|(_, b)| b.id == id);
        let conn = if state.spec.stateless { None } else { dp.conn(flow)? };
        if let Some(conn) = conn {
            if let Some((addr, _)) = by_id(conn.backend_id).filter(|(_, b)| b.cookie == conn.cookie) {
                return Ok(Some(Explanation {
                    vip: state.spec.vip,
                    backend: *addr,
                    backend_id: conn.backend_id,
                    hash,
                    via: Via::ConnTable,
                    alternates: Vec::new(),
                }));
            }
        }
        if state.ring.is_empty() {
            return Ok(None);
        }
        let slot = lb_common::ring_slot(hash, state.spec.ring_size);
        let id = u32::from(state.ring[slot as usize]);
        let (addr, _) = by_id(id).expect("the ring names only this VIP's backends");
        // As the program does: each alternate ring's backend, where it
        // differs from the chosen one and those before it, still exists and
        // has the same family.
        let mut alternates = Vec::new();
        if state.spec.encap == Encap::Gue {
            let mut named = vec![id];
            for offset in state.alt_ring_offsets() {
                let other = dp.ring_slot(offset + slot)?;
                let found = by_id(other).map(|(a, _)| *a).or_else(|| state.retired.get(&other).copied());
                if let Some(a) = found.filter(|a| !named.contains(&other) && a.is_ipv4() == addr.is_ipv4()) {
                    named.push(other);
                    alternates.push(a);
                }
            }
        }
        Ok(Some(Explanation {
            vip: state.spec.vip,
            backend: *addr,
            backend_id: id,
            hash,
            via: Via::Ring { slot },
            alternates,
        }))
    }

    /// The filter value of `slot`: what the VIPs whose address falls in it
    /// need (0 when none does).
    fn slot_value(&self, slot: u32) -> u8 {
        self.vips.values().filter(|v| filter_slot(&v.spec.vip) == slot).fold(0, |f, v| f | filter_bits(&v.spec))
    }

    fn vip_for(&self, flow: &FlowKey) -> Option<&VipState> {
        let addr = addr::from_words(flow.dst, flow.family);
        let proto = match flow.proto {
            IPPROTO_TCP => Proto::Tcp,
            IPPROTO_UDP => Proto::Udp,
            _ => return None,
        };
        let port = u16::from_be_bytes(flow.dst_port.to_ne_bytes());
        self.vips.get(&VipAddr { addr, port, proto }).or_else(|| self.vips.get(&VipAddr { addr, port: 0, proto }))
    }

    /// Writes the config entry: the settings and the port-0 flags, which
    /// follow the VIP set.
    fn write_config(&self, dp: &mut Dataplane) -> Result<(), ServiceError> {
        dp.set_config(&self.config()?)?;
        Ok(())
    }

    fn config(&self) -> Result<Config, ServiceError> {
        let s = &self.settings;
        let mut flags = if s.debug { lb_common::CONFIG_F_DEBUG } else { 0 };
        for vip in self.vips.keys().filter(|v| v.port == 0) {
            flags |= if vip.addr.is_ipv4() { CONFIG_F_PORT0_V4 } else { CONFIG_F_PORT0_V6 };
        }
        if s.egress_mac.is_some() {
            flags |= CONFIG_F_REDIRECT;
        }
        let (v4, v4_len) = s.encap_src_v4;
        let (v6, v6_len) = s.encap_src_v6;
        if v4_len > 32 {
            return Err(ServiceError::BadPrefix(v4_len));
        }
        if v6_len > 128 {
            return Err(ServiceError::BadPrefix(v6_len));
        }
        let v4_host = addr::source_host_mask(v4_len, 32);
        let v6_host = addr::source_host_mask(v6_len, 128);
        let wire = |host_order: u32| u32::from_ne_bytes(host_order.to_be_bytes());
        let mut v6_words = addr::words(IpAddr::V6(v6)).0;
        v6_words[3] &= !wire(v6_host);
        Ok(Config {
            next_hop_mac: s.next_hop_mac,
            gue_port: s.gue_port.to_be(),
            flags,
            mtu: s.mtu,
            encap_src_v4: addr::words(IpAddr::V4(v4)).0[0] & !wire(v4_host),
            encap_src_v4_host_mask: wire(v4_host),
            encap_src_v6: v6_words,
            encap_src_v6_host_mask: wire(v6_host),
            new_flow_limit: s.new_flow_limit,
            // Filled in by the data plane, which knows the table it loaded.
            conn_buckets: 0,
            egress_mac: s.egress_mac.unwrap_or_default(),
            _pad: 0,
        })
    }
}

/// The value of an address mark: no ring, a stats index past the VIPs'.
const ADDRESS_MARK: VipMeta = VipMeta {
    vip_id: MAX_VIPS,
    flags: 0,
    ring_offset: 0,
    ring_size: 0,
    alt_rings_len: 0,
    alt_rings: [0; ALTERNATE_RINGS],
    quic: lb_common::quic::QuicLb { config_id: 0, server_id_len: 0, cid_len: 0, _pad: 0 },
};

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn address_mark(vip: &VipAddr) -> VipKey {
    let (addr, family) = addr::words(vip.addr);
    lb_common::address_mark(addr, family)
}

fn filter_slot(vip: &VipAddr) -> u32 {
    lb_common::vip_filter_slot(&addr::words(vip.addr).0)
}

/// What a VIP needs of its filter slot: to be let in, and, if stateless
/// or QUIC, to be looked up before the conn table.
fn filter_bits(spec: &VipSpec) -> u8 {
    FILTER_VIP | if spec.stateless || spec.quic.is_some() { FILTER_STATELESS } else { 0 }
}

pub fn check_quic(spec: &VipSpec) -> Result<(), ServiceError> {
    let Some(quic) = spec.quic else { return Ok(()) };
    if spec.vip.proto != Proto::Udp {
        return Err(ServiceError::BadQuic(spec.vip, "QUIC runs over UDP: make it a /udp VIP".into()));
    }
    quic.check().map_err(|e| ServiceError::BadQuic(spec.vip, e))
}

/// A new backend's server ID in `vip`: given or from its address, unique
/// in the VIP; none outside QUIC VIPs.
fn server_id_for(vip: &VipAddr, state: &VipState, spec: &BackendSpec) -> Result<Option<ServerId>, ServiceError> {
    let Some(quic) = state.spec.quic else {
        return match spec.server_id {
            Some(_) => Err(ServiceError::ServerIdWithoutQuic(*vip)),
            None => Ok(None),
        };
    };
    let id = spec.server_id.unwrap_or_else(|| quic.server_id_of(spec.addr));
    if !quic.fits(id) {
        return Err(ServiceError::ServerIdTooLong { vip: *vip, backend: spec.addr, id: id.0, len: quic.server_id_len });
    }
    if let Some((holder, _)) = state.backends.iter().find(|(a, b)| **a != spec.addr && b.server_id == Some(id)) {
        return Err(ServiceError::ServerIdTaken { vip: *vip, backend: spec.addr, id: quic.hex(id), holder: *holder });
    }
    Ok(Some(id))
}

/// The `QUIC_SERVERS` entries of a VIP's backends: each one that may take
/// packets (healthy, or every one while failing open; drained ones too, as
/// their connections stay on them).
fn quic_servers(
    vip_id: u32,
    backends: &BTreeMap<IpAddr, BackendState>,
    fail_open: bool,
    quic: &QuicSpec,
) -> BTreeMap<QuicServerKey, QuicServer> {
    backends
        .values()
        .filter(|b| b.healthy || fail_open)
        .filter_map(|b| {
            let id = b.server_id?;
            let key = QuicServerKey { vip_id, _pad: 0, server_id: server_id_word(&quic.octets(id)) };
            Some((key, QuicServer { backend_id: b.id, cookie: b.cookie }))
        })
        .collect()
}

/// Writes the difference between two sets of `QUIC_SERVERS` entries.
fn write_quic_servers(
    dp: &mut Dataplane,
    old: &BTreeMap<QuicServerKey, QuicServer>,
    new: &BTreeMap<QuicServerKey, QuicServer>,
) -> Result<(), DataplaneError> {
    for (key, server) in new {
        if old.get(key) != Some(server) {
            dp.set_quic_server(key, server)?;
        }
    }
    for key in old.keys().filter(|k| !new.contains_key(k)) {
        dp.remove_quic_server(key)?;
    }
    Ok(())
}

/// A backend's identity for Maglev: its address bytes, the same on every host.
fn identity(addr: IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

pub fn check_ring_size(size: u32) -> Result<(), ServiceError> {
    if size > MAX_RING_SIZE {
        return Err(ServiceError::RingSizeTooLarge(size));
    }
    if !maglev::is_prime(size) {
        return Err(ServiceError::RingSizeNotPrime(size));
    }
    Ok(())
}

fn check_weight(weight: u32) -> Result<(), ServiceError> {
    if weight > MAX_WEIGHT {
        return Err(ServiceError::WeightOutOfRange(weight));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vip_addresses_print_as_the_cli_writes_them() {
        let v4 = VipAddr { addr: "203.0.113.10".parse().unwrap(), port: 80, proto: Proto::Tcp };
        let v6 = VipAddr { addr: "2001:db8::10".parse().unwrap(), port: 0, proto: Proto::Udp };
        assert_eq!(v4.to_string(), "203.0.113.10:80/tcp");
        assert_eq!(v6.to_string(), "[2001:db8::10]:0/udp");
    }

    #[test]
    fn vip_addresses_parse_and_bad_ones_say_why() {
        let v: VipAddr = "[2001:db8::10]:443/TCP".parse().unwrap();
        assert_eq!((v.addr, v.port, v.proto), ("2001:db8::10".parse().unwrap(), 443, Proto::Tcp));
        assert!("203.0.113.10:80".parse::<VipAddr>().unwrap_err().contains("no protocol"));
        assert!("203.0.113.10:80/sctp".parse::<VipAddr>().unwrap_err().contains("sctp"));
        assert!("203.0.113.300:80/tcp".parse::<VipAddr>().unwrap_err().contains("not ADDR:PORT"));
        assert!("2001:db8::10:80/tcp".parse::<VipAddr>().is_err());
    }

    #[test]
    fn free_ids_are_saved_as_runs_and_read_back_in_order() {
        #[derive(Serialize, Deserialize)]
        struct Ids(#[serde(with = "id_runs")] VecDeque<u32>);
        let ids: VecDeque<u32> = [7, 8, 9, 3, 10, 11, 0].into_iter().chain(100..65536).collect();
        let text = serde_json::to_string(&Ids(ids.clone())).unwrap();
        assert_eq!(text, "[[7,3],[3,1],[10,2],[0,1],[100,65436]]");
        assert_eq!(serde_json::from_str::<Ids>(&text).unwrap().0, ids);
        // Older state files list every id.
        assert_eq!(serde_json::from_str::<Ids>("[5,6,2]").unwrap().0, [5, 6, 2]);
    }

    #[test]
    fn ring_sizes_must_be_prime_and_bounded() {
        assert!(check_ring_size(65537).is_ok());
        assert!(matches!(check_ring_size(65536), Err(ServiceError::RingSizeNotPrime(65536))));
        assert!(matches!(check_ring_size(2_000_003), Err(ServiceError::RingSizeTooLarge(_))));
    }

    #[test]
    fn ring_fingerprints_follow_addresses_not_ids() {
        let set = |ids: &[u32], last: &str| -> BTreeMap<IpAddr, BackendState> {
            ["198.51.100.1", "198.51.100.2", last]
                .iter()
                .zip(ids)
                .map(|(a, id)| {
                    (
                        a.parse().unwrap(),
                        BackendState { id: *id, cookie: 1, weight: 1, drained: false, healthy: true, server_id: None },
                    )
                })
                .collect()
        };
        let (ring_a, _, here) = plan_ring(&set(&[1, 2, 3], "198.51.100.3"), 251);
        let (ring_b, _, there) = plan_ring(&set(&[70, 9, 4000], "198.51.100.3"), 251);
        assert_ne!(ring_a, ring_b, "the ids differ between the two hosts");
        assert_eq!(here, there, "the same backends give the same fingerprint");
        let (_, _, other) = plan_ring(&set(&[1, 2, 3], "198.51.100.4"), 251);
        assert_ne!(here, other, "another backend set gives another");
        let (_, _, bigger) = plan_ring(&set(&[1, 2, 3], "198.51.100.3"), 257);
        assert_ne!(here, bigger, "another ring size too");
        assert_eq!(plan_ring(&BTreeMap::new(), 251).2, 0, "no ring, no fingerprint");
    }
}
