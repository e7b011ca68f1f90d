//! Builds the XDP objects in `lb-ebpf` (nightly, bpfel target, bpf-linker)
//! and leaves them in OUT_DIR, where `object.rs` embeds them. `cargo xtask
//! setup` installs what this needs.

use std::{env, path::PathBuf, process::Command};

const PROGRAMS: [&str; 6] = ["lb-balancer", "lb-offload", "lb-decap", "lb-probe", "lb-floor", "lb-lab-trunk"];

fn main() {
    build_ebpf();
    build_proto();
}

/// The gRPC contract, compiled without a system protoc (protox is pure Rust).
fn build_proto() {
    println!("cargo:rerun-if-changed=proto/lb.proto");
    let fds = protox::compile(["lb.proto"], ["proto"]).expect("proto/lb.proto compiles");
    tonic_prost_build::configure()
        .type_attribute(".", "#[derive(serde::Serialize, serde::Deserialize)]")
        .compile_fds(fds)
        .expect("gRPC code generated");
}

fn build_ebpf() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.parent().unwrap();
    let ebpf = root.join("lb-ebpf");
    for watched in ["lb-ebpf/src", "lb-ebpf/Cargo.toml", "lb-common/src", "lb-common/Cargo.toml"] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    // The bench-only build restores each packet after forwarding it (see
    // lb-ebpf's `bench-restore` feature); it gets its own target directory.
    for (features, target_dir, suffix) in [("", "target", ""), ("bench-restore", "target/bench", "-bench")] {
        let mut cmd = Command::new("rustup");
        cmd.current_dir(&ebpf)
            .args(["run", "nightly", "cargo", "build", "--release", "-Z", "build-std=core"])
            .args(["--target", "bpfel-unknown-none", "--target-dir", target_dir])
            .args(["--features", features]);
        // The outer cargo's settings are for the host build, not this one.
        // BPF ISA v3: 32-bit ALU and jumps, which the verifier and JITs
        // run natively (a NIC's offload JIT multiplies only within 32 bits).
        let cmd = cmd.env("CARGO_ENCODED_RUSTFLAGS", "-Ctarget-cpu=v3");
        for var in [
            "RUSTFLAGS",
            "RUSTC",
            "RUSTC_WRAPPER",
            "RUSTC_WORKSPACE_WRAPPER",
            "RUSTUP_TOOLCHAIN",
            "CARGO_TARGET_DIR",
            "CARGO_BUILD_TARGET",
        ] {
            cmd.env_remove(var);
        }
        let status = cmd
            .status()
            .unwrap_or_else(|e| panic!("cannot run rustup to build lb-ebpf ({e}); run `cargo xtask setup` first"));
        assert!(
            status.success(),
            "building lb-ebpf failed (nightly + rust-src + bpf-linker needed: run `cargo xtask setup`)"
        );
        for program in PROGRAMS {
            let built = ebpf.join(target_dir).join("bpfel-unknown-none/release").join(program);
            let dest = out_dir.join(format!("{program}{suffix}.o"));
            std::fs::copy(&built, &dest)
                .unwrap_or_else(|e| panic!("copy {} -> {}: {e}", built.display(), dest.display()));
        }
    }
}
