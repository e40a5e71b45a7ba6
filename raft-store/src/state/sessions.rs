//! Client sessions (Raft dissertation §6.3, as LogCabin keeps them): a command sent twice, for
//! instance by a node that retries a forwarded write whose answer was lost after it committed,
//! applies once, and the repeat gets the first answer.
//!
//! A session is opened through the log and its id is the opening command's fencing token. Each
//! command it sends carries its sequence number and the highest sequence whose answer the client
//! already has; the state keeps the answers above that, at most [`SESSION_ANSWERS_MAX`]. A
//! session expires `ttl_ms` after its last command, by leader time, and at most
//! [`SESSIONS_MAX`] are open. A command on an unknown or expired session is refused, never
//! applied: its sender cannot know whether an earlier copy applied.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{apply_command, AppState};
use crate::command::{Command, Rejection, Response, SESSIONS_MAX, SESSION_ANSWERS_MAX};

/// Sessions expired per applied session command, at most (the rest go on the next ones).
const EXPIRIES_PER_APPLY_MAX: usize = 64;

/// One open client session.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientSession {
    /// The principal that opened it (empty: a node's own); only its commands go on it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub owner: String,
    pub ttl_ms: u64,
    pub expires_at_ms: u64,
    /// Every sequence at or below this has its answer at the client.
    pub acknowledged: u64,
    /// Answers to the session's applied commands above `acknowledged`, by sequence.
    pub answers: BTreeMap<u64, Response>,
}

/// Remove sessions whose time ran out at `now_ms` (a bounded number).
fn expire(app: &mut AppState, now_ms: u64) {
    for _ in 0..EXPIRIES_PER_APPLY_MAX {
        match app.session_expiries.first() {
            Some(&(at, client)) if at <= now_ms => {
                app.session_expiries.remove(&(at, client));
                app.sessions.remove(&client);
            }
            _ => return,
        }
    }
}

/// `OpenSession`: a new session with id `token`.
pub(super) fn open(
    app: &mut AppState,
    now_ms: u64,
    token: u64,
    ttl_ms: u64,
    owner: &str,
) -> Result<Response, Rejection> {
    expire(app, now_ms);
    if app.sessions.len() >= SESSIONS_MAX {
        return Err(Rejection::SessionsFull { limit: SESSIONS_MAX });
    }
    let expires_at_ms = now_ms.saturating_add(ttl_ms);
    app.sessions.insert(token, ClientSession { owner: owner.to_string(), ttl_ms, expires_at_ms, ..Default::default() });
    app.session_expiries.insert((expires_at_ms, token));
    Ok(Response::SessionOpened { client: token })
}

/// `Session`: apply `command` once for (`client`, `sequence`), or answer a repeat from memory.
pub(super) fn apply(
    app: &mut AppState,
    now_ms: u64,
    token: u64,
    (client, sequence, acknowledged): (u64, u64, u64),
    sender: &str,
    command: &Command,
) -> Result<Response, Rejection> {
    expire(app, now_ms);
    let Some(session) = app.sessions.get(&client) else {
        return Err(Rejection::SessionExpired { client });
    };
    if session.owner != sender {
        return Err(Rejection::SessionNotYours { client, sender: sender.to_string() });
    }
    if sequence <= session.acknowledged {
        return Err(Rejection::SessionSequenceAcknowledged { client, sequence });
    }
    let answer = match session.answers.get(&sequence) {
        Some(answer) => answer.clone(),
        None => {
            if session.answers.len() >= SESSION_ANSWERS_MAX {
                return Err(Rejection::SessionWindowFull { client, limit: SESSION_ANSWERS_MAX });
            }
            // A refusal changes nothing, the session included; a resend may then apply.
            let answer = apply_command(app, now_ms, token, command)?;
            if let Some(session) = app.sessions.get_mut(&client) {
                session.answers.insert(sequence, answer.clone());
            }
            answer
        }
    };
    if let Some(session) = app.sessions.get_mut(&client) {
        if acknowledged > session.acknowledged {
            session.acknowledged = acknowledged;
            session.answers = session.answers.split_off(&(acknowledged + 1));
        }
        app.session_expiries.remove(&(session.expires_at_ms, client));
        session.expires_at_ms = now_ms.saturating_add(session.ttl_ms);
        app.session_expiries.insert((session.expires_at_ms, client));
    }
    Ok(answer)
}

/// The sessions' invariants: bounded, indexed exactly by expiry, answers only above the
/// acknowledged sequence.
pub(super) fn validate(app: &AppState) -> Result<(), String> {
    if app.sessions.len() > SESSIONS_MAX {
        return Err(format!("{} sessions exceed the bound {SESSIONS_MAX}", app.sessions.len()));
    }
    if app.session_expiries.len() != app.sessions.len()
        || !app.sessions.iter().all(|(client, s)| app.session_expiries.contains(&(s.expires_at_ms, *client)))
    {
        return Err("the session expiry index disagrees with the sessions".into());
    }
    for (client, session) in &app.sessions {
        if session.answers.len() > SESSION_ANSWERS_MAX {
            return Err(format!(
                "session {client} holds {} answers, over {SESSION_ANSWERS_MAX}",
                session.answers.len()
            ));
        }
        if session.answers.keys().next().is_some_and(|first| *first <= session.acknowledged) {
            return Err(format!("session {client} keeps an answer it acknowledged"));
        }
    }
    Ok(())
}
