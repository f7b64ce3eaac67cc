//! The memory budget for message content (`--max-inflight-bytes`, SPEC 5.1): every octet of
//! content the relay holds, across all sessions, from the first octet received until the
//! message's delivery is over, is counted against one limit. A transaction that would go over
//! it is answered `452 4.3.1` (at MAIL when it declared `SIZE=`, else at end of data), so a
//! flood of large messages makes clients retry later instead of the relay being killed for
//! running out of memory.

use prometheus_client::metrics::gauge::Gauge;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Octets held at once, at most.
#[derive(Debug)]
pub struct Budget {
    limit: usize,
    used: AtomicUsize,
    /// `mailroute_relay_inflight_bytes`, kept equal to `used`.
    gauge: Option<Gauge>,
}

/// Part of the budget held by one transaction; given back when dropped.
#[derive(Debug)]
pub struct Held {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Budget {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            used: AtomicUsize::new(0),
            gauge: None,
        })
    }

    /// A budget whose use is shown in `gauge`.
    pub fn observed(limit: usize, gauge: Gauge) -> Arc<Self> {
        Arc::new(Self {
            limit,
            used: AtomicUsize::new(0),
            gauge: Some(gauge),
        })
    }

    fn show(&self, delta: i64) {
        if let Some(gauge) = &self.gauge {
            gauge.inc_by(delta);
        }
    }

    /// No limit (protocol tests).
    pub fn unlimited() -> Arc<Self> {
        Self::new(usize::MAX)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Octets held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn take(&self, bytes: usize) -> bool {
        let taken = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|total| *total <= self.limit)
            })
            .is_ok();
        if taken {
            self.show(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
        taken
    }

    /// Holds `bytes` for a new transaction, unless that would exceed the limit.
    pub fn hold(self: &Arc<Self>, bytes: usize) -> Option<Held> {
        self.take(bytes).then(|| Held {
            budget: Arc::clone(self),
            bytes,
        })
    }
}

impl Held {
    /// Holds at least `bytes` in all; false (and nothing more held) when the budget is spent.
    pub fn grow_to(&mut self, bytes: usize) -> bool {
        if bytes <= self.bytes {
            return true;
        }
        if self.budget.take(bytes - self.bytes) {
            self.bytes = bytes;
            true
        } else {
            false
        }
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
        self.budget
            .show(-i64::try_from(self.bytes).unwrap_or(i64::MAX));
    }
}

/// The default budget: half the memory the relay may use (the container's cgroup limit, else
/// the machine's memory), so content never takes the room the rest of the process needs.
pub fn default_limit() -> usize {
    let cgroup = [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .filter_map(|p| std::fs::read_to_string(p).ok())
    .filter_map(|v| v.trim().parse::<u64>().ok())
    // NB: "max" (v2) does not parse; v1 reports "unlimited" as a huge number.
    .find(|v| *v < 1 << 50);
    let total = cgroup.or_else(|| {
        std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map(|kib| kib * 1024)
        })
    });
    total.map_or(512 << 20, |t| usize::try_from(t / 2).unwrap_or(usize::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_never_exceed_the_limit_and_are_given_back() {
        let budget = Budget::new(100);
        let mut a = budget.hold(60).unwrap_or_else(|| panic!("first"));
        assert!(budget.hold(50).is_none());
        let b = budget.hold(40).unwrap_or_else(|| panic!("second"));
        assert!(!a.grow_to(61));
        assert_eq!((a.bytes(), budget.used()), (60, 100));
        drop(b);
        assert!(a.grow_to(90));
        drop(a);
        assert_eq!(budget.used(), 0);
        assert!(default_limit() > 0);
    }

    #[test]
    fn the_gauge_shows_what_is_held() {
        let gauge = Gauge::default();
        let budget = Budget::observed(1000, gauge.clone());
        let mut a = budget.hold(100).unwrap_or_else(|| panic!("hold"));
        assert!(a.grow_to(400));
        assert!(!a.grow_to(2000));
        assert_eq!(gauge.get(), 400);
        drop(a);
        assert_eq!(gauge.get(), 0);
    }
}
