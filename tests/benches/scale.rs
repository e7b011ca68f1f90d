//! The control plane at an operator's scale: one controller on a veth in a
//! namespace of its own; a desired state of many VIPs x 100 backends (ring
//! 65537, no checks) applied from empty through the API; one backend added
//! at that scale; the same file applied again (nothing to change); and a
//! SIGKILL followed by a new controller that adopts it all. Wall times of
//! the calls, and the controller's resident memory.

use std::{
    fmt::Write as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use lb_lab::{sh, wait_for};
use lb_userspace::api::pb;

use crate::{connect, Results};

pub(crate) const NETNS: &str = "lbs-scale";
pub(crate) const DIR: &str = "/run/lbs-scale";
const PINS: &str = "/sys/fs/bpf/lbs-scale";
const BACKENDS: usize = 100;

/// The namespace, the controller and its pins; all removed when dropped.
pub(crate) struct Site {
    lbctl: PathBuf,
    controller: Option<Child>,
}

impl Site {
    pub(crate) fn new(lbctl: PathBuf) -> anyhow::Result<Self> {
        let site = Site { lbctl, controller: None };
        site.remove();
        sh("ip", &["netns", "add", NETNS])?;
        sh("ip", &["-n", NETNS, "link", "add", "lbs0", "type", "veth", "peer", "name", "lbs1"])?;
        for dev in ["lbs0", "lbs1", "lo"] {
            sh("ip", &["-n", NETNS, "link", "set", dev, "up"])?;
        }
        sh("ip", &["-n", NETNS, "addr", "add", "198.51.100.2/30", "dev", "lbs0"])?;
        std::fs::create_dir_all(DIR)?;
        Ok(site)
    }

    /// Starts `lbctl up` on default settings (no sizes given); returns
    /// when its API answers.
    pub(crate) fn start(&mut self) -> anyhow::Result<u32> {
        let socket = format!("{DIR}/lb.sock");
        let _ = std::fs::remove_file(&socket);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(format!("{DIR}/lb.log"))?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{NETNS}"))
            .arg(&self.lbctl)
            .args(["--socket", &socket, "up", "lbs0", "--xdp-mode", "native", "--metrics", "off"])
            .args(["--next-hop-mac", "02:00:00:00:00:01", "--encap-src", "198.51.100.2/32"])
            .args(["--pin-dir", PINS, "--state-dir"])
            .arg(format!("{DIR}/state"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let pid = child.id();
        self.controller = Some(child);
        wait_for(Duration::from_secs(60), || std::path::Path::new(&socket).exists())
            .map_err(|e| anyhow::anyhow!("the controller did not start ({e}); see {DIR}/lb.log"))?;
        Ok(pid)
    }

    /// Starts a controller with no state (a running one is killed first).
    pub(crate) fn start_afresh(&mut self) -> anyhow::Result<u32> {
        self.kill();
        let _ = std::fs::remove_dir_all(format!("{DIR}/state"));
        let _ = std::fs::remove_dir_all(PINS);
        self.start()
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.controller.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn remove(&self) {
        // The controller's log outlives the site, for a look afterwards.
        let _ = std::fs::copy(format!("{DIR}/lb.log"), "/tmp/lbs-scale.log");
        let _ = sh("ip", &["netns", "del", NETNS]);
        let _ = std::fs::remove_dir_all(PINS);
        let _ = std::fs::remove_dir_all(DIR);
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        if let Some(mut child) = self.controller.take() {
            // SIGTERM: a clean stop detaches and unpins.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
        self.remove();
    }
}

/// `vips` VIPs (203.0.113.10, one port each) of the same 100 backends.
fn desired(vips: usize) -> String {
    let mut toml = String::new();
    for v in 0..vips {
        let _ = writeln!(toml, "[[vip]]\nvip = \"203.0.113.10:{}/tcp\"\nring_size = 65537", 1000 + v);
        for b in 1..=BACKENDS {
            let _ = writeln!(toml, "[[vip.backend]]\naddress = \"198.51.100.{}\"", 100 + b);
        }
    }
    toml
}

/// A `/proc/PID/status` memory line in MiB: VmRSS counts the mapped ring
/// array the controller writes rings into (kernel memory, 128 MiB by
/// default); RssAnon is the controller's own.
pub(crate) fn status_mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN);
    kib / 1024.0
}

pub fn scale(r: &mut Results, lbctl: PathBuf, vips: usize) -> anyhow::Result<()> {
    eprintln!("control plane at scale: {vips} VIPs x {BACKENDS} backends, ring 65537, no checks");
    let mut site = Site::new(lbctl)?;
    let pid = site.start()?;
    let socket = format!("{DIR}/lb.sock");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let toml = desired(vips);
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1000.0;
    let (load, change, noop) = rt.block_on(async {
        let mut vip_api = pb::vips_client::VipsClient::new(connect(&socket).await?);
        let mut backend_api = pb::backends_client::BackendsClient::new(connect(&socket).await?);
        let t = Instant::now();
        let applied = vip_api.apply(pb::ApplyRequest { toml: toml.clone(), dry_run: false }).await?.into_inner();
        let load = ms(t);
        anyhow::ensure!(applied.changes.len() == vips * (1 + BACKENDS), "{} changes", applied.changes.len());
        let mut change = Vec::new();
        for k in 0..5 {
            let vip = format!("203.0.113.10:{}/tcp", 1000 + k);
            let t = Instant::now();
            let add = pb::AddBackendRequest {
                vip: vip.clone(),
                address: "198.51.100.250".into(),
                weight: Some(1),
                health: None,
                server_id: String::new(),
            };
            backend_api.add_backend(add).await?;
            change.push(ms(t));
            backend_api.delete_backend(pb::BackendRef { vip, address: "198.51.100.250".into() }).await?;
        }
        let t = Instant::now();
        let again = vip_api.apply(pb::ApplyRequest { toml: toml.clone(), dry_run: false }).await?.into_inner();
        let noop = ms(t);
        anyhow::ensure!(again.changes.is_empty(), "a re-apply changed {:?}", again.changes.first());
        anyhow::Ok((load, change, noop))
    })?;
    let (rss, anon) = (status_mib(pid, "VmRSS:"), status_mib(pid, "RssAnon:"));
    // SIGKILL, then a new controller adopts the pinned maps and the state.
    site.kill();
    let t = Instant::now();
    site.start()?;
    let adopted = rt.block_on(async {
        let mut status = pb::status_client::StatusClient::new(connect(&socket).await?);
        let s = status.get_status(pb::Empty {}).await?.into_inner();
        anyhow::ensure!(s.adopted && s.vips as usize == vips, "adopted {}, {} VIPs", s.adopted, s.vips);
        anyhow::Ok(ms(t))
    })?;
    let mut change = change;
    change.sort_by(f64::total_cmp);
    let key = |name: &str| format!("scale.{vips}x{BACKENDS}.{name}");
    r.insert(key("apply_from_empty_ms"), load);
    r.insert(key("one_backend_add_ms"), change[change.len() / 2]);
    r.insert(key("noop_reapply_ms"), noop);
    r.insert(key("sigkill_adopt_ms"), adopted);
    r.insert(key("controller_rss_mib"), rss);
    r.insert(key("controller_rss_anon_mib"), anon);
    eprintln!(
        "  apply from empty {load:.0} ms; one backend added {:.1} ms (median of 5); no-op re-apply {noop:.0} ms",
        change[2]
    );
    eprintln!(
        "  SIGKILL, then adopted by a new controller, API answering: {adopted:.0} ms; controller RSS {rss:.0} MiB \
         ({anon:.0} MiB its own, the rest the mapped ring array)"
    );
    Ok(())
}
