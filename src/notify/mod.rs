//! R4 Subscription notifications over rest-hook. Matching runs inside the
//! transaction that changes a resource and queues an outbox row with it
//! (so a committed change is always announced, and an uncommitted one
//! never); the [`Deliverer`] sends what is due, retrying with exponential
//! back-off for days, keeps `Subscription.status` / `error` honest and
//! records every attempt as an `AuditEvent`. Notifications carry ids only:
//! no PHI travels in them.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::watch;

use crate::config::WorkflowConfig;
use crate::fhir::search;
use crate::ids::PartnerId;
use crate::store::fhir::{
    Attempt, Clause, Notification, ResourceQuery, ResourceStore, ResourceTx, Sort,
};
use crate::store::MetaError;
use crate::workflow::engine::{instant_text, SERVICE_ORGANIZATION};
use crate::workflow::records::{items, RecordStore, WorkflowError};

/// A resource an interaction changed.
#[derive(Debug, Clone)]
pub struct Changed {
    pub resource_type: String,
    pub id: String,
    pub partner: Option<PartnerId>,
}

/// Types whose changes are never announced (the notification machinery's
/// own records; announcing them would feed back).
const SILENT: &[&str] = &["Subscription", "AuditEvent"];

/// The resource type and search clauses of `Subscription.criteria`
/// (`Task?focus=ServiceRequest/1`), or why they are unusable.
pub fn criteria(criteria: &str) -> Result<(String, Vec<Clause>), String> {
    let (resource_type, query) = criteria.split_once('?').unwrap_or((criteria, ""));
    if !crate::fhir::served(resource_type) {
        return Err(format!(
            "criteria: {resource_type} is not a resource type this server serves"
        ));
    }
    let mut clauses = Vec::new();
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        match search::parse_param(resource_type, &name, &value) {
            Ok(Some(clause)) => clauses.push(clause),
            Ok(None) => {
                return Err(format!(
                    "criteria: {name} is not a search parameter of {resource_type}"
                ))
            }
            Err(issue) => return Err(format!("criteria: {}", issue.diagnostics)),
        }
    }
    Ok((resource_type.to_owned(), clauses))
}

/// Queue a notification for each active Subscription that a changed
/// resource matches (and whose owner may see it).
pub async fn announce(
    tx: &mut dyn ResourceTx,
    changed: &[Changed],
    now_ms: i64,
) -> Result<(), MetaError> {
    let changed: Vec<&Changed> = changed
        .iter()
        .filter(|c| !SILENT.contains(&c.resource_type.as_str()))
        .collect();
    if changed.is_empty() {
        return Ok(());
    }
    let active = match search::parse_param("Subscription", "status", "active") {
        Ok(Some(clause)) => clause,
        _ => return Ok(()),
    };
    let subscriptions = tx
        .search(&ResourceQuery {
            resource_type: "Subscription".into(),
            partners: None,
            clauses: vec![active],
            sort: Sort::Created,
            after: None,
            count: 10_000,
            want_total: false,
        })
        .await?;
    for sub in subscriptions.resources {
        let Some(body) = sub
            .body
            .as_deref()
            .and_then(|b| serde_json::from_str::<Value>(b).ok())
        else {
            continue;
        };
        let Some(Ok((resource_type, clauses))) =
            body.get("criteria").and_then(Value::as_str).map(criteria)
        else {
            continue;
        };
        for c in &changed {
            if c.resource_type != resource_type {
                continue;
            }
            if sub.partner.is_some() && sub.partner != c.partner {
                continue;
            }
            let mut query = clauses.clone();
            query.push(Clause::Ids(vec![c.id.clone()]));
            let found = tx
                .search(&ResourceQuery {
                    resource_type: resource_type.clone(),
                    partners: None,
                    clauses: query,
                    sort: Sort::Created,
                    after: None,
                    count: 1,
                    want_total: false,
                })
                .await?;
            if !found.resources.is_empty() {
                tx.enqueue_notification(&sub.id, &format!("{}/{}", c.resource_type, c.id), now_ms)
                    .await?;
            }
        }
    }
    Ok(())
}

/// A client wrote a Subscription: the server decides its status. `Some`:
/// the body to store instead (status `active`, or `error` saying why).
pub fn activation(subscription: &Value) -> Option<Value> {
    let status = subscription.get("status").and_then(Value::as_str)?;
    if !matches!(status, "requested" | "active") {
        return None;
    }
    let problem = check(subscription).err();
    let mut next = subscription.clone();
    let obj = next.as_object_mut()?;
    match &problem {
        None => {
            obj.insert("status".into(), json!("active"));
            obj.shift_remove("error");
        }
        Some(why) => {
            obj.insert("status".into(), json!("error"));
            obj.insert("error".into(), json!(why));
        }
    }
    (next != *subscription).then_some(next)
}

fn check(subscription: &Value) -> Result<(), String> {
    let criteria_text = subscription
        .get("criteria")
        .and_then(Value::as_str)
        .unwrap_or("");
    criteria(criteria_text)?;
    let channel = subscription.get("channel");
    let kind = channel
        .and_then(|c| c.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("");
    if kind != "rest-hook" {
        return Err(format!(
            "channel.type '{kind}' is not supported; this server delivers rest-hook"
        ));
    }
    let endpoint = channel
        .and_then(|c| c.get("endpoint"))
        .and_then(Value::as_str)
        .unwrap_or("");
    if reqwest::Url::parse(endpoint)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https"))
        .is_none()
    {
        return Err("channel.endpoint must be an http(s) URL".into());
    }
    if let Some(payload) = channel
        .and_then(|c| c.get("payload"))
        .and_then(Value::as_str)
    {
        let mime = payload.split(';').next().unwrap_or("").trim();
        if !matches!(mime, "application/fhir+json" | "application/json") {
            return Err(format!(
                "channel.payload '{payload}' is not supported; use application/fhir+json (ids only) or none"
            ));
        }
    }
    Ok(())
}

/// Sends due notifications.
pub struct Deliverer {
    pub resources: Arc<dyn ResourceStore>,
    pub records: Arc<dyn RecordStore>,
    pub config: WorkflowConfig,
    /// FHIR base URL the notification's ids are relative to.
    pub fhir_base: String,
    pub client: reqwest::Client,
}

/// How often the outbox is looked at.
const POLL: Duration = Duration::from_millis(500);
/// How long one delivery may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Deliverer {
    pub fn new(
        resources: Arc<dyn ResourceStore>,
        records: Arc<dyn RecordStore>,
        config: WorkflowConfig,
        fhir_base: String,
    ) -> Result<Deliverer, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(ATTEMPT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Deliverer {
            resources,
            records,
            config,
            fhir_base,
            client,
        })
    }

    /// Until `stop` turns true.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        loop {
            if let Err(e) = self.deliver_due().await {
                tracing::warn!(error = %e, "notification delivery round failed");
            }
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = async { let _ = stop.wait_for(|s| *s).await; } => break,
            }
        }
    }

    /// One round: attempt every due notification. Returns how many.
    pub async fn deliver_due(&self) -> Result<usize, WorkflowError> {
        let due = self
            .resources
            .due_notifications(now_ms(), 100)
            .await
            .map_err(|e| WorkflowError::Store(e.to_string()))?;
        for notification in &due {
            self.attempt(notification).await?;
        }
        Ok(due.len())
    }

    async fn attempt(&self, n: &Notification) -> Result<(), WorkflowError> {
        let store = |e: MetaError| WorkflowError::Store(e.to_string());
        let mut tx = self.records.begin().await?;
        let sub_ref = format!("Subscription/{}", n.subscription_id);
        let subscription = tx.records().read(&sub_ref).await?;
        let Some(mut subscription) = subscription.filter(|s| {
            matches!(
                s.body.get("status").and_then(Value::as_str),
                Some("active" | "error")
            )
        }) else {
            drop(tx);
            return self
                .resources
                .record_attempt(
                    n.id,
                    &Attempt::Abandoned {
                        error: "the subscription is off or gone".into(),
                    },
                )
                .await
                .map_err(store);
        };
        let result = self.send(&subscription.body, &n.focus).await;
        let now = now_ms();
        let attempt = match &result {
            Ok(()) => Attempt::Delivered,
            Err(why) => {
                let give_up_at = n.created_ms + self.config.notify_retry_days as i64 * 86_400_000;
                let wait_secs = self
                    .config
                    .notify_first_retry_secs
                    .saturating_mul(1u64 << n.attempts.min(30))
                    .min(self.config.notify_max_backoff_secs.max(1));
                let next_ms = now + wait_secs as i64 * 1000;
                if next_ms > give_up_at {
                    Attempt::Abandoned { error: why.clone() }
                } else {
                    Attempt::Retry {
                        next_ms,
                        error: why.clone(),
                    }
                }
            }
        };
        // The Subscription says how delivery goes.
        let was = subscription.body.clone();
        if let Some(obj) = subscription.body.as_object_mut() {
            match &result {
                Ok(()) => {
                    obj.insert("status".into(), json!("active"));
                    obj.shift_remove("error");
                }
                Err(why) => {
                    obj.insert("status".into(), json!("error"));
                    obj.insert(
                        "error".into(),
                        json!(format!(
                            "delivery to the endpoint failed ({why}); {} attempt(s) so far",
                            n.attempts + 1
                        )),
                    );
                }
            }
        }
        if subscription.body != was {
            tx.records().update(&subscription).await?;
        }
        // The event names the Subscription version this attempt wrote too.
        tx.commit_audited(audit_event(&subscription.id, &n.focus, &result, now))
            .await?;
        self.resources
            .record_attempt(n.id, &attempt)
            .await
            .map_err(store)?;
        match (&result, &attempt) {
            (Ok(()), _) => {
                tracing::info!(subscription = %n.subscription_id, "notification delivered")
            }
            (Err(why), Attempt::Abandoned { .. }) => {
                tracing::warn!(subscription = %n.subscription_id, error = %why, "notification abandoned after retrying")
            }
            (Err(why), _) => {
                tracing::info!(subscription = %n.subscription_id, error = %why, "notification failed; will retry")
            }
        }
        Ok(())
    }

    /// POST one notification.
    async fn send(&self, subscription: &Value, focus: &str) -> Result<(), String> {
        let channel = subscription.get("channel");
        let endpoint = channel
            .and_then(|c| c.get("endpoint"))
            .and_then(Value::as_str)
            .ok_or("no endpoint")?;
        let mut request = self.client.post(endpoint);
        for header in items(channel, "header").filter_map(Value::as_str) {
            if let Some((name, value)) = header.split_once(':') {
                request = request.header(name.trim(), value.trim());
            }
        }
        if channel.and_then(|c| c.get("payload")).is_some() {
            // Ids only: the subscriber reads the resource with its own
            // credentials.
            let bundle = json!({
                "resourceType": "Bundle",
                "type": "history",
                "timestamp": instant_text(now_ms()),
                "entry": [{
                    "fullUrl": format!("{}/{focus}", self.fhir_base),
                    "request": {"method": "PUT", "url": focus},
                    "response": {"status": "200 OK"},
                }],
            });
            request = request
                .header("content-type", "application/fhir+json")
                .body(bundle.to_string());
        }
        let response = request.send().await.map_err(|e| {
            if e.is_timeout() {
                "timed out".to_owned()
            } else if e.is_connect() {
                "cannot connect".to_owned()
            } else {
                "request failed".to_owned()
            }
        })?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("HTTP {}", status.as_u16()))
        }
    }
}

/// The audit record of one delivery attempt (DICOM "Export", ATNA-shaped).
fn audit_event(
    subscription_id: &str,
    focus: &str,
    result: &Result<(), String>,
    now_ms: i64,
) -> Value {
    let (outcome, description) = match result {
        Ok(()) => ("0", None),
        Err(why) => ("4", Some(why.clone())),
    };
    let mut event = json!({
        "resourceType": "AuditEvent",
        "type": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110106", "display": "Export"},
        "subtype": [{"system": crate::audit::KONSIL_SUBTYPE, "code": "rest-hook-notification", "display": "Subscription rest-hook notification"}],
        "action": "E",
        "recorded": instant_text(now_ms),
        "outcome": outcome,
        "agent": [{
            "type": {"coding": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110153", "display": "Source Role ID"}]},
            "who": {"reference": SERVICE_ORGANIZATION},
            "requestor": false,
        }],
        "source": {"observer": {"reference": SERVICE_ORGANIZATION}},
        "entity": [
            {"what": {"reference": format!("Subscription/{subscription_id}")}, "description": "subscription notified"},
            {"what": {"reference": focus}, "description": "resource announced (id only)"},
        ],
    });
    if let Some(description) = description {
        event["outcomeDesc"] = json!(description);
    }
    event
}
