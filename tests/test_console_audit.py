"""The console's audit view in a real headless Chromium against a real `facegate serve`:
an enrolment and a verification made over HTTP show up with the key's name, and without
the admin key the view says so in plain words. (Browser and page helpers: test_console.)"""

from __future__ import annotations

import httpx
import pytest
from server_support import default_bundle, free_port, people, start_server
from test_console import CHROMEDRIVER, CHROMIUM, WAIT_S, Page, browser, shots  # noqa: F401

API_KEY, ADMIN_KEY = "audit-client-key", "audit-admin-key"

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="needs Debian's chromium and chromedriver (scripts/system-deps/10-chromium.sh)",
)


@pytest.fixture(scope="module")
def audited(tmp_path_factory, celeba_index):
    gallery = tmp_path_factory.mktemp("audit-gallery") / "gallery.sqlite"
    port = free_port()
    proc = start_server(default_bundle(), gallery, port,
                        env={"FACEGATE_API_KEY": API_KEY, "FACEGATE_ADMIN_KEY": ADMIN_KEY})
    base = f"http://127.0.0.1:{port}"
    who, paths = next(iter(people(celeba_index).items()))
    headers = {"X-API-Key": API_KEY, "X-Admin-Key": ADMIN_KEY}
    try:
        files = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in paths[:2]]
        assert httpx.post(f"{base}/v1/identities", data={"identity_id": who, "name": "Audited"},
                          files=files, headers=headers, timeout=WAIT_S).status_code == 201
        assert httpx.post(f"{base}/v1/verify/identity", data={"identity_id": who},
                          files={"image": (paths[2].name, paths[2].read_bytes(), "image/jpeg")},
                          headers={"X-API-Key": API_KEY}, timeout=WAIT_S).status_code == 200
        yield base, who
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_audit_view_lists_who_did_what(browser, shots, audited):  # noqa: F811
    base, who = audited
    page = Page(browser, base, shots)
    page.open("audit", keys=(API_KEY, ADMIN_KEY))
    page.find("#audit-identity").send_keys(who)
    page.click("#audit-submit")
    page.wait.until(lambda d: who in page.text("#audit-table caption"))
    rows = [r.text for r in page.all("#audit-table tbody tr")]
    assert any("enrol" in r and "admin-key" in r and "ok" in r for r in rows), rows
    assert any("verify_identity" in r and "api-key" in r and "match" in r for r in rows), rows
    assert API_KEY not in page.text("#audit-result") and ADMIN_KEY not in page.text("#audit-result")
    page.screenshot("audit")

    page.open("audit", keys=(API_KEY, ""))
    page.wait.until(lambda d: page.find("#audit-error").is_displayed())
    assert "This needs the admin key" in page.text("#audit-error")
