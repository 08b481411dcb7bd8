-- Which transfer (a DICOM association, a STOW-RS request, a `konsil import`
-- run) stored each instance; NULL for rows recovery rebuilt from the blob
-- store, and for rows indexed before this column existed.
ALTER TABLE instances ADD COLUMN transfer_id INTEGER;

-- Instances indexed whose transfer is not in the audit trail yet. Noted by
-- the trigger below in the transaction that indexes the instance; cleared
-- in the transaction that stores the transfer's AuditEvent. What a crash
-- leaves here becomes an AuditEvent at the next start, so no stored
-- instance is ever missing from the trail.
CREATE TABLE transfers_unaudited (
    -- 0: not known (the index row was rebuilt from the blob store)
    transfer_id INTEGER NOT NULL,
    partner     TEXT NOT NULL,
    study_uid   TEXT NOT NULL,
    source      TEXT NOT NULL,
    calling_ae  TEXT,
    instances   INTEGER NOT NULL,
    first_ms    INTEGER NOT NULL,
    last_ms     INTEGER NOT NULL,
    PRIMARY KEY (transfer_id, partner, study_uid)
) WITHOUT ROWID;

CREATE TRIGGER instances_note_unaudited_transfer AFTER INSERT ON instances
BEGIN
    INSERT INTO transfers_unaudited
        (transfer_id, partner, study_uid, source, calling_ae, instances, first_ms, last_ms)
    VALUES (COALESCE(NEW.transfer_id, 0), NEW.partner, NEW.study_uid, NEW.source, NEW.calling_ae,
        1, NEW.received_at_ms, NEW.received_at_ms)
    ON CONFLICT (transfer_id, partner, study_uid) DO UPDATE SET
        instances = instances + 1,
        first_ms = MIN(first_ms, excluded.first_ms),
        last_ms = MAX(last_ms, excluded.last_ms);
END;
