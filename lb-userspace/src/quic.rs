//! QUIC VIPs: the QUIC-LB configuration (draft-ietf-quic-load-balancers-21,
//! unencrypted server IDs) that a VIP and its backends' QUIC servers share,
//! and the backends' server IDs.

use std::{fmt, net::IpAddr};

use lb_common::quic::{QuicLb, MAX_CID_LEN, MAX_SERVER_ID_LEN, MIN_NONCE_LEN, UNROUTABLE_CONFIG_ID};
use serde::{Deserialize, Serialize};

/// How a QUIC VIP's connection IDs name servers: first octet (config
/// rotation codepoint in its top 3 bits), server ID, nonce.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuicSpec {
    pub config_id: u8,
    pub server_id_len: u8,
    pub nonce_len: u8,
}

impl Default for QuicSpec {
    /// Codepoint 0; 2-octet server IDs (65,536 servers); a 6-octet nonce:
    /// 9-octet CIDs.
    fn default() -> Self {
        QuicSpec { config_id: 0, server_id_len: 2, nonce_len: 6 }
    }
}

impl QuicSpec {
    /// The draft's limits, and the balancer's (server IDs of 8 octets at most).
    pub fn check(&self) -> Result<(), String> {
        if self.config_id >= UNROUTABLE_CONFIG_ID {
            return Err(format!(
                "QUIC config id {} is out of range 0..=6 (7 marks unroutable connection IDs)",
                self.config_id
            ));
        }
        if !(1..=MAX_SERVER_ID_LEN).contains(&self.server_id_len) {
            return Err(format!(
                "QUIC server ID length {} is out of range 1..={MAX_SERVER_ID_LEN}",
                self.server_id_len
            ));
        }
        if self.nonce_len < MIN_NONCE_LEN {
            return Err(format!("QUIC nonce length {} is below the draft's minimum {MIN_NONCE_LEN}", self.nonce_len));
        }
        if self.cid_len() > MAX_CID_LEN {
            return Err(format!(
                "QUIC connection IDs of 1 + {} + {} octets are longer than QUIC's {MAX_CID_LEN}",
                self.server_id_len, self.nonce_len
            ));
        }
        Ok(())
    }

    /// The whole connection ID: first octet, server ID, nonce.
    pub fn cid_len(&self) -> u8 {
        1 + self.server_id_len + self.nonce_len
    }

    /// As the VIP entry carries it.
    pub fn entry(&self) -> QuicLb {
        QuicLb { config_id: self.config_id, server_id_len: self.server_id_len, cid_len: self.cid_len(), _pad: 0 }
    }

    /// A backend's server ID unless one is given by hand: the last octets
    /// of its address. Every LB host derives the same one, with no
    /// coordination, and it stays as long as the address does.
    pub fn server_id_of(&self, addr: IpAddr) -> ServerId {
        let octets = match addr {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        };
        let len = (self.server_id_len as usize).min(octets.len());
        ServerId(octets[octets.len() - len..].iter().fold(0, |id, o| id << 8 | *o as u64))
    }

    /// A server ID as the desired state keeps it: only when given by hand
    /// and not the one the address gives anyway.
    pub fn by_hand(&self, addr: IpAddr, id: Option<ServerId>) -> Option<ServerId> {
        id.filter(|id| *id != self.server_id_of(addr))
    }

    /// Whether `id` fits this VIP's server ID length.
    pub fn fits(&self, id: ServerId) -> bool {
        self.server_id_len >= 8 || id.0 >> (8 * self.server_id_len as u32) == 0
    }

    /// The octets of `id` as a connection ID carries them.
    pub fn octets(&self, id: ServerId) -> Vec<u8> {
        id.0.to_be_bytes()[8 - self.server_id_len as usize..].to_vec()
    }

    /// `id` as the API and the CLI show it: hex, two digits an octet.
    pub fn hex(&self, id: ServerId) -> String {
        self.octets(id).iter().map(|o| format!("{o:02x}")).collect()
    }
}

impl fmt::Display for QuicSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "config {} server-id {}B nonce {}B", self.config_id, self.server_id_len, self.nonce_len)
    }
}

/// A server ID, as the number its octets make (big-endian).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServerId(pub u64);

impl std::str::FromStr for ServerId {
    type Err = String;

    /// Hex octets, `0x` optional: `0a01`, `0x0a01`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits = s.strip_prefix("0x").unwrap_or(s);
        if digits.is_empty() || digits.len() > 16 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("server ID '{s}' is not 1 to 8 octets of hex (e.g. 0a01)"));
        }
        u64::from_str_radix(digits, 16).map(ServerId).map_err(|e| format!("server ID '{s}': {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_outside_the_drafts_limits_are_refused_and_say_why() {
        assert_eq!(QuicSpec::default().check(), Ok(()));
        assert_eq!(QuicSpec::default().cid_len(), 9);
        let bad = |spec: QuicSpec, words: &str| assert!(spec.check().unwrap_err().contains(words), "{spec:?}");
        bad(QuicSpec { config_id: 7, ..QuicSpec::default() }, "7 marks unroutable");
        bad(QuicSpec { server_id_len: 0, ..QuicSpec::default() }, "out of range 1..=8");
        bad(QuicSpec { server_id_len: 9, ..QuicSpec::default() }, "out of range 1..=8");
        bad(QuicSpec { nonce_len: 3, ..QuicSpec::default() }, "minimum 4");
        bad(QuicSpec { server_id_len: 8, nonce_len: 12, ..QuicSpec::default() }, "longer than QUIC's 20");
        assert_eq!(QuicSpec { server_id_len: 8, nonce_len: 11, ..QuicSpec::default() }.check(), Ok(()));
    }

    #[test]
    fn server_ids_come_from_the_addresses_last_octets_and_print_as_hex() {
        let two = QuicSpec::default();
        assert_eq!(two.server_id_of("198.51.100.7".parse().unwrap()), ServerId(0x6407));
        assert_eq!(two.server_id_of("2001:db8::a:1".parse().unwrap()), ServerId(0x0001));
        assert_eq!(two.hex(ServerId(0x6407)), "6407");
        assert_eq!(two.octets(ServerId(0x6407)), [0x64, 0x07]);
        let one = QuicSpec { server_id_len: 1, ..two };
        assert_eq!(one.server_id_of("198.51.100.7".parse().unwrap()), ServerId(0x07));
        assert!(one.fits(ServerId(0xff)) && !one.fits(ServerId(0x100)));
        assert_eq!("0x0a01".parse(), Ok(ServerId(0x0a01)));
        assert!("zz".parse::<ServerId>().is_err() && "".parse::<ServerId>().is_err());
    }
}
