//! VLAN trunks: which VLAN forwarded packets leave on (`lbctl up
//! --vlan-map IN=OUT`), and the NIC setting that hides tags from XDP.

use std::{io, os::fd::AsRawFd};

use anyhow::{bail, Result};

/// `IN=OUT`: packets balanced from VLAN IN leave for the backends on VLAN
/// OUT. VLAN IDs 1-4094 (0 and 4095 are reserved, IEEE 802.1Q 9.6).
pub fn parse_mapping(text: &str) -> Result<(u16, u16), String> {
    let (from, to) = text.split_once('=').ok_or_else(|| format!("'{text}' is not IN=OUT (VLAN IDs)"))?;
    let vid = |v: &str| match v.trim().parse::<u16>() {
        Ok(id @ 1..=4094) => Ok(id),
        _ => Err(format!("'{v}' in '{text}' is not a VLAN ID (1-4094)")),
    };
    Ok((vid(from)?, vid(to)?))
}

/// Refuses a trunk whose NIC takes the 802.1Q tag off in hardware: XDP
/// would see untagged frames and send them back out untagged.
pub fn check_trunk(iface: &str) -> Result<()> {
    match rx_vlan_offload(iface) {
        Ok(false) => Ok(()),
        Ok(true) => bail!(
            "{iface} takes VLAN tags off in hardware before XDP sees them (rx-vlan-offload is on): \
             run `ethtool -K {iface} rxvlan off` (and `ethtool -K {iface} rx-vlan-stag-hw-parse off` for QinQ), \
             then lbctl up again"
        ),
        Err(e) => bail!("cannot read {iface}'s VLAN offload setting (ETHTOOL_GFLAGS): {e}"),
    }
}

/// Whether the NIC strips 802.1Q tags on receive (ethtool's `rxvlan`).
fn rx_vlan_offload(iface: &str) -> io::Result<bool> {
    // linux/ethtool.h: ETHTOOL_GFLAGS, ETH_FLAG_RXVLAN; struct ethtool_value.
    const ETHTOOL_GFLAGS: u32 = 0x25;
    const ETH_FLAG_RXVLAN: u32 = 1 << 8;
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    let name = iface.as_bytes();
    if name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "interface name too long"));
    }
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").or_else(|_| std::net::UdpSocket::bind("[::1]:0"))?;
    let mut value = EthtoolValue { cmd: ETHTOOL_GFLAGS, data: 0 };
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in request.ifr_name.iter_mut().zip(name) {
        *dst = *src as libc::c_char;
    }
    request.ifr_ifru.ifru_data = &mut value as *mut EthtoolValue as *mut libc::c_char;
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCETHTOOL, &mut request) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value.data & ETH_FLAG_RXVLAN != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mappings_take_two_vlan_ids_and_say_what_is_wrong() {
        assert_eq!(parse_mapping("100=200"), Ok((100, 200)));
        assert_eq!(parse_mapping("4094=1"), Ok((4094, 1)));
        assert!(parse_mapping("100").unwrap_err().contains("IN=OUT"));
        assert!(parse_mapping("0=5").unwrap_err().contains("'0'"));
        assert!(parse_mapping("5=4095").unwrap_err().contains("'4095'"));
        assert!(parse_mapping("a=5").unwrap_err().contains("not a VLAN ID"));
    }
}
