//! What the balancer and its offload flavor share: the VIP, backend, ring
//! and config maps, the VIP lookup and the Maglev pick with its alternate
//! hop. Both programs build from this, so for a stateless VIP they choose
//! the same backend and alternate for the same packet.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap},
};
use lb_common::{
    fragment_key, ring_slot, source_hash, Backend, Config, FlowKey, RingWord, VipEntry, VipKey, VipMeta, AF_INET,
    ALTERNATE_RINGS, CONFIG_F_PORT0_V4, CONFIG_F_PORT0_V6, DEFAULT_RING_CAPACITY, MAX_ALTERNATES, MAX_BACKENDS,
    MAX_VIPS, RING_SLOTS_PER_WORD, VIP_FILTER_SLOTS, VIP_F_HASH_SRC_ONLY,
};

use crate::parse::Packet;

/// VIPs, one address mark per VIP address (`address_mark`) and one
/// fragment entry per address and protocol (`fragment_key`).
#[map]
pub static VIPS: HashMap<VipKey, VipMeta> = HashMap::with_max_entries(3 * MAX_VIPS, 0);
/// The VIP lookup in arrays (`lb_common::VIP_SLOTS`): slot -> entry index + 1.
#[map]
pub static VIP_SLOTS: Array<u32> = Array::with_max_entries(lb_common::VIP_SLOTS, 0);
#[map]
pub static VIP_ENTRIES: Array<VipEntry> = Array::with_max_entries(2 * MAX_VIPS, 0);
/// 1 where some VIP address hashes to the slot (`vip_filter_slot`).
#[map]
pub static VIP_FILTER: Array<u8> = Array::with_max_entries(VIP_FILTER_SLOTS, 0);
#[map]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);
/// Every VIP's Maglev ring(s), back to back: slot -> backend id. Mmapable,
/// so that userspace writes a ring by one copy.
#[map]
pub static RINGS: Array<RingWord> =
    Array::with_max_entries(DEFAULT_RING_CAPACITY / RING_SLOTS_PER_WORD, lb_common::BPF_F_MMAPABLE);
#[map]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);
/// The VIP for this destination: exact port first, then the port-0 VIP of
/// No VIP (yet): every flag clear.
pub static NO_VIP: VipMeta = VipMeta {
    vip_id: 0,
    flags: 0,
    ring_offset: 0,
    ring_size: 0,
    alt_rings_len: 0,
    alt_rings: [0; lb_common::ALTERNATE_RINGS],
    quic: lb_common::quic::QuicLb { config_id: 0, server_id_len: 0, cid_len: 0, _pad: 0 },
};

/// The VIP for this destination: exact port first, then the port-0 VIP of
/// the address if the config says one exists for this family. A pointer
/// into the map, not a copy (stack): a ring swap writes the other half of
/// the VIP's entry pair (or a new hash element), never the one a packet
/// is reading.
#[inline(always)]
pub fn lookup_vip(cfg: &Config, flow: &FlowKey) -> Option<&'static VipMeta> {
    let mut key = VipKey { addr: flow.dst, port: flow.dst_port, proto: flow.proto, family: flow.family };
    if let Some(vip) = vip_by_key(&key) {
        return Some(vip);
    }
    let port0 = if flow.family == AF_INET { CONFIG_F_PORT0_V4 } else { CONFIG_F_PORT0_V6 };
    if cfg.flags & port0 == 0 {
        return None;
    }
    key.port = 0;
    vip_by_key(&key)
}

/// A VIP by its key: the arrays first (inlined: no helper call), then
/// the hash map, which holds the VIPs whose slot another VIP owns.
#[inline(always)]
fn vip_by_key(key: &VipKey) -> Option<&'static VipMeta> {
    let word = VIP_SLOTS.get(lb_common::vip_slot(key)).copied().unwrap_or(0);
    if word != 0 {
        if let Some(entry) = VIP_ENTRIES.get(word - 1) {
            if entry.key == *key {
                return Some(&entry.meta);
            }
        }
    }
    unsafe { VIPS.get(key) }
}

/// The VIP that takes fragments for this address and protocol (userspace
/// names one per pair: the port-0 VIP, else the lowest port).
#[inline(always)]
pub fn lookup_fragment_vip(flow: &FlowKey) -> Option<&'static VipMeta> {
    unsafe { VIPS.get(&fragment_key(flow.dst, flow.proto, flow.family)) }
}

/// A backend chosen by the VIP's live ring.
pub struct Picked {
    pub backend_id: u32,
    pub backend: &'static Backend,
    /// The ring slot (the alternate rings are read at the same one).
    pub slot: u32,
    /// The hash the slot came from: outer source bits, IPv6 flow label.
    pub hash: u32,
}

/// Maglev: the ring slot of the flow's hash (`flow_hash`, or the source's
/// hash for `--hash src-ip`) names the backend.
#[inline(always)]
pub fn pick(vip: &VipMeta, pkt: &Packet, flow_hash: u32) -> Option<Picked> {
    if vip.ring_size == 0 {
        return None;
    }
    let hash = if vip.flags & VIP_F_HASH_SRC_ONLY != 0 { source_hash(&pkt.flow.src) } else { flow_hash };
    let slot = ring_slot(hash, vip.ring_size);
    let backend_id = ring_at(vip.ring_offset + slot)?;
    let backend = BACKENDS.get(backend_id)?;
    if backend.cookie == 0 {
        return None;
    }
    Some(Picked { backend_id, backend, slot, hash })
}

/// The backend id in slot `slot` of the ring array.
#[inline(always)]
fn ring_at(slot: u32) -> Option<u32> {
    let word = RINGS.get(slot / RING_SLOTS_PER_WORD)?;
    Some(word[(slot % RING_SLOTS_PER_WORD) as usize] as u32)
}

/// The alternate hops of a GUE packet, in the order a backend tries them:
/// backend ids, whose addresses go into the packet as it is written (ids
/// keep the stack small).
#[derive(Clone, Copy)]
pub struct Alternates {
    pub ids: [u32; MAX_ALTERNATES],
    pub len: usize,
}

impl Alternates {
    /// Zeroed, not a sentinel: the offload loader leaves .rodata (where a
    /// non-zero initializer would live) empty. Only the first `len` count.
    pub const NONE: Alternates = Alternates { ids: [0; MAX_ALTERNATES], len: 0 };

    #[inline(always)]
    fn names(&self, id: u32) -> bool {
        let mut named = false;
        for j in 0..MAX_ALTERNATES {
            named |= j < self.len && self.ids[j] == id;
        }
        named
    }
}

/// The alternate hops: what each alternate ring (the history newest
/// first, then the previous live ring) gives this slot, when it differs
/// from the chosen backend and from the alternates before it, still exists
/// (a removed backend stays, retired, while an alternate ring names it),
/// and has the chosen one's address family (the outer header is built for
/// it). One array read per alternate ring, and a backend read for each id
/// not named yet.
#[inline(always)]
pub fn alternates(vip: &VipMeta, chosen: &Backend, chosen_id: u32, slot: u32) -> Alternates {
    let mut out = Alternates::NONE;
    for i in 0..ALTERNATE_RINGS {
        if i as u32 >= vip.alt_rings_len {
            break;
        }
        let Some(id) = ring_at(vip.alt_rings[i] + slot) else { continue };
        if id == chosen_id || out.names(id) {
            continue;
        }
        let Some(backend) = BACKENDS.get(id) else { continue };
        if backend.cookie == 0 || backend.family != chosen.family {
            continue;
        }
        // The i-th ring adds at most the i-th alternate (len <= i); get_mut
        // rather than indexing: no panic path for the verifier to reject.
        if let Some(named) = out.ids.get_mut(out.len) {
            *named = id;
            out.len += 1;
        }
    }
    out
}

/// The address of backend `id`, as the GUE private data carries it.
#[inline(always)]
pub fn backend_addr(id: u32) -> Option<[u32; 4]> {
    BACKENDS.get(id).map(|b| b.addr)
}
