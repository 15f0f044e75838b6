//! A small binary codec for messages from untrusted peers: big-endian integers and
//! length-prefixed byte strings, every length checked against an explicit limit, and a decoder
//! that must consume the whole buffer. The membership commands, the enrollment protocol and the
//! consensus messages are all written with it.
//!
//! [`Encode`] and [`Decode`] are the codec as traits, implemented for the integers, fixed-size
//! arrays, [`NodeId`], socket addresses and tuples of them; [`wire_tags!`](crate::wire_tags)
//! declares a tag enum whose table serves encoding and decoding alike, so that a message's
//! variants are matched (exhaustively) against one list of numbers.
//!
//! ```
//! use securesmart_base::wire::{Decode, Encode, Reader, WireError, Writer};
//!
//! securesmart_base::wire_tags! {
//!     /// What a shape message is.
//!     pub enum ShapeTag: "shape" {
//!         /// A circle.
//!         Circle = 1,
//!         /// A square.
//!         Square = 2,
//!     }
//! }
//!
//! #[derive(Debug, PartialEq)]
//! enum Shape {
//!     Circle { radius: u32 },
//!     Square { side: u64 },
//! }
//!
//! impl Encode for Shape {
//!     fn encode(&self, w: &mut Writer) {
//!         match self {
//!             Shape::Circle { radius } => (ShapeTag::Circle, *radius).encode(w),
//!             Shape::Square { side } => (ShapeTag::Square, *side).encode(w),
//!         }
//!     }
//! }
//!
//! impl Decode<'_> for Shape {
//!     fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
//!         Ok(match ShapeTag::decode(r)? {
//!             ShapeTag::Circle => Shape::Circle { radius: r.u32()? },
//!             ShapeTag::Square => Shape::Square { side: r.u64()? },
//!         })
//!     }
//! }
//!
//! let bytes = Shape::Square { side: 3 }.to_vec();
//! assert_eq!(Shape::from_slice(&bytes)?, Shape::Square { side: 3 });
//! assert_eq!(
//!     Shape::from_slice(&[9]),
//!     Err(WireError::Unknown { what: "shape", value: 9 })
//! );
//! # Ok::<(), WireError>(())
//! ```

use crate::NodeId;

/// A decoding failure. Input from a peer never panics; it gets one of these.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The input ended early.
    #[error("truncated input")]
    Truncated,
    /// A length exceeds its limit.
    #[error("{what} of {len} bytes exceeds the limit of {max}")]
    TooLong {
        /// The field.
        what: &'static str,
        /// Its announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Bytes remain after the message.
    #[error("{0} trailing bytes")]
    Trailing(usize),
    /// An unknown version or tag.
    #[error("unknown {what} {value}")]
    Unknown {
        /// The field.
        what: &'static str,
        /// The value seen.
        value: u64,
    },
    /// A field is malformed (bad UTF-8, invalid value).
    #[error("invalid {0}")]
    Invalid(&'static str),
}

/// Reads fields off a buffer.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader over `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Truncated);
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    /// One byte.
    ///
    /// # Errors
    /// [`WireError::Truncated`].
    pub fn u8(&mut self) -> Result<u8, WireError> {
        let [b] = self.array::<1>()?;
        Ok(b)
    }

    /// A big-endian u32.
    ///
    /// # Errors
    /// [`WireError::Truncated`].
    pub fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    /// `N` raw bytes.
    ///
    /// # Errors
    /// [`WireError::Truncated`].
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let bytes = self.take(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    /// A version byte, which must be `expected`.
    ///
    /// # Errors
    /// [`WireError::Truncated`], [`WireError::Unknown`].
    pub fn version(&mut self, expected: u8) -> Result<(), WireError> {
        match self.u8()? {
            v if v == expected => Ok(()),
            v => Err(WireError::Unknown {
                what: "version",
                value: v.into(),
            }),
        }
    }

    /// A byte string with a u32 length prefix of at most `max`.
    ///
    /// # Errors
    /// [`WireError::Truncated`], [`WireError::TooLong`].
    pub fn bytes(&mut self, what: &'static str, max: usize) -> Result<&'a [u8], WireError> {
        let len = self.u32()? as usize;
        if len > max {
            return Err(WireError::TooLong { what, len, max });
        }
        self.take(len)
    }

    /// A UTF-8 string with a u32 length prefix of at most `max` bytes.
    ///
    /// # Errors
    /// As [`Reader::bytes`], and [`WireError::Invalid`] for bad UTF-8.
    pub fn string(&mut self, what: &'static str, max: usize) -> Result<String, WireError> {
        let b = self.bytes(what, max)?;
        String::from_utf8(b.to_vec()).map_err(|_| WireError::Invalid(what))
    }

    /// A u32 count of items that follow, at most `max`.
    ///
    /// # Errors
    /// [`WireError::Truncated`], or [`WireError::TooLong`] above `max`.
    pub fn count(&mut self, what: &'static str, max: usize) -> Result<usize, WireError> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(WireError::TooLong { what, len: n, max });
        }
        Ok(n)
    }

    /// A big-endian u64.
    ///
    /// # Errors
    /// [`WireError::Truncated`].
    pub fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// A socket address as [`Writer::addr`] writes it.
    ///
    /// # Errors
    /// [`WireError::Truncated`], or [`WireError::Unknown`] for an unknown address family.
    pub fn addr(&mut self) -> Result<std::net::SocketAddr, WireError> {
        let ip = match self.u8()? {
            4 => std::net::IpAddr::from(self.array::<4>()?),
            6 => std::net::IpAddr::from(self.array::<16>()?),
            other => {
                return Err(WireError::Unknown {
                    what: "address family",
                    value: other.into(),
                });
            }
        };
        Ok(std::net::SocketAddr::new(
            ip,
            u16::from_be_bytes(self.array()?),
        ))
    }

    /// Ends decoding: the whole buffer must have been consumed.
    ///
    /// # Errors
    /// [`WireError::Trailing`].
    pub fn finish(self) -> Result<(), WireError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(WireError::Trailing(self.buf.len()))
        }
    }
}

/// Writes fields to a buffer.
#[derive(Debug, Default)]
pub struct Writer {
    /// The bytes written so far.
    pub buf: Vec<u8>,
}

impl Writer {
    /// One byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }

    /// A big-endian u32.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// A u32 count of items that follow (callers keep counts within their limits).
    pub fn count(&mut self, n: usize) -> &mut Self {
        self.u32(u32::try_from(n).unwrap_or(u32::MAX))
    }

    /// A big-endian u64.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.raw(&v.to_be_bytes())
    }

    /// A socket address: the family (4 or 6), the address, the port (big-endian u16).
    pub fn addr(&mut self, addr: &std::net::SocketAddr) -> &mut Self {
        match addr.ip() {
            std::net::IpAddr::V4(ip) => self.u8(4).raw(&ip.octets()),
            std::net::IpAddr::V6(ip) => self.u8(6).raw(&ip.octets()),
        };
        self.raw(&addr.port().to_be_bytes())
    }

    /// Raw bytes, no prefix.
    pub fn raw(&mut self, v: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(v);
        self
    }

    /// A byte string with a u32 length prefix (callers keep lengths within their limits).
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.u32(u32::try_from(v.len()).unwrap_or(u32::MAX));
        self.raw(v)
    }
}

/// A value with a wire form.
pub trait Encode {
    /// Appends the value to `w`.
    fn encode(&self, w: &mut Writer);

    /// The value's wire form alone.
    fn to_vec(&self) -> Vec<u8> {
        let mut w = Writer::default();
        self.encode(&mut w);
        w.buf
    }
}

/// A value read back from its wire form; `'a` is the buffer's lifetime, for values that borrow
/// from it.
pub trait Decode<'a>: Sized {
    /// Reads one value off `r`.
    ///
    /// # Errors
    /// A [`WireError`] for malformed input; never a panic.
    fn decode(r: &mut Reader<'a>) -> Result<Self, WireError>;

    /// Reads one value that must fill `buf` exactly.
    ///
    /// # Errors
    /// As [`Decode::decode`], and [`WireError::Trailing`] for bytes after it.
    fn from_slice(buf: &'a [u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf);
        let v = Self::decode(&mut r)?;
        r.finish()?;
        Ok(v)
    }
}

macro_rules! integers {
    ($($t:ty => $read:ident),*) => {$(
        impl Encode for $t {
            fn encode(&self, w: &mut Writer) {
                w.$read(*self);
            }
        }
        impl Decode<'_> for $t {
            fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
                r.$read()
            }
        }
    )*};
}
integers!(u8 => u8, u32 => u32, u64 => u64);

impl Encode for bool {
    fn encode(&self, w: &mut Writer) {
        w.u8(u8::from(*self));
    }
}

impl Decode<'_> for bool {
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        match r.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(WireError::Invalid("boolean")),
        }
    }
}

impl<const N: usize> Encode for [u8; N] {
    fn encode(&self, w: &mut Writer) {
        w.raw(self);
    }
}

impl<const N: usize> Decode<'_> for [u8; N] {
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        r.array()
    }
}

impl Encode for NodeId {
    fn encode(&self, w: &mut Writer) {
        w.raw(self.as_bytes());
    }
}

impl Decode<'_> for NodeId {
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        r.array().map(NodeId::from_bytes)
    }
}

impl Encode for std::net::SocketAddr {
    fn encode(&self, w: &mut Writer) {
        w.addr(self);
    }
}

impl Decode<'_> for std::net::SocketAddr {
    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        r.addr()
    }
}

macro_rules! tuples {
    ($(($($t:ident),+)),*) => {$(
        impl<$($t: Encode),+> Encode for ($($t,)+) {
            #[allow(non_snake_case)]
            fn encode(&self, w: &mut Writer) {
                let ($($t,)+) = self;
                $($t.encode(w);)+
            }
        }
        impl<'a, $($t: Decode<'a>),+> Decode<'a> for ($($t,)+) {
            fn decode(r: &mut Reader<'a>) -> Result<Self, WireError> {
                Ok(($($t::decode(r)?,)+))
            }
        }
    )*};
}
tuples!((A, B), (A, B, C), (A, B, C, D));

/// Declares a fieldless tag enum with its wire numbers written once: [`Encode`] writes the
/// number as one byte, [`Decode`] maps it back (or fails with [`WireError::Unknown`] naming
/// the field), `ALL` lists the variants. Match on the decoded tag, exhaustively, to decode a
/// message's variants; encode each variant by writing its tag.
///
/// ```
/// securesmart_base::wire_tags! {
///     /// A vote's phase.
///     pub enum Phase: "phase" {
///         /// First round.
///         Prepare = 1,
///         /// Second round.
///         Commit = 2,
///     }
/// }
/// assert_eq!(Phase::Commit.tag(), 2);
/// assert_eq!(Phase::from_tag(1), Ok(Phase::Prepare));
/// assert_eq!(Phase::ALL.len(), 2);
/// ```
#[macro_export]
macro_rules! wire_tags {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident : $what:literal {
            $($(#[$vmeta:meta])* $variant:ident = $tag:literal),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(u8)]
        $vis enum $name {
            $($(#[$vmeta])* $variant = $tag),+
        }

        impl $name {
            /// Every variant, in declaration order.
            $vis const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The wire number.
            $vis const fn tag(self) -> u8 {
                self as u8
            }

            /// The variant with wire number `tag`.
            ///
            /// # Errors
            /// [`WireError::Unknown`]($crate::wire::WireError::Unknown) for another number.
            $vis fn from_tag(tag: u8) -> ::core::result::Result<Self, $crate::wire::WireError> {
                match tag {
                    $($tag => Ok($name::$variant),)+
                    other => Err($crate::wire::WireError::Unknown {
                        what: $what,
                        value: u64::from(other),
                    }),
                }
            }
        }

        impl $crate::wire::Encode for $name {
            fn encode(&self, w: &mut $crate::wire::Writer) {
                w.u8(self.tag());
            }
        }

        impl $crate::wire::Decode<'_> for $name {
            fn decode(
                r: &mut $crate::wire::Reader<'_>,
            ) -> ::core::result::Result<Self, $crate::wire::WireError> {
                Self::from_tag(r.u8()?)
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_truncation_and_trailing_bytes() {
        let mut w = Writer::default();
        w.u8(7).bytes(b"abc").u32(9);
        let mut r = Reader::new(&w.buf);
        assert_eq!(r.u8(), Ok(7));
        assert_eq!(r.bytes("x", 3), Ok(&b"abc"[..]));
        assert_eq!(r.u32(), Ok(9));
        assert_eq!(r.finish(), Ok(()));
        let mut r = Reader::new(&w.buf);
        r.u8().unwrap();
        assert!(matches!(r.bytes("x", 2), Err(WireError::TooLong { .. })));
        let mut r = Reader::new(&w.buf[..5]);
        r.u8().unwrap();
        assert_eq!(r.bytes("x", 3), Err(WireError::Truncated));
        let mut r = Reader::new(&w.buf);
        r.u8().unwrap();
        assert_eq!(r.finish(), Err(WireError::Trailing(11)));
    }

    crate::wire_tags! {
        /// Test tags.
        enum Kind: "kind" {
            /// One.
            A = 1,
            /// Two.
            B = 7,
        }
    }

    #[test]
    fn tags_round_trip_and_unknown_numbers_are_named() {
        for k in Kind::ALL {
            assert_eq!(Kind::from_slice(&k.to_vec()), Ok(*k));
        }
        assert_eq!(Kind::B.to_vec(), vec![7]);
        for n in (0..=255u8).filter(|n| ![1, 7].contains(n)) {
            assert_eq!(
                Kind::from_slice(&[n]),
                Err(WireError::Unknown {
                    what: "kind",
                    value: n.into()
                })
            );
        }
    }

    #[test]
    fn values_round_trip_and_must_fill_the_buffer() {
        let addr: std::net::SocketAddr = "[::1]:9".parse().unwrap();
        let v = (NodeId::from_bytes([3; 32]), 5u64, addr, true);
        let bytes = v.to_vec();
        assert_eq!(
            <(NodeId, u64, std::net::SocketAddr, bool)>::from_slice(&bytes),
            Ok(v)
        );
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(
            <(NodeId, u64, std::net::SocketAddr, bool)>::from_slice(&long),
            Err(WireError::Trailing(1))
        );
        for cut in 0..bytes.len() {
            assert!(
                <(NodeId, u64, std::net::SocketAddr, bool)>::from_slice(&bytes[..cut]).is_err()
            );
        }
        assert_eq!(bool::from_slice(&[2]), Err(WireError::Invalid("boolean")));
    }
}
