//! `lbctl offload-check`: what an XDP offload JIT (the nfp driver's) would
//! refuse in the programs this lbctl carries.

use anyhow::{bail, Result};
use lb_userspace::{
    object,
    offload_check::{self, helper_name, map_type_name, Limits},
};

use super::{output::print_json, Format};

#[derive(clap::Args)]
pub struct OffloadCheckArgs {
    /// The embedded object to check.
    #[arg(value_parser = ["offload", "balancer", "decap"], default_value = "offload")]
    object: String,
    /// Stack bytes the NIC's firmware gives a program.
    #[arg(long, default_value_t = Limits::default().max_stack)]
    max_stack: u32,
    /// BPF instructions the NIC's firmware takes.
    #[arg(long, default_value_t = Limits::default().max_insns)]
    max_insns: usize,
}

pub fn run(args: OffloadCheckArgs, format: Format) -> Result<()> {
    let bytes = match args.object.as_str() {
        "decap" => object::DECAP,
        "balancer" => object::BALANCER,
        _ => object::OFFLOAD,
    };
    let limits = Limits { max_stack: args.max_stack, max_insns: args.max_insns };
    let reports = offload_check::check_object(bytes, &limits).map_err(anyhow::Error::msg)?;
    if format == Format::Json {
        print_json(&reports)?;
    } else {
        for r in &reports {
            println!("{} ({}): {} instructions, {} stack bytes", r.name, args.object, r.instructions, r.stack_depth);
            let helpers: Vec<String> = r.helpers.iter().map(|(id, n)| format!("{} x{n}", helper_name(*id))).collect();
            println!("  helpers: {}", helpers.join(", "));
            for m in &r.maps {
                let host_only = if m.flags & lb_common::BPF_F_MMAPABLE != 0 {
                    " (BPF_F_MMAPABLE: the host's copy only; the NIC's is made without flags)"
                } else {
                    ""
                };
                println!(
                    "  map {}: {} ({}), key {} B, value {} B, {} entries, flags {:#x}{host_only}",
                    m.name,
                    map_type_name(m.map_type),
                    m.map_type,
                    m.key_size,
                    m.value_size,
                    m.max_entries,
                    m.flags,
                );
            }
            match r.violations.first() {
                None => println!("  offloadable: nothing the nfp JIT refuses"),
                Some(v) => {
                    let at = v.at.map(|i| format!("instruction {i}: ")).unwrap_or_default();
                    println!("  REFUSED: {at}{}\n    rule: {}", v.what, v.rule);
                    println!("  ({} findings in all; -o json lists them)", r.violations.len());
                }
            }
        }
    }
    let refused: Vec<&str> = reports.iter().filter(|r| !r.violations.is_empty()).map(|r| r.name.as_str()).collect();
    if !refused.is_empty() {
        bail!("not offloadable: {}", refused.join(", "));
    }
    Ok(())
}
