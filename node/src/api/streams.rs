//! Open streams (task and key watches, worker assignment streams): one bound per node, and
//! the wait between a watch's looks at the applied state.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tonic::Status;

/// The longest a watch waits before looking again without being woken.
const WATCH_POLL: Duration = Duration::from_millis(100);
/// Polls of one watch stay this far apart, however fast entries apply.
const WATCH_GAP_MIN: Duration = Duration::from_millis(10);

/// Open streams one node serves at most; beyond, a watch is refused with RESOURCE_EXHAUSTED.
pub const STREAMS_MAX: usize = 4_096;

/// Wait until a watch should look again: an applied change (or WATCH_POLL without one), then
/// WATCH_GAP_MIN, so a write storm costs a watcher a bounded rescan rate. False when the
/// watcher left or Raft stopped (then the stream ends with UNAVAILABLE).
pub async fn next_poll<T>(
    changes: &mut tokio::sync::watch::Receiver<openraft::RaftMetrics<u64, maos_raft_store::MaosNode>>,
    sender: &mpsc::Sender<Result<T, Status>>,
) -> bool {
    let raft_stopped = tokio::select! {
        woken = tokio::time::timeout(WATCH_POLL, changes.changed()) => matches!(woken, Ok(Err(_))),
        _ = sender.closed() => return false,
    };
    if raft_stopped {
        let _ = sender.send(Err(Status::unavailable("the node is stopping; watch again through another node"))).await;
        return false;
    }
    tokio::time::sleep(WATCH_GAP_MIN).await;
    true
}

/// A permit for one more stream, or RESOURCE_EXHAUSTED.
pub fn stream_permit(streams: &Arc<tokio::sync::Semaphore>) -> Result<tokio::sync::OwnedSemaphorePermit, Status> {
    streams.clone().try_acquire_owned().map_err(|_| {
        Status::resource_exhausted(format!(
            "streams: {STREAMS_MAX} watches and worker streams are open on this node; close some or use another node"
        ))
    })
}
