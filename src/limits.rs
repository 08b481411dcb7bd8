//! Per-partner limits (`[[partners]] requests_per_minute`,
//! `max_associations`): one partner's burst or runaway script must not
//! starve the others. Requests are counted, not bytes, so a streaming
//! upload costs one request however long it runs.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::Config;
use crate::ids::PartnerId;

/// The limits of every partner that has some.
pub struct PartnerLimits {
    requests: HashMap<PartnerId, DefaultDirectRateLimiter>,
    associations: HashMap<PartnerId, (usize, Arc<Semaphore>)>,
}

impl PartnerLimits {
    pub fn new(config: &Config) -> PartnerLimits {
        let mut requests = HashMap::new();
        let mut associations = HashMap::new();
        for partner in &config.partners {
            if let Some(per_minute) = partner.requests_per_minute.and_then(NonZeroU32::new) {
                // The whole minute's allowance may come as one burst.
                let quota = Quota::per_minute(per_minute);
                requests.insert(partner.id.clone(), RateLimiter::direct(quota));
            }
            if let Some(max) = partner.max_associations {
                associations.insert(partner.id.clone(), (max, Arc::new(Semaphore::new(max))));
            }
        }
        PartnerLimits {
            requests,
            associations,
        }
    }

    /// Count one HTTP request of `partner`: `Err(seconds)` to wait when
    /// it is over its rate.
    pub fn request(&self, partner: &PartnerId) -> Result<(), u64> {
        let Some(limiter) = self.requests.get(partner) else {
            return Ok(());
        };
        limiter.check().map_err(|not_until| {
            let wait = not_until.wait_time_from(governor::clock::Clock::now(
                &governor::clock::DefaultClock::default(),
            ));
            wait.as_secs().max(1)
        })
    }

    /// Whether any partner has an association cap of its own.
    pub fn caps_associations(&self) -> bool {
        !self.associations.is_empty()
    }

    /// Whether `partner` is at its association cap right now.
    pub fn associations_full(&self, partner: &PartnerId) -> bool {
        self.associations
            .get(partner)
            .is_some_and(|(_, slots)| slots.available_permits() == 0)
    }

    /// Take one of `partner`'s association slots, held until the returned
    /// permit is dropped: `Err(max)` when all are taken.
    pub fn association(&self, partner: &PartnerId) -> Result<Option<OwnedSemaphorePermit>, usize> {
        match self.associations.get(partner) {
            None => Ok(None),
            Some((max, slots)) => Arc::clone(slots)
                .try_acquire_owned()
                .map(Some)
                .map_err(|_| *max),
        }
    }
}

/// Where a connection keeps the association slot its partner's limit gave
/// it (taken while the association request is checked, released when the
/// connection ends).
#[derive(Debug, Clone, Default)]
pub struct AssociationSlot(Arc<Mutex<Option<OwnedSemaphorePermit>>>);

impl AssociationSlot {
    pub fn hold(&self, permit: OwnedSemaphorePermit) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(permit);
        }
    }
}
