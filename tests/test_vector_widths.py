"""The sampler and numerics tests pass whatever vector width PyTorch's CPU kernels use.

The main run uses this CPU's widest kernels (AVX-512 where it has them); here the same tests run again with the
AVX2 kernels and with the plain (non-vectorised) ones, which round some reductions differently. A test that only
holds on one width asserts on rounding, not on behaviour.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NUMERICS_TESTS = ["tests/test_sampler.py", "tests/test_infinity.py", "tests/test_bsq_vae.py", "tests/test_tiny_model.py"]


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_the_numerics_tests_pass_with_other_vector_widths(capability: str):
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *NUMERICS_TESTS],
        cwd=REPO, env={**os.environ, "ATEN_CPU_CAPABILITY": capability}, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
