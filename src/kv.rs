//! The replicated key-value store: the application `securesmart node` replicates and the demo
//! loads. It is an ordinary [`StateMachine`]; see `examples/custom_state_machine.rs` for
//! plugging in your own.
//!
//! Operations ([`KvOp`]) and replies ([`KvReply`]) have a small binary encoding (version 1,
//! byte strings with a u32 length, the decoder consumes the whole input). Every operation
//! replies with a value: `put` and `delete` return the previous value, `get` the current one,
//! so a client history can be checked for linearizability. A request that does not decode, or
//! breaks [`MAX_KEY_BYTES`] / [`MAX_VALUE_BYTES`], or a put that would grow the store past its
//! quota ([`DEFAULT_QUOTA_BYTES`], [`KvStore::with_quota`]: a bound on what every replica holds
//! and transfers), gets [`KvReply::Refused`] at every replica alike (execution is
//! deterministic) and changes nothing.
//!
//! ```
//! use bytes::Bytes;
//! use securesmart::consensus::message::Request;
//! use securesmart::consensus::service::StateMachine;
//! use securesmart::kv::{KvOp, KvReply, KvStore};
//! use securesmart::transport::NodeId;
//!
//! let mut kv = KvStore::default();
//! let put = KvOp::Put { key: Bytes::from("k"), value: Bytes::from("v") };
//! let request = |op: &KvOp, number| Request {
//!     client: NodeId::from_bytes([1; 32]),
//!     number,
//!     payload: Bytes::from(op.encode()),
//! };
//! assert_eq!(KvReply::decode(&kv.execute(&request(&put, 1))), Ok(KvReply::Value(None)));
//! let get = KvOp::Get { key: Bytes::from("k") };
//! let reply = KvReply::decode(&kv.execute(&request(&get, 2)));
//! assert_eq!(reply, Ok(KvReply::Value(Some(Bytes::from("v")))));
//! ```

use std::collections::BTreeMap;

use bytes::Bytes;
use securesmart_base::wire::{Reader, WireError, Writer};
use securesmart_consensus::message::Request;
use securesmart_consensus::service::{RestoreError, StateMachine};

/// Largest key.
pub const MAX_KEY_BYTES: usize = 1024;
/// Largest value.
pub const MAX_VALUE_BYTES: usize = 256 * 1024;
/// The store's default quota (64 MiB). State transfer fetches a snapshot in parts, so the
/// frame size no longer bounds it; the quota bounds what one client's puts can make every
/// replica hold in memory, copy at each checkpoint and write to its journal, and keeps the
/// snapshot well below the replicas' decode limit
/// ([`securesmart_consensus::message::Limits::max_snapshot_bytes`], 256 MiB). A put that would
/// pass the quota is refused.
pub const DEFAULT_QUOTA_BYTES: usize = 64 * 1024 * 1024;
/// Bytes an entry counts for beyond its key and value (its length prefixes).
const ENTRY_OVERHEAD: usize = 8;
/// Encoding version of operations, replies and snapshots.
const VERSION: u8 = 1;

/// An operation on the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvOp {
    /// Sets `key` to `value`; replies with the previous value.
    Put {
        /// The key.
        key: Bytes,
        /// The value.
        value: Bytes,
    },
    /// Reads `key`.
    Get {
        /// The key.
        key: Bytes,
    },
    /// Removes `key`; replies with the previous value.
    Delete {
        /// The key.
        key: Bytes,
    },
    /// Sets `key` to `value`, like [`KvOp::Put`], but replies with no value (a write whose
    /// reply carries nothing back).
    Set {
        /// The key.
        key: Bytes,
        /// The value.
        value: Bytes,
    },
}

/// The store's reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvReply {
    /// The value (current for `get`, previous for `put` and `delete`).
    Value(Option<Bytes>),
    /// The operation was refused (malformed or over a limit); nothing changed.
    Refused(String),
}

impl KvOp {
    /// The key the operation touches.
    pub fn key(&self) -> &Bytes {
        match self {
            KvOp::Put { key, .. }
            | KvOp::Set { key, .. }
            | KvOp::Get { key }
            | KvOp::Delete { key } => key,
        }
    }

    /// Encodes the operation.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(VERSION);
        match self {
            KvOp::Put { key, value } => {
                w.u8(1).bytes(key).bytes(value);
            }
            KvOp::Get { key } => {
                w.u8(2).bytes(key);
            }
            KvOp::Delete { key } => {
                w.u8(3).bytes(key);
            }
            KvOp::Set { key, value } => {
                w.u8(4).bytes(key).bytes(value);
            }
        }
        w.buf
    }

    /// Decodes an operation within the limits.
    ///
    /// # Errors
    /// [`WireError`] saying what is wrong.
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf);
        r.version(VERSION)?;
        let op = match r.u8()? {
            1 => KvOp::Put {
                key: Bytes::copy_from_slice(r.bytes("key", MAX_KEY_BYTES)?),
                value: Bytes::copy_from_slice(r.bytes("value", MAX_VALUE_BYTES)?),
            },
            2 => KvOp::Get {
                key: Bytes::copy_from_slice(r.bytes("key", MAX_KEY_BYTES)?),
            },
            3 => KvOp::Delete {
                key: Bytes::copy_from_slice(r.bytes("key", MAX_KEY_BYTES)?),
            },
            4 => KvOp::Set {
                key: Bytes::copy_from_slice(r.bytes("key", MAX_KEY_BYTES)?),
                value: Bytes::copy_from_slice(r.bytes("value", MAX_VALUE_BYTES)?),
            },
            other => {
                return Err(WireError::Unknown {
                    what: "kv operation",
                    value: other.into(),
                });
            }
        };
        r.finish()?;
        Ok(op)
    }
}

impl KvReply {
    /// Encodes the reply.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(VERSION);
        match self {
            KvReply::Value(None) => {
                w.u8(0);
            }
            KvReply::Value(Some(v)) => {
                w.u8(1).bytes(v);
            }
            KvReply::Refused(why) => {
                w.u8(2).bytes(why.as_bytes());
            }
        }
        w.buf
    }

    /// Decodes a reply.
    ///
    /// # Errors
    /// [`WireError`] saying what is wrong.
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf);
        r.version(VERSION)?;
        let reply = match r.u8()? {
            0 => KvReply::Value(None),
            1 => KvReply::Value(Some(Bytes::copy_from_slice(
                r.bytes("value", MAX_VALUE_BYTES)?,
            ))),
            2 => KvReply::Refused(r.string("reason", 1024)?),
            other => {
                return Err(WireError::Unknown {
                    what: "kv reply",
                    value: other.into(),
                });
            }
        };
        r.finish()?;
        Ok(reply)
    }
}

/// The key-value store (ordered map; deterministic snapshots).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvStore {
    map: BTreeMap<Bytes, Bytes>,
    /// Bytes the entries count for (keys, values, length prefixes).
    bytes: usize,
    quota: usize,
}

impl Default for KvStore {
    fn default() -> Self {
        Self::with_quota(DEFAULT_QUOTA_BYTES)
    }
}

fn entry_bytes(key: &[u8], value: &[u8]) -> usize {
    key.len()
        .saturating_add(value.len())
        .saturating_add(ENTRY_OVERHEAD)
}

impl KvStore {
    /// An empty store that refuses puts past `quota` bytes (keys, values and 8 bytes each).
    /// Every replica must use the same quota.
    pub fn with_quota(quota: usize) -> Self {
        Self {
            map: BTreeMap::new(),
            bytes: 0,
            quota,
        }
    }

    /// Bytes the entries count for against the quota.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The value of `key`, read locally (not linearizable: use a `get` through the order).
    pub fn local_get(&self, key: &[u8]) -> Option<&Bytes> {
        self.map.get(key)
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Applies a decoded operation.
    pub fn apply(&mut self, op: KvOp) -> KvReply {
        KvReply::Value(match op {
            KvOp::Set { key, value } => {
                return match self.apply(KvOp::Put { key, value }) {
                    KvReply::Value(_) => KvReply::Value(None),
                    refused => refused,
                };
            }
            KvOp::Put { key, value } => {
                let old = self.map.get(&key).map_or(0, |v| entry_bytes(&key, v));
                let after = self
                    .bytes
                    .saturating_sub(old)
                    .saturating_add(entry_bytes(&key, &value));
                if after > self.quota && after > self.bytes {
                    metrics::counter!("securesmart_kv_refused_total").increment(1);
                    return KvReply::Refused(format!(
                        "the store would hold {after} bytes, over its quota of {}",
                        self.quota
                    ));
                }
                self.bytes = after;
                self.map.insert(key, value)
            }
            KvOp::Get { key } => self.map.get(&key).cloned(),
            KvOp::Delete { key } => {
                let old = self.map.remove(&key);
                if let Some(v) = &old {
                    self.bytes = self.bytes.saturating_sub(entry_bytes(&key, v));
                }
                old
            }
        })
    }
}

impl StateMachine for KvStore {
    fn execute(&mut self, request: &Request) -> Bytes {
        let reply = match KvOp::decode(&request.payload) {
            Ok(op) => self.apply(op),
            Err(e) => {
                metrics::counter!("securesmart_kv_refused_total").increment(1);
                KvReply::Refused(e.to_string())
            }
        };
        Bytes::from(reply.encode())
    }

    fn snapshot(&self) -> Bytes {
        let mut w = Writer::default();
        w.u8(VERSION)
            .u32(u32::try_from(self.map.len()).unwrap_or(u32::MAX));
        for (k, v) in &self.map {
            w.bytes(k).bytes(v);
        }
        Bytes::from(w.buf)
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), RestoreError> {
        let mut r = Reader::new(snapshot);
        r.version(VERSION)?;
        let n = r.u32()?;
        let mut map = BTreeMap::new();
        for _ in 0..n {
            let key = Bytes::copy_from_slice(r.bytes("key", MAX_KEY_BYTES)?);
            let value = Bytes::copy_from_slice(r.bytes("value", MAX_VALUE_BYTES)?);
            map.insert(key, value);
        }
        r.finish()?;
        // (An agreed state over this replica's quota is taken as it is: the quota limits what
        // is added, not what the others certified.)
        self.bytes = map.iter().map(|(k, v)| entry_bytes(k, v)).sum();
        self.map = map;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use securesmart_transport::NodeId;

    #[test]
    fn a_put_past_the_quota_is_refused_and_a_smaller_one_taken() {
        let mut kv = KvStore::with_quota(100);
        let put = |k: &str, v: usize| KvOp::Put {
            key: Bytes::from(k.to_owned()),
            value: Bytes::from(vec![b'v'; v]),
        };
        assert_eq!(kv.apply(put("a", 60)), KvReply::Value(None));
        assert!(matches!(kv.apply(put("b", 60)), KvReply::Refused(_)));
        assert_eq!(kv.local_get(b"b"), None, "nothing changed");
        // Overwriting with a smaller value, or deleting, frees room.
        assert!(matches!(kv.apply(put("a", 10)), KvReply::Value(Some(_))));
        assert_eq!(kv.apply(put("b", 60)), KvReply::Value(None));
        assert_eq!(kv.bytes(), (1 + 10 + 8) + (1 + 60 + 8));
        let mut restored = KvStore::with_quota(100);
        restored.restore(&kv.snapshot()).unwrap();
        assert_eq!(restored, kv);
    }

    fn request(payload: Vec<u8>) -> Request {
        Request {
            client: NodeId::from_bytes([1; 32]),
            number: 1,
            payload: Bytes::from(payload),
        }
    }

    #[test]
    fn operations_reply_with_the_previous_or_current_value() {
        let mut kv = KvStore::default();
        let (k, v1, v2) = (Bytes::from("k"), Bytes::from("1"), Bytes::from("2"));
        let mut run = |op: KvOp| KvReply::decode(&kv.execute(&request(op.encode()))).unwrap();
        assert_eq!(
            run(KvOp::Put {
                key: k.clone(),
                value: v1.clone()
            }),
            KvReply::Value(None)
        );
        assert_eq!(
            run(KvOp::Put {
                key: k.clone(),
                value: v2.clone()
            }),
            KvReply::Value(Some(v1.clone()))
        );
        assert_eq!(
            run(KvOp::Get { key: k.clone() }),
            KvReply::Value(Some(v2.clone()))
        );
        assert_eq!(
            run(KvOp::Delete { key: k.clone() }),
            KvReply::Value(Some(v2))
        );
        assert_eq!(run(KvOp::Get { key: k.clone() }), KvReply::Value(None));
        // A set writes like a put and replies with nothing, also past the quota's checks.
        let set = |value: &Bytes| KvOp::Set {
            key: k.clone(),
            value: value.clone(),
        };
        assert_eq!(run(set(&v1)), KvReply::Value(None));
        assert_eq!(run(set(&v1)), KvReply::Value(None));
        assert_eq!(run(KvOp::Get { key: k.clone() }), KvReply::Value(Some(v1)));
        let mut small = KvStore::with_quota(10);
        let big = KvOp::Set {
            key: k,
            value: Bytes::from(vec![0; 64]),
        };
        assert!(matches!(small.apply(big), KvReply::Refused(_)));
    }

    #[test]
    fn garbage_is_refused_alike_and_changes_nothing() {
        let mut kv = KvStore::default();
        for bad in [vec![], vec![VERSION, 9], vec![7, 1], {
            let mut b = KvOp::Get {
                key: Bytes::from("k"),
            }
            .encode();
            b.push(0);
            b
        }] {
            let reply = KvReply::decode(&kv.execute(&request(bad))).unwrap();
            assert!(matches!(reply, KvReply::Refused(_)), "{reply:?}");
        }
        let too_long = KvOp::Get {
            key: Bytes::from(vec![0; MAX_KEY_BYTES + 1]),
        };
        assert!(KvOp::decode(&too_long.encode()).is_err());
        assert!(kv.is_empty());
    }

    #[test]
    fn snapshots_restore_the_same_store() {
        let mut kv = KvStore::default();
        for i in 0..50u32 {
            kv.apply(KvOp::Put {
                key: Bytes::from(format!("key{i}")),
                value: Bytes::from(vec![i as u8; i as usize]),
            });
        }
        let mut copy = KvStore::default();
        copy.restore(&kv.snapshot()).unwrap();
        assert_eq!(copy, kv);
        let snap = kv.snapshot();
        assert!(copy.restore(&snap[..snap.len() - 1]).is_err());
        assert_eq!(copy, kv, "a bad snapshot changes nothing");
    }
}
