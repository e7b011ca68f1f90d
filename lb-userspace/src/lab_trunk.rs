//! A lab component, not part of the product: tags and untags every frame
//! the kernel sends and receives on one interface (`lbctl lab-trunk IFACE
//! --vid N`, hidden), so that the lab, whose kernel has no 802.1Q devices,
//! can run a VLAN trunk. The tc links are pinned under
//! `/sys/fs/bpf/lbctl-lab-trunk/IFACE` and go with the interface.

use std::path::Path;

use anyhow::{Context, Result};
use aya::{
    maps::Array,
    programs::{links::FdLink, tc::TcAttachType, SchedClassifier},
    Ebpf,
};

pub const PIN_ROOT: &str = "/sys/fs/bpf/lbctl-lab-trunk";

pub fn attach(iface: &str, vid: u16) -> Result<()> {
    let mut ebpf = Ebpf::load(crate::object::LAB_TRUNK).context("loading the lab trunk programs")?;
    let mut vlan: Array<_, u16> = Array::try_from(ebpf.map_mut("TRUNK_VLAN").context("no TRUNK_VLAN map")?)?;
    vlan.set(0, vid, 0)?;
    let dir = Path::new(PIN_ROOT).join(iface);
    std::fs::create_dir_all(&dir)?;
    for (name, direction) in [("trunk_tag", TcAttachType::Egress), ("trunk_untag", TcAttachType::Ingress)] {
        let program: &mut SchedClassifier =
            ebpf.program_mut(name).with_context(|| format!("no {name} in the object"))?.try_into()?;
        program.load()?;
        let id = program.attach(iface, direction).with_context(|| format!("attaching {name} to {iface}"))?;
        let link = FdLink::try_from(program.take_link(id)?).context("the kernel gave no tcx link to pin")?;
        link.pin(dir.join(name)).with_context(|| format!("pinning {name}"))?;
    }
    Ok(())
}
