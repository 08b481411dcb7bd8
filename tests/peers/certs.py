#!/usr/bin/env python3
"""Test certificates and TLS probes for Konsil's HTTPS and DICOM TLS (cryptography).

  certs.py make DIR
      a test CA (ca.pem), the server's certificate for localhost / 127.0.0.1
      (server.pem, chain with the CA; server.key), a second server
      certificate for the reload test (server2.pem / server2.key), and client
      certificates issued by the CA: st-mary.pem (CN=st-mary-pacs),
      city.pem (CN=city-pacs), stranger.pem (CN=stranger-pacs, bound to no
      partner), plus rogue.pem: CN=st-mary-pacs, self-signed (not the CA's).
      Keys are EC P-256, unencrypted PEM (<name>.key).
  certs.py subject HOST PORT
      the subject (RFC 4514) of the certificate the server presents.
  certs.py token BASE KEYDIR CLIENT SCOPE CERTDIR CERTNAME
      a SMART client-credentials token request over HTTPS with the client
      certificate CERTNAME (or "-" for none); prints {"status", "body"}.
"""
import datetime, json, os, ssl, socket, sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID, ExtendedKeyUsageOID
import ipaddress


def name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def write_key(path, key):
    with open(path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))


def pem(cert):
    return cert.public_bytes(serialization.Encoding.PEM)


def issue(subject_cn, issuer_name, issuer_key, server=False, ca=False, key=None):
    key = key or ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(name(subject_cn))
               .issuer_name(issuer_name or name(subject_cn))
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=2)))
    if ca:
        builder = (builder
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                content_commitment=False, key_encipherment=False,
                                                data_encipherment=False, key_agreement=False,
                                                encipher_only=False, decipher_only=False), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    else:
        # Python 3.13's strict verification wants both key identifiers.
        builder = (builder
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       (issuer_key or key).public_key()), critical=False))
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
    cert = builder.sign(issuer_key or key, hashes.SHA256())
    return cert, key


def make(out):
    os.makedirs(out, exist_ok=True)
    ca, ca_key = issue("Konsil Test CA", None, None, ca=True)
    with open(os.path.join(out, "ca.pem"), "wb") as f:
        f.write(pem(ca))
    write_key(os.path.join(out, "ca.key"), ca_key)
    for file, cn in (("server", "konsil-test-server"), ("server2", "konsil-test-server-renewed")):
        cert, key = issue(cn, ca.subject, ca_key, server=True)
        with open(os.path.join(out, f"{file}.pem"), "wb") as f:
            f.write(pem(cert) + pem(ca))
        write_key(os.path.join(out, f"{file}.key"), key)
    for file, cn in (("st-mary", "st-mary-pacs"), ("city", "city-pacs"), ("stranger", "stranger-pacs")):
        cert, key = issue(cn, ca.subject, ca_key)
        with open(os.path.join(out, f"{file}.pem"), "wb") as f:
            f.write(pem(cert))
        write_key(os.path.join(out, f"{file}.key"), key)
    rogue, rogue_key = issue("st-mary-pacs", None, None)
    with open(os.path.join(out, "rogue.pem"), "wb") as f:
        f.write(pem(rogue))
    write_key(os.path.join(out, "rogue.key"), rogue_key)
    print(json.dumps({"dir": out}))


def subject(host, port):
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
    print(x509.load_der_x509_certificate(der).subject.rfc4514_string())


def token(base, keydir, client, scope, certdir, certname):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import auth
    import requests
    # Per request: requests lets REQUESTS_CA_BUNDLE beat a session's verify.
    tls = {"verify": os.path.join(certdir, "ca.pem"), "timeout": 30}
    if certname != "-":
        tls["cert"] = (os.path.join(certdir, f"{certname}.pem"), os.path.join(certdir, f"{certname}.key"))
    conf = requests.get(f"{base}/fhir/.well-known/smart-configuration", **tls).json()
    token_url = conf["token_endpoint"]
    assert token_url.startswith("https://"), token_url
    form = {"grant_type": "client_credentials", "scope": scope,
            "client_assertion_type": auth.JWT_BEARER,
            "client_assertion": auth.assertion(keydir, client, token_url)}
    r = requests.post(token_url, data=form, **tls)
    print(json.dumps({"status": r.status_code, "body": r.json()}))


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    {"make": make, "subject": subject, "token": token}[command](*args)
