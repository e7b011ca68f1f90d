//! The loaded XDP objects and typed access to every map they own. Nothing
//! here decides anything: `services.rs` says what to write, this writes it.

use std::{net::IpAddr, path::PathBuf};

use aya::{
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuValues},
    programs::{ProgramError, Xdp},
    Ebpf, EbpfLoader, Pod,
};
use lb_common::{
    conntrack, decap_stat, flow_digest, map_names, program_names,
    quic::{QuicServer, QuicServerKey},
    source_hash, stat, Backend, BackendStats, Config, ConnBucket, ConnValue, DecapAddr, DecapConfig, DecapStats,
    FlowKey, GlobalStats, RingWord, VipEntry, VipKey, VipMeta, VipStats, CONN_F_SOURCE_HASH, CONN_WAYS,
    DEFAULT_CONN_TABLE_SIZE, DEFAULT_RING_CAPACITY, MAX_VIPS, RING_SLOTS_PER_WORD,
};

use crate::{object, sys};

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("loading the XDP object failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("the XDP program failed to load or attach: {0}")]
    Program(#[from] ProgramError),
    #[error("map {name}: {source}")]
    Map { name: &'static str, source: MapError },
    #[error("map {0} is missing from the XDP object")]
    MissingMap(&'static str),
    #[error("cannot count the possible CPUs: {0}")]
    Cpus(std::io::Error),
    #[error("reading {0}: {1}")]
    Proc(String, std::io::Error),
    #[error("writing {count} ring slots at {offset}: {source}")]
    RingWrite { offset: u32, count: usize, source: std::io::Error },
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

/// Sizes fixed when the object is loaded.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub conn_table_size: u32,
    /// Slots in the ring array shared by all VIPs (each VIP needs three rings).
    pub ring_capacity: u32,
    /// Load the bench-only object (restores each packet after forwarding it).
    pub bench_restore: bool,
    /// Load the offload flavor (stateless VIPs only, no conn table; what a
    /// NIC's XDP JIT can run) instead of the full balancer.
    pub offload_flavor: bool,
    /// Pin every map in this bpffs directory; maps already pinned there are
    /// reused with their contents (a controller restart).
    pub pin_dir: Option<PathBuf>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            conn_table_size: DEFAULT_CONN_TABLE_SIZE,
            ring_capacity: DEFAULT_RING_CAPACITY,
            bench_restore: false,
            offload_flavor: false,
            pin_dir: None,
        }
    }
}

/// Where a [`Dataplane`]'s program and maps live.
enum Loaded {
    /// Loaded by aya on the host: the program, its maps and its log ring.
    Host(Ebpf),
    /// The offload flavor's maps on a NIC (its program is `nic.rs`'s).
    Nic(std::collections::BTreeMap<String, Map>),
}

/// The balancer program and its maps.
pub struct Dataplane {
    loaded: Loaded,
    ring_capacity: u32,
    /// The ring array's values mapped here, where the kernel let them be
    /// (a NIC's, or one pinned by an older lbctl, are written by updates).
    rings_mapped: Option<sys::MappedArray>,
    conn_buckets: u32,
    /// The XDP program's name (the full balancer or its offload flavor).
    program: &'static str,
    /// The offload flavor's maps on the NIC (`--xdp-mode offload`), which
    /// every write to a shared map also goes to.
    mirror: Option<Box<Dataplane>>,
}

/// What a write does to what packets can reach, for the mirror's order.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Change {
    /// The host first: the NIC never names what the host does not know.
    Adds,
    /// The NIC first, for the same reason.
    Removes,
}

impl Dataplane {
    /// Loads the balancer into the kernel (verified, not attached).
    pub fn load(opts: LoadOptions) -> Result<Self, DataplaneError> {
        let (bytes, program) = match (opts.offload_flavor, opts.bench_restore) {
            (true, false) => (object::OFFLOAD, program_names::OFFLOAD),
            (true, true) => (object::OFFLOAD_BENCH, program_names::OFFLOAD),
            (false, true) => (object::BALANCER_BENCH, program_names::BALANCER),
            (false, false) => (object::BALANCER, program_names::BALANCER),
        };
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(map_names::CONNS, opts.conn_table_size.div_ceil(CONN_WAYS as u32));
        loader.map_max_entries(map_names::RINGS, opts.ring_capacity.div_ceil(RING_SLOTS_PER_WORD));
        if let Some(dir) = &opts.pin_dir {
            for name in map_names::BALANCER_MAPS {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        let mut ebpf = loader.load(bytes)?;
        load_xdp(&mut ebpf, program)?;
        let rings_mapped = match ebpf.map(map_names::RINGS) {
            Some(Map::Array(data)) => {
                let words = data.info().map(|i| i.max_entries()).map_err(map_err(map_names::RINGS))?;
                let len = words as usize * std::mem::size_of::<RingWord>();
                sys::MappedArray::new(data.fd(), len)
                    .inspect_err(|e| tracing::debug!(error = %e, "the ring array is written by map updates"))
                    .ok()
            }
            _ => None,
        };
        // Rings start on whole words: the usable capacity is whole words too.
        let ring_capacity = opts.ring_capacity / RING_SLOTS_PER_WORD * RING_SLOTS_PER_WORD;
        // An adopted (pinned) table keeps the size it was made with (the
        // offload flavor has none).
        let conn_buckets = match ebpf.map(map_names::CONNS) {
            Some(Map::Array(data)) => data.info().map(|i| i.max_entries()).map_err(map_err(map_names::CONNS))?,
            _ => 0,
        };
        Ok(Self { loaded: Loaded::Host(ebpf), ring_capacity, rings_mapped, conn_buckets, program, mirror: None })
    }

    /// The offload flavor's maps as loaded for a NIC by `nic.rs`, to be the
    /// host's [mirror](Self::set_mirror).
    pub fn on_nic(maps: std::collections::BTreeMap<String, MapData>) -> Result<Self, DataplaneError> {
        let mut typed = std::collections::BTreeMap::new();
        for (name, data) in maps {
            let map = Map::from_map_data(data).map_err(|source| DataplaneError::Map { name: "(NIC)", source })?;
            typed.insert(name, map);
        }
        let mut nic = Self {
            loaded: Loaded::Nic(typed),
            ring_capacity: 0,
            rings_mapped: None,
            conn_buckets: 0,
            program: program_names::OFFLOAD,
            mirror: None,
        };
        nic.ring_capacity = nic.array_len(map_names::RINGS)? * RING_SLOTS_PER_WORD;
        Ok(nic)
    }

    /// The program aya loaded on the host (a NIC's is not reachable here:
    /// asking for it is a bug).
    pub fn program(&mut self) -> &mut Xdp {
        let name = self.program;
        xdp(self.ebpf(), name)
    }

    fn ebpf(&mut self) -> &mut Ebpf {
        match &mut self.loaded {
            Loaded::Host(ebpf) => ebpf,
            Loaded::Nic(_) => panic!("the offload flavor on a NIC has no host program or log ring"),
        }
    }

    /// Makes `nic` (the offload flavor's maps) a copy of this program's
    /// shared maps; from then on every write to them also goes to `nic`, in
    /// the order [`Change`] says. The copy goes in the order packets follow
    /// (config, backends, rings, then what makes a VIP reachable), so the
    /// NIC never names what the host does not know.
    pub fn set_mirror(&mut self, mut nic: Dataplane) -> Result<(), DataplaneError> {
        nic.set_config_here(&self.config()?)?;
        self.copy_array::<Backend>(&mut nic, map_names::BACKENDS)?;
        self.copy_array::<RingWord>(&mut nic, map_names::RINGS)?;
        self.copy_array::<u8>(&mut nic, map_names::VIP_FILTER)?;
        self.copy_array::<VipEntry>(&mut nic, map_names::VIP_ENTRIES)?;
        let vips = self.hash::<VipKey, VipMeta>(map_names::VIPS)?;
        let vips: Vec<(VipKey, VipMeta)> = vips.iter().collect::<Result<_, _>>().map_err(map_err(map_names::VIPS))?;
        let mut nic_vips = nic.hash::<VipKey, VipMeta>(map_names::VIPS)?;
        let stale: Vec<VipKey> =
            nic_vips.keys().filter_map(Result::ok).filter(|k| !vips.iter().any(|(v, _)| v == k)).collect();
        for key in stale {
            nic_vips.remove(&key).map_err(map_err(map_names::VIPS))?;
        }
        for (key, meta) in &vips {
            nic_vips.insert(key, meta, 0).map_err(map_err(map_names::VIPS))?;
        }
        self.copy_array::<u32>(&mut nic, map_names::VIP_SLOTS)?;
        self.mirror = Some(Box::new(nic));
        Ok(())
    }

    /// Copies an array map to the mirror, as far as both reach.
    fn copy_array<V: Pod + Default>(&mut self, nic: &mut Dataplane, name: &'static str) -> Result<(), DataplaneError> {
        let len = self.array_len(name)?.min(nic.array_len(name)?);
        let values: Vec<V> = sys::array_values(self.map_fd(name)?, len)
            .map_err(|e| DataplaneError::Map { name, source: syscall_error("BPF_MAP_LOOKUP_BATCH", e) })?;
        nic.write_array(name, 0, &values)
            .map_err(|e| DataplaneError::Map { name, source: syscall_error("BPF_MAP_UPDATE_ELEM", e) })
    }

    fn array_len(&mut self, name: &'static str) -> Result<u32, DataplaneError> {
        let Map::Array(data) = self.map(name)? else { return Err(DataplaneError::MissingMap(name)) };
        data.info().map(|i| i.max_entries()).map_err(map_err(name))
    }

    pub fn mirror(&mut self) -> Option<&mut Dataplane> {
        self.mirror.as_deref_mut()
    }

    /// Applies `write` here and to the mirror, in `change`'s order; if the
    /// second write fails, `undo` puts the first back, so that the two
    /// stay the same.
    fn mirrored(
        &mut self,
        change: Change,
        write: &dyn Fn(&mut Dataplane) -> Result<(), DataplaneError>,
        undo: &dyn Fn(&mut Dataplane) -> Result<(), DataplaneError>,
    ) -> Result<(), DataplaneError> {
        let Some(mut nic) = self.mirror.take() else { return write(self) };
        let (first, second): (&mut Dataplane, &mut Dataplane) =
            if change == Change::Adds { (self, &mut nic) } else { (&mut nic, self) };
        let result = write(first).and_then(|()| {
            write(second).inspect_err(|_| {
                let _ = undo(first);
            })
        });
        self.mirror = Some(nic);
        result
    }

    /// The reader of the program's aya-log records (decision logs).
    pub fn logger(&mut self) -> Result<aya_log::EbpfLogger<&'static dyn log::Log>, aya_log::Error> {
        aya_log::EbpfLogger::init(self.ebpf())
    }

    pub fn ring_capacity(&self) -> u32 {
        self.ring_capacity
    }

    /// Whether rings are written through the mapped ring array.
    pub fn rings_mapped(&self) -> bool {
        self.rings_mapped.is_some()
    }

    fn map(&mut self, name: &'static str) -> Result<&mut Map, DataplaneError> {
        match &mut self.loaded {
            Loaded::Host(ebpf) => ebpf.map_mut(name),
            Loaded::Nic(maps) => maps.get_mut(name),
        }
        .ok_or(DataplaneError::MissingMap(name))
    }

    fn hash<K: Pod, V: Pod>(&mut self, name: &'static str) -> Result<HashMap<&mut MapData, K, V>, DataplaneError> {
        HashMap::try_from(self.map(name)?).map_err(map_err(name))
    }

    fn array<V: Pod>(&mut self, name: &'static str) -> Result<Array<&mut MapData, V>, DataplaneError> {
        Array::try_from(self.map(name)?).map_err(map_err(name))
    }

    fn per_cpu<V: Pod>(&mut self, name: &'static str) -> Result<PerCpuArray<&mut MapData, V>, DataplaneError> {
        PerCpuArray::try_from(self.map(name)?).map_err(map_err(name))
    }

    /// Writes the config (with the conn table's size, which the loader knows).
    pub fn set_config(&mut self, config: &Config) -> Result<(), DataplaneError> {
        let old = self.config()?;
        self.mirrored(Change::Adds, &|dp| dp.set_config_here(config), &|dp| dp.set_config_here(&old))
    }

    fn set_config_here(&mut self, config: &Config) -> Result<(), DataplaneError> {
        let config = Config { conn_buckets: self.conn_buckets, ..*config };
        self.array::<Config>(map_names::CONFIG)?.set(0, config, 0).map_err(map_err(map_names::CONFIG))
    }

    pub fn config(&mut self) -> Result<Config, DataplaneError> {
        self.array::<Config>(map_names::CONFIG)?.get(&0, 0).map_err(map_err(map_names::CONFIG))
    }

    /// Inserts or replaces a VIP. Replacing is atomic for packets: they see
    /// the old value or the new one. The hash map holds every VIP; a VIP
    /// also goes to the array lookup when its slot is free or its own.
    pub fn set_vip(&mut self, key: &VipKey, meta: &VipMeta) -> Result<(), DataplaneError> {
        let old = self.vip(key)?;
        let undo = |dp: &mut Dataplane| match &old {
            Some(old) => dp.set_vip_here(key, old),
            None => dp.remove_vip_here(key),
        };
        self.mirrored(Change::Adds, &|dp| dp.set_vip_here(key, meta), &undo)
    }

    fn set_vip_here(&mut self, key: &VipKey, meta: &VipMeta) -> Result<(), DataplaneError> {
        self.hash::<VipKey, VipMeta>(map_names::VIPS)?.insert(key, meta, 0).map_err(map_err(map_names::VIPS))?;
        // Address marks and fragment entries are looked up by hash only.
        if meta.vip_id >= MAX_VIPS || key.family & 0x80 != 0 {
            return Ok(());
        }
        let slot = lb_common::vip_slot(key);
        let half = match self.slot_owner(slot)? {
            None => 0,
            Some((index, owner)) if owner.key == *key => 1 - index % 2,
            Some(_) => return Ok(()),
        };
        let index = 2 * meta.vip_id + half;
        let entry = VipEntry { key: *key, meta: *meta };
        self.array::<VipEntry>(map_names::VIP_ENTRIES)?
            .set(index, entry, 0)
            .map_err(map_err(map_names::VIP_ENTRIES))?;
        // One aligned word: packets follow it to the whole new entry.
        self.array::<u32>(map_names::VIP_SLOTS)?.set(slot, index + 1, 0).map_err(map_err(map_names::VIP_SLOTS))
    }

    /// Removes a VIP: from the array lookup first, so that no packet finds
    /// it there once the hash map no longer has it.
    pub fn remove_vip(&mut self, key: &VipKey) -> Result<(), DataplaneError> {
        let Some(old) = self.vip(key)? else { return Ok(()) };
        self.mirrored(Change::Removes, &|dp| dp.remove_vip_here(key), &|dp| dp.set_vip_here(key, &old))
    }

    fn remove_vip_here(&mut self, key: &VipKey) -> Result<(), DataplaneError> {
        let slot = lb_common::vip_slot(key);
        if self.slot_owner(slot)?.is_some_and(|(_, owner)| owner.key == *key) {
            self.array::<u32>(map_names::VIP_SLOTS)?.set(slot, 0, 0).map_err(map_err(map_names::VIP_SLOTS))?;
        }
        self.hash::<VipKey, VipMeta>(map_names::VIPS)?.remove(key).map_err(map_err(map_names::VIPS))
    }

    /// The entry index and entry that own an array-lookup slot, if any.
    fn slot_owner(&mut self, slot: u32) -> Result<Option<(u32, VipEntry)>, DataplaneError> {
        let word = self.array::<u32>(map_names::VIP_SLOTS)?.get(&slot, 0).map_err(map_err(map_names::VIP_SLOTS))?;
        if word == 0 {
            return Ok(None);
        }
        let entry = self
            .array::<VipEntry>(map_names::VIP_ENTRIES)?
            .get(&(word - 1), 0)
            .map_err(map_err(map_names::VIP_ENTRIES))?;
        Ok(Some((word - 1, entry)))
    }

    pub fn vip(&mut self, key: &VipKey) -> Result<Option<VipMeta>, DataplaneError> {
        optional(self.hash::<VipKey, VipMeta>(map_names::VIPS)?.get(key, 0), map_names::VIPS)
    }

    /// Marks (1) or clears (0) a slot of the VIP-address filter.
    pub fn set_vip_filter(&mut self, slot: u32, value: u8) -> Result<(), DataplaneError> {
        let old = self.vip_filter(slot)?;
        let change = if value == 0 { Change::Removes } else { Change::Adds };
        self.mirrored(change, &|dp| dp.set_vip_filter_here(slot, value), &|dp| dp.set_vip_filter_here(slot, old))
    }

    fn set_vip_filter_here(&mut self, slot: u32, value: u8) -> Result<(), DataplaneError> {
        self.array::<u8>(map_names::VIP_FILTER)?.set(slot, value, 0).map_err(map_err(map_names::VIP_FILTER))
    }

    pub fn vip_filter(&mut self, slot: u32) -> Result<u8, DataplaneError> {
        self.array::<u8>(map_names::VIP_FILTER)?.get(&slot, 0).map_err(map_err(map_names::VIP_FILTER))
    }

    /// Writes a backend entry; a cleared (cookie 0) or retired one is a
    /// removal for the NIC mirror's ordering.
    pub fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<(), DataplaneError> {
        let old = self.backend(id)?;
        let removes = backend.cookie == 0 || backend.flags & lb_common::BACKEND_F_RETIRED != 0;
        let change = if removes { Change::Removes } else { Change::Adds };
        self.mirrored(change, &|dp| dp.set_backend_here(id, backend), &|dp| dp.set_backend_here(id, &old))
    }

    fn set_backend_here(&mut self, id: u32, backend: &Backend) -> Result<(), DataplaneError> {
        self.array::<Backend>(map_names::BACKENDS)?.set(id, backend, 0).map_err(map_err(map_names::BACKENDS))
    }

    /// Names the backend a QUIC VIP's server ID routes to (the host's
    /// balancer only: the offload flavor passes QUIC VIPs up to it).
    pub fn set_quic_server(&mut self, key: &QuicServerKey, server: &QuicServer) -> Result<(), DataplaneError> {
        let name = map_names::QUIC_SERVERS;
        self.hash::<QuicServerKey, QuicServer>(name)?.insert(key, server, 0).map_err(map_err(name))
    }

    pub fn remove_quic_server(&mut self, key: &QuicServerKey) -> Result<(), DataplaneError> {
        let name = map_names::QUIC_SERVERS;
        match self.hash::<QuicServerKey, QuicServer>(name)?.remove(key) {
            Err(MapError::KeyNotFound) => Ok(()),
            other => other.map_err(map_err(name)),
        }
    }

    /// Two NICs: encapsulated packets leave through interface `ifindex`
    /// (with `Settings::egress_mac` set, which turns the redirect on).
    pub fn set_egress(&mut self, ifindex: u32) -> Result<(), DataplaneError> {
        let name = map_names::EGRESS;
        let mut devmap = aya::maps::DevMap::try_from(self.map(name)?).map_err(map_err(name))?;
        devmap.set(0, ifindex, None, 0).map_err(|e| match e {
            aya::maps::xdp::XdpMapError::MapError(e) => map_err(name)(e),
            // Only a chained program can be refused that way; none is given.
            aya::maps::xdp::XdpMapError::ChainedProgramNotSupported => unreachable!("no program chained"),
        })
    }

    /// Forwarded packets that came tagged with VLAN `from` leave tagged
    /// `to` (the innermost tag of a QinQ pair).
    pub fn set_vlan_egress(&mut self, from: u16, to: u16) -> Result<(), DataplaneError> {
        let name = map_names::VLAN_EGRESS;
        self.array::<u16>(name)?.set(from as u32, to, 0).map_err(map_err(name))
    }

    pub fn backend(&mut self, id: u32) -> Result<Backend, DataplaneError> {
        self.array::<Backend>(map_names::BACKENDS)?.get(&id, 0).map_err(map_err(map_names::BACKENDS))
    }

    /// Writes backend ids into the ring array from slot `offset` (a
    /// multiple of [`RING_SLOTS_PER_WORD`]: rings start on whole words).
    /// (Rings are written where no packet reads yet: a failure half way
    /// needs no undo; the VIP entry that makes a ring live comes after.)
    pub fn write_ring(&mut self, offset: u32, slots: &[u16]) -> Result<(), DataplaneError> {
        self.mirrored(Change::Adds, &|dp| dp.write_ring_here(offset, slots), &|_| Ok(()))
    }

    fn write_ring_here(&mut self, offset: u32, slots: &[u16]) -> Result<(), DataplaneError> {
        assert_eq!(offset % RING_SLOTS_PER_WORD, 0, "rings start on whole words");
        let words: Vec<RingWord> = slots
            .chunks(RING_SLOTS_PER_WORD as usize)
            .map(|chunk| {
                let mut word = RingWord::default();
                word[..chunk.len()].copy_from_slice(chunk);
                word
            })
            .collect();
        let first = offset / RING_SLOTS_PER_WORD;
        match &mut self.rings_mapped {
            Some(mapped) => mapped.write(first as usize, &words),
            None => self.write_array(map_names::RINGS, first, &words),
        }
        .map_err(|source| DataplaneError::RingWrite { offset, count: slots.len(), source })
    }

    /// Writes `values` into an array map from index `first`: in batches on
    /// the host, one entry at a time on a NIC (offloaded maps have no batch
    /// operations: the kernel answers ENOTSUPP).
    fn write_array<V: Pod>(&mut self, name: &'static str, first: u32, values: &[V]) -> std::io::Result<()> {
        let on_nic = matches!(self.loaded, Loaded::Nic(_));
        let fd = self.map_fd(name).map_err(std::io::Error::other)?;
        if !on_nic {
            let keys: Vec<u32> = (first..first + values.len() as u32).collect();
            return sys::update_batch(fd, &keys, values);
        }
        let mut map: Array<&mut MapData, V> = self.array(name).map_err(std::io::Error::other)?;
        for (i, value) in values.iter().enumerate() {
            map.set(first + i as u32, *value, 0).map_err(std::io::Error::other)?;
        }
        Ok(())
    }

    /// The backend id in one slot of the ring array.
    /// The `size` slots of the ring at `offset`, read from the mapped ring
    /// array (`None` where it is not mapped).
    pub fn read_ring(&self, offset: u32, size: u32) -> Option<Vec<u16>> {
        let words: Vec<RingWord> = self
            .rings_mapped
            .as_ref()?
            .read((offset / RING_SLOTS_PER_WORD) as usize, size.div_ceil(RING_SLOTS_PER_WORD) as usize)?;
        let mut slots: Vec<u16> = words.into_iter().flatten().collect();
        slots.truncate(size as usize);
        Some(slots)
    }

    pub fn ring_slot(&mut self, slot: u32) -> Result<u32, DataplaneError> {
        let word = self
            .array::<RingWord>(map_names::RINGS)?
            .get(&(slot / RING_SLOTS_PER_WORD), 0)
            .map_err(map_err(map_names::RINGS))?;
        Ok(word[(slot % RING_SLOTS_PER_WORD) as usize] as u32)
    }

    /// The flow's conn-table entry, as the program would find it.
    pub fn conn(&mut self, flow: &FlowKey) -> Result<Option<ConnValue>, DataplaneError> {
        let digest = flow_digest(&flow.src, &flow.dst, flow.src_port, flow.dst_port, flow.proto);
        let index = conntrack::bucket_index(digest, self.conn_buckets);
        let bucket = self.array::<ConnBucket>(map_names::CONNS)?.get(&index, 0).map_err(map_err(map_names::CONNS))?;
        Ok(conntrack::find(&bucket, digest).map(|(_, word)| {
            let source_only = (word >> 60) as u8 & CONN_F_SOURCE_HASH != 0;
            conntrack::unpack(word, if source_only { source_hash(&flow.src) } else { digest as u32 })
        }))
    }

    pub fn set_conn(&mut self, flow: &FlowKey, value: &ConnValue) -> Result<(), DataplaneError> {
        self.set_conns(std::slice::from_ref(flow), std::slice::from_ref(value))
    }

    /// Remembers flows as the program would, in order (tests, benchmarks):
    /// the table is read whole, and the buckets touched written back in
    /// one batch.
    pub fn set_conns(&mut self, flows: &[FlowKey], values: &[ConnValue]) -> Result<(), DataplaneError> {
        let mut table = self.conn_buckets()?;
        let mut touched = std::collections::BTreeSet::new();
        for (flow, value) in flows.iter().zip(values) {
            let digest = flow_digest(&flow.src, &flow.dst, flow.src_port, flow.dst_port, flow.proto);
            let index = conntrack::bucket_index(digest, self.conn_buckets);
            conntrack::insert(&mut table[index as usize], digest, conntrack::pack(value));
            touched.insert(index);
        }
        let (indices, buckets): (Vec<u32>, Vec<ConnBucket>) =
            touched.into_iter().map(|i| (i, table[i as usize])).unzip();
        sys::update_batch(self.map_fd(map_names::CONNS)?, &indices, &buckets).map_err(|e| DataplaneError::Map {
            name: map_names::CONNS,
            source: syscall_error("BPF_MAP_UPDATE_BATCH", e),
        })
    }

    fn map_fd(&mut self, name: &'static str) -> Result<std::os::fd::BorrowedFd<'_>, DataplaneError> {
        use std::os::fd::AsFd;
        let map: &MapData = match self.map(name)? {
            Map::Array(data) | Map::HashMap(data) | Map::LruHashMap(data) | Map::PerCpuArray(data) => data,
            _ => return Err(DataplaneError::MissingMap(name)),
        };
        Ok(map.fd().as_fd())
    }

    /// Bytes the kernel charges for the conn table (its `memlock` in
    /// fdinfo), and the flows it holds at most.
    pub fn conn_table_memory(&mut self) -> Result<(u64, u32), DataplaneError> {
        use std::os::fd::AsRawFd;
        let path = format!("/proc/self/fdinfo/{}", self.map_fd(map_names::CONNS)?.as_raw_fd());
        let info = std::fs::read_to_string(&path).map_err(|e| DataplaneError::Proc(path, e))?;
        let memlock =
            info.lines().find_map(|l| l.strip_prefix("memlock:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
        Ok((memlock, self.conn_capacity()))
    }

    /// Flows the conn table holds at most.
    pub fn conn_capacity(&self) -> u32 {
        self.conn_buckets * CONN_WAYS as u32
    }

    /// Flows in the conn table now (the whole table is read), and its capacity.
    pub fn conn_count(&mut self) -> Result<(u64, u32), DataplaneError> {
        let count = self.conn_buckets()?.iter().flat_map(|b| b.slots.iter()).filter(|s| s.value != 0).count();
        Ok((count as u64, self.conn_capacity()))
    }

    /// The whole conn table.
    fn conn_buckets(&mut self) -> Result<Vec<ConnBucket>, DataplaneError> {
        let buckets = self.conn_buckets;
        sys::array_values(self.map_fd(map_names::CONNS)?, buckets).map_err(|e| DataplaneError::Map {
            name: map_names::CONNS,
            source: syscall_error("BPF_MAP_LOOKUP_BATCH", e),
        })
    }

    /// Global counters summed over CPUs, indexed by [`lb_common::stat`].
    pub fn global_stats(&mut self) -> Result<[u64; stat::COUNT], DataplaneError> {
        let per_cpu = self.per_cpu::<GlobalStats>(map_names::GLOBAL_STATS)?;
        let values = per_cpu.get(&0, 0).map_err(map_err(map_names::GLOBAL_STATS))?;
        let mut sum = [0u64; stat::COUNT];
        for cpu in values.iter() {
            for (s, v) in sum.iter_mut().zip(cpu.counters) {
                *s += v;
            }
        }
        Ok(sum)
    }

    /// A VIP's counters; with a NIC mirror, what the NIC forwarded too.
    pub fn vip_stats(&mut self, vip_id: u32) -> Result<VipStats, DataplaneError> {
        let here = self.vip_stats_here(vip_id)?;
        let Some(nic) = self.mirror() else { return Ok(here) };
        let there = nic.vip_stats_here(vip_id)?;
        Ok(VipStats {
            packets: here.packets + there.packets,
            bytes: here.bytes + there.bytes,
            new_flows: here.new_flows + there.new_flows,
        })
    }

    fn vip_stats_here(&mut self, vip_id: u32) -> Result<VipStats, DataplaneError> {
        if self.program == program_names::OFFLOAD {
            let name = map_names::OFFLOAD_VIP_STATS;
            return self.array::<VipStats>(name)?.get(&vip_id, 0).map_err(map_err(name));
        }
        let values =
            self.per_cpu::<VipStats>(map_names::VIP_STATS)?.get(&vip_id, 0).map_err(map_err(map_names::VIP_STATS))?;
        Ok(values.iter().fold(VipStats::default(), |a, v| VipStats {
            packets: a.packets + v.packets,
            bytes: a.bytes + v.bytes,
            new_flows: a.new_flows + v.new_flows,
        }))
    }

    /// A backend's counters; with a NIC mirror, what the NIC sent it too.
    pub fn backend_stats(&mut self, backend_id: u32) -> Result<BackendStats, DataplaneError> {
        let here = self.backend_stats_here(backend_id)?;
        let Some(nic) = self.mirror() else { return Ok(here) };
        let there = nic.backend_stats_here(backend_id)?;
        Ok(here.plus(there))
    }

    fn backend_stats_here(&mut self, backend_id: u32) -> Result<BackendStats, DataplaneError> {
        if self.program == program_names::OFFLOAD {
            let name = map_names::OFFLOAD_BACKEND_STATS;
            return self.array::<BackendStats>(name)?.get(&backend_id, 0).map_err(map_err(name));
        }
        let values = self
            .per_cpu::<BackendStats>(map_names::BACKEND_STATS)?
            .get(&backend_id, 0)
            .map_err(map_err(map_names::BACKEND_STATS))?;
        Ok(values.iter().fold(BackendStats::default(), |a, v| a.plus(*v)))
    }

    /// Zeroes the counters of a VIP id before it is given to a new VIP.
    pub fn reset_vip_stats(&mut self, vip_id: u32) -> Result<(), DataplaneError> {
        if let Some(nic) = self.mirror() {
            nic.reset_vip_stats(vip_id)?;
        }
        if self.program == program_names::OFFLOAD {
            let name = map_names::OFFLOAD_VIP_STATS;
            return self.array::<VipStats>(name)?.set(vip_id, VipStats::default(), 0).map_err(map_err(name));
        }
        let zero = zeroed_per_cpu::<VipStats>()?;
        self.per_cpu::<VipStats>(map_names::VIP_STATS)?.set(vip_id, zero, 0).map_err(map_err(map_names::VIP_STATS))
    }

    /// Zeroes the counters of a backend id before it is reused.
    pub fn reset_backend_stats(&mut self, backend_id: u32) -> Result<(), DataplaneError> {
        if let Some(nic) = self.mirror() {
            nic.reset_backend_stats(backend_id)?;
        }
        if self.program == program_names::OFFLOAD {
            let name = map_names::OFFLOAD_BACKEND_STATS;
            return self
                .array::<BackendStats>(name)?
                .set(backend_id, BackendStats::default(), 0)
                .map_err(map_err(name));
        }
        let zero = zeroed_per_cpu::<BackendStats>()?;
        self.per_cpu::<BackendStats>(map_names::BACKEND_STATS)?
            .set(backend_id, zero, 0)
            .map_err(map_err(map_names::BACKEND_STATS))
    }
}

/// The decap program of a backend host and its address map.
pub struct Decap {
    ebpf: Ebpf,
}

impl Decap {
    pub fn load() -> Result<Self, DataplaneError> {
        let mut ebpf = EbpfLoader::new().load(object::DECAP)?;
        load_xdp(&mut ebpf, program_names::DECAP)?;
        Ok(Self { ebpf })
    }

    pub fn program(&mut self) -> &mut Xdp {
        xdp(&mut self.ebpf, program_names::DECAP)
    }

    /// Packets encapsulated to `addr` will be decapsulated.
    pub fn add_address(&mut self, addr: IpAddr) -> Result<(), DataplaneError> {
        let name = map_names::DECAP_ADDRS;
        let map = self.ebpf.map_mut(name).ok_or(DataplaneError::MissingMap(name))?;
        let mut map: HashMap<&mut MapData, DecapAddr, u8> = HashMap::try_from(map).map_err(map_err(name))?;
        map.insert(decap_key(addr), 1, 0).map_err(map_err(name))
    }

    /// GUE packets to this UDP port are decapsulated (0: none are).
    pub fn set_gue_port(&mut self, port: u16) -> Result<(), DataplaneError> {
        let name = map_names::DECAP_CONFIG;
        let map = self.ebpf.map_mut(name).ok_or(DataplaneError::MissingMap(name))?;
        let mut map: Array<&mut MapData, DecapConfig> = Array::try_from(map).map_err(map_err(name))?;
        map.set(0, DecapConfig { gue_port: port.to_be(), _pad: [0; 2] }, 0).map_err(map_err(name))
    }

    /// Pins the counters, so that `lbctl decap status` can read them.
    pub fn pin_stats(&mut self, path: &std::path::Path) -> Result<(), DataplaneError> {
        let name = map_names::DECAP_STATS;
        let map = self.ebpf.map_mut(name).ok_or(DataplaneError::MissingMap(name))?;
        let _ = std::fs::remove_file(path);
        map.pin(path).map_err(|e| DataplaneError::Map { name, source: MapError::PinError { name: None, error: e } })
    }

    /// The counters, summed over CPUs ([`decap_stat`] order).
    pub fn stats(&mut self) -> Result<[u64; decap_stat::COUNT], DataplaneError> {
        let name = map_names::DECAP_STATS;
        let map = self.ebpf.map_mut(name).ok_or(DataplaneError::MissingMap(name))?;
        sum_decap_stats(PerCpuArray::try_from(map).map_err(map_err(name))?)
    }

    /// The counters of a decap program pinned by [`Decap::pin_stats`].
    pub fn pinned_stats(path: &std::path::Path) -> Result<[u64; decap_stat::COUNT], DataplaneError> {
        let name = map_names::DECAP_STATS;
        let data = MapData::from_pin(path).map_err(map_err(name))?;
        sum_decap_stats(PerCpuArray::try_from(Map::PerCpuArray(data)).map_err(map_err(name))?)
    }
}

fn sum_decap_stats<T: std::borrow::Borrow<MapData>>(
    map: PerCpuArray<T, DecapStats>,
) -> Result<[u64; decap_stat::COUNT], DataplaneError> {
    let per_cpu = map.get(&0, 0).map_err(map_err(map_names::DECAP_STATS))?;
    let mut sum = [0u64; decap_stat::COUNT];
    for cpu in per_cpu.iter() {
        for (total, n) in sum.iter_mut().zip(cpu.counters) {
            *total += n;
        }
    }
    Ok(sum)
}

pub fn decap_key(addr: IpAddr) -> DecapAddr {
    let (addr, family) = crate::addr::words(addr);
    DecapAddr { addr, family, _pad: [0; 3] }
}

fn load_xdp(ebpf: &mut Ebpf, name: &str) -> Result<(), DataplaneError> {
    xdp(ebpf, name).load()?;
    Ok(())
}

fn xdp<'a>(ebpf: &'a mut Ebpf, name: &str) -> &'a mut Xdp {
    // The embedded object always has this program; anything else is a build bug.
    ebpf.program_mut(name)
        .and_then(|p| p.try_into().ok())
        .unwrap_or_else(|| panic!("the embedded XDP object has no XDP program {name}"))
}

fn syscall_error(call: &'static str, io_error: std::io::Error) -> MapError {
    MapError::SyscallError(aya::sys::SyscallError { call, io_error })
}

fn optional<V>(result: Result<V, MapError>, name: &'static str) -> Result<Option<V>, DataplaneError> {
    match result {
        Ok(v) => Ok(Some(v)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(DataplaneError::Map { name, source: e }),
    }
}

fn zeroed_per_cpu<V: Pod + Default>() -> Result<PerCpuValues<V>, DataplaneError> {
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| DataplaneError::Cpus(e))?;
    PerCpuValues::try_from(vec![V::default(); cpus]).map_err(DataplaneError::Cpus)
}
