-- FHIR resources. fhir_resource holds the current version of each resource
-- (its JSON in `body`, NULL once deleted); fhir_history every version,
-- current one included, in write order (hid). Search index tables hold the
-- entries of current versions only, keyed by fhir_resource.rid; `param` is
-- qualified by resource type (`Task.status`).
CREATE TABLE fhir_resource (
    rid          INTEGER PRIMARY KEY,
    type         TEXT NOT NULL,
    id           TEXT NOT NULL,
    version      INTEGER NOT NULL,
    partner      TEXT,
    last_updated TEXT NOT NULL,
    updated_ms   INTEGER NOT NULL,
    deleted      INTEGER NOT NULL DEFAULT 0,
    body         TEXT,
    -- Binary content kept in the FHIR blob store (raw uploads and large
    -- base64 data), not in `body`.
    blob_object  TEXT,
    blob_offset  INTEGER,
    blob_length  INTEGER,
    UNIQUE (type, id)
);
CREATE INDEX fhir_resource_updated ON fhir_resource (type, updated_ms, rid);

CREATE TABLE fhir_history (
    hid          INTEGER PRIMARY KEY,
    rid          INTEGER NOT NULL REFERENCES fhir_resource (rid),
    version      INTEGER NOT NULL,
    last_updated TEXT NOT NULL,
    updated_ms   INTEGER NOT NULL,
    method       TEXT NOT NULL,
    body         TEXT,
    blob_object  TEXT,
    blob_offset  INTEGER,
    blob_length  INTEGER,
    -- The blob store's recovery point once this version is recorded.
    blob_resume_at INTEGER,
    UNIQUE (rid, version)
);

CREATE TABLE fhir_token (
    rid    INTEGER NOT NULL REFERENCES fhir_resource (rid),
    param  TEXT NOT NULL,
    system TEXT NOT NULL,
    code   TEXT NOT NULL
);
CREATE INDEX fhir_token_code ON fhir_token (param, code, system);
CREATE INDEX fhir_token_rid ON fhir_token (rid);

CREATE TABLE fhir_reference (
    rid    INTEGER NOT NULL REFERENCES fhir_resource (rid),
    param  TEXT NOT NULL,
    target TEXT NOT NULL
);
CREATE INDEX fhir_reference_target ON fhir_reference (param, target);
CREATE INDEX fhir_reference_rid ON fhir_reference (rid);

CREATE TABLE fhir_date (
    rid   INTEGER NOT NULL REFERENCES fhir_resource (rid),
    param TEXT NOT NULL,
    low   INTEGER NOT NULL,
    high  INTEGER NOT NULL
);
CREATE INDEX fhir_date_low ON fhir_date (param, low);
CREATE INDEX fhir_date_rid ON fhir_date (rid);

CREATE TABLE fhir_string (
    rid   INTEGER NOT NULL REFERENCES fhir_resource (rid),
    param TEXT NOT NULL,
    value TEXT NOT NULL
);
CREATE INDEX fhir_string_value ON fhir_string (param, value);
CREATE INDEX fhir_string_rid ON fhir_string (rid);
