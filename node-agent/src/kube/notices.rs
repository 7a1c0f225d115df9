//! Kubernetes Events on a Target for refused logins and dropped sessions.
//!
//! Reads [`target_core::events`]'s notice feed and publishes a Warning Event on the Target of
//! this node that serves the notice's IQN (a notice for a target no Target object of this
//! node names is dropped). Rate-limited by [`Limiter`], so an initiator retrying a refused
//! login every second, or a thousand of them, cannot flood the API server: at most one Event
//! per (Target, reason, initiator) per [`KEY_WINDOW`], at most [`EVENTS_PER_WINDOW`] Events
//! per window in all; the next Event of a key says how many were left out before it.
//!
//! Event reasons: `LoginAuthFailed`, `LoginNotInACL`, `LoginProtocolError` (refused logins);
//! `SessionDropped` (the connection closed or failed without a Logout), `SessionTimedOut`
//! (NOP-In pings unanswered), `SessionAccessRevoked` (an ACL or CHAP change ended it).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::runtime::events::{Event, EventType};
use target_core::events::Notice;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::reconcile::{publish, Context};

/// One Event per key per this long.
pub const KEY_WINDOW: Duration = Duration::from_secs(60);
/// Events in all per [`KEY_WINDOW`].
pub const EVENTS_PER_WINDOW: usize = 30;
/// Keys remembered at most (older ones are forgotten first, once their window has passed).
const MAX_KEYS: usize = 4096;

type Key = (String, &'static str, String);

/// Decides which notices become Events.
#[derive(Debug, Default)]
pub struct Limiter {
    keys: HashMap<Key, KeyState>,
    /// When each Event of the current window was let through.
    recent: std::collections::VecDeque<Instant>,
}

#[derive(Debug)]
struct KeyState {
    last: Instant,
    left_out: u64,
}

impl Limiter {
    /// Whether an Event for `key` may go out at `now`: `Some(n)` with the number of notices of
    /// that key left out since its last Event, or `None`.
    pub fn admit(
        &mut self,
        target: &str,
        reason: &'static str,
        initiator: &str,
        now: Instant,
    ) -> Option<u64> {
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= KEY_WINDOW)
        {
            self.recent.pop_front();
        }
        let key = (target.to_owned(), reason, initiator.to_owned());
        if let Some(k) = self.keys.get_mut(&key) {
            if now.duration_since(k.last) < KEY_WINDOW || self.recent.len() >= EVENTS_PER_WINDOW {
                k.left_out += 1;
                return None;
            }
            let left_out = std::mem::take(&mut k.left_out);
            k.last = now;
            self.recent.push_back(now);
            return Some(left_out);
        }
        if self.recent.len() >= EVENTS_PER_WINDOW {
            return None;
        }
        if self.keys.len() >= MAX_KEYS {
            self.keys
                .retain(|_, k| now.duration_since(k.last) < KEY_WINDOW);
            if self.keys.len() >= MAX_KEYS {
                return None;
            }
        }
        self.keys.insert(
            key,
            KeyState {
                last: now,
                left_out: 0,
            },
        );
        self.recent.push_back(now);
        Some(0)
    }
}

/// The Event a notice becomes (before rate limiting): its reason, action and note.
pub fn event_of(notice: &Notice) -> (&'static str, &'static str, String, &str) {
    match notice {
        Notice::LoginRefused {
            initiator,
            peer,
            outcome,
            message,
            ..
        } => (
            outcome.event_reason(),
            "Login",
            format!("login of {initiator} from {peer} refused: {message}"),
            initiator,
        ),
        Notice::SessionDropped {
            initiator,
            peer,
            end,
            ..
        } => (
            end.event_reason(),
            "Session",
            format!("session of {initiator} from {peer} ended: {}", end.as_str()),
            initiator,
        ),
    }
}

/// Publishes Events for the notices of `feed` until `shutdown`.
pub async fn run(
    ctx: Arc<Context>,
    mut feed: tokio::sync::broadcast::Receiver<Notice>,
    shutdown: CancellationToken,
) {
    let mut limiter = Limiter::default();
    loop {
        let notice = tokio::select! {
            _ = shutdown.cancelled() => return,
            n = feed.recv() => match n {
                Ok(n) => n,
                Err(RecvError::Lagged(n)) => {
                    debug!(lost = n, "notices arrived faster than Events go out; some left out");
                    continue;
                }
                Err(RecvError::Closed) => return,
            },
        };
        let node = ctx.syncer.node();
        let Some(target) =
            ctx.stores.targets.state().into_iter().find(|t| {
                t.spec.iqn == notice.target() && t.spec.node_name.as_deref() == Some(node)
            })
        else {
            continue;
        };
        let (reason, action, mut note, initiator) = event_of(&notice);
        let Some(left_out) = limiter.admit(notice.target(), reason, initiator, Instant::now())
        else {
            continue;
        };
        if left_out > 0 {
            note.push_str(&format!(
                " ({left_out} more like it since the last Event, left out)"
            ));
        }
        // Event notes are limited to 1 KiB by the API server.
        if note.len() > 1000 {
            let mut cut = 1000;
            while !note.is_char_boundary(cut) {
                cut -= 1;
            }
            note.truncate(cut);
        }
        publish(
            &ctx,
            &target,
            Event {
                type_: EventType::Warning,
                reason: reason.to_owned(),
                note: Some(note),
                action: action.to_owned(),
                secondary: None,
            },
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_event_per_key_per_window_then_the_count_of_those_left_out() {
        let mut l = Limiter::default();
        let t0 = Instant::now();
        assert_eq!(l.admit("t", "LoginAuthFailed", "i", t0), Some(0));
        for s in 1..10 {
            assert_eq!(
                l.admit("t", "LoginAuthFailed", "i", t0 + Duration::from_secs(s)),
                None
            );
        }
        // Another initiator or reason is another key.
        assert_eq!(l.admit("t", "LoginAuthFailed", "j", t0), Some(0));
        assert_eq!(l.admit("t", "LoginNotInACL", "i", t0), Some(0));
        assert_eq!(
            l.admit("t", "LoginAuthFailed", "i", t0 + KEY_WINDOW),
            Some(9)
        );
    }

    #[test]
    fn many_initiators_are_capped_in_all() {
        let mut l = Limiter::default();
        let t0 = Instant::now();
        let admitted = (0..1000)
            .filter(|i| {
                l.admit("t", "LoginNotInACL", &format!("iqn.{i}"), t0)
                    .is_some()
            })
            .count();
        assert_eq!(admitted, EVENTS_PER_WINDOW);
        // The window passes: Events go out again.
        assert!(l
            .admit("t", "LoginNotInACL", "iqn.new", t0 + KEY_WINDOW)
            .is_some());
    }
}
