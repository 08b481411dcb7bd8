//! The second-opinion case as a state machine (`design.md`, "The case state
//! model"): stages, the events that move a case, and the guards that refuse
//! a move with a reason. Pure: no storage, no protocol. The FHIR `Task` of the
//! case shows the result (`Task.status`, `Task.businessStatus`,
//! `Task.statusReason`).

use std::fmt;

/// Where a case is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Referral received; the checks have not run yet.
    Intake,
    /// Records or consent missing.
    AwaitingRecords,
    /// Complete; waiting for a specialist.
    ReadyForTriage,
    /// A specialist is assigned and reviewing.
    UnderReview,
    /// The draft opinion waits for staff approval.
    AwaitingApproval,
    /// The approved opinion went to the referring physician.
    Delivered,
    /// Delivered, and no activity since: the case is closed.
    Closed,
    /// The service declined the referral.
    Declined,
    /// The referrer withdrew it.
    Withdrawn,
}

impl Stage {
    /// `Task.businessStatus` code.
    pub fn business_status(self) -> &'static str {
        match self {
            Stage::Intake => "intake",
            Stage::AwaitingRecords => "awaiting-records",
            Stage::ReadyForTriage => "ready-for-triage",
            Stage::UnderReview => "under-review",
            Stage::AwaitingApproval => "awaiting-approval",
            Stage::Delivered => "delivered",
            Stage::Closed => "closed",
            Stage::Declined => "declined",
            Stage::Withdrawn => "withdrawn",
        }
    }

    /// Every stage, in workflow order.
    pub const ALL: [Stage; 9] = [
        Stage::Intake,
        Stage::AwaitingRecords,
        Stage::ReadyForTriage,
        Stage::UnderReview,
        Stage::AwaitingApproval,
        Stage::Delivered,
        Stage::Closed,
        Stage::Declined,
        Stage::Withdrawn,
    ];

    /// The stage of a `businessStatus` code.
    pub fn from_code(code: &str) -> Option<Stage> {
        Stage::ALL.into_iter().find(|s| s.business_status() == code)
    }

    /// Display text of the stage (as in `profiles/konsil/CodeSystem-case-stage.json`).
    pub fn display(self) -> &'static str {
        match self {
            Stage::Intake => "Referral received",
            Stage::AwaitingRecords => "Awaiting records",
            Stage::ReadyForTriage => "Ready for triage",
            Stage::UnderReview => "Under review",
            Stage::AwaitingApproval => "Awaiting approval",
            Stage::Delivered => "Delivered",
            Stage::Closed => "Closed",
            Stage::Declined => "Declined",
            Stage::Withdrawn => "Withdrawn",
        }
    }

    /// `Task.status` of the stage when the case is not on hold.
    fn task_status(self) -> &'static str {
        match self {
            Stage::Intake | Stage::AwaitingRecords => "received",
            Stage::ReadyForTriage => "accepted",
            Stage::UnderReview | Stage::AwaitingApproval => "in-progress",
            Stage::Delivered | Stage::Closed => "completed",
            Stage::Declined => "rejected",
            Stage::Withdrawn => "cancelled",
        }
    }

    /// No event moves a case out of these (a follow-up question opens a
    /// child case instead).
    pub fn is_final(self) -> bool {
        matches!(self, Stage::Closed | Stage::Declined | Stage::Withdrawn)
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.business_status())
    }
}

/// Why a case is held (`Task.status` = on-hold), besides its stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hold {
    /// No active Consent that permits disclosure for a second opinion (or it
    /// was rejected, expired or revoked). Blocks assignment, approval and
    /// delivery.
    Consent(String),
    /// Records have been missing longer than the stale period.
    Stale,
}

/// The state of one case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Case {
    pub stage: Stage,
    pub hold: Option<Hold>,
    /// What the completeness and consent checks found missing, as the
    /// machine-readable codes the rules define (empty: complete).
    pub missing: Vec<String>,
    /// The assigned specialist (a PractitionerRole or Practitioner reference).
    pub specialist: Option<String>,
}

impl Case {
    /// A new case from a referral.
    pub fn new() -> Case {
        Case {
            stage: Stage::Intake,
            hold: None,
            missing: Vec::new(),
            specialist: None,
        }
    }

    /// `Task.status`: on-hold while held, else the stage's.
    pub fn task_status(&self) -> &'static str {
        match (&self.hold, self.stage.is_final()) {
            (Some(_), false) => "on-hold",
            _ => self.stage.task_status(),
        }
    }

    /// `Task.statusReason` text: what the referrer should know or do.
    pub fn status_reason(&self) -> Option<String> {
        match (&self.hold, self.stage) {
            (Some(Hold::Consent(why)), _) => Some(format!("on hold: consent: {why}")),
            (Some(Hold::Stale), _) => Some(format!(
                "on hold: records missing for too long: {}",
                self.missing.join(", ")
            )),
            (None, Stage::AwaitingRecords) => Some(format!("missing: {}", self.missing.join(", "))),
            _ => None,
        }
    }
}

impl Default for Case {
    fn default() -> Self {
        Case::new()
    }
}

/// What happens to a case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The completeness and consent checks ran (on intake and whenever a
    /// record arrives): what is still missing, and whether consent holds.
    Checked {
        missing: Vec<String>,
        consent: ConsentState,
    },
    /// Records stayed missing past the stale period.
    StalePeriodPassed,
    /// Staff assigned a specialist.
    Assigned { specialist: String },
    /// The specialist submitted a draft opinion.
    DraftSubmitted,
    /// The specialist took a draft back (marked it entered in error, or an
    /// admin deleted it): the submitted one before approval, or one left
    /// over after delivery.
    DraftWithdrawn,
    /// Staff approved the draft: it is delivered.
    Approved,
    /// Staff sent the draft back with a note.
    Returned { note: String },
    /// No activity since delivery for the inactivity period.
    Inactive,
    /// The service declines the referral.
    Declined { reason: String },
    /// The referrer withdraws it.
    Withdrawn,
}

/// The patient's consent as the checks found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsentState {
    /// Active, permitting disclosure for a second opinion.
    Permits,
    /// No consent resource yet: a missing record like any other.
    Absent,
    /// Present but rejected, inactive, expired or revoked.
    Refused(String),
}

/// Why an event cannot apply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{event} is not possible while the case is {stage}: {why}")]
pub struct Refusal {
    pub stage: Stage,
    pub event: &'static str,
    pub why: String,
}

impl Event {
    fn name(&self) -> &'static str {
        match self {
            Event::Checked { .. } => "checking records",
            Event::StalePeriodPassed => "the stale period",
            Event::Assigned { .. } => "assigning a specialist",
            Event::DraftSubmitted => "submitting a draft opinion",
            Event::DraftWithdrawn => "withdrawing the draft opinion",
            Event::Approved => "approving the opinion",
            Event::Returned { .. } => "returning the draft",
            Event::Inactive => "closing for inactivity",
            Event::Declined { .. } => "declining the referral",
            Event::Withdrawn => "withdrawing the referral",
        }
    }
}

/// The case after `event`, or why the event cannot apply now.
pub fn apply(case: &Case, event: &Event) -> Result<Case, Refusal> {
    use Stage::*;
    let refuse = |why: &str| Refusal {
        stage: case.stage,
        event: event.name(),
        why: why.to_owned(),
    };
    if case.stage.is_final() {
        return Err(refuse("the case has ended"));
    }
    let consent_hold = matches!(case.hold, Some(Hold::Consent(_)));
    let mut next = case.clone();
    match (case.stage, event) {
        (
            Intake | AwaitingRecords | ReadyForTriage | UnderReview | AwaitingApproval,
            Event::Checked { missing, consent },
        ) => {
            let mut missing = missing.clone();
            match consent {
                ConsentState::Permits => {
                    if consent_hold {
                        next.hold = None;
                    }
                }
                // Once a specialist works on the case, the consent that
                // let it through triage is gone (deleted): the case holds
                // and the opinion is not delivered until one is on file.
                ConsentState::Absent if matches!(case.stage, UnderReview | AwaitingApproval) => {
                    next.hold = Some(Hold::Consent(
                        "the patient's consent is no longer on file".to_owned(),
                    ));
                }
                ConsentState::Absent => missing.push("consent".to_owned()),
                ConsentState::Refused(why) => next.hold = Some(Hold::Consent(why.clone())),
            }
            // Records are judged before triage; once a specialist works on
            // the case, a later check only changes the consent hold.
            if matches!(case.stage, Intake | AwaitingRecords | ReadyForTriage) {
                next.stage = if missing.is_empty() {
                    ReadyForTriage
                } else {
                    AwaitingRecords
                };
                if missing.is_empty() && next.hold == Some(Hold::Stale) {
                    next.hold = None;
                }
            }
            next.missing = missing;
        }
        (AwaitingRecords, Event::StalePeriodPassed) => {
            if next.hold.is_none() {
                next.hold = Some(Hold::Stale);
            }
        }
        (_, Event::StalePeriodPassed) => {
            return Err(refuse("only a case awaiting records goes stale"))
        }
        (ReadyForTriage, Event::Assigned { specialist }) => {
            if consent_hold {
                return Err(refuse("the patient's consent does not permit it"));
            }
            next.stage = UnderReview;
            next.specialist = Some(specialist.clone());
        }
        (UnderReview, Event::Assigned { specialist }) => {
            // Reassignment while under review.
            next.specialist = Some(specialist.clone());
        }
        (_, Event::Assigned { .. }) => {
            return Err(refuse(
                "a specialist is assigned once the records are complete",
            ))
        }
        (UnderReview, Event::DraftSubmitted) => next.stage = AwaitingApproval,
        (_, Event::DraftSubmitted) => {
            return Err(refuse(
                "only the assigned specialist's review produces a draft",
            ))
        }
        // Work in progress may be withdrawn while under review; a submitted
        // draft taken back returns the case to review.
        (UnderReview, Event::DraftWithdrawn) => {}
        (AwaitingApproval, Event::DraftWithdrawn) => next.stage = UnderReview,
        // A draft left over when another was approved (work in progress, a
        // second version) is not the delivered opinion: it may go.
        (Delivered, Event::DraftWithdrawn) => {}
        (_, Event::DraftWithdrawn) => {
            return Err(refuse(
                "there is no draft opinion before a specialist reviews the case",
            ))
        }
        (AwaitingApproval, Event::Approved) => {
            if consent_hold {
                return Err(refuse("the patient's consent does not permit delivery"));
            }
            next.stage = Delivered;
        }
        (_, Event::Approved) => {
            return Err(refuse("there is no draft opinion waiting for approval"))
        }
        (AwaitingApproval, Event::Returned { .. }) => next.stage = UnderReview,
        (_, Event::Returned { .. }) => return Err(refuse("there is no draft opinion to return")),
        (Delivered, Event::Inactive) => next.stage = Closed,
        (_, Event::Inactive) => return Err(refuse("only a delivered case closes for inactivity")),
        (Intake | AwaitingRecords | ReadyForTriage, Event::Declined { .. }) => {
            next.stage = Declined;
            next.hold = None;
        }
        (_, Event::Declined { .. }) => {
            return Err(refuse("a referral is declined before review starts"))
        }
        (Delivered, Event::Withdrawn) => return Err(refuse("the opinion was delivered already")),
        (_, Event::Withdrawn) => {
            next.stage = Withdrawn;
            next.hold = None;
        }
        (Delivered, Event::Checked { .. }) => {
            return Err(refuse("the opinion was delivered already"))
        }
        (Closed | Declined | Withdrawn, _) => return Err(refuse("the case has ended")),
    }
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use Stage::*;

    fn at(stage: Stage) -> Case {
        Case {
            stage,
            specialist: matches!(stage, UnderReview | AwaitingApproval | Delivered | Closed)
                .then(|| "PractitionerRole/onc-1".to_owned()),
            ..Case::new()
        }
    }

    fn complete() -> Event {
        Event::Checked {
            missing: vec![],
            consent: ConsentState::Permits,
        }
    }

    fn incomplete() -> Event {
        Event::Checked {
            missing: vec!["pathology-report".into()],
            consent: ConsentState::Permits,
        }
    }

    const ALL: [Stage; 9] = [
        Intake,
        AwaitingRecords,
        ReadyForTriage,
        UnderReview,
        AwaitingApproval,
        Delivered,
        Closed,
        Declined,
        Withdrawn,
    ];

    /// Every stage × every kind of event: the stage it leads to, or None for
    /// a refusal.
    #[test]
    fn transition_table() {
        let events: Vec<(&str, Event)> = vec![
            ("complete", complete()),
            ("incomplete", incomplete()),
            ("stale", Event::StalePeriodPassed),
            (
                "assign",
                Event::Assigned {
                    specialist: "PractitionerRole/onc-2".into(),
                },
            ),
            ("draft", Event::DraftSubmitted),
            ("take back", Event::DraftWithdrawn),
            ("approve", Event::Approved),
            (
                "return",
                Event::Returned {
                    note: "cite the guideline".into(),
                },
            ),
            ("inactive", Event::Inactive),
            (
                "decline",
                Event::Declined {
                    reason: "outside our specialties".into(),
                },
            ),
            ("withdraw", Event::Withdrawn),
        ];
        // Rows: stages in ALL order; columns: events in the order above.
        let expected: [[Option<Stage>; 11]; 9] = [
            // complete          incomplete             stale                  assign             draft        take back           approve          return            inactive      decline         withdraw
            [
                Some(ReadyForTriage),
                Some(AwaitingRecords),
                None,
                None,
                None,
                None,
                None,
                None,
                None,
                Some(Declined),
                Some(Withdrawn),
            ], // Intake
            [
                Some(ReadyForTriage),
                Some(AwaitingRecords),
                Some(AwaitingRecords),
                None,
                None,
                None,
                None,
                None,
                None,
                Some(Declined),
                Some(Withdrawn),
            ], // AwaitingRecords
            [
                Some(ReadyForTriage),
                Some(AwaitingRecords),
                None,
                Some(UnderReview),
                None,
                None,
                None,
                None,
                None,
                Some(Declined),
                Some(Withdrawn),
            ], // ReadyForTriage
            [
                Some(UnderReview),
                Some(UnderReview),
                None,
                Some(UnderReview),
                Some(AwaitingApproval),
                Some(UnderReview),
                None,
                None,
                None,
                None,
                Some(Withdrawn),
            ], // UnderReview
            [
                Some(AwaitingApproval),
                Some(AwaitingApproval),
                None,
                None,
                None,
                Some(UnderReview),
                Some(Delivered),
                Some(UnderReview),
                None,
                None,
                Some(Withdrawn),
            ], // AwaitingApproval
            [
                None,
                None,
                None,
                None,
                None,
                Some(Delivered),
                None,
                None,
                Some(Closed),
                None,
                None,
            ], // Delivered
            [None; 11], // Closed
            [None; 11], // Declined
            [None; 11], // Withdrawn
        ];
        for (row, stage) in ALL.iter().enumerate() {
            for (col, (name, event)) in events.iter().enumerate() {
                let got = apply(&at(*stage), event);
                match (expected[row][col], got) {
                    (Some(want), Ok(case)) => assert_eq!(case.stage, want, "{stage} + {name}"),
                    (None, Err(refusal)) => {
                        assert_eq!(refusal.stage, *stage);
                        assert!(!refusal.why.is_empty(), "{stage} + {name}: a reason");
                    }
                    (want, got) => panic!("{stage} + {name}: expected {want:?}, got {got:?}"),
                }
            }
        }
    }

    #[test]
    fn task_face_of_each_stage() {
        let faces: Vec<(Stage, &str, &str)> = ALL
            .iter()
            .map(|s| {
                let case = at(*s);
                (*s, case.task_status(), s.business_status())
            })
            .collect();
        assert_eq!(
            faces,
            vec![
                (Intake, "received", "intake"),
                (AwaitingRecords, "received", "awaiting-records"),
                (ReadyForTriage, "accepted", "ready-for-triage"),
                (UnderReview, "in-progress", "under-review"),
                (AwaitingApproval, "in-progress", "awaiting-approval"),
                (Delivered, "completed", "delivered"),
                (Closed, "completed", "closed"),
                (Declined, "rejected", "declined"),
                (Withdrawn, "cancelled", "withdrawn"),
            ]
        );
    }

    #[test]
    fn consent_guards_assignment_approval_and_delivery() {
        let refused = Event::Checked {
            missing: vec![],
            consent: ConsentState::Refused("revoked on 2026-11-20".into()),
        };
        // Complete but consent revoked: triage waits, on hold, with the reason.
        let held = apply(&at(ReadyForTriage), &refused).unwrap();
        assert_eq!(held.stage, ReadyForTriage);
        assert_eq!(held.task_status(), "on-hold");
        assert!(held.status_reason().unwrap().contains("revoked"));
        let err = apply(
            &held,
            &Event::Assigned {
                specialist: "PractitionerRole/x".into(),
            },
        )
        .unwrap_err();
        assert!(err.why.contains("consent"), "{err}");
        // During approval: delivery blocked until consent permits again.
        let held = apply(&at(AwaitingApproval), &refused).unwrap();
        assert_eq!(held.stage, AwaitingApproval);
        assert!(apply(&held, &Event::Approved)
            .unwrap_err()
            .why
            .contains("consent"));
        let restored = apply(&held, &complete()).unwrap();
        assert_eq!(restored.hold, None);
        assert_eq!(apply(&restored, &Event::Approved).unwrap().stage, Delivered);
        // A missing Consent is a missing record.
        let no_consent = Event::Checked {
            missing: vec!["imaging".into()],
            consent: ConsentState::Absent,
        };
        let waiting = apply(&at(Intake), &no_consent).unwrap();
        assert_eq!(waiting.stage, AwaitingRecords);
        assert_eq!(
            waiting.missing,
            vec!["imaging".to_owned(), "consent".to_owned()]
        );
        assert_eq!(
            waiting.status_reason().as_deref(),
            Some("missing: imaging, consent")
        );
        // Past triage, a consent that is gone (deleted) holds the case and
        // blocks delivery, until one permits again.
        let gone = Event::Checked {
            missing: vec![],
            consent: ConsentState::Absent,
        };
        for stage in [UnderReview, AwaitingApproval] {
            let held = apply(&at(stage), &gone).unwrap();
            assert_eq!(held.stage, stage);
            assert_eq!(held.task_status(), "on-hold", "{stage:?}");
            assert!(held.status_reason().unwrap().contains("no longer on file"));
            if stage == AwaitingApproval {
                assert!(apply(&held, &Event::Approved)
                    .unwrap_err()
                    .why
                    .contains("consent"));
            }
            assert_eq!(apply(&held, &complete()).unwrap().hold, None);
        }
    }

    #[test]
    fn stale_hold_ends_when_the_records_arrive() {
        let waiting = apply(&at(Intake), &incomplete()).unwrap();
        let stale = apply(&waiting, &Event::StalePeriodPassed).unwrap();
        assert_eq!(stale.task_status(), "on-hold");
        assert!(stale.status_reason().unwrap().contains("pathology-report"));
        let ready = apply(&stale, &complete()).unwrap();
        assert_eq!(ready.stage, ReadyForTriage);
        assert_eq!(ready.hold, None);
        assert_eq!(ready.task_status(), "accepted");
    }

    #[test]
    fn refusals_say_why_in_words() {
        let err = apply(&at(Intake), &Event::Approved).unwrap_err();
        assert_eq!(
            err.to_string(),
            "approving the opinion is not possible while the case is intake: there is no draft opinion waiting for approval"
        );
    }
}
