#!/usr/bin/env python3
"""Drive Konsil's FHIR edge with the FHIR clients a referring EHR uses:
SMART's fhirclient (R4 models) and fhirpy.

    fhir_clients.py BASE_URL

Each client creates, reads, searches, updates and posts a transaction; the
script prints a JSON summary of what each saw, for the Rust test to check.
"""

import json
import sys

from fhirclient import client as smart_client
from fhirclient.models.patient import Patient
from fhirclient.models.humanname import HumanName
from fhirclient.models.identifier import Identifier
from fhirclient.models.task import Task
from fhirpy import SyncFHIRClient


def with_fhirclient(base):
    smart = smart_client.FHIRClient(settings={"app_id": "konsil-test", "api_base": base})
    server = smart.server
    # The client reads and parses the CapabilityStatement with its models.
    server.get_capability()
    patient = Patient()
    patient.identifier = [Identifier({"system": "urn:fhirclient", "value": "FC-1"})]
    patient.name = [HumanName({"family": "Client", "given": ["Smart"]})]
    created = patient.create(server)
    pid = created["id"]
    read = Patient.read(pid, server)
    found = Patient.where(struct={"identifier": "urn:fhirclient|FC-1"}).perform_resources(server)
    read.birthDate = None
    read.gender = "female"
    updated = read.update(server)
    task = Task({"status": "requested", "intent": "order", "for": {"reference": f"Patient/{pid}"}})
    task_created = task.create(server)
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": "urn:uuid:0f6b7c7e-8a4e-4b8e-9a55-3d2d6f1c0a01",
             "resource": {"resourceType": "Patient", "name": [{"family": "Tx"}]},
             "request": {"method": "POST", "url": "Patient"}},
            {"resource": {"resourceType": "Task", "status": "requested", "intent": "order",
                          "for": {"reference": "urn:uuid:0f6b7c7e-8a4e-4b8e-9a55-3d2d6f1c0a01"}},
             "request": {"method": "POST", "url": "Task"}},
        ],
    }
    tx = server.post_json("", bundle).json()
    return {
        "fhir_version": server.capabilityStatement.fhirVersion,
        "created_id": pid,
        "read_family": read.name[0].family,
        "search_ids": [p.id for p in found],
        "updated_version": updated["meta"]["versionId"],
        "updated_gender": updated.get("gender"),
        "task_for": task_created["for"]["reference"],
        "transaction_statuses": [e["response"]["status"] for e in tx["entry"]],
        "transaction_locations": [e["response"]["location"] for e in tx["entry"]],
    }


def with_fhirpy(base):
    client = SyncFHIRClient(base)
    patient = client.resource("Patient", identifier=[{"system": "urn:fhirpy", "value": "PY-1"}],
                              name=[{"family": "Py", "given": ["Fhir"]}], birthDate="1980-02-03")
    patient.save()
    fetched = client.reference("Patient", patient["id"]).to_resource()
    found = client.resources("Patient").search(identifier="urn:fhirpy|PY-1").fetch_all()
    births = client.resources("Patient").search(birthdate__ge="1980-01-01", family="Py").fetch()
    fetched["active"] = True
    fetched.save()
    again = client.reference("Patient", patient["id"]).to_resource()
    count = client.resources("Patient").search(family="Py").count()
    tx = client.execute("", method="post", data={
        "resourceType": "Bundle", "type": "transaction",
        "entry": [{"resource": {"resourceType": "Organization", "name": "fhirpy org"},
                   "request": {"method": "POST", "url": "Organization"}}],
    })
    return {
        "created_id": patient["id"],
        "read_birth_date": fetched["birthDate"],
        "search_ids": [p["id"] for p in found],
        "date_search_ids": [p["id"] for p in births],
        "version_after_update": again["meta"]["versionId"],
        "active_after_update": again["active"],
        "count": count,
        "transaction_statuses": [e["response"]["status"] for e in tx["entry"]],
    }


def main():
    base = sys.argv[1]
    print(json.dumps({"fhirclient": with_fhirclient(base), "fhirpy": with_fhirpy(base)}))


if __name__ == "__main__":
    main()
