"""liverseg.heap.keep_freed: an ingest worker's freed memory serves its next case."""

import platform
import subprocess
import sys

import pytest

# In a fresh process: fill a 64 MiB buffer (as nibabel's reading of a gzipped volume
# does), free it, fill another; how many pages the second one faulted in.
REFAULTS = """
import resource, sys
from liverseg import heap
if sys.argv[1] == "keep":
    heap.keep_freed()
bytearray(b"1") * (64 << 20)  # made, filled, freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
bytearray(b"1") * (64 << 20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_memory_a_worker_frees_is_reused_without_faulting_it_in_again():
    def refaults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", REFAULTS, mode], capture_output=True,
                             text=True, check=True).stdout
        return int(out)

    pages = (64 << 20) // 4096
    assert refaults("default") > pages / 2  # glibc unmapped it: every page faults again
    assert refaults("keep") < pages / 20


def test_the_data_stages_load_no_torch_and_old_models_imports_still_resolve():
    """ingest, validate and split import no torch (preprocess's network half is
    liverseg.served); the pyfunc code of a model registered before that move imports `Served`
    from preprocess, which still hands it over."""
    code = ("import sys; import liverseg.stages.ingest, liverseg.stages.validate, "
            "liverseg.stages.split, liverseg.data.sources.nifti, liverseg.data.sources.dicom; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
    from liverseg import served
    from liverseg.preprocess import Served, resize_image  # as e667887's mlflow_pyfunc.py does

    assert (Served, resize_image) == (served.Served, served.resize_image)
