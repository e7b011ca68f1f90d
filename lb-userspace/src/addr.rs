//! Addresses as the data plane stores them (raw wire words and a family).

use std::net::IpAddr;

use lb_common::{addr_words_v4, addr_words_v6, AF_INET, AF_INET6};

pub fn words(addr: IpAddr) -> ([u32; 4], u8) {
    match addr {
        IpAddr::V4(a) => (addr_words_v4(a.octets()), AF_INET),
        IpAddr::V6(a) => (addr_words_v6(a.octets()), AF_INET6),
    }
}

/// Inverse of [`words`].
pub fn from_words(words: [u32; 4], family: u8) -> IpAddr {
    let mut octets = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        octets[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    if family == AF_INET6 {
        IpAddr::from(octets)
    } else {
        IpAddr::from([octets[0], octets[1], octets[2], octets[3]])
    }
}
