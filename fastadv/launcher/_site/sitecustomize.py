"""fastadv-run's ``sitecustomize``: Python imports it at start-up from ``PYTHONPATH``, where the launcher puts this
folder, in the launched command and in every process it starts (torchrun's and accelerate's workers inherit
the environment). With ``FASTADV_METHOD`` set it installs :mod:`fastadv_launch_hook`; then it runs the
``sitecustomize`` it shadows, if the environment has one, as ddtrace-run and opentelemetry-instrument do.
"""

from __future__ import annotations

import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))

if os.environ.get("FASTADV_METHOD"):
    import fastadv_launch_hook

    fastadv_launch_hook.install()


def _run_the_shadowed_sitecustomize() -> None:
    for entry in sys.path:
        if not entry or os.path.abspath(entry) == _HERE:
            continue
        candidate = os.path.join(entry, "sitecustomize.py")
        if os.path.isfile(candidate):
            spec = importlib.util.spec_from_file_location("_sitecustomize_shadowed_by_fastadv", candidate)
            if spec is not None and spec.loader is not None:
                spec.loader.exec_module(importlib.util.module_from_spec(spec))
            return


_run_the_shadowed_sitecustomize()
