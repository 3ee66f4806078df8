"""nbval settings for the notebooks.

Each notebook's committed outputs come from its default offline run, in order (1 → 4), with
fresh result and checkpoint folders: notebook 1 saves the pruned models that notebook 3 tests,
and notebooks 1 and 2 write the results that notebook 4 draws. Re-running them under nbval
therefore needs the same fresh folders, made here once per session; the real ``results/`` and
``pruned_models/`` are never touched by a test run. Run the folder as a whole:

    pytest --nbval notebooks --nbval-sanitize-with notebooks/nbval_sanitize.cfg --nbval-current-env
"""

from __future__ import annotations

import os
import tempfile

import pytest

from sparsegpt_utils.paths import data_dir, notebook_env

# set before the first kernel starts: kernels inherit this environment. NBVAL_WORKDIR reuses
# the folders of an earlier run (e.g. to re-check notebooks 3 and 4 alone after notebook 1).
os.environ.update(notebook_env(os.environ.get("NBVAL_WORKDIR") or tempfile.mkdtemp(prefix="nbval-work-")))


def _offline_data() -> bool:
    d = data_dir()
    return d is not None and (d / "wikitext-2-raw" / "wiki.test.raw").is_file()


def pytest_collection_modifyitems(config, items):
    have_data = _offline_data()
    for item in items:
        if type(item).__name__ == "IPyNbCell":  # notebook cells load the real model: slow
            item.add_marker(pytest.mark.slow)
            if not have_data and "notebooks" in str(item.fspath):
                # the committed outputs were computed on WikiText-2; without it they cannot match
                item.add_marker(pytest.mark.skip(
                    reason="WikiText-2 offline data not found (set SPARSEGPT_DATA_DIR)"))
