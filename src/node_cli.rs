//! `securesmart node run` and `securesmart client`: a replica and a client from TOML files.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use securesmart::client::Client;
use securesmart::config::{ClientConfig, NodeConfig, load_certificate};
use securesmart::kv::KvStore;
use securesmart::membership::MembershipCommand;
use securesmart::node::Node;

use crate::ca_cli::CliResult;

#[derive(Debug, Subcommand)]
pub(crate) enum NodeCommand {
    /// Run a replica of the key-value store until SIGINT or SIGTERM. It runs one worker
    /// thread per core, or `TOKIO_WORKER_THREADS` of them: replicas sharing a host run
    /// faster with their share of its cores each.
    Run {
        /// Node configuration (TOML; see the `securesmart::config` docs).
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Debug, Args)]
pub(crate) struct ClientArgs {
    /// Client configuration (TOML).
    #[arg(long)]
    config: PathBuf,
    /// Mark the request confidential: the replicas keep it sealed with the group key in their
    /// log, journals and state transfer.
    #[arg(long)]
    confidential: bool,
    #[command(subcommand)]
    op: ClientOp,
}

#[derive(Debug, Subcommand)]
enum ClientOp {
    /// Set KEY to VALUE; prints the previous value, if any.
    Put { key: String, value: String },
    /// Print the value of KEY; exits with status 1 if there is none.
    Get { key: String },
    /// Remove KEY; prints the previous value, if any.
    Delete { key: String },
    /// Add a replica to the group (administrators only): orders its `AddNode`.
    AddReplica {
        /// The new replica's certificate (PEM).
        #[arg(long)]
        certificate: PathBuf,
        /// Its replica-plane address.
        #[arg(long)]
        replica: std::net::SocketAddr,
        /// Its client-plane address.
        #[arg(long)]
        client: std::net::SocketAddr,
    },
    /// Remove a replica from the group (administrators only): orders its `RemoveNode`.
    RemoveReplica {
        /// The replica's certificate (PEM).
        #[arg(long)]
        certificate: PathBuf,
    },
    /// Replace a replica's certificate with its renewal (same key; administrators only, or
    /// the replica itself): orders its `RenewNode`. (A running replica orders the renewal
    /// itself when it is written over its certificate file, and presents it at once; with
    /// this command, write it there too, or restart the replica with the new
    /// certificate afterwards.)
    RenewReplica {
        /// The renewed certificate (PEM).
        #[arg(long)]
        certificate: PathBuf,
    },
    /// Make a client an administrator (administrators only): orders its `AddAdmin`.
    AddAdmin {
        /// The client's certificate (PEM).
        #[arg(long)]
        certificate: PathBuf,
    },
    /// Withdraw an administrator (administrators only; never the last one).
    RemoveAdmin {
        /// The administrator's certificate (PEM).
        #[arg(long)]
        certificate: PathBuf,
    },
}

pub(crate) async fn node(command: NodeCommand) -> CliResult {
    let NodeCommand::Run { config } = command;
    let config = NodeConfig::load(&config).map_err(|e| e.to_string())?;
    let node = Node::start(&config, KvStore::default())
        .await
        .map_err(|e| e.to_string())?;
    eprintln!(
        "replica {} serving: replica plane {}, client plane {}",
        node.id(),
        node.replica_addr().map_err(|e| e.to_string())?,
        node.client_addr().map_err(|e| e.to_string())?
    );
    node.run_until(shutdown_signal()).await
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

pub(crate) async fn client(args: ClientArgs) -> CliResult {
    let config = ClientConfig::load(&args.config).map_err(|e| e.to_string())?;
    let mut client = Client::from_config(&config)
        .await
        .map_err(|e| e.to_string())?;
    client.set_confidential(args.confidential);
    let is_get = matches!(args.op, ClientOp::Get { .. });
    let result = match args.op {
        ClientOp::Put { key, value } => client.put(key, value).await,
        ClientOp::Get { key } => client.get(key).await,
        ClientOp::Delete { key } => client.delete(key).await,
        ClientOp::AddReplica {
            certificate,
            replica,
            client: client_addr,
        } => {
            let cert = load_certificate(&certificate).map_err(|e| e.to_string())?;
            let command = MembershipCommand::AddNode {
                certificate: cert.to_vec(),
                key_package: Vec::new(),
                replica_addr: replica,
                client_addr,
            };
            client.command(&command).await.map(|v| Some(v.into()))
        }
        ClientOp::RemoveReplica { certificate } => {
            let cert = load_certificate(&certificate).map_err(|e| e.to_string())?;
            let id = securesmart_transport::node_id(&cert).map_err(|e| e.to_string())?;
            let command = MembershipCommand::RemoveNode { id };
            client.command(&command).await.map(|v| Some(v.into()))
        }
        ClientOp::RenewReplica { certificate } => {
            let cert = load_certificate(&certificate).map_err(|e| e.to_string())?;
            let command = MembershipCommand::RenewNode {
                certificate: cert.to_vec(),
            };
            client.command(&command).await.map(|v| Some(v.into()))
        }
        ClientOp::AddAdmin { certificate } => {
            let cert = load_certificate(&certificate).map_err(|e| e.to_string())?;
            let command = MembershipCommand::AddAdmin {
                certificate: cert.to_vec(),
            };
            client.command(&command).await.map(|v| Some(v.into()))
        }
        ClientOp::RemoveAdmin { certificate } => {
            let cert = load_certificate(&certificate).map_err(|e| e.to_string())?;
            let id = securesmart_transport::node_id(&cert).map_err(|e| e.to_string())?;
            let command = MembershipCommand::RemoveAdmin { id };
            client.command(&command).await.map(|v| Some(v.into()))
        }
    };
    client.close().await;
    match result.map_err(|e| e.to_string())? {
        Some(value) => {
            println!("{}", String::from_utf8_lossy(&value));
            Ok(())
        }
        None if is_get => Err("no such key".into()),
        None => Ok(()),
    }
}
