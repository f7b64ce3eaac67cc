//! `/readyz` of the operator: ready while it can list and watch the API. A replica whose list
//! and watch calls, and reconcile passes, have all failed for three resync intervals is not
//! ready (its Service endpoints drop it, `kubectl get pods` shows it), instead of answering 200
//! while it does nothing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Resync intervals of failure after which the operator is not ready.
pub const FAILED_RESYNCS: u32 = 3;

/// Whether an operator failing since `since` is ready at `now` (pure: see [`Readiness`]).
pub fn ready(since: Option<Instant>, now: Instant, resync: Duration) -> bool {
    since.is_none_or(|at| now.saturating_duration_since(at) < resync * FAILED_RESYNCS)
}

/// What the API calls have answered lately, and the flag `/readyz` reads.
#[derive(Clone, Debug)]
pub struct Readiness {
    /// When the failures began (none since the last success).
    failing_since: Arc<Mutex<Option<Instant>>>,
    resync: Duration,
    flag: Arc<AtomicBool>,
}

impl Readiness {
    /// Not ready until the first call succeeds.
    pub fn new(resync: Duration, flag: Arc<AtomicBool>) -> Self {
        flag.store(false, Ordering::Relaxed);
        Self {
            failing_since: Arc::new(Mutex::new(Some(Instant::now()))),
            resync,
            flag,
        }
    }

    /// A list, watch event or reconcile pass that worked.
    pub fn succeeded(&self) {
        *self.lock() = None;
        self.flag.store(true, Ordering::Relaxed);
    }

    /// One that failed.
    pub fn failed(&self) {
        self.lock().get_or_insert_with(Instant::now);
        self.check();
    }

    /// Updates the flag for the time passed (called on every resync tick too).
    pub fn check(&self) {
        let since = *self.lock();
        self.flag
            .store(ready(since, Instant::now(), self.resync), Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.failing_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_until_three_resyncs_of_nothing_but_failures() {
        let resync = Duration::from_secs(60);
        let start = Instant::now();
        assert!(ready(None, start, resync));
        assert!(ready(Some(start), start + Duration::from_secs(179), resync));
        assert!(!ready(
            Some(start),
            start + Duration::from_secs(180),
            resync
        ));
    }

    #[test]
    fn a_success_makes_it_ready_again_and_a_start_is_not_ready_until_one() {
        let flag = Arc::new(AtomicBool::new(true));
        let readiness = Readiness::new(Duration::from_millis(10), Arc::clone(&flag));
        assert!(
            !flag.load(Ordering::Relaxed),
            "ready before anything was listed"
        );
        readiness.succeeded();
        assert!(flag.load(Ordering::Relaxed));
        readiness.failed();
        assert!(
            flag.load(Ordering::Relaxed),
            "one failure is not three resyncs"
        );
        std::thread::sleep(Duration::from_millis(40));
        readiness.failed();
        assert!(!flag.load(Ordering::Relaxed), "failing for three resyncs");
        readiness.succeeded();
        assert!(flag.load(Ordering::Relaxed));
    }
}
