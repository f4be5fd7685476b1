import os
import sys
import zlib

import pytest
import torch

# Run in place from a source checkout as well as installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    # Each test draws its own random inputs, reproducibly (ELECTRA_FAST_TEST_SEED varies them between runs).
    base = int(os.environ.get("ELECTRA_FAST_TEST_SEED", "0"))
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()) + base)
