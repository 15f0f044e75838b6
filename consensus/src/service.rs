//! What an application implements ([`StateMachine`]), what any ordering engine offers
//! ([`Ordering`]), and the glue between them ([`Executor`], [`serve`]) with the reply cache.
//!
//! An engine hands out [`Event`]s: ordered batches, requests for a snapshot at a checkpoint,
//! and snapshots to restore after a state transfer. The [`Executor`] runs batches on the
//! application, keeps the last reply per client (so a retransmitted request gets the same
//! answer without executing twice), and makes the reply cache part of every snapshot. PBFT
//! ([`crate::driver::Pbft`]) is one `Ordering`; another engine that implements the trait runs
//! the same application unchanged.

use std::collections::BTreeMap;
use std::future::Future;

use bytes::Bytes;
use securesmart_base::NodeId;
use securesmart_base::wire::{Reader, WireError, Writer};

use crate::message::{Request, Seq};

/// A replicated application: deterministic execution, snapshot and restore.
pub trait StateMachine: Send {
    /// Executes one request (already ordered and deduplicated) and returns the reply. Must be
    /// deterministic: the same requests in the same order give the same replies and state.
    fn execute(&mut self, request: &Request) -> Bytes;

    /// The whole state, as bytes [`StateMachine::restore`] accepts.
    fn snapshot(&self) -> Bytes;

    /// Replaces the state with a snapshot.
    ///
    /// # Errors
    /// [`RestoreError`] if the bytes are not a snapshot of this application (the state is
    /// then unchanged).
    fn restore(&mut self, snapshot: &[u8]) -> Result<(), RestoreError>;

    /// Whether the state is the one every correct replica computed. An application that could
    /// not execute an ordered request the way the others did (it lacked a key to open it, say)
    /// returns `false` until the next [`StateMachine::restore`]: the engine then takes no
    /// snapshot from it, fetches the agreed state at the next stable checkpoint, and executes
    /// the batches above it again. Its replies meanwhile are not sent.
    fn state_known(&self) -> bool {
        true
    }

    /// Wraps a checkpoint's state before it leaves the process: it is written to the journal
    /// and sent to other replicas by state transfer. `state` is the executor's snapshot: the
    /// reply cache (results of executed requests) and [`StateMachine::snapshot`]. The default
    /// keeps it as it is. An application whose state must not be on disk or on the wire in the
    /// clear seals it here, and must do so *deterministically*: every correct replica has to
    /// produce the same bytes for the same `seq` and `state`, because checkpoints are compared
    /// by digest. `None`: this replica cannot (it lacks the key); its state then counts as
    /// lost at `seq` (see [`StateMachine::state_known`]).
    fn seal_checkpoint(&self, seq: Seq, state: Bytes) -> Option<Bytes> {
        let _ = seq;
        Some(state)
    }

    /// Opens what [`StateMachine::seal_checkpoint`] made for checkpoint `seq`, to restore it.
    /// `Ok(None)`: this replica cannot open it (it lacks the key). It may restore whatever the
    /// application kept in the clear, and must report [`StateMachine::state_known`] false
    /// until a later restore: the engine fetches the agreed state again at a later checkpoint.
    ///
    /// # Errors
    /// [`RestoreError`] if the bytes are malformed.
    fn open_checkpoint(&mut self, seq: Seq, sealed: &Bytes) -> Result<Option<Bytes>, RestoreError> {
        let _ = seq;
        Ok(Some(sealed.clone()))
    }
}

/// A snapshot could not be restored.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RestoreError {
    /// The bytes are malformed.
    #[error("malformed snapshot: {0}")]
    Malformed(String),
}

impl From<WireError> for RestoreError {
    fn from(e: WireError) -> Self {
        Self::Malformed(e.to_string())
    }
}

/// A reply to a client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The client.
    pub client: NodeId,
    /// Its request number.
    pub number: u64,
    /// The application's reply.
    pub result: Bytes,
}

/// Something an ordering engine tells the application.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// Execute these requests, in order, as sequence number `seq`.
    Ordered {
        /// Sequence number.
        seq: Seq,
        /// The requests (duplicates already removed).
        batch: Vec<Request>,
    },
    /// Hand the snapshot after `seq` to [`Ordering::snapshot_taken`].
    SnapshotDue {
        /// Sequence number.
        seq: Seq,
    },
    /// Replace the state with this snapshot, taken after `seq` (state transfer).
    Restore {
        /// Sequence number.
        seq: Seq,
        /// The snapshot (as the application gave it to `snapshot_taken` somewhere).
        snapshot: Bytes,
    },
}

/// A replica joining the group: its node id and Ed25519 public key (from its certificate).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    /// Node id.
    pub id: NodeId,
    /// Ed25519 public key.
    pub key: [u8; 32],
}

/// What any ordering engine offers.
pub trait Ordering: Send {
    /// The engine's error.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Submits a client request for ordering.
    ///
    /// # Errors
    /// When the engine is shut down or its request queue is full.
    fn submit(&self, request: Request) -> Result<(), Self::Error>;

    /// The next event; `None` once the engine has stopped.
    fn next_event(&mut self) -> impl Future<Output = Option<Event>> + Send;

    /// The application's snapshot for an [`Event::SnapshotDue`].
    ///
    /// # Errors
    /// When the engine is shut down.
    fn snapshot_taken(&self, seq: Seq, snapshot: Bytes) -> Result<(), Self::Error>;

    /// Instead of a snapshot for an [`Event::SnapshotDue`]: the application's state is not the
    /// agreed one ([`StateMachine::state_known`]); the engine replaces it by state transfer.
    ///
    /// # Errors
    /// When the engine is shut down.
    fn state_lost(&self, seq: Seq) -> Result<(), Self::Error>;

    /// Replaces the group: called, identically at every replica, when the command that
    /// changes it executes at `executed_at`. Returns the sequence number after which the new
    /// group orders (an engine documents its rule).
    ///
    /// # Errors
    /// When the engine refuses the change or is shut down.
    fn reconfigure(
        &self,
        members: Vec<Member>,
        executed_at: Seq,
    ) -> impl Future<Output = Result<Seq, Self::Error>> + Send;
}

/// What [`Executor::apply`] produced: the replies of an ordered batch (none while the state is
/// lost), and for a due snapshot the sequence number and the snapshot to hand back to the engine
/// (`None`: the state is lost, see [`StateMachine::state_known`]).
pub type Applied = (Vec<Reply>, Option<(Seq, Option<Bytes>)>);

/// Runs batches on a [`StateMachine`] with a reply cache (at-most-once execution, the same
/// reply for a retransmission).
#[derive(Debug)]
pub struct Executor<S> {
    app: S,
    /// The last reply per client.
    replies: BTreeMap<NodeId, (u64, Bytes)>,
}

const EXECUTOR_VERSION: u8 = 1;

impl<S: StateMachine> Executor<S> {
    /// An executor over `app`.
    pub fn new(app: S) -> Self {
        Self {
            app,
            replies: BTreeMap::new(),
        }
    }

    /// The application.
    pub fn app(&self) -> &S {
        &self.app
    }

    /// The application, mutably (for state outside execution, such as effects an executed
    /// batch left for its host to carry out). Changing replicated state here breaks agreement.
    pub fn app_mut(&mut self) -> &mut S {
        &mut self.app
    }

    /// The cached reply to `(client, number)`, if that was the client's last executed request.
    pub fn cached(&self, client: &NodeId, number: u64) -> Option<Reply> {
        let (n, result) = self.replies.get(client)?;
        (*n == number).then(|| Reply {
            client: *client,
            number,
            result: result.clone(),
        })
    }

    /// Every client's last reply (number and result), as the reply cache holds them.
    pub fn cached_replies(&self) -> impl Iterator<Item = (&NodeId, &(u64, Bytes))> {
        self.replies.iter()
    }

    /// Executes an ordered batch; requests at or below a client's cached number are skipped
    /// (the engine already removes them; this is the application's own guard).
    pub fn execute(&mut self, batch: &[Request]) -> Vec<Reply> {
        let mut out = Vec::with_capacity(batch.len());
        for r in batch {
            if self
                .replies
                .get(&r.client)
                .is_some_and(|(n, _)| r.number <= *n)
            {
                continue;
            }
            let result = self.app.execute(r);
            self.replies.insert(r.client, (r.number, result.clone()));
            out.push(Reply {
                client: r.client,
                number: r.number,
                result,
            });
        }
        out
    }

    /// The application's snapshot with the reply cache.
    pub fn snapshot(&self) -> Bytes {
        let mut w = Writer::default();
        w.u8(EXECUTOR_VERSION)
            .u32(u32::try_from(self.replies.len()).unwrap_or(u32::MAX));
        for (client, (n, result)) in &self.replies {
            w.raw(client.as_bytes()).raw(&n.to_be_bytes()).bytes(result);
        }
        w.bytes(&self.app.snapshot());
        Bytes::from(w.buf)
    }

    /// The snapshot for the checkpoint at `seq`, as the application seals it
    /// ([`StateMachine::seal_checkpoint`]), or `None` when the application's state is lost or
    /// it cannot seal.
    pub fn due_snapshot(&self, seq: Seq) -> Option<Bytes> {
        if !self.app.state_known() {
            return None;
        }
        self.app.seal_checkpoint(seq, self.snapshot())
    }

    /// Restores the checkpoint at `seq` made by [`Executor::due_snapshot`]. If the application
    /// cannot open it, the reply cache stays as it is and the application reports its state
    /// lost.
    ///
    /// # Errors
    /// [`RestoreError`] if it is malformed.
    pub fn restore_checkpoint(&mut self, seq: Seq, sealed: &Bytes) -> Result<(), RestoreError> {
        match self.app.open_checkpoint(seq, sealed)? {
            Some(snapshot) => self.restore(&snapshot),
            None => Ok(()),
        }
    }

    /// Restores a snapshot made by [`Executor::snapshot`].
    ///
    /// # Errors
    /// [`RestoreError`] if it is malformed (nothing is changed then).
    pub fn restore(&mut self, snapshot: &[u8]) -> Result<(), RestoreError> {
        let mut r = Reader::new(snapshot);
        r.version(EXECUTOR_VERSION)?;
        let n = r.u32()? as usize;
        let mut replies = BTreeMap::new();
        for _ in 0..n {
            let client = NodeId::from_bytes(r.array()?);
            let number = u64::from_be_bytes(r.array()?);
            let result = Bytes::copy_from_slice(r.bytes("reply", usize::MAX)?);
            replies.insert(client, (number, result));
        }
        let app = r.bytes("application snapshot", usize::MAX)?;
        r.finish()?;
        self.app.restore(app)?;
        self.replies = replies;
        Ok(())
    }

    /// Applies one event; returns the replies of an ordered batch and, for a due snapshot,
    /// the snapshot to hand back to the engine.
    ///
    /// # Errors
    /// [`RestoreError`] for a snapshot that does not restore.
    pub fn apply(&mut self, event: Event) -> Result<Applied, RestoreError> {
        Ok(match event {
            Event::Ordered { batch, .. } => {
                let replies = self.execute(&batch);
                if self.app.state_known() {
                    (replies, None)
                } else {
                    (Vec::new(), None)
                }
            }
            Event::SnapshotDue { seq } => (Vec::new(), Some((seq, self.due_snapshot(seq)))),
            Event::Restore { seq, snapshot } => {
                self.restore_checkpoint(seq, &snapshot)?;
                (Vec::new(), None)
            }
        })
    }
}

/// Runs an application on any [`Ordering`] until the engine stops: executes batches, hands
/// snapshots back, restores transferred state, and gives each reply to `on_reply`.
///
/// # Errors
/// The engine's error when it refuses a snapshot, or a [`RestoreError`] when a transferred
/// snapshot does not restore.
pub async fn serve<O: Ordering, S: StateMachine>(
    ordering: &mut O,
    executor: &mut Executor<S>,
    mut on_reply: impl FnMut(Reply) + Send,
) -> Result<(), ServeError<O::Error>> {
    while let Some(event) = ordering.next_event().await {
        let (replies, snapshot) = executor.apply(event)?;
        replies.into_iter().for_each(&mut on_reply);
        match snapshot {
            Some((seq, Some(snapshot))) => ordering.snapshot_taken(seq, snapshot),
            Some((seq, None)) => ordering.state_lost(seq),
            None => Ok(()),
        }
        .map_err(ServeError::Ordering)?;
    }
    Ok(())
}

/// Why [`serve`] stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError<E: std::error::Error + 'static> {
    /// The engine failed.
    #[error("ordering engine: {0}")]
    Ordering(#[source] E),
    /// A transferred snapshot did not restore.
    #[error(transparent)]
    Restore(#[from] RestoreError),
}
