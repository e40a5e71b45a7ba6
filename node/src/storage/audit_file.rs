//! The audit log without PostgreSQL: JSON lines in `<data dir>/audit.jsonl`, written by one
//! background thread from a bounded queue, rotated by size (`audit.jsonl.1` … `.3`).

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};

use serde::{Deserialize, Serialize};

/// Entries waiting for the writer, at most; past it new entries are dropped (and logged).
const QUEUE_MAX: usize = 4_096;
/// A file is rotated once it is larger than this.
pub const FILE_BYTES_MAX: u64 = 64 << 20;
/// Rotated files kept besides the current one.
pub const ROTATED_KEPT: usize = 3;
/// The current file's name in the data dir.
pub const FILE_NAME: &str = "audit.jsonl";

/// One audit record, as written (also what PostgreSQL's `audit_log` rows are read into).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub at_ms: u64,
    pub node_id: u64,
    pub principal: String,
    pub action: String,
    pub target: String,
    pub detail: serde_json::Value,
}

/// The writer's queue.
pub struct AuditFile {
    queue: SyncSender<AuditRecord>,
    path: PathBuf,
}

impl AuditFile {
    /// Start the writer for `<dir>/audit.jsonl`; the file is made on the first entry.
    pub fn start(dir: &Path) -> Self {
        let (queue, entries) = sync_channel::<AuditRecord>(QUEUE_MAX);
        let path = dir.join(FILE_NAME);
        let target = path.clone();
        let spawned = std::thread::Builder::new().name("maos-audit".into()).spawn(move || {
            for record in entries {
                if let Err(error) = append(&target, &record, FILE_BYTES_MAX) {
                    tracing::warn!(path = %target.display(), %error, "writing the audit log failed; an entry was lost");
                }
            }
        });
        if let Err(error) = spawned {
            tracing::error!(%error, "the audit writer could not start; audit entries will be dropped");
        }
        Self { queue, path }
    }

    pub fn record(&self, record: AuditRecord) {
        match self.queue.try_send(record) {
            Ok(()) => {}
            Err(TrySendError::Full(record)) => {
                tracing::warn!(action = %record.action, "the audit queue is full (disk slow); an entry was dropped")
            }
            Err(TrySendError::Disconnected(_)) => tracing::warn!("the audit writer has stopped; an entry was dropped"),
        }
    }

    /// The newest `limit` records at or after `since_ms` (and of `principal`, if not empty),
    /// newest first, from the current and rotated files.
    pub fn list(&self, since_ms: u64, principal: &str, limit: usize) -> std::io::Result<Vec<AuditRecord>> {
        let mut found = Vec::new();
        let files = std::iter::once(self.path.clone()).chain((1..=ROTATED_KEPT).map(|n| rotated(&self.path, n)));
        for file in files {
            let Ok(opened) = std::fs::File::open(&file) else { continue };
            let mut in_file: Vec<AuditRecord> = std::io::BufReader::new(opened)
                .lines()
                .map_while(Result::ok)
                .filter_map(|line| serde_json::from_str::<AuditRecord>(&line).ok())
                .filter(|r| r.at_ms >= since_ms && (principal.is_empty() || r.principal == principal))
                .collect();
            in_file.reverse();
            found.extend(in_file);
            if found.len() >= limit {
                break;
            }
        }
        found.truncate(limit);
        Ok(found)
    }
}

fn rotated(path: &Path, n: usize) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

fn append(path: &Path, record: &AuditRecord, bytes_max: u64) -> std::io::Result<()> {
    if std::fs::metadata(path).is_ok_and(|m| m.len() > bytes_max) {
        for n in (1..ROTATED_KEPT).rev() {
            let _ = std::fs::rename(rotated(path, n), rotated(path, n + 1));
        }
        std::fs::rename(path, rotated(path, 1))?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path)?
    };
    let mut line = serde_json::to_vec(record).map_err(std::io::Error::other)?;
    line.push(b'\n');
    file.write_all(&line)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(at_ms: u64, principal: &str) -> AuditRecord {
        AuditRecord {
            at_ms,
            node_id: 1,
            principal: principal.into(),
            action: "call".into(),
            target: "maos.v1.ClusterService/RemoveNode".into(),
            detail: serde_json::json!({"outcome": "0"}),
        }
    }

    #[test]
    fn records_rotate_by_size_and_list_newest_first_with_filters() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        // A small bound: the file rotates after the fifth record.
        for at in 0..5 {
            append(&path, &record(at, if at % 2 == 0 { "key:a" } else { "key:b" }), 600).unwrap();
        }
        append(&path, &record(10, "key:a"), 600).unwrap();
        assert!(rotated(&path, 1).exists());
        let (queue, _unused) = sync_channel(1);
        let file = AuditFile { queue, path };
        let all = file.list(0, "", 100).unwrap();
        assert_eq!(all.iter().map(|r| r.at_ms).collect::<Vec<_>>(), vec![10, 4, 3, 2, 1, 0]);
        let mine = file.list(2, "key:a", 100).unwrap();
        assert_eq!(mine.iter().map(|r| r.at_ms).collect::<Vec<_>>(), vec![10, 4, 2]);
        assert_eq!(file.list(0, "", 2).unwrap().len(), 2);
    }
}
