//! Fuzz bodies shared by the `fuzz/` targets and the corpus-replay test, so both run the same
//! oracle. Not part of the stable API.

// invariant: these bodies run only under the fuzzer (`fuzz/`) and the corpus-replay test,
// never in a node, so no network or file input reaches their unwrap/expect calls; those
// either build fixtures from constants (a development CA) or are the oracle itself.
// Panicking is this module's job: a failed oracle is the fuzzer's finding.
#![allow(clippy::expect_used)]

use bytes::BytesMut;

use crate::frame::{FrameDecoder, encode_frame};

/// Feeds `data` to a [`FrameDecoder`] in pieces whose sizes come from the input, and checks that
/// every frame returned re-encodes to exactly the bytes consumed (round trip), that no frame
/// exceeds the limit, and that the buffered remainder is bounded.
///
/// # Panics
/// When an oracle fails: that is the finding.
pub fn frame_decode(data: &[u8]) {
    let Some((&knobs, rest)) = data.split_first() else {
        return;
    };
    let max = 1 + usize::from(knobs & 0x3f) * 17;
    let step = 1 + usize::from(knobs >> 6) * 7;
    let mut decoder = FrameDecoder::new(max);
    let mut reencoded = BytesMut::new();
    let mut consumed = 0usize;
    for piece in rest.chunks(step) {
        decoder.push(piece);
        consumed += piece.len();
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    assert!(frame.len() <= max, "frame over the limit");
                    // invariant: the frame is within `max` (asserted above), the only way
                    // encoding can fail.
                    encode_frame(&mut reencoded, &frame, max).expect("re-encode within limit");
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
        assert!(decoder.buffered() <= consumed);
        assert!(decoder.buffered() <= max + crate::FRAME_HEADER_BYTES + step);
    }
    let done = reencoded.len();
    assert_eq!(rest.get(..done), Some(&reencoded[..]), "round trip");
    assert_eq!(
        done + decoder.buffered() + pending_header(rest, done, &decoder),
        rest.len()
    );
}

/// Bytes of a length prefix already taken off the buffer for the frame in progress.
fn pending_header(rest: &[u8], done: usize, decoder: &FrameDecoder) -> usize {
    if rest.len() - done > decoder.buffered() {
        crate::FRAME_HEADER_BYTES
    } else {
        0
    }
}

/// Builds a trust state with an arbitrary CRL and checks a valid replica against it: no panic,
/// and a CRL not signed by our CA (a fuzzer cannot forge one) never vouches for the node: with
/// a CRL loaded, unknown revocation status is refused.
pub fn crl(data: &[u8]) {
    use std::sync::OnceLock;
    static FIXTURE: OnceLock<(crate::pki::DevCa, crate::Identity)> = OnceLock::new();
    let (ca, node) = FIXTURE.get_or_init(|| {
        // invariant: a fixture from constants; no fuzz input reaches these expect calls.
        let ca = crate::pki::DevCa::new("fuzz CA").expect("CA");
        let node = ca.issue_role("node", crate::Role::Replica).expect("cert");
        (ca, node)
    });
    let mut cfg = crate::TrustConfig::new(ca.certificate());
    cfg.peers
        .insert(node.id(), std::net::SocketAddr::from(([127, 0, 0, 1], 1)));
    cfg.crls = vec![rustls::pki_types::CertificateRevocationListDer::from(
        data.to_vec(),
    )];
    if let Ok(state) = crate::TrustState::new(cfg) {
        let verdict = state.verify_replica(node.chain(), rustls::pki_types::UnixTime::now());
        assert!(verdict.is_err(), "a fuzzed CRL cannot vouch for our node");
    }
}
