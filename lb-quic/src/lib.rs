//! QUIC-LB connection IDs (draft-ietf-quic-load-balancers-21) for the
//! QUIC servers behind a QUIC VIP: every CID a server issues names its
//! server ID, so the balancer sends the connection's packets to it
//! whatever address the client moves to.
//!
//! A CID is one octet (config rotation codepoint in its top 3 bits, the
//! CID's length minus one in the low 5), then the server ID and a nonce,
//! either in the clear or encrypted with AES-128 (one block when they make
//! 16 octets, else a four-pass Feistel network).
//!
//! ```
//! use lb_quic::{Config, Generator};
//! // `lbctl backend list` shows the server ID; `lbctl vip list` the layout.
//! let config = Config::new(0, vec![0x64, 0x03], 6, None).unwrap();
//! let mut cids = Generator::new(config.clone());
//! let cid = cids.generate().unwrap();
//! assert_eq!(cid.len(), 9);
//! assert_eq!(config.server_id_of(&cid), Some(vec![0x64, 0x03]));
//! ```
//!
//! With the `quinn` feature, [`Generator`] is a
//! `quinn_proto::ConnectionIdGenerator`:
//! `EndpointConfig::cid_generator(move || Box::new(Generator::new(config.clone())))`.

use aes::{
    cipher::{generic_array::GenericArray, BlockDecrypt, BlockEncrypt, KeyInit},
    Aes128,
};

/// The codepoint of CIDs that name no configuration (draft, "Config
/// Rotation").
pub const UNROUTABLE_CONFIG_ID: u8 = 0b111;
/// QUIC v1's longest connection ID (RFC 9000, 17.2).
pub const MAX_CID_LEN: usize = 20;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigError {
    ConfigId(u8),
    ServerIdLen(usize),
    NonceLen(usize),
    TooLong(usize),
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigError::ConfigId(id) => write!(f, "config id {id} is out of range 0..=6"),
            ConfigError::ServerIdLen(n) => write!(f, "a server ID of {n} octets: at least 1"),
            ConfigError::NonceLen(n) => write!(f, "a nonce of {n} octets: at least 4"),
            ConfigError::TooLong(n) => write!(f, "connection IDs of {n} octets: QUIC allows {MAX_CID_LEN}"),
        }
    }
}

impl std::error::Error for ConfigError {}

/// One QUIC-LB configuration, as a server holds it: its codepoint, its
/// own server ID (the balancer's side knows only the length), the nonce
/// length and the key, if the IDs are encrypted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    config_id: u8,
    server_id: Vec<u8>,
    nonce_len: usize,
    key: Option<[u8; 16]>,
}

impl Config {
    pub fn new(
        config_id: u8,
        server_id: Vec<u8>,
        nonce_len: usize,
        key: Option<[u8; 16]>,
    ) -> Result<Self, ConfigError> {
        if config_id >= UNROUTABLE_CONFIG_ID {
            return Err(ConfigError::ConfigId(config_id));
        }
        if server_id.is_empty() {
            return Err(ConfigError::ServerIdLen(0));
        }
        if nonce_len < 4 {
            return Err(ConfigError::NonceLen(nonce_len));
        }
        let len = 1 + server_id.len() + nonce_len;
        if len > MAX_CID_LEN {
            return Err(ConfigError::TooLong(len));
        }
        Ok(Config { config_id, server_id, nonce_len, key })
    }

    /// The length of every CID of this configuration.
    pub fn cid_len(&self) -> usize {
        1 + self.server_id.len() + self.nonce_len
    }

    /// The CID that carries `nonce` (of the configured length): what a
    /// generator issues, given its nonce.
    pub fn encode(&self, nonce: &[u8]) -> Vec<u8> {
        assert_eq!(nonce.len(), self.nonce_len, "the nonce is of the configured length");
        let mut plaintext = self.server_id.clone();
        plaintext.extend_from_slice(nonce);
        let mut cid = vec![self.config_id << 5 | (self.cid_len() - 1) as u8];
        match &self.key {
            None => cid.extend(plaintext),
            Some(key) => cid.extend(encrypt(&Aes128::new(key.into()), &plaintext)),
        }
        cid
    }

    /// The server ID a CID of this configuration carries (its codepoint
    /// and length must be this configuration's), as the balancer reads it.
    pub fn server_id_of(&self, cid: &[u8]) -> Option<Vec<u8>> {
        if cid.len() < self.cid_len() || cid[0] >> 5 != self.config_id {
            return None;
        }
        let block = &cid[1..self.cid_len()];
        let plaintext = match &self.key {
            None => block.to_vec(),
            Some(key) => decrypt(&Aes128::new(key.into()), block),
        };
        Some(plaintext[..self.server_id.len()].to_vec())
    }
}

/// Issues the CIDs of one configuration. Keyed: nonces count up from a
/// random start, never repeating (the draft's advice); in the clear,
/// they are random, as nothing may link two CIDs of a connection.
pub struct Generator {
    config: Config,
    /// Keyed configurations: the next nonce, and the first (the counter
    /// has run out when it comes round to it).
    next_nonce: u128,
    first_nonce: u128,
    exhausted: bool,
}

impl Generator {
    pub fn new(config: Config) -> Self {
        let start = rand::random::<u128>() & nonce_mask(config.nonce_len);
        Generator { config, next_nonce: start, first_nonce: start, exhausted: false }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// A new CID; `None` once a keyed configuration has used every nonce
    /// (a server must then move to a new configuration).
    pub fn generate(&mut self) -> Option<Vec<u8>> {
        let len = self.config.nonce_len;
        let nonce = if self.config.key.is_none() {
            (0..len).map(|_| rand::random::<u8>()).collect()
        } else {
            if self.exhausted {
                return None;
            }
            // Nonces longer than 16 octets keep their leading zeros.
            let counter = self.next_nonce.to_be_bytes();
            let nonce =
                if len <= 16 { counter[16 - len..].to_vec() } else { [vec![0; len - 16], counter.to_vec()].concat() };
            self.next_nonce = self.next_nonce.wrapping_add(1) & nonce_mask(len);
            self.exhausted = self.next_nonce == self.first_nonce;
            nonce
        };
        Some(self.config.encode(&nonce))
    }
}

fn nonce_mask(len: usize) -> u128 {
    if len >= 16 {
        u128::MAX
    } else {
        (1u128 << (8 * len)) - 1
    }
}

#[cfg(feature = "quinn")]
impl quinn_proto::ConnectionIdGenerator for Generator {
    fn generate_cid(&mut self) -> quinn_proto::ConnectionId {
        // Out of nonces: the draft's fallback, an unroutable CID (codepoint
        // 0b111, random octets); its connection goes by the 5-tuple.
        let cid = self.generate().unwrap_or_else(|| {
            let mut cid: Vec<u8> = (0..self.config.cid_len()).map(|_| rand::random()).collect();
            cid[0] = UNROUTABLE_CONFIG_ID << 5 | (cid.len() - 1) as u8;
            cid
        });
        quinn_proto::ConnectionId::new(&cid)
    }

    fn cid_len(&self) -> usize {
        self.config.cid_len()
    }

    fn cid_lifetime(&self) -> Option<std::time::Duration> {
        None
    }
}

/// AES-128 of one block.
fn aes_block(cipher: &Aes128, input: [u8; 16]) -> [u8; 16] {
    let mut block = GenericArray::from(input);
    cipher.encrypt_block(&mut block);
    block.into()
}

/// The draft's expand(): `half` in the first octets, zeros, then the
/// plaintext length and the pass.
fn expand(len: usize, pass: u8, half: &[u8]) -> [u8; 16] {
    let mut block = [0u8; 16];
    block[..half.len()].copy_from_slice(half);
    block[14] = len as u8;
    block[15] = pass;
    block
}

/// The halves of a plaintext or ciphertext of `len` octets: `half_len`
/// each, the middle octet shared when `len` is odd (left keeps its high
/// nibble, right its low one).
fn split(bytes: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let half = bytes.len().div_ceil(2);
    let (mut left, mut right) = (bytes[..half].to_vec(), bytes[bytes.len() - half..].to_vec());
    if bytes.len() % 2 == 1 {
        clear_last_nibble(&mut left);
        right[0] &= 0x0f;
    }
    (left, right)
}

fn join(left: &[u8], right: &[u8], len: usize) -> Vec<u8> {
    let mut out = left.to_vec();
    if len % 2 == 1 {
        *out.last_mut().expect("a half is never empty") |= right[0] & 0x0f;
        out.extend_from_slice(&right[1..]);
    } else {
        out.extend_from_slice(right);
    }
    out
}

fn clear_last_nibble(half: &mut [u8]) {
    if let Some(last) = half.last_mut() {
        *last &= 0xf0;
    }
}

/// One Feistel pass: `target` ^= AES(expand(len, pass, source)), its
/// shared nibble cleared for odd lengths (`right`: the first one).
fn pass(cipher: &Aes128, len: usize, pass: u8, source: &[u8], target: &[u8], right: bool) -> Vec<u8> {
    let mask = aes_block(cipher, expand(len, pass, source));
    let mut out: Vec<u8> = target.iter().zip(mask).map(|(t, m)| t ^ m).collect();
    if len % 2 == 1 {
        if right {
            out[0] &= 0x0f;
        } else {
            clear_last_nibble(&mut out);
        }
    }
    out
}

/// Server ID and nonce to ciphertext: one AES block at 16 octets, else
/// the four-pass network.
fn encrypt(cipher: &Aes128, plaintext: &[u8]) -> Vec<u8> {
    let len = plaintext.len();
    if len == 16 {
        return aes_block(cipher, plaintext.try_into().expect("16 octets")).to_vec();
    }
    let (left_0, right_0) = split(plaintext);
    let right_1 = pass(cipher, len, 1, &left_0, &right_0, true);
    let left_1 = pass(cipher, len, 2, &right_1, &left_0, false);
    let right_2 = pass(cipher, len, 3, &left_1, &right_1, true);
    let left_2 = pass(cipher, len, 4, &right_2, &left_1, false);
    join(&left_2, &right_2, len)
}

/// The inverse of [`encrypt`] (the balancer's side; it could stop after
/// three passes when the server ID fits in the left half).
fn decrypt(cipher: &Aes128, ciphertext: &[u8]) -> Vec<u8> {
    let len = ciphertext.len();
    if len == 16 {
        let mut block = GenericArray::clone_from_slice(ciphertext);
        cipher.decrypt_block(&mut block);
        return block.to_vec();
    }
    let (left_2, right_2) = split(ciphertext);
    let left_1 = pass(cipher, len, 4, &right_2, &left_2, false);
    let right_1 = pass(cipher, len, 3, &left_1, &right_2, true);
    let left_0 = pass(cipher, len, 2, &right_1, &left_1, false);
    let right_0 = pass(cipher, len, 1, &left_0, &right_1, true);
    join(&left_0, &right_0, len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(text: &str) -> Vec<u8> {
        (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap()).collect()
    }

    /// The draft's "Load Balancer Test Vectors": encode with the given
    /// nonce, and decode back to the server ID.
    fn vector(config_id: u8, sid: &str, nonce: &str, key: Option<&str>, cid: &str) {
        let key = key.map(|k| hex(k).try_into().unwrap());
        let config = Config::new(config_id, hex(sid), nonce.len() / 2, key).unwrap();
        assert_eq!(config.encode(&hex(nonce)), hex(cid), "sid {sid} nonce {nonce}");
        assert_eq!(config.server_id_of(&hex(cid)), Some(hex(sid)));
    }

    #[test]
    fn the_drafts_unencrypted_vector() {
        vector(0, "c4605e", "4504cc4f", None, "07c4605e4504cc4f");
        // (The draft's second one is garbled: its nonce has 9 hex digits.)
    }

    const KEY: &str = "8f95f09245765f80256934e50c66207f";

    #[test]
    fn the_drafts_encrypted_vectors_four_pass_and_single_pass() {
        // Seven octets: four passes, odd length.
        vector(0, "ed793a", "ee080dbf", Some(KEY), "0720b1d07b359d3c");
        // Fifteen octets, the server ID longer than the nonce: the fourth
        // decryption pass is needed.
        vector(1, "ed793a51d49b8f5fab65", "ee080dbf48", Some(KEY), "2fcc381bc74cb4fbad2823a3d1f8fed2");
        // Sixteen octets: one AES block.
        vector(2, "ed793a51d49b8f5f", "ee080dbf48c0d1e5", Some(KEY), "504dd2d05a7b0de9b2b9907afb5ecf8cc3");
    }

    #[test]
    fn the_drafts_eighteen_octet_vector_whose_first_octet_says_config_0() {
        // Listed under cr_bits 3, but its first octet 0x12 is codepoint 0
        // (length 18): the ciphertext is checked under codepoint 0.
        vector(0, "ed793a51d49b8f5fab", "ee080dbf48c0d1e55d", Some(KEY), "125779c9cc86beb3a3a4a3ca96fce4bfe0cdbc");
    }

    #[test]
    fn the_drafts_worked_example_step_by_step() {
        // "Encryption Example": server ID 31441a, nonce 9c69c275.
        let cipher = Aes128::new((&hex("fdf726a9893ec05c0632d3956680baf0")[..]).into());
        let (left_0, right_0) = split(&hex("31441a9c69c275"));
        assert_eq!((left_0.clone(), right_0.clone()), (hex("31441a90"), hex("0c69c275")));
        assert_eq!(expand(7, 1, &left_0).to_vec(), hex("31441a90000000000000000000000701"));
        let right_1 = pass(&cipher, 7, 1, &left_0, &right_0, true);
        assert_eq!(right_1, hex("0e3c1ff9"));
        let left_1 = pass(&cipher, 7, 2, &right_1, &left_0, false);
        assert_eq!(left_1, hex("d4a04850"));
        let right_2 = pass(&cipher, 7, 3, &left_1, &right_1, true);
        assert_eq!(right_2, hex("09be054a"));
        let left_2 = pass(&cipher, 7, 4, &right_2, &left_1, false);
        assert_eq!(left_2, hex("67947d20"));
        assert_eq!(join(&left_2, &right_2, 7), hex("67947d29be054a"));
    }

    #[test]
    fn generated_cids_carry_the_server_id_and_never_the_same_nonce() {
        for key in [None, Some([7u8; 16])] {
            for (sid_len, nonce_len) in [(1, 4), (2, 6), (3, 4), (8, 8), (8, 11), (15, 4)] {
                let config = Config::new(3, (1..=sid_len as u8).collect(), nonce_len, key).unwrap();
                let mut generator = Generator::new(config.clone());
                let cids: std::collections::HashSet<Vec<u8>> =
                    (0..1000).map(|_| generator.generate().unwrap()).collect();
                // Counted nonces never repeat; random ones of 6 octets or
                // more do not in 1000 draws (shorter ones might, rarely).
                if key.is_some() || nonce_len >= 6 {
                    assert_eq!(cids.len(), 1000, "{sid_len}+{nonce_len}: unique");
                }
                for cid in &cids {
                    assert_eq!(cid.len(), 1 + sid_len + nonce_len);
                    assert_eq!(cid[0], 3 << 5 | (sid_len + nonce_len) as u8, "codepoint and length");
                    assert_eq!(config.server_id_of(cid), Some(config.server_id.clone()));
                }
            }
        }
    }

    #[test]
    fn a_keyed_generator_stops_when_its_nonces_run_out() {
        let config = Config::new(0, vec![1], 4, Some([1; 16])).unwrap();
        let mut generator = Generator::new(config);
        generator.next_nonce = generator.first_nonce.wrapping_sub(2) & nonce_mask(4);
        assert!(generator.generate().is_some() && generator.generate().is_some());
        assert_eq!(generator.generate(), None);
    }

    #[test]
    fn configurations_outside_the_drafts_limits_are_refused() {
        assert_eq!(Config::new(7, vec![1], 4, None), Err(ConfigError::ConfigId(7)));
        assert_eq!(Config::new(0, vec![], 4, None), Err(ConfigError::ServerIdLen(0)));
        assert_eq!(Config::new(0, vec![1], 3, None), Err(ConfigError::NonceLen(3)));
        assert_eq!(Config::new(0, vec![1; 16], 4, None), Err(ConfigError::TooLong(21)));
    }
}
