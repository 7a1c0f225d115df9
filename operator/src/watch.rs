//! Backoff for watch streams that actually grows.
//!
//! kube-runtime's `default_backoff()` resets its delay on every `Ok` item, and a watcher
//! yields `Ok(Event::Init)` each time it starts a (re)list, before the list request is even
//! made. A list that keeps failing (RBAC forbids it, the API server refuses the namespace)
//! therefore retries every 0.8 s forever: seen on a real API server, 26 refused lists in 30 s
//! for one Secret namespace. [`backoff`] resets only on progress (an object listed, applied or
//! deleted, or a list completed), so such a watch backs off 1 s, 2 s, 4 s ... up to
//! [`MAX_DELAY`], and a healthy one (a `410 Gone`, an API server restart) still retries within
//! a second.

use std::time::Duration;

use futures::{Stream, StreamExt};
use kube::runtime::watcher;

/// First delay after an error.
pub const FIRST_DELAY: Duration = Duration::from_secs(1);
/// Longest delay between two attempts.
pub const MAX_DELAY: Duration = Duration::from_secs(60);

/// The delay schedule: doubling from [`FIRST_DELAY`] to [`MAX_DELAY`].
#[derive(Debug, Clone, Default)]
pub struct Delays {
    failures: u32,
}

impl Delays {
    /// The delay before the next attempt, after one more failure.
    pub fn next_delay(&mut self) -> Duration {
        let d = FIRST_DELAY
            .saturating_mul(1u32 << self.failures.min(16))
            .min(MAX_DELAY);
        self.failures = self.failures.saturating_add(1);
        d
    }

    /// Progress was made: the next failure waits [`FIRST_DELAY`] again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// Whether a watcher event shows that the watch works (not just that a list is starting).
pub fn is_progress<K>(event: &watcher::Event<K>) -> bool {
    !matches!(event, watcher::Event::Init)
}

/// Passes `stream` through; after an error, waits (see the module docs) before polling it
/// again. Errors are yielded at once, so callers log them when they happen.
pub fn backoff<K, S>(stream: S) -> impl Stream<Item = Result<watcher::Event<K>, watcher::Error>>
where
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    K: Send + 'static,
{
    futures::stream::unfold(
        (stream.boxed(), Delays::default(), None::<Duration>),
        |(mut inner, mut delays, wait)| async move {
            if let Some(d) = wait {
                tokio::time::sleep(d).await;
            }
            let item = inner.next().await?;
            let wait = match &item {
                Err(_) => Some(delays.next_delay()),
                Ok(event) => {
                    if is_progress(event) {
                        delays.reset();
                    }
                    None
                }
            };
            Some((item, (inner, delays, wait)))
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_and_reset() {
        let mut d = Delays::default();
        let got: Vec<u64> = (0..9).map(|_| d.next_delay().as_secs()).collect();
        assert_eq!(got, vec![1, 2, 4, 8, 16, 32, 60, 60, 60]);
        d.reset();
        assert_eq!(d.next_delay(), FIRST_DELAY);
    }

    #[test]
    fn init_is_not_progress_but_everything_else_is() {
        assert!(!is_progress::<()>(&watcher::Event::Init));
        assert!(is_progress::<()>(&watcher::Event::InitDone));
        assert!(is_progress(&watcher::Event::Apply(())));
        assert!(is_progress(&watcher::Event::InitApply(())));
        assert!(is_progress(&watcher::Event::Delete(())));
    }

    /// A watcher that fails its list three times (each attempt starting with `Init`, as
    /// kube's does) waits 1 + 2 + 4 s between them, then resets once a list succeeds.
    #[tokio::test(start_paused = true)]
    async fn failing_lists_back_off_and_success_resets() {
        let fail = || Err(watcher::Error::NoResourceVersion);
        let items: Vec<Result<watcher::Event<u8>, watcher::Error>> = vec![
            Ok(watcher::Event::Init),
            fail(),
            Ok(watcher::Event::Init),
            fail(),
            Ok(watcher::Event::Init),
            fail(),
            Ok(watcher::Event::Init),
            Ok(watcher::Event::InitApply(1)),
            Ok(watcher::Event::InitDone),
            fail(),
            Ok(watcher::Event::Init),
        ];
        let start = tokio::time::Instant::now();
        let mut s = Box::pin(backoff(futures::stream::iter(items)));
        let mut at = Vec::new();
        while let Some(item) = s.next().await {
            at.push((item.is_err(), start.elapsed().as_secs()));
        }
        assert_eq!(
            at,
            vec![
                (false, 0),
                (true, 0),
                (false, 1),
                (true, 1),
                (false, 3),
                (true, 3),
                (false, 7),
                (false, 7),
                (false, 7),
                (true, 7),
                (false, 8),
            ]
        );
    }
}
