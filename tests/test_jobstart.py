"""adaptlab.jobstart: a job's imports with the cyclic GC off (in a fresh process: it changes process-wide state)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

CODE = """
import gc, json, sys
from adaptlab.jobstart import start_job
if sys.argv[1] == "off":
    gc.disable()
start_job(json.loads(sys.argv[2]) if len(sys.argv) > 2 else None)
print(gc.isenabled(), "torch" in sys.modules, "timm" in sys.modules, gc.get_freeze_count())
"""


def _run(*args: str, code: str = CODE) -> list[str]:
    """The words ``code`` prints, run in a fresh process with ``args``."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_start_job_imports_the_stack_and_restores_the_collector():
    enabled, torch_in, timm_in, frozen = _run("on")
    assert (enabled, torch_in, timm_in) == ("True", "True", "True")
    assert int(frozen) > 100_000  # the imported modules' objects, out of later collections
    assert _run("off")[0] == "False"  # a collector the caller turned off stays off


def _continual(kind: str) -> list:
    return ["continual_run", {"model": {"kind": kind}}]


def test_a_job_whose_runs_build_no_timm_model_does_not_import_timm():
    mlp = _run("on", json.dumps([_continual("mlp"), _continual("mlp")]))
    assert mlp[:3] == ["True", "True", "False"]  # torch, not timm (nor torchvision)
    assert int(mlp[3]) > 50_000
    for runs in ([_continual("mlp"), _continual("vit")], [["finetune", None]], [["icl_uni", {}]]):
        assert _run("on", json.dumps(runs))[2] == "True", runs  # a ViT, a core rule, a study without the hook


FAULTS = """
import resource, sys
from adaptlab.jobstart import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
def rounds():  # 64 blocks of 1 MiB, touched, then all freed: a training step's tensors, in miniature
    blocks = [bytearray(1 << 20) for _ in range(64)]
    del blocks
rounds()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    rounds()
print(kept, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5)
"""


def test_keep_freed_memory_reuses_freed_pages_instead_of_faulting_them_in_again():
    if not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
        pytest.skip("mallopt is glibc's")
    default, kept = _run("default", code=FAULTS), _run("keep", code=FAULTS)
    assert kept[0] == "True"
    assert int(default[1]) > 8_000  # glibc's defaults: the 64 MiB come back from the kernel every round
    assert int(kept[1]) < 500      # kept in the heap: the same pages again
