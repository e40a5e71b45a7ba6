//! openraft's async runtime: tokio, with a random source that a simulation can seed.
//!
//! openraft draws election timeouts from `AsyncRuntime::thread_rng()`. With tokio's default
//! runtime that is the OS-seeded `rand::thread_rng()`, which makes a turmoil run unrepeatable.
//! [`MaosRuntime`] draws from a per-thread `StdRng` instead: seeded from the OS unless
//! [`seed_thread_rng`] was called on this thread, as the simulation does with its seed.

use std::cell::RefCell;
use std::future::Future;
use std::rc::Rc;
use std::time::Duration;

use openraft::async_runtime::TokioOneShotSender;
use openraft::{AsyncRuntime, OptionalSend, TokioInstant};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

thread_local! {
    static THREAD_RNG: RefCell<Option<Rc<RefCell<StdRng>>>> = const { RefCell::new(None) };
}

/// Make every later draw on this thread come from `seed`. Simulations call this once per run.
pub fn seed_thread_rng(seed: u64) {
    THREAD_RNG.with(|slot| *slot.borrow_mut() = Some(Rc::new(RefCell::new(StdRng::seed_from_u64(seed)))));
}

/// A handle on this thread's random source.
#[derive(Debug, Clone)]
pub struct ThreadRng(Rc<RefCell<StdRng>>);

impl ThreadRng {
    fn current() -> Self {
        THREAD_RNG.with(|slot| {
            let mut slot = slot.borrow_mut();
            let rng = slot.get_or_insert_with(|| Rc::new(RefCell::new(StdRng::from_entropy())));
            ThreadRng(rng.clone())
        })
    }
}

impl RngCore for ThreadRng {
    fn next_u32(&mut self) -> u32 {
        self.0.borrow_mut().next_u32()
    }
    fn next_u64(&mut self) -> u64 {
        self.0.borrow_mut().next_u64()
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        self.0.borrow_mut().fill_bytes(dest)
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand::Error> {
        self.0.borrow_mut().try_fill_bytes(dest)
    }
}

/// tokio, with [`ThreadRng`] as the random source.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MaosRuntime;

impl AsyncRuntime for MaosRuntime {
    type JoinError = tokio::task::JoinError;
    type JoinHandle<T: OptionalSend + 'static> = tokio::task::JoinHandle<T>;
    type Sleep = tokio::time::Sleep;
    type Instant = TokioInstant;
    type TimeoutError = tokio::time::error::Elapsed;
    type Timeout<R, T: Future<Output = R> + OptionalSend> = tokio::time::Timeout<T>;
    type ThreadLocalRng = ThreadRng;
    type OneshotSender<T: OptionalSend> = TokioOneShotSender<T>;
    type OneshotReceiver<T: OptionalSend> = tokio::sync::oneshot::Receiver<T>;
    type OneshotReceiverError = tokio::sync::oneshot::error::RecvError;

    fn spawn<T>(future: T) -> Self::JoinHandle<T::Output>
    where
        T: Future + OptionalSend + 'static,
        T::Output: OptionalSend + 'static,
    {
        tokio::task::spawn(future)
    }

    fn sleep(duration: Duration) -> Self::Sleep {
        tokio::time::sleep(duration)
    }

    fn sleep_until(deadline: Self::Instant) -> Self::Sleep {
        tokio::time::sleep_until(deadline)
    }

    fn timeout<R, F: Future<Output = R> + OptionalSend>(duration: Duration, future: F) -> Self::Timeout<R, F> {
        tokio::time::timeout(duration, future)
    }

    fn timeout_at<R, F: Future<Output = R> + OptionalSend>(deadline: Self::Instant, future: F) -> Self::Timeout<R, F> {
        tokio::time::timeout_at(deadline, future)
    }

    fn is_panic(join_error: &Self::JoinError) -> bool {
        join_error.is_panic()
    }

    fn thread_rng() -> Self::ThreadLocalRng {
        ThreadRng::current()
    }

    fn oneshot<T>() -> (Self::OneshotSender<T>, Self::OneshotReceiver<T>)
    where
        T: OptionalSend,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (TokioOneShotSender(tx), rx)
    }
}

#[cfg(test)]
mod tests {
    use rand::Rng;

    use super::*;

    #[test]
    fn a_seed_replays_the_same_draws() {
        seed_thread_rng(42);
        let first: Vec<u64> = (0..4).map(|_| MaosRuntime::thread_rng().gen_range(0..1_000_000)).collect();
        seed_thread_rng(42);
        let second: Vec<u64> = (0..4).map(|_| MaosRuntime::thread_rng().gen_range(0..1_000_000)).collect();
        assert_eq!(first, second);
        seed_thread_rng(43);
        let third: Vec<u64> = (0..4).map(|_| MaosRuntime::thread_rng().gen_range(0..1_000_000)).collect();
        assert_ne!(first, third);
    }
}
