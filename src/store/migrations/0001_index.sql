-- DICOM index: what QIDO-RS answers from (PS3.18 Table 6.7.1-2 and friends)
-- plus provenance. Patient attributes live on the study row: a partner's
-- study belongs to one patient, and nothing is merged across partners.
CREATE TABLE studies (
    partner                  TEXT NOT NULL,
    study_uid                TEXT NOT NULL,
    patient_name             TEXT,
    patient_id               TEXT,
    issuer_of_patient_id     TEXT,
    patient_birth_date       TEXT,
    patient_sex              TEXT,
    study_date               TEXT,
    study_time               TEXT,
    accession_number         TEXT,
    referring_physician_name TEXT,
    study_id                 TEXT,
    study_description        TEXT,
    specific_character_set   TEXT,
    -- activity after the first instance is derived from instances.received_at_ms
    first_received_ms        INTEGER NOT NULL,
    PRIMARY KEY (partner, study_uid)
);
CREATE INDEX studies_by_patient ON studies (partner, patient_id);
CREATE INDEX studies_by_accession ON studies (partner, accession_number);

CREATE TABLE series (
    partner            TEXT NOT NULL,
    series_uid         TEXT NOT NULL,
    study_uid          TEXT NOT NULL,
    modality           TEXT,
    series_number      INTEGER,
    series_description TEXT,
    series_date        TEXT,
    series_time        TEXT,
    body_part_examined TEXT,
    PRIMARY KEY (partner, series_uid),
    FOREIGN KEY (partner, study_uid) REFERENCES studies (partner, study_uid)
);
CREATE INDEX series_by_study ON series (partner, study_uid);

CREATE TABLE instances (
    id               INTEGER PRIMARY KEY,
    partner          TEXT NOT NULL,
    study_uid        TEXT NOT NULL,
    series_uid       TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid    TEXT NOT NULL,
    transfer_syntax  TEXT NOT NULL,
    instance_number  INTEGER,
    rows             INTEGER,
    columns          INTEGER,
    number_of_frames INTEGER,
    received_at_ms   INTEGER NOT NULL,
    size             INTEGER NOT NULL,
    dataset_sha256   TEXT NOT NULL,
    -- where the stored Part 10 object is: a byte range of a blob-store object
    blob_object      TEXT NOT NULL,
    blob_offset      INTEGER NOT NULL,
    blob_length      INTEGER NOT NULL,
    -- the blob store's recovery point once this row is committed
    blob_resume_at   INTEGER NOT NULL,
    source           TEXT NOT NULL CHECK (source IN ('dimse', 'stow', 'import')),
    calling_ae       TEXT,
    -- 1 when another object with different content exists under this SOP
    -- Instance UID for the same partner; both are kept.
    conflict         INTEGER NOT NULL DEFAULT 0,
    UNIQUE (partner, sop_instance_uid, dataset_sha256, transfer_syntax),
    FOREIGN KEY (partner, series_uid) REFERENCES series (partner, series_uid)
);
-- Lookups by (partner, sop_instance_uid) use the UNIQUE key's prefix.
CREATE INDEX instances_by_series ON instances (partner, series_uid);
CREATE INDEX instances_by_study ON instances (partner, study_uid);

-- Per blob-store object (segment), the point up to which every committed
-- record is indexed. Start-up recovery re-indexes from here, which is what
-- makes synchronous=NORMAL safe: a commit lost with the OS is rebuilt from
-- the (fsynced) segment.
CREATE TABLE blob_objects (
    object    TEXT PRIMARY KEY,
    resume_at INTEGER NOT NULL
);

-- Both triggers run inside the inserting transaction, so recording an
-- instance is a single statement (each statement is a round trip to the
-- connection's thread, which dominates the cost of an insert).

-- Another object under the same SOP Instance UID: the new row is inserted
-- with conflict = 1 (see the INSERT in store/sqlite.rs); flag the others too.
CREATE TRIGGER instances_flag_conflicts AFTER INSERT ON instances WHEN NEW.conflict = 1
BEGIN
    UPDATE instances SET conflict = 1
    WHERE partner = NEW.partner AND sop_instance_uid = NEW.sop_instance_uid AND conflict = 0;
END;

CREATE TRIGGER instances_advance_recovery_point AFTER INSERT ON instances
BEGIN
    INSERT INTO blob_objects (object, resume_at) VALUES (NEW.blob_object, NEW.blob_resume_at)
    ON CONFLICT (object) DO UPDATE SET resume_at = MAX(resume_at, excluded.resume_at);
END;
