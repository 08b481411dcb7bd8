#!/usr/bin/env python3
"""The second-opinion case end to end, every role played by a real client.

  workflow.py FHIR_BASE DICOM_PORT WORKDIR TOKENS_JSON

Each role signs in with its own bearer token (TOKENS_JSON: a file mapping
role to token; authentication is on):
- the referring hospital's EHR: fhirpy, with st-mary's SMART Backend
  Services token ("partner");
- its PACS: DCMTK storescu (calling AE TESTSCU, st-mary's);
- the service's coordinator (roster, triage), the assigned specialist
  (whose token's subject is on the roster: the draft, the follow-up answer),
  the approver ($return, $approve) and the auditor: requests, each with a
  staff token of that role alone;
- the referrer's notification endpoint: a rest-hook receiver on loopback.

Every step asserts what it must see (a failed assert exits non-zero with the
step). At the end one JSON object goes to stdout: facts for the Rust test and
every resource the server emitted, for the public validators.
"""
import base64, collections, datetime, http.server, json, os, socket, subprocess, sys, threading, time, uuid

import pydicom
import requests
from fhirpy import SyncFHIRClient

BASE, DICOM_PORT, WORK = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with open(sys.argv[4]) as f:
    TOKENS = json.load(f)
PEERS = os.path.dirname(os.path.abspath(__file__))
# The specialist's staff id: on the roster as Practitioner.identifier.
STAFF_ID = "http://konsil.dev/fhir/sid/staff"
SPECIALIST = "dr-requested"
FHIR = "application/fhir+json"
STAGE = "http://konsil.dev/fhir/CodeSystem/case-stage"
KIND = "http://konsil.dev/fhir/CodeSystem/record-kind"
SPECIALTY = "http://konsil.dev/fhir/CodeSystem/specialty"
PATIENT_NAME_PARTS = ("Müller", "Jürgen", "Muller")
# fullUrls of the referral transaction, by name.
U = collections.defaultdict(lambda: f"urn:uuid:{uuid.uuid4()}")

referrer = SyncFHIRClient(BASE, authorization=f"Bearer {TOKENS['partner']}")
staff = requests.Session()
staff.headers.update({"Accept": FHIR})
emitted = {}
facts = {}


def step(name):
    print(f"== {name}", file=sys.stderr, flush=True)


def keep(resource):
    """Keep the latest version of every resource the server emitted."""
    emitted[f"{resource['resourceType']}/{resource['id']}"] = resource
    return resource


def call(method, path, body=None, partner=False, expect=None, role="coordinator"):
    """A request as the referrer (partner=True) or as staff in `role`."""
    headers = {"Content-Type": FHIR, "Accept": FHIR,
               "Authorization": f"Bearer {TOKENS['partner' if partner else role]}"}
    r = staff.request(method, f"{BASE}/{path}", headers=headers,
                      data=None if body is None else json.dumps(body))
    if expect is not None:
        assert r.status_code == expect, f"{method} {path}: {r.status_code} (wanted {expect}): {r.text[:800]}"
    return r.status_code, (r.json() if r.text else None)


def read(ref, partner=False):
    status, body = call("GET", ref, partner=partner)
    return status, body


def case_task(task_id):
    status, task = read(f"Task/{task_id}", partner=True)
    assert status == 200, (status, task)
    keep(task)
    return task


def stage(task):
    return next(c["code"] for c in task["businessStatus"]["coding"] if c["system"] == STAGE)


def missing(task):
    out = []
    for i in task.get("input", []):
        if any(c.get("code") == "missing-record" for c in i["type"].get("coding", [])):
            out += [c["code"] for c in i["valueCodeableConcept"]["coding"] if c["system"] == KIND]
    return sorted(out)


def wait_for(what, check, timeout=60):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def parameters(**values):
    out = []
    for name, value in values.items():
        if isinstance(value, str) and "/" in value and not " " in value:
            out.append({"name": name, "valueReference": {"reference": value}})
        else:
            out.append({"name": name, "valueString": value})
    return {"resourceType": "Parameters", "parameter": out} if out else {"resourceType": "Parameters"}


def document(full_url, binary_url, loinc, display, days_ago, text):
    when = (datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=days_ago))
    return [
        {"fullUrl": binary_url, "resource": {"resourceType": "Binary", "contentType": "text/plain",
                                             "data": base64.b64encode(text.encode()).decode()},
         "request": {"method": "POST", "url": "Binary"}},
        {"fullUrl": full_url, "resource": {
            "resourceType": "DocumentReference", "status": "current",
            "type": {"coding": [{"system": "http://loinc.org", "code": loinc, "display": display}]},
            "subject": {"reference": U["patient"]},
            "date": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "content": [{"attachment": {"contentType": "text/plain", "url": binary_url, "title": display}}],
            "context": {"related": [{"reference": U["request"]}]}},
         "request": {"method": "POST", "url": "DocumentReference"}},
    ]


class Hook(http.server.BaseHTTPRequestHandler):
    received = []

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode() if length else ""
        Hook.received.append({"auth": self.headers.get("Authorization"), "body": body})
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start_hook(port):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# --- the service's roster --------------------------------------------------------
step("staff: roster of oncology specialists")
roles, practitioners = {}, {}
for key, family in (("requested", "Requested"), ("other", "Other")):
    _, practitioner = call("POST", "Practitioner", {
        "resourceType": "Practitioner", "active": True,
        "identifier": [{"system": STAFF_ID, "value": f"dr-{key}"}],
        "name": [{"family": family, "given": ["Spec"], "prefix": ["Dr."]}]}, expect=201)
    _, role = call("POST", "PractitionerRole", {
        "resourceType": "PractitionerRole", "active": True,
        "practitioner": {"reference": f"Practitioner/{practitioner['id']}"},
        "organization": {"reference": "Organization/konsil"},
        "specialty": [{"coding": [{"system": SPECIALTY, "code": "oncology"}]}]}, expect=201)
    roles[key] = f"PractitionerRole/{role['id']}"
    practitioners[key] = f"Practitioner/{practitioner['id']}"
# An oncologist on leave is never proposed.
call("POST", "PractitionerRole", {
    "resourceType": "PractitionerRole", "active": True,
    "specialty": [{"coding": [{"system": SPECIALTY, "code": "oncology"}]}],
    "notAvailable": [{"description": "sabbatical", "during": {"start": "2020-01-01", "end": "2099-12-31"}}]},
    expect=201)

# --- the study the PACS will send -------------------------------------------------
step("PACS: make the CT study (4 slices, accession ACC-E2E-1)")
ct_dir = os.path.join(WORK, "ct")
out = subprocess.run([sys.executable, os.path.join(PEERS, "dicom_files.py"), "ct", ct_dir, "4",
                      "GW-E2E-0001", "ACC-E2E-1"], check=True, capture_output=True, text=True)
files = [line.split("\t")[0] for line in out.stdout.splitlines()]
study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID

# --- the referral, without consent and without imaging -----------------------------
step("EHR: referral transaction without consent and imaging (fhirpy)")
bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
    {"fullUrl": U["org"], "resource": {
        "resourceType": "Organization", "name": "St. Mary's Hospital",
        "identifier": [{"system": "urn:oid:2.16.840.1.113883.4.7", "value": "ST-MARY-E2E"}]},
     "request": {"method": "POST", "url": "Organization", "ifNoneExist": "identifier=urn:oid:2.16.840.1.113883.4.7|ST-MARY-E2E"}},
    {"fullUrl": U["patient"], "resource": {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:oid:1.2.3.4.5.6.7", "value": "GW-E2E-0001"}],
        "name": [{"family": "Müller", "given": ["Jürgen"]}], "birthDate": "1970-01-01", "gender": "male"},
     "request": {"method": "POST", "url": "Patient"}},
    {"fullUrl": U["request"], "resource": {
        "resourceType": "ServiceRequest",
        "meta": {"profile": ["http://konsil.dev/fhir/StructureDefinition/konsil-referral"]},
        "identifier": [{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]},
                        "system": "urn:oid:1.2.3.4.5.6.8", "value": "ACC-E2E-1"}],
        "status": "active", "intent": "order",
        "category": [{"coding": [{"system": "http://konsil.dev/fhir/CodeSystem/referral-type", "code": "second-opinion"}]}],
        "code": {"coding": [{"system": SPECIALTY, "code": "oncology", "display": "Oncology"}]},
        "subject": {"reference": U["patient"]},
        "requester": {"reference": U["org"]},
        # The referrer names the doctor; the proposal finds their role.
        "performer": [{"reference": practitioners["requested"]}],
        "reasonCode": [{"text": "Staging and treatment plan for a lung nodule"}]},
     "request": {"method": "POST", "url": "ServiceRequest"}},
    {"fullUrl": U["task"], "resource": {
        "resourceType": "Task", "status": "requested", "intent": "order",
        "focus": {"reference": U["request"]}, "for": {"reference": U["patient"]},
        "requester": {"reference": U["org"]}},
     "request": {"method": "POST", "url": "Task"}},
    {"fullUrl": U["manifest"], "resource": {
        "resourceType": "ImagingStudy", "status": "available",
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"}],
        "subject": {"reference": U["patient"]},
        "basedOn": [{"reference": U["request"]}],
        "numberOfInstances": len(files)},
     "request": {"method": "POST", "url": "ImagingStudy"}},
]
+ document(U["notes"], U["notes-bin"], "11506-3", "Progress note", 10, "Progress note text")
+ document(U["path"], U["path-bin"], "11526-1", "Pathology study", 40, "Adenocarcinoma")
+ document(U["labs"], U["labs-bin"], "11502-2", "Laboratory report", 5, "CBC normal")
+ document(U["meds"], U["meds-bin"], "10160-0", "History of Medication use Narrative", 5, "none")}
answer = referrer.execute("", method="post", data=bundle)
assert answer["type"] == "transaction-response", answer
locations = [e["response"]["location"] for e in answer["entry"]]
ids = {loc.split("/")[0]: loc.split("/")[1] for loc in locations}
task_id, request_id, patient_id = ids["Task"], ids["ServiceRequest"], ids["Patient"]
request_ref = f"ServiceRequest/{request_id}"
task_entry = next(e for e in answer["entry"] if e["response"]["location"].startswith("Task/"))
assert task_entry["resource"]["businessStatus"]["coding"][0]["code"] == "awaiting-records", task_entry
task = case_task(task_id)
assert task["status"] == "received" and stage(task) == "awaiting-records", task
assert missing(task) == ["consent", "imaging"], missing(task)
assert task["focus"]["reference"] == request_ref and task["owner"]["reference"] == "Organization/konsil"
facts["awaiting_records_missing"] = missing(task)
facts["status_reason"] = task["statusReason"]["text"]

step("EHR: a ServiceRequest outside the referral profile is stored, starts no case, and says why")
stray = {"resourceType": "Bundle", "type": "transaction", "entry": [{"resource": {
    "resourceType": "ServiceRequest", "status": "active", "intent": "order",
    "subject": {"reference": f"Patient/{patient_id}"}}, "request": {"method": "POST", "url": "ServiceRequest"}}]}
stray_answer = referrer.execute("", method="post", data=stray)
entry = stray_answer["entry"][0]["response"]
assert entry["status"].startswith("201"), entry
warning = entry["outcome"]["issue"][0]
assert warning["severity"] == "warning" and "no case started" in warning["diagnostics"], warning
stray_id = entry["location"].split("/")[1]
assert referrer.resources("Task").search(focus=f"ServiceRequest/{stray_id}").fetch_all() == []
facts["stray_warning"] = warning["diagnostics"]
# Posted on its own, without Prefer: the body is the resource, and the
# warning comes in the X-FHIR-Request-Validation header.
plain = staff.post(f"{BASE}/ServiceRequest", data=json.dumps(stray["entry"][0]["resource"]),
                   headers={"Content-Type": FHIR, "Accept": FHIR, "Authorization": f"Bearer {TOKENS['partner']}"})
assert plain.status_code == 201 and plain.json()["resourceType"] == "ServiceRequest", plain.text[:400]
header = plain.headers.get("X-FHIR-Request-Validation", "")
assert header.startswith("warning") and "no case started" in header, dict(plain.headers)
assert referrer.resources("Task").search(focus=f"ServiceRequest/{plain.json()['id']}").fetch_all() == []
facts["stray_header"] = header

step("EHR: subscribe to the case's Task and opinion (rest-hook, ids only)")
hook_port = free_port()
hook = start_hook(hook_port)
subscriptions = {}
for name, criteria in (("task", f"Task?focus={request_ref}"), ("report", f"DiagnosticReport?based-on={request_ref}")):
    _, sub = call("POST", "Subscription", {
        "resourceType": "Subscription", "status": "requested", "reason": "case updates",
        "criteria": criteria,
        "channel": {"type": "rest-hook", "endpoint": f"http://127.0.0.1:{hook_port}/hook",
                    "payload": FHIR, "header": ["Authorization: Bearer hook-secret"]}},
        partner=True, expect=201)
    assert sub["status"] == "active", sub
    subscriptions[name] = sub["id"]

# --- the PACS sends the study ----------------------------------------------------
step("PACS: storescu sends the study")
subprocess.run(["storescu", "-aet", "TESTSCU", "-aec", "KONSIL", "127.0.0.1", str(DICOM_PORT)] + files,
               check=True, capture_output=True)
task = wait_for("imaging to count", lambda: (lambda t: t if missing(t) == ["consent"] else None)(case_task(task_id)))
studies = referrer.resources("ImagingStudy").search(basedon=request_ref).fetch_all()
assert len(studies) == 1, [s.serialize() for s in studies]
study = keep(studies[0].serialize())
assert study["numberOfInstances"] == len(files) and study["series"][0]["numberOfInstances"] == len(files), study
assert study["endpoint"] == [{"reference": "Endpoint/konsil-dicomweb"}], study
assert {"url": "http://konsil.dev/fhir/StructureDefinition/announced-instances", "valueUnsignedInt": len(files)} in study["extension"]
facts["imaging_study_instances"] = study["numberOfInstances"]

# --- consent ----------------------------------------------------------------------
step("EHR: the consent arrives -> ready for triage")
today = datetime.date.today()
consent = referrer.resource("Consent", **{
    "status": "active",
    "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
    "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
    "patient": {"reference": f"Patient/{patient_id}"},
    "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}]},
    "provision": {"type": "permit",
                  "period": {"start": str(today - datetime.timedelta(days=1)), "end": str(today + datetime.timedelta(days=365))},
                  "purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "TREAT"}]}})
consent.save()
task = case_task(task_id)
assert stage(task) == "ready-for-triage" and task["status"] == "accepted" and missing(task) == [], task
assert "statusReason" not in task

step("guards: the referrer cannot move the case itself")
forged = dict(task, status="completed")
status, outcome = call("PUT", f"Task/{task_id}", forged, partner=True)
assert status == 422 and outcome["issue"][0]["code"] == "business-rule", (status, outcome)
assert case_task(task_id)["status"] == "accepted"
status, outcome = call("POST", f"Task/{task_id}/$assign", parameters(), partner=True)
assert status == 403, (status, outcome)

# --- triage ------------------------------------------------------------------------
step("coordinator: $propose changes nothing")
_, proposal = call("POST", f"Task/{task_id}/$propose", parameters(), expect=200)
# Parameters carry no id: kept under the operation's name for the validators.
emitted["Parameters/$propose"] = proposal
proposed = {p["name"]: p for p in proposal["parameter"]}
assert proposed["owner"]["valueReference"]["reference"] == roles["requested"], proposal
assert proposed["requested"]["valueBoolean"] is True and proposed["openCases"]["valueInteger"] == 0, proposal
assert stage(case_task(task_id)) == "ready-for-triage"
status, _ = call("POST", f"Task/{task_id}/$propose", parameters(), partner=True)
assert status == 403, status
# While the requested doctor is away, the proposal falls back to the
# available oncologist with the fewest open cases.
_, away = call("GET", roles["requested"], expect=200)
on_leave = dict(away, notAvailable=[{"description": "congress", "during": {"start": "2020-01-01", "end": "2099-12-31"}}])
call("PUT", roles["requested"], on_leave, expect=200)
_, proposal = call("POST", f"Task/{task_id}/$propose", parameters(), expect=200)
proposed = {p["name"]: p for p in proposal["parameter"]}
assert proposed["owner"]["valueReference"]["reference"] == roles["other"], proposal
assert proposed["requested"]["valueBoolean"] is False, proposal
back = {k: v for k, v in on_leave.items() if k not in ("notAvailable", "meta")}
call("PUT", roles["requested"], back, expect=200)
step("staff: $assign (no owner: the requested specialist is proposed)")
_, task = call("POST", f"Task/{task_id}/$assign", parameters(), expect=200)
keep(task)
assert task["owner"]["reference"] == roles["requested"] and stage(task) == "under-review", task
assert task["status"] == "in-progress"
facts["assigned"] = task["owner"]["reference"] == roles["requested"]

# --- the opinion ---------------------------------------------------------------------
step("specialist: draft opinion (preliminary DiagnosticReport)")
SECTION = "http://konsil.dev/fhir/StructureDefinition/opinion-section"
def section(kind, text):
    return {"url": SECTION, "extension": [{"url": "kind", "valueCode": kind}, {"url": "text", "valueString": text}]}
draft = {
    "resourceType": "DiagnosticReport", "status": "preliminary",
    "extension": [section("diagnosis-agreement", "We agree with the diagnosis of adenocarcinoma."),
                  section("treatment-agreement", "We partly agree with the plan."),
                  section("recommendations", "Obtain a PET-CT before surgery."),
                  section("would-change", "Nodal involvement on PET-CT would change this opinion.")],
    "basedOn": [{"reference": request_ref}],
    "code": {"coding": [{"system": "http://loinc.org", "code": "11488-4", "display": "Consult note"}], "text": "Oncology second opinion"},
    "subject": {"reference": f"Patient/{patient_id}"},
    "resultsInterpreter": [{"reference": roles["requested"]}],
    "imagingStudy": [{"reference": f"ImagingStudy/{study['id']}"}],
    "conclusion": "Stage IIA adenocarcinoma of the right upper lobe; lobectomy is appropriate after PET-CT."}
# A draft that falls short of the opinion profile or of the section
# extension's definition is refused, each finding naming its element.
def refused_at(body):
    status, outcome = call("POST", "DiagnosticReport", body, expect=422, role="specialist")
    return [e for i in outcome["issue"] for e in i.get("expression", [])]
# Work in progress (registered) is kept without moving the case, and is
# not approved.
_, wip = call("POST", "DiagnosticReport", {k: v for k, v in draft.items() if k not in ("conclusion", "extension")}
              | {"status": "registered"}, expect=201, role="specialist")
assert stage(case_task(task_id)) == "under-review"
call("POST", f"DiagnosticReport/{wip['id']}/$approve", expect=422, role="approver")
# Only the assigned specialist writes the opinion.
status, _ = call("POST", "DiagnosticReport", draft, role="other_specialist")
assert status in (403, 404), status
anonymous = {k: v for k, v in draft.items() if k != "resultsInterpreter"}
assert "DiagnosticReport.resultsInterpreter" in refused_at(anonymous)
odd = dict(draft, extension=[section("horoscope", "Favourable.")])
assert "DiagnosticReport.extension[0].extension[0].value" in refused_at(odd)
assert stage(case_task(task_id)) == "under-review"
# A submitted draft the specialist takes back (entered-in-error) returns the
# case to review, and stays withdrawn; work in progress may be withdrawn too.
_, first_try = call("POST", "DiagnosticReport", draft, expect=201, role="specialist")
assert stage(case_task(task_id)) == "awaiting-approval"
_, first_try = call("PUT", f"DiagnosticReport/{first_try['id']}", dict(first_try, status="entered-in-error"), expect=200, role="specialist")
assert stage(case_task(task_id)) == "under-review"
call("PUT", f"DiagnosticReport/{first_try['id']}", dict(first_try, status="preliminary"), expect=422, role="specialist")
call("PUT", f"DiagnosticReport/{wip['id']}", dict(wip, status="cancelled"), expect=200, role="specialist")
assert stage(case_task(task_id)) == "under-review"
call("DELETE", f"DiagnosticReport/{wip['id']}", expect=204, role="admin")
_, report = call("POST", "DiagnosticReport", draft, expect=201, role="specialist")
report_id = report["id"]
assert stage(case_task(task_id)) == "awaiting-approval"
# An opinion on a case with received imaging names the studies it rests on.
_, blind = call("POST", "DiagnosticReport", {k: v for k, v in draft.items() if k != "imagingStudy"}, expect=201, role="specialist")
status, outcome = call("POST", f"DiagnosticReport/{blind['id']}/$approve", role="approver")
assert status == 422 and "imagingStudy" in json.dumps(outcome), (status, outcome)
call("DELETE", f"DiagnosticReport/{blind['id']}", expect=204, role="admin")
assert stage(case_task(task_id)) == "awaiting-approval"
# A second submitted draft withdrawn leaves the first one waiting.
_, second = call("POST", "DiagnosticReport", draft, expect=201, role="specialist")
call("DELETE", f"DiagnosticReport/{second['id']}", expect=204, role="admin")
assert stage(case_task(task_id)) == "awaiting-approval"
status, _ = call("GET", f"DiagnosticReport/{report_id}", partner=True)
assert status == 404, status
assert referrer.resources("DiagnosticReport").search(**{"based-on": request_ref}).fetch_all() == []
status, outcome = call("POST", "DiagnosticReport", dict(draft, status="final"), role="specialist")
assert status == 422, (status, outcome)

step("staff: $return with a note, specialist revises")
_, task = call("POST", f"DiagnosticReport/{report_id}/$return", parameters(note="Please state the T stage explicitly."), expect=200, role="approver")
assert stage(task) == "under-review", task
report["conclusion"] = "Stage IIA (T2a N0 M0) adenocarcinoma of the right upper lobe; lobectomy is appropriate after PET-CT."
_, report = call("PUT", f"DiagnosticReport/{report_id}", report, expect=200, role="specialist")
assert stage(case_task(task_id)) == "awaiting-approval"
notes = [c for c in referrer.resources("Communication").fetch_all() if "about" in c.serialize()]
assert notes == [], "the referrer must not see internal review notes"
# Work in progress the specialist started while the draft waited: it is
# left over when the other draft is approved.
_, leftover = call("POST", "DiagnosticReport", {k: v for k, v in draft.items() if k not in ("conclusion", "extension")}
                   | {"status": "registered"}, expect=201, role="specialist")
assert stage(case_task(task_id)) == "awaiting-approval"

step("EHR: the consent is deleted -> the case holds and approval is refused; a new consent releases it")
call("DELETE", f"Consent/{consent.id}", partner=True, expect=204)
task = case_task(task_id)
assert stage(task) == "awaiting-approval" and task["status"] == "on-hold", task
assert "no longer on file" in task["statusReason"]["text"], task
status, outcome = call("POST", f"DiagnosticReport/{report_id}/$approve", role="approver")
assert status in (409, 422) and "consent" in json.dumps(outcome), (status, outcome)
consent = referrer.resource("Consent", **{k: v for k, v in consent.serialize().items()
                                          if k not in ("id", "meta")})
consent.save()
task = case_task(task_id)
assert stage(task) == "awaiting-approval" and task["status"] != "on-hold", task

step("EHR: the consent goes inactive, then its provision denies -> on hold each time; active and permitting again releases it")
for change, why in ((lambda c: c.__setitem__("status", "inactive"), "status is inactive"),
                    (lambda c: c["provision"].__setitem__("type", "deny"), "does not permit")):
    change(consent)
    consent.save()
    task = case_task(task_id)
    assert stage(task) == "awaiting-approval" and task["status"] == "on-hold", task
    assert why in task["statusReason"]["text"], task
    status, outcome = call("POST", f"DiagnosticReport/{report_id}/$approve", role="approver")
    assert status in (409, 422) and "consent" in json.dumps(outcome), (status, outcome)
    consent["status"] = "active"
    consent["provision"]["type"] = "permit"
    consent.save()
    task = case_task(task_id)
    assert stage(task) == "awaiting-approval" and task["status"] != "on-hold", task

# --- delivery while the referrer's endpoint is down, then up again ---------------------
step("referrer's endpoint goes down; staff $approve")
hook.shutdown()
hook.server_close()
before = len(Hook.received)
_, final = call("POST", f"DiagnosticReport/{report_id}/$approve", expect=200, role="approver")
assert final["status"] == "final" and final["presentedForm"][0]["contentType"] == "application/pdf", final
task = case_task(task_id)
assert task["status"] == "completed" and stage(task) == "delivered", task
assert task["output"][0]["valueReference"]["reference"] == f"DiagnosticReport/{report_id}"
# The delivered opinion is the case's record: not even an admin deletes it.
call("DELETE", f"DiagnosticReport/{report_id}", expect=409, role="admin")
# The draft left over is not the opinion: the specialist withdraws it and
# an admin removes it; the case stays delivered with its opinion.
call("PUT", f"DiagnosticReport/{leftover['id']}", dict(leftover, status="entered-in-error"), expect=200, role="specialist")
call("DELETE", f"DiagnosticReport/{leftover['id']}", expect=204, role="admin")
task = case_task(task_id)
assert stage(task) == "delivered" and task["output"][0]["valueReference"]["reference"] == f"DiagnosticReport/{report_id}", task
wait_for("the failed delivery to show", lambda: read(f"Subscription/{subscriptions['report']}", True)[1]["status"] == "error")
_, failing = read(f"Subscription/{subscriptions['report']}", True)
keep(failing)
facts["subscription_error"] = failing.get("error", "")
hook = start_hook(hook_port)
wait_for("the retried notification", lambda: any(f"DiagnosticReport/{report_id}" in n["body"] for n in Hook.received[before:]), timeout=90)
wait_for("the subscription to recover", lambda: read(f"Subscription/{subscriptions['report']}", True)[1]["status"] == "active")
keep(read(f"Subscription/{subscriptions['report']}", True)[1])
facts["notifications"] = len(Hook.received)
facts["notification_auth"] = sorted({n["auth"] for n in Hook.received})
facts["notification_leaks_name"] = any(part in n["body"] for n in Hook.received for part in PATIENT_NAME_PARTS)

step("EHR: reads the opinion; the PDF; the patient is told only now")
assert [c for c in referrer.resources("Communication").search(recipient=f"Patient/{patient_id}").fetch_all()] == []
found = referrer.resources("DiagnosticReport").search(**{"based-on": request_ref}).fetch_all()
assert len(found) == 1 and found[0]["status"] == "final"
opinion = keep(found[0].serialize())
pdf = base64.b64decode(opinion["presentedForm"][0]["data"])
with open(os.path.join(WORK, "opinion.pdf"), "wb") as f:
    f.write(pdf)
documents = referrer.resources("DocumentReference").search(related=f"DiagnosticReport/{report_id}").fetch_all()
assert len(documents) == 1 and documents[0]["type"]["coding"][0]["code"] == "11488-4"
keep(documents[0].serialize())
told = wait_for("the patient's notification", lambda: referrer.resources("Communication").search(recipient=f"Patient/{patient_id}").fetch_all())
assert len(told) == 1
keep(told[0].serialize())

# --- a follow-up question ---------------------------------------------------------------
step("EHR: follow-up question -> child Task for the same specialist; answered")
question = referrer.resource("Communication", **{
    "status": "completed", "partOf": [{"reference": f"Task/{task_id}"}],
    "subject": {"reference": f"Patient/{patient_id}"},
    "payload": [{"contentString": "Would you recommend adjuvant chemotherapy?"}]})
question.save()
children = referrer.resources("Task").search(**{"part-of": f"Task/{task_id}"}).fetch_all()
assert len(children) == 1, children
child = keep(children[0].serialize())
assert child["status"] == "in-progress" and child["owner"]["reference"] == roles["requested"], child
_, answer_msg = call("POST", "Communication", {
    "resourceType": "Communication", "status": "completed",
    "inResponseTo": [{"reference": f"Communication/{question.id}"}],
    "subject": {"reference": f"Patient/{patient_id}"},
    "payload": [{"contentString": "Not for stage IIA with clear margins."}]}, expect=201, role="specialist")
child = keep(read(f"Task/{child['id']}", True)[1])
assert child["status"] == "completed", child
status, answer_read = read(f"Communication/{answer_msg['id']}", True)
assert status == 200, "the answer goes back to the referrer"
keep(answer_read)
keep(case_task(task_id))
keep(read(f"ImagingStudy/{study['id']}", True)[1])

# Each operation on the case is in the trail, against the Task or report
# it acted on, with the operation's name.
for target, operation in ((f"Task/{task_id}", "$assign"), (f"DiagnosticReport/{report_id}", "$approve")):
    _, found = call("GET", f"AuditEvent?entity={target}&subtype=operation", role="auditor", expect=200)
    names = [d.get("valueString") for e in found.get("entry", []) for d in e["resource"]["entity"][0].get("detail", [])]
    assert operation in names, (target, operation, found)
    # The successful one once: stored in the operation's own transaction,
    # not again by the request log.
    done = [e for e in found.get("entry", []) if e["resource"].get("outcome") == "0"
            and any(d.get("valueString") == operation for d in e["resource"]["entity"][0].get("detail", []))]
    assert len(done) == 1, (target, operation, found)
# Every delivery attempt to the referrer's endpoint is in the trail: the
# ones that failed while it was down and the one that got through.
_, attempts = call("GET", f"AuditEvent?entity=Subscription/{subscriptions['report']}&subtype=rest-hook-notification&_count=1000",
                   role="auditor", expect=200)
outcomes = {e["resource"]["outcome"] for e in attempts.get("entry", [])}
assert {"0", "4"} <= outcomes, ("failed and successful delivery attempts", attempts)
_, audits = call("GET", "AuditEvent?_count=100", role="auditor")
for e in audits.get("entry", []):
    keep(e["resource"])
facts["audit_events"] = len(audits.get("entry", []))
facts["task_id"] = task_id
facts["study_uid"] = study_uid
facts["request_id"] = request_id
facts["locations"] = locations
facts["opinion_document"] = documents[0].id
facts["report_id"] = report_id
json.dump({"facts": facts, "resources": list(emitted.values())}, sys.stdout)
