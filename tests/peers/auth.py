#!/usr/bin/env python3
"""SMART Backend Services against Konsil, as a partner's system would do it.

  auth.py keys DIR
      make each test client's key pair (PyJWT / cryptography): an RS384 RSA
      key for st-mary-ehr and st-mary-viewer, an ES384 P-384 key for
      city-clinic-ehr; writes DIR/<client>.pem and DIR/<client>.jwks.json,
      plus DIR/impostor.pem (an RSA key nobody registered).
  auth.py idp DIR [NAME KID]
      a staff OpenID Connect issuer's RS256 key: DIR/NAME.pem, DIR/NAME.jwks.json
      (NAME idp, KID idp-1 by default).
  auth.py idp-token DIR ISSUER AUDIENCE SUBJECT ROLES [KEY [KID]]
      a token that issuer signs (ROLES comma-separated, "-" for none; KEY
      another key file name in DIR to forge one or to sign with a rotated key).
  auth.py idp-serve DIR PORT_FILE
      that issuer's OpenID Connect discovery and JWKS (DIR/served.jwks.json)
      on a loopback port, written to PORT_FILE.
  auth.py token BASE DIR CLIENT SCOPE
      get an access token; prints {"access_token", "scope", "expires_in"}.
  auth.py scenario BASE DIR DICOM_FILE
      the token endpoint's checks, then fhirpy and dicomweb-client with the
      tokens: own case readable, another partner's 404, narrow scopes 403.

BASE is the server root (http://127.0.0.1:PORT). Each check asserts; a
failure exits non-zero naming the step. `scenario` prints one JSON object of
facts for the Rust test.
"""
import json, os, sys, time, uuid

import jwt
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from dicomweb_client.api import DICOMwebClient
from fhirpy import SyncFHIRClient
import pydicom

CLIENTS = {
    "st-mary-ehr": "RS384",
    "st-mary-viewer": "RS384",
    "city-clinic-ehr": "ES384",
}
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def step(name):
    print(f"== {name}", file=sys.stderr, flush=True)


def new_key(alg):
    if alg == "ES384":
        return ec.generate_private_key(ec.SECP384R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def pem(key):
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def keys(out):
    os.makedirs(out, exist_ok=True)
    for client, alg in CLIENTS.items():
        key = new_key(alg)
        with open(os.path.join(out, f"{client}.pem"), "wb") as f:
            f.write(pem(key))
        jwk = json.loads(jwt.algorithms.get_default_algorithms()[alg].to_jwk(key.public_key()))
        jwk.update({"kid": f"{client}-1", "alg": alg, "use": "sig"})
        with open(os.path.join(out, f"{client}.jwks.json"), "w") as f:
            json.dump({"keys": [jwk]}, f)
    with open(os.path.join(out, "impostor.pem"), "wb") as f:
        f.write(pem(new_key("RS384")))
    print(json.dumps({"dir": out}))


def private_key(keydir, name):
    with open(os.path.join(keydir, f"{name}.pem"), "rb") as f:
        return serialization.load_pem_private_key(f.read(), password=None)


def assertion(keydir, client, token_url, key_name=None, alg=None, kid=None, **claims):
    """A client assertion as SMART Backend Services describes it; keyword
    arguments replace claims (None removes one)."""
    now = int(time.time())
    body = {"iss": client, "sub": client, "aud": token_url, "exp": now + 240,
            "jti": str(uuid.uuid4())}
    for name, value in claims.items():
        if value is None:
            body.pop(name, None)
        else:
            body[name] = value
    key = private_key(keydir, key_name or client)
    return jwt.encode(body, key, algorithm=alg or CLIENTS[client],
                      headers={"kid": kid or f"{client}-1", "typ": "JWT"})


def request_token(token_url, signed, scope, grant_type="client_credentials",
                  assertion_type=JWT_BEARER):
    form = {"grant_type": grant_type, "scope": scope,
            "client_assertion_type": assertion_type, "client_assertion": signed}
    return requests.post(token_url, data=form, timeout=30)


def smart_token_url(base):
    r = requests.get(f"{base}/fhir/.well-known/smart-configuration", timeout=30)
    assert r.status_code == 200, r.text
    conf = r.json()
    assert "private_key_jwt" in conf["token_endpoint_auth_methods_supported"], conf
    assert {"RS384", "ES384"} <= set(conf["token_endpoint_auth_signing_alg_values_supported"]), conf
    assert "client_credentials" in conf["grant_types_supported"], conf
    assert "client-confidential-asymmetric" in conf["capabilities"], conf
    return conf["token_endpoint"], conf


def token(base, keydir, client, scope):
    token_url, _ = smart_token_url(base)
    r = request_token(token_url, assertion(keydir, client, token_url), scope)
    assert r.status_code == 200, r.text
    return r.json()


def expect_error(name, response, status, error):
    assert response.status_code == status, f"{name}: {response.status_code} {response.text}"
    body = response.json()
    assert body["error"] == error, f"{name}: {body}"
    assert body.get("error_description"), f"{name}: no description"
    assert response.headers.get("Cache-Control") == "no-store", f"{name}: {response.headers}"
    return body["error_description"]


def scenario(base, keydir, dicom_file):
    facts = {}
    step("SMART configuration")
    token_url, conf = smart_token_url(base)
    facts["token_endpoint"] = token_url
    jwks = requests.get(conf["jwks_uri"], timeout=30).json()
    assert jwks["keys"] and jwks["keys"][0]["kty"] == "EC", jwks

    step("no token: 401 with a bearer challenge, on FHIR and DICOMweb")
    for url in (f"{base}/fhir/Patient", f"{base}/dicomweb/studies"):
        r = requests.get(url, timeout=30)
        assert r.status_code == 401, (url, r.status_code, r.text)
        assert r.headers.get("WWW-Authenticate", "").startswith("Bearer"), r.headers
    r = requests.get(f"{base}/fhir/Patient", timeout=30)
    assert r.json()["resourceType"] == "OperationOutcome", r.text
    r = requests.get(f"{base}/fhir/Patient", headers={"Authorization": "Bearer not.a.token"}, timeout=30)
    assert r.status_code == 401 and "invalid_token" in r.headers["WWW-Authenticate"], r.headers
    # The development header means nothing when authentication is on.
    r = requests.get(f"{base}/fhir/Patient", headers={"X-Konsil-Partner": "st-mary"}, timeout=30)
    assert r.status_code == 401, r.text
    # The CapabilityStatement stays public.
    assert requests.get(f"{base}/fhir/metadata", timeout=30).status_code == 200

    step("the token endpoint refuses bad client assertions")
    refusals = {}
    good_scope = "system/Patient.cruds"
    cases = {
        "wrong aud": (assertion(keydir, "st-mary-ehr", token_url, aud=f"{base}/other"), 401, "invalid_client"),
        "expired": (assertion(keydir, "st-mary-ehr", token_url, exp=int(time.time()) - 600), 401, "invalid_client"),
        "exp too far": (assertion(keydir, "st-mary-ehr", token_url, exp=int(time.time()) + 3600), 401, "invalid_client"),
        "no jti": (assertion(keydir, "st-mary-ehr", token_url, jti=None), 401, "invalid_client"),
        "sub differs": (assertion(keydir, "st-mary-ehr", token_url, sub="someone-else"), 401, "invalid_client"),
        "unknown client": (assertion(keydir, "st-mary-ehr", token_url, iss="nobody", sub="nobody"), 401, "invalid_client"),
        "signed by another key": (assertion(keydir, "st-mary-ehr", token_url, key_name="impostor"), 401, "invalid_client"),
        "unknown kid": (assertion(keydir, "st-mary-ehr", token_url, kid="other-kid"), 401, "invalid_client"),
        "RS256": (assertion(keydir, "st-mary-ehr", token_url, alg="RS256"), 401, "invalid_client"),
        "HS256 with a guessed secret": (jwt.encode({"iss": "st-mary-ehr", "sub": "st-mary-ehr", "aud": token_url,
                                                     "exp": int(time.time()) + 60, "jti": str(uuid.uuid4())},
                                                    "secret-secret-secret-secret-secret!", algorithm="HS256",
                                                    headers={"kid": "st-mary-ehr-1"}), 401, "invalid_client"),
    }
    for name, (signed, status, error) in cases.items():
        refusals[name] = expect_error(name, request_token(token_url, signed, good_scope), status, error)
    fresh = lambda: assertion(keydir, "st-mary-ehr", token_url)
    refusals["grant type"] = expect_error("grant type", request_token(token_url, fresh(), good_scope, grant_type="password"), 400, "unsupported_grant_type")
    refusals["assertion type"] = expect_error("assertion type", request_token(token_url, fresh(), good_scope, assertion_type="urn:x"), 400, "invalid_request")
    refusals["no scope"] = expect_error("no scope", request_token(token_url, fresh(), ""), 400, "invalid_scope")
    refusals["patient scope"] = expect_error("patient scope", request_token(token_url, fresh(), "patient/*.rs"), 400, "invalid_scope")
    refusals["unregistered scope"] = expect_error(
        "unregistered scope", request_token(token_url, assertion(keydir, "st-mary-viewer", token_url), "system/Patient.c"),
        400, "invalid_scope")
    r = requests.post(token_url, json={"grant_type": "client_credentials"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"] == "invalid_request", r.text
    facts["refusals"] = refusals

    step("a good assertion gets a token once; its replay is refused")
    signed = fresh()
    r = request_token(token_url, signed, "system/*.cruds")
    assert r.status_code == 200, r.text
    granted = r.json()
    assert granted["token_type"].lower() == "bearer" and 0 < granted["expires_in"] <= 300, granted
    assert r.headers.get("Cache-Control") == "no-store", r.headers
    facts["st_mary_scope"] = granted["scope"]
    expect_error("replay", request_token(token_url, signed, "system/*.cruds"), 401, "invalid_client")
    st_mary = granted["access_token"]

    step("an assertion just past its exp (within the clock leeway) is good once, and its replay is refused too")
    late = assertion(keydir, "st-mary-ehr", token_url, exp=int(time.time()) - 5)
    r = request_token(token_url, late, "system/Patient.rs")
    assert r.status_code == 200, r.text
    why = expect_error("late replay", request_token(token_url, late, "system/Patient.rs"), 401, "invalid_client")
    assert "already used" in why, why
    step("exp more than 300 s (plus the 30 s clock leeway) ahead is refused")
    facts["refusals"]["exp 360 s ahead"] = expect_error(
        "exp 360 s ahead", request_token(token_url, assertion(keydir, "st-mary-ehr", token_url, exp=int(time.time()) + 360),
                                         "system/Patient.rs"), 401, "invalid_client")

    step("an ES384 client (city-clinic) gets a token")
    city = token(base, keydir, "city-clinic-ehr", "system/*.rs system/Patient.c")
    facts["city_scope"] = city["scope"]
    viewer = token(base, keydir, "st-mary-viewer", "system/*.cruds")
    facts["viewer_scope"] = viewer["scope"]

    step("fhirpy with st-mary's token: its own patient")
    bearer = lambda t: f"Bearer {t}"
    ehr = SyncFHIRClient(f"{base}/fhir", authorization=bearer(st_mary))
    patient = ehr.resource("Patient", name=[{"family": "Authtest", "given": ["Ada"]}],
                           identifier=[{"system": "urn:oid:1.2.3.4.5", "value": "AUTH-1"}])
    patient.save()
    facts["patient_id"] = patient.id
    again = ehr.reference("Patient", patient.id).to_resource()
    assert again["name"][0]["family"] == "Authtest"
    assert len(ehr.resources("Patient").search(identifier="AUTH-1").fetch_all()) == 1

    step("fhirpy with city-clinic's token: st-mary's patient is not found")
    other = SyncFHIRClient(f"{base}/fhir", authorization=bearer(city["access_token"]))
    r = requests.get(f"{base}/fhir/Patient/{patient.id}", headers={"Authorization": bearer(city["access_token"])}, timeout=30)
    assert r.status_code == 404, r.text
    assert other.resources("Patient").search(identifier="AUTH-1").fetch_all() == []
    r = requests.get(f"{base}/fhir/Patient/{patient.id}/_history", headers={"Authorization": bearer(city["access_token"])}, timeout=30)
    assert r.status_code == 404, r.text
    r = requests.get(f"{base}/fhir/Patient?_summary=count&identifier=AUTH-1", headers={"Authorization": bearer(city["access_token"])}, timeout=30)
    assert r.status_code == 200 and r.json()["total"] == 0, r.text
    # city-clinic may create Patients but not update them.
    r = requests.put(f"{base}/fhir/Patient/{patient.id}", json=dict(again.serialize()),
                     headers={"Authorization": bearer(city["access_token"]), "Content-Type": "application/fhir+json"}, timeout=30)
    assert r.status_code == 403 and r.json()["resourceType"] == "OperationOutcome", r.text

    step("the viewer's narrow token: reads reports, may not create a patient")
    r = requests.post(f"{base}/fhir/Patient", json={"resourceType": "Patient"},
                      headers={"Authorization": bearer(viewer["access_token"]), "Content-Type": "application/fhir+json"}, timeout=30)
    assert r.status_code == 403, r.text
    facts["viewer_denied"] = r.json()["issue"][0]["diagnostics"]
    r = requests.get(f"{base}/fhir/DiagnosticReport", headers={"Authorization": bearer(viewer["access_token"])}, timeout=30)
    assert r.status_code == 200, r.text
    # A transaction is checked entry by entry.
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:" + str(uuid.uuid4()), "resource": {"resourceType": "Patient"},
         "request": {"method": "POST", "url": "Patient"}}]}
    r = requests.post(f"{base}/fhir", json=bundle,
                      headers={"Authorization": bearer(viewer["access_token"]), "Content-Type": "application/fhir+json"}, timeout=30)
    assert r.status_code == 403, r.text
    assert "entry[0]" in r.json()["issue"][0]["expression"][0], r.text

    step("dicomweb-client with the tokens")
    ds = pydicom.dcmread(dicom_file)
    study = ds.StudyInstanceUID
    sender = DICOMwebClient(f"{base}/dicomweb", headers={"Authorization": bearer(st_mary)})
    stored = sender.store_instances(datasets=[ds])
    assert len(stored.ReferencedSOPSequence) == 1
    assert [s["0020000D"]["Value"][0] for s in sender.search_for_studies()] == [study]
    back = sender.retrieve_instance(study, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert back.SOPInstanceUID == ds.SOPInstanceUID
    foreign = DICOMwebClient(f"{base}/dicomweb", headers={"Authorization": bearer(city["access_token"])})
    assert foreign.search_for_studies() == []
    r = requests.get(f"{base}/dicomweb/studies/{study}/metadata", headers={"Authorization": bearer(city["access_token"])}, timeout=30)
    assert r.status_code == 404, r.text
    # city-clinic's scopes have no ImagingStudy.c: no STOW.
    r = requests.post(f"{base}/dicomweb/studies", data=b"--x--",
                      headers={"Authorization": bearer(city["access_token"]),
                               "Content-Type": 'multipart/related; type="application/dicom"; boundary=x'}, timeout=30)
    assert r.status_code == 403, r.text
    facts["study"] = study
    print(json.dumps(facts))


def idp(out, name="idp", kid="idp-1"):
    """A staff OpenID Connect issuer's signing key (RS256, as most issue)."""
    os.makedirs(out, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with open(os.path.join(out, f"{name}.pem"), "wb") as f:
        f.write(pem(key))
    jwk = json.loads(jwt.algorithms.get_default_algorithms()["RS256"].to_jwk(key.public_key()))
    jwk.update({"kid": kid, "alg": "RS256", "use": "sig"})
    with open(os.path.join(out, f"{name}.jwks.json"), "w") as f:
        json.dump({"keys": [jwk]}, f)


def idp_token(keydir, issuer, audience, subject, roles, key_name="idp", kid="idp-1"):
    """An ID/access token as the issuer would sign it; roles comma-separated
    ("-" for none)."""
    now = int(time.time())
    claims = {"iss": issuer, "aud": audience, "sub": subject, "iat": now, "exp": now + 300}
    if roles != "-":
        claims["roles"] = roles.split(",")
    return jwt.encode(claims, private_key(keydir, key_name), algorithm="RS256",
                      headers={"kid": kid})


def idp_serve(keydir, port_file):
    """The issuer's OpenID Connect discovery on loopback: the configuration
    document at /.well-known/openid-configuration, its JWKS (KEYDIR/served.jwks.json,
    read at each request so the test can rotate keys) at /jwks; each JWKS
    fetch is a line in KEYDIR/fetches.log. Writes the port, then serves until killed."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Issuer(BaseHTTPRequestHandler):
        def do_GET(self):
            base = f"http://127.0.0.1:{self.server.server_port}"
            if self.path == "/.well-known/openid-configuration":
                body = {"issuer": base, "jwks_uri": f"{base}/jwks",
                        "id_token_signing_alg_values_supported": ["RS256"]}
            elif self.path == "/jwks":
                with open(os.path.join(keydir, "served.jwks.json")) as f:
                    body = json.load(f)
                with open(os.path.join(keydir, "fetches.log"), "a") as f:
                    f.write("jwks\n")
            else:
                self.send_error(404)
                return
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Issuer)
    with open(port_file + ".tmp", "w") as f:
        f.write(str(server.server_port))
    os.rename(port_file + ".tmp", port_file)
    server.serve_forever()


def main():
    command = sys.argv[1]
    if command == "keys":
        keys(sys.argv[2])
    elif command == "idp":
        idp(*sys.argv[2:])
    elif command == "idp-serve":
        idp_serve(sys.argv[2], sys.argv[3])
    elif command == "idp-token":
        print(idp_token(*sys.argv[2:]))
    elif command == "token":
        print(json.dumps(token(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5])))
    elif command == "scenario":
        scenario(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        sys.exit(f"unknown command {command}")


if __name__ == "__main__":
    main()
