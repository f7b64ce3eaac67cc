//! Following one object by name with kube's watcher: a list, then a watch from the list's
//! resourceVersion, watched again from where it was each time the server ends a watch. After
//! a failure (`410 Gone` included) the watcher is started afresh after a backoff ([`Retry`]),
//! so it begins with a list: the source counts as up again once a list has answered, not
//! merely once no error has been seen for a while (a watch that reconnects in silence tells
//! nothing until the object changes). The field selector `metadata.name=NAME` lets the Role name
//! exactly the objects the relay reads (`resourceNames` with `list` and `watch`).
//!
//! [`Follow`] turns the watcher's events into what the source needs to know about the one
//! object — it is there with this content, it is not there, the API failed — and is a pure
//! function of the events, tested on its own.

use futures_util::StreamExt;
use kube::runtime::watcher::{self, Event};
use std::time::Duration;

/// What following an object reports.
#[derive(Clone, Debug, PartialEq)]
pub enum Report<D> {
    /// The object as it is now, after a (re-)list or a change; `None`: it does not exist.
    Object(Option<D>),
    /// Listing or watching failed; the watcher backs off and tries again.
    Failed(String),
}

/// The state between the watcher's events: during a (re-)list, what the list holds so far.
#[derive(Debug)]
pub struct Follow<D> {
    listing: Option<Option<D>>,
}

impl<D> Default for Follow<D> {
    fn default() -> Self {
        Self { listing: None }
    }
}

impl<D> Follow<D> {
    /// The report an event makes, if any. A list is reported once, when it is complete, so a
    /// re-list after `410 Gone` that finds the object unchanged reports it unchanged, and one
    /// that finds nothing reports it gone (a deletion missed while the watch was down).
    pub fn on(&mut self, event: Result<Event<D>, String>) -> Option<Report<D>> {
        match event {
            Ok(Event::Init) => {
                self.listing = Some(None);
                None
            }
            Ok(Event::InitApply(object)) => {
                self.listing = Some(Some(object));
                None
            }
            Ok(Event::InitDone) => Some(Report::Object(self.listing.take().flatten())),
            Ok(Event::Apply(object)) => Some(Report::Object(Some(object))),
            Ok(Event::Delete(_)) => Some(Report::Object(None)),
            Err(e) => Some(Report::Failed(e)),
        }
    }
}

/// Follows object `name` of `api` until the receiver is gone, sending `(tag, report)` for each
/// report; `read` takes from each version of the object what the source keeps.
pub async fn follow<K, D, T>(
    api: kube::Api<K>,
    name: String,
    read: fn(K) -> D,
    tag: T,
    reports: tokio::sync::mpsc::Sender<(T, Report<D>)>,
) where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    T: Clone,
{
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut retry = Retry::default();
    loop {
        let mut events = std::pin::pin!(watcher::watcher(api.clone(), config.clone()));
        let mut follow = Follow::default();
        while let Some(event) = events.next().await {
            let event = event.map(|e| map_event(e, read)).map_err(|e| e.to_string());
            let failed = event.is_err();
            if let Some(report) = follow.on(event) {
                if matches!(report, Report::Object(_)) {
                    retry.reset();
                }
                if reports.send((tag.clone(), report)).await.is_err() {
                    return;
                }
            }
            if failed {
                break;
            }
        }
        tokio::time::sleep(retry.next().unwrap_or(RETRY_MAX)).await;
    }
}

/// The wait between failed attempts: 0.5 s doubling to 5 s, each lengthened by up to a fifth
/// at random so that many replicas do not retry in step; back to 0.5 s after a success.
///
/// kube's default (client-go's: 0.8 s doubling to 30 s, with jitter up to twice that) suits a
/// controller listing thousands of objects. A relay follows two or three small objects by
/// name, and while it is not watching, a change to its configuration waits: with the default
/// it could serve a stale password for a minute after the API server came back.
#[derive(Debug)]
pub struct Retry {
    next: Duration,
    jitter: std::collections::hash_map::RandomState,
    attempt: u64,
}

const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(5);

impl Default for Retry {
    fn default() -> Self {
        Self {
            next: RETRY_FIRST,
            jitter: std::collections::hash_map::RandomState::new(),
            attempt: 0,
        }
    }
}

impl Iterator for Retry {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        use std::hash::BuildHasher;
        let delay = self.next;
        self.next = (self.next * 2).min(RETRY_MAX);
        self.attempt += 1;
        let fifth = u64::try_from(delay.as_millis() / 5).unwrap_or(0).max(1);
        let extra = self.jitter.hash_one(self.attempt) % fifth;
        Some(delay + Duration::from_millis(extra))
    }
}

impl Retry {
    /// After a success: the next failure waits the shortest time again.
    pub fn reset(&mut self) {
        self.next = RETRY_FIRST;
    }
}

fn map_event<K, D>(event: Event<K>, read: fn(K) -> D) -> Event<D> {
    match event {
        Event::Apply(k) => Event::Apply(read(k)),
        Event::Delete(k) => Event::Delete(read(k)),
        Event::Init => Event::Init,
        Event::InitApply(k) => Event::InitApply(read(k)),
        Event::InitDone => Event::InitDone,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_double_from_half_a_second_to_five_and_start_again_after_a_success() {
        let mut retry = Retry::default();
        let waits: Vec<Duration> = retry.by_ref().take(6).collect();
        let bases = [500, 1000, 2000, 4000, 5000, 5000];
        for (wait, base) in waits.iter().zip(bases) {
            let base = Duration::from_millis(base);
            assert!(*wait >= base && *wait <= base + base / 5, "{waits:?}");
        }
        retry.reset();
        assert!(retry.next().is_some_and(|d| d < Duration::from_millis(601)));
    }

    fn run(events: Vec<Result<Event<&'static str>, String>>) -> Vec<Report<&'static str>> {
        let mut follow = Follow::default();
        events.into_iter().filter_map(|e| follow.on(e)).collect()
    }

    #[test]
    fn a_list_is_reported_once_complete() {
        assert_eq!(
            run(vec![
                Ok(Event::Init),
                Ok(Event::InitApply("v1")),
                Ok(Event::InitDone)
            ]),
            vec![Report::Object(Some("v1"))]
        );
    }

    #[test]
    fn a_list_that_finds_nothing_reports_the_object_absent() {
        assert_eq!(
            run(vec![Ok(Event::Init), Ok(Event::InitDone)]),
            vec![Report::Object(None)]
        );
    }

    #[test]
    fn changes_and_deletions_are_reported_as_they_come() {
        assert_eq!(
            run(vec![
                Ok(Event::Init),
                Ok(Event::InitDone),
                Ok(Event::Apply("v2")),
                Ok(Event::Delete("v2")),
            ]),
            vec![
                Report::Object(None),
                Report::Object(Some("v2")),
                Report::Object(None)
            ]
        );
    }

    #[test]
    fn a_relist_after_gone_that_misses_a_deletion_reports_it() {
        // The object existed; the watch expired (410) and the new list no longer has it.
        assert_eq!(
            run(vec![
                Ok(Event::Init),
                Ok(Event::InitApply("v1")),
                Ok(Event::InitDone),
                Err("410 Gone".into()),
                Ok(Event::Init),
                Ok(Event::InitDone),
            ]),
            vec![
                Report::Object(Some("v1")),
                Report::Failed("410 Gone".into()),
                Report::Object(None)
            ]
        );
    }

    #[test]
    fn a_failure_in_the_middle_of_a_list_drops_what_it_had_found() {
        assert_eq!(
            run(vec![
                Ok(Event::Init),
                Ok(Event::InitApply("half")),
                Err("connection reset".into()),
                Ok(Event::Init),
                Ok(Event::InitApply("v3")),
                Ok(Event::InitDone),
            ]),
            vec![
                Report::Failed("connection reset".into()),
                Report::Object(Some("v3"))
            ]
        );
    }
}
