//! The workflow's background work: reconciling studies as they arrive
//! (the ingest pipeline reports each stored instance's study) and the
//! time-driven checks (quiet periods, stale records, expiring consents).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use super::engine::Workflow;
use super::imaging::StudySummary;
use super::records::{RecordStore, WorkflowError};
use super::retention::Retention;
use crate::ids::{PartnerId, Uid};
use crate::store::MetadataStore;

/// A study some of whose instances were just stored.
pub type StudyKey = (PartnerId, Uid);

/// How the ingest pipeline reports stored instances (cheap: no I/O).
#[derive(Clone)]
pub struct Arrivals {
    tx: mpsc::UnboundedSender<StudyKey>,
}

impl Arrivals {
    pub fn channel() -> (Arrivals, mpsc::UnboundedReceiver<StudyKey>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Arrivals { tx }, rx)
    }

    /// Report a study; dropped silently when no runner listens (a
    /// `konsil import` process reconciles what it imported itself).
    pub fn report(&self, partner: &PartnerId, study: &Uid) {
        let _ = self.tx.send((partner.clone(), study.clone()));
    }
}

/// A study is reconciled once no instance of it arrived for this long (a
/// study streaming in costs one reconciliation, not one per instance, and
/// the ingest keeps the index's writer to itself meanwhile)...
const QUIET: Duration = Duration::from_secs(1);
/// ...or, while instances keep coming, at most this long after the first.
const MAX_DELAY: Duration = Duration::from_secs(30);

/// What the runner works with.
pub struct Runner {
    pub workflow: Arc<Workflow>,
    pub records: Arc<dyn RecordStore>,
    pub index: Arc<dyn MetadataStore>,
    /// Run once a day.
    pub retention: Retention,
}

/// How often retention runs inside `serve`.
const RETENTION_EVERY: Duration = Duration::from_secs(24 * 3600);

/// Sleep until `at`, or forever without one.
async fn sleep_until_or_forever(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Runner {
    /// Reconcile one study in its own transaction, then clear its durable
    /// arrival note (as of what was seen before reconciling).
    pub async fn reconcile(&self, key: &StudyKey) -> Result<(), WorkflowError> {
        let store = |e: crate::store::MetaError| WorkflowError::Store(e.to_string());
        let seq = self
            .index
            .pending_seq(&key.0, &key.1)
            .await
            .map_err(store)?;
        if let Some(summary) = StudySummary::load(&*self.index, &key.0, &key.1).await? {
            let mut tx = self.records.begin().await?;
            self.workflow
                .reconcile(tx.records(), &summary, now_ms())
                .await?;
            tx.commit().await?;
        }
        if let Some(seq) = seq {
            self.index
                .clear_pending_study(&key.0, &key.1, seq)
                .await
                .map_err(store)?;
        }
        Ok(())
    }

    /// Studies noted durably but not reconciled (a crash, or a `konsil
    /// import` next to this server).
    async fn pending(&self) -> Vec<StudyKey> {
        match self.index.pending_studies(1000).await {
            Ok(rows) => rows.into_iter().map(|(p, u, _)| (p, u)).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the pending study arrivals");
                Vec::new()
            }
        }
    }

    /// Run the time-driven checks once: each open case in a transaction of
    /// its own, so the store's writer is never held for all of them and one
    /// case that cannot be checked does not hold up the others. Returns how
    /// many cases moved.
    pub async fn tick(&self) -> Result<usize, WorkflowError> {
        let open = {
            let mut tx = self.records.begin().await?;
            self.workflow.open_cases(tx.records()).await?
        };
        let mut moved = 0;
        for task in open {
            match self.check(&task).await {
                Ok(true) => moved += 1,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(task = %task, error = %e, "time-driven check of a case failed; tried again at the next check")
                }
            }
        }
        Ok(moved)
    }

    /// Check one case now; whether it changed.
    async fn check(&self, task_ref: &str) -> Result<bool, WorkflowError> {
        let mut tx = self.records.begin().await?;
        // It may have moved on since the list was read.
        let Some(task) = tx.records().read(task_ref).await? else {
            return Ok(false);
        };
        let before = task.version;
        let after = self
            .workflow
            .check_case(tx.records(), task, now_ms())
            .await?;
        tx.commit().await?;
        Ok(after.version != before)
    }

    /// Until `stop` turns true: reconcile arriving studies, tick on the
    /// configured interval.
    pub async fn run(
        self,
        mut arrivals: mpsc::UnboundedReceiver<StudyKey>,
        mut stop: watch::Receiver<bool>,
    ) {
        let period = Duration::from_secs(self.workflow.config.check_interval_secs);
        let mut ticker = tokio::time::interval(period);
        // Studies whose reconciliation failed (a busy or failing store):
        // tried again at each tick until it works.
        let mut retry: BTreeSet<StudyKey> = BTreeSet::new();
        let mut retention = tokio::time::interval(RETENTION_EVERY);
        retention.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Studies arriving: (first, last) arrival since their last
        // reconciliation.
        let mut arriving: HashMap<StudyKey, (Instant, Instant)> = HashMap::new();
        loop {
            let due_at = arriving
                .values()
                .map(|(first, last)| (*last + QUIET).min(*first + MAX_DELAY))
                .min();
            tokio::select! {
                key = arrivals.recv() => {
                    let Some(key) = key else { break };
                    let now = Instant::now();
                    arriving.entry(key).and_modify(|e| e.1 = now).or_insert((now, now));
                }
                _ = sleep_until_or_forever(due_at) => {
                    let now = Instant::now();
                    let due: Vec<StudyKey> = arriving
                        .iter()
                        .filter(|(_, (first, last))| now >= *last + QUIET || now >= *first + MAX_DELAY)
                        .map(|(k, _)| k.clone())
                        .collect();
                    for key in due {
                        arriving.remove(&key);
                        if let Err(e) = self.reconcile(&key).await {
                            tracing::warn!(partner = %key.0, error = %e, "study reconciliation failed; tried again at the next check");
                            retry.insert(key);
                        }
                    }
                }
                _ = ticker.tick() => {
                    // Noted durably but not heard of (a crash, an import);
                    // studies still arriving wait for their quiet moment.
                    retry.extend(
                        self.pending()
                            .await
                            .into_iter()
                            .filter(|k| !arriving.contains_key(k)),
                    );
                    for key in std::mem::take(&mut retry) {
                        if let Err(e) = self.reconcile(&key).await {
                            tracing::warn!(partner = %key.0, error = %e, "study reconciliation failed again");
                            retry.insert(key);
                        }
                    }
                    match self.tick().await {
                        Ok(0) => {}
                        Ok(moved) => tracing::info!(cases = moved, "time-driven checks moved cases"),
                        Err(e) => tracing::warn!(error = %e, "time-driven case checks failed"),
                    }
                }
                _ = retention.tick() => {
                    match self.retention.run(now_ms(), false).await {
                        Ok(cases) if cases.is_empty() => {}
                        Ok(cases) => tracing::info!(cases = cases.len(), "retention discarded the records of inactive cases"),
                        Err(e) => tracing::warn!(error = %e, "retention failed; it runs again tomorrow"),
                    }
                }
                _ = async { let _ = stop.wait_for(|s| *s).await; } => break,
            }
        }
    }
}
