//! Your own application on SecureSMART nodes: implement `StateMachine` (execute, snapshot,
//! restore), start each replica with `Node::start(&config, app)`, and talk to it with the
//! `Client` library. Everything else (mutual TLS, PBFT, the journal, the reply cache,
//! state transfer) comes with the node.
//!
//! ```sh
//! cargo run --release --example custom_state_machine
//! ```
//!
//! The application here is a counter per client: each request adds the number in its payload
//! to the sender's counter and replies with the new total. It runs four replicas in this one
//! process (a real deployment runs one per machine, see `securesmart node run`).

use bytes::Bytes;
use securesmart::base::wire::{Reader, Writer};
use securesmart::client::Client;
use securesmart::cluster::{LocalCluster, LocalClusterOptions};
use securesmart::config::{ClientConfig, NodeConfig};
use securesmart::consensus::message::Request;
use securesmart::consensus::service::{RestoreError, StateMachine};
use securesmart::node::Node;
use securesmart::transport::NodeId;
use std::collections::BTreeMap;

/// Counters by client. Execution must be deterministic: the same requests in the same order
/// give the same replies and state at every replica.
#[derive(Default)]
struct Counters(BTreeMap<NodeId, u64>);

impl StateMachine for Counters {
    fn execute(&mut self, request: &Request) -> Bytes {
        // Untrusted bytes: decode without panicking; a bad request gets a reply, not a crash.
        let add = <[u8; 8]>::try_from(request.payload.as_ref()).map_or(0, u64::from_be_bytes);
        let total = self.0.entry(request.client).or_default();
        *total = total.saturating_add(add);
        Bytes::copy_from_slice(&total.to_be_bytes())
    }

    fn snapshot(&self) -> Bytes {
        let mut w = Writer::default();
        w.u32(self.0.len() as u32);
        for (client, total) in &self.0 {
            w.raw(client.as_bytes()).raw(&total.to_be_bytes());
        }
        Bytes::from(w.buf)
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), RestoreError> {
        let mut r = Reader::new(snapshot);
        let mut map = BTreeMap::new();
        for _ in 0..r.u32()? {
            let client = NodeId::from_bytes(r.array()?);
            map.insert(client, u64::from_be_bytes(r.array()?));
        }
        r.finish()?;
        self.0 = map;
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Certificates and configuration files for four replicas and a client, enrolled at a
    // fresh trust center (as `securesmart demo` makes them).
    let dir = std::env::temp_dir().join(format!("custom-sm-{}", std::process::id()));
    let options = LocalClusterOptions {
        clients: 1,
        ..LocalClusterOptions::default()
    };
    let files = LocalCluster::create(&dir, &std::env::current_exe()?, &options).await?;

    let mut nodes = Vec::new();
    for replica in &files.replicas {
        let mut config = NodeConfig::load(&replica.config)?;
        config.node.metrics_listen = None; // one metrics endpoint per process at most
        nodes.push(Node::start(&config, Counters::default()).await?);
    }

    let client_file = files.clients.first().ok_or("no client")?;
    let mut client = Client::from_config(&ClientConfig::load(client_file)?).await?;
    for add in [5u64, 10, 27] {
        let total = client
            .invoke(Bytes::copy_from_slice(&add.to_be_bytes()))
            .await?;
        let total = u64::from_be_bytes(total.as_ref().try_into()?);
        println!("added {add:>2}: f+1 replicas agree the total is {total}");
    }
    client.close().await;
    for node in &nodes {
        node.stop().await;
    }
    drop(files);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
