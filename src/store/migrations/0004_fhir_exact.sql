-- String search `:exact` compares the text as written; `value` keeps the
-- lower-cased form for the default (prefix) and `:contains` matches. Rows
-- indexed before this column get their lower-cased text, until the
-- resource is written again.
ALTER TABLE fhir_string ADD COLUMN exact TEXT;
UPDATE fhir_string SET exact = value;
CREATE INDEX fhir_string_exact ON fhir_string (param, exact);
