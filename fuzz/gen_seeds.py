#!/usr/bin/env python3
"""Writes the checked-in seed corpus under fuzz/corpus/<target>/ (re-run to regenerate).

decode_stream inputs are: 1 config byte (bit 7 set = small max frame length), 4 chunk-size bytes,
then the byte stream. roundtrip inputs are raw bytes for `arbitrary`; a few varied blobs suffice.
"""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def frame(kind, payload):
    return struct.pack(">BI", kind, len(payload)) + payload


def request(argv, files=(), **extra):
    doc = {"version": 1, "argv": list(argv), **extra}
    body = b""
    if files:
        doc["stage_files"] = [{"path": p, "len": len(c)} for p, c in files]
        body = b"\0" + b"".join(c for _, c in files)
    return frame(0xFF, json.dumps(doc).encode() + body)


VALID = {
    "request": request(["sh", "-c", "echo hi"], env={"A": "b"}, cwd="/tmp", tty=True, cols=80, rows=24),
    "request_staged": request(["/x/run.sh"], files=[("/x/run.sh", b"#!/bin/sh\necho\n"), ("/x/d", b"\x00\xff")],
                              chain=[["cat", "/x/d"]]),
    "control_ping": frame(0xFE, b'{"action":"ping"}'),
    "control_write": frame(0xFE, b'{"action":"write_file","path":"/f","mode":420}\0contents'),
    "control_unknown": frame(0xFE, b'{"action":"teleport"}'),
    "control_ack": frame(0xFE, b'{"ok":true,"version":"0.1.0","boot_id":"abc"}\0data'),
    "control_nack": frame(0xFE, b'{"ok":false,"error":"no such file"}'),
    "stdin": frame(0x00, b"input\n"),
    "stdin_eof": frame(0x00, b""),
    "stdout": frame(0x01, b"hello\n"),
    "stderr": frame(0x02, b"oops\n"),
    "resize": frame(0x03, struct.pack(">HH", 120, 40)),
    "signal": frame(0x04, struct.pack(">I", 15)),
    "exit": frame(0x05, struct.pack(">I", 7)),
    "exit_rss": frame(0x05, struct.pack(">IQ", 0, 2048)),
    "error": frame(0x06, b"not-found: program not found: nope"),
    "started": frame(0x07, struct.pack(">I", 1234)),
    "unknown": frame(0x42, b"future"),
}

MALFORMED = {
    "huge_len": struct.pack(">BI", 0x01, 0xFFFFFFFF),
    "short_header": b"\x01\x00\x00",
    "short_payload": struct.pack(">BI", 0x01, 10) + b"abc",
    "bad_json": frame(0xFF, b"{not json"),
    "bad_utf8": frame(0x06, b"internal: \xff\xfe"),
    "short_exit": frame(0x05, b"\x00\x00"),
    "short_resize": frame(0x03, b"\x00"),
    "staged_mismatch": frame(0xFF, b'{"version":1,"argv":["x"],"stage_files":[{"path":"/a","len":9}]}\0ab'),
}


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def main():
    chunkings = [b"\x00\xff\xff\xff", b"\x00\x00\x00\x00", b"\x00\x03\x10\x40"]  # whole, 1 byte, mixed
    for name, data in {**VALID, **MALFORMED}.items():
        write("decode_stream", name, chunkings[0] + data)
    stream = b"".join(VALID[k] for k in ["request", "stdin", "stdin_eof", "started", "stdout", "stderr", "exit_rss"])
    for i, chunking in enumerate(chunkings):
        write("decode_stream", f"session_{i}", chunking + stream)
    write("decode_stream", "small_max", b"\x88" + chunkings[0] + VALID["stdout"] + VALID["request"])
    # roundtrip: arbitrary's input is unstructured bytes; varied seeds steer it to every variant.
    for i in range(11):
        write("roundtrip", f"variant_{i}", bytes([i]) + bytes(range(i, i + 64)))
    write("roundtrip", "text", b"\x00" + b"sh\x00-c\x00echo hi\x00" * 4)


if __name__ == "__main__":
    main()
