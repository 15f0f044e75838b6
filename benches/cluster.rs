//! The whole secure service: `cargo bench --bench cluster [-- ARGS]` runs `securesmart bench`
//! (see `securesmart::bench`) with the same arguments, e.g.
//! `cargo bench --bench cluster -- --quick` or
//! `cargo bench --bench cluster -- --replicas 4 --clients 16 --sizes 0/0 --seconds 5`.

use clap::Parser;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    bench: securesmart::bench::BenchArgs,
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    // `cargo bench` passes `--bench` to every bench target.
    let args = std::env::args().filter(|a| a != "--bench");
    let mut cli = Cli::parse_from(args);
    cli.bench
        .exe
        .get_or_insert_with(|| env!("CARGO_BIN_EXE_securesmart").into());
    if let Err(e) = securesmart::bench::run(cli.bench).await {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
