// Build Konsil's own FHIR conformance resources into profiles/konsil/, from
// the sources in conformance/fhir/profiles-src/: StructureDefinitions get
// their snapshot (FHIR.js SnapshotGenerator over the R4 core), ValueSets
// drawn from our own complete CodeSystems get their expansion.
//
//   node conformance/fhir/build_profiles.mjs
//
// (needs tests/run to have installed the `fhir` npm package and the R4
// package under target/peers/). The output is committed:
// the server embeds exactly what is in profiles/konsil/.
import { createRequire } from 'node:module';
import { readdirSync, readFileSync, writeFileSync, mkdirSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, '..', '..');
const require = createRequire(path.resolve(process.env.KONSIL_NODE_MODULES ?? path.join(root, 'target/peers/node/node_modules'), 'x.js'));
const { Fhir } = require('fhir');

const src = path.join(here, 'profiles-src');
const out = process.env.KONSIL_PROFILES_OUT ?? path.join(root, 'profiles', 'konsil');
mkdirSync(out, { recursive: true });

const resources = readdirSync(src)
  .filter((f) => f.endsWith('.json'))
  .sort()
  .map((f) => JSON.parse(readFileSync(path.join(src, f), 'utf8')));

const codeSystems = new Map(resources.filter((r) => r.resourceType === 'CodeSystem').map((c) => [c.url, c]));
const walk = (concepts, system, acc) => {
  for (const c of concepts ?? []) {
    acc.push({ system, code: c.code, display: c.display });
    walk(c.concept, system, acc);
  }
  return acc;
};

// The base definitions, complete with their documentation, from the R4
// package (tests/run unpacks it into target/peers/fhir-r4).
const r4 = process.env.KONSIL_FHIR_R4_PACKAGE ?? path.join(root, 'target/peers/fhir-r4/package');
const fhir = new Fhir();
const profiles = resources.filter((r) => r.resourceType === 'StructureDefinition');
for (const sd of profiles) {
  const base = sd.baseDefinition.replace('http://hl7.org/fhir/StructureDefinition/', '');
  fhir.parser.parseStructureDefinition(JSON.parse(readFileSync(path.join(r4, `StructureDefinition-${base}.json`), 'utf8')));
}
fhir.generateSnapshot({ resourceType: 'Bundle', type: 'collection', entry: profiles.map((resource) => ({ resource })) });
// FHIR.js 4.12 leaves two things of the differential out of the snapshot:
// `binding` (its merge does not carry it) and the root element (it skips the
// element whose path is the type, so the profile's own invariants are lost).
// Both are put in here, as the differential says.
for (const sd of profiles) {
  for (const diff of sd.differential.element) {
    const snap = sd.snapshot.element.find((e) => e.path === diff.path && !e.sliceName);
    if (!snap) throw new Error(`${sd.url}: ${diff.path} missing from the snapshot`);
    if (diff.binding) snap.binding = diff.binding;
    for (const c of diff.constraint ?? []) {
      snap.constraint = (snap.constraint ?? []).filter((x) => x.key !== c.key).concat([c]);
    }
  }
}

for (const r of resources) {
  if (r.resourceType === 'ValueSet') {
    const contains = [];
    for (const include of r.compose?.include ?? []) {
      const cs = codeSystems.get(include.system);
      if (!cs || cs.content !== 'complete' || include.filter) {
        throw new Error(`${r.url}: can only expand whole, complete Konsil code systems`);
      }
      contains.push(...(include.concept ? include.concept.map((c) => ({ system: include.system, code: c.code, display: c.display })) : walk(cs.concept, cs.url, [])));
    }
    r.expansion = { timestamp: '2026-11-24T00:00:00Z', total: contains.length, contains };
  }
  if (r.resourceType === 'StructureDefinition' && !r.snapshot?.element?.length) {
    throw new Error(`${r.url}: no snapshot generated`);
  }
  writeFileSync(path.join(out, `${r.resourceType}-${r.id}.json`), JSON.stringify(r, null, 2) + '\n');
}
process.stderr.write(`${resources.length} resources written to ${out}\n`);
