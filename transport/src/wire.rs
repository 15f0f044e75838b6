//! A small binary codec for messages from untrusted peers: big-endian integers and
//! length-prefixed byte strings, every length checked against an explicit limit, and a decoder
//! that must consume the whole buffer. The membership commands, the enrollment protocol and the
//! consensus messages are all written with it.

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
}
