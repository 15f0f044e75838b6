//! The `securesmart ca` and `keygen` commands end to end, checked with openssl.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_securesmart"))
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap()
}

fn ok(args: &[&str], cwd: &Path) -> String {
    let out = bin(args, cwd);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                out.push((e.path(), std::fs::read(e.path()).unwrap()));
            }
        }
    }
    out.sort();
    out
}

fn openssl_verify(cwd: &Path, cert: &str) -> bool {
    Command::new("openssl")
        .args([
            "verify",
            "-CAfile",
            "ca/ca.pem",
            "-crl_check",
            "-CRLfile",
            "crl.pem",
            cert,
        ])
        .current_dir(cwd)
        .output()
        .expect("openssl is installed (.ci/run installs it)")
        .status
        .success()
}

#[test]
fn init_token_keygen_sign_revoke_crl_list() {
    let work = std::env::temp_dir().join(format!("ss-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    ok(&["ca", "init", "--dir", "ca", "--name", "Test CA"], &work);
    assert!(
        !bin(&["ca", "init", "--dir", "ca"], &work).status.success(),
        "init twice is refused"
    );

    for node in ["n1", "n2"] {
        let token = ok(
            &[
                "ca", "token", "--dir", "ca", "--role", "replica", "--name", node, "--ttl", "10m",
            ],
            &work,
        );
        let token = token.trim();
        assert_eq!(token.len(), 64);
        ok(&["keygen", "--out", node, "--name", node], &work);
        let sign = [
            "ca",
            "sign",
            "--dir",
            "ca",
            "--csr",
            &format!("{node}/node.csr"),
            "--token",
            token,
            "--out",
            &format!("{node}/node.pem"),
        ];
        ok(&sign, &work);
        // The same token again: one clear line, non-zero exit, nothing changed in the CA.
        let before = tree(&work.join("ca"));
        let again = bin(&sign, &work);
        assert!(!again.status.success());
        let err = String::from_utf8(again.stderr).unwrap();
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("already used"), "{err}");
        assert_eq!(tree(&work.join("ca")), before);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for key in ["ca/ca.key", "n1/node.key"] {
            assert_eq!(
                std::fs::metadata(work.join(key))
                    .unwrap()
                    .permissions()
                    .mode()
                    & 0o777,
                0o600,
                "{key}"
            );
        }
    }
    ok(
        &[
            "ca",
            "revoke",
            "--dir",
            "ca",
            "--cert",
            "n2/node.pem",
            "--reason",
            "key-compromise",
            "--bundle",
            "revoked.pem",
        ],
        &work,
    );
    // The bundle holds the revoked certificate as openssl reads it, for the nodes to order.
    let bundle = std::fs::read_to_string(work.join("revoked.pem")).unwrap();
    assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 1);
    assert_eq!(
        bundle.trim(),
        std::fs::read_to_string(work.join("n2/node.pem"))
            .unwrap()
            .trim()
    );
    ok(&["ca", "crl", "--dir", "ca", "--out", "crl.pem"], &work);
    assert!(work.join("crl.der").exists());
    assert!(
        openssl_verify(&work, "n1/node.pem"),
        "a good certificate verifies"
    );
    assert!(
        !openssl_verify(&work, "n2/node.pem"),
        "a revoked certificate fails"
    );
    // Renewal: a CSR for the same key, no token; the renewed certificate goes with the old
    // key, verifies with openssl, and a CSR for another key is refused.
    ok(
        &[
            "keygen",
            "--out",
            "n1r",
            "--name",
            "n1",
            "--key",
            "n1/node.key",
        ],
        &work,
    );
    assert!(!work.join("n1r/node.key").exists(), "no new key");
    ok(
        &[
            "ca",
            "renew",
            "--dir",
            "ca",
            "--cert",
            "n1/node.pem",
            "--csr",
            "n1r/node.csr",
            "--out",
            "n1r/node.pem",
        ],
        &work,
    );
    let renewed = securesmart::transport::Identity::from_pem_files(
        &work.join("n1r/node.pem"),
        &work.join("n1/node.key"),
    )
    .unwrap();
    assert_ne!(
        std::fs::read(work.join("n1r/node.pem")).unwrap(),
        std::fs::read(work.join("n1/node.pem")).unwrap()
    );
    assert!(openssl_verify(&work, "n1r/node.pem"));
    ok(&["keygen", "--out", "fresh", "--name", "n1"], &work);
    let other = bin(
        &[
            "ca",
            "renew",
            "--dir",
            "ca",
            "--cert",
            "n1/node.pem",
            "--csr",
            "fresh/node.csr",
            "--out",
            "fresh/node.pem",
        ],
        &work,
    );
    assert!(!other.status.success(), "a CSR for another key is refused");
    let list = ok(&["ca", "list", "--dir", "ca"], &work);
    assert_eq!(list.lines().filter(|l| l.contains("revoked")).count(), 1);
    assert_eq!(list.lines().filter(|l| l.contains("valid")).count(), 2);
    // The issued files make a transport identity.
    let id = securesmart::transport::Identity::from_pem_files(
        &work.join("n1/node.pem"),
        &work.join("n1/node.key"),
    )
    .unwrap();
    assert_eq!(id.role(), securesmart::transport::Role::Replica);
    assert_eq!(renewed.id(), id.id(), "the same key, the same node");
    std::fs::remove_dir_all(&work).unwrap();
}

#[test]
fn serve_and_enroll_over_the_network() {
    use std::io::{BufRead, BufReader};
    let work = std::env::temp_dir().join(format!("ss-cli-net-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    ok(&["ca", "init", "--dir", "ca"], &work);
    let token = ok(
        &[
            "ca", "token", "--dir", "ca", "--role", "client", "--name", "c1",
        ],
        &work,
    );
    let mut server = Command::new(env!("CARGO_BIN_EXE_securesmart"))
        .args(["ca", "serve", "--dir", "ca", "--listen", "127.0.0.1:0"])
        .current_dir(&work)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_owned();
    let enroll = |out: &str| {
        bin(
            &[
                "enroll",
                "--ca",
                &addr,
                "--ca-cert",
                "ca/ca.pem",
                "--token",
                token.trim(),
                "--out",
                out,
            ],
            &work,
        )
    };
    let out = enroll("c1");
    let again = enroll("c1b");
    // A token kept out of the process list and shell history: written 0600, read from a file.
    ok(
        &[
            "ca", "token", "--dir", "ca", "--role", "client", "--name", "c2", "--out", "c2.token",
        ],
        &work,
    );
    let from_file = bin(
        &[
            "enroll",
            "--ca",
            &addr,
            "--ca-cert",
            "ca/ca.pem",
            "--token-file",
            "c2.token",
            "--out",
            "c2",
        ],
        &work,
    );
    server.kill().unwrap();
    let _ = server.wait();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!again.status.success(), "a token enrolls once");
    assert!(
        from_file.status.success(),
        "{}",
        String::from_utf8_lossy(&from_file.stderr)
    );
    assert!(work.join("c2/node.pem").exists());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(work.join("c2.token"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the token file is private");
    }
    let id = securesmart::transport::Identity::from_pem_files(
        &work.join("c1/node.pem"),
        &work.join("c1/node.key"),
    )
    .unwrap();
    assert_eq!(id.role(), securesmart::transport::Role::Client);
    assert_eq!(
        std::fs::read(work.join("c1/ca.pem")).unwrap(),
        std::fs::read(work.join("ca/ca.pem")).unwrap()
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(work.join("c1/node.key"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
    }
    let list = ok(&["ca", "list", "--dir", "ca"], &work);
    assert!(list.contains("c1"), "{list}");
    std::fs::remove_dir_all(&work).unwrap();
}

/// `ca serve --crl` keeps a fresh CRL on disk: written at start and rewritten (atomically,
/// PEM and DER) every half of its validity, so that watching nodes order the next one before
/// the current expires.
#[test]
fn serve_keeps_a_fresh_crl_on_disk() {
    let work = std::env::temp_dir().join(format!("ss-cli-crl-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    ok(&["ca", "init", "--dir", "ca"], &work);
    let mut server = Command::new(env!("CARGO_BIN_EXE_securesmart"))
        .args([
            "ca",
            "serve",
            "--dir",
            "ca",
            "--listen",
            "127.0.0.1:0",
            "--crl",
            "crl.pem",
            "--crl-validity",
            "2s",
        ])
        .current_dir(&work)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let read_when = |pred: &dyn Fn(&[u8]) -> bool| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            if let Ok(bytes) = std::fs::read(work.join("crl.pem"))
                && pred(&bytes)
            {
                return Some(bytes);
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    let first = read_when(&|b| b.starts_with(b"-----BEGIN X509 CRL-----"));
    let second = first
        .clone()
        .and_then(|f| read_when(&|b| b.starts_with(b"-----BEGIN X509 CRL-----") && b != f));
    server.kill().unwrap();
    let _ = server.wait();
    assert!(first.is_some(), "a CRL at start");
    assert!(second.is_some(), "a fresh CRL a second later");
    assert!(work.join("crl.der").exists());
    std::fs::remove_dir_all(&work).unwrap();
}
