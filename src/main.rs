//! The `securesmart` command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod ca_cli;
mod node_cli;

/// SecureSMART-rs: secure BFT replication.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a local secure cluster under load on loopback, with embedded defaults, and print a
    /// summary. Needs no set-up files.
    Demo(securesmart::demo::DemoArgs),
    /// Measure throughput and latency: n replica processes on loopback, closed-loop clients,
    /// modes side by side; a table, and a CSV in the results directory. Needs no set-up files.
    Bench(securesmart::bench::BenchArgs),
    /// The trust center: CA directory, enrollment tokens, signing, revocation, CRLs.
    Ca {
        #[command(subcommand)]
        command: ca_cli::CaCommand,
    },
    /// Make an Ed25519 key (mode 0600) and a CSR for a node.
    Keygen(ca_cli::KeygenArgs),
    /// Get a certificate from a trust center over the network (`ca serve`) with a token.
    Enroll(ca_cli::EnrollArgs),
    /// A replica of the key-value store.
    Node {
        #[command(subcommand)]
        command: node_cli::NodeCommand,
    },
    /// Put, get or delete a key in the replicated key-value store.
    Client(node_cli::ClientArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Demo(args) => runtime
            .block_on(securesmart::demo::run(args))
            .map_err(|e| e.to_string()),
        Command::Bench(args) => runtime
            .block_on(securesmart::bench::run(args))
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Command::Ca { command } => runtime.block_on(ca_cli::run(command)),
        Command::Enroll(args) => runtime.block_on(ca_cli::enroll(&args)),
        Command::Keygen(args) => ca_cli::keygen(&args),
        Command::Node { command } => runtime.block_on(node_cli::node(command)),
        Command::Client(args) => runtime.block_on(node_cli::client(args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
