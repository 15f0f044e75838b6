//! The registration and certification authority (RA/CA) with durable state in one directory.
//!
//! # Directory layout
//! - `ca.pem`: the CA certificate; `ca.key`: its Ed25519 key (PKCS#8 PEM, mode 0600).
//! - `state.json`: the index of issued certificates (serial, node id, names, role, validity,
//!   revocation), the CRL number, and the enrollment tokens (only their hashes).
//! - `certs/<serial>.pem`: every issued certificate.
//! - `lock`: held exclusively during each change, so several processes (`ca serve` and
//!   `ca revoke`, say) can share the directory; each change starts from the state on disk.
//!
//! Every change is written atomically (see `store`). Issuing writes the certificate file and
//! then the index, in which the token is marked used together with the new entry; a certificate
//! is handed out only after both are durable. A crash in between leaves at worst an orphan
//! certificate file that was never handed out, and the token still unused. Serials are random
//! 127-bit numbers checked against the index and the `certs/` directory, so none is reused.
//!
//! # Admission policy
//! A CSR is signed only if: the token exists, has not expired and was not used; the CSR's
//! signature verifies; its key is Ed25519; it asks for no CA rights (no CA basic constraint, no
//! keyCertSign or cRLSign); it names at least one DNS name or IP, all allowed by the token, and
//! nothing else. The role comes from the token, never from the CSR. Refusals change nothing on
//! disk.
//!
//! # Tokens
//! 32 random bytes shown once as hex; the CA keeps `BLAKE3-derive_key(TOKEN_CONTEXT, token)`
//! and compares hashes in constant time.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{CertificateSigningRequestParams, Issuer, KeyPair, PKCS_ED25519};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, CertificateSigningRequestDer,
};
use securesmart_transport::pki::{
    self, NodeProfile, RevocationReason, RevokedCertParams, SanName, SerialNumber,
};
use securesmart_transport::{CertInfo, NodeId, Role};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use zeroize::Zeroizing;

use crate::store::{self, Faults};

/// Domain-separation context of enrollment-token hashes.
pub const TOKEN_CONTEXT: &str = securesmart_base::tags::membership::ENROLLMENT_TOKEN;
/// Default validity of issued certificates.
pub const DEFAULT_CERT_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);
/// Default validity of a CRL (its next-update time).
pub const DEFAULT_CRL_VALIDITY: Duration = Duration::from_secs(7 * 24 * 3600);
/// Validity of the CA certificate.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Version of `state.json`.
const STATE_VERSION: u32 = 1;

/// Why the RA refused an enrollment. Nothing on disk changed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnrollmentRefusal {
    /// No such token.
    #[error("unknown enrollment token")]
    UnknownToken,
    /// The token has expired.
    #[error("enrollment token expired")]
    TokenExpired,
    /// The token was used already.
    #[error("enrollment token already used")]
    TokenUsed,
    /// The CSR does not parse or its signature does not verify.
    #[error("invalid CSR: {0}")]
    CsrInvalid(String),
    /// The CSR's key is not Ed25519.
    #[error("the CSR key is not Ed25519")]
    KeyNotEd25519,
    /// The CSR asks for CA rights.
    #[error("the CSR asks for CA rights")]
    AsksForCa,
    /// The CSR names something the token does not allow.
    #[error("name {0} is not allowed by the token")]
    NameNotAllowed(String),
    /// The CSR has a SAN of a kind we do not issue (only DNS names and IPs).
    #[error("unsupported subject alternative name in the CSR")]
    UnsupportedSan,
    /// The CSR names nothing.
    #[error("the CSR names no DNS name or IP")]
    NoNames,
    /// A renewal was refused: the old certificate is not ours, revoked or expired, or the CSR
    /// is for another key.
    #[error("renewal refused: {0}")]
    RenewalRefused(String),
    /// A certificate of the CSR's key was revoked for key compromise: the key is never
    /// certified again.
    #[error("the CSR's key was revoked for key compromise")]
    KeyCompromised,
}

/// Errors of the trust center.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrustCenterError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The directory already holds a CA.
    #[error("{0} already holds a CA")]
    AlreadyInitialized(String),
    /// The state files are missing or corrupt.
    #[error("bad CA state: {0}")]
    State(String),
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    Pki(String),
    /// The RA refused an enrollment.
    #[error("enrollment refused: {0}")]
    Refused(#[from] EnrollmentRefusal),
    /// No issued certificate matches.
    #[error("no issued certificate matches {0}")]
    UnknownCertificate(String),
    /// The certificate is revoked already.
    #[error("certificate {0} is already revoked")]
    AlreadyRevoked(String),
    /// An argument is invalid (role, name, reason).
    #[error("invalid argument: {0}")]
    Invalid(String),
}

fn pki_err(e: impl std::fmt::Display) -> TrustCenterError {
    TrustCenterError::Pki(e.to_string())
}

/// A role as stored in the index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RoleName {
    /// [`Role::Replica`].
    Replica,
    /// [`Role::Client`].
    Client,
}

impl RoleName {
    /// The transport role.
    pub fn role(self) -> Role {
        match self {
            RoleName::Replica => Role::Replica,
            RoleName::Client => Role::Client,
        }
    }
}

impl std::str::FromStr for RoleName {
    type Err = TrustCenterError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "replica" => Ok(RoleName::Replica),
            "client" => Ok(RoleName::Client),
            other => Err(TrustCenterError::Invalid(format!(
                "role {other:?} (replica or client)"
            ))),
        }
    }
}

/// A revocation reason (RFC 5280 CRLReason), as the CLI names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    /// unspecified
    Unspecified,
    /// keyCompromise
    KeyCompromise,
    /// affiliationChanged
    AffiliationChanged,
    /// superseded
    Superseded,
    /// cessationOfOperation
    CessationOfOperation,
}

impl Reason {
    fn crl_reason(self) -> RevocationReason {
        match self {
            Reason::Unspecified => RevocationReason::Unspecified,
            Reason::KeyCompromise => RevocationReason::KeyCompromise,
            Reason::AffiliationChanged => RevocationReason::AffiliationChanged,
            Reason::Superseded => RevocationReason::Superseded,
            Reason::CessationOfOperation => RevocationReason::CessationOfOperation,
        }
    }
}

impl std::str::FromStr for Reason {
    type Err = TrustCenterError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "unspecified" => Reason::Unspecified,
            "key-compromise" => Reason::KeyCompromise,
            "affiliation-changed" => Reason::AffiliationChanged,
            "superseded" => Reason::Superseded,
            "cessation-of-operation" => Reason::CessationOfOperation,
            other => {
                return Err(TrustCenterError::Invalid(format!(
                    "reason {other:?} (unspecified, key-compromise, affiliation-changed, superseded, cessation-of-operation)"
                )));
            }
        })
    }
}

/// A revocation entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// When (Unix seconds).
    pub at: i64,
    /// Why.
    pub reason: Reason,
}

/// One issued certificate in the index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedRecord {
    /// Serial number, lower-case hex.
    pub serial: String,
    /// Node id, hex.
    pub node_id: String,
    /// DNS names and IPs.
    pub names: Vec<String>,
    /// Role.
    pub role: RoleName,
    /// Validity start (Unix seconds).
    pub not_before: i64,
    /// Validity end (Unix seconds).
    pub not_after: i64,
    /// Set once revoked.
    pub revoked: Option<Revocation>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct TokenRecord {
    /// Hex of the token's keyed hash.
    hash: String,
    role: RoleName,
    names: Vec<String>,
    expires_at: i64,
    used_by: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct State {
    version: u32,
    crl_number: u64,
    certificates: Vec<IssuedRecord>,
    tokens: Vec<TokenRecord>,
}

/// A certificate just issued.
#[derive(Clone, Debug)]
pub struct Issued {
    /// The certificate (DER).
    pub certificate: CertificateDer<'static>,
    /// Its index entry.
    pub record: IssuedRecord,
}

impl Issued {
    /// The certificate as PEM.
    pub fn pem(&self) -> String {
        pki::pem_encode("CERTIFICATE", self.certificate.as_ref())
    }
}

/// What to revoke.
#[derive(Clone, Debug)]
pub enum RevokeTarget {
    /// By serial (hex, with or without leading zeros or `0x`).
    Serial(String),
    /// By node id.
    NodeId(NodeId),
}

/// The trust center over its directory (see the module doc).
pub struct TrustCenter {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    ca_cert: CertificateDer<'static>,
    state: State,
    /// The time and size of `state.json` when it was last read without the lock
    /// ([`TrustCenter::precheck_token`]).
    state_seen: Option<(std::time::SystemTime, u64)>,
    faults: Faults,
    clock: Clock,
}

/// The time a [`TrustCenter`] issues and judges by: the system clock, or one a test drives
/// ([`Clock::manual`]). Certificates, CRLs, tokens and renewals all read it.
#[derive(Clone)]
pub struct Clock(std::sync::Arc<dyn Fn() -> OffsetDateTime + Send + Sync>);

impl Clock {
    /// The system clock (the default).
    pub fn system() -> Self {
        Self(std::sync::Arc::new(OffsetDateTime::now_utc))
    }

    /// A clock that reads `now` (unix seconds), which the caller moves.
    pub fn manual(now: std::sync::Arc<std::sync::atomic::AtomicI64>) -> Self {
        Self(std::sync::Arc::new(move || {
            let t = now.load(std::sync::atomic::Ordering::Relaxed);
            OffsetDateTime::from_unix_timestamp(t).unwrap_or(OffsetDateTime::UNIX_EPOCH)
        }))
    }

    /// The time now.
    pub fn now(&self) -> OffsetDateTime {
        (self.0)()
    }

    fn unix(&self) -> i64 {
        self.now().unix_timestamp()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Clock").field(&self.now()).finish()
    }
}

impl std::fmt::Debug for TrustCenter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustCenter")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// How far back a certificate's validity starts: a renewal is presented at once, and peers
/// whose clocks are behind by up to this (the skew the nodes allow for ordered commands) must
/// not refuse it as not yet valid.
const BACKDATE: time::Duration = time::Duration::minutes(10);

/// How long an unused token is kept once expired (seconds) before `create_token` prunes it.
const TOKEN_KEPT_AFTER_EXPIRY: i64 = 24 * 3600;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim().trim_start_matches("0x");
    if s.is_empty() || !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|p| u8::from_str_radix(p, 16).ok()))
        .collect()
}

/// Normalizes a serial in hex: lower case, no `0x`, no leading zero bytes.
fn normalize_serial(s: &str) -> Option<String> {
    let mut bytes = unhex(
        if s.len() % 2 == 1 {
            format!("0{s}")
        } else {
            s.to_owned()
        }
        .as_str(),
    )?;
    while bytes.len() > 1 && bytes.first() == Some(&0) {
        bytes.remove(0);
    }
    Some(hex(&bytes))
}

fn token_hash(token: &[u8]) -> blake3::Hash {
    blake3::Hash::from(blake3::derive_key(TOKEN_CONTEXT, token))
}

impl TrustCenter {
    fn paths(dir: &Path) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
        (
            dir.join("ca.pem"),
            dir.join("ca.key"),
            dir.join("state.json"),
            dir.join("certs"),
        )
    }

    /// Creates a CA named `name` in `dir` (created if missing).
    ///
    /// # Errors
    /// [`TrustCenterError::AlreadyInitialized`] if `dir` holds a CA; I/O and generation errors.
    pub fn init(dir: &Path, name: &str) -> Result<Self, TrustCenterError> {
        let (cert_path, key_path, state_path, certs) = Self::paths(dir);
        store::create_dir(&certs)?;
        // Under the lock from the check to the last write: two `init`s racing on one directory
        // cannot both see it empty.
        let _lock = Self::lock_dir(dir)?;
        if cert_path.exists() || key_path.exists() || state_path.exists() {
            return Err(TrustCenterError::AlreadyInitialized(
                dir.display().to_string(),
            ));
        }
        let (key, _) = pki::generate_ed25519().map_err(pki_err)?;
        let now = OffsetDateTime::now_utc();
        let validity = time::Duration::try_from(CA_VALIDITY).map_err(pki_err)?;
        let params =
            pki::ca_params(name, now - time::Duration::HOUR, now + validity).map_err(pki_err)?;
        let cert = params.self_signed(&key).map_err(pki_err)?;
        let mut faults = Faults::default();
        let key_pem = Zeroizing::new(key.serialize_pem());
        store::write_atomic(&key_path, key_pem.as_bytes(), 0o600, &mut faults)?;
        store::write_atomic(&cert_path, cert.pem().as_bytes(), 0o644, &mut faults)?;
        // (The lock file, taken above, exists from the start, so that no later operation, not
        // even a refused one, adds a file to the directory.)
        let state = State {
            version: STATE_VERSION,
            crl_number: 0,
            certificates: Vec::new(),
            tokens: Vec::new(),
        };
        let mut tc = Self {
            dir: dir.to_path_buf(),
            issuer: Issuer::new(params, key),
            ca_cert: cert.der().clone(),
            state,
            state_seen: None,
            faults,
            clock: Clock::system(),
        };
        tc.save()?;
        tracing::info!(dir = %dir.display(), "trust center initialized");
        Ok(tc)
    }

    /// Opens the CA in `dir`, cleaning temporaries a crash left behind.
    ///
    /// # Errors
    /// [`TrustCenterError::State`] when files are missing or corrupt; I/O errors.
    pub fn open(dir: &Path) -> Result<Self, TrustCenterError> {
        let (cert_path, key_path, state_path, certs) = Self::paths(dir);
        if !state_path.exists() {
            return Err(TrustCenterError::State(format!(
                "{}: not a trust center directory",
                dir.display()
            )));
        }
        // Under the lock: another process's write in progress has its temporary file too.
        let _lock = Self::lock_dir(dir)?;
        store::clean_temporaries(dir);
        store::clean_temporaries(&certs);
        let bad =
            |what: &str, e: &dyn std::fmt::Display| TrustCenterError::State(format!("{what}: {e}"));
        let cert_pem = store::read(&cert_path)?;
        let ca_cert = CertificateDer::from_pem_slice(&cert_pem).map_err(|e| bad("ca.pem", &e))?;
        let key_pem = Zeroizing::new(store::read(&key_path)?);
        let key_str = std::str::from_utf8(&key_pem).map_err(|e| bad("ca.key", &e))?;
        let key = KeyPair::from_pem(key_str).map_err(|e| bad("ca.key", &e))?;
        let issuer = Issuer::from_ca_cert_der(&ca_cert, key).map_err(|e| bad("ca.pem", &e))?;
        let state: State = serde_json::from_slice(&store::read(&state_path)?)
            .map_err(|e| bad("state.json", &e))?;
        if state.version != STATE_VERSION {
            return Err(TrustCenterError::State(format!(
                "state version {}",
                state.version
            )));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            issuer,
            ca_cert,
            state,
            state_seen: None,
            faults: Faults::default(),
            clock: Clock::system(),
        })
    }

    /// Another handle on the same directory (each operation takes the lock and reads the state
    /// afresh, so handles never disagree).
    ///
    /// # Errors
    /// As [`TrustCenter::open`].
    pub fn reopen(&self) -> Result<Self, TrustCenterError> {
        Self::open(&self.dir)
    }

    /// A cheap check of `token`, without the directory's lock: its form (32 bytes in hex), and
    /// that the state last read (read again when `state.json`, which is replaced atomically,
    /// changed) holds it unused and unexpired. An enrollment endpoint runs it before the
    /// locked [`TrustCenter::sign_csr`], so that requests with made-up tokens cost neither the
    /// lock nor a parse of the state; a token it passes is checked again under the lock.
    ///
    /// # Errors
    /// The [`EnrollmentRefusal`] for an unknown, used or expired token.
    pub fn precheck_token(&mut self, token: &str) -> Result<(), EnrollmentRefusal> {
        if token.len() != 64 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(EnrollmentRefusal::UnknownToken);
        }
        let path = self.dir.join("state.json");
        // Time and size: every change of a token (made, used, withdrawn) changes the size, so
        // a file system with coarse times does not hide one.
        let seen = std::fs::metadata(&path)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len())));
        if (seen.is_none() || seen != self.state_seen)
            && let Ok(state) = Self::load_state(&self.dir)
        {
            self.state = state;
            self.state_seen = seen;
        }
        self.live_token(token).map(|_| ())
    }

    /// The index and record of `token` if it is known, unused and unexpired.
    fn live_token(&self, token: &str) -> Result<(usize, TokenRecord), EnrollmentRefusal> {
        let t = self.find_token(token)?;
        let record = self
            .state
            .tokens
            .get(t)
            .cloned()
            .ok_or(EnrollmentRefusal::UnknownToken)?;
        if record.used_by.is_some() {
            return Err(EnrollmentRefusal::TokenUsed);
        }
        if record.expires_at <= self.clock.unix() {
            return Err(EnrollmentRefusal::TokenExpired);
        }
        Ok((t, record))
    }

    /// Runs a state change under an exclusive lock on the CA directory, on the state as it is on
    /// disk: several processes (`ca serve`, `ca revoke`, ...) may work on one directory, and none
    /// may overwrite another's change with a stale copy.
    fn locked<T>(
        &mut self,
        op: impl FnOnce(&mut Self) -> Result<T, TrustCenterError>,
    ) -> Result<T, TrustCenterError> {
        let lock = Self::lock_dir(&self.dir)?;
        self.state = Self::load_state(&self.dir)?;
        let out = op(self);
        let _ = lock.unlock();
        out
    }

    /// Takes the directory's exclusive lock (released when the file is dropped), creating the
    /// lock file if needed.
    fn lock_dir(dir: &Path) -> Result<std::fs::File, TrustCenterError> {
        let lock_path = dir.join("lock");
        let io = |e| TrustCenterError::Io {
            path: lock_path.display().to_string(),
            source: e,
        };
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io)?;
        lock.lock().map_err(io)?;
        Ok(lock)
    }

    fn load_state(dir: &Path) -> Result<State, TrustCenterError> {
        let state: State = serde_json::from_slice(&store::read(&dir.join("state.json"))?)
            .map_err(|e| TrustCenterError::State(format!("state.json: {e}")))?;
        if state.version != STATE_VERSION {
            return Err(TrustCenterError::State(format!(
                "state version {}",
                state.version
            )));
        }
        Ok(state)
    }

    fn save(&mut self) -> Result<(), TrustCenterError> {
        let json = serde_json::to_vec_pretty(&self.state)
            .map_err(|e| TrustCenterError::State(e.to_string()))?;
        store::write_atomic(&self.dir.join("state.json"), &json, 0o600, &mut self.faults)
    }

    /// Runs `change` on a copy of the state and makes it durable; on any error the in-memory
    /// state stays as it was.
    fn commit<T>(
        &mut self,
        change: impl FnOnce(&mut State) -> Result<T, TrustCenterError>,
    ) -> Result<T, TrustCenterError> {
        let before = self.state.clone();
        let out = change(&mut self.state).and_then(|out| self.save().map(|()| out));
        if out.is_err() {
            self.state = before;
        }
        out
    }

    /// The CA certificate (DER).
    pub fn ca_certificate(&self) -> CertificateDer<'static> {
        self.ca_cert.clone()
    }

    /// The CA certificate (PEM).
    pub fn ca_certificate_pem(&self) -> String {
        pki::pem_encode("CERTIFICATE", self.ca_cert.as_ref())
    }

    /// The index of issued certificates, as of the last operation or [`TrustCenter::open`].
    pub fn certificates(&self) -> &[IssuedRecord] {
        &self.state.certificates
    }

    /// Creates a one-time enrollment token for `role` and `names` (DNS names or IPs), valid for
    /// `ttl`. The returned secret is shown once; only its hash is stored.
    ///
    /// # Errors
    /// [`TrustCenterError::Invalid`] without names; I/O errors.
    pub fn create_token(
        &mut self,
        role: RoleName,
        names: &[String],
        ttl: Duration,
    ) -> Result<Zeroizing<String>, TrustCenterError> {
        self.locked(|tc| tc.create_token_locked(role, names, ttl))
    }

    fn create_token_locked(
        &mut self,
        role: RoleName,
        names: &[String],
        ttl: Duration,
    ) -> Result<Zeroizing<String>, TrustCenterError> {
        if names.is_empty() || names.iter().any(|n| n.trim().is_empty()) {
            return Err(TrustCenterError::Invalid(
                "a token needs at least one name".into(),
            ));
        }
        let secret = Zeroizing::new(rand::random::<[u8; 32]>());
        let token = Zeroizing::new(hex(secret.as_ref()));
        let ttl = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
        let record = TokenRecord {
            hash: token_hash(secret.as_ref()).to_hex().to_string(),
            role,
            names: names.to_vec(),
            expires_at: self.clock.unix().saturating_add(ttl),
            used_by: None,
        };
        // Tokens that expired unused a day ago are of no use, not even to the audit.
        let cutoff = self.clock.unix().saturating_sub(TOKEN_KEPT_AFTER_EXPIRY);
        self.commit(|s| {
            s.tokens
                .retain(|t| t.used_by.is_some() || t.expires_at > cutoff);
            s.tokens.push(record);
            Ok(())
        })?;
        Ok(token)
    }

    /// Withdraws an unused token (given as its secret, which only its holder knows): it can
    /// no longer enroll anything.
    ///
    /// # Errors
    /// [`TrustCenterError::Refused`] if the token is unknown or was used; I/O errors.
    pub fn revoke_token(&mut self, token: &str) -> Result<(), TrustCenterError> {
        self.locked(|tc| {
            let t = tc.find_token(token)?;
            if tc.state.tokens.get(t).is_some_and(|r| r.used_by.is_some()) {
                return Err(EnrollmentRefusal::TokenUsed.into());
            }
            tc.commit(|s| {
                if t < s.tokens.len() {
                    s.tokens.remove(t);
                }
                Ok(())
            })
        })
    }

    /// Index of the token whose hash matches `token` (constant-time hash comparison).
    fn find_token(&self, token: &str) -> Result<usize, EnrollmentRefusal> {
        let bytes = Zeroizing::new(unhex(token).ok_or(EnrollmentRefusal::UnknownToken)?);
        let presented = token_hash(&bytes);
        let mut found = None;
        for (i, t) in self.state.tokens.iter().enumerate() {
            if let Ok(stored) = blake3::Hash::from_hex(&t.hash)
                && stored == presented
            {
                found = Some(i);
            }
        }
        found.ok_or(EnrollmentRefusal::UnknownToken)
    }

    /// Checks a CSR against the admission policy and `token`, and signs it.
    ///
    /// # Errors
    /// [`TrustCenterError::Refused`] with the reason; I/O and generation errors.
    pub fn sign_csr(
        &mut self,
        csr: &CertificateSigningRequestDer<'_>,
        token: &str,
    ) -> Result<Issued, TrustCenterError> {
        self.locked(|tc| tc.sign_csr_locked(csr, token))
    }

    fn sign_csr_locked(
        &mut self,
        csr: &CertificateSigningRequestDer<'_>,
        token: &str,
    ) -> Result<Issued, TrustCenterError> {
        // Cheapest first: the token, then parsing and the CSR signature.
        let (t, record) = self.live_token(token)?;
        let (public_key, sans) = check_csr(csr, &record.names)?;
        self.issue_locked(public_key, sans, record.role, Some(t), None)
    }

    /// Renews `old` (a certificate of ours, PEM or DER, not revoked, not expired) for the key
    /// that signed `csr`, which must be the same key: the CSR's signature is the old
    /// identity's authority, so no token is needed. The new certificate has the old one's role
    /// and the names the CSR asks for among the old one's (all of them if it names none), and a
    /// fresh validity. (Rotating to a new key is enrollment with a token, then a membership
    /// change.)
    ///
    /// # Errors
    /// [`TrustCenterError::Refused`] with the reason; I/O and generation errors.
    pub fn renew(
        &mut self,
        old: &[u8],
        csr: &CertificateSigningRequestDer<'_>,
    ) -> Result<Issued, TrustCenterError> {
        let der = CertificateDer::from_pem_slice(old)
            .unwrap_or_else(|_| CertificateDer::from(old.to_vec()));
        self.locked(|tc| tc.renew_locked(&der, csr))
    }

    fn renew_locked(
        &mut self,
        old: &CertificateDer<'_>,
        csr: &CertificateSigningRequestDer<'_>,
    ) -> Result<Issued, TrustCenterError> {
        let info = CertInfo::parse(old)
            .map_err(|e| EnrollmentRefusal::RenewalRefused(format!("certificate: {e}")))?;
        let serial = hex(&info.serial);
        let record = self
            .state
            .certificates
            .iter()
            .find(|c| c.serial == serial && c.node_id == info.id.to_hex())
            .cloned()
            .ok_or_else(|| {
                EnrollmentRefusal::RenewalRefused("not a certificate we issued".into())
            })?;
        // The index holds what we issued; the bytes must be that certificate, not one with
        // the same serial from elsewhere.
        let ours = store::read(&self.dir.join("certs").join(format!("{serial}.pem")))
            .ok()
            .and_then(|pem| CertificateDer::from_pem_slice(&pem).ok());
        if ours.as_ref().map(|c| c.as_ref()) != Some(old.as_ref()) {
            return Err(
                EnrollmentRefusal::RenewalRefused("not a certificate we issued".into()).into(),
            );
        }
        if record.revoked.is_some() {
            return Err(EnrollmentRefusal::RenewalRefused("revoked".into()).into());
        }
        if record.not_after <= self.clock.unix() {
            return Err(EnrollmentRefusal::RenewalRefused("expired".into()).into());
        }
        let (public_key, sans) = check_csr(csr, &record.names)?;
        let key = NodeId::from_spki(&rcgen::PublicKeyData::subject_public_key_info(&public_key));
        if key != info.id {
            return Err(EnrollmentRefusal::RenewalRefused(
                "the CSR is for another key (a new key enrolls with a token)".into(),
            )
            .into());
        }
        // Issued after the old one, whatever the clock: the membership takes a renewal only
        // if it starts later than the certificate it replaces.
        self.issue_locked(
            public_key,
            sans,
            record.role,
            None,
            Some(record.not_before.saturating_add(1)),
        )
    }

    /// Issues a certificate for `public_key` and `sans` with `role` (marking token `token`
    /// used, if any), valid from [`BACKDATE`] ago (or from `starts_at`, Unix seconds, if later),
    /// unless the key was revoked for key compromise.
    fn issue_locked(
        &mut self,
        public_key: rcgen::PublicKey,
        sans: Vec<SanName>,
        role: RoleName,
        token: Option<usize>,
        starts_at: Option<i64>,
    ) -> Result<Issued, TrustCenterError> {
        let node =
            NodeId::from_spki(&rcgen::PublicKeyData::subject_public_key_info(&public_key)).to_hex();
        let compromised = self.state.certificates.iter().any(|c| {
            c.node_id == node
                && c.revoked
                    .as_ref()
                    .is_some_and(|r| r.reason == Reason::KeyCompromise)
        });
        if compromised {
            return Err(EnrollmentRefusal::KeyCompromised.into());
        }
        let Some(first) = sans.first() else {
            return Err(EnrollmentRefusal::NoNames.into());
        };
        let serial = self.fresh_serial();
        let now = self.clock.now();
        let validity = time::Duration::try_from(DEFAULT_CERT_VALIDITY).map_err(pki_err)?;
        let profile = NodeProfile {
            common_name: first.to_string(),
            sans: sans.clone(),
            role: Some(role.role()),
            not_before: match starts_at.and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok()) {
                Some(t) if t > now - BACKDATE => t,
                _ => now - BACKDATE,
            },
            not_after: now + validity,
            serial: SerialNumber::from_slice(&serial),
        };
        let signed = CertificateSigningRequestParams {
            params: pki::node_params(&profile).map_err(pki_err)?,
            public_key,
        }
        .signed_by(&self.issuer)
        .map_err(pki_err)?;
        let certificate = signed.der().clone();
        let info = CertInfo::parse(&certificate).map_err(pki_err)?;
        let entry = IssuedRecord {
            serial: hex(&info.serial),
            node_id: info.id.to_hex(),
            names: sans.iter().map(ToString::to_string).collect(),
            role,
            not_before: profile.not_before.unix_timestamp(),
            not_after: profile.not_after.unix_timestamp(),
            revoked: None,
        };
        // The certificate file first, then the index with the token marked used: a certificate
        // is returned only once both are durable.
        let cert_path = self.dir.join("certs").join(format!("{}.pem", entry.serial));
        store::write_atomic(&cert_path, signed.pem().as_bytes(), 0o644, &mut self.faults)?;
        let serial_hex = entry.serial.clone();
        self.commit(|s| {
            if let Some(tok) = token.and_then(|t| s.tokens.get_mut(t)) {
                tok.used_by = Some(serial_hex);
            }
            s.certificates.push(entry.clone());
            Ok(())
        })?;
        tracing::info!(serial = %entry.serial, node = %info.id, role = ?entry.role, "certificate issued");
        Ok(Issued {
            certificate,
            record: entry,
        })
    }

    /// A random serial not in the index nor in `certs/` (positive, no leading zero byte).
    fn fresh_serial(&self) -> Vec<u8> {
        loop {
            let candidate = pki::random_serial();
            let bytes = candidate.to_bytes();
            let hexed = hex(&bytes);
            let used = self.state.certificates.iter().any(|c| c.serial == hexed)
                || self.dir.join("certs").join(format!("{hexed}.pem")).exists();
            if !used {
                return bytes;
            }
        }
    }

    /// Revokes a certificate.
    ///
    /// # Errors
    /// [`TrustCenterError::UnknownCertificate`], [`TrustCenterError::AlreadyRevoked`]; I/O errors.
    pub fn revoke(
        &mut self,
        target: &RevokeTarget,
        reason: Reason,
    ) -> Result<IssuedRecord, TrustCenterError> {
        self.locked(|tc| tc.revoke_locked(target, reason))
    }

    fn revoke_locked(
        &mut self,
        target: &RevokeTarget,
        reason: Reason,
    ) -> Result<IssuedRecord, TrustCenterError> {
        let (mut serial, mut node) = match target {
            RevokeTarget::Serial(s) => (
                Some(
                    normalize_serial(s)
                        .ok_or_else(|| TrustCenterError::Invalid(format!("serial {s:?}")))?,
                ),
                None,
            ),
            RevokeTarget::NodeId(id) => (None, Some(id.to_hex())),
        };
        let at = self.clock.unix();
        // A compromised key is compromised in every certificate it has (a renewal keeps the
        // key): revoking one of them for key compromise revokes them all.
        if reason == Reason::KeyCompromise
            && let Some(s) = &serial
            && let Some(c) = self.state.certificates.iter().find(|c| c.serial == *s)
        {
            if c.revoked.is_some() {
                return Err(TrustCenterError::AlreadyRevoked(s.clone()));
            }
            node = Some(c.node_id.clone());
            serial = None;
        }
        let what = serial.clone().or(node.clone()).unwrap_or_default();
        self.commit(|s| {
            let mut matching: Vec<&mut IssuedRecord> = s
                .certificates
                .iter_mut()
                .filter(|c| {
                    serial.as_ref().is_none_or(|x| *x == c.serial)
                        && node.as_ref().is_none_or(|x| *x == c.node_id)
                })
                .collect();
            if matching.is_empty() {
                return Err(TrustCenterError::UnknownCertificate(what.clone()));
            }
            // By node id: every certificate of that key (the replicated state bans the key,
            // so its other certificates must not stay valid in TLS).
            let mut first = None;
            for entry in matching.iter_mut().filter(|c| c.revoked.is_none()) {
                entry.revoked = Some(Revocation { at, reason });
                first.get_or_insert_with(|| entry.clone());
            }
            first.ok_or_else(|| TrustCenterError::AlreadyRevoked(what.clone()))
        })
    }

    /// Revokes the certificate in `cert` (PEM or DER file contents).
    ///
    /// # Errors
    /// As [`TrustCenter::revoke`], or [`TrustCenterError::Invalid`] if it does not parse.
    pub fn revoke_certificate(
        &mut self,
        cert: &[u8],
        reason: Reason,
    ) -> Result<IssuedRecord, TrustCenterError> {
        let der = CertificateDer::from_pem_slice(cert)
            .unwrap_or_else(|_| CertificateDer::from(cert.to_vec()));
        let info = CertInfo::parse(&der).map_err(|e| TrustCenterError::Invalid(e.to_string()))?;
        self.revoke(&RevokeTarget::Serial(hex(&info.serial)), reason)
    }

    /// Makes the trust center issue and judge by `clock` from now on (a test's simulated
    /// time; the default is the system clock).
    pub fn set_clock(&mut self, clock: Clock) {
        self.clock = clock;
    }

    /// Issues a new CRL (the CRL number is advanced durably first), valid for `validity`.
    ///
    /// # Errors
    /// I/O and generation errors.
    pub fn crl(
        &mut self,
        validity: Duration,
    ) -> Result<CertificateRevocationListDer<'static>, TrustCenterError> {
        self.crl_at(validity, self.clock.now().into())
    }

    /// [`TrustCenter::crl`] issued at `at` (its thisUpdate) instead of now: for a trust center
    /// run on a clock of its own, and tests of lifetimes.
    ///
    /// # Errors
    /// As [`TrustCenter::crl`].
    pub fn crl_at(
        &mut self,
        validity: Duration,
        at: std::time::SystemTime,
    ) -> Result<CertificateRevocationListDer<'static>, TrustCenterError> {
        let at = OffsetDateTime::from(at);
        self.locked(|tc| tc.crl_locked(validity, at))
    }

    fn crl_locked(
        &mut self,
        validity: Duration,
        at: OffsetDateTime,
    ) -> Result<CertificateRevocationListDer<'static>, TrustCenterError> {
        let number = self.commit(|s| {
            s.crl_number += 1;
            Ok(s.crl_number)
        })?;
        let mut revoked = Vec::new();
        for c in &self.state.certificates {
            if let Some(r) = &c.revoked {
                let serial = unhex(&c.serial)
                    .ok_or_else(|| TrustCenterError::State(format!("serial {}", c.serial)))?;
                revoked.push(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&serial),
                    revocation_time: OffsetDateTime::from_unix_timestamp(r.at).map_err(pki_err)?,
                    reason_code: Some(r.reason.crl_reason()),
                    invalidity_date: None,
                });
            }
        }
        let validity = time::Duration::try_from(validity).map_err(pki_err)?;
        let params = pki::crl_params(number, at, validity, revoked);
        let crl = params.signed_by(&self.issuer).map_err(pki_err)?;
        Ok(crl.der().clone())
    }

    /// An ephemeral certificate and key for the CA's own enrollment endpoint (serverAuth only,
    /// no role, so no plane accepts it), valid for `validity`. Not recorded in the index: it
    /// lives in memory for one run of `ca serve` and authorizes nothing but that service.
    ///
    /// # Errors
    /// Generation errors, or a name that is not a valid SAN.
    pub fn service_certificate(
        &self,
        names: &[String],
        validity: Duration,
    ) -> Result<(CertificateDer<'static>, Zeroizing<Vec<u8>>), TrustCenterError> {
        let (key, der) = pki::generate_ed25519().map_err(pki_err)?;
        let now = self.clock.now();
        let profile = NodeProfile {
            common_name: "securesmart enrollment".into(),
            sans: names.iter().map(|n| san_of(n)).collect(),
            role: None,
            not_before: now - time::Duration::MINUTE,
            not_after: now + time::Duration::try_from(validity).map_err(pki_err)?,
            serial: pki::random_serial(),
        };
        let cert = pki::node_params(&profile)
            .and_then(|p| Ok(p.signed_by(&key, &self.issuer)?))
            .map_err(pki_err)?;
        Ok((cert.der().clone(), der))
    }

    #[cfg(test)]
    pub(crate) fn inject(&mut self, faults: Faults) {
        self.faults = faults;
    }
}

/// The admission policy on a CSR, without the token bookkeeping (pure, fuzzed): the signature
/// verifies, the key is Ed25519, no CA rights are asked for, and every name is in `allowed`. A
/// CSR without names gets all of `allowed` (the node need not know them: `securesmart enroll`
/// sends none). Returns the key to certify and the names.
///
/// # Errors
/// The [`EnrollmentRefusal`] that applies first.
pub fn check_csr(
    csr: &CertificateSigningRequestDer<'_>,
    allowed: &[String],
) -> Result<(rcgen::PublicKey, Vec<SanName>), EnrollmentRefusal> {
    let request = CertificateSigningRequestParams::from_der(csr)
        .map_err(|e| EnrollmentRefusal::CsrInvalid(e.to_string()))?;
    if request.public_key.algorithm() != &PKCS_ED25519 {
        return Err(EnrollmentRefusal::KeyNotEd25519);
    }
    let asks_ca = matches!(request.params.is_ca, rcgen::IsCa::Ca(_))
        || request.params.key_usages.iter().any(|k| {
            matches!(
                k,
                rcgen::KeyUsagePurpose::KeyCertSign | rcgen::KeyUsagePurpose::CrlSign
            )
        });
    if asks_ca {
        return Err(EnrollmentRefusal::AsksForCa);
    }
    let mut sans = Vec::new();
    for san in &request.params.subject_alt_names {
        let name = match san {
            rcgen::SanType::DnsName(d) => SanName::Dns(d.as_str().to_owned()),
            rcgen::SanType::IpAddress(ip) => SanName::Ip(*ip),
            _ => return Err(EnrollmentRefusal::UnsupportedSan),
        };
        if !allowed.iter().any(|a| allows(a, &name)) {
            return Err(EnrollmentRefusal::NameNotAllowed(name.to_string()));
        }
        sans.push(name);
    }
    if sans.is_empty() {
        sans = allowed.iter().map(|a| san_of(a)).collect();
    }
    if sans.is_empty() {
        return Err(EnrollmentRefusal::NoNames);
    }
    Ok((request.public_key, sans))
}

/// A token name as a SAN: an IP if it parses as one, a DNS name otherwise.
fn san_of(name: &str) -> SanName {
    name.parse::<IpAddr>()
        .map_or_else(|_| SanName::Dns(name.to_owned()), SanName::Ip)
}

/// Whether the token entry `allowed` covers `name` (exact DNS name or IP).
fn allows(allowed: &str, name: &SanName) -> bool {
    match name {
        SanName::Dns(d) => allowed.eq_ignore_ascii_case(d),
        SanName::Ip(ip) => allowed.parse::<IpAddr>().is_ok_and(|a| a == *ip),
    }
}

/// Makes a fresh Ed25519 key and a CSR naming `names` (DNS names or IPs): what `securesmart
/// keygen` writes. Returns the key (PKCS#8 PEM) and the CSR (PEM).
///
/// # Errors
/// [`TrustCenterError::Pki`] if a name is invalid or generation fails.
pub fn key_and_csr(names: &[String]) -> Result<(Zeroizing<String>, String), TrustCenterError> {
    let (key, _) = pki::generate_ed25519().map_err(pki_err)?;
    let params = rcgen::CertificateParams::new(names.to_vec()).map_err(pki_err)?;
    let csr = params.serialize_request(&key).map_err(pki_err)?;
    Ok((
        Zeroizing::new(key.serialize_pem()),
        csr.pem().map_err(pki_err)?,
    ))
}

/// A CSR (PEM) naming `names` for an existing key (PKCS#8 PEM), to renew its certificate
/// ([`TrustCenter::renew`]).
///
/// # Errors
/// [`TrustCenterError::Pki`] if the key does not parse or the CSR cannot be made.
pub fn csr_for_key(key_pem: &str, names: &[String]) -> Result<String, TrustCenterError> {
    let key = KeyPair::from_pem(key_pem).map_err(pki_err)?;
    let params = rcgen::CertificateParams::new(names.to_vec()).map_err(pki_err)?;
    params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(pki_err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;
    use std::collections::BTreeMap;
    use x509_parser::prelude::FromDer;

    struct TempDir(PathBuf);
    impl TempDir {
        fn new(tag: &str) -> Self {
            let p =
                std::env::temp_dir().join(format!("ss-tc-{tag}-{:016x}", rand::random::<u64>()));
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Every file under the CA directory with its contents.
    fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
        let mut out = BTreeMap::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.insert(p.clone(), std::fs::read(&p).unwrap());
                }
            }
        }
        out
    }

    fn csr_der(pem: &str) -> CertificateSigningRequestDer<'static> {
        CertificateSigningRequestDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    fn csr_with(
        f: impl FnOnce(&mut rcgen::CertificateParams),
        alg: &'static rcgen::SignatureAlgorithm,
    ) -> CertificateSigningRequestDer<'static> {
        let key = KeyPair::generate_for(alg).unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["node1".to_string()]).unwrap();
        f(&mut params);
        params.serialize_request(&key).unwrap().der().clone()
    }

    const HOUR: Duration = Duration::from_secs(3600);

    /// The endpoint's cheap token check: made-up and malformed tokens are refused, a fresh one
    /// passes, and once used (by another handle, as `ca sign` in another process) it is seen
    /// as used from the changed state file.
    #[test]
    fn tokens_are_prechecked_without_the_lock() {
        let dir = std::env::temp_dir().join(format!("ss-precheck-{:016x}", rand::random::<u64>()));
        let mut ca = TrustCenter::init(&dir, "precheck CA").unwrap();
        let mut endpoint = TrustCenter::open(&dir).unwrap();
        assert_eq!(
            endpoint.precheck_token("not hex"),
            Err(EnrollmentRefusal::UnknownToken)
        );
        assert_eq!(
            endpoint.precheck_token(&"ab".repeat(32)),
            Err(EnrollmentRefusal::UnknownToken)
        );
        let names = ["n1".to_owned()];
        let token = ca
            .create_token(RoleName::Client, &names, Duration::from_secs(60))
            .unwrap();
        assert_eq!(endpoint.precheck_token(&token), Ok(()));
        let (_, csr) = key_and_csr(&names).unwrap();
        let csr = CertificateSigningRequestDer::from_pem_slice(csr.as_bytes()).unwrap();
        ca.sign_csr(&csr, &token).unwrap();
        assert_eq!(
            endpoint.precheck_token(&token),
            Err(EnrollmentRefusal::TokenUsed)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn every_refusal_has_its_reason_and_changes_nothing() {
        let dir = TempDir::new("refusals");
        let mut ca = TrustCenter::init(&dir.0, "ca").unwrap();
        // Even the very first operation, refused, adds nothing to a fresh directory.
        let fresh = snapshot(&dir.0);
        let (_k, csr) = key_and_csr(&["node1".into()]).unwrap();
        assert!(ca.sign_csr(&csr_der(&csr), "00").is_err());
        assert_eq!(snapshot(&dir.0), fresh);
        let names = vec!["node1".to_string(), "127.0.0.1".to_string()];
        let token = ca.create_token(RoleName::Replica, &names, HOUR).unwrap();
        let expired = ca
            .create_token(RoleName::Replica, &names, Duration::ZERO)
            .unwrap();
        let good = csr_with(|_| {}, &PKCS_ED25519);
        let cases: Vec<(
            &str,
            CertificateSigningRequestDer<'static>,
            &str,
            EnrollmentRefusal,
        )> = vec![
            (
                "unknown token",
                good.clone(),
                "00",
                EnrollmentRefusal::UnknownToken,
            ),
            (
                "malformed token",
                good.clone(),
                "not hex",
                EnrollmentRefusal::UnknownToken,
            ),
            (
                "expired token",
                good.clone(),
                &expired,
                EnrollmentRefusal::TokenExpired,
            ),
            (
                "garbage CSR",
                CertificateSigningRequestDer::from(vec![0x30, 0x02, 0x05, 0x00]),
                &token,
                EnrollmentRefusal::CsrInvalid(String::new()),
            ),
            (
                "ECDSA key",
                csr_with(|_| {}, &rcgen::PKCS_ECDSA_P256_SHA256),
                &token,
                EnrollmentRefusal::KeyNotEd25519,
            ),
            (
                "CA rights",
                csr_with(
                    |p| p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained),
                    &PKCS_ED25519,
                ),
                &token,
                EnrollmentRefusal::AsksForCa,
            ),
            (
                "cert signing",
                csr_with(
                    |p| p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign],
                    &PKCS_ED25519,
                ),
                &token,
                EnrollmentRefusal::AsksForCa,
            ),
            (
                "other name",
                csr_with(
                    |p| {
                        p.subject_alt_names =
                            vec![rcgen::SanType::DnsName("evil".try_into().unwrap())]
                    },
                    &PKCS_ED25519,
                ),
                &token,
                EnrollmentRefusal::NameNotAllowed("evil".into()),
            ),
            (
                "other IP",
                csr_with(
                    |p| {
                        p.subject_alt_names =
                            vec![rcgen::SanType::IpAddress("10.0.0.1".parse().unwrap())]
                    },
                    &PKCS_ED25519,
                ),
                &token,
                EnrollmentRefusal::NameNotAllowed("10.0.0.1".into()),
            ),
            (
                "role URI",
                csr_with(
                    |p| {
                        p.subject_alt_names.push(rcgen::SanType::URI(
                            securesmart_transport::ROLE_URI_REPLICA.try_into().unwrap(),
                        ))
                    },
                    &PKCS_ED25519,
                ),
                &token,
                EnrollmentRefusal::UnsupportedSan,
            ),
        ];
        let before = snapshot(&dir.0);
        for (what, csr, tok, expected) in cases {
            match ca.sign_csr(&csr, tok) {
                Err(TrustCenterError::Refused(r)) => match (&r, &expected) {
                    (EnrollmentRefusal::CsrInvalid(_), EnrollmentRefusal::CsrInvalid(_)) => {}
                    _ => assert_eq!(r, expected, "{what}"),
                },
                other => panic!("{what}: expected a refusal, got {other:?}"),
            }
            assert_eq!(snapshot(&dir.0), before, "{what}: the directory changed");
        }
        // A CSR without names is accepted and gets the token's names.
        let nameless = csr_with(|p| p.subject_alt_names.clear(), &PKCS_ED25519);
        let t2 = ca.create_token(RoleName::Client, &names, HOUR).unwrap();
        let issued = ca.sign_csr(&nameless, &t2).unwrap();
        assert_eq!(issued.record.names, names);
        // The accepted case, then the token is spent.
        let issued = ca.sign_csr(&good, &token).unwrap();
        assert_eq!(issued.record.role, RoleName::Replica);
        assert!(matches!(
            ca.sign_csr(&good, &token),
            Err(TrustCenterError::Refused(EnrollmentRefusal::TokenUsed))
        ));
        let info = CertInfo::parse(&issued.certificate).unwrap();
        assert_eq!(info.role, Role::Replica);
        assert_eq!(info.id.to_hex(), issued.record.node_id);
        // The state survives a reopen.
        let reopened = TrustCenter::open(&dir.0).unwrap();
        assert_eq!(reopened.certificates(), ca.certificates());
    }

    #[test]
    fn a_crash_at_any_write_step_loses_no_certificate_and_reuses_no_token() {
        let (_key, csr_pem) = key_and_csr(&["node1".to_string()]).unwrap();
        let csr = csr_der(&csr_pem);
        // Signing does two atomic writes of four steps each.
        for step in 0..8 {
            let dir = TempDir::new("crash");
            let mut ca = TrustCenter::init(&dir.0, "ca").unwrap();
            let token = ca
                .create_token(RoleName::Client, &["node1".into()], HOUR)
                .unwrap();
            ca.inject(Faults::crash_at(step));
            assert!(ca.sign_csr(&csr, &token).is_err(), "step {step} crashes");
            drop(ca);
            let mut ca = TrustCenter::open(&dir.0).unwrap();
            let used = ca.state.tokens.iter().any(|t| t.used_by.is_some());
            // The index and the token move together: either both happened or neither.
            assert_eq!(used, !ca.certificates().is_empty(), "step {step}");
            for c in ca.certificates() {
                assert!(
                    dir.0
                        .join("certs")
                        .join(format!("{}.pem", c.serial))
                        .exists()
                );
            }
            let first_serials: Vec<String> =
                ca.certificates().iter().map(|c| c.serial.clone()).collect();
            let retry = ca.sign_csr(&csr, &token);
            assert_eq!(
                retry.is_ok(),
                !used,
                "step {step}: the token works iff it was not spent"
            );
            if let Ok(issued) = retry {
                assert!(!first_serials.contains(&issued.record.serial));
            }
            let leftovers = std::fs::read_dir(&dir.0)
                .unwrap()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
                .count();
            assert_eq!(leftovers, 0);
        }
    }

    #[test]
    fn two_handles_on_one_directory_do_not_lose_each_others_changes() {
        let dir = TempDir::new("two");
        let mut server = TrustCenter::init(&dir.0, "ca").unwrap();
        let mut admin = TrustCenter::open(&dir.0).unwrap();
        let t1 = admin
            .create_token(RoleName::Replica, &["a".into()], HOUR)
            .unwrap();
        let (_k, csr) = key_and_csr(&["a".into()]).unwrap();
        let first = server.sign_csr(&csr_der(&csr), &t1).unwrap();
        admin
            .revoke(
                &RevokeTarget::Serial(first.record.serial.clone()),
                Reason::KeyCompromise,
            )
            .unwrap();
        // The server's next change must not resurrect the revoked certificate.
        let t2 = admin
            .create_token(RoleName::Replica, &["b".into()], HOUR)
            .unwrap();
        let (_k, csr) = key_and_csr(&["b".into()]).unwrap();
        server.sign_csr(&csr_der(&csr), &t2).unwrap();
        let fresh = TrustCenter::open(&dir.0).unwrap();
        assert_eq!(fresh.certificates().len(), 2);
        assert!(fresh.certificates()[0].revoked.is_some());
    }

    /// A certificate is renewed under its own key's authority (the CSR's signature), with its
    /// role and a subset of its names; not for another key, not once revoked, not for a
    /// certificate we did not issue, and not for names it did not have.
    #[test]
    fn a_certificate_is_renewed_for_its_own_key_only() {
        let dir = TempDir::new("renew");
        let mut ca = TrustCenter::init(&dir.0, "ca").unwrap();
        let (key, _) = pki::generate_ed25519().unwrap();
        let csr_of = |key: &KeyPair, names: &[&str]| {
            let names = names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>();
            let params = rcgen::CertificateParams::new(names).unwrap();
            csr_der(&params.serialize_request(key).unwrap().pem().unwrap())
        };
        let token = ca
            .create_token(RoleName::Replica, &["a".into(), "b".into()], HOUR)
            .unwrap();
        let old = ca.sign_csr(&csr_of(&key, &["a", "b"]), &token).unwrap();
        let renewed = ca
            .renew(old.certificate.as_ref(), &csr_of(&key, &["a"]))
            .unwrap();
        assert_ne!(renewed.record.serial, old.record.serial);
        assert_eq!(
            renewed.record.node_id, old.record.node_id,
            "same key, same node"
        );
        assert_eq!(renewed.record.role, RoleName::Replica);
        assert_eq!(renewed.record.names, vec!["a".to_owned()]);
        let refused =
            |r: Result<Issued, TrustCenterError>| matches!(r, Err(TrustCenterError::Refused(_)));
        let (other_key, _) = pki::generate_ed25519().unwrap();
        assert!(refused(
            ca.renew(old.certificate.as_ref(), &csr_of(&other_key, &["a"]))
        ));
        assert!(refused(
            ca.renew(old.certificate.as_ref(), &csr_of(&key, &["c"]))
        ));
        let stranger = TempDir::new("renew-other");
        let mut other = TrustCenter::init(&stranger.0, "other").unwrap();
        let t = other
            .create_token(RoleName::Replica, &["a".into()], HOUR)
            .unwrap();
        let foreign = other.sign_csr(&csr_of(&key, &["a"]), &t).unwrap();
        assert!(refused(
            ca.renew(foreign.certificate.as_ref(), &csr_of(&key, &["a"]))
        ));
        ca.revoke(
            &RevokeTarget::Serial(renewed.record.serial.clone()),
            Reason::Superseded,
        )
        .unwrap();
        assert!(refused(
            ca.renew(renewed.certificate.as_ref(), &csr_of(&key, &["a"]))
        ));
    }

    /// Revoking by node id revokes every certificate of that key, and a key revoked for key
    /// compromise is never certified again (a fresh token does not help).
    #[test]
    fn a_compromised_key_loses_all_its_certificates_and_is_never_certified_again() {
        let dir = TempDir::new("compromised");
        let mut ca = TrustCenter::init(&dir.0, "ca").unwrap();
        let (key, _) = pki::generate_ed25519().unwrap();
        let csr_for = |name: &str| {
            let params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
            csr_der(&params.serialize_request(&key).unwrap().pem().unwrap())
        };
        let sign = |ca: &mut TrustCenter, name: &str| {
            let token = ca
                .create_token(RoleName::Replica, &[name.into()], HOUR)
                .unwrap();
            ca.sign_csr(&csr_for(name), &token)
        };
        let one = sign(&mut ca, "a").unwrap();
        let two = sign(&mut ca, "b").unwrap();
        let id = securesmart_transport::node_id(&one.certificate).unwrap();
        assert_eq!(
            id,
            securesmart_transport::node_id(&two.certificate).unwrap()
        );
        ca.revoke(&RevokeTarget::NodeId(id), Reason::KeyCompromise)
            .unwrap();
        assert!(
            ca.certificates().iter().all(|c| c.revoked.is_some()),
            "both"
        );
        assert!(matches!(
            ca.revoke(&RevokeTarget::NodeId(id), Reason::KeyCompromise),
            Err(TrustCenterError::AlreadyRevoked(_))
        ));
        assert!(matches!(
            sign(&mut ca, "c"),
            Err(TrustCenterError::Refused(EnrollmentRefusal::KeyCompromised))
        ));
        // Revoking one certificate (by serial) for key compromise revokes the key's others.
        let (key2, _) = pki::generate_ed25519().unwrap();
        let sign2 = |ca: &mut TrustCenter, name: &str| {
            let token = ca
                .create_token(RoleName::Replica, &[name.into()], HOUR)
                .unwrap();
            let params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
            let csr = csr_der(&params.serialize_request(&key2).unwrap().pem().unwrap());
            ca.sign_csr(&csr, &token).unwrap()
        };
        let first = sign2(&mut ca, "d");
        let _second = sign2(&mut ca, "e");
        ca.revoke(
            &RevokeTarget::Serial(first.record.serial),
            Reason::KeyCompromise,
        )
        .unwrap();
        assert!(
            ca.certificates().iter().all(|c| c.revoked.is_some()),
            "all of key2's"
        );
    }

    /// Two `init`s racing on one directory: exactly one makes the CA, the other is refused
    /// (the check and the writes are under the directory's lock).
    #[test]
    fn racing_inits_make_one_ca() {
        for round in 0..8 {
            let dir = TempDir::new(&format!("race{round}"));
            let results: Vec<bool> = std::thread::scope(|s| {
                let a = s.spawn(|| TrustCenter::init(&dir.0, "a").is_ok());
                let b = s.spawn(|| TrustCenter::init(&dir.0, "b").is_ok());
                vec![a.join().unwrap(), b.join().unwrap()]
            });
            assert_eq!(results.iter().filter(|ok| **ok).count(), 1, "{results:?}");
            assert!(TrustCenter::open(&dir.0).is_ok());
        }
    }

    /// An unused token can be withdrawn (it then enrolls nothing), a used one cannot, and
    /// tokens that expired unused are pruned.
    #[test]
    fn unused_tokens_can_be_withdrawn_and_expired_ones_are_pruned() {
        let dir = TempDir::new("tokens");
        let mut ca = TrustCenter::init(&dir.0, "ca").unwrap();
        let names = ["a".to_owned()];
        let token = ca.create_token(RoleName::Client, &names, HOUR).unwrap();
        ca.revoke_token(&token).unwrap();
        let (_k, csr) = key_and_csr(&names).unwrap();
        assert!(matches!(
            ca.sign_csr(&csr_der(&csr), &token),
            Err(TrustCenterError::Refused(EnrollmentRefusal::UnknownToken))
        ));
        let used = ca.create_token(RoleName::Client, &names, HOUR).unwrap();
        ca.sign_csr(&csr_der(&csr), &used).unwrap();
        assert!(matches!(
            ca.revoke_token(&used),
            Err(TrustCenterError::Refused(EnrollmentRefusal::TokenUsed))
        ));
        // An unused token that expired more than a day ago goes at the next change.
        ca.create_token(RoleName::Client, &names, HOUR).unwrap();
        ca.commit(|s| {
            if let Some(t) = s.tokens.last_mut() {
                t.expires_at =
                    OffsetDateTime::now_utc().unix_timestamp() - TOKEN_KEPT_AFTER_EXPIRY - 1;
            }
            Ok(())
        })
        .unwrap();
        let before = ca.state.tokens.len();
        ca.create_token(RoleName::Client, &names, HOUR).unwrap();
        assert_eq!(ca.state.tokens.len(), before, "one pruned, one added");
        assert!(
            ca.state.tokens.iter().any(|t| t.used_by.is_some()),
            "used kept"
        );
    }

    #[test]
    fn revocation_and_crl_numbers() {
        let dir = TempDir::new("revoke");
        let mut ca = TrustCenter::init(&dir.0, "ca").unwrap();
        let mut issued = Vec::new();
        for name in ["a", "b"] {
            let token = ca
                .create_token(RoleName::Replica, &[name.into()], HOUR)
                .unwrap();
            let (_k, csr) = key_and_csr(&[name.into()]).unwrap();
            issued.push(ca.sign_csr(&csr_der(&csr), &token).unwrap());
        }
        let by_id = securesmart_transport::node_id(&issued[1].certificate).unwrap();
        ca.revoke(&RevokeTarget::NodeId(by_id), Reason::KeyCompromise)
            .unwrap();
        assert!(matches!(
            ca.revoke(
                &RevokeTarget::Serial(issued[1].record.serial.clone()),
                Reason::Superseded
            ),
            Err(TrustCenterError::AlreadyRevoked(_))
        ));
        assert!(matches!(
            ca.revoke(&RevokeTarget::Serial("abcd".into()), Reason::Superseded),
            Err(TrustCenterError::UnknownCertificate(_))
        ));
        let crl1 = ca.crl(DEFAULT_CRL_VALIDITY).unwrap();
        let crl2 = ca.crl(DEFAULT_CRL_VALIDITY).unwrap();
        let parse = |c: &CertificateRevocationListDer<'_>| {
            let (_, crl) =
                x509_parser::revocation_list::CertificateRevocationList::from_der(c.as_ref())
                    .unwrap();
            let revoked: Vec<String> = crl
                .iter_revoked_certificates()
                .map(|r| hex(r.raw_serial()))
                .collect();
            (crl.crl_number().cloned(), revoked)
        };
        let (n1, r1) = parse(&crl1);
        let (n2, _) = parse(&crl2);
        assert!(n2 > n1, "CRL numbers grow");
        assert_eq!(r1, vec![issued[1].record.serial.clone()]);
        assert_eq!(TrustCenter::open(&dir.0).unwrap().state.crl_number, 2);
    }

    #[test]
    fn openssl_and_stock_rustls_accept_what_we_issue() {
        let dir = TempDir::new("interop");
        let mut ca = TrustCenter::init(&dir.0, "interop CA").unwrap();
        let mut certs = Vec::new();
        for name in ["good", "bad"] {
            let token = ca
                .create_token(RoleName::Replica, &[name.into()], HOUR)
                .unwrap();
            let (key, csr) = key_and_csr(&[name.into()]).unwrap();
            let issued = ca.sign_csr(&csr_der(&csr), &token).unwrap();
            std::fs::write(dir.0.join(format!("{name}.pem")), issued.pem()).unwrap();
            std::fs::write(dir.0.join(format!("{name}.key")), key.as_bytes()).unwrap();
            certs.push(issued);
        }
        ca.revoke(
            &RevokeTarget::Serial(certs[1].record.serial.clone()),
            Reason::KeyCompromise,
        )
        .unwrap();
        let crl = ca.crl(DEFAULT_CRL_VALIDITY).unwrap();
        std::fs::write(
            dir.0.join("crl.pem"),
            pki::pem_encode("X509 CRL", crl.as_ref()),
        )
        .unwrap();

        let openssl = |args: &[&str]| {
            std::process::Command::new("openssl")
                .args(args)
                .current_dir(&dir.0)
                .output()
                .expect("openssl is installed (.ci/run installs it)")
        };
        let verify = |cert: &str| {
            openssl(&[
                "verify",
                "-CAfile",
                "ca.pem",
                "-crl_check",
                "-CRLfile",
                "crl.pem",
                cert,
            ])
        };
        let good = verify("good.pem");
        assert!(
            good.status.success(),
            "{}",
            String::from_utf8_lossy(&good.stderr)
        );
        let bad = verify("bad.pem");
        assert!(!bad.status.success());
        assert!(
            String::from_utf8_lossy(&bad.stdout).contains("revoked")
                || String::from_utf8_lossy(&bad.stderr).contains("revoked")
        );
        for key in ["ca.key", "good.key"] {
            let out = openssl(&["pkey", "-in", key, "-noout"]);
            assert!(
                out.status.success(),
                "{key}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(dir.0.join("ca.key"))
                    .unwrap()
                    .permissions()
                    .mode()
                    & 0o777,
                0o600
            );
        }

        // Stock rustls verifiers with the CRL.
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.ca_certificate()).unwrap();
        let roots = std::sync::Arc::new(roots);
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let client_verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .with_crls(vec![crl.clone()])
        .build()
        .unwrap();
        let now = rustls::pki_types::UnixTime::now();
        assert!(
            client_verifier
                .verify_client_cert(&certs[0].certificate, &[], now)
                .is_ok()
        );
        assert!(
            client_verifier
                .verify_client_cert(&certs[1].certificate, &[], now)
                .is_err()
        );
        let server_verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider)
                .build()
                .unwrap();
        let name = rustls::pki_types::ServerName::try_from("good").unwrap();
        assert!(
            server_verifier
                .verify_server_cert(&certs[0].certificate, &[], &name, &[], now)
                .is_ok()
        );
    }
}
