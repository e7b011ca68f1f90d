//! `--xdp-mode offload`: the offload flavor loaded for a NIC, its maps and
//! program bound to the device's ifindex (BPF_MAP_CREATE with map_ifindex,
//! BPF_PROG_LOAD with prog_ifindex: raw bpf(2), which aya 0.14 does not
//! wrap), and attached in hardware mode behind a pinned bpf_link. The
//! kernel hands all of it to the driver, whose JIT accepts the program or
//! says why not.

use std::{
    collections::{BTreeMap, HashSet},
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::Path,
};

use aya::maps::MapData;

use crate::{object, sys};

/// XDP attach modes (include/uapi/linux/if_link.h).
pub const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
pub const XDP_FLAGS_HW_MODE: u32 = 1 << 3;

#[derive(Debug, thiserror::Error)]
pub enum NicError {
    #[error("reading the offload flavor: {0}")]
    Object(String),
    #[error("the kernel refused to create map {0} on it ({1}): its driver does not offload BPF")]
    Map(String, std::io::Error),
    #[error("reusing the pinned NIC map {0}: {1}")]
    Pinned(String, String),
    #[error("its driver refused the offload flavor: {0}")]
    Program(std::io::Error),
    #[error("attaching the offload flavor: {0}")]
    Attach(std::io::Error),
}

/// The flavor for a NIC: its program and maps (by name), all device-bound.
pub struct NicProgram {
    pub program: OwnedFd,
    pub maps: BTreeMap<String, MapData>,
}

/// Loads the offload flavor for the device `ifindex` (0: for the host, as
/// the tests do); `ring_words` sizes its ring array as the host's. Maps
/// pinned in `pin_dir` are reused with their contents (a restart after
/// `--keep`); new ones are pinned there.
pub fn load_for_device(ifindex: u32, ring_words: u32, pin_dir: Option<&Path>) -> Result<NicProgram, NicError> {
    let mut obj = aya_obj::Object::parse(object::OFFLOAD).map_err(|e| NicError::Object(e.to_string()))?;
    let mut maps = BTreeMap::new();
    for (name, m) in &obj.maps {
        let pin = pin_dir.map(|dir| dir.join(name));
        let data = match &pin {
            Some(pin) if pin.exists() => {
                MapData::from_pin(pin).map_err(|e| NicError::Pinned(name.clone(), e.to_string()))?
            }
            _ => {
                let entries = if name == lb_common::map_names::RINGS { ring_words } else { m.max_entries() };
                // A NIC's maps take no flags (nfp: "map flags are not supported").
                let flags = m.map_flags() & !lb_common::BPF_F_MMAPABLE;
                let fd = sys::create_map(name, m.map_type(), m.key_size(), m.value_size(), entries, flags, ifindex)
                    .map_err(|e| NicError::Map(name.clone(), e))?;
                let data = MapData::from_fd(fd).map_err(|e| NicError::Map(name.clone(), std::io::Error::other(e)))?;
                if let Some(pin) = &pin {
                    data.pin(pin).map_err(|e| NicError::Pinned(name.clone(), e.to_string()))?;
                }
                data
            }
        };
        maps.insert(name.clone(), data);
    }
    let text_sections: HashSet<usize> = obj.functions.keys().map(|(section, _)| *section).collect();
    let defs: Vec<(String, i32, aya_obj::Map)> =
        obj.maps.iter().map(|(n, m)| (n.clone(), maps[n].fd().as_fd().as_raw_fd(), m.clone())).collect();
    obj.relocate_maps(defs.iter().map(|(n, fd, m)| (n.as_str(), *fd, m)), &text_sections)
        .map_err(|e| NicError::Object(e.to_string()))?;
    obj.relocate_calls(&text_sections).map_err(|e| NicError::Object(e.to_string()))?;
    let program = obj.programs.get(lb_common::program_names::OFFLOAD).ok_or(NicError::Object("no program".into()))?;
    let function = obj.functions.get(&program.function_key()).ok_or(NicError::Object("no code".into()))?;
    // bpf_insn is 8 bytes, laid out as the kernel reads it.
    let insns: Vec<u64> = function
        .instructions
        .iter()
        .map(|i| unsafe { std::mem::transmute::<aya_obj::generated::bpf_insn, u64>(*i) })
        .collect();
    let program =
        sys::load_xdp_program(lb_common::program_names::OFFLOAD, &insns, ifindex).map_err(NicError::Program)?;
    Ok(NicProgram { program, maps })
}

impl NicProgram {
    /// Runs the program on the NIC `ifindex` in hardware mode, behind a
    /// link pinned at `link_pin` (it outlives this process while pinned).
    /// A link already pinned there gets this program in place of its own,
    /// atomically (a restart); returns whether it did.
    pub fn attach(&self, ifindex: u32, link_pin: &Path) -> Result<bool, NicError> {
        self.attach_with_flags(ifindex, XDP_FLAGS_HW_MODE, link_pin)
    }

    /// [`Self::attach`] in the mode `flags` says (tests attach a program
    /// loaded for the host in native mode, to run the same calls).
    pub fn attach_with_flags(&self, ifindex: u32, flags: u32, link_pin: &Path) -> Result<bool, NicError> {
        if let Ok(link) = sys::obj_get(link_pin) {
            if sys::link_update(&link, &self.program).is_ok() {
                return Ok(true);
            }
            // Severed (its interface went away): attach anew below.
            let _ = std::fs::remove_file(link_pin);
        }
        let link = sys::xdp_link_create(&self.program, ifindex, flags).map_err(NicError::Attach)?;
        sys::obj_pin(&link, link_pin).map_err(NicError::Attach)?;
        Ok(false)
    }

    /// Runs one frame through the program (only one loaded for the host:
    /// a NIC's program runs on the NIC). Returns the action and the frame.
    pub fn test_run(&self, frame: &[u8]) -> std::io::Result<(u32, Vec<u8>)> {
        sys::test_run(&self.program, frame)
    }

    /// Pins the program (tests open it to run frames through it).
    pub fn pin_program(&self, path: &Path) -> std::io::Result<()> {
        sys::obj_pin(&self.program, path)
    }
}
