-- DICOMweb metadata (PS3.18 DICOM JSON, bulk data as URIs) per instance,
-- computed on first request so that study and series metadata never re-read
-- every object. Bulk data URIs are kept relative to the DICOMweb base.
CREATE TABLE instance_metadata (
    instance_id INTEGER PRIMARY KEY REFERENCES instances (id) ON DELETE CASCADE,
    json        TEXT NOT NULL
);
