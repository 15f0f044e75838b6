//! Secret-key newtypes: the bytes are zeroized when dropped, compared in constant time, and
//! never shown by `Debug` (which prints only the length), so that a key in a struct that
//! derives `Debug` cannot reach a log.
//!
//! ```
//! use securesmart_base::keys::SecretKey;
//! let key = SecretKey::<32>::from_bytes([7; 32]);
//! assert_eq!(format!("{key:?}"), "SecretKey<32>(..)");
//! assert!(key == SecretKey::from_bytes([7; 32]));
//! ```

use std::fmt;

use subtle::ConstantTimeEq;
use zeroize::Zeroize;

/// `N` secret bytes: a symmetric key, a seed, a token.
#[derive(Clone)]
pub struct SecretKey<const N: usize>([u8; N]);

impl<const N: usize> SecretKey<N> {
    /// Wraps `bytes` (the caller's copy is its own to zeroize).
    pub const fn from_bytes(bytes: [u8; N]) -> Self {
        Self(bytes)
    }

    /// The secret bytes, for the cipher or key derivation that uses them.
    pub const fn expose(&self) -> &[u8; N] {
        &self.0
    }
}

impl<const N: usize> Drop for SecretKey<N> {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl<const N: usize> fmt::Debug for SecretKey<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey<{N}>(..)")
    }
}

impl<const N: usize> PartialEq for SecretKey<N> {
    /// In constant time.
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl<const N: usize> Eq for SecretKey<N> {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_the_bytes_and_equality_compares_them() {
        let key = SecretKey::from_bytes([0xab; 16]);
        let shown = format!("{key:?} {:?}", Some(&key));
        assert!(!shown.contains("ab") && !shown.contains("171"), "{shown}");
        assert!(key != SecretKey::from_bytes([0xac; 16]));
        assert_eq!(key.expose(), &[0xab; 16]);
    }
}
