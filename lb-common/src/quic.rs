//! QUIC-LB routable connection IDs (draft-ietf-quic-load-balancers-21), as
//! the balancer reads them: the first octet of a connection ID carries a
//! config rotation codepoint in its top three bits; the next octets carry
//! the server ID of the server that issued it, unencrypted; a nonce
//! follows. A QUIC VIP names its codepoint and the lengths, and the
//! `QUIC_SERVERS` map names each server ID's backend.

/// Longest server ID the balancer reads (the draft allows up to 15 octets;
/// 8 give 2^64 servers and keep the key one word).
pub const MAX_SERVER_ID_LEN: u8 = 8;
/// Shortest nonce the draft allows (section "Configuration Agent Actions").
pub const MIN_NONCE_LEN: u8 = 4;
/// QUIC v1's longest connection ID (RFC 9000, 17.2).
pub const MAX_CID_LEN: u8 = 20;
/// The codepoint that marks a connection ID unroutable (draft, "Config
/// Rotation": a configuration must not use it).
pub const UNROUTABLE_CONFIG_ID: u8 = 0b111;

/// A VIP's QUIC-LB configuration, in its VIP entry. `server_id_len` 0:
/// the VIP is not QUIC-aware.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QuicLb {
    /// Config rotation codepoint, 0..=6.
    pub config_id: u8,
    pub server_id_len: u8,
    /// The whole connection ID: first octet, server ID, nonce.
    pub cid_len: u8,
    pub _pad: u8,
}

/// Key of `QUIC_SERVERS`: a VIP and one of its server IDs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct QuicServerKey {
    pub vip_id: u32,
    pub _pad: u32,
    /// The server ID's octets in wire order, zero after its length, read
    /// as one native-endian word ([`server_id_word`]).
    pub server_id: u64,
}

/// Value of `QUIC_SERVERS`: the backend, and its cookie when the entry was
/// written (a reused backend id never takes a removed server's packets).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QuicServer {
    pub backend_id: u32,
    pub cookie: u32,
}

/// The key word of a server ID (at most [`MAX_SERVER_ID_LEN`] octets), as
/// the balancer builds it from the packet's octets.
pub fn server_id_word(octets: &[u8]) -> u64 {
    let mut word = [0u8; 8];
    let len = octets.len().min(word.len());
    word[..len].copy_from_slice(&octets[..len]);
    u64::from_ne_bytes(word)
}

/// Keeps the first `len` octets (1..=8) of a word loaded from the packet
/// (octets in wire order in memory).
#[inline(always)]
pub fn first_octets(word: u64, len: u8) -> u64 {
    let keep_bits = 8 * len.clamp(1, MAX_SERVER_ID_LEN) as u32;
    let low = if keep_bits == 64 { u64::MAX } else { (1u64 << keep_bits) - 1 };
    // Little-endian: the first octets are the low ones.
    if cfg!(target_endian = "little") {
        word & low
    } else {
        word & !(u64::MAX >> keep_bits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_id_from_the_packet_matches_the_one_written_by_userspace() {
        let packet = [0x07, 0xc4, 0x60, 0x5e, 0x45, 0x04, 0xcc, 0x4f];
        for len in 1..=8u8 {
            let loaded = u64::from_ne_bytes(packet);
            assert_eq!(first_octets(loaded, len), server_id_word(&packet[..len as usize]), "{len}");
        }
        assert_ne!(server_id_word(&[0xc4]), server_id_word(&[0xc4, 0x60]));
    }
}
