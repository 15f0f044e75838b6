//! `securesmart ca ...` and `securesmart keygen`: the trust center on the command line.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};
use rustls::pki_types::CertificateSigningRequestDer;
use rustls::pki_types::pem::PemObject;
use securesmart_membership::{Reason, RevokeTarget, RoleName, TrustCenter, key_and_csr};
use securesmart_transport::pki::{pem_encode, write_secret_file};

/// A CLI failure: one line for the user.
pub(crate) type CliResult = Result<(), String>;

#[derive(Debug, Subcommand)]
pub(crate) enum CaCommand {
    /// Create a CA (key and certificate) and its state in a directory.
    Init {
        /// CA directory.
        #[arg(long)]
        dir: PathBuf,
        /// CA name (certificate common name).
        #[arg(long, default_value = "SecureSMART CA")]
        name: String,
    },
    /// Create a one-time enrollment token; prints it (shown only once).
    Token {
        /// CA directory.
        #[arg(long)]
        dir: PathBuf,
        /// Role the token grants: replica or client.
        #[arg(long)]
        role: RoleName,
        /// A DNS name or IP the node may claim (repeat for several).
        #[arg(long = "name", required = true)]
        names: Vec<String>,
        /// How long the token stays valid (e.g. 30m, 1h, 2d).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Write the token to this file (mode 0600) instead of printing it.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Renew a certificate for its own key (the CSR's signature is its authority; no token):
    /// same role, the names asked for among the old ones, a fresh validity.
    Renew {
        /// CA directory.
        #[arg(long)]
        dir: PathBuf,
        /// The certificate to renew (PEM or DER).
        #[arg(long)]
        cert: PathBuf,
        /// CSR made with the same key (`keygen --key`).
        #[arg(long)]
        csr: PathBuf,
        /// Output certificate (PEM).
        #[arg(long)]
        out: PathBuf,
    },
    /// Withdraw an unused enrollment token (given by the file `ca token --out` wrote).
    Untoken {
        /// CA directory.
        #[arg(long)]
        dir: PathBuf,
        /// File holding the token.
        #[arg(long)]
        token_file: PathBuf,
    },
    /// Sign a CSR under a token.
    Sign {
        /// CA directory.
        #[arg(long)]
        dir: PathBuf,
        /// CSR file (PEM or DER).
        #[arg(long)]
        csr: PathBuf,
        /// Enrollment token.
        #[arg(long)]
        token: String,
        /// Where to write the certificate (PEM).
        #[arg(long)]
        out: PathBuf,
    },
    /// Revoke a certificate by serial or by certificate file.
    Revoke {
        /// CA directory.
        #[arg(long)]
        dir: PathBuf,
        /// Serial number (hex).
        #[arg(long, conflicts_with = "cert", required_unless_present = "cert")]
        serial: Option<String>,
        /// Certificate file (PEM or DER).
        #[arg(long)]
        cert: Option<PathBuf>,
        /// unspecified, key-compromise, affiliation-changed, superseded, cessation-of-operation.
        #[arg(long, default_value = "unspecified")]
        reason: Reason,
        /// Add the revoked certificate to this PEM bundle (written atomically): nodes whose
        /// `revoked_certificates` names it order it, so that the replicated state refuses its
        /// requests whoever relays them (the CRL alone names only a serial).
        #[arg(long, requires = "cert")]
        bundle: Option<PathBuf>,
    },
    /// Issue a CRL: PEM at --out, DER beside it (.der).
    Crl {
        /// CA directory.
        #[arg(long)]
        dir: PathBuf,
        /// Output file (PEM).
        #[arg(long)]
        out: PathBuf,
        /// Validity (next update), e.g. 7d.
        #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
        validity: Duration,
    },
    /// Serve network enrollment over QUIC until interrupted (prints the bound address).
    Serve {
        /// CA directory.
        #[arg(long)]
        dir: PathBuf,
        /// Address to listen on, e.g. 127.0.0.1:7400 (port 0 picks one).
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// Extra DNS name or IP nodes dial (the listen IP and loopback are always included).
        #[arg(long = "name")]
        names: Vec<String>,
        /// Keep a fresh CRL here (PEM, DER beside it): written at start and again every half
        /// of --crl-validity, so that the nodes watching it order the next CRL long before the
        /// current one expires.
        #[arg(long)]
        crl: Option<PathBuf>,
        /// Validity of the CRLs written to --crl.
        #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
        crl_validity: Duration,
    },
    /// List issued certificates.
    List {
        /// CA directory.
        #[arg(long)]
        dir: PathBuf,
    },
}

/// `securesmart enroll`.
#[derive(Debug, Args)]
pub(crate) struct EnrollArgs {
    /// Address of the trust center's enrollment endpoint (`ca serve`).
    #[arg(long)]
    ca: std::net::SocketAddr,
    /// The CA certificate (PEM), obtained out of band.
    #[arg(long)]
    ca_cert: PathBuf,
    /// Enrollment token (visible in the process list and shell history: prefer --token-file).
    #[arg(
        long,
        conflicts_with = "token_file",
        required_unless_present = "token_file"
    )]
    token: Option<String>,
    /// File holding the enrollment token (as `ca token --out` writes it, mode 0600).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Output directory: node.key (mode 0600), node.pem, ca.pem.
    #[arg(long)]
    out: PathBuf,
    /// Names to request (default: the names the token allows).
    #[arg(long = "name")]
    names: Vec<String>,
}

/// `securesmart keygen`.
#[derive(Debug, Args)]
pub(crate) struct KeygenArgs {
    /// Output directory: writes node.key (mode 0600) and node.csr.
    #[arg(long)]
    out: PathBuf,
    /// A DNS name or IP for the CSR (repeat for several).
    #[arg(long = "name", required = true)]
    names: Vec<String>,
    /// Make the CSR for this existing key (PEM) instead of a new one, to renew its
    /// certificate (`ca renew`); only node.csr is written.
    #[arg(long)]
    key: Option<PathBuf>,
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// A CSR file, PEM or DER.
fn read_csr(path: &Path) -> Result<CertificateSigningRequestDer<'static>, String> {
    let bytes = read(path)?;
    Ok(CertificateSigningRequestDer::from_pem_slice(&bytes)
        .unwrap_or_else(|_| CertificateSigningRequestDer::from(bytes)))
}

/// An enrollment token from a file (as `ca token --out` writes it), trimmed.
fn read_token(path: &Path) -> Result<zeroize::Zeroizing<String>, String> {
    let text = zeroize::Zeroizing::new(
        String::from_utf8(read(path)?).map_err(|_| format!("{}: not UTF-8", path.display()))?,
    );
    Ok(zeroize::Zeroizing::new(text.trim().to_owned()))
}

/// Writes an issued certificate (PEM) to `out` and says what it is.
fn write_issued(issued: &securesmart_membership::Issued, out: &Path) -> CliResult {
    write(out, issued.pem().as_bytes())?;
    println!(
        "serial {} node {} role {:?} -> {}",
        issued.record.serial,
        issued.record.node_id,
        issued.record.role,
        out.display()
    );
    Ok(())
}

fn write(path: &Path, data: &[u8]) -> CliResult {
    std::fs::write(path, data).map_err(|e| format!("{}: {e}", path.display()))
}

/// Appends `cert` (PEM or DER) as PEM to the bundle at `path`, through a temporary file and a
/// rename (a node watching the bundle never reads half of it).
fn add_to_bundle(path: &Path, cert: &[u8]) -> CliResult {
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(cert)
        .unwrap_or_else(|_| rustls::pki_types::CertificateDer::from(cert.to_vec()));
    let mut all = std::fs::read(path).unwrap_or_default();
    all.extend_from_slice(pem_encode("CERTIFICATE", der.as_ref()).as_bytes());
    write_atomic(path, &all)
}

/// Writes `data` to `path` through a temporary file and a rename, so that a node watching the
/// file never reads half of it.
fn write_atomic(path: &Path, data: &[u8]) -> CliResult {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    write(&tmp, data)?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Issues a CRL valid for `validity` and writes it, atomically, as PEM at `out` and DER beside
/// it (`.der`).
fn write_crl(ca: &mut TrustCenter, out: &Path, validity: Duration) -> CliResult {
    let crl = ca.crl(validity).map_err(|e| e.to_string())?;
    write_atomic(out, pem_encode("X509 CRL", crl.as_ref()).as_bytes())?;
    write_atomic(&out.with_extension("der"), crl.as_ref())
}

pub(crate) fn keygen(args: &KeygenArgs) -> CliResult {
    std::fs::create_dir_all(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?;
    if let Some(key) = &args.key {
        let pem = zeroize::Zeroizing::new(
            String::from_utf8(read(key)?).map_err(|_| format!("{}: not UTF-8", key.display()))?,
        );
        let csr = securesmart_membership::trust_center::csr_for_key(&pem, &args.names)
            .map_err(|e| format!("{}: {e}", key.display()))?;
        let csr_path = args.out.join("node.csr");
        write(&csr_path, csr.as_bytes())?;
        println!("{}", csr_path.display());
        return Ok(());
    }
    let (key, csr) = key_and_csr(&args.names).map_err(|e| e.to_string())?;
    let key_path = args.out.join("node.key");
    let csr_path = args.out.join("node.csr");
    write_secret_file(&key_path, key.as_bytes())
        .map_err(|e| format!("{}: {e}", key_path.display()))?;
    write(&csr_path, csr.as_bytes())?;
    println!("{}\n{}", key_path.display(), csr_path.display());
    Ok(())
}

pub(crate) async fn enroll(args: &EnrollArgs) -> CliResult {
    let ca_pem = read(&args.ca_cert)?;
    let ca_cert = rustls::pki_types::CertificateDer::from_pem_slice(&ca_pem)
        .map_err(|e| format!("{}: {e}", args.ca_cert.display()))?;
    let token = match (&args.token, &args.token_file) {
        (Some(t), _) => zeroize::Zeroizing::new(t.clone()),
        (None, Some(path)) => read_token(path)?,
        (None, None) => return Err("give --token or --token-file".into()),
    };
    let enrolled = securesmart_membership::enroll(args.ca, &ca_cert, &token, &args.names)
        .await
        .map_err(|e| e.to_string())?;
    std::fs::create_dir_all(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?;
    let key_path = args.out.join("node.key");
    write_secret_file(&key_path, enrolled.key_pem.as_bytes())
        .map_err(|e| format!("{}: {e}", key_path.display()))?;
    write(
        &args.out.join("node.pem"),
        enrolled.certificate_pem.as_bytes(),
    )?;
    write(
        &args.out.join("ca.pem"),
        pem_encode("CERTIFICATE", enrolled.ca_certificate.as_ref()).as_bytes(),
    )?;
    println!(
        "enrolled node {} as {} -> {}",
        enrolled.identity.id().to_hex(),
        enrolled.identity.role(),
        args.out.display()
    );
    Ok(())
}

async fn serve(
    dir: &Path,
    listen: std::net::SocketAddr,
    names: &[String],
    crl: Option<&Path>,
    crl_validity: Duration,
) -> CliResult {
    if crl.is_some_and(|p| p.extension().is_some_and(|e| e == "der")) {
        return Err("--crl names the PEM file (the DER is written beside it as .der)".into());
    }
    // A second handle for the CRLs: every trust-center operation takes the directory's lock
    // and reads its state afresh, so the two never disagree.
    let mut crls = Some(TrustCenter::open(dir).map_err(|e| e.to_string())?);
    let ca = TrustCenter::open(dir).map_err(|e| e.to_string())?;
    let server = securesmart_membership::EnrollmentServer::start(
        ca,
        listen,
        names,
        securesmart_membership::enrollment::EnrollLimits::default(),
    )
    .await
    .map_err(|e| e.to_string())?;
    let addr = server.local_addr().map_err(|e| e.to_string())?;
    println!("listening on {addr}");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let refresh = (crl_validity / 2).max(Duration::from_secs(1));
    let mut tick = tokio::time::interval(refresh);
    let stop = tokio::signal::ctrl_c();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            r = &mut stop => {
                r.map_err(|e| e.to_string())?;
                break;
            }
            _ = tick.tick(), if crl.is_some() => {
                let (Some(out), Some(mut tc)) = (crl.map(Path::to_path_buf), crls.take()) else {
                    continue;
                };
                // Off the async workers: it takes the directory's lock and fsyncs.
                let (tc, written) = tokio::task::spawn_blocking(move || {
                    let r = write_crl(&mut tc, &out, crl_validity).map(|()| out);
                    (tc, r)
                })
                .await
                .map_err(|e| e.to_string())?;
                crls = Some(tc);
                match written {
                    Ok(out) => tracing::info!(crl = %out.display(), "fresh CRL written"),
                    Err(e) => {
                        metrics::counter!("securesmart_ca_crl_errors_total").increment(1);
                        tracing::error!(error = %e, "cannot write the CRL; retrying at the next refresh");
                    }
                }
            }
        }
    }
    server.shutdown().await;
    Ok(())
}

pub(crate) async fn run(cmd: CaCommand) -> CliResult {
    let open = |dir: &Path| TrustCenter::open(dir).map_err(|e| e.to_string());
    match cmd {
        CaCommand::Init { dir, name } => {
            TrustCenter::init(&dir, &name).map_err(|e| e.to_string())?;
            println!("{}", dir.join("ca.pem").display());
        }
        CaCommand::Token {
            dir,
            role,
            names,
            ttl,
            out,
        } => {
            let token = open(&dir)?
                .create_token(role, &names, ttl)
                .map_err(|e| e.to_string())?;
            match out {
                Some(path) => {
                    write_secret_file(&path, token.as_bytes())
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                    println!("{}", path.display());
                }
                None => println!("{}", token.as_str()),
            }
        }
        CaCommand::Renew {
            dir,
            cert,
            csr,
            out,
        } => {
            let issued = open(&dir)?
                .renew(&read(&cert)?, &read_csr(&csr)?)
                .map_err(|e| e.to_string())?;
            write_issued(&issued, &out)?;
        }
        CaCommand::Untoken { dir, token_file } => {
            open(&dir)?
                .revoke_token(&read_token(&token_file)?)
                .map_err(|e| e.to_string())?;
            println!("token withdrawn");
        }
        CaCommand::Sign {
            dir,
            csr,
            token,
            out,
        } => {
            let issued = open(&dir)?
                .sign_csr(&read_csr(&csr)?, &token)
                .map_err(|e| e.to_string())?;
            write_issued(&issued, &out)?;
        }
        CaCommand::Revoke {
            dir,
            serial,
            cert,
            reason,
            bundle,
        } => {
            let mut ca = open(&dir)?;
            let record = match (serial, &cert) {
                (Some(s), _) => ca.revoke(&RevokeTarget::Serial(s), reason),
                (None, Some(c)) => ca.revoke_certificate(&read(c)?, reason),
                (None, None) => return Err("give --serial or --cert".into()),
            }
            .map_err(|e| e.to_string())?;
            println!("revoked serial {} node {}", record.serial, record.node_id);
            if let (Some(bundle), Some(c)) = (bundle, cert) {
                add_to_bundle(&bundle, &read(&c)?)?;
                println!("added to {}", bundle.display());
            }
        }
        CaCommand::Crl { dir, out, validity } => {
            write_crl(&mut open(&dir)?, &out, validity)?;
            println!("{}\n{}", out.display(), out.with_extension("der").display());
        }
        CaCommand::Serve {
            dir,
            listen,
            names,
            crl,
            crl_validity,
        } => serve(&dir, listen, &names, crl.as_deref(), crl_validity).await?,
        CaCommand::List { dir } => {
            let ca = open(&dir)?;
            println!(
                "{:<34} {:<8} {:<10} {:<18} names",
                "serial", "role", "status", "node"
            );
            for c in ca.certificates() {
                let status = if c.revoked.is_some() {
                    "revoked"
                } else {
                    "valid"
                };
                let node = c.node_id.get(..16).unwrap_or(&c.node_id);
                println!(
                    "{:<34} {:<8} {:<10} {:<18} {}",
                    c.serial,
                    format!("{:?}", c.role).to_lowercase(),
                    status,
                    node,
                    c.names.join(",")
                );
            }
        }
    }
    Ok(())
}
