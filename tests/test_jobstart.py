"""adaptlab.jobstart: a job's imports with the cyclic GC off (in a fresh process: it changes process-wide state)."""
import subprocess
import sys
import textwrap

CODE = """
import gc, sys
from adaptlab.jobstart import start_job
if sys.argv[1] == "off":
    gc.disable()
start_job()
print(gc.isenabled(), "torch" in sys.modules, "timm" in sys.modules, gc.get_freeze_count())
"""


def _run(*args: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(CODE), *args], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_start_job_imports_the_stack_and_restores_the_collector():
    enabled, torch_in, timm_in, frozen = _run("on")
    assert (enabled, torch_in, timm_in) == ("True", "True", "True")
    assert int(frozen) > 100_000  # the imported modules' objects, out of later collections
    assert _run("off")[0] == "False"  # a collector the caller turned off stays off
