//! End-to-end tests of the lab's VLAN trunk: lb2 reaches the router over
//! frames tagged VLAN 100 (tests/lab, `TRUNK_LB`), so every frame its
//! balancer sees and sends carries the tag. Needs root.

mod common;

use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use common::*;
use lb_lab::*;

/// What came in on the router's end of the trunk while it ran.
#[derive(Debug, Default)]
struct Seen {
    /// Frames tagged with the trunk's VLAN, and of those, tunnel packets
    /// (IP-in-IP, or GUE: UDP to 6080) that lb2's balancer sent.
    tagged: u64,
    tunnels: u64,
    /// Frames with no tag, or another VLAN.
    other: u64,
}

/// Counts the frames lb2 sends to the router until `stop`, from a packet
/// socket on the router's end of the trunk: the kernel moves the tag into
/// the socket's auxiliary data (PACKET_AUXDATA), so it is read there.
fn watch_trunk(stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Seen> {
    let rt = format!("rt-lb{TRUNK_LB}");
    let socket = in_ns(ROUTER_NS, move || {
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, (libc::ETH_P_ALL as u16).to_be() as i32) };
        assert!(fd >= 0, "packet socket: {}", std::io::Error::last_os_error());
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let name = std::ffi::CString::new(rt).unwrap();
        let mut at: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        at.sll_family = libc::AF_PACKET as u16;
        at.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        at.sll_ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
        let on: libc::c_int = 1;
        let timeout = libc::timeval { tv_sec: 0, tv_usec: 100_000 };
        unsafe {
            assert_eq!(libc::bind(fd.as_raw_fd(), &at as *const _ as *const _, std::mem::size_of_val(&at) as u32), 0);
            libc::setsockopt(fd.as_raw_fd(), libc::SOL_PACKET, libc::PACKET_AUXDATA, &on as *const _ as *const _, 4);
            let tv = &timeout as *const _ as *const _;
            libc::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVTIMEO, tv, 16);
        }
        fd
    })
    .unwrap();
    std::thread::spawn(move || {
        let mut seen = Seen::default();
        let mut frame = [0u8; 2048];
        let mut control = [0u64; 16];
        while !stop.load(Ordering::SeqCst) {
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut iov = libc::iovec { iov_base: frame.as_mut_ptr() as *mut _, iov_len: frame.len() };
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_name = &mut from as *mut _ as *mut _;
            msg.msg_namelen = std::mem::size_of_val(&from) as u32;
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr() as *mut _;
            msg.msg_controllen = std::mem::size_of_val(&control);
            let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, 0) };
            if n < 14 || from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            let mut vlan = None;
            unsafe {
                let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
                while !cmsg.is_null() {
                    if (*cmsg).cmsg_level == libc::SOL_PACKET && (*cmsg).cmsg_type == libc::PACKET_AUXDATA {
                        let aux = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg) as *const libc::tpacket_auxdata);
                        if aux.tp_status & libc::TP_STATUS_VLAN_VALID != 0 {
                            vlan = Some(aux.tp_vlan_tci & 0x0fff);
                        }
                    }
                    cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
                }
            }
            if vlan != Some(TRUNK_VLAN) {
                seen.other += 1;
                continue;
            }
            seen.tagged += 1;
            // After the tag moved out: EtherType at 12, IPv4 protocol at 23,
            // UDP destination port at 36 (no IPv4 options from the balancer).
            let ipv4 = frame[12..14] == [0x08, 0x00];
            let ipip = ipv4 && frame[23] == 4;
            let gue = ipv4 && frame[23] == 17 && n >= 38 && frame[36..38] == 6080u16.to_be_bytes();
            seen.tunnels += (ipip || gue) as u64;
        }
        seen
    })
}

#[test]
fn connections_through_the_trunk_survive_ring_changes_and_ecmp_moves_and_every_frame_is_tagged() {
    let s = lab();
    let lab = &s.lab;
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch_trunk(stop.clone());
    // Everything through lb2 (the trunk) first, GUE so that the second
    // chance carries connections whose backend a ring change moved.
    let streams = streams_on(lab, &["--encap", "gue"], 57000, &[TRUNK_LB]);
    let mut failed = new_connections(20, 58000);
    ring_changes(lab, &streams);
    failed += new_connections(20, 58100);
    lab.route_through(&[1], VIP4).unwrap();
    streams.more_rounds(3);
    failed += new_connections(20, 58200);
    lab.route_through(&[TRUNK_LB], VIP4).unwrap();
    streams.more_rounds(3);
    failed += new_connections(20, 58300);
    lab.route_through(&[1, 2], VIP4).unwrap();
    streams.more_rounds(3);
    failed += new_connections(20, 58400);
    let owners = none_broke(streams);
    stop.store(true, Ordering::SeqCst);
    let seen = watcher.join().unwrap();
    println!("{} connections kept, {failed} of 100 new ones failed; from lb2 on the trunk: {seen:?}", owners.len());
    assert_eq!(failed, 0);
    assert!(seen.tunnels > 100, "lb2's balancer sent tagged tunnel packets: {seen:?}");
    assert_eq!(seen.other, 0, "every frame lb2 sent on the trunk was tagged VLAN {TRUNK_VLAN}: {seen:?}");
    assert!(counter(lab, TRUNK_LB, "forwarded") > 0);
}

#[test]
fn a_trunk_whose_nic_strips_tags_is_refused_naming_the_ethtool_command() {
    let s = lab();
    let lab = &s.lab;
    let (n, dev) = (lb_ns(TRUNK_LB), lb_iface(TRUNK_LB));
    lab.stop_lb(TRUNK_LB, libc::SIGTERM).unwrap();
    ns(&n, &["ethtool", "-K", &dev, "rxvlan", "on"]).unwrap();
    let out = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{n}"))
        .arg(&lab.lbctl)
        .args(["--socket", &Lab::socket(TRUNK_LB), "up", &dev, "--trunk", "--state-dir", &format!("{DIR}/state")])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("run `ethtool -K {dev} rxvlan off`")), "{err}");
    assert!(!sh("ip", &["-n", &n, "link"]).unwrap().contains("prog/xdp"), "nothing attached");
    ns(&n, &["ethtool", "-K", &dev, "rxvlan", "off"]).unwrap();
    lab.start_lb(TRUNK_LB, &[]).unwrap();
    let status = ok(lab, TRUNK_LB, &["status"]);
    assert!(status.contains("lb_balancer"), "{status}");
    assert!(status.contains("VLANs          trunk (the NIC leaves tags in the frame)"), "{status}");
}
