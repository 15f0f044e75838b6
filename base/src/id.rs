//! [`NodeId`]: who a node is, independent of the certificate format that carries its key.

use std::fmt;
use std::str::FromStr;

/// A node's identity: BLAKE3 of its certificate's DER-encoded SubjectPublicKeyInfo.
///
/// The transport computes it from a certificate; this crate knows only the public key info
/// (or a raw Ed25519 key, whose public key info it builds), so that an ordering engine can
/// name nodes without a TLS or X.509 library.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId([u8; 32]);

/// A string that is not the 64-character hex form of a [`NodeId`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("a node id is 64 hex characters")]
pub struct ParseNodeIdError;

impl NodeId {
    /// Length of a node id in bytes.
    pub const LEN: usize = 32;

    /// The id of a SubjectPublicKeyInfo (DER).
    pub fn from_spki(spki_der: &[u8]) -> Self {
        Self(*blake3::hash(spki_der).as_bytes())
    }

    /// The id of a raw Ed25519 public key: the id of its SubjectPublicKeyInfo (RFC 8410), as
    /// the transport computes for a certificate with that key.
    pub fn from_ed25519(public_key: &[u8; 32]) -> Self {
        const PREFIX: [u8; 12] = [
            0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
        ];
        let mut spki = [0u8; 44];
        let (prefix, key) = spki.split_at_mut(PREFIX.len());
        prefix.copy_from_slice(&PREFIX);
        key.copy_from_slice(public_key);
        Self::from_spki(&spki)
    }

    /// Wraps raw bytes (for decoders of ids carried in messages).
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Full lower-case hex (64 characters).
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Display for NodeId {
    /// The first 8 bytes in hex: enough to tell nodes apart in logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0.iter().take(8) {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

impl FromStr for NodeId {
    type Err = ParseNodeIdError;

    /// Parses the 64-character hex form of [`NodeId::to_hex`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        fn nibble(c: u8) -> Result<u8, ParseNodeIdError> {
            // Not `u8::from_str_radix`, which takes a leading '+'.
            char::from(c)
                .to_digit(16)
                .and_then(|d| u8::try_from(d).ok())
                .ok_or(ParseNodeIdError)
        }
        let s = s.as_bytes();
        if s.len() != 64 {
            return Err(ParseNodeIdError);
        }
        let mut out = [0u8; 32];
        for (byte, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
            let [hi, lo] = pair else {
                return Err(ParseNodeIdError);
            };
            *byte = nibble(*hi)? << 4 | nibble(*lo)?;
        }
        Ok(Self(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_junk_is_refused() {
        let id = NodeId::from_ed25519(&[9; 32]);
        assert_eq!(id.to_hex().parse::<NodeId>(), Ok(id));
        assert_eq!("zz".parse::<NodeId>(), Err(ParseNodeIdError));
        assert_eq!("g".repeat(64).parse::<NodeId>(), Err(ParseNodeIdError));
        assert_eq!("+f".repeat(32).parse::<NodeId>(), Err(ParseNodeIdError));
        assert_eq!(id.to_string().len(), 16);
    }
}
