//! A local cluster on loopback, made the way an operator makes one: a trust center, nodes
//! enrolled over the network with one-time tokens, a TOML file per node and per client, and
//! one `securesmart node run` process per replica. The demo and the multi-process tests use it.
//!
//! [`LocalCluster::create`] writes everything under one directory:
//! `ca/` (the trust center's state), `ca.pem`, `replica{i}.pem`/`.key`/`.toml`,
//! `client{j}.pem`/`.key`/`.toml`, `data/replica{i}/` (journals) and `logs/replica{i}.log`.
//! Keys are written with mode 0600 in PKCS#8 PEM (`openssl pkey -in replica0.key` reads them).
//! Ports are picked by binding UDP port 0 on 127.0.0.1 and releasing it just before the nodes
//! start (another process could take one in between; on a busy machine re-create the cluster).
//! Each node process runs its share of the host's cores as tokio worker threads
//! ([`replica_threads`], as `TOKIO_WORKER_THREADS`; an `env` of
//! [`LocalCluster::start_with`] may set another number).

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use securesmart_membership::enrollment::EnrollLimits;
use securesmart_membership::{EnrollmentServer, RoleName, TrustCenter, enroll};
use securesmart_transport::NodeId;
use securesmart_transport::pki::write_secret_file;

use crate::config::ConsensusSection;

/// A cluster setup failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The trust center or enrollment failed.
    #[error("trust center: {0}")]
    TrustCenter(String),
    /// Asking the running cluster failed.
    #[error("asking the cluster: {0}")]
    Client(#[from] crate::client::ClientError),
    /// The cluster's roster names a replica this cluster did not create.
    #[error("the roster names replica {0}, which this cluster did not create")]
    ForeignReplica(NodeId),
    /// The cluster has no client to ask with.
    #[error("the cluster has no client")]
    NoClient,
    /// The cluster has no replica with this index.
    #[error("the cluster has no replica {0}")]
    NoReplica(usize),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ClusterError {
    let what = what.into();
    move |source| ClusterError::Io { what, source }
}

fn tc<E: std::fmt::Display>(e: E) -> ClusterError {
    ClusterError::TrustCenter(e.to_string())
}

/// One replica of a local cluster.
#[derive(Debug)]
pub struct LocalReplica {
    /// Its node id.
    pub id: NodeId,
    /// Its configuration file.
    pub config: PathBuf,
    /// Replica-plane address.
    pub replica_addr: SocketAddr,
    /// Client-plane address.
    pub client_addr: SocketAddr,
    /// Prometheus metrics address (HTTP).
    pub metrics_addr: SocketAddr,
    /// Its certificate file.
    pub certificate: PathBuf,
    process: Option<Child>,
}

/// Worker threads of each of `replicas` node processes on this host: its cores shared out,
/// at least one each. (Measured with `securesmart bench` on 2 cores and 4 replicas: one
/// thread each against two gave 14-29% more ops/s and about 19% less replica CPU per
/// operation; see the README's benchmark section.)
pub fn replica_threads(replicas: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    (cores / replicas.max(1)).max(1)
}

/// A local cluster's files and processes (see the module doc). Dropping it kills the
/// processes.
#[derive(Debug)]
pub struct LocalCluster {
    /// The directory holding everything.
    pub dir: PathBuf,
    /// The replicas.
    pub replicas: Vec<LocalReplica>,
    /// Client configuration files.
    pub clients: Vec<PathBuf>,
    /// The `securesmart` executable that runs the nodes.
    pub exe: PathBuf,
    /// Remove the directory when dropped, unless the thread is panicking (a failed test keeps
    /// its logs and journals).
    pub remove_on_drop: bool,
    consensus: ConsensusSection,
    rekey_seconds: u64,
}

/// Options of [`LocalCluster::create`].
#[derive(Clone, Debug)]
pub struct LocalClusterOptions {
    /// Replicas (at least 4).
    pub replicas: usize,
    /// Client identities.
    pub clients: usize,
    /// Consensus tuning written into every node file.
    pub consensus: ConsensusSection,
    /// Client request timeout, in milliseconds.
    pub client_timeout_ms: u64,
    /// Log filter for the node processes (`RUST_LOG`).
    pub log: String,
    /// Group-key rotation period of the nodes, in seconds.
    pub rekey_seconds: u64,
}

impl Default for LocalClusterOptions {
    fn default() -> Self {
        Self {
            replicas: 4,
            clients: 4,
            consensus: ConsensusSection::default(),
            client_timeout_ms: 10_000,
            log: "info".into(),
            rekey_seconds: 600,
        }
    }
}

fn free_port() -> Result<UdpSocket, ClusterError> {
    UdpSocket::bind("127.0.0.1:0").map_err(io("binding a free port"))
}

fn port_of(s: &UdpSocket) -> Result<SocketAddr, ClusterError> {
    s.local_addr().map_err(io("reading a port"))
}

impl LocalCluster {
    /// Creates the trust center, enrolls every node over the network and writes the files
    /// into `dir` (which must not hold a cluster yet). Starts no node.
    ///
    /// # Errors
    /// [`ClusterError`].
    pub async fn create(
        dir: &Path,
        exe: &Path,
        options: &LocalClusterOptions,
    ) -> Result<Self, ClusterError> {
        std::fs::create_dir_all(dir.join("logs")).map_err(io("creating the cluster directory"))?;
        let mut ca = TrustCenter::init(&dir.join("ca"), "SecureSMART local CA").map_err(tc)?;
        std::fs::write(dir.join("ca.pem"), ca.ca_certificate_pem()).map_err(io("ca.pem"))?;
        write_crl(dir, &mut ca)?;
        drop(ca);
        let mut names = Vec::new();
        for (role, kind, count) in [
            (RoleName::Replica, "replica", options.replicas),
            (RoleName::Client, "client", options.clients),
        ] {
            names.extend((0..count).map(|i| (format!("{kind}{i}"), role)));
        }
        let ids = enroll_all(dir, &names).await?;
        let mut cluster = Self {
            dir: dir.to_owned(),
            replicas: Vec::new(),
            clients: Vec::new(),
            exe: exe.to_owned(),
            remove_on_drop: false,
            consensus: options.consensus.clone(),
            rekey_seconds: options.rekey_seconds,
        };
        let mut held = Vec::new();
        for (i, id) in ids.iter().take(options.replicas).enumerate() {
            let (replica, ports) = cluster.new_replica(i, *id)?;
            cluster.replicas.push(replica);
            held.push(ports);
        }
        let list = cluster.replica_list(None);
        for i in 0..cluster.replicas.len() {
            cluster.write_node_config(i, &list, 0)?;
        }
        for j in 0..options.clients {
            let path = dir.join(format!("client{j}.toml"));
            let text = format!(
                "# Client {j} of a local cluster (written by securesmart).\n[client]\n\
                 certificate = \"client{j}.pem\"\nkey = \"client{j}.key\"\nca = \"ca.pem\"\n\
                 timeout_ms = {}\nretry_ms = 500\nlimits = \"local\"\n{list}",
                options.client_timeout_ms
            );
            std::fs::write(&path, text).map_err(io(path.display().to_string()))?;
            cluster.clients.push(path);
        }
        drop(held);
        Ok(cluster)
    }

    /// Enrolls one more replica at the trust center and writes its files: a joiner whose
    /// configuration names the cluster's current replicas ([`LocalCluster::current_roster`];
    /// the cluster must be running). Returns its index. Start it with
    /// [`LocalCluster::start`] after an administrator ordered its `AddNode` (or before: it waits
    /// to be admitted).
    ///
    /// # Errors
    /// [`ClusterError`].
    pub async fn add_replica(&mut self) -> Result<usize, ClusterError> {
        let i = self.replicas.len();
        let ids = enroll_all(&self.dir, &[(format!("replica{i}"), RoleName::Replica)]).await?;
        let id = ids
            .first()
            .copied()
            .ok_or_else(|| ClusterError::TrustCenter("enrollment returned nothing".into()))?;
        let (replica, ports) = self.new_replica(i, id)?;
        // The joiner trusts the replicas its configuration names to hand it the state: list
        // the current ones, as the running cluster certifies them, not the ones created so
        // far (removed replicas among them could feed it a false state).
        let roster = self.current_roster().await?;
        let list = self.roster_list(&roster)?;
        self.replicas.push(replica);
        self.write_node_config(i, &list, roster.number())?;
        drop(ports);
        Ok(i)
    }

    /// The current roster of the running cluster, followed from the clients' configured one
    /// through the certified changes, by a client enrolled for the purpose (`observer{k}`, so
    /// that no client in use connects twice).
    ///
    /// # Errors
    /// [`ClusterError::Client`] if the cluster cannot be reached or the roster followed,
    /// [`ClusterError::NoClient`], [`ClusterError::TrustCenter`].
    pub async fn current_roster(&self) -> Result<crate::roster::Roster, ClusterError> {
        let path = self.clients.first().ok_or(ClusterError::NoClient)?;
        let mut config =
            crate::config::ClientConfig::load(path).map_err(crate::client::ClientError::from)?;
        let k = (0..)
            .find(|k| !self.dir.join(format!("observer{k}.pem")).exists())
            .unwrap_or_default();
        let name = format!("observer{k}");
        enroll_all(&self.dir, &[(name.clone(), RoleName::Client)]).await?;
        config.client.certificate = self.dir.join(format!("{name}.pem"));
        config.client.key = self.dir.join(format!("{name}.key"));
        let mut client = crate::client::Client::from_config(&config).await?;
        let roster = client.refresh_roster().await.cloned();
        client.close().await;
        Ok(roster?)
    }

    /// The `[[replicas]]` entries of `roster` (replicas this cluster created).
    fn roster_list(&self, roster: &crate::roster::Roster) -> Result<String, ClusterError> {
        let mut list = format!("# Roster {} of the cluster.\n", roster.number());
        for (id, entry) in roster.replicas() {
            let i = self
                .replicas
                .iter()
                .position(|r| r.id == *id)
                .ok_or(ClusterError::ForeignReplica(*id))?;
            list.push_str(&format!(
                "\n[[replicas]]\ncertificate = \"replica{i}.pem\"\nreplica = \"{}\"\nclient = \"{}\"\n",
                entry.replica_addr, entry.client_addr
            ));
        }
        Ok(list)
    }

    /// A replica's addresses on fresh ports; the sockets hold the ports until dropped.
    fn new_replica(
        &self,
        i: usize,
        id: NodeId,
    ) -> Result<(LocalReplica, (UdpSocket, UdpSocket, std::net::TcpListener)), ClusterError> {
        let (r, c) = (free_port()?, free_port()?);
        let m = std::net::TcpListener::bind("127.0.0.1:0").map_err(io("binding a free port"))?;
        let replica = LocalReplica {
            id,
            config: self.dir.join(format!("replica{i}.toml")),
            replica_addr: port_of(&r)?,
            client_addr: port_of(&c)?,
            metrics_addr: m.local_addr().map_err(io("reading a port"))?,
            certificate: self.dir.join(format!("replica{i}.pem")),
            process: None,
        };
        Ok((replica, (r, c, m)))
    }

    /// The `[[replicas]]` entries of the replicas created so far, but `except`.
    fn replica_list(&self, except: Option<usize>) -> String {
        let mut list = String::new();
        for (i, r) in self.replicas.iter().enumerate() {
            if Some(i) == except {
                continue;
            }
            list.push_str(&format!(
                "\n[[replicas]]\ncertificate = \"replica{i}.pem\"\nreplica = \"{}\"\nclient = \"{}\"\n",
                r.replica_addr, r.client_addr
            ));
        }
        list
    }

    /// Writes replica `i`'s configuration with `list` as its `[[replicas]]`, which is roster
    /// `roster`.
    fn write_node_config(&self, i: usize, list: &str, roster: u64) -> Result<(), ClusterError> {
        let Some(r) = self.replicas.get(i) else {
            return Ok(());
        };
        let k = &self.consensus;
        let text = format!(
            "# Replica {i} of a local cluster (written by securesmart).\n[node]\n\
             certificate = \"replica{i}.pem\"\nkey = \"replica{i}.key\"\nca = \"ca.pem\"\n\
             crl = \"crl.pem\"\nrevoked_certificates = \"revoked.pem\"\ndata_dir = \"data/replica{i}\"\nreplica_listen = \"{}\"\n\
             client_listen = \"{}\"\nmetrics_listen = \"{}\"\nlimits = \"local\"\n\
             admins = [\"client0.pem\"]\nrekey_seconds = {}\nroster = {roster}\n\n[consensus]\nmax_batch = {}\nbatch_delay_ms = {}\n\
             checkpoint_interval = {}\nwindow = {}\nview_change_timeout_ms = {}\n{}{list}",
            r.replica_addr,
            r.client_addr,
            r.metrics_addr,
            self.rekey_seconds,
            k.max_batch,
            k.batch_delay_ms,
            k.checkpoint_interval,
            k.window,
            k.view_change_timeout_ms,
            if k.insecure_baseline {
                "insecure_baseline = true\n"
            } else {
                ""
            }
        );
        std::fs::write(&r.config, text).map_err(io(r.config.display().to_string()))
    }

    /// Starts replica `i` (`securesmart node run`), logging to `logs/replica{i}.log`.
    ///
    /// # Errors
    /// [`ClusterError::Io`] if the process cannot start.
    pub fn start(&mut self, i: usize, log: &str) -> Result<(), ClusterError> {
        self.start_with(i, log, &[])
    }

    /// [`LocalCluster::start`] with extra environment variables for the process (e.g. the
    /// fault a test build of the node plays, `SECURESMART_FAULT`).
    ///
    /// # Errors
    /// [`ClusterError::Io`] if the process cannot start.
    pub fn start_with(
        &mut self,
        i: usize,
        log: &str,
        env: &[(&str, &str)],
    ) -> Result<(), ClusterError> {
        let threads = replica_threads(self.replicas.len()).to_string();
        let Some(r) = self.replicas.get_mut(i) else {
            return Ok(());
        };
        if r.process.is_some() {
            return Ok(());
        }
        let log_path = self.dir.join("logs").join(format!("replica{i}.log"));
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io(log_path.display().to_string()))?;
        let child = Command::new(&self.exe)
            .args(["node", "run", "--config"])
            .arg(&r.config)
            .env("RUST_LOG", log)
            .env("TOKIO_WORKER_THREADS", threads)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(io(format!("starting {}", self.exe.display())))?;
        r.process = Some(child);
        Ok(())
    }

    /// The process id of replica `i`, if it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.replicas
            .get(i)
            .and_then(|r| r.process.as_ref())
            .map(Child::id)
    }

    /// Kills replica `i` at once (SIGKILL: a crash; nothing is flushed beyond what the journal
    /// already synced).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.replicas.get_mut(i).and_then(|r| r.process.take()) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The sum of metric `name` (all label sets) on replica `i`'s Prometheus endpoint; 0 if
    /// the replica is unknown or its endpoint unreachable.
    pub fn metric(&self, i: usize, name: &str) -> f64 {
        self.replicas
            .get(i)
            .and_then(|r| scrape(r.metrics_addr).ok())
            .map_or(0.0, |body| metric_sum(&body, name, &[]))
    }

    /// Whether replica `i` is running (it has not exited).
    pub fn is_running(&mut self, i: usize) -> bool {
        self.replicas
            .get_mut(i)
            .and_then(|r| r.process.as_mut())
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Writes a fresh CRL valid for `validity` to `crl.pem` (the replicas order it), as
    /// `securesmart ca serve --crl` does on its schedule; returns its path.
    ///
    /// # Errors
    /// [`ClusterError`].
    pub fn refresh_crl(&self, validity: Duration) -> Result<PathBuf, ClusterError> {
        let mut ca = TrustCenter::open(&self.dir.join("ca")).map_err(tc)?;
        write_crl_for(&self.dir, &mut ca, validity)
    }

    /// Revokes `certificate` at the trust center, writes a fresh CRL to `crl.pem` and adds the
    /// certificate to `revoked.pem` (the replicas order both); returns the CRL's path.
    ///
    /// # Errors
    /// [`ClusterError`].
    pub fn revoke(&self, certificate: &Path) -> Result<PathBuf, ClusterError> {
        let mut ca = TrustCenter::open(&self.dir.join("ca")).map_err(tc)?;
        let pem = std::fs::read(certificate).map_err(io(certificate.display().to_string()))?;
        ca.revoke_certificate(&pem, securesmart_membership::Reason::KeyCompromise)
            .map_err(tc)?;
        let crl = write_crl(&self.dir, &mut ca)?;
        // The certificate itself too, so that the replicas learn whom the CRL's serial names
        // (a client's id is in no membership) and refuse its requests whoever relays them.
        let bundle = self.dir.join("revoked.pem");
        let mut all = std::fs::read(&bundle).unwrap_or_default();
        // The leaf only (the file may hold its chain).
        let leaf = crate::config::load_certificate(certificate)
            .map_err(|e| ClusterError::TrustCenter(e.to_string()))?;
        all.extend_from_slice(
            securesmart_transport::pki::pem_encode("CERTIFICATE", leaf.as_ref()).as_bytes(),
        );
        write_atomic(&bundle, &all)?;
        Ok(crl)
    }
}

impl LocalCluster {
    /// Renews replica `i`'s certificate for its own key at the trust center (a CSR made with
    /// its key: `securesmart keygen --key` and `securesmart ca renew`), keeps the old one as
    /// `replica{i}.old.pem` and writes the renewal over `replica{i}.pem` (the running replica
    /// orders it and presents it); returns the old certificate's path.
    ///
    /// # Errors
    /// [`ClusterError`].
    pub fn renew(&self, i: usize) -> Result<PathBuf, ClusterError> {
        let replica = self.replicas.get(i).ok_or(ClusterError::NoReplica(i))?;
        let cert = &replica.certificate;
        let key = cert.with_extension("key");
        let old_pem = std::fs::read(cert).map_err(io(cert.display().to_string()))?;
        let key_pem = std::fs::read_to_string(&key).map_err(io(key.display().to_string()))?;
        let csr = securesmart_membership::trust_center::csr_for_key(&key_pem, &[]).map_err(tc)?;
        let csr = <rustls::pki_types::CertificateSigningRequestDer as rustls::pki_types::pem::PemObject>::from_pem_slice(csr.as_bytes())
            .map_err(tc)?;
        let mut ca = TrustCenter::open(&self.dir.join("ca")).map_err(tc)?;
        let renewed = ca.renew(&old_pem, &csr).map_err(tc)?;
        let old = cert.with_extension("old.pem");
        write_atomic(&old, &old_pem)?;
        write_atomic(cert, renewed.pem().as_bytes())?;
        Ok(old)
    }

    /// Revokes `certificate` as superseded (a renewal replaced it; the key is not
    /// compromised, so its other certificates stay good) and writes a fresh CRL to `crl.pem`.
    ///
    /// # Errors
    /// [`ClusterError`].
    pub fn supersede(&self, certificate: &Path) -> Result<PathBuf, ClusterError> {
        let mut ca = TrustCenter::open(&self.dir.join("ca")).map_err(tc)?;
        let pem = std::fs::read(certificate).map_err(io(certificate.display().to_string()))?;
        ca.revoke_certificate(&pem, securesmart_membership::Reason::Superseded)
            .map_err(tc)?;
        write_crl(&self.dir, &mut ca)
    }
}

/// Enrolls `names` (file stem and role) at the trust center in `dir/ca` over the network with
/// one-time tokens, writing `{name}.pem` and `{name}.key` (mode 0600); returns their node ids.
async fn enroll_all(dir: &Path, names: &[(String, RoleName)]) -> Result<Vec<NodeId>, ClusterError> {
    let mut ca = TrustCenter::open(&dir.join("ca")).map_err(tc)?;
    let ca_cert = ca.ca_certificate();
    let mut tokens = Vec::new();
    for (name, role) in names {
        let token = ca
            .create_token(*role, &[format!("{name}.local")], Duration::from_secs(600))
            .map_err(tc)?;
        tokens.push((name, token));
    }
    // Every node enrolls from 127.0.0.1 at once: lift the per-IP rate limit meant for the
    // internet-facing endpoint.
    let mut limits = EnrollLimits::default();
    limits.requests_per_ip_per_sec = 1000;
    limits.request_burst_per_ip = 1000;
    let server = EnrollmentServer::start(ca, "127.0.0.1:0".parse().map_err(tc)?, &[], limits)
        .await
        .map_err(tc)?;
    let enroll_addr = server.local_addr().map_err(io("enrollment address"))?;
    let mut ids = Vec::new();
    for (name, token) in &tokens {
        let enrolled = enroll(enroll_addr, &ca_cert, token, &[])
            .await
            .map_err(tc)?;
        std::fs::write(dir.join(format!("{name}.pem")), &enrolled.certificate_pem)
            .map_err(io(format!("{name}.pem")))?;
        write_secret_file(
            &dir.join(format!("{name}.key")),
            enrolled.key_pem.as_bytes(),
        )
        .map_err(io(format!("{name}.key")))?;
        ids.push(enrolled.identity.id());
    }
    server.shutdown().await;
    Ok(ids)
}

/// Writes the trust center's current CRL to `dir/crl.pem` atomically (the nodes watch it).
fn write_crl(dir: &Path, ca: &mut TrustCenter) -> Result<PathBuf, ClusterError> {
    write_crl_for(dir, ca, Duration::from_secs(24 * 3600))
}

/// [`write_crl`] with a CRL valid for `validity`.
fn write_crl_for(
    dir: &Path,
    ca: &mut TrustCenter,
    validity: Duration,
) -> Result<PathBuf, ClusterError> {
    let crl = ca.crl(validity).map_err(tc)?;
    let path = dir.join("crl.pem");
    write_atomic(
        &path,
        securesmart_transport::pki::pem_encode("X509 CRL", crl.as_ref()).as_bytes(),
    )?;
    Ok(path)
}

/// Writes `path` through a temporary file and a rename, so that a watcher never reads half.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ClusterError> {
    let what = path.display().to_string();
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bytes).map_err(io(what.clone()))?;
    std::fs::rename(&tmp, path).map_err(io(what))
}

/// Fetches a node's Prometheus metrics (plain HTTP GET on `addr`).
///
/// # Errors
/// [`ClusterError::Io`] when the endpoint does not answer within two seconds.
pub fn scrape(addr: SocketAddr) -> Result<String, ClusterError> {
    use std::io::{Read, Write};
    let what = || format!("metrics at {addr}");
    let timeout = Duration::from_secs(2);
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout).map_err(io(what()))?;
    stream.set_read_timeout(Some(timeout)).map_err(io(what()))?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .map_err(io(what()))?;
    let mut body = String::new();
    stream
        .take(16 * 1024 * 1024)
        .read_to_string(&mut body)
        .map_err(io(what()))?;
    Ok(body)
}

/// The sum of the samples of metric `name` whose labels contain every one of `labels`
/// (`key="value"` strings), in Prometheus text `body`.
pub fn metric_sum(body: &str, name: &str, labels: &[&str]) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            (metric == name && labels.iter().all(|want| rest.contains(want)))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for i in 0..self.replicas.len() {
            self.kill(i);
        }
        if self.remove_on_drop && !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
