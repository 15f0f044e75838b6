//! Replays every committed fuzz corpus through the same oracle its fuzz target runs, so a crash
//! once found stays fixed. Corpora live in `fuzz/corpus/<target>/`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use securesmart::consensus::fuzzing as consensus;
use securesmart::membership::fuzzing as membership;
use securesmart::transport::fuzzing as transport;

/// A fuzz body: panics when its oracle fails.
type Body = fn(&[u8]);

/// Every fuzz target and the function it fuzzes.
const TARGETS: &[(&str, Body)] = &[
    ("frame_decode", transport::frame_decode),
    ("crl", transport::crl),
    ("membership_command", membership::membership_command),
    ("enroll_request", membership::enroll_request),
    ("csr", membership::csr),
    ("mls_message", membership::mls_message),
    ("sealed_open", membership::sealed_open),
    ("consensus_message", consensus::consensus_message),
    ("replica_ops", consensus::replica_ops),
    ("journal", consensus::journal),
    ("node_input", securesmart::fuzzing::node_input),
];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn every_corpus_replays_cleanly() {
    for (target, body) in TARGETS {
        let dir = root().join("fuzz/corpus").join(target);
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let outcome = std::panic::catch_unwind(|| body(&data));
            assert!(outcome.is_ok(), "corpus input {} fails", path.display());
            n += 1;
        }
        assert!(n >= 3, "{target}: the corpus is present ({n} inputs)");
    }
}

#[test]
fn every_fuzz_target_has_a_replayed_corpus() {
    for entry in std::fs::read_dir(root().join("fuzz/fuzz_targets")).unwrap() {
        let name = entry
            .unwrap()
            .path()
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert!(
            TARGETS.iter().any(|(t, _)| *t == name),
            "fuzz target {name} has no replay"
        );
    }
}

/// Writes seed inputs made from real messages into `fuzz/corpus/{mls_message,sealed_open,
/// consensus_message}`. A tool, not a check: `cargo test --test fuzz_corpus -- --ignored
/// write_seeds`.
#[test]
#[ignore]
fn write_seeds() {
    use securesmart::membership::{GroupConfig, GroupMember};
    use securesmart::transport::{Role, pki::DevCa};
    use std::time::Duration;
    let ca = DevCa::new("seed CA").unwrap();
    let a_id = ca.issue_role("a", Role::Replica).unwrap();
    let b_id = ca.issue_role("b", Role::Replica).unwrap();
    let mut a = GroupMember::new(&a_id, GroupConfig::default()).unwrap();
    let mut b = GroupMember::new(&b_id, GroupConfig::default()).unwrap();
    a.create(Duration::ZERO).unwrap();
    let kp = b.key_package().unwrap();
    let add = a.propose_add(&kp, &b_id.chain()[0]).unwrap();
    let update = a.propose_update().unwrap();
    let sealed = a.seal(b"ctx", b"seed payload").unwrap();
    let write = |target: &str, name: &str, data: &[u8]| {
        let dir = root().join("fuzz/corpus").join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), data).unwrap();
    };
    write("mls_message", "add_commit", &add.commit);
    write("mls_message", "welcome", add.welcome.as_deref().unwrap());
    write("mls_message", "update_commit", &update.commit);
    write("mls_message", "key_package", &kp);
    write("sealed_open", "sealed", &sealed);
    write("sealed_open", "short", &sealed[..20]);
    write("sealed_open", "empty", b"");

    use securesmart::consensus::message::{Digest, Message, Request, Signer, batch_digest};
    let signer = Signer::from_seed(&a_id.ed25519_seed().unwrap());
    let batch = vec![Request {
        client: b_id.id(),
        number: 1,
        payload: bytes::Bytes::from_static(b"put k v"),
    }];
    let pp = Message::PrePrepare {
        view: 0,
        seq: 1,
        digest: batch_digest(&batch),
        batch,
    };
    write(
        "consensus_message",
        "pre_prepare",
        &signer.sign(pp).encode(),
    );
    let prepare = Message::Prepare {
        view: 0,
        seq: 1,
        digest: Digest([1; 32]),
    };
    write(
        "consensus_message",
        "prepare",
        &signer.sign(prepare.clone()).encode(),
    );
    let cp = Message::Checkpoint {
        seq: 100,
        state: Digest([2; 32]),
    };
    let cp = signer.sign(cp);
    write("consensus_message", "checkpoint", &cp.encode());
    let prepared = securesmart::consensus::message::Certificate {
        proposal: signer.sign(pp_again()),
        votes: vec![signer.sign(prepare)],
    };
    let vc = signer.sign(Message::ViewChange {
        view: 1,
        stable: 100,
        checkpoint: vec![cp.clone()],
        prepared: vec![prepared],
    });
    write("consensus_message", "view_change", &vc.encode());
    let nv = signer.sign(Message::NewView {
        view: 1,
        view_changes: vec![vc],
        pre_prepares: vec![signer.sign(pp_again())],
    });
    write("consensus_message", "new_view", &nv.encode());
    let fetch = signer.sign(Message::FetchState { seq: 100 });
    write("consensus_message", "fetch_state", &fetch.encode());
    let state = signer.sign(Message::State {
        checkpoint: vec![cp.clone()],
        parts: vec![Digest([3; 32])],
        snapshot: bytes::Bytes::from_static(b"snapshot"),
        committed: vec![],
    });
    write("consensus_message", "state", &state.encode());
    let parts = signer.sign(Message::State {
        checkpoint: vec![cp],
        parts: vec![Digest([3; 32]), Digest([4; 32])],
        snapshot: bytes::Bytes::new(),
        committed: vec![],
    });
    write("consensus_message", "state_in_parts", &parts.encode());
    let fetch_part = signer.sign(Message::FetchPart {
        seq: 100,
        state: Digest([3; 32]),
        index: 1,
    });
    write("consensus_message", "fetch_part", &fetch_part.encode());
    let part = signer.sign(Message::Part {
        seq: 100,
        state: Digest([3; 32]),
        index: 1,
        bytes: bytes::Bytes::from_static(b"part"),
    });
    write("consensus_message", "part", &part.encode());

    // The node's replicated state with a joiner, an unsettled commit and a cool-down
    // (snapshot version 6), and the envelopes of the group's answers.
    use securesmart::protocol::{ClientRequest, Ordered, RequestKind, RequestSigner};
    use securesmart::state::NodeState;
    let membership = securesmart::membership::fuzzing::four_replicas();
    let ids = membership.replica_ids();
    let mut node = NodeState::new(membership, Vec::new(), securesmart::kv::KvStore::default());
    let order = |node: &mut NodeState<securesmart::kv::KvStore>, client, number, o: Ordered| {
        use securesmart::consensus::service::StateMachine;
        node.execute(&Request {
            client,
            number,
            payload: o.encode(),
        });
    };
    node.begin_batch(40);
    order(
        &mut node,
        ids[3],
        1,
        Ordered::KeyPackage(bytes::Bytes::from(kp.clone())),
    );
    order(
        &mut node,
        ids[0],
        1,
        Ordered::GroupCommit {
            commit: bytes::Bytes::from(update.commit.clone()),
            welcome: bytes::Bytes::new(),
        },
    );
    let digest = securesmart::membership::commit_digest(&update.commit);
    order(&mut node, ids[1], 1, Ordered::CommitRefused(digest));
    {
        use securesmart::consensus::service::StateMachine;
        write("node_input", "node_state_v10", &node.snapshot());
    }
    write(
        "node_input",
        "key_ack",
        &Ordered::KeyAck {
            epoch: 1,
            commit: digest,
        }
        .encode(),
    );
    write(
        "node_input",
        "commit_refused",
        &Ordered::CommitRefused(digest).encode(),
    );
    let admin = RequestSigner::new(&b_id).unwrap();
    let command = ClientRequest::signed(
        &admin,
        7,
        RequestKind::Command,
        bytes::Bytes::from_static(b"a membership command"),
    );
    write("node_input", "client_command_v4", &command.encode());
    let ask = ClientRequest::signed(
        &admin,
        8,
        RequestKind::Seal,
        bytes::Bytes::from_static(b"an operation"),
    );
    write("node_input", "client_seal", &ask.encode());
    let sealer = securesmart::protocol::Auth {
        public_key: [3; 32],
        signature: [4; 64],
    };
    let confidential =
        ClientRequest::confidential(&admin, 8, &ask.payload, &sealer, b"its ciphertext");
    write(
        "node_input",
        "client_confidential_v4",
        &confidential.encode(),
    );
    // Rosters: a replica's acknowledgement, an answer to a roster query, a reply naming one.
    write(
        "node_input",
        "roster_ack",
        &Ordered::RosterAck {
            roster: 1,
            digest: [9; 32],
        }
        .encode(),
    );
    let roster =
        securesmart::roster::Roster::of(1, &securesmart::membership::fuzzing::four_replicas());
    let change = securesmart::roster::RosterChange {
        acks: vec![securesmart::roster::RosterAck {
            replica: ids[0],
            number: 3,
            auth: securesmart::protocol::Auth {
                public_key: [1; 32],
                signature: [2; 64],
            },
        }],
        roster,
    };
    let list = securesmart::roster::RosterChange::encode_list(&[change]);
    write("node_input", "roster_changes", &list);
    let reply = securesmart::protocol::ClientReply {
        number: 5,
        roster: 1,
        outcome: securesmart::protocol::Outcome::Rosters(bytes::Bytes::from(list)),
    };
    write("node_input", "client_reply_v2", &reply.encode());
    let sealed_reply = securesmart::protocol::ClientReply {
        number: 8,
        roster: 0,
        outcome: securesmart::protocol::Outcome::Sealed {
            sealer,
            sealed: bytes::Bytes::from_static(b"sealed"),
        },
    };
    write("node_input", "client_reply_sealed", &sealed_reply.encode());
    // Client sealing (request version 5, reply version 3): a key query, its answer, a
    // client-sealed request.
    let key = securesmart::membership::ClientSealingKey::from_bytes(3, b_id.id(), [5; 32]);
    let key_query = ClientRequest::signed(&admin, 9, RequestKind::SealingKey, bytes::Bytes::new());
    write("node_input", "client_key_query_v5", &key_query.encode());
    let key_reply = securesmart::protocol::ClientReply {
        number: 9,
        roster: 1,
        outcome: securesmart::protocol::Outcome::SealingKey(key.clone()),
    };
    write("node_input", "client_reply_key_v3", &key_reply.encode());
    let client_sealed = ClientRequest::client_sealed(&admin, 10, &key, b"an operation").unwrap();
    write("node_input", "client_sealed_v5", &client_sealed.encode());

    // Journal files: real segments written by the file journal.
    use securesmart::consensus::journal::{FileJournal, Journal, Record};
    use securesmart::consensus::message::{Certificate, Limits};
    let dir = std::env::temp_dir().join(format!("journal-seeds-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (mut journal, _) = FileJournal::open(&dir, &Limits::default()).unwrap();
    let proposal = signer.sign(pp_again());
    let vote = |m| signer.sign(m);
    for record in [
        Record::ViewChange(1),
        Record::EnteredView(1),
        Record::PrePrepare(proposal.clone()),
        Record::Prepared(Certificate {
            proposal: proposal.clone(),
            votes: vec![vote(Message::Prepare {
                view: 0,
                seq: 101,
                digest: batch_digest(&[]),
            })],
        }),
        Record::Committed(Certificate {
            proposal,
            votes: vec![vote(Message::Commit {
                view: 0,
                seq: 101,
                digest: batch_digest(&[]),
            })],
        }),
    ] {
        write(
            "journal",
            &format!("record_{}", record.encode()[1]),
            &record.encode(),
        );
        journal.append(&record).unwrap();
    }
    journal.sync().unwrap();
    drop(journal);
    let segment = std::fs::read_dir(&dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    write("journal", "segment", &std::fs::read(&segment).unwrap());
    std::fs::remove_dir_all(&dir).unwrap();
}

fn pp_again() -> securesmart::consensus::message::Message {
    use securesmart::consensus::message::{Message, batch_digest};
    Message::PrePrepare {
        view: 0,
        seq: 101,
        digest: batch_digest(&[]),
        batch: vec![],
    }
}
