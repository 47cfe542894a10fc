"""The build the tests run on is the one ``make`` said it made.

``make test`` runs the suite twice: on the compiled data path (what ``make install`` and
the images ship) and interpreted (``MESHPROXY_INTERPRETED=1``, what a machine without a C
compiler runs). ``MESHPROXY_EXPECT_BUILD`` names which; a compile that silently produced
nothing, or an import that fell back to the sources, fails here instead of passing
unnoticed on the wrong build.
"""

from __future__ import annotations

import os

import pytest

from meshproxy import compiled


def test_the_data_path_runs_as_built() -> None:
    expected = os.environ.get("MESHPROXY_EXPECT_BUILD")
    if not expected:
        pytest.skip("MESHPROXY_EXPECT_BUILD not set (make test sets it)")
    assert compiled.status() == expected
