//! The async driver on tokio: four replicas, each a `Pbft` driver plus an application served
//! through the `Ordering` trait, over an in-memory network of channels. The driver's own timers
//! must batch requests and, once the primary is cut off, change the view.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use securesmart_base::NodeId;
use securesmart_consensus::driver::{Network, Pbft};
use securesmart_consensus::message::{KeyRing, Limits, Request, Signer};
use securesmart_consensus::replica::{Config, Replica};
use securesmart_consensus::service::{Executor, Reply, serve};
use securesmart_consensus::sim::Chain;
use tokio::sync::mpsc;

type Wires = Arc<Mutex<BTreeMap<NodeId, mpsc::UnboundedSender<(NodeId, Bytes)>>>>;

/// A channel network; messages from or to a replica marked `down` are lost.
struct ChannelNet {
    me: NodeId,
    wires: Wires,
    inbox: mpsc::UnboundedReceiver<(NodeId, Bytes)>,
    down: Arc<Mutex<Option<NodeId>>>,
}

impl ChannelNet {
    fn deliver(&self, to: NodeId, message: Bytes) {
        let down = *self.down.lock().unwrap();
        if down == Some(self.me) || down == Some(to) {
            return;
        }
        if let Some(w) = self.wires.lock().unwrap().get(&to) {
            let _ = w.send((self.me, message));
        }
    }
}

impl Network for ChannelNet {
    fn send(&self, to: NodeId, message: Bytes) {
        self.deliver(to, message);
    }

    fn broadcast(&self, message: Bytes) {
        let peers: Vec<NodeId> = self.wires.lock().unwrap().keys().copied().collect();
        for to in peers.into_iter().filter(|p| *p != self.me) {
            self.deliver(to, message.clone());
        }
    }

    async fn recv(&mut self) -> Option<(NodeId, Bytes)> {
        self.inbox.recv().await
    }

    fn try_recv(&mut self) -> Option<(NodeId, Bytes)> {
        self.inbox.try_recv().ok()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drivers_order_requests_and_change_view_on_their_own_timers() {
    let signers: Vec<Signer> = (1..=4u8).map(|i| Signer::from_seed(&[i; 32])).collect();
    let ring = KeyRing::new(signers.iter().map(|s| (s.id(), s.public_key().unwrap())));
    let mut config = Config::new(signers.iter().map(Signer::id).collect());
    let first_primary = signers[0].id();
    config.view_change_timeout = Duration::from_millis(300);
    config.checkpoint_interval = 4;
    config.window = 8;
    let wires: Wires = Arc::default();
    let down = Arc::new(Mutex::new(None));
    let mut engines = Vec::new();
    let (reply_tx, mut replies) = mpsc::unbounded_channel::<(usize, Reply)>();
    for (i, signer) in signers.into_iter().enumerate() {
        let (tx, inbox) = mpsc::unbounded_channel();
        wires.lock().unwrap().insert(signer.id(), tx);
        let net = ChannelNet {
            me: signer.id(),
            wires: wires.clone(),
            inbox,
            down: down.clone(),
        };
        let replica = Replica::new(config.clone(), signer);
        let (mut pbft, _task) = Pbft::spawn(replica, ring.clone(), net, Limits::default());
        // The application runs on the engine through the generic `serve` loop; requests
        // reach the engine through its submitter.
        let submit = pbft.submitter();
        let reply_tx = reply_tx.clone();
        tokio::spawn(async move {
            let mut executor = Executor::new(Chain::default());
            let _ = serve(&mut pbft, &mut executor, |r| {
                let _ = reply_tx.send((i, r));
            })
            .await;
        });
        engines.push(submit);
    }
    let client = NodeId::from_bytes([3; 32]);
    let mut accepted = 0u64;
    let mut votes: BTreeMap<u64, BTreeMap<usize, Bytes>> = BTreeMap::new();
    for number in 1..=30u64 {
        if number == 11 {
            // Cut off the primary of view 0: the others must change view to go on.
            *down.lock().unwrap() = Some(first_primary);
        }
        let request = Request {
            client,
            number,
            payload: Bytes::from(number.to_be_bytes().to_vec()),
        };
        for e in &engines {
            e.submit(request.clone()).unwrap();
        }
        // f + 1 = 2 matching replies accept the result.
        let accepted_now = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let (from, r) = replies.recv().await.unwrap();
                if r.number != number {
                    continue;
                }
                let by = votes.entry(number).or_default();
                by.insert(from, r.result.clone());
                if by.values().filter(|v| **v == r.result).count() >= 2 {
                    return;
                }
            }
        })
        .await;
        assert!(accepted_now.is_ok(), "request {number} was not ordered");
        accepted += 1;
    }
    assert_eq!(accepted, 30);
    // The three connected replicas reply alike to the last request: the same state.
    tokio::time::timeout(Duration::from_secs(10), async {
        while votes.get(&30).map_or(0, BTreeMap::len) < 3 {
            let (from, r) = replies.recv().await.unwrap();
            if r.number == 30 {
                votes.entry(30).or_default().insert(from, r.result);
            }
        }
    })
    .await
    .unwrap();
    let last = &votes[&30];
    assert!(last.values().all(|v| *v == last[&1]), "{last:?}");
}
