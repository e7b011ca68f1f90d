//! `cargo xtask package`: a Debian package of lbctl (the binary, the
//! systemd unit, the rt_protos name, completions, the man page, a default
//! configuration and the state directory), and its check, which `cargo
//! xtask test` runs: install it, look at what it put where, run it, remove
//! it, and see that nothing is left.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{ensure, Result};

use crate::{build_lbctl, capture, run, step};

/// Where the package puts things, and where each comes from in the tree
/// (`None`: made by running the built lbctl).
const CONTENTS: [(&str, Option<&str>); 6] = [
    ("usr/lib/systemd/system/lbctl@.service", Some("packaging/lbctl@.service")),
    ("etc/lbctl/lbctl.toml", Some("packaging/etc/lbctl/lbctl.toml")),
    ("etc/iproute2/rt_protos.d/lbctl.conf", Some("packaging/etc/iproute2/rt_protos.d/lbctl.conf")),
    ("usr/share/bash-completion/completions/lbctl", None),
    ("usr/share/man/man1/lbctl.1.gz", None),
    ("usr/bin/lbctl", None),
];

/// Builds `target/lbctl_VERSION_ARCH.deb` and returns its path.
pub fn package(root: &Path) -> Result<PathBuf> {
    let lbctl = build_lbctl(root)?;
    let version = env!("CARGO_PKG_VERSION");
    let arch = capture("dpkg", &["--print-architecture"])?.trim().to_string();
    let deb = root.join(format!("target/lbctl_{version}_{arch}.deb"));
    step("package (.deb)", || {
        let stage = root.join("target/deb");
        let _ = fs::remove_dir_all(&stage);
        for (at, from) in CONTENTS {
            let path = stage.join(at);
            fs::create_dir_all(path.parent().unwrap())?;
            match (at, from) {
                (_, Some(from)) => {
                    let text = fs::read_to_string(root.join(from))?;
                    // The unit names where the package puts the binary.
                    fs::write(&path, text.replace("/usr/local/bin/lbctl", "/usr/bin/lbctl"))?;
                }
                ("usr/bin/lbctl", None) => {
                    fs::copy(&lbctl, &path)?;
                    fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
                }
                ("usr/share/bash-completion/completions/lbctl", None) => {
                    fs::write(&path, capture(lbctl.to_str().unwrap(), &["completions", "bash"])?)?;
                }
                (_, None) => {
                    let man = stage.join("lbctl.1");
                    fs::write(&man, capture(lbctl.to_str().unwrap(), &["manpage"])?)?;
                    run(Command::new("gzip").args(["-9n", "-f"]).arg(&man))?;
                    fs::rename(stage.join("lbctl.1.gz"), &path)?;
                }
            }
        }
        fs::create_dir_all(stage.join("var/lib/lbctl"))?;
        let debian = stage.join("DEBIAN");
        fs::create_dir_all(&debian)?;
        fs::write(debian.join("control"), control(version, &arch))?;
        fs::write(debian.join("conffiles"), "/etc/lbctl/lbctl.toml\n/etc/iproute2/rt_protos.d/lbctl.conf\n")?;
        for (script, text) in [("postinst", POSTINST), ("postrm", POSTRM)] {
            fs::write(debian.join(script), text)?;
            fs::set_permissions(debian.join(script), fs::Permissions::from_mode(0o755))?;
        }
        run(Command::new("dpkg-deb").args(["--root-owner-group", "--build"]).arg(&stage).arg(&deb))?;
        Ok(format!("{}", deb.display()))
    })?;
    Ok(deb)
}

fn control(version: &str, arch: &str) -> String {
    format!(
        "Package: lbctl\nVersion: {version}\nArchitecture: {arch}\nMaintainer: xdp-lb developers <lbctl@example.org>\n\
         Depends: libc6 (>= 2.34), libgcc-s1\nRecommends: bird2 | frr\nSection: net\nPriority: optional\n\
         Description: XDP L4 edge load balancer: controller and client\n \
         Maglev consistent hashing in an XDP program, IP-in-IP or GUE towards\n \
         backends that answer clients directly, scale-out over BGP through the\n \
         host's routing daemon. Start one controller per NIC:\n \
         systemctl enable --now lbctl@eth0\n"
    )
}

/// The unit changed: systemd reads it again (nothing is started).
const POSTINST: &str =
    "#!/bin/sh\nset -e\nif [ -d /run/systemd/system ]; then systemctl daemon-reload >/dev/null || true; fi\n";
/// Purged: the state directory goes too.
const POSTRM: &str = "#!/bin/sh\nset -e\nif [ \"$1\" = purge ]; then rm -rf /var/lib/lbctl; fi\n\
                      if [ -d /run/systemd/system ]; then systemctl daemon-reload >/dev/null || true; fi\n";

/// Installs the package, checks its files and its binary (and the unit with
/// `systemd-analyze verify` where systemd is), purges it, and checks that
/// nothing is left. Refuses to touch a machine where lbctl is installed.
pub fn check(root: &Path) -> Result<()> {
    let installed = Command::new("dpkg").args(["-s", "lbctl"]).output()?.status.success();
    ensure!(!installed, "the lbctl package is installed on this machine: the package check would remove it");
    let deb = package(root)?;
    step("package check: install, look, run, purge", || {
        run(Command::new("dpkg").arg("-i").arg(&deb))?;
        let looked = look();
        run(Command::new("dpkg").args(["--purge", "lbctl"]))?;
        let looked = looked?;
        for (at, _) in CONTENTS {
            ensure!(!Path::new("/").join(at).exists(), "/{at} is left after the purge");
        }
        ensure!(!Path::new("/var/lib/lbctl").exists(), "/var/lib/lbctl is left after the purge");
        Ok(format!("{looked}; purged, nothing left"))
    })
    .map(|_| ())
}

/// What the installed package holds, checked.
fn look() -> Result<String> {
    for (at, _) in CONTENTS {
        ensure!(Path::new("/").join(at).is_file(), "the package did not install /{at}");
    }
    ensure!(Path::new("/var/lib/lbctl").is_dir(), "no /var/lib/lbctl");
    let version = capture("/usr/bin/lbctl", &["--version"])?;
    ensure!(version.contains(env!("CARGO_PKG_VERSION")), "lbctl --version says {version}");
    let unit = fs::read_to_string("/usr/lib/systemd/system/lbctl@.service")?;
    ensure!(unit.contains("ExecStart=/usr/bin/lbctl up %i"), "the unit does not start /usr/bin/lbctl");
    let verified = match Command::new("systemd-analyze").args(["verify", "lbctl@eth0.service"]).output() {
        Err(_) => "no systemd-analyze here: unit not verified".to_string(),
        Ok(out) => {
            let said = String::from_utf8_lossy(&out.stderr).into_owned();
            ensure!(out.status.success() && !said.contains("lbctl@"), "systemd-analyze verify: {said}");
            "unit verified".to_string()
        }
    };
    Ok(format!("installed {}, {verified}", version.trim()))
}
