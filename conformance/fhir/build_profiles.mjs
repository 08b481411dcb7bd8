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
// FHIR.js only knows the resources as bases; our extensions build on the
// Extension data type, which is parsed above like a resource's definition.
const extension = JSON.parse(readFileSync(path.join(r4, 'StructureDefinition-Extension.json'), 'utf8'));
const isBase = fhir.parser.isBaseProfile.bind(fhir.parser);
fhir.parser.isBaseProfile = (url) => isBase(url) || url === 'http://hl7.org/fhir/StructureDefinition/Extension';
fhir.generateSnapshot({ resourceType: 'Bundle', type: 'collection', entry: profiles.map((resource) => ({ resource })) });
// FHIR.js 4.12 leaves parts of the differential out of the snapshot: `binding`
// (its merge does not carry it), the root element (it skips the element whose
// path is the type, so the profile's own invariants are lost), a choice
// element's constraints (`value[x]`: its path match misses them), and it can
// repeat an element that follows a sliced one. So each element is kept once,
// and every differential element is laid over its snapshot element, as the
// differential says (its `type` replaces the base's: a profile narrows types).
for (const sd of profiles) {
  const seen = new Set();
  for (const e of sd.snapshot.element) if (!e.id) throw new Error(`${sd.url}: ${e.path} has no id`);
  sd.snapshot.element = sd.snapshot.element.filter((e) => !seen.has(e.id) && seen.add(e.id));
  for (const diff of sd.differential.element) {
    // By id: a slice's elements share their path with the unsliced ones.
    const snap = sd.snapshot.element.find((e) => e.id === diff.id);
    if (!snap) throw new Error(`${sd.url}: ${diff.id} missing from the snapshot`);
    const { constraint, ...rest } = diff;
    for (const kind of ['fixed', 'pattern']) {
      if (Object.keys(rest).some((k) => k.startsWith(kind))) {
        for (const key of Object.keys(snap).filter((k) => k.startsWith(kind))) delete snap[key];
      }
    }
    Object.assign(snap, rest);
    for (const c of constraint ?? []) {
      snap.constraint = (snap.constraint ?? []).filter((x) => x.key !== c.key).concat([c]);
    }
  }
  // A complex extension's part elements (Extension.extension:kind.url) come
  // from the differential alone, without the definition and cardinality a
  // snapshot element must have (sdf-3): they are the Extension type's own.
  for (const e of sd.snapshot.element) {
    if (e.min !== undefined && e.max !== undefined && e.definition) continue;
    const own = extension.snapshot.element.find((b) => b.path === `Extension.${e.path.split('.').pop()}`);
    if (!e.path.startsWith('Extension.extension.') || !own) throw new Error(`${sd.url}: ${e.id} is incomplete`);
    for (const key of ['short', 'definition', 'min', 'max', 'base']) e[key] ??= own[key];
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
