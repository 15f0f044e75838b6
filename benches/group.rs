//! MLS group-key costs: creating and applying Add, Remove and Update commits for groups of 4, 16,
//! 64 and 256 members, and seal/open throughput against raw AES-256-GCM-SIV in the same run.
//!
//! `cargo bench --bench group [-- --quick]` (`--quick`: groups up to 64, shorter seal runs).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::{Duration, Instant};

use aes_gcm_siv::aead::{Aead, KeyInit, Payload};
use aes_gcm_siv::{Aes256GcmSiv, Nonce};
use securesmart::membership::{GroupConfig, GroupMember};
use securesmart::transport::{Identity, Role, pki::DevCa};

const T0: Duration = Duration::ZERO;
const ROUNDS: u32 = 5;

fn member(ca: &DevCa, name: &str) -> (Identity, GroupMember) {
    let id = ca.issue_role(name, Role::Replica).unwrap();
    let m = GroupMember::new(&id, GroupConfig::default()).unwrap();
    (id, m)
}

fn ms(d: Duration) -> String {
    format!("{:>8.2}", d.as_secs_f64() * 1e3)
}

/// Average create (build + merge at the committer) and apply (at another member) times.
fn commits(ca: &DevCa, n: usize) -> [(Duration, Duration); 3] {
    let (_, mut a) = member(ca, "a");
    a.create(T0).unwrap();
    let (b_id, mut b) = member(ca, "b");
    // Everyone else joins in the same Add; only `a` and `b` take part in what is measured.
    let mut others: Vec<(Identity, GroupMember)> =
        (0..n - 2).map(|i| member(ca, &format!("m{i}"))).collect();
    let b_cert = b_id.chain()[0].clone();
    let mut kps: Vec<(Vec<u8>, rustls::pki_types::CertificateDer<'static>)> =
        vec![(b.key_package().unwrap(), b_cert)];
    for (id, m) in &mut others {
        kps.push((m.key_package().unwrap(), id.chain()[0].clone()));
    }
    let joiners: Vec<(&[u8], &rustls::pki_types::CertificateDer<'_>)> =
        kps.iter().map(|(k, c)| (k.as_slice(), c)).collect();
    let p = a.propose_add_many(&joiners).unwrap();
    a.apply_commit(&p.commit, T0).unwrap();
    b.join(p.welcome.as_ref().unwrap(), T0).unwrap();

    let mut out = [(Duration::ZERO, Duration::ZERO); 3];
    let mut fresh = (0..ROUNDS).map(|i| member(ca, &format!("new{i}")));
    let mut removable = others.iter().map(|(id, _)| id.id());
    for _ in 0..ROUNDS {
        // Add
        let (nid, mut nm) = fresh.next().unwrap();
        let kp = nm.key_package().unwrap();
        let t = Instant::now();
        let p = a.propose_add(&kp, &nid.chain()[0]).unwrap();
        a.apply_commit(&p.commit, T0).unwrap();
        out[0].0 += t.elapsed();
        let t = Instant::now();
        b.apply_commit(&p.commit, T0).unwrap();
        out[0].1 += t.elapsed();
        // Remove
        if let Some(victim) = removable.next() {
            let t = Instant::now();
            let p = a.propose_remove(victim).unwrap();
            a.apply_commit(&p.commit, T0).unwrap();
            out[1].0 += t.elapsed();
            let t = Instant::now();
            b.apply_commit(&p.commit, T0).unwrap();
            out[1].1 += t.elapsed();
        }
        // Update
        let t = Instant::now();
        let p = a.propose_update().unwrap();
        a.apply_commit(&p.commit, T0).unwrap();
        out[2].0 += t.elapsed();
        let t = Instant::now();
        b.apply_commit(&p.commit, T0).unwrap();
        out[2].1 += t.elapsed();
    }
    let removes = ROUNDS.min(n as u32 - 2).max(1);
    [
        (out[0].0 / ROUNDS, out[0].1 / ROUNDS),
        (out[1].0 / removes, out[1].1 / removes),
        (out[2].0 / ROUNDS, out[2].1 / ROUNDS),
    ]
}

/// Bytes per second sealing then opening `size`-byte payloads for `secs`, ours and raw.
fn seal(ca: &DevCa, size: usize, secs: f64) -> (f64, f64) {
    let (_, mut m) = member(ca, "sealer");
    m.create(T0).unwrap();
    let payload = vec![7u8; size];
    let mut bytes = 0usize;
    let t = Instant::now();
    while t.elapsed().as_secs_f64() < secs {
        let s = m.seal(b"view 1 seq 2", &payload).unwrap();
        let o = m.open(&s, b"view 1 seq 2").unwrap();
        bytes += o.plaintext.len();
    }
    let ours = bytes as f64 / t.elapsed().as_secs_f64();
    // Raw AES-256-GCM-SIV with a random nonce per message and the same AAD length.
    let key: [u8; 32] = rand::random();
    let cipher = Aes256GcmSiv::new_from_slice(&key).unwrap();
    let aad = vec![1u8; 29 + 8 + 32 + 4 + 12];
    let mut bytes = 0usize;
    let t = Instant::now();
    while t.elapsed().as_secs_f64() < secs {
        let nonce = Nonce::from(rand::random::<[u8; 12]>());
        let c = cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: &payload,
                    aad: &aad,
                },
            )
            .unwrap();
        let p = cipher
            .decrypt(&nonce, Payload { msg: &c, aad: &aad })
            .unwrap();
        bytes += p.len();
    }
    (ours, bytes as f64 / t.elapsed().as_secs_f64())
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let ca = DevCa::new("bench CA").unwrap();
    println!(
        "MLS commits (ciphersuite MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519), ms, mean of {ROUNDS}"
    );
    println!(
        "{:>8} | {:>8} {:>8} | {:>8} {:>8} | {:>8} {:>8}",
        "members", "add mk", "add app", "rm mk", "rm app", "upd mk", "upd app"
    );
    let sizes: &[usize] = if quick {
        &[4, 16, 64]
    } else {
        &[4, 16, 64, 256]
    };
    for &n in sizes {
        let r = commits(&ca, n);
        println!(
            "{:>8} | {} {} | {} {} | {} {}",
            n,
            ms(r[0].0),
            ms(r[0].1),
            ms(r[1].0),
            ms(r[1].1),
            ms(r[2].0),
            ms(r[2].1)
        );
    }
    let secs = if quick { 0.5 } else { 2.0 };
    println!("\nseal+open throughput, {secs} s per cell (one seal and one open per payload)");
    println!(
        "{:>8} | {:>12} | {:>12} | {:>6}",
        "payload", "ours MB/s", "raw MB/s", "ratio"
    );
    for size in [256, 4096, 65536] {
        let (ours, raw) = seal(&ca, size, secs);
        println!(
            "{:>8} | {:>12.1} | {:>12.1} | {:>6.2}",
            size,
            ours / 1e6,
            raw / 1e6,
            ours / raw
        );
    }
    println!(
        "(mk: build the commit and merge it at the committer; app: apply it at another member)"
    );
}
