//! `--xdp-mode offload`: the offload flavor loaded for a NIC, its maps and
//! program bound to the device's ifindex (BPF_MAP_CREATE with map_ifindex,
//! BPF_PROG_LOAD with prog_ifindex: raw bpf(2), which aya 0.14 does not
//! wrap). The kernel hands both to the driver, whose JIT accepts the
//! program or says why not.

use std::{
    collections::{BTreeMap, HashSet},
    os::fd::{AsRawFd, OwnedFd},
};

use crate::{object, sys};

#[derive(Debug, thiserror::Error)]
pub enum NicError {
    #[error("reading the offload flavor: {0}")]
    Object(String),
    #[error("the kernel refused to create map {0} on it ({1}): its driver does not offload BPF")]
    Map(String, std::io::Error),
    #[error("its driver refused the offload flavor: {0}")]
    Program(std::io::Error),
}

/// The flavor on a NIC: its program and maps (by name), all device-bound.
pub struct NicProgram {
    pub program: OwnedFd,
    pub maps: BTreeMap<String, OwnedFd>,
}

/// Loads the offload flavor for the device `ifindex`; `ring_words` sizes
/// its ring array as the host's.
pub fn load_for_device(ifindex: u32, ring_words: u32) -> Result<NicProgram, NicError> {
    let mut obj = aya_obj::Object::parse(object::OFFLOAD).map_err(|e| NicError::Object(e.to_string()))?;
    let mut maps = BTreeMap::new();
    for (name, m) in &obj.maps {
        let entries = if name == lb_common::map_names::RINGS { ring_words } else { m.max_entries() };
        let fd = sys::create_map(name, m.map_type(), m.key_size(), m.value_size(), entries, m.map_flags(), ifindex)
            .map_err(|e| NicError::Map(name.clone(), e))?;
        maps.insert(name.clone(), fd);
    }
    let text_sections: HashSet<usize> = obj.functions.keys().map(|(section, _)| *section).collect();
    let defs: Vec<(String, i32, aya_obj::Map)> =
        obj.maps.iter().map(|(n, m)| (n.clone(), maps[n].as_raw_fd(), m.clone())).collect();
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
