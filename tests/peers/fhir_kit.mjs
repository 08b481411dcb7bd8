// Drive Konsil's FHIR edge with fhir-kit-client (npm), a JavaScript FHIR
// client: create, read, search, update, transaction.
//
//   node tests/peers/fhir_kit.mjs BASE_URL
//
// Prints a JSON summary for the Rust test. Modules come from
// KONSIL_NODE_MODULES (tests/run installs them under target/peers/node).
import path from 'node:path';
import { pathToFileURL } from 'node:url';

// An ESM-only package outside our folder: import it by file URL.
const modules = path.resolve(process.env.KONSIL_NODE_MODULES ?? '.');
const kit = await import(pathToFileURL(path.join(modules, 'fhir-kit-client', 'dist', 'index.js')).href);
const Client = kit.default ?? kit.Client;

const client = new Client({ baseUrl: process.argv[2] });
const created = await client.create({
  resourceType: 'Organization',
  body: { resourceType: 'Organization', name: 'Kit Hospital', identifier: [{ system: 'urn:kit', value: 'K-1' }] },
});
const read = await client.read({ resourceType: 'Organization', id: created.id });
const found = await client.search({ resourceType: 'Organization', searchParams: { identifier: 'urn:kit|K-1' } });
read.active = true;
const updated = await client.update({ resourceType: 'Organization', id: read.id, body: read });
const tx = await client.transaction({
  body: {
    resourceType: 'Bundle',
    type: 'transaction',
    entry: [
      {
        fullUrl: 'urn:uuid:4d2d8f1e-2f55-4d0e-9a1c-6a0f5d3b2c11',
        resource: { resourceType: 'Organization', name: 'Kit Child' },
        request: { method: 'POST', url: 'Organization' },
      },
      {
        resource: { resourceType: 'Endpoint', status: 'active', connectionType: { system: 'http://terminology.hl7.org/CodeSystem/endpoint-connection-type', code: 'hl7-fhir-rest' }, payloadType: [{ text: 'any' }], address: 'https://example.org/fhir', managingOrganization: { reference: 'urn:uuid:4d2d8f1e-2f55-4d0e-9a1c-6a0f5d3b2c11' } },
        request: { method: 'POST', url: 'Endpoint' },
      },
    ],
  },
});
const endpointId = tx.entry[1].response.location.split('/')[1];
const endpoint = await client.read({ resourceType: 'Endpoint', id: endpointId });
const capability = await client.capabilityStatement();
process.stdout.write(JSON.stringify({
  created_id: created.id,
  read_name: read.name,
  search_total: found.total,
  search_ids: (found.entry ?? []).map((e) => e.resource.id),
  updated_version: updated.meta.versionId,
  transaction_statuses: tx.entry.map((e) => e.response.status),
  endpoint_organization: endpoint.managingOrganization.reference,
  child_location: tx.entry[0].response.location,
  fhir_version: capability.fhirVersion,
}));
