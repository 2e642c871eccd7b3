"""``import kronlab`` gives every subpackage on first attribute access."""

from __future__ import annotations

import subprocess
import sys

import pytest

import kronlab


def test_subpackages_are_attributes_of_the_package() -> None:
    code = (
        "import kronlab, sys\n"
        "assert 'kronlab.optim' not in sys.modules\n"
        "assert kronlab.optim.SOAP is sys.modules['kronlab.optim'].SOAP\n"
        "assert kronlab.attribution.fit_curvature\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'optimm'"):
        kronlab.optimm  # noqa: B018
    assert {"optim", "attribution", "compat"} <= set(dir(kronlab))
