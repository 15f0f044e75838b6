//! TOML configuration of nodes (`securesmart node run --config`) and clients
//! (`securesmart client --config`), and the files they name.
//!
//! Relative paths are resolved against the directory of the configuration file. A file is
//! untrusted input: it is read with a size limit, parsed strictly (unknown keys are errors),
//! and every problem is a [`ConfigError`] naming the file.
//!
//! ```toml
//! # node.toml
//! [node]
//! certificate = "replica0.pem"    # this node's certificate (PEM)
//! key = "replica0.key"            # its Ed25519 key (PKCS#8 PEM, mode 0600)
//! ca = "ca.pem"                   # the trust center's CA certificate
//! crl = "crl.pem"                 # optional: a CRL (PEM or DER) to start with
//! data_dir = "data/replica0"      # journal (write-ahead log) and state
//! replica_listen = "127.0.0.1:7000"
//! client_listen = "127.0.0.1:7100"
//! metrics_listen = "127.0.0.1:9100"   # optional: Prometheus metrics over HTTP
//! limits = "production"           # or "local" (loopback clusters, tests)
//! admins = ["operator.pem"]       # clients that may add and remove replicas (same everywhere)
//! rekey_seconds = 600             # rotate the replicas' group key this often
//!
//! [consensus]                     # optional tuning, defaults shown
//! max_batch = 256
//! batch_delay_ms = 1
//! checkpoint_interval = 64
//! window = 128
//! view_change_timeout_ms = 500
//!
//! [[replicas]]                    # the genesis group, this node included
//! certificate = "replica0.pem"
//! replica = "127.0.0.1:7000"
//! client = "127.0.0.1:7100"
//! ```
//!
//! A client's file has a `[client]` section (`certificate`, `key`, `ca`, optional `crl`,
//! `timeout_ms`, `retry_ms`) and the same `[[replicas]]` list (the `replica` address is
//! optional there).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer};
use securesmart_transport::{Identity, NodeId, TrustConfig, ed25519_public_key};
use serde::Deserialize;

/// Largest configuration, certificate or CRL file read.
pub const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// A configuration problem.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file is larger than [`MAX_FILE_BYTES`].
    #[error("{0}: larger than {MAX_FILE_BYTES} bytes")]
    TooLarge(PathBuf),
    /// The TOML does not parse or does not fit the schema.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A certificate, key or CRL is unusable.
    #[error("{path}: {message}")]
    Pki {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The values do not make sense together.
    #[error("{0}")]
    Invalid(String),
}

/// A replica of the group as configuration names it.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaEntry {
    /// Its certificate (PEM).
    pub certificate: PathBuf,
    /// Its replica-plane address (replicas need it; clients do not).
    #[serde(default)]
    pub replica: Option<SocketAddr>,
    /// Its client-plane address.
    pub client: SocketAddr,
}

/// A replica of the group, loaded: id, Ed25519 key, certificate and addresses.
#[derive(Clone, Debug)]
pub struct Peer {
    /// Node id (from the certificate).
    pub id: NodeId,
    /// Ed25519 public key (from the certificate).
    pub key: [u8; 32],
    /// The certificate.
    pub certificate: CertificateDer<'static>,
    /// Replica-plane address, if configured.
    pub replica: Option<SocketAddr>,
    /// Client-plane address.
    pub client: SocketAddr,
}

/// Transport limit profiles.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LimitsProfile {
    /// Internet-facing defaults.
    #[default]
    Production,
    /// Loopback clusters and tests (many connections from 127.0.0.1).
    Local,
}

impl LimitsProfile {
    /// The transport limits of the profile.
    pub fn limits(self) -> securesmart_transport::Limits {
        match self {
            LimitsProfile::Production => securesmart_transport::Limits::production(),
            LimitsProfile::Local => securesmart_transport::Limits::local(),
        }
    }
}

/// The `[node]` section.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// Certificate (PEM).
    pub certificate: PathBuf,
    /// Key (PKCS#8 PEM).
    pub key: PathBuf,
    /// CA certificate (PEM).
    pub ca: PathBuf,
    /// Initial CRL (PEM or DER).
    #[serde(default)]
    pub crl: Option<PathBuf>,
    /// Certificates the CRL revokes (PEM, any number): ordered so that the replicated state
    /// knows whom they name (clients' certificates, whose ids it does not otherwise know), and
    /// refuses their requests whichever replica relays them.
    #[serde(default)]
    pub revoked_certificates: Option<PathBuf>,
    /// Recovery of administrators: a client certificate (PEM) this replica votes to make an
    /// administrator, ordered at every start once it is connected. A quorum of the current
    /// replicas voting for the same certificate adds it, while no administrator works (see
    /// `securesmart::state`). Remove it once recovered.
    #[serde(default)]
    pub recover_admin: Option<PathBuf>,
    /// Data directory (journal).
    pub data_dir: PathBuf,
    /// Replica-plane listen address.
    pub replica_listen: SocketAddr,
    /// Client-plane listen address.
    pub client_listen: SocketAddr,
    /// Prometheus metrics listen address.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// Transport limits.
    #[serde(default)]
    pub limits: LimitsProfile,
    /// Certificates (PEM) of the clients that may add and remove replicas. Part of the genesis
    /// state: every replica of a group must name the same ones.
    #[serde(default)]
    pub admins: Vec<PathBuf>,
    /// Rotate the replicas' group key (an MLS Update commit) when its epoch is this old.
    #[serde(default = "default_rekey_seconds")]
    pub rekey_seconds: u64,
    /// The number of the roster that `[[replicas]]` lists (0: the genesis replicas). A joiner
    /// (a node not among them) follows the roster's certified changes from there before it
    /// trusts anyone for the state (see `securesmart::roster`).
    #[serde(default)]
    pub roster: u64,
}

fn default_rekey_seconds() -> u64 {
    600
}

/// The `[consensus]` section (all optional).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsensusSection {
    /// Requests per batch at most.
    pub max_batch: usize,
    /// How long the primary holds a non-full batch, in milliseconds.
    pub batch_delay_ms: u64,
    /// A checkpoint every this many sequence numbers.
    pub checkpoint_interval: u64,
    /// Sequence numbers accepted above the low watermark.
    pub window: u64,
    /// View-change timeout before back-off, in milliseconds.
    pub view_change_timeout_ms: u64,
    /// INSECURE, for `securesmart bench --modes baseline` only: this replica signs no
    /// consensus message and checks no consensus or request signature (mutual TLS, the
    /// journal and the rest stay), so that the bench can price signing against the same
    /// engine. The node starts in this mode only with `SECURESMART_INSECURE_BASELINE=1` in its
    /// environment too, warns, sets the gauge `securesmart_node_insecure_baseline`, and uses
    /// a replica-plane ALPN of its own, so that it and signing replicas refuse each other
    /// (such a replica counts as faulty wherever it ends up). Never in a deployment.
    pub insecure_baseline: bool,
}

impl Default for ConsensusSection {
    fn default() -> Self {
        Self {
            max_batch: 256,
            batch_delay_ms: 1,
            checkpoint_interval: 64,
            window: 128,
            view_change_timeout_ms: 500,
            insecure_baseline: false,
        }
    }
}

/// A node's configuration file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node.
    pub node: NodeSection,
    /// Consensus tuning.
    #[serde(default)]
    pub consensus: ConsensusSection,
    /// The genesis replicas, this node included.
    pub replicas: Vec<ReplicaEntry>,
}

/// The `[client]` section.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientSection {
    /// Certificate (PEM).
    pub certificate: PathBuf,
    /// Key (PKCS#8 PEM).
    pub key: PathBuf,
    /// CA certificate (PEM).
    pub ca: PathBuf,
    /// CRL (PEM or DER) the client checks replicas against.
    #[serde(default)]
    pub crl: Option<PathBuf>,
    /// Give up on a request after this long, in milliseconds.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Send a request again after this long without an accepted result, in milliseconds.
    #[serde(default = "default_retry_ms")]
    pub retry_ms: u64,
    /// Transport limits.
    #[serde(default)]
    pub limits: LimitsProfile,
    /// The number of the roster that `[[replicas]]` lists (0: the genesis replicas); the
    /// client follows its certified changes from there (see `securesmart::roster`).
    #[serde(default)]
    pub roster: u64,
}

fn default_timeout_ms() -> u64 {
    10_000
}

fn default_retry_ms() -> u64 {
    1_000
}

/// A client's configuration file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// This client.
    pub client: ClientSection,
    /// The replicas.
    pub replicas: Vec<ReplicaEntry>,
}

/// Reads a file of at most [`MAX_FILE_BYTES`].
///
/// # Errors
/// [`ConfigError::Io`] or [`ConfigError::TooLarge`].
pub fn read_limited(path: &Path) -> Result<Vec<u8>, ConfigError> {
    use std::io::Read;
    let io = |source| ConfigError::Io {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut buf = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(io)?;
    if buf.len() as u64 > MAX_FILE_BYTES {
        return Err(ConfigError::TooLarge(path.to_owned()));
    }
    Ok(buf)
}

fn parse_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let bytes = read_limited(path)?;
    let text = String::from_utf8(bytes).map_err(|_| ConfigError::Parse {
        path: path.to_owned(),
        message: "not UTF-8".into(),
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

fn resolve(base: &Path, p: &mut PathBuf) {
    if p.is_relative() {
        *p = base.join(&*p);
    }
}

fn base_of(path: &Path) -> PathBuf {
    path.parent().map(Path::to_owned).unwrap_or_default()
}

impl NodeConfig {
    /// Loads and checks a node configuration; relative paths become relative to its directory.
    ///
    /// # Errors
    /// [`ConfigError`].
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut c: Self = parse_toml(path)?;
        let base = base_of(path);
        let n = &mut c.node;
        for p in [&mut n.certificate, &mut n.key, &mut n.ca, &mut n.data_dir] {
            resolve(&base, p);
        }
        for p in [
            n.crl.as_mut(),
            n.revoked_certificates.as_mut(),
            n.recover_admin.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            resolve(&base, p);
        }
        for p in &mut n.admins {
            resolve(&base, p);
        }
        for r in &mut c.replicas {
            resolve(&base, &mut r.certificate);
            if r.replica.is_none() {
                return Err(ConfigError::Invalid(format!(
                    "{}: replica {} has no replica address",
                    path.display(),
                    r.certificate.display()
                )));
            }
        }
        let k = &c.consensus;
        if k.max_batch == 0 || k.checkpoint_interval == 0 || k.window < k.checkpoint_interval {
            return Err(ConfigError::Invalid(format!(
                "{}: [consensus] needs max_batch > 0, checkpoint_interval > 0 and window >= \
                 checkpoint_interval",
                path.display()
            )));
        }
        Ok(c)
    }
}

impl ClientConfig {
    /// Loads a client configuration; relative paths become relative to its directory.
    ///
    /// # Errors
    /// [`ConfigError`].
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut c: Self = parse_toml(path)?;
        let base = base_of(path);
        let s = &mut c.client;
        for p in [&mut s.certificate, &mut s.key, &mut s.ca] {
            resolve(&base, p);
        }
        if let Some(p) = s.crl.as_mut() {
            resolve(&base, p);
        }
        for r in &mut c.replicas {
            resolve(&base, &mut r.certificate);
        }
        Ok(c)
    }

    /// The roster its `[[replicas]]` and `roster` number name.
    ///
    /// # Errors
    /// As [`load_peers`].
    pub fn roster(&self) -> Result<crate::roster::Roster, ConfigError> {
        Ok(peers_roster(
            self.client.roster,
            &load_peers(&self.replicas)?,
        ))
    }

    /// The request timeout.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.client.timeout_ms)
    }

    /// The retransmission interval.
    pub fn retry(&self) -> Duration {
        Duration::from_millis(self.client.retry_ms.max(1))
    }
}

/// Loads an identity (certificate and key PEM files).
///
/// # Errors
/// [`ConfigError::Pki`].
pub fn load_identity(certificate: &Path, key: &Path) -> Result<Identity, ConfigError> {
    // Each file is read once, within the size limit; the key's bytes are erased after use.
    let text = |path: &Path| match String::from_utf8(read_limited(path)?) {
        Ok(s) => Ok(zeroize::Zeroizing::new(s)),
        Err(e) => {
            zeroize::Zeroize::zeroize(&mut e.into_bytes());
            Err(ConfigError::Pki {
                path: path.to_owned(),
                message: "not UTF-8 PEM".into(),
            })
        }
    };
    Identity::from_pem(&text(certificate)?, &text(key)?).map_err(|e| ConfigError::Pki {
        path: certificate.to_owned(),
        message: e.to_string(),
    })
}

/// Loads the first certificate of a PEM file.
///
/// # Errors
/// [`ConfigError`].
pub fn load_certificate(path: &Path) -> Result<CertificateDer<'static>, ConfigError> {
    let bytes = read_limited(path)?;
    CertificateDer::from_pem_slice(&bytes).map_err(|e| ConfigError::Pki {
        path: path.to_owned(),
        message: format!("no PEM certificate: {e}"),
    })
}

/// Loads a CRL, PEM or DER.
///
/// # Errors
/// [`ConfigError`].
pub fn load_crl(path: &Path) -> Result<CertificateRevocationListDer<'static>, ConfigError> {
    let bytes = read_limited(path)?;
    Ok(CertificateRevocationListDer::from_pem_slice(&bytes)
        .unwrap_or_else(|_| CertificateRevocationListDer::from(bytes)))
}

/// The trust a node or client starts with: the CA and, if configured, the CRL.
///
/// # Errors
/// [`ConfigError`].
pub fn load_trust(ca: &Path, crl: Option<&Path>) -> Result<TrustConfig, ConfigError> {
    let mut trust = TrustConfig::new(load_certificate(ca)?);
    if let Some(crl) = crl {
        trust.crls.push(load_crl(crl)?);
    }
    Ok(trust)
}

/// Roster `number` of `peers` (a peer without a replica-plane address gets its client one).
pub fn peers_roster(number: u64, peers: &BTreeMap<NodeId, Peer>) -> crate::roster::Roster {
    crate::roster::Roster::new(
        number,
        peers
            .values()
            .map(|p| {
                (
                    p.id,
                    crate::roster::RosterEntry {
                        certificate: p.certificate.clone(),
                        replica_addr: p.replica.unwrap_or(p.client),
                        client_addr: p.client,
                    },
                )
            })
            .collect(),
    )
}

/// Loads the replicas' certificates: ids, keys and addresses, by node id.
///
/// # Errors
/// [`ConfigError`] for an unreadable certificate, one without an Ed25519 key, or a replica
/// listed twice.
pub fn load_peers(entries: &[ReplicaEntry]) -> Result<BTreeMap<NodeId, Peer>, ConfigError> {
    let mut peers = BTreeMap::new();
    for e in entries {
        let certificate = load_certificate(&e.certificate)?;
        let pki = |message: String| ConfigError::Pki {
            path: e.certificate.clone(),
            message,
        };
        let id = securesmart_transport::node_id(&certificate).map_err(|e| pki(e.to_string()))?;
        let key =
            ed25519_public_key(&certificate).ok_or_else(|| pki("not an Ed25519 key".into()))?;
        let peer = Peer {
            id,
            key,
            certificate,
            replica: e.replica,
            client: e.client,
        };
        if peers.insert(id, peer).is_some() {
            return Err(ConfigError::Invalid(format!(
                "replica {} is listed twice",
                e.certificate.display()
            )));
        }
    }
    if peers.is_empty() {
        return Err(ConfigError::Invalid("no [[replicas]] configured".into()));
    }
    Ok(peers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn configs_parse_strictly_and_resolve_paths() {
        let dir = std::env::temp_dir().join(format!("cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = write(
            &dir,
            "node.toml",
            r#"
[node]
certificate = "r0.pem"
key = "r0.key"
ca = "/etc/ca.pem"
data_dir = "data"
replica_listen = "127.0.0.1:7000"
client_listen = "127.0.0.1:7100"
limits = "local"

[consensus]
window = 256

[[replicas]]
certificate = "r0.pem"
replica = "127.0.0.1:7000"
client = "127.0.0.1:7100"
"#,
        );
        let c = NodeConfig::load(&good).unwrap();
        assert_eq!(c.node.certificate, dir.join("r0.pem"));
        assert_eq!(c.node.ca, PathBuf::from("/etc/ca.pem"));
        assert_eq!(c.node.limits, LimitsProfile::Local);
        assert_eq!(c.consensus.window, 256);
        assert_eq!(c.consensus.checkpoint_interval, 64);
        let typo = write(
            &dir,
            "typo.toml",
            &std::fs::read_to_string(&good)
                .unwrap()
                .replace("data_dir", "datadir"),
        );
        assert!(matches!(
            NodeConfig::load(&typo),
            Err(ConfigError::Parse { .. })
        ));
        let no_addr = write(
            &dir,
            "noaddr.toml",
            &std::fs::read_to_string(&good)
                .unwrap()
                .replace("replica = \"127.0.0.1:7000\"\n", ""),
        );
        assert!(matches!(
            NodeConfig::load(&no_addr),
            Err(ConfigError::Invalid(_))
        ));
        assert!(matches!(
            NodeConfig::load(&dir.join("missing.toml")),
            Err(ConfigError::Io { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
