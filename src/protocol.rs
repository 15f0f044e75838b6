//! What clients and replicas say to each other on the client plane, and what the node orders.
//!
//! - [`ClientRequest`] (client to replica) and [`ClientReply`] (replica to client): version 1,
//!   integers big-endian, byte strings with a u32 length; the decoder consumes the whole input
//!   and enforces [`MAX_PAYLOAD_BYTES`]. The client's identity is the authenticated peer of
//!   the connection (its certificate), never a field of the message.
//! - [`Ordered`]: the envelope of every request the node hands to the ordering engine, so that
//!   application requests and the node's own commands share one order. A replica that cannot
//!   decode an ordered payload (a faulty primary proposed it) refuses it with the same reply
//!   everywhere.

use bytes::Bytes;
use securesmart_transport::wire::{Reader, WireError, Writer};

/// Largest request or reply payload.
pub const MAX_PAYLOAD_BYTES: usize = 512 * 1024;
const VERSION: u8 = 1;

/// A client's request to a replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientRequest {
    /// The client's request number: it grows with every new request; a retransmission reuses it.
    pub number: u64,
    /// What the payload is.
    pub kind: RequestKind,
    /// The application operation, or an encoded membership command.
    pub payload: Bytes,
}

/// What a [`ClientRequest`] carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// An application operation.
    App,
    /// A membership command (`securesmart_membership::MembershipCommand`), for administrators.
    Command,
    /// An application operation the replicas keep sealed with the group key: in the log, in
    /// their journals and in state transfer it is ciphertext (see [`Ordered::Sealed`]).
    Confidential,
}

/// A replica's reply to a client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientReply {
    /// The request number it answers.
    pub number: u64,
    /// What it says.
    pub outcome: Outcome,
}

/// The body of a [`ClientReply`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The request executed; the application's reply.
    Executed(Bytes),
    /// The replica cannot take the request now (queue full, not a member); retry elsewhere or
    /// later. Never counted towards the f+1 matching replies.
    Busy,
}

impl ClientRequest {
    /// Encodes the request.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(VERSION)
            .raw(&self.number.to_be_bytes())
            .u8(match self.kind {
                RequestKind::App => 0,
                RequestKind::Command => 1,
                RequestKind::Confidential => 2,
            })
            .bytes(&self.payload);
        w.buf
    }

    /// Decodes a request.
    ///
    /// # Errors
    /// [`WireError`] saying what is wrong.
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf);
        r.version(VERSION)?;
        let number = u64::from_be_bytes(r.array()?);
        let kind = match r.u8()? {
            0 => RequestKind::App,
            1 => RequestKind::Command,
            2 => RequestKind::Confidential,
            other => {
                return Err(WireError::Unknown {
                    what: "request kind",
                    value: other.into(),
                });
            }
        };
        let payload = Bytes::copy_from_slice(r.bytes("payload", MAX_PAYLOAD_BYTES)?);
        r.finish()?;
        Ok(Self {
            number,
            kind,
            payload,
        })
    }
}

impl ClientReply {
    /// Encodes the reply.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(VERSION).raw(&self.number.to_be_bytes());
        match &self.outcome {
            Outcome::Executed(result) => {
                w.u8(1).bytes(result);
            }
            Outcome::Busy => {
                w.u8(2);
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
        let number = u64::from_be_bytes(r.array()?);
        let outcome = match r.u8()? {
            1 => Outcome::Executed(Bytes::copy_from_slice(
                r.bytes("result", MAX_PAYLOAD_BYTES)?,
            )),
            2 => Outcome::Busy,
            other => {
                return Err(WireError::Unknown {
                    what: "reply outcome",
                    value: other.into(),
                });
            }
        };
        r.finish()?;
        Ok(Self { number, outcome })
    }
}

/// A request as the node orders it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Ordered {
    /// An application operation, in the clear.
    App(Bytes),
    /// A membership command, with the submitter's clock (unix seconds) at which certificates
    /// and CRLs in it are judged (the same time at every replica).
    Command {
        /// Unix seconds.
        time: u64,
        /// The encoded `MembershipCommand`.
        command: Bytes,
    },
    /// A replica's MLS key package: it asks to be added to the replicas' group key.
    KeyPackage(Bytes),
    /// An MLS commit for the replicas' group (the ordering layer is MLS's delivery service),
    /// with the Welcome for the replicas it adds (empty if none).
    GroupCommit {
        /// The commit.
        commit: Bytes,
        /// The Welcome, or empty.
        welcome: Bytes,
    },
    /// A confidential application operation, sealed by the replica that received it with the
    /// group key of its current epoch, the context binding it to the client and request
    /// number ([`confidential_context`]). Opened only at execution.
    Sealed(Bytes),
    /// A replica holds the group key of this epoch (it merged the commit that made it, or
    /// joined with its Welcome). Sealed requests of an epoch execute only once a quorum of
    /// the replicas said so (see `securesmart::state`).
    KeyAck(u64),
}

/// Domain tag of the context a confidential request is sealed with.
pub const CONFIDENTIAL_TAG: &[u8] = b"securesmart confidential request v1";

/// The context a confidential request of `client` numbered `number` is sealed with: a sealed
/// payload copied into another client's request, or another request number, does not open.
pub fn confidential_context(client: &securesmart_transport::NodeId, number: u64) -> Vec<u8> {
    let mut c = Vec::with_capacity(CONFIDENTIAL_TAG.len() + 40);
    c.extend_from_slice(CONFIDENTIAL_TAG);
    c.extend_from_slice(client.as_bytes());
    c.extend_from_slice(&number.to_be_bytes());
    c
}

impl Ordered {
    /// Encodes the envelope.
    pub fn encode(&self) -> Bytes {
        match self {
            Ordered::App(payload) => {
                let mut out = Vec::with_capacity(1 + payload.len());
                out.push(0);
                out.extend_from_slice(payload);
                Bytes::from(out)
            }
            Ordered::Command { time, command } => {
                let mut out = Vec::with_capacity(9 + command.len());
                out.push(1);
                out.extend_from_slice(&time.to_be_bytes());
                out.extend_from_slice(command);
                Bytes::from(out)
            }
            Ordered::KeyPackage(kp) => {
                let mut out = Vec::with_capacity(1 + kp.len());
                out.push(2);
                out.extend_from_slice(kp);
                Bytes::from(out)
            }
            Ordered::GroupCommit { commit, welcome } => {
                let mut out = Vec::with_capacity(5 + commit.len() + welcome.len());
                out.push(3);
                out.extend_from_slice(
                    &u32::try_from(commit.len())
                        .unwrap_or(u32::MAX)
                        .to_be_bytes(),
                );
                out.extend_from_slice(commit);
                out.extend_from_slice(welcome);
                Bytes::from(out)
            }
            Ordered::Sealed(sealed) => {
                let mut out = Vec::with_capacity(1 + sealed.len());
                out.push(4);
                out.extend_from_slice(sealed);
                Bytes::from(out)
            }
            Ordered::KeyAck(epoch) => {
                let mut out = Vec::with_capacity(9);
                out.push(5);
                out.extend_from_slice(&epoch.to_be_bytes());
                Bytes::from(out)
            }
        }
    }

    /// Decodes an envelope (zero-copy for the payload).
    ///
    /// # Errors
    /// [`WireError`] for an empty payload or an unknown kind.
    pub fn decode(buf: &Bytes) -> Result<Self, WireError> {
        match buf.first() {
            Some(0) => Ok(Ordered::App(buf.slice(1..))),
            Some(1) => {
                let time = buf
                    .get(1..9)
                    .and_then(|t| <[u8; 8]>::try_from(t).ok())
                    .ok_or(WireError::Truncated)?;
                Ok(Ordered::Command {
                    time: u64::from_be_bytes(time),
                    command: buf.slice(9..),
                })
            }
            Some(2) => Ok(Ordered::KeyPackage(buf.slice(1..))),
            Some(3) => {
                let len = buf
                    .get(1..5)
                    .and_then(|t| <[u8; 4]>::try_from(t).ok())
                    .ok_or(WireError::Truncated)?;
                let end = 5usize.saturating_add(u32::from_be_bytes(len) as usize);
                if end > buf.len() {
                    return Err(WireError::Truncated);
                }
                Ok(Ordered::GroupCommit {
                    commit: buf.slice(5..end),
                    welcome: buf.slice(end..),
                })
            }
            Some(4) => Ok(Ordered::Sealed(buf.slice(1..))),
            Some(5) => {
                let epoch = buf
                    .get(1..)
                    .and_then(|t| <[u8; 8]>::try_from(t).ok())
                    .ok_or(WireError::Truncated)?;
                Ok(Ordered::KeyAck(u64::from_be_bytes(epoch)))
            }
            Some(other) => Err(WireError::Unknown {
                what: "ordered request kind",
                value: (*other).into(),
            }),
            None => Err(WireError::Unknown {
                what: "ordered request kind",
                value: 0,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_bad_ones_are_errors() {
        let req = ClientRequest {
            number: 7,
            kind: RequestKind::Command,
            payload: Bytes::from_static(b"op"),
        };
        assert_eq!(ClientRequest::decode(&req.encode()), Ok(req.clone()));
        let mut trailing = req.encode();
        trailing.push(0);
        assert!(ClientRequest::decode(&trailing).is_err());
        for outcome in [Outcome::Executed(Bytes::from_static(b"r")), Outcome::Busy] {
            let reply = ClientReply { number: 9, outcome };
            assert_eq!(ClientReply::decode(&reply.encode()), Ok(reply));
        }
        assert!(ClientReply::decode(&[VERSION, 0, 0, 0, 0, 0, 0, 0, 1, 9]).is_err());
        let app = Ordered::App(Bytes::from_static(b"x"));
        assert_eq!(Ordered::decode(&app.encode()), Ok(app));
        let cmd = Ordered::Command {
            time: 99,
            command: Bytes::from_static(b"cmd"),
        };
        assert_eq!(Ordered::decode(&cmd.encode()), Ok(cmd));
        assert!(Ordered::decode(&Bytes::from_static(&[1, 0, 0])).is_err());
        for o in [
            Ordered::KeyPackage(Bytes::from_static(b"kp")),
            Ordered::Sealed(Bytes::from_static(b"sealed")),
            Ordered::KeyAck(7),
            Ordered::GroupCommit {
                commit: Bytes::from_static(b"commit"),
                welcome: Bytes::from_static(b"welcome"),
            },
        ] {
            assert_eq!(Ordered::decode(&o.encode()), Ok(o));
        }
        assert!(Ordered::decode(&Bytes::from_static(&[3, 0, 0, 0, 9, 1])).is_err());
        assert!(Ordered::decode(&Bytes::new()).is_err());
        assert!(Ordered::decode(&Bytes::from_static(&[5, 0, 0, 0, 0, 0, 0, 0, 7, 0])).is_err());
        assert!(Ordered::decode(&Bytes::from_static(&[200])).is_err());
    }
}
