"""`dvc plots show` / `dvc plots diff` pages render without a network: Vega is inlined in the project's
HTML template instead of DVC's CDN links (documentation/pipeline.md#dvc-experiments)."""

from __future__ import annotations

import configparser
import re

from conftest import ROOT


def test_the_plots_page_template_is_configured_and_loads_nothing_from_the_network():
    config = configparser.ConfigParser()
    config.read(ROOT / ".dvc" / "config")
    name = config["plots"]["html_template"]
    page = (ROOT / ".dvc" / name).read_text()
    assert "{plot_divs}" in page and "{scripts}" not in page   # {scripts} would add DVC's CDN links
    assert not re.search(r"<script[^>]+src=", page), "every script must be inline"
    assert not re.search(r"https?://cdn", page)
    for library in ("vega 5.", "vega-lite 5.", "vega-embed 6."):
        assert f"<!-- {library}" in page
    assert "vegaEmbed" in page and (ROOT / ".dvc" / "plots_offline.LICENSES.txt").is_file()
