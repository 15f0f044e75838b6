//! A replica that misbehaves on purpose, for the multi-process Byzantine tests: compiled only
//! with the `fault-injection` feature, which `cargo test` enables (a dev-dependency of the
//! package on itself) and the release binary does not. A node run with `SECURESMART_FAULT`
//! set to a comma-separated list does, besides its normal work:
//! - `forge-commits`: at every group tick, orders a group commit the others must refuse: a
//!   valid MLS commit that removes a current replica, or one with a flipped signature byte;
//! - `flood`: sends its peers, every few milliseconds, consensus messages they can only hold:
//!   prepares for ever later views, and 1 MiB pre-prepares of a far view it is the primary of;
//! - `swap-sealed`: answers a client's request to seal a confidential operation with another
//!   operation of the same length, sealed for the same client and number, and signed;
//! - `wrong-sealing-key`: answers a client's request for its sealing key with a made-up key
//!   of the epoch the honest replicas name.

use std::time::Duration;

use bytes::Bytes;
use securesmart_consensus::message::{Message, Request, Signer, batch_digest};
use securesmart_transport::{Class, NodeId, Plane};

/// The faults this node plays (see the module doc).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Faults {
    /// Order group commits the others must refuse.
    pub(crate) forge_commits: bool,
    /// Flood the peers with messages they can only hold.
    pub(crate) flood: bool,
    /// Seal another operation than the one a client asks to be sealed.
    pub(crate) swap_sealed: bool,
    /// Hand clients made-up sealing keys.
    pub(crate) wrong_sealing_key: bool,
}

impl Faults {
    /// The faults `SECURESMART_FAULT` names.
    pub(crate) fn from_env() -> Self {
        let spec = std::env::var("SECURESMART_FAULT").unwrap_or_default();
        let has = |name: &str| spec.split(',').any(|f| f.trim() == name);
        let faults = Self {
            forge_commits: has("forge-commits"),
            flood: has("flood"),
            swap_sealed: has("swap-sealed"),
            wrong_sealing_key: has("wrong-sealing-key"),
        };
        if faults.forge_commits || faults.flood || faults.swap_sealed || faults.wrong_sealing_key {
            tracing::warn!(
                ?faults,
                "fault injection: this replica misbehaves on purpose"
            );
        }
        faults
    }
}

/// Floods every peer of `plane` until the task is dropped (see the module doc). `replicas`
/// is the group in the engine's order (to find views whose primary this node is).
pub(crate) async fn flood(plane: Plane, signer: Signer, replicas: Vec<NodeId>) {
    let me = signer.id();
    let n = replicas.len().max(1) as u64;
    let index = replicas.iter().position(|id| *id == me).unwrap_or_default() as u64;
    let payload = Bytes::from(vec![0x5a; 8 * 1024]);
    let mut k: u64 = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tick.tick().await;
        k += 1;
        let seq = 1_000_000 + k;
        let batch: Vec<Request> = (0..128u64)
            .map(|c| Request {
                client: NodeId::from_bytes(*blake3::hash(&c.to_be_bytes()).as_bytes()),
                number: seq,
                payload: payload.clone(),
            })
            .collect();
        let pre_prepare = signer.sign(Message::PrePrepare {
            view: n * 1_000_000 + index,
            seq,
            digest: batch_digest(&batch),
            batch,
        });
        let prepare = signer.sign(Message::Prepare {
            view: 2_000_000 + k,
            seq,
            digest: batch_digest(&[]),
        });
        for m in [pre_prepare, prepare] {
            plane.broadcast(Class::Consensus, &Bytes::from(m.encode()));
        }
    }
}
