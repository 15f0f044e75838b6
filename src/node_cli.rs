//! `securesmart node run` and `securesmart client`: a replica and a client from TOML files.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use securesmart::client::Client;
use securesmart::config::{ClientConfig, NodeConfig};
use securesmart::kv::KvStore;
use securesmart::node::Node;

use crate::ca_cli::CliResult;

#[derive(Debug, Subcommand)]
pub(crate) enum NodeCommand {
    /// Run a replica of the key-value store until SIGINT or SIGTERM.
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
    let is_get = matches!(args.op, ClientOp::Get { .. });
    let result = match args.op {
        ClientOp::Put { key, value } => client.put(key, value).await,
        ClientOp::Get { key } => client.get(key).await,
        ClientOp::Delete { key } => client.delete(key).await,
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
