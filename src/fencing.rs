//! Fenced leadership: a replica acts only while it holds the lease, and only for the term in
//! which an operation started.
//!
//! `controller::leader` renews the lease and feeds this handle; reconciles take a [`Term`] when
//! they start. Everything a reconcile does is bound to that term: it is cancelled the moment
//! the term ends (lease lost, expired without renewal, or taken over and re-acquired), and
//! every status write carries the term's [`Fence`], which the database checks in the same
//! statement. A replica paused past its lease (GC pause, SIGSTOP, partition) therefore
//! neither starts a Hetzner call nor writes a row once it wakes up.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

pub use crate::db::leases::Fence;

/// One uninterrupted period of leadership.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Term {
    /// Changes whenever leadership is (re)gained; 0 for [`Leadership::always`].
    pub epoch: i64,
    /// Checked by the database on every status write; `None` for single-process tools.
    pub fence: Option<Fence>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Held {
    term: Term,
    /// Acting stops at this instant unless a renewal moves it.
    until: Instant,
}

/// Whether this replica may act, and until when. Leadership ends on its own when renewals
/// stop succeeding, even if the renew call hangs: a replica never acts on an expired lease.
#[derive(Clone, Debug)]
pub struct Leadership(Arc<watch::Sender<Option<Held>>>);

impl Default for Leadership {
    fn default() -> Self {
        Leadership(Arc::new(watch::Sender::new(None)))
    }
}

impl Leadership {
    /// A handle that always leads, unfenced (single-process tools and tests).
    pub fn always() -> Leadership {
        let forever = Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600);
        let held = Held {
            term: Term {
                epoch: 0,
                fence: None,
            },
            until: forever,
        };
        Leadership(Arc::new(watch::Sender::new(Some(held))))
    }

    pub fn is_leader(&self) -> bool {
        self.term().is_some()
    }

    /// The current term, if this replica leads now.
    pub fn term(&self) -> Option<Term> {
        self.0
            .borrow()
            .as_ref()
            .filter(|held| Instant::now() < held.until)
            .map(|held| held.term.clone())
    }

    /// Whether `term` is still the current one.
    pub fn holds(&self, term: &Term) -> bool {
        self.term().as_ref() == Some(term)
    }

    /// Resolves as soon as `term` is over: the lease was lost, expired, or a new term began.
    pub async fn ended(&self, term: &Term) {
        let mut changes = self.0.subscribe();
        loop {
            let until = match &*changes.borrow_and_update() {
                Some(held) if held.term == *term => held.until,
                _ => return,
            };
            if Instant::now() >= until {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(until.into()) => {}
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// The lease is held, as of a renew call started at `asked_at`, until `asked_at + valid`.
    pub fn renewed(&self, asked_at: Instant, valid: Duration, fence: Fence) {
        let term = Term {
            epoch: fence.epoch,
            fence: Some(fence),
        };
        self.0.send_replace(Some(Held {
            term,
            until: asked_at + valid,
        }));
    }

    pub fn lost(&self) {
        self.0.send_replace(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fence(epoch: i64) -> Fence {
        Fence {
            holder: "me".into(),
            epoch,
        }
    }

    #[test]
    fn leadership_expires_without_renewals() {
        let leadership = Leadership::default();
        assert!(!leadership.is_leader());
        leadership.renewed(Instant::now(), Duration::from_secs(10), fence(1));
        assert!(leadership.is_leader());
        leadership.renewed(
            Instant::now() - Duration::from_secs(20),
            Duration::from_secs(10),
            fence(1),
        );
        assert!(
            !leadership.is_leader(),
            "a renewal that is no longer valid does not count"
        );
        assert!(Leadership::always().is_leader());
        assert_eq!(Leadership::always().term().and_then(|t| t.fence), None);
    }

    #[tokio::test]
    async fn a_term_ends_on_loss_on_expiry_and_on_a_new_epoch() {
        let leadership = Leadership::default();
        leadership.renewed(Instant::now(), Duration::from_secs(60), fence(1));
        let first = leadership.term().expect("leads");

        // A renewal of the same term does not end it.
        leadership.renewed(Instant::now(), Duration::from_secs(60), fence(1));
        assert!(leadership.holds(&first));
        let still = tokio::time::timeout(Duration::from_millis(50), leadership.ended(&first));
        assert!(still.await.is_err(), "the term goes on");

        // Lost and taken again (another replica held it meanwhile): a new term.
        leadership.renewed(Instant::now(), Duration::from_secs(60), fence(3));
        assert!(!leadership.holds(&first));
        leadership.ended(&first).await;

        let third = leadership.term().expect("leads");
        let waiter = {
            let leadership = leadership.clone();
            let third = third.clone();
            tokio::spawn(async move { leadership.ended(&third).await })
        };
        leadership.lost();
        waiter.await.expect("ended resolves when the lease is lost");

        // Expiry alone ends it too, with no call to `lost`.
        leadership.renewed(Instant::now(), Duration::from_millis(30), fence(4));
        let fourth = leadership.term().expect("leads");
        leadership.ended(&fourth).await;
        assert!(!leadership.is_leader());
    }
}
