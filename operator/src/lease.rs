//! Leader election on a `coordination.k8s.io/v1` Lease, so that of several operator replicas
//! exactly one writes.
//!
//! kube's runtime ships no leader election; this follows client-go's `leaderelection`
//! package.
//!
//! # Expected flow
//!
//! [`LeaseLock::try_acquire_or_renew`] is called every [`LeaseConfig::retry_period`]. It reads
//! the Lease and then:
//! - creates it naming us when it does not exist;
//! - renews it when we hold it;
//! - takes it over when another holder has not renewed it for
//!   [`LeaseConfig::lease_duration`], measured on our own clock from when we first saw its
//!   current record (so clock skew between replicas does not matter, only clock rate);
//! - otherwise reports that someone else leads.
//!
//! Every write carries the `resourceVersion` it was computed from (create: none), so two
//! replicas racing for the same Lease cannot both succeed: the loser gets 409 Conflict and is
//! not leader.
//!
//! # Guarantees
//!
//! [`run_leader`] stops the work (cancels its token) when renewal has not succeeded for
//! [`LeaseConfig::renew_deadline`], which is shorter than the lease duration: the old leader
//! stops writing before any other replica may consider the Lease expired.
//!
//! # Caveats
//!
//! A write already sent when the deadline passes may still land; the margin between renew
//! deadline and lease duration (5 s by default) is what covers it.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::Api;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Timing of leader election (client-go's defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseConfig {
    /// How long a Lease not renewed stays with its holder.
    pub lease_duration: Duration,
    /// How long the leader keeps working without a successful renewal.
    pub renew_deadline: Duration,
    /// Interval between attempts to acquire or renew.
    pub retry_period: Duration,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// Errors talking to the API server about the Lease.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LeaseError {
    #[error("reading Lease {name}: {source}")]
    Get {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("writing Lease {name}: {source}")]
    Write {
        name: String,
        #[source]
        source: kube::Error,
    },
}

impl LeaseError {
    /// A stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            LeaseError::Get { .. } => "LeaseGet",
            LeaseError::Write { .. } => "LeaseWrite",
        }
    }
}

/// The outcome of one acquire-or-renew round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseState {
    /// We hold the Lease (just acquired or renewed).
    Leading,
    /// Someone else holds it (`None`: nobody, but we lost a race for it).
    Following(Option<String>),
}

/// One replica's handle on the Lease.
#[derive(Debug)]
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    config: LeaseConfig,
    /// The other holder's record as last seen, and when we first saw it.
    observed: Option<(ObservedRecord, Instant)>,
}

/// The fields that change when a holder renews or a new holder acquires.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ObservedRecord {
    holder: Option<String>,
    renew_time: Option<Timestamp>,
    transitions: Option<i32>,
}

impl ObservedRecord {
    fn of(lease: &Lease) -> Self {
        let spec = lease.spec.as_ref();
        ObservedRecord {
            holder: spec.and_then(|s| s.holder_identity.clone()),
            renew_time: spec.and_then(|s| s.renew_time.as_ref().map(|t| t.0)),
            transitions: spec.and_then(|s| s.lease_transitions),
        }
    }
}

impl LeaseLock {
    /// A lock on Lease `name` of `api`'s namespace for `identity` (usually the Pod name).
    pub fn new(api: Api<Lease>, name: &str, identity: &str, config: LeaseConfig) -> Self {
        LeaseLock {
            api,
            name: name.to_owned(),
            identity: identity.to_owned(),
            config,
            observed: None,
        }
    }

    /// Our identity.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// The configured timing.
    pub fn config(&self) -> LeaseConfig {
        self.config
    }

    /// One round of the election (see the module docs).
    ///
    /// # Errors
    /// [`LeaseError`] when the API server cannot be read or a write fails for another reason
    /// than a lost race (409 Conflict and 409 AlreadyExists mean [`LeaseState::Following`]).
    pub async fn try_acquire_or_renew(&mut self) -> Result<LeaseState, LeaseError> {
        let now = Instant::now();
        let current = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|source| LeaseError::Get {
                name: self.name.clone(),
                source,
            })?;
        let Some(current) = current else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.record(None, 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(LeaseState::Leading),
                Err(e) if is_conflict(&e) => Ok(LeaseState::Following(None)),
                Err(source) => Err(self.write_error(source)),
            };
        };

        let record = ObservedRecord::of(&current);
        let holder = record.holder.clone().filter(|h| !h.is_empty());
        let transitions = record.transitions.unwrap_or(0);
        let next = if holder.as_deref() == Some(self.identity.as_str()) {
            // Renewal keeps acquireTime and the transition count.
            let acquire = current.spec.as_ref().and_then(|s| s.acquire_time.clone());
            self.observed = None;
            self.record(acquire, transitions)
        } else {
            let first_seen = match &self.observed {
                Some((seen, at)) if *seen == record => *at,
                _ => {
                    self.observed = Some((record.clone(), now));
                    now
                }
            };
            let duration = current
                .spec
                .as_ref()
                .and_then(|s| s.lease_duration_seconds)
                .map_or(self.config.lease_duration, |s| {
                    Duration::from_secs(u64::try_from(s).unwrap_or(0))
                });
            if holder.is_some() && now.duration_since(first_seen) < duration {
                return Ok(LeaseState::Following(holder));
            }
            // Free (released) or expired: take it over.
            self.record(None, transitions + 1)
        };

        let mut lease = current.clone();
        lease.spec = Some(next);
        // `replace` sends the resourceVersion we read: a concurrent writer makes it fail.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => {
                self.observed = None;
                Ok(LeaseState::Leading)
            }
            Err(e) if is_conflict(&e) => Ok(LeaseState::Following(holder)),
            Err(source) => Err(self.write_error(source)),
        }
    }

    /// Gives the Lease up if we hold it, so a standby takes over at once instead of after the
    /// lease duration.
    ///
    /// # Errors
    /// [`LeaseError`] when the Lease cannot be read or written; a lost race is not an error.
    pub async fn release(&mut self) -> Result<(), LeaseError> {
        let current = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|source| LeaseError::Get {
                name: self.name.clone(),
                source,
            })?;
        let Some(mut lease) = current else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_conflict(&e) => Ok(()),
            Err(source) => Err(self.write_error(source)),
        }
    }

    fn record(&self, acquire: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        let now = MicroTime(Timestamp::now());
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(
                i32::try_from(self.config.lease_duration.as_secs()).unwrap_or(i32::MAX),
            ),
            acquire_time: Some(acquire.unwrap_or_else(|| now.clone())),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    fn write_error(&self, source: kube::Error) -> LeaseError {
        LeaseError::Write {
            name: self.name.clone(),
            source,
        }
    }
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(status) if status.code == 409)
}

/// Waits until `lock` leads, then keeps renewing it. Returns a token that is cancelled when
/// leadership is lost (renewal failed for the renew deadline) and the renewal task. Cancel
/// `shutdown` to stop renewing; the task then releases the Lease.
///
/// `on_attempt` is called after every round with whether the API server answered (for a
/// readiness check).
pub async fn run_leader(
    mut lock: LeaseLock,
    shutdown: CancellationToken,
    on_attempt: impl Fn(bool) + Send + 'static,
) -> Option<(CancellationToken, tokio::task::JoinHandle<()>)> {
    let config = lock.config();
    loop {
        match lock.try_acquire_or_renew().await {
            Ok(LeaseState::Leading) => {
                on_attempt(true);
                break;
            }
            Ok(LeaseState::Following(holder)) => {
                on_attempt(true);
                tracing::debug!(holder = ?holder, "not leader");
            }
            Err(e) => {
                on_attempt(false);
                tracing::warn!(error = %e, "leader election");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(config.retry_period) => {}
        }
    }
    tracing::info!(identity = lock.identity(), "became leader");
    let lost = CancellationToken::new();
    let task = {
        let lost = lost.clone();
        tokio::spawn(async move {
            let mut last_renewal = Instant::now();
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => {
                        if let Err(e) = lock.release().await {
                            tracing::warn!(error = %e, "releasing the Lease");
                        }
                        return;
                    }
                    _ = tokio::time::sleep(config.retry_period) => {}
                }
                // A hung request must not keep us "leading" past the deadline.
                let left = config.renew_deadline.saturating_sub(last_renewal.elapsed());
                let round = tokio::time::timeout(left, lock.try_acquire_or_renew()).await;
                let Ok(round) = round else {
                    tracing::error!("could not renew the Lease within the renew deadline");
                    lost.cancel();
                    return;
                };
                match round {
                    Ok(LeaseState::Leading) => {
                        on_attempt(true);
                        last_renewal = Instant::now();
                    }
                    Ok(LeaseState::Following(holder)) => {
                        tracing::error!(holder = ?holder, "leadership lost to another replica");
                        lost.cancel();
                        return;
                    }
                    Err(e) => {
                        on_attempt(false);
                        tracing::warn!(error = %e, "renewing the Lease");
                    }
                }
                if last_renewal.elapsed() >= config.renew_deadline {
                    tracing::error!("could not renew the Lease within the renew deadline");
                    lost.cancel();
                    return;
                }
            }
        })
    };
    Some((lost, task))
}

#[cfg(test)]
mod tests;
