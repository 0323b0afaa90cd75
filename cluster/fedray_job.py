"""Entry script for ``ray submit``: runs the ``fedray`` command with the given arguments on the head.

    ray submit cluster/local.yaml cluster/fedray_job.py run configs/quickstart.yaml --storage ~/fedray-runs

``ray submit`` starts a script with the ``python`` of the head's login shell, which need not be the
environment where fedray is installed; this script re-executes the fedray CLI with that
environment's Python (``$FEDRAY_PYTHON``, else ``/opt/fedray/.venv/bin/python`` as in
``cluster/local.yaml``) from the synced source folder (``$FEDRAY_SRC``, else ``~/fedray-src``),
so relative config paths resolve as in the repository. Only the standard library is used here.
"""
import os
import sys

python = os.environ.get("FEDRAY_PYTHON", "/opt/fedray/.venv/bin/python")
src = os.path.expanduser(os.environ.get("FEDRAY_SRC", "~/fedray-src"))
if not os.path.isfile(python):
    sys.exit(f"error: no Python at {python} (set FEDRAY_PYTHON to the environment where fedray is installed)")
os.chdir(src)
os.execv(python, [python, "-m", "fedray.cli", *sys.argv[1:]])
