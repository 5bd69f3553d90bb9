"""liverseg.heap.keep_freed: an ingest worker's freed memory serves its next case."""

import subprocess
import sys

import pytest

from liverseg import heap

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


@pytest.mark.skipif(heap._glibc("mallopt") is None, reason="glibc's malloc only")
def test_memory_a_worker_frees_is_reused_without_faulting_it_in_again():
    def refaults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", REFAULTS, mode], capture_output=True,
                             text=True, check=True).stdout
        return int(out)

    pages = (64 << 20) // 4096
    assert refaults("default") > pages / 2  # glibc unmapped it: every page faults again
    assert refaults("keep") < pages / 20
