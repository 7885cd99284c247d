"""scripts/install.sh, which scripts/test.sh and scripts/demo.sh both run first: neither installs or builds again
what the other already did, in either order.

pip is replaced by a logger (the facts below the decision: what install.sh would run), the stamp lives in a
temporary file, and the build plan comes from setup.py itself, steered by the facts it reads: a toolkit
(CUDA_HOME with an nvcc), no visible GPU (CUDA_VISIBLE_DEVICES=""), and scripts/test.sh's
DIT_FAST_CUDA_ARCHS=90a. One test, about 20 runs of install.sh (~1 s each: its Python start-ups).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.utils import REPO_ROOT


def _installed_from_checkout() -> bool:
    import dit_fast
    return Path(dit_fast.__file__).resolve().is_relative_to(REPO_ROOT.resolve())


@pytest.mark.skipif(not _installed_from_checkout(), reason="install.sh skips only for a package installed from "
                                                            "this checkout (as scripts/test.sh leaves it)")
def test_test_and_demo_install_nothing_twice(tmp_path):
    toolkit = tmp_path / "cuda" / "bin"
    toolkit.mkdir(parents=True)
    (toolkit / "nvcc").write_text("#!/bin/sh\nexit 0\n")
    (toolkit / "nvcc").chmod(0o755)
    fake_python = tmp_path / "python"
    fake_python.write_text(f'#!/bin/sh\nif [ "$1" = -m ] && [ "$2" = pip ]; then echo "$*" >> "$PIP_LOG"; exit 0; fi\n'
                           f'exec {sys.executable} "$@"\n')
    fake_python.chmod(0o755)

    def run(stamp, script, extra_env=None):
        """install.sh as scripts/test.sh or scripts/demo.sh runs it: (its last line, the pip commands it ran)."""
        log = tmp_path / "pip.log"
        log.write_text("")
        env = {k: v for k, v in os.environ.items() if k not in ("DIT_FAST_CUDA_ARCHS", "DIT_FAST_BUILD_CUDA")}
        env.update(PYTHON=str(fake_python), PIP_LOG=str(log), DIT_FAST_INSTALL_STAMP=str(stamp),
                   CUDA_HOME=str(tmp_path / "cuda"), CUDA_VISIBLE_DEVICES="")
        args = ["test"] if script == "test" else []
        if script == "test":
            env["DIT_FAST_CUDA_ARCHS"] = "90a"  # what scripts/test.sh sets where nvcc is and no GPU
        env.update(extra_env or {})
        res = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "install.sh"), *args], env=env, capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr
        return res.stdout.strip().splitlines()[-1], log.read_text().strip().splitlines()

    skipped = "unchanged since: skipped"
    # test.sh then demo.sh: the extension built for sm_90a serves the demo, which skips
    stamp = tmp_path / "a.stamp"
    line, pip = run(stamp, "test")
    assert len(pip) == 1 and "-e .[test]" in pip[0] and " -v " in pip[0], pip  # the build, shown
    for script in ("demo", "test", "demo"):
        line, pip = run(stamp, script)
        assert skipped in line and pip == [], (script, line, pip)
    # demo.sh then test.sh: the demo built nothing the tests need; the tests build once, then both skip
    stamp = tmp_path / "b.stamp"
    line, pip = run(stamp, "demo")
    assert len(pip) == 1 and pip[0].endswith("-e .") and " -v " not in pip[0], pip
    line, pip = run(stamp, "test")
    assert len(pip) == 1 and "-e .[test]" in pip[0], pip
    for script in ("demo", "test"):
        line, pip = run(stamp, script)
        assert skipped in line and pip == [], (script, line, pip)
    # the same build either way (no CUDA extension): the test extras' packages alone, never the package again
    stamp = tmp_path / "c.stamp"
    no_cuda = {"DIT_FAST_BUILD_CUDA": "0"}
    run(stamp, "demo", no_cuda)
    line, pip = run(stamp, "test", no_cuda)
    assert len(pip) == 1 and "-e" not in pip[0].split() and "pytest" in pip[0] and "diffusers" in pip[0], pip
    for script in ("demo", "test"):
        line, pip = run(stamp, script, no_cuda)
        assert skipped in line and pip == [], (script, line, pip)
    # a change to what the build reads (another checkout's key) installs again
    stamp.write_text("0" * 64 + "\n" + "".join(stamp.read_text().splitlines(True)[1:]))
    line, pip = run(stamp, "demo", no_cuda)
    assert len(pip) == 1 and "-e ." in pip[0], pip
