//! Framing on QUIC streams: a stream opens with one [`Class`] byte, then carries frames of a
//! 4-byte big-endian length followed by that many payload bytes.
//!
//! [`FrameDecoder`] does no I/O: bytes in, whole frames out, with a maximum frame size checked as
//! soon as a length prefix is seen (an oversize frame is refused before its body is buffered).

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::FrameError;

/// Bytes of the length prefix in front of every frame.
pub const FRAME_HEADER_BYTES: usize = 4;

/// Largest frame size a configuration may set (the prefix is a u32; we stay well below it).
pub const MAX_FRAME_BYTES_LIMIT: usize = 256 * 1024 * 1024;

/// A message class. Each class has its own QUIC stream per connection, so a large bulk transfer
/// never delays consensus traffic, and order holds per peer and per class.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Class {
    /// Small, latency-critical agreement messages (sent at a higher stream priority).
    Consensus,
    /// Large transfers: state transfer, checkpoints, client payloads.
    Bulk,
}

impl Class {
    /// All classes, in priority order.
    pub const ALL: [Class; 2] = [Class::Consensus, Class::Bulk];

    /// The tag byte that opens a stream of this class.
    pub const fn tag(self) -> u8 {
        match self {
            Class::Consensus => 0,
            Class::Bulk => 1,
        }
    }

    /// The class of a stream tag.
    ///
    /// # Errors
    /// [`FrameError::UnknownClass`] for any other byte.
    pub const fn from_tag(tag: u8) -> Result<Self, FrameError> {
        match tag {
            0 => Ok(Class::Consensus),
            1 => Ok(Class::Bulk),
            other => Err(FrameError::UnknownClass(other)),
        }
    }

    /// Label used in metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            Class::Consensus => "consensus",
            Class::Bulk => "bulk",
        }
    }

    /// QUIC send priority of this class's stream (higher goes first).
    pub(crate) const fn priority(self) -> i32 {
        match self {
            Class::Consensus => 1,
            Class::Bulk => 0,
        }
    }
}

/// Appends one frame (prefix and payload) to `dst`.
///
/// # Errors
/// [`FrameError::TooLarge`] when the payload exceeds `max_frame_bytes`.
pub fn encode_frame(
    dst: &mut BytesMut,
    payload: &[u8],
    max_frame_bytes: usize,
) -> Result<(), FrameError> {
    let len = checked_len(payload.len(), max_frame_bytes)?;
    dst.reserve(FRAME_HEADER_BYTES + payload.len());
    dst.put_u32(len);
    dst.put_slice(payload);
    Ok(())
}

/// The 4-byte prefix of a frame of `payload_len` bytes.
///
/// # Errors
/// [`FrameError::TooLarge`] when `payload_len` exceeds `max_frame_bytes`.
pub fn frame_header(
    payload_len: usize,
    max_frame_bytes: usize,
) -> Result<[u8; FRAME_HEADER_BYTES], FrameError> {
    Ok(checked_len(payload_len, max_frame_bytes)?.to_be_bytes())
}

fn checked_len(len: usize, max: usize) -> Result<u32, FrameError> {
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    u32::try_from(len).map_err(|_| FrameError::TooLarge { len, max })
}

/// Incremental decoder of length-prefixed frames with a size limit.
///
/// Memory held is at most one frame plus the last chunk pushed.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: BytesMut,
    max_frame_bytes: usize,
    /// Length of the frame whose prefix has been read, if any.
    pending: Option<usize>,
}

impl FrameDecoder {
    /// A decoder that refuses frames longer than `max_frame_bytes`.
    pub fn new(max_frame_bytes: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            max_frame_bytes,
            pending: None,
        }
    }

    /// Appends received bytes.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next whole frame, `Ok(None)` when more bytes are needed.
    ///
    /// # Errors
    /// [`FrameError::TooLarge`] as soon as a prefix announces more than the maximum; the decoder
    /// is then unusable (the stream must be dropped).
    pub fn next_frame(&mut self) -> Result<Option<Bytes>, FrameError> {
        let len = match self.pending {
            Some(len) => len,
            None => {
                if self.buf.len() < FRAME_HEADER_BYTES {
                    return Ok(None);
                }
                let len = self.buf.get_u32() as usize;
                if len > self.max_frame_bytes {
                    return Err(FrameError::TooLarge {
                        len,
                        max: self.max_frame_bytes,
                    });
                }
                self.pending = Some(len);
                len
            }
        };
        if self.buf.len() < len {
            // Reserve once for the whole frame rather than growing chunk by chunk.
            self.buf.reserve(len - self.buf.len());
            return Ok(None);
        }
        self.pending = None;
        Ok(Some(self.buf.split_to(len).freeze()))
    }

    /// Checks the end of a stream.
    ///
    /// # Errors
    /// [`FrameError::Truncated`] when the stream ended inside a frame.
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.buf.is_empty() && self.pending.is_none() {
            Ok(())
        } else {
            Err(FrameError::Truncated {
                buffered: self.buf.len(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn oversize_prefix_is_refused_before_the_body_arrives() {
        let mut d = FrameDecoder::new(16);
        d.push(&17u32.to_be_bytes());
        assert_eq!(
            d.next_frame(),
            Err(FrameError::TooLarge { len: 17, max: 16 })
        );
        let mut d = FrameDecoder::new(16);
        d.push(&16u32.to_be_bytes());
        assert_eq!(d.next_frame(), Ok(None));
        d.push(&[7; 16]);
        assert_eq!(d.next_frame().unwrap().unwrap().len(), 16);
        assert!(d.finish().is_ok());
    }

    #[test]
    fn truncated_stream_is_reported() {
        let mut d = FrameDecoder::new(16);
        d.push(&[0, 0, 0, 5, 1, 2]);
        assert_eq!(d.next_frame(), Ok(None));
        assert_eq!(d.finish(), Err(FrameError::Truncated { buffered: 2 }));
    }

    #[test]
    fn encoder_refuses_oversize() {
        let mut b = BytesMut::new();
        assert!(encode_frame(&mut b, &[0; 9], 8).is_err());
        assert!(b.is_empty());
    }

    #[test]
    fn class_tags() {
        for c in Class::ALL {
            assert_eq!(Class::from_tag(c.tag()), Ok(c));
        }
        assert_eq!(Class::from_tag(9), Err(FrameError::UnknownClass(9)));
    }

    proptest! {
        #[test]
        fn round_trip_any_split(
            frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..20),
            cut in 1usize..64,
        ) {
            let mut wire = BytesMut::new();
            for f in &frames {
                encode_frame(&mut wire, f, 300).unwrap();
            }
            let mut d = FrameDecoder::new(300);
            let mut out = Vec::new();
            for piece in wire.chunks(cut) {
                d.push(piece);
                while let Some(f) = d.next_frame().unwrap() {
                    out.push(f.to_vec());
                }
            }
            prop_assert!(d.finish().is_ok());
            prop_assert_eq!(out, frames);
        }
    }
}
