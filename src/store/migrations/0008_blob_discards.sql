-- Blob-store records retention has discarded from the index (in the same
-- transaction) whose bytes are still to be destroyed. Each row goes once
-- its record is destroyed; a failure leaves it for the next run.
CREATE TABLE blob_discards (
    id      INTEGER PRIMARY KEY,
    store   TEXT NOT NULL CHECK (store IN ('dicom', 'fhir')),
    object  TEXT NOT NULL,
    offset  INTEGER NOT NULL,
    length  INTEGER NOT NULL
);
