#!/usr/bin/env python3
"""pynetdicom as a second, independent SCU.

  pyscu.py echo HOST PORT AET AEC
  pyscu.py store HOST PORT AET AEC FILE...   one presentation context per (SOP class, transfer syntax)
  pyscu.py hold HOST PORT AET AEC SECONDS    associate, wait, release
  pyscu.py store-hold HOST PORT AET AEC SECONDS FILE...
      store as `store` does, print "held", then hold the association SECONDS before releasing
  pyscu.py negotiate HOST PORT AET AEC SOP_CLASS TS...
      one presentation context per transfer syntax; prints "TS<TAB>accepted|rejected"
  pyscu.py raw HOST PORT AET AEC FILE [--instance UID] [--cut N] [--garbage]
      send FILE's data set bytes exactly as they are (or cut short, or replaced by
      garbage) in a C-STORE whose command names FILE's meta UIDs (or --instance):
      real SCUs re-encode what they send, so this is how bad bytes reach the SCP.

store prints "0xSSSS<TAB>FILE<TAB>error comment" per file; exit 0 once every file got a response.
With PYSCU_TLS=CERT:KEY:CA in the environment, the association runs over TLS with that
client certificate, trusting CA.
"""
import os, ssl, struct, sys, time
from io import BytesIO
import pydicom
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom import AE
from pynetdicom.sop_class import Verification

def associate(ae, host, port, aec):
    tls_args = None
    if os.environ.get("PYSCU_TLS"):
        cert, key, ca = os.environ["PYSCU_TLS"].split(":")
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
        context.load_cert_chain(cert, key)
        tls_args = (context, host)
    assoc = ae.associate(host, int(port), ae_title=aec, tls_args=tls_args)
    if not assoc.is_established:
        print("association not established", file=sys.stderr)
        sys.exit(2)
    return assoc

def main():
    cmd, host, port, aet, aec = sys.argv[1:6]
    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    if cmd == "echo":
        ae.add_requested_context(Verification)
        assoc = associate(ae, host, port, aec)
        status = assoc.send_c_echo()
        print(f"0x{status.Status:04X}")
        assoc.release()
    elif cmd in ("store", "store-hold"):
        hold = float(sys.argv[6]) if cmd == "store-hold" else 0
        files = sys.argv[7:] if cmd == "store-hold" else sys.argv[6:]
        contexts = set()
        for f in files:
            meta = pydicom.dcmread(f, stop_before_pixels=True).file_meta
            contexts.add((meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID))
        for sop_class, ts in sorted(contexts):
            ae.add_requested_context(sop_class, [ts])
        assoc = associate(ae, host, port, aec)
        for f in files:
            status = assoc.send_c_store(f)
            if not status:
                print(f"none\t{f}\tno response")
                continue
            comment = status.get("ErrorComment", "")
            print(f"0x{status.Status:04X}\t{f}\t{comment}", flush=True)
        if cmd == "store-hold":
            print("held", flush=True)
            time.sleep(hold)
        assoc.release()
    elif cmd == "raw":
        path, opts = sys.argv[6], sys.argv[7:]
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        with open(path, "rb") as f:
            raw = f.read()
        start = 132 + 12 + struct.unpack("<I", raw[140:144])[0]
        data = raw[start:]
        instance = meta.MediaStorageSOPInstanceUID
        if "--instance" in opts:
            instance = opts[opts.index("--instance") + 1]
        if "--cut" in opts:
            data = data[: len(data) - int(opts[opts.index("--cut") + 1])]
        if "--garbage" in opts:
            data = b"\x08\x00\x16\x00UI\xff\xff" + os.urandom(200)
        ae.add_requested_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
        assoc = associate(ae, host, port, aec)
        context = assoc.accepted_contexts[0]
        req = C_STORE()
        req.MessageID = 1
        req.AffectedSOPClassUID = meta.MediaStorageSOPClassUID
        req.AffectedSOPInstanceUID = instance
        req.Priority = 2
        req.DataSet = BytesIO(data)
        # As Association.send_c_store does: pause the reactor, send, wait.
        assoc._reactor_checkpoint.clear()
        while not assoc._is_paused:
            time.sleep(0.0001)
        assoc.dimse.send_msg(req, context.context_id)
        _, rsp = assoc.dimse.get_msg(block=True)
        assoc._reactor_checkpoint.set()
        if rsp is None:
            print("none\tno response")
        else:
            print(f"0x{rsp.Status:04X}\t{path}\t{rsp.ErrorComment or ''}")
        assoc.release()
    elif cmd == "negotiate":
        sop_class, syntaxes = sys.argv[6], sys.argv[7:]
        for ts in syntaxes:
            ae.add_requested_context(sop_class, [ts])
        # pynetdicom aborts an association without any accepted context.
        ae.add_requested_context(Verification)
        assoc = associate(ae, host, port, aec)
        accepted = {cx.transfer_syntax[0] for cx in assoc.accepted_contexts
                    if cx.abstract_syntax == sop_class}
        for ts in syntaxes:
            print(f"{ts}\t{'accepted' if ts in accepted else 'rejected'}")
        assoc.release()
    elif cmd == "hold":
        ae.add_requested_context(Verification)
        assoc = associate(ae, host, port, aec)
        print("held", flush=True)
        time.sleep(float(sys.argv[6]))
        assoc.release()
    else:
        sys.exit(__doc__)

main()
