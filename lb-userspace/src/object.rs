//! The compiled XDP objects, built by `build.rs` and embedded in the binary
//! so that `lbctl` is one self-contained file.

use aya::include_bytes_aligned;

pub static BALANCER: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-balancer.o"));
pub static BALANCER_BENCH: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-balancer-bench.o"));
/// The offload flavor of the balancer (stateless VIPs only; what a NIC's
/// XDP JIT can run).
pub static OFFLOAD: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-offload.o"));
pub static OFFLOAD_BENCH: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-offload-bench.o"));
pub static DECAP: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-decap.o"));
/// The data-path checks' tc egress program (`probe_encap`).
pub static PROBE: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-probe.o"));
/// Benchmark floors: `floor_pass`, `floor_tx`, `floor_restore`.
pub static FLOOR: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-floor.o"));
/// The lab's VLAN trunk ends (`trunk_tag`, `trunk_untag`): a lab component.
pub static LAB_TRUNK: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-lab-trunk.o"));
