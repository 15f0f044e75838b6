//! Durability: what a replica must remember across a crash, and a file journal that keeps it.
//!
//! With [`crate::replica::Config::durable`] set, the core emits [`Output::Persist`] records
//! *before* the outputs that depend on them, and the driver writes them to a [`Journal`] in
//! order. Records that [`Record::needs_sync`] are made durable ([`Journal::sync`]) before
//! anything after them is sent or handed to the application (write-ahead); the others are
//! written and become durable with the next sync. A crashed process loses nothing written
//! (the operating system holds it); a crashed machine loses the records after the last sync,
//! never one before a later survivor (the journal is append-only). So one sync lies on the
//! path of a batch, before the commit, instead of one per record:
//!
//! | record | durable before | so that after a restart |
//! |---|---|---|
//! | [`Record::ViewChange`] | the view change is sent | the replica never returns to a view it left |
//! | [`Record::EnteredView`] | prepares of the new view | it resumes in the view it was in, and knows where it may have voted |
//! | [`Record::PrePrepare`] | nothing: it rides on the next sync | it re-sends the same prepare (or pre-prepare) |
//! | [`Record::Prepared`] | its commit | its view changes carry the prepared certificate |
//! | [`Record::Committed`] | nothing: it rides on the next sync | the batch executes again from disk |
//! | [`Record::Stable`] | (it is its own sync, and replaces everything older) | recovery starts from the last stable checkpoint |
//!
//! A pre-prepare record lost with the machine hides a prepare (or, at the primary, a
//! pre-prepare) the replica sent. So a recovered replica votes no new pre-prepare or prepare
//! in the last view it entered, nor before: it still re-sends the votes its records show,
//! commits what the others prepared, executes, and takes part in the next view change
//! ([`crate::replica::Replica::recover`]). A lost committed record costs nothing either: the
//! prepared certificate is on disk, and the replica commits the batch again once the others'
//! commits for it arrive, or fetches the state.
//!
//! A whole cluster that restarts therefore loses no acknowledged write: a batch executes
//! only after 2f+1 commits, each sent after its replica's prepared certificate was on disk,
//! and those certificates carry every committed batch through the view change that follows.
//! A fresh journal ([`FileJournal::resumed`] false) belongs to a replica that never ran: it
//! starts with [`crate::replica::Replica::new`] (a directory removed by hand makes a replica
//! that forgot its votes: it counts as one of the f faulty ones). A journal whose replica last
//! entered a view in this boot of the machine, or that was created in it, and saw no failed
//! write or sync ([`FileJournal::intact`]) lost nothing: its replica votes on at once
//! ([`crate::replica::Replica::recover_intact`]).
//!
//! [`FileJournal`] keeps the records in one segment file per stable checkpoint in a directory:
//! each frame is `length u32 | checksum [16] | record`, the checksum a BLAKE3 `derive_key` hash
//! with the context [`FRAME_CONTEXT`] (integrity against torn writes and bit rot, not
//! authenticity: whoever can write the data directory holds the node's key as well). When a
//! `Stable` record arrives the journal starts a new segment with that record, the records of
//! later slots and the latest view record, makes it durable (write to a temporary file, fsync,
//! rename, fsync the directory) and deletes the old segment, so the journal stays about one
//! window of batches and one snapshot long. Segments are zero-filled ahead of the records in
//! chunks of 256 KiB, so that the sync after an append writes data blocks only (no file size
//! or block map: about three times faster here). Opening a journal stops at the first frame
//! that is truncated or fails its checksum; zeros from there to the end are the preallocated
//! rest, anything else a crash during an append: it truncates the file there, counts it in
//! `securesmart_consensus_journal_truncated_total` and logs a warning.
//!
//! Request payloads are written as ordered: a payload the node sealed with the group key before
//! ordering (a confidential request) is sealed in the journal as well.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use securesmart_base::wire::{Reader, WireError, Writer};

use crate::message::{
    Certificate, Kind, Limits, Message, Seq, Signed, View, read_certs, read_list, write_certs,
    write_list,
};
#[cfg(doc)]
use crate::replica::Output;

/// BLAKE3 `derive_key` context of the frame checksum.
pub const FRAME_CONTEXT: &str = securesmart_base::tags::consensus::JOURNAL_FRAME;
/// Record format version. Version 2: state digests cover a snapshot's part digests, and the
/// consensus messages inside records are version 2.
const VERSION: u8 = 2;
/// Bytes of a frame's checksum.
const CHECKSUM_BYTES: usize = 16;
/// Bytes before a frame's record.
const FRAME_HEADER: usize = 4 + CHECKSUM_BYTES;
/// Segments grow by zero-filled chunks of this many bytes, written ahead of the records: an
/// `fdatasync` after an append then writes data blocks only, no file size or block map
/// (about 0.1 ms instead of 0.3 ms per sync here).
const PREALLOCATE: u64 = 256 * 1024;

securesmart_base::wire_tags! {
    /// The kind of a [`Record`]: its tag on the wire, the one table that encoding and
    /// decoding share.
    pub enum RecordKind: "journal record" {
        /// [`Record::ViewChange`].
        ViewChange = 1,
        /// [`Record::EnteredView`].
        EnteredView = 2,
        /// [`Record::PrePrepare`].
        PrePrepare = 3,
        /// [`Record::Prepared`].
        Prepared = 4,
        /// [`Record::Committed`].
        Committed = 5,
        /// [`Record::Stable`].
        Stable = 6,
    }
}

/// Something a replica must remember across a crash (see the module doc).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Record {
    /// The replica started changing to this view.
    ViewChange(View),
    /// The replica entered this view.
    EnteredView(View),
    /// A pre-prepare the replica accepted (or, as primary, sent).
    PrePrepare(Signed),
    /// A prepared certificate (pre-prepare and 2f matching prepares).
    Prepared(Certificate),
    /// A committed certificate (pre-prepare and 2f+1 matching commits).
    Committed(Certificate),
    /// A stable checkpoint: its certificate and this replica's snapshot at it.
    Stable {
        /// 2f+1 matching signed checkpoint messages.
        checkpoint: Vec<Signed>,
        /// The snapshot (core state and application state) the certificate's digest covers.
        snapshot: Bytes,
    },
}

impl Record {
    /// The sequence number of a slot record (pre-prepare, prepared, committed) or checkpoint.
    pub fn seq(&self) -> Option<Seq> {
        match self {
            Record::PrePrepare(s) => s.message.seq(),
            Record::Prepared(c) | Record::Committed(c) => c.proposal.message.seq(),
            Record::Stable { checkpoint, .. } => checkpoint.first().and_then(|s| s.message.seq()),
            Record::ViewChange(_) | Record::EnteredView(_) => None,
        }
    }

    /// Whether outputs after this record wait until it is durable (view records, prepared
    /// certificates and stable checkpoints); pre-prepares and committed certificates become
    /// durable with the next sync (see the module doc).
    pub fn needs_sync(&self) -> bool {
        !matches!(self, Record::PrePrepare(_) | Record::Committed(_))
    }

    /// The record's kind (its tag on the wire).
    pub fn kind(&self) -> RecordKind {
        match self {
            Record::ViewChange(_) => RecordKind::ViewChange,
            Record::EnteredView(_) => RecordKind::EnteredView,
            Record::PrePrepare(_) => RecordKind::PrePrepare,
            Record::Prepared(_) => RecordKind::Prepared,
            Record::Committed(_) => RecordKind::Committed,
            Record::Stable { .. } => RecordKind::Stable,
        }
    }

    /// Encodes the record.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(VERSION).u8(self.kind().tag());
        match self {
            Record::ViewChange(v) | Record::EnteredView(v) => {
                w.raw(&v.to_be_bytes());
            }
            Record::PrePrepare(s) => {
                w.bytes(&s.encode());
            }
            Record::Prepared(c) | Record::Committed(c) => {
                write_certs(&mut w, std::slice::from_ref(c));
            }
            Record::Stable {
                checkpoint,
                snapshot,
            } => {
                write_list(&mut w, checkpoint);
                w.bytes(snapshot);
            }
        }
        w.buf
    }

    /// Decodes a record within `limits`; the whole input must be one record.
    ///
    /// # Errors
    /// [`WireError`] saying what is wrong.
    pub fn decode(buf: &[u8], limits: &Limits) -> Result<Self, WireError> {
        let mut r = Reader::new(buf);
        r.version(VERSION)?;
        let kind = RecordKind::from_tag(r.u8()?)?;
        let record = match kind {
            RecordKind::ViewChange => Record::ViewChange(u64::from_be_bytes(r.array()?)),
            RecordKind::EnteredView => Record::EnteredView(u64::from_be_bytes(r.array()?)),
            RecordKind::PrePrepare => {
                let s = Signed::decode(r.bytes("pre-prepare", usize::MAX)?, limits)?;
                if !matches!(s.message, Message::PrePrepare { .. }) {
                    return Err(WireError::Unknown {
                        what: "journal pre-prepare kind",
                        value: 0,
                    });
                }
                Record::PrePrepare(s)
            }
            RecordKind::Prepared | RecordKind::Committed => {
                let prepared = kind == RecordKind::Prepared;
                let vote = if prepared {
                    Kind::Prepare
                } else {
                    Kind::Commit
                };
                let mut certs = read_certs(&mut r, limits, &[vote])?;
                match (certs.pop(), certs.is_empty()) {
                    (Some(c), true) if prepared => Record::Prepared(c),
                    (Some(c), true) => Record::Committed(c),
                    _ => {
                        return Err(WireError::Unknown {
                            what: "journal certificate count",
                            value: 0,
                        });
                    }
                }
            }
            RecordKind::Stable => {
                let checkpoint = read_list(&mut r, limits, &[Kind::Checkpoint])?;
                let snapshot =
                    Bytes::copy_from_slice(r.bytes("snapshot", limits.max_snapshot_bytes)?);
                Record::Stable {
                    checkpoint,
                    snapshot,
                }
            }
        };
        r.finish()?;
        Ok(record)
    }
}

/// Where a replica's records go. The driver calls [`Journal::append`] for every record and
/// [`Journal::sync`] before any output that depends on one.
pub trait Journal: Send + 'static {
    /// Appends a record (it need not be durable before [`Journal::sync`]).
    ///
    /// # Errors
    /// [`JournalError`]; the driver then stops (a replica that cannot remember must not vote).
    fn append(&mut self, record: &Record) -> Result<(), JournalError>;

    /// Makes every appended record durable.
    ///
    /// # Errors
    /// [`JournalError`], as for `append`.
    fn sync(&mut self) -> Result<(), JournalError>;
}

/// A journal failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JournalError {
    /// A file operation failed.
    #[error("journal {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The journal was written by another version of this software: its records cannot be
    /// read. Removing the directory starts the replica empty (it fetches the state), but a
    /// replica that forgot its votes counts as one of the f faulty ones until the cluster has
    /// left the views it voted in: better run the version that wrote it.
    #[error("journal {path} holds records of format version {found}, this build reads {VERSION}")]
    Version {
        /// The segment.
        path: PathBuf,
        /// The version found.
        found: u8,
    },
    /// A record is whole and its checksum holds, but it does not decode (a limit lowered since
    /// it was written, or a bug): refused rather than cut off with everything after it.
    #[error("journal {path}: an intact record does not decode: {error}")]
    Unreadable {
        /// The segment.
        path: PathBuf,
        /// Why.
        error: WireError,
    },
}

/// Records in memory (the simulator's "disk", and tests).
#[derive(Clone, Debug, Default)]
pub struct MemoryJournal {
    /// The records appended, in order.
    pub records: Vec<Record>,
}

impl Journal for MemoryJournal {
    fn append(&mut self, record: &Record) -> Result<(), JournalError> {
        self.records.push(record.clone());
        Ok(())
    }

    fn sync(&mut self) -> Result<(), JournalError> {
        Ok(())
    }
}

/// The records of one directory, as segment files (see the module doc).
#[derive(Debug)]
pub struct FileJournal {
    dir: PathBuf,
    segment: u64,
    file: File,
    /// End of the records in the segment (where the next frame goes).
    len: u64,
    /// Bytes of the segment file, zero-filled past `len` (see [`PREALLOCATE`]).
    allocated: u64,
    dirty: bool,
    /// The directory held a journal when opened.
    resumed: bool,
    /// See [`FileJournal::intact`].
    intact: bool,
    /// This boot's id, and whether [`BOOT_FILE`] holds it.
    boot: Option<String>,
    boot_recorded: bool,
    /// Encoded records of slots above the last stable checkpoint, by sequence number.
    carry: BTreeMap<Seq, Vec<Vec<u8>>>,
    /// The latest view record, encoded.
    view: Option<Vec<u8>>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> JournalError + '_ {
    move |source| JournalError::Io {
        path: path.to_owned(),
        source,
    }
}

fn checksum(record: &[u8]) -> [u8; CHECKSUM_BYTES] {
    let hash = blake3::Hasher::new_derive_key(FRAME_CONTEXT)
        .update(record)
        .finalize();
    let mut out = [0; CHECKSUM_BYTES];
    out.copy_from_slice(hash.as_bytes().get(..CHECKSUM_BYTES).unwrap_or(&[0; 16]));
    out
}

fn frame(record: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME_HEADER + record.len());
    out.extend_from_slice(
        &u32::try_from(record.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    out.extend_from_slice(&checksum(record));
    out.extend_from_slice(record);
    out
}

/// Splits `buf` into records; returns them and the length of the valid prefix.
pub(crate) fn read_frames(buf: &[u8], limits: &Limits) -> (Vec<Record>, usize) {
    let mut records = Vec::new();
    let mut at = 0;
    while let Some(header) = buf.get(at..at + FRAME_HEADER) {
        let (len, sum) = header.split_at(4);
        let len = u32::from_be_bytes(len.try_into().unwrap_or([0xff; 4])) as usize;
        let start = at + FRAME_HEADER;
        let Some(body) = start.checked_add(len).and_then(|end| buf.get(start..end)) else {
            break;
        };
        if checksum(body) != sum {
            break;
        }
        match Record::decode(body, limits) {
            Ok(r) => records.push(r),
            Err(_) => break,
        }
        at += FRAME_HEADER + len;
    }
    (records, at)
}

/// The record of the frame at `at`, if the frame is whole and its checksum holds (where
/// [`read_frames`] stopped: a record that is intact but unreadable, not torn).
fn intact_body(buf: &[u8], at: usize) -> Option<&[u8]> {
    let header = buf.get(at..at.checked_add(FRAME_HEADER)?)?;
    let (len, sum) = header.split_at(4);
    let len = u32::from_be_bytes(len.try_into().ok()?) as usize;
    let start = at + FRAME_HEADER;
    let body = buf.get(start..start.checked_add(len)?)?;
    // An empty record is never written: a zero-filled tail after a crash is torn, not intact.
    (!body.is_empty() && checksum(body) == sum).then_some(body)
}

fn segment_name(n: u64) -> String {
    format!("journal-{n:020}.log")
}

fn segment_number(name: &str) -> Option<u64> {
    name.strip_prefix("journal-")?
        .strip_suffix(".log")?
        .parse()
        .ok()
}

impl FileJournal {
    /// Opens (creating if needed) the journal in `dir` and returns it with the records it
    /// holds, for [`crate::replica::Replica::recover`].
    ///
    /// # Errors
    /// [`JournalError`] when the directory or a segment cannot be read or written.
    pub fn open(dir: &Path, limits: &Limits) -> Result<(Self, Vec<Record>), JournalError> {
        create_private_dir(dir)?;
        let mut segments: Vec<u64> = std::fs::read_dir(dir)
            .map_err(io(dir))?
            .filter_map(|e| e.ok())
            .filter_map(|e| segment_number(&e.file_name().to_string_lossy()))
            .collect();
        segments.sort_unstable();
        let current = segments.last().copied().unwrap_or(0);
        let path = dir.join(segment_name(current));
        let mut options = OpenOptions::new();
        options.read(true).write(true).create(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&path).map_err(io(&path))?;
        if segments.is_empty() {
            // A new journal: its first segment's name, and the directory's own, must survive
            // a crash too (else the replica would come back as one that never ran).
            sync_dir(dir)?;
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent)?;
            }
        }
        let mut buf = Vec::new();
        file.read_to_end(&mut buf).map_err(io(&path))?;
        let (records, valid) = read_frames(&buf, limits);
        if let Some(body) = intact_body(&buf, valid) {
            return Err(match body.first() {
                Some(&found) if found != VERSION => JournalError::Version { path, found },
                _ => JournalError::Unreadable {
                    path,
                    error: Record::decode(body, limits)
                        .err()
                        .unwrap_or(WireError::Invalid("record")),
                },
            });
        }
        // Zeros after the records are the preallocated rest of the segment; anything else
        // there is a torn or corrupt record.
        let torn = buf
            .get(valid..)
            .is_some_and(|tail| tail.iter().any(|b| *b != 0));
        let mut allocated = buf.len() as u64;
        if torn {
            allocated = valid as u64;
            metrics::counter!("securesmart_consensus_journal_truncated_total").increment(1);
            tracing::warn!(
                segment = %path.display(),
                dropped_bytes = buf.len() - valid,
                "journal ends in a torn or corrupt record; truncating it there"
            );
            file.set_len(valid as u64).map_err(io(&path))?;
            file.sync_all().map_err(io(&path))?;
        }
        // Which boot the replica last entered a view in (or created the journal in): if it is
        // this one, only the process stopped, and the operating system kept every write.
        let boot = current_boot();
        let stored = std::fs::read_to_string(dir.join(BOOT_FILE)).ok();
        let mut boot_recorded =
            boot.is_some() && stored.as_deref().map(str::trim) == boot.as_deref();
        let intact = !segments.is_empty() && boot_recorded;
        if segments.is_empty() && !boot_recorded {
            boot_recorded = record_boot(dir, boot.as_deref())?;
        }
        for old in segments.iter().filter(|n| **n < current) {
            let p = dir.join(segment_name(*old));
            std::fs::remove_file(&p).map_err(io(&p))?;
        }
        let mut journal = Self {
            dir: dir.to_owned(),
            segment: current,
            file,
            len: valid as u64,
            allocated,
            dirty: false,
            resumed: !segments.is_empty(),
            intact,
            boot,
            boot_recorded,
            carry: BTreeMap::new(),
            view: None,
        };
        for r in &records {
            journal.remember(r, r.encode());
        }
        Ok((journal, records))
    }

    /// Whether the directory held a journal when it was opened: the replica ran before, and may
    /// have sent votes that records lost with a crashed machine no longer show (recover it with
    /// [`crate::replica::Replica::recover`], even with no records; a fresh journal's replica
    /// starts with [`crate::replica::Replica::new`]).
    pub fn resumed(&self) -> bool {
        self.resumed
    }

    /// Whether nothing written to the journal was lost: it [`FileJournal::resumed`], and in
    /// this boot of the machine (Linux's boot id) the journal was created or its replica
    /// entered a view, and no write or sync failed since (a stopped process loses nothing the
    /// operating system holds; a crashed machine changes the boot id). Recover such a journal with
    /// [`crate::replica::Replica::recover_intact`]; any other that resumed with
    /// [`crate::replica::Replica::recover`].
    pub fn intact(&self) -> bool {
        self.intact
    }

    /// Keeps what the next segment must carry.
    fn remember(&mut self, record: &Record, encoded: Vec<u8>) {
        match record {
            Record::ViewChange(_) | Record::EnteredView(_) => self.view = Some(encoded),
            Record::Stable { .. } => {
                let seq = record.seq().unwrap_or(0);
                self.carry = self.carry.split_off(&(seq + 1));
            }
            _ => {
                if let Some(seq) = record.seq() {
                    self.carry.entry(seq).or_default().push(encoded);
                }
            }
        }
    }

    /// Starts a new segment with `stable` and what it must carry.
    fn rotate(&mut self, stable: Vec<u8>) -> Result<(), JournalError> {
        let next = self.segment + 1;
        let path = self.dir.join(segment_name(next));
        let tmp = self.dir.join(format!("{}.tmp", segment_name(next)));
        let mut out = frame(&stable);
        for r in self.carry.values().flatten() {
            out.extend_from_slice(&frame(r));
        }
        if let Some(v) = &self.view {
            out.extend_from_slice(&frame(v));
        }
        let len = out.len() as u64;
        let allocated = len + PREALLOCATE;
        {
            let mut f = private_file(&tmp)?;
            f.write_all(&out).map_err(io(&tmp))?;
            write_zeros(&mut f, PREALLOCATE).map_err(io(&tmp))?;
            f.sync_all().map_err(io(&tmp))?;
        }
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        sync_dir(&self.dir)?;
        let old = self.dir.join(segment_name(self.segment));
        std::fs::remove_file(&old).map_err(io(&old))?;
        self.file = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        self.len = len;
        self.allocated = allocated;
        self.segment = next;
        self.dirty = false;
        Ok(())
    }

    /// Writes `frame` at the end of the records; if it reaches past the zero-filled part, a
    /// new chunk of zeros follows it (the frame itself is not zero-filled first).
    fn write_frame(&mut self, frame: &[u8], path: &Path) -> Result<(), JournalError> {
        let end = self.len + frame.len() as u64;
        self.file
            .seek(SeekFrom::Start(self.len))
            .and_then(|_| self.file.write_all(frame))
            .map_err(io(path))?;
        if end > self.allocated {
            write_zeros(&mut self.file, PREALLOCATE).map_err(io(path))?;
            self.allocated = end + PREALLOCATE;
        }
        self.len = end;
        Ok(())
    }
}

/// Writes `n` zero bytes at the file's position.
fn write_zeros(file: &mut File, n: u64) -> std::io::Result<()> {
    static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
    let mut left = n;
    while left > 0 {
        let step = left.min(ZEROS.len() as u64);
        file.write_all(ZEROS.get(..step as usize).unwrap_or_default())?;
        left -= step;
    }
    Ok(())
}

impl FileJournal {
    /// After a failed write or sync the journal may have lost records while the machine runs
    /// on (a failed fsync may drop dirty pages): it must not count as intact at the next start.
    fn distrust<T>(&self, result: Result<T, JournalError>) -> Result<T, JournalError> {
        if result.is_err() {
            let _ = std::fs::remove_file(self.dir.join(BOOT_FILE));
            let _ = sync_dir(&self.dir);
        }
        result
    }

    fn append_record(&mut self, record: &Record) -> Result<(), JournalError> {
        let encoded = record.encode();
        if matches!(record, Record::Stable { .. }) {
            self.remember(record, Vec::new());
            return self.rotate(encoded);
        }
        let path = self.dir.join(segment_name(self.segment));
        self.write_frame(&frame(&encoded), &path)?;
        self.dirty = true;
        if matches!(record, Record::EnteredView(_)) && !self.boot_recorded {
            // The replica votes in this view from this boot on: a later stop of the process
            // alone loses nothing (see `FileJournal::intact`).
            self.boot_recorded = record_boot(&self.dir, self.boot.as_deref())?;
        }
        self.remember(record, encoded);
        Ok(())
    }

    fn sync_records(&mut self) -> Result<(), JournalError> {
        if self.dirty {
            let path = self.dir.join(segment_name(self.segment));
            self.file.sync_data().map_err(io(&path))?;
            self.dirty = false;
        }
        Ok(())
    }
}

impl Journal for FileJournal {
    fn append(&mut self, record: &Record) -> Result<(), JournalError> {
        let result = self.append_record(record);
        self.distrust(result)
    }

    fn sync(&mut self) -> Result<(), JournalError> {
        let result = self.sync_records();
        self.distrust(result)
    }
}

/// The file in a journal's directory naming the boot the replica last entered a view in.
pub const BOOT_FILE: &str = "boot-id";

/// This boot's id (Linux), if known.
fn current_boot() -> Option<String> {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let id = id.trim();
    (!id.is_empty()).then(|| id.to_owned())
}

/// Writes `boot` to [`BOOT_FILE`]; whether it did. It needs no sync: a crash of the machine
/// changes the boot id, so a lost or torn write can only make the journal count as not
/// intact.
fn record_boot(dir: &Path, boot: Option<&str>) -> Result<bool, JournalError> {
    let Some(boot) = boot else {
        return Ok(false);
    };
    let path = dir.join(BOOT_FILE);
    private_file(&path)?
        .write_all(boot.as_bytes())
        .map_err(io(&path))?;
    Ok(true)
}

fn create_private_dir(dir: &Path) -> Result<(), JournalError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(io(dir))
}

fn private_file(path: &Path) -> Result<File, JournalError> {
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path).map_err(io(path))
}

fn sync_dir(dir: &Path) -> Result<(), JournalError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Digest, Request, Signer, batch_digest};
    use securesmart_base::NodeId;

    fn signer(i: u8) -> Signer {
        Signer::named(&format!("r{i}"))
    }

    fn pre_prepare(seq: Seq) -> Signed {
        let batch = vec![Request {
            client: NodeId::from_bytes([9; 32]),
            number: seq,
            payload: Bytes::from(vec![seq as u8; 10]),
        }];
        signer(0).sign(Message::PrePrepare {
            view: 0,
            seq,
            digest: batch_digest(&batch),
            batch,
        })
    }

    /// The certificate of the pre-prepare at `seq`: three prepares or three commits.
    fn certificate(seq: Seq, prepares: bool) -> Certificate {
        let proposal = pre_prepare(seq);
        let digest = proposal.message.digest().unwrap_or(Digest([0; 32]));
        let vote = |i| {
            let (view, seq) = (0, seq);
            signer(i).sign(if prepares {
                Message::Prepare { view, seq, digest }
            } else {
                Message::Commit { view, seq, digest }
            })
        };
        Certificate {
            proposal,
            votes: (1..4).map(vote).collect(),
        }
    }

    fn committed(seq: Seq) -> Record {
        Record::Committed(certificate(seq, false))
    }

    fn prepared(seq: Seq) -> Record {
        Record::Prepared(certificate(seq, true))
    }

    fn stable(seq: Seq) -> Record {
        Record::Stable {
            checkpoint: (0..3)
                .map(|i| {
                    signer(i).sign(Message::Checkpoint {
                        seq,
                        state: Digest([seq as u8; 32]),
                    })
                })
                .collect(),
            snapshot: Bytes::from(vec![1, 2, 3]),
        }
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("journal-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn records_round_trip_and_garbage_is_an_error() {
        let limits = Limits::default();
        for r in [
            Record::ViewChange(3),
            Record::EnteredView(4),
            Record::PrePrepare(pre_prepare(5)),
            prepared(6),
            committed(6),
            stable(8),
        ] {
            let bytes = r.encode();
            // The kind's tag follows the version byte.
            assert_eq!(bytes.get(1), Some(&r.kind().tag()));
            assert_eq!(Record::decode(&bytes, &limits), Ok(r));
        }
        // The wire numbers of journals already on disk: pinned.
        let tags: Vec<u8> = RecordKind::ALL.iter().map(|k| k.tag()).collect();
        assert_eq!(tags, (1..=6).collect::<Vec<u8>>());
        // A prepared certificate is not read back as a committed one, nor the reverse.
        let mut swapped = prepared(6).encode();
        if let Some(tag) = swapped.get_mut(1) {
            *tag = RecordKind::Committed.tag();
        }
        assert!(Record::decode(&swapped, &limits).is_err());
        let mut bad = committed(1).encode();
        bad.push(0);
        assert!(Record::decode(&bad, &limits).is_err());
        assert!(Record::decode(&[VERSION, 77], &limits).is_err());
        assert!(Record::decode(&[], &limits).is_err());
    }

    #[test]
    fn a_reopened_journal_returns_what_was_synced_and_compacts_at_checkpoints() {
        let d = dir("reopen");
        let limits = Limits::default();
        let (mut j, records) = FileJournal::open(&d, &limits).unwrap();
        assert!(records.is_empty());
        for seq in 1..=6 {
            j.append(&committed(seq)).unwrap();
        }
        j.append(&Record::EnteredView(2)).unwrap();
        j.sync().unwrap();
        // A stable checkpoint at 4 drops the slots up to 4 and keeps 5, 6 and the view.
        j.append(&stable(4)).unwrap();
        j.append(&committed(7)).unwrap();
        j.sync().unwrap();
        drop(j);
        let (_, records) = FileJournal::open(&d, &limits).unwrap();
        let seqs: Vec<_> = records.iter().map(Record::seq).collect();
        assert_eq!(
            seqs,
            vec![Some(4), Some(5), Some(6), None, Some(7)],
            "{records:?}"
        );
        assert_eq!(records.get(3), Some(&Record::EnteredView(2)));
        let segments = std::fs::read_dir(&d)
            .unwrap()
            .filter(|e| {
                segment_number(&e.as_ref().unwrap().file_name().to_string_lossy()).is_some()
            })
            .count();
        assert_eq!(segments, 1, "the old segment is gone");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_journal_knows_whether_it_resumed_and_whether_the_machine_restarted_since() {
        let d = dir("boot");
        let limits = Limits::default();
        let open = || FileJournal::open(&d, &limits).unwrap().0;
        let j = open();
        assert!(!j.resumed() && !j.intact(), "fresh");
        drop(j);
        // On Linux the boot id tells a stopped process from a restarted machine; elsewhere a
        // journal is never known intact.
        let linux = current_boot().is_some();
        let j = open();
        assert!(j.resumed());
        assert_eq!(
            j.intact(),
            linux,
            "the process stopped, the machine did not"
        );
        drop(j);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(d.join(BOOT_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // Another boot: the journal stays suspect, restart after restart, until its replica
        // enters a view in this boot.
        std::fs::write(d.join(BOOT_FILE), "another boot").unwrap();
        let mut j = open();
        assert!(j.resumed() && !j.intact());
        j.append(&Record::PrePrepare(pre_prepare(1))).unwrap();
        j.append(&Record::ViewChange(1)).unwrap();
        drop(j);
        let mut j = open();
        assert!(!j.intact(), "no view entered in this boot yet");
        j.append(&Record::EnteredView(1)).unwrap();
        drop(j);
        assert_eq!(open().intact(), linux);
        // A write or sync that failed (the pages it dropped may be gone while the machine
        // runs on): the next start does not trust the journal.
        let j = open();
        let failed: Result<(), _> = Err(JournalError::Io {
            path: d.clone(),
            source: std::io::Error::other("injected"),
        });
        assert!(j.distrust(failed).is_err());
        drop(j);
        assert!(!open().intact(), "after a failed sync");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn the_zero_filled_rest_of_a_segment_is_no_torn_tail_and_grows_as_needed() {
        let d = dir("prealloc");
        let limits = Limits::default();
        let (mut j, _) = FileJournal::open(&d, &limits).unwrap();
        // Records past the first chunk: the segment grows by another one.
        let big = |n: u64| {
            Record::PrePrepare(signer(0).sign(Message::PrePrepare {
                view: 0,
                seq: n,
                digest: batch_digest(&[]),
                batch: vec![],
            }))
        };
        let mut written = vec![committed(1)];
        j.append(&committed(1)).unwrap();
        let mut bytes = frame(&committed(1).encode()).len() as u64;
        let mut n = 2;
        while bytes < PREALLOCATE + 1000 {
            let r = big(n);
            bytes += frame(&r.encode()).len() as u64;
            j.append(&r).unwrap();
            written.push(r);
            n += 1;
        }
        j.sync().unwrap();
        drop(j);
        let seg = d.join(segment_name(0));
        let size = std::fs::metadata(&seg).unwrap().len();
        assert!(size > bytes, "zero-filled ahead");
        let (mut j, records) = FileJournal::open(&d, &limits).unwrap();
        assert_eq!(records, written);
        // A torn tail would have been cut off at the records' end.
        assert_eq!(
            std::fs::metadata(&seg).unwrap().len(),
            size,
            "zeros are no torn record"
        );
        // Appends go after the records, into the zeros.
        j.append(&committed(99)).unwrap();
        j.sync().unwrap();
        drop(j);
        let (_, records) = FileJournal::open(&d, &limits).unwrap();
        assert_eq!(records.last(), Some(&committed(99)));
        assert_eq!(records.len(), written.len() + 1);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_torn_tail_is_cut_off_and_the_journal_goes_on() {
        let d = dir("torn");
        let limits = Limits::default();
        let (mut j, _) = FileJournal::open(&d, &limits).unwrap();
        j.append(&committed(1)).unwrap();
        j.append(&committed(2)).unwrap();
        j.sync().unwrap();
        drop(j);
        let seg = d.join(segment_name(0));
        let len =
            (frame(&committed(1).encode()).len() + frame(&committed(2).encode()).len()) as u64;
        assert!(
            std::fs::metadata(&seg).unwrap().len() > len,
            "zero-filled ahead of the records"
        );
        // A crash in the middle of the second append, then a flipped bit in the first.
        let f = OpenOptions::new().write(true).open(&seg).unwrap();
        f.set_len(len - 5).unwrap();
        drop(f);
        let (mut j, records) = FileJournal::open(&d, &limits).unwrap();
        assert_eq!(records, vec![committed(1)]);
        j.append(&committed(3)).unwrap();
        j.sync().unwrap();
        drop(j);
        let (_, records) = FileJournal::open(&d, &limits).unwrap();
        assert_eq!(records, vec![committed(1), committed(3)]);
        let mut bytes = std::fs::read(&seg).unwrap();
        bytes[FRAME_HEADER + 3] ^= 1;
        std::fs::write(&seg, &bytes).unwrap();
        let (_, records) = FileJournal::open(&d, &limits).unwrap();
        assert!(
            records.is_empty(),
            "a corrupt first record ends the journal"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A journal of an older format is refused with its version, and left as it is (not cut
    /// off as if torn).
    #[test]
    fn a_journal_of_another_version_is_refused_and_kept() {
        let d = dir("version");
        let limits = Limits::default();
        let (mut j, _) = FileJournal::open(&d, &limits).unwrap();
        j.append(&committed(1)).unwrap();
        j.sync().unwrap();
        drop(j);
        let seg = d.join(segment_name(0));
        let mut old = committed(2).encode();
        old[0] = 1;
        let mut bytes = std::fs::read(&seg).unwrap();
        bytes.truncate(frame(&committed(1).encode()).len());
        bytes.extend_from_slice(&frame(&old));
        std::fs::write(&seg, &bytes).unwrap();
        match FileJournal::open(&d, &limits) {
            Err(JournalError::Version { found: 1, .. }) => {}
            other => panic!("{:?}", other.map(|(_, r)| r)),
        }
        assert_eq!(std::fs::read(&seg).unwrap(), bytes, "not truncated");
        // Intact, of this version, but over a limit lowered since: refused too.
        let mut bytes = std::fs::read(&seg).unwrap();
        bytes.truncate(bytes.len() - frame(&old).len());
        bytes.extend_from_slice(&frame(&stable(6).encode()));
        std::fs::write(&seg, &bytes).unwrap();
        let tight = Limits {
            max_snapshot_bytes: 0,
            ..limits
        };
        match FileJournal::open(&d, &tight) {
            Err(JournalError::Unreadable { .. }) => {}
            other => panic!("{:?}", other.map(|(_, r)| r)),
        }
        assert_eq!(std::fs::read(&seg).unwrap(), bytes, "not truncated");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn journal_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let d = dir("mode");
        let (mut j, _) = FileJournal::open(&d, &Limits::default()).unwrap();
        j.append(&stable(4)).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&d), 0o700);
        assert_eq!(mode(&d.join(segment_name(1))), 0o600);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
