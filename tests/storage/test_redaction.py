"""jobs.storage.redaction: URLs are parsed, not pattern-matched. Userinfo of any spelling
never reaches output (issue 29 item 6); images whose URLs differ only in the query or the
fragment stay distinct images, while signing parameters never split one (item 3)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from input_tools import fit_concept, output_rows, scene_bytes, segment
from jobs.storage.listing import credential_free
from jobs.storage.redaction import image_name, redact, scrub, secrets_in

# Passwords users actually have: quotes, a raw "@", ":", "%", unicode, a raw "/", spaces encoded
PASSWORDS = ["Pa'ss77zz", "Pa@ssW0rdQ", "p:a:ss99", "100%sure", "pässwörd✓", 'q"uote"d', "a@b@c@d",
             "sl/ash99", "pl+us=eq&amp", "semi;colon,comma", "Pa%40ss%3Aenc", "back\\slash", "tab%09x", "#hash1",
             "?query1", "[bracket]"]
HOSTS = ["127.0.0.1:8080", "bucket", "host.example", "[::1]:9000"]


@pytest.mark.parametrize("password", PASSWORDS)
@pytest.mark.parametrize("scheme", ["http", "https", "s3", "memory"])
def test_userinfo_of_any_spelling_is_redacted(scheme, password):
    for host in HOSTS:
        if "/" in password and host.startswith("["):  # a raw "/" is only recognised before a hostname
            continue
        url = f"{scheme}://alice:{password}@{host}/photos/a@2x.jpg"
        for shown in (redact(url), image_name(url), scrub(f"cannot read '{url}': Forbidden")):
            assert password not in shown and "alice" not in shown, shown
            assert f"{host}/photos/a@2x.jpg" in shown, shown
        assert password in secrets_in([url]) or len(password) < 3


@pytest.mark.parametrize("url", ["https://host/photos/a@2x.png", "https://host:8080/a@b/c.png", "s3://bucket/x@y.jpg",
                                 "http://[::1]:8000/a@b.jpg", "/local/a@b.jpg", "photos/what?.jpg",
                                 "file:///data/what?.jpg"])
def test_an_at_sign_in_the_path_is_not_userinfo(url):
    assert redact(url) == url


def test_query_and_fragment_are_identity_signatures_are_not():
    names = [image_name(f"http://h/image?id={i}") for i in (1, 2, 3)]
    names += [image_name(u) for u in ("http://h/image?id=1&size=2", "http://h/image?size=2&id=1", "http://h/image",
                                      "http://h/image?id=1#crop", "http://h/image#a", "http://h/image#b",
                                      "http://h/image?id", "http://h/image?")]
    assert len(set(names)) == len(names) - 1  # only `?` (empty query) names the same image as no query
    assert all("id=" not in n and "crop" not in n for n in names)
    presigned = [f"s3://b/k.jpg?X-Amz-Signature={s}&X-Amz-Date=2024&X-Amz-Credential=K%2F{s}" for s in ("aa1", "bb2")]
    assert {image_name(u) for u in presigned} == {"s3://b/k.jpg"}  # a renewed signature is the same object
    versions = [f"s3://b/k.jpg?versionId={v}&X-Amz-Signature={v}sig" for v in ("v1", "v2")]
    assert len({image_name(u) for u in versions}) == 2 and all("v1" not in image_name(u) for u in versions)
    assert image_name("https://a.blob.core.windows.net/c/x.jpg?sv=2022&sp=r&sig=S1") == \
        image_name("https://a.blob.core.windows.net/c/x.jpg?sv=2022&sp=r&sig=S2")
    assert image_name("http://h/i?sig=1") != image_name("http://h/i?sig=2")  # `sig` alone is not Azure SAS


def test_two_urls_of_one_name_keep_the_first_reading_url():
    named, sources = credential_free({"http://h/x.jpg?X-Amz-Signature=1": "", "http://h/x.jpg?X-Amz-Signature=2": "",
                                      "http://u:p@h/y.jpg?id=1": "", "http://h/y.jpg?id=2": ""})
    assert list(named) == ["http://h/x.jpg", image_name("http://h/y.jpg?id=1"), image_name("http://h/y.jpg?id=2")]
    assert sources["http://h/x.jpg"].endswith("=1")


# ---------------------------------------------------------------------------- through a job


class _Images(BaseHTTPRequestHandler):
    """GET /image?id=N -> scene N; /photo.jpg -> scene 7 (any userinfo accepted)."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        parts = urlsplit(self.path)
        number = int(parse_qs(parts.query).get("id", ["7"])[0])
        if parts.path not in ("/image", "/photo.jpg") or number > 9:
            self.send_error(404)
            return
        body = scene_bytes(number)
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def http_host():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def concept(tmp_path_factory) -> Path:
    return fit_concept(tmp_path_factory.mktemp("concept"))


def _everything(folder: Path) -> str:
    return "".join(p.read_bytes().decode("latin-1") for p in sorted(folder.rglob("*")) if p.is_file())


def test_urls_differing_only_in_the_query_are_distinct_rows(http_host, concept, tmp_path):
    urls = [f"http://{http_host}/image?id={i}" for i in (1, 2, 3)] + [
        f"http://{http_host}/image?id=4&size=a", f"http://{http_host}/image?size=a&id=5",
        f"http://{http_host}/photo.jpg#one", f"http://{http_host}/photo.jpg#two"]
    manifest, output = tmp_path / "images.txt", tmp_path / "out"
    manifest.write_text("\n".join(urls) + "\n")
    result = segment(concept, str(manifest), output)
    assert result.rc == 0, result.err
    rows = output_rows(output)
    assert len(rows) == len(urls) and len({r["image_uri"] for r in rows}) == len(urls)
    assert not any(r["error"] for r in rows)
    assert len({r["content_sha256"] for r in rows}) == 6  # the two fragments read the same photo
    assert "id=" not in _everything(output)
    assert segment(concept, str(manifest), output).rc == 0  # a rerun: every image already committed
    assert len(output_rows(output)) == len(urls)


@pytest.mark.parametrize("password", ["Pa'ss77zz", "Pa@ssW0rdQ", "pä:ss%25w@rd", "x/y@z'w"])
def test_userinfo_never_reaches_rows_records_or_lines(http_host, concept, tmp_path, password):
    readable = f"http://bob:{password}@{http_host}/photo.jpg"
    missing = f"http://bob:{password}@{http_host}/gone.jpg"
    manifest, output = tmp_path / "images.txt", tmp_path / "out"
    manifest.write_text(f"{readable}\n{missing}\n")
    result = segment(concept, str(manifest), output, "--max-error-rate", "1")
    rows = output_rows(output)
    assert sorted(r["image_uri"] for r in rows) == [f"http://{http_host}/gone.jpg", f"http://{http_host}/photo.jpg"]
    if "/" not in password:  # an HTTP client reads such userinfo (a raw "/" in it is only ever redacted)
        assert result.rc == 0, result.err
        assert [bool(r["error"]) for r in sorted(rows, key=lambda r: r["image_uri"])] == [True, False]
    written = _everything(output)
    for secret in (password, password.split("@")[0], "bob:"):
        assert secret not in written and secret not in result.out + result.err
    record = json.loads((output / "_persam_job.json").read_text())
    assert "bob" not in json.dumps(record)


@pytest.mark.parametrize("url", ["file:///data/sub?token=SeCrEt-42", "https://h/x.jpg?sig=SeCrEt-42",
                                 "https://h/x.jpg#access_token=SeCrEt-42", "s3://b/k?X-Amz-Signature=SeCrEt-42",
                                 "memory://k:SeCrEt-42@lake/x.jpg", "s3://k:SeCrEt-42@lake/x.jpg", "https://k:SeCrEt-42@h:8/x"])
def test_what_a_user_gave_is_scrubbed_from_any_message(url):
    message = f"cannot open {url.replace('://', ':// ', 0)}: failed after reading SeCrEt-42 twice"
    assert "SeCrEt-42" not in scrub(message, secrets_in([url]))
