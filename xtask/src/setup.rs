//! `cargo xtask setup`: everything a fresh machine of this kind lacks, each
//! step checked first so that a second run does nothing and is fast.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::{capture, run, step};

/// Debian packages the tests and the lab use.
const APT_PACKAGES: &[&str] = &[
    "iproute2",
    "ethtool",
    "procps",
    "util-linux",
    "curl",
    "nginx",
    "python3",
    "iputils-ping",
    "wrk",
    "haproxy",
    "openssl",
    "prometheus",
    "bird2",
    "nftables",
];
const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn setup(root: &Path) -> Result<()> {
    if unsafe { libc_geteuid() } != 0 {
        bail!("setup installs packages and mounts bpffs: run it as root");
    }
    step("nightly toolchain", ensure_nightly)?;
    step("rust-src for nightly (-Z build-std=core)", ensure_rust_src)?;
    step("bpf-linker", || ensure_bpf_linker(root))?;
    step("Debian packages", ensure_apt_packages)?;
    step("bpffs at /sys/fs/bpf", ensure_bpffs)?;
    Ok(())
}

fn ensure_nightly() -> Result<String> {
    if capture("rustup", &["toolchain", "list"])?.lines().any(|l| l.starts_with("nightly")) {
        return Ok("present".into());
    }
    run(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))?;
    Ok("installed".into())
}

fn ensure_rust_src() -> Result<String> {
    let installed = capture("rustup", &["component", "list", "--toolchain", "nightly", "--installed"])?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok("present".into());
    }
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    Ok("installed".into())
}

/// bpf-linker must be linked against the same LLVM major as the nightly
/// rustc that emits the bitcode. Debian 12 has no such LLVM, so it is built
/// against the libLLVM that ships inside the nightly toolchain (PLATFORM.md).
fn ensure_bpf_linker(root: &Path) -> Result<String> {
    let llvm_major = nightly_llvm_major()?;
    if let Ok(out) = Command::new("bpf-linker").arg("--version").output() {
        if out.status.success() {
            let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if version.contains(BPF_LINKER_VERSION) {
                return Ok(format!("present ({version})"));
            }
        }
    }
    let sysroot = PathBuf::from(capture("rustc", &["+nightly", "--print", "sysroot"])?.trim());
    let lib_dir = sysroot.join("lib");
    let lib = std::fs::read_dir(&lib_dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&format!("libLLVM.so.{llvm_major}")))
        })
        .with_context(|| format!("no libLLVM.so.{llvm_major}* in {}", lib_dir.display()))?;
    let prefix = root.join("target/xtask/llvm-prefix");
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&lib, &link)?;
    println!("    building bpf-linker {BPF_LINKER_VERSION} against {} (about 70 s)", lib.display());
    run(Command::new("cargo")
        .args(["+stable", "install", "--force", "--locked", "--no-default-features"])
        .args(["--features", &format!("llvm-{llvm_major}")])
        .arg(format!("bpf-linker@{BPF_LINKER_VERSION}"))
        .env("LLVM_PREFIX", &prefix)
        .env("RUSTFLAGS", format!("-C link-arg=-Wl,-rpath,{}", lib_dir.display())))?;
    Ok("built".into())
}

fn nightly_llvm_major() -> Result<u32> {
    let info = capture("rustc", &["+nightly", "-vV"])?;
    let version = info
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("rustc +nightly -vV names no LLVM version")?;
    Ok(version.split('.').next().unwrap_or_default().parse()?)
}

fn ensure_apt_packages() -> Result<String> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(format!("present ({})", APT_PACKAGES.join(", ")));
    }
    println!("    installing {}", missing.join(", "));
    run(Command::new("apt-get").args(["update", "-q"]))?;
    // Packages such as nginx start their service on install; the lab runs
    // its own instances in namespaces, so keep the host's ports untouched
    // (policy-rc.d exit 101 = "action forbidden", invoke-rc.d(8)).
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let own_policy = !policy.exists();
    if own_policy {
        std::fs::write(policy, "#!/bin/sh\nexit 101\n")?;
        std::fs::set_permissions(policy, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    }
    let installed = run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"));
    if own_policy {
        std::fs::remove_file(policy)?;
    }
    installed?;
    Ok(format!("installed {}", missing.join(", ")))
}

fn ensure_bpffs() -> Result<String> {
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    if mounts.lines().any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf ")) {
        return Ok("mounted".into());
    }
    run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    Ok("mounted now".into())
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}
