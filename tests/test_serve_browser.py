"""EndoFinder online (issue #20): a real headless browser (Debian's Chromium) loads the service's
page, which uploads an image (``?demo=<case id>``: the page fetches that case's picture and sends it
through the same query code as a chosen file) and shows the neighbour cards and the vote."""
import os
import re
import shutil
import subprocess

import pytest

from serve_fixtures import Server, make_gallery, make_model, server_flags

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium(*flags, timeout=60):
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
           "--disable-dev-shm-usage", "--virtual-time-budget=15000", *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs Debian's chromium)")
def test_page_uploads_an_image_and_shows_the_neighbours(tmp_path):
    gallery = make_gallery(str(tmp_path / "gallery"))
    model = make_model(tmp_path / "desc.pt")
    server = Server(server_flags(model, gallery, tmp_path / "svc", "--k", "4"))
    profile = str(tmp_path / "profile")
    try:
        page = f"{server.url}/?demo=1"
        dom = chromium(f"--user-data-dir={profile}", "--dump-dom", page).stdout
        shot = os.environ.get("GISSL_SCREENSHOT") or str(tmp_path / "page.png")
        chromium(f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1100,620", page)
    finally:
        server.stop()
    cards = re.findall(r'<li class="case" data-id="(\d+)"', dom)
    assert len(cards) == 4, dom[-2000:]
    assert cards[0] == "1"  # the case itself comes first
    assert re.search(r'<p id="sentence">\d of 4 nearest cases were (adenoma|hyperplastic)</p>', dom)
    assert 'class="bar" role="img"' in dom and "do not replace" in dom
    assert 'src="blob:' in dom  # thumbnails fetched from the service, not from anywhere else
    assert os.path.getsize(shot) > 5000
