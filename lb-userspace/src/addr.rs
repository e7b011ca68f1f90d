//! Addresses as the data plane stores them (raw wire words and a family).

use std::net::IpAddr;

use lb_common::{addr_words_v4, addr_words_v6, AF_INET, AF_INET6};

pub fn words(addr: IpAddr) -> ([u32; 4], u8) {
    match addr {
        IpAddr::V4(a) => (addr_words_v4(a.octets()), AF_INET),
        IpAddr::V6(a) => (addr_words_v6(a.octets()), AF_INET6),
    }
}

/// The host bits of an outer source prefix of `prefix_len` that carry
/// varying bits (flow hash, check id), host order: the last 32 bits at
/// most (of an IPv6 prefix, `family_bits` 128).
pub fn source_host_mask(prefix_len: u8, family_bits: u8) -> u32 {
    u32::MAX.checked_shr(prefix_len.saturating_sub(family_bits - 32) as u32).unwrap_or(0)
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
