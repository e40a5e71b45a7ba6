//! Exactly-once writes: the client's session (Raft dissertation §6.3).
//!
//! A client opens one session (`ClusterService.OpenSession`) on its first write and numbers its
//! writes. Every attempt of one write, on whichever node, carries the same
//! `maos-session: <session>/<sequence>/<acknowledged>`, so the cluster applies it once and
//! answers a resend with the first answer; a blind resend after a timeout can no longer apply a
//! write twice. `acknowledged` tells the cluster which answers it may forget.
//!
//! An expired session (idle past its time to live) is reopened and the write resent only when
//! no earlier attempt of it could have applied; otherwise the caller gets
//! [`ClientError::SessionExpired`](crate::ClientError::SessionExpired). A node without sessions
//! (an older build) or a credential that may not open one (a viewer's, an agent's) makes the
//! client write without a session, as before.

use std::collections::BTreeSet;
use std::sync::{Mutex, MutexGuard};

/// The metadata that carries a write's session and sequence.
pub const SESSION_HEADER: &str = "maos-session";

/// What the client knows of its session.
#[derive(Debug, Default)]
pub(crate) struct Session {
    state: Mutex<State>,
    /// Held while the session is being opened, so concurrent first writes open one.
    pub(crate) opening: tokio::sync::Mutex<()>,
    /// Asked for when opening (0: the node's `raft.session_ttl_ms`).
    pub(crate) ttl_ms: u64,
}

#[derive(Debug, Default)]
struct State {
    id: Option<u64>,
    /// Why this client writes without a session, when the cluster would not open one.
    unsupported: Option<String>,
    /// The last sequence handed out; one counter across sessions, so none is reused.
    last_sequence: u64,
    /// Sequences sent and not yet answered.
    outstanding: BTreeSet<u64>,
}

/// What the next write goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Known {
    Open(u64),
    Unsupported,
    Unknown,
}

impl Session {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Plain counters, usable after any panic.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn known(&self) -> Known {
        let state = self.lock();
        match (state.id, &state.unsupported) {
            (Some(id), _) => Known::Open(id),
            (None, Some(_)) => Known::Unsupported,
            (None, None) => Known::Unknown,
        }
    }

    pub(crate) fn opened(&self, id: u64) {
        self.lock().id = Some(id);
    }

    pub(crate) fn unsupported(&self, why: String) {
        tracing::debug!(%why, "writing without a client session");
        self.lock().unsupported = Some(why);
    }

    /// Forget session `id` (it expired), so the next write opens another.
    pub(crate) fn forget(&self, id: u64) {
        let mut state = self.lock();
        if state.id == Some(id) {
            state.id = None;
        }
    }

    /// The next sequence, and the highest sequence below which every answer is in.
    pub(crate) fn begin(&self) -> (u64, u64) {
        let mut state = self.lock();
        state.last_sequence += 1;
        let sequence = state.last_sequence;
        state.outstanding.insert(sequence);
        let acknowledged = state.outstanding.first().map_or(sequence, |first| first - 1);
        (sequence, acknowledged)
    }

    pub(crate) fn end(&self, sequence: u64) {
        self.lock().outstanding.remove(&sequence);
    }
}

/// A sequence in flight; ended when dropped, also when the caller abandons the write.
pub(crate) struct Outstanding<'a>(pub(crate) &'a Session, pub(crate) u64);

impl Drop for Outstanding<'_> {
    fn drop(&mut self) {
        self.0.end(self.1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequences_grow_and_acknowledge_only_what_every_earlier_write_has_back() {
        let session = Session::default();
        assert_eq!(session.begin(), (1, 0));
        assert_eq!(session.begin(), (2, 0));
        session.end(2);
        // 1 is still out: nothing above 0 may be forgotten.
        assert_eq!(session.begin(), (3, 0));
        session.end(1);
        session.end(3);
        assert_eq!(session.begin(), (4, 3));
        session.end(4);
        {
            let (five, acknowledged) = session.begin();
            assert_eq!((five, acknowledged), (5, 4));
            let _abandoned = Outstanding(&session, five);
        }
        assert_eq!(session.begin(), (6, 5));
    }

    #[test]
    fn a_forgotten_session_is_reopened_and_an_unsupported_one_is_not() {
        let session = Session::default();
        assert_eq!(session.known(), Known::Unknown);
        session.opened(7);
        assert_eq!(session.known(), Known::Open(7));
        session.forget(8);
        assert_eq!(session.known(), Known::Open(7));
        session.forget(7);
        assert_eq!(session.known(), Known::Unknown);
        session.unsupported("UNIMPLEMENTED".into());
        assert_eq!(session.known(), Known::Unsupported);
    }
}
