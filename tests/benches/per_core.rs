//! Packets per second on one core through a real XDP_TX: BPF_PROG_TEST_RUN
//! in live-frames mode with a veth of a namespace of its own as the ingress
//! device, so every frame the program transmits leaves through the veth
//! driver; the peer drops it in XDP. The balancer's bench build (it restores
//! each packet after forwarding, so every repetition takes the same path
//! and the frames leave as they came) against `floor_restore` (swap MACs,
//! the same restore step, transmit), on CPU 0. The new-flow case's source
//! port advances with each packet, so after 65,536 packets its flows come
//! again into a warm table: `v4_new_flow_ns` is the cold-table cost.

use std::time::Instant;

use aya::{
    programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp, XdpMode},
    EbpfLoader,
};
use lb_lab::sh;
use lb_tests::*;
use lb_userspace::object;

use crate::Results;

/// Sends `count` copies of `frame` through `program` on `ifindex`; Mpps.
fn live(program: &Xdp, frame: &[u8], ifindex: u32, count: u32) -> anyhow::Result<f64> {
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, ...
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    let t = Instant::now();
    program.test_run(TestRunOptions {
        data_in: Some(frame),
        ctx_in: Some(&ctx),
        repeat: count,
        attrs: TestRunAttrs::new().xdp_live_frames(64),
        ..TestRunOptions::default()
    })?;
    Ok(count as f64 / t.elapsed().as_secs_f64() / 1e6)
}

/// From `ip` (this thread's namespace; /sys shows the one it was mounted in).
fn rx_packets(dev: &str) -> anyhow::Result<u64> {
    let out: serde_json::Value = serde_json::from_str(&sh("ip", &["-s", "-j", "link", "show", "dev", dev])?)?;
    out[0]["stats64"]["rx"]["packets"].as_u64().ok_or_else(|| anyhow::anyhow!("no rx packets for {dev}: {out}"))
}

/// Two NICs: a balancer (bench build) set up with a backend interface, and
/// an established frame for it; its packets leave through a second veth.
pub struct Redirect<'a> {
    pub balancer: &'a mut lb_userspace::Dataplane,
    pub frame: &'a [u8],
}

/// `cases` run through `balancer` (the bench build, its conn table seeded
/// for the established cases), and the redirect case beside
/// `floor_redirect`. Runs on the caller's CPU.
pub fn per_core(
    r: &mut Results,
    balancer: &Xdp,
    cases: &[(&str, &[u8])],
    redirect: Redirect,
    quick: bool,
) -> anyhow::Result<()> {
    eprintln!("per core (live frames through a veth, XDP_TX, the peer drops; Mpps on CPU 0)");
    let count = if quick { 2_000_000 } else { 10_000_000 };
    let rounds = if quick { 3 } else { 5 };
    let mut floors = EbpfLoader::new().load(object::FLOOR)?;
    for name in ["floor_restore", "floor_drop", "floor_redirect"] {
        let p: &mut Xdp = floors.program_mut(name).unwrap().try_into()?;
        p.load()?;
    }
    in_fresh_netns(|| -> anyhow::Result<()> {
        {
            // lv0 -> lv1 (XDP_TX), lv2 -> lv3 (redirected from lv0).
            for (a, b) in [("lv0", "lv1"), ("lv2", "lv3")] {
                sh("ip", &["link", "add", a, "type", "veth", "peer", "name", b])?;
                for dev in [a, b] {
                    sh("ip", &["link", "set", dev, "up"])?;
                }
            }
            let sink: &mut Xdp = floors.program_mut("floor_drop").unwrap().try_into()?;
            for dev in ["lv1", "lv3"] {
                sink.attach(dev, XdpMode::Driver)?;
            }
            let ifindex = lb_userspace::netlink::if_index("lv0").unwrap();
            let out = lb_userspace::netlink::if_index("lv2").unwrap();
            redirect.balancer.set_egress(out)?;
            let mut floor_egress = aya::maps::DevMap::try_from(floors.map_mut("FLOOR_EGRESS").unwrap())?;
            floor_egress.set(0, out, None, 0)?;
            let floor: &Xdp = floors.program("floor_restore").unwrap().try_into()?;
            let mut samples: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
            for _ in 0..rounds {
                let before = rx_packets("lv1")?;
                samples.entry("floor_restore".into()).or_default().push(live(floor, cases[0].1, ifindex, count)?);
                for (name, frame) in cases {
                    samples.entry(name.to_string()).or_default().push(live(balancer, frame, ifindex, count)?);
                }
                let arrived = rx_packets("lv1")? - before;
                let sent = count as u64 * (1 + cases.len() as u64);
                anyhow::ensure!(arrived * 10 >= sent * 9, "only {arrived} of {sent} frames reached the peer");
                let before = rx_packets("lv3")?;
                let floor_redirect: &Xdp = floors.program("floor_redirect").unwrap().try_into()?;
                samples.entry("floor_redirect".into()).or_default().push(live(
                    floor_redirect,
                    redirect.frame,
                    ifindex,
                    count,
                )?);
                let two_nics = live(redirect.balancer.program(), redirect.frame, ifindex, count)?;
                samples.entry("v4_established_two_nics".into()).or_default().push(two_nics);
                let arrived = rx_packets("lv3")? - before;
                anyhow::ensure!(
                    arrived * 10 >= 2 * count as u64 * 9,
                    "only {arrived} of {} redirected frames",
                    2 * count
                );
            }
            let floor = crate::stats(samples.get_mut("floor_restore").unwrap()).1;
            let floor_redirect = crate::stats(samples.get_mut("floor_redirect").unwrap()).1;
            for (name, mut s) in samples {
                let (min, median, max) = crate::stats(&mut s);
                r.insert(format!("per_core.{name}_mpps"), median);
                // The redirect path against the redirect floor.
                let (of, floor_name) = if name.contains("redirect") || name.contains("two_nics") {
                    (floor_redirect, "floor_redirect")
                } else {
                    (floor, "floor_restore")
                };
                eprintln!(
                    "  {name:<34} median {median:>6.2} Mpps (min {min:.2}, max {max:.2}), {:.2}x {floor_name}",
                    median / of
                );
            }
            Ok(())
        }
    })
}
