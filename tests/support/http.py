"""Raw HTTP requests to the API server, without the SDK in between: for the refusals the SDK would
not send (no key, broken multipart bodies, path characters in ids), and OpenAI's error shape."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    status: int
    body: dict
    headers: dict[str, str]  # names in lower case


def call(url: str, method: str = "GET", *, key: str | None = None, body: bytes | None = None,
         content_type: str | None = None, headers: dict[str, str] | None = None) -> Reply:
    """One raw HTTP request (no SDK in between): the status, the JSON body and the headers."""
    request = urllib.request.Request(url, data=body, method=method)
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    if content_type is not None:
        request.add_header("Content-Type", content_type)
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return Reply(response.status, json.loads(response.read() or b"{}"), _lower(response.headers))
    except urllib.error.HTTPError as e:
        return Reply(e.code, json.loads(e.read() or b"{}"), _lower(e.headers))


def assert_error(reply: Reply, status: int, code: str | None = None) -> None:
    assert reply.status == status, reply
    assert set(reply.body) == {"error"} and set(reply.body["error"]) == {"message", "type", "param", "code"}, reply
    assert reply.body["error"]["message"] and "Traceback" not in reply.body["error"]["message"]
    if code is not None:
        assert reply.body["error"]["code"] == code, reply


def multipart(fields: dict[str, str], filename: str, content: bytes, boundary: str = "XyZ") -> tuple[bytes, str]:
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
             for name, value in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
                 "Content-Type: application/jsonl\r\n\r\n".encode() + content + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _lower(headers) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}
