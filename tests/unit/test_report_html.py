"""report.html in a real headless browser (Debian's chromium): the table rows are there and every
embedded plot decodes; the file refers to nothing outside itself. Skipped without chromium
(.ci/run installs it)."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess

import pytest

from fedray import report as R
from test_report import make_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# Run by the browser after load: writes each image's decoded size into the DOM for --dump-dom.
PROBE = """<script>
window.addEventListener('load', () => {
  const out = document.createElement('pre'); out.id = 'probe';
  out.textContent = Array.from(document.images).map(i => i.complete + ':' + i.naturalWidth + 'x' + i.naturalHeight).join(' ');
  document.body.appendChild(out);
});
</script>"""


def dump_dom(page, profile) -> str:
    """The DOM of ``page`` after load, from headless chromium started and stopped here (by its pid)."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
           f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom", page.as_uri()]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the browser and its helper processes
            proc.wait()
    assert proc.returncode == 0, out[-2000:]
    return out


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium; .ci/run does)")
def test_html_report_opens_offline_with_table_and_decoded_plots(tmp_path):
    for seed, acc in ((0, 0.8), (1, 0.7)):
        make_run(tmp_path, "fedavg", seed, {"final_accuracy": acc})
    make_run(tmp_path, "clamp", 0, {"final_accuracy": 0.6})
    res = R.write_report(tmp_path / "exp", tmp_path / "rep")
    text = res["html"].read_text()
    assert res["html"] == tmp_path / "rep" / "report.html"
    # self-contained: no link, script or image from anywhere else
    assert not re.search(r'(src|href)="(?!data:)', text) and "http" not in text
    probe = tmp_path / "probe.html"
    probe.write_text(text.replace("</body>", PROBE + "</body>"))
    dom = dump_dom(probe, tmp_path / "profile")
    table = dom[dom.index('<table id="results">'):dom.index("</table>")]
    assert table.count("<tr>") == 3  # header + fedavg + clamp
    assert "<td>fedavg</td><td>2</td><td>0.7500 ± 0.0707</td>" in table and "<td>clamp</td><td>1</td>" in table
    assert dom.count("<img ") == len(res["plots"]) == 3
    sizes = re.search(r'<pre id="probe">([^<]*)</pre>', dom).group(1).split()
    assert sizes == ["true:704x462"] * 3  # 6.4 x 4.2 in at 110 dpi: every PNG decoded
