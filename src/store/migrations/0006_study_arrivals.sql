-- Studies with instances the workflow has not reconciled yet. The ingest
-- pipeline also tells the running workflow directly; this table is what
-- survives a crash between the index commit and the reconciliation, and
-- what a `konsil import` next to the server leaves for it. `seq` grows with
-- every instance, so a reconciliation clears only what it saw.
CREATE TABLE study_arrivals (
    partner   TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    seq       INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (partner, study_uid)
);

CREATE TRIGGER instances_note_study_arrival AFTER INSERT ON instances
BEGIN
    INSERT INTO study_arrivals (partner, study_uid) VALUES (NEW.partner, NEW.study_uid)
    ON CONFLICT (partner, study_uid) DO UPDATE SET seq = seq + 1;
END;
