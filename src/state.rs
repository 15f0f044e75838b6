//! The node's replicated state: the membership (members, CRL, epoch), the administrators, and
//! the application, behind the [`Ordered`] envelope.
//!
//! Every replica executes the same ordered requests on a [`NodeState`], so all of them agree on
//! the membership at every log position. A membership command is applied with
//! `securesmart_membership::Membership::apply` at the time the submitter stamped on it. Who may
//! submit what (checked at execution, identically everywhere):
//! - `AddNode` and `RemoveNode`: an administrator (a client id named in the genesis
//!   configuration); a replica may also remove itself (leave).
//! - `UpdateCrl`: anyone; the CRL must be signed by the CA and newer than the current one (the
//!   replicas submit the CRL file they watch), and it removes the members it revokes.
//!
//! What an applied command changed is kept in [`NodeState::take_changes`] for the node to carry
//! out after the batch (reconfigure the engine, admit or cut off peers). The snapshot holds the
//! administrators, the membership and the application's snapshot.

use std::collections::BTreeSet;

use bytes::Bytes;
use rustls::pki_types::UnixTime;
use securesmart_consensus::message::Request;
use securesmart_consensus::service::{RestoreError, StateMachine};
use securesmart_membership::{Applied, Membership, MembershipCommand};
use securesmart_transport::NodeId;
use securesmart_transport::wire::{Reader, Writer};

use crate::protocol::Ordered;

const VERSION: u8 = 1;
/// Administrators in a snapshot at most.
const MAX_ADMINS: usize = 1024;

/// The replicated state of a node running application `S`.
#[derive(Debug)]
pub struct NodeState<S> {
    membership: Membership,
    admins: BTreeSet<NodeId>,
    app: S,
    changes: Vec<Applied>,
    group: Vec<GroupEvent>,
    /// The MLS epoch the next accepted group commit must be made for (`None` before the first).
    group_epoch: Option<u64>,
}

/// An ordered message for the replicas' MLS group, from a current replica, for the node to
/// hand to its group member (the group key is each member's own state, not replicated state).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GroupEvent {
    /// A replica's key package.
    KeyPackage {
        /// The replica.
        from: NodeId,
        /// Its key package.
        key_package: Bytes,
    },
    /// A commit, with its Welcome (empty if none).
    Commit {
        /// The commit.
        commit: Bytes,
        /// The Welcome.
        welcome: Bytes,
    },
}

/// The reply to an ordered membership command: `ok epoch N` or `refused: why`.
pub fn command_reply(result: &Result<Applied, String>, epoch: u64) -> Bytes {
    Bytes::from(match result {
        Ok(_) => format!("ok epoch {epoch}"),
        Err(why) => format!("refused: {why}"),
    })
}

impl<S: StateMachine> NodeState<S> {
    /// The state at genesis.
    pub fn new(membership: Membership, admins: BTreeSet<NodeId>, app: S) -> Self {
        Self {
            membership,
            admins,
            app,
            changes: Vec::new(),
            group: Vec::new(),
            group_epoch: None,
        }
    }

    /// Group messages executed since the last call, in order.
    pub fn take_group_events(&mut self) -> Vec<GroupEvent> {
        std::mem::take(&mut self.group)
    }

    fn group_message(&mut self, client: NodeId, event: GroupEvent) -> Bytes {
        if !self.membership.replica_ids().contains(&client) {
            return Bytes::from_static(b"refused: not a replica");
        }
        self.group.push(event);
        Bytes::from_static(b"ok")
    }

    /// The current membership.
    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    /// The application.
    pub fn app(&self) -> &S {
        &self.app
    }

    /// What executed commands changed since the last call.
    pub fn take_changes(&mut self) -> Vec<Applied> {
        std::mem::take(&mut self.changes)
    }

    fn command(&mut self, client: NodeId, time: u64, command: &[u8]) -> Bytes {
        let result = MembershipCommand::decode(command)
            .map_err(|e| format!("malformed command: {e}"))
            .and_then(|cmd| {
                let allowed = match &cmd {
                    MembershipCommand::UpdateCrl { .. } => true,
                    MembershipCommand::RemoveNode { id } if *id == client => true,
                    _ => self.admins.contains(&client),
                };
                if !allowed {
                    return Err("not an administrator".to_string());
                }
                self.membership
                    .apply(
                        &cmd,
                        UnixTime::since_unix_epoch(std::time::Duration::from_secs(time)),
                    )
                    .map_err(|e| e.to_string())
            });
        match &result {
            Ok(applied) => {
                metrics::counter!("securesmart_node_membership_changes_total").increment(1);
                tracing::info!(
                    epoch = self.membership.epoch(),
                    ?applied,
                    "membership changed"
                );
                self.changes.push(applied.clone());
            }
            Err(why) => {
                metrics::counter!("securesmart_node_membership_refusals_total").increment(1);
                tracing::info!(%why, ?client, "membership command refused");
            }
        }
        command_reply(&result, self.membership.epoch())
    }
}

impl<S: StateMachine> StateMachine for NodeState<S> {
    fn execute(&mut self, request: &Request) -> Bytes {
        match Ordered::decode(&request.payload) {
            Ok(Ordered::App(payload)) => self.app.execute(&Request {
                client: request.client,
                number: request.number,
                payload,
            }),
            Ok(Ordered::Command { time, command }) => self.command(request.client, time, &command),
            Ok(Ordered::KeyPackage(key_package)) => self.group_message(
                request.client,
                GroupEvent::KeyPackage {
                    from: request.client,
                    key_package,
                },
            ),
            Ok(Ordered::GroupCommit { commit, welcome }) => {
                // Only the first commit made for the current epoch counts (the one every member
                // merges); a Welcome rides only on that one, so that nobody joins from a commit
                // that lost the race.
                match securesmart_membership::commit_epoch(&commit) {
                    Ok(e) if self.group_epoch.is_none_or(|want| want == e) => {
                        let reply = self
                            .group_message(request.client, GroupEvent::Commit { commit, welcome });
                        if reply.starts_with(b"ok") {
                            self.group_epoch = Some(e + 1);
                        }
                        reply
                    }
                    Ok(_) => Bytes::from_static(b"refused: not a commit for the current epoch"),
                    Err(_) => Bytes::from_static(b"refused: not an MLS commit"),
                }
            }
            Err(e) => {
                metrics::counter!("securesmart_node_undecodable_ordered_total").increment(1);
                tracing::warn!(error = %e, client = ?request.client, "ordered request does not decode");
                Bytes::new()
            }
        }
    }

    fn snapshot(&self) -> Bytes {
        let mut w = Writer::default();
        w.u8(VERSION)
            .u32(u32::try_from(self.admins.len()).unwrap_or(u32::MAX));
        for a in &self.admins {
            w.raw(a.as_bytes());
        }
        match self.group_epoch {
            Some(e) => w.u8(1).raw(&e.to_be_bytes()),
            None => w.u8(0),
        };
        w.bytes(&self.membership.encode())
            .bytes(&self.app.snapshot());
        Bytes::from(w.buf)
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), RestoreError> {
        let mut r = Reader::new(snapshot);
        r.version(VERSION)?;
        let n = r.u32()? as usize;
        if n > MAX_ADMINS {
            return Err(RestoreError::Malformed("too many administrators".into()));
        }
        let mut admins = BTreeSet::new();
        for _ in 0..n {
            admins.insert(NodeId::from_bytes(r.array()?));
        }
        let group_epoch = match r.u8()? {
            0 => None,
            1 => Some(u64::from_be_bytes(r.array()?)),
            other => {
                return Err(RestoreError::Malformed(format!("group epoch tag {other}")));
            }
        };
        let membership = Membership::decode(r.bytes("membership", usize::MAX)?)?;
        let app = r.bytes("application", usize::MAX)?;
        r.finish()?;
        self.app.restore(app)?;
        self.membership = membership;
        self.admins = admins;
        self.group_epoch = group_epoch;
        self.changes.clear();
        self.group.clear();
        Ok(())
    }
}
