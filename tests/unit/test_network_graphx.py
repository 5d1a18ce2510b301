"""The dashboard's network and top-products panels with a version's GraphX figures (its export's
vertices.csv): products sized by PageRank, nodes coloured by community, the community menu
narrows the network, the top-products toggle ranks by PageRank; without an export, by degree."""

from __future__ import annotations

import pandas as pd
import pytest

from tests.unit.test_dashboard_state import graph_state
from visualizer.panels import network as network_mod
from visualizer.panels.network import ALL, NetworkPanel
from visualizer.panels.top_products import TopProductsPanel

pytestmark = pytest.mark.unit


def _export(tmp_path):
    """v1: P3 has the highest PageRank though it is recommended least; P1, P2 in community 1,
    P3 in community 2."""
    folder = tmp_path / "1"
    folder.mkdir()
    pd.DataFrame({
        "id": ["p:P1", "p:P2", "p:P3", "u:u1", "u:u2", "u:u3"],
        "degree": [3, 2, 1, 3, 2, 1],
        "pagerank": [1.0, 0.5, 2.0, 1.0, 0.7, 0.8],
        "community": [1, 1, 2, 1, 1, 2],
    }).to_csv(folder / "vertices.csv", index=False)
    (folder / "summary.json").write_text("{}")
    network_mod.graph_measures.cache_clear()
    return tmp_path


def test_products_sized_by_pagerank_and_coloured_by_community(tmp_path) -> None:
    panel = NetworkPanel(graph_state(), _export(tmp_path))
    panel.refresh(graph_state())
    data = panel.products.data
    size = dict(zip(data["product"], data["size"], strict=True))
    assert size["P3"] > size["P1"] > size["P2"]  # PageRank, not degree
    colour = dict(zip(data["product"], data["colour"], strict=True))
    assert colour["P1"] == colour["P2"] != colour["P3"]
    assert panel.community.options == [ALL, "1", "2"]
    assert "size: PageRank" in panel.figure.title.text

    panel.community.value = "2"  # the menu's on_change redraws with community 2 only
    panel.refresh(graph_state())
    assert panel.products.data["product"] == ["P3"]
    assert "of community 2" in panel.figure.title.text


def test_without_an_export_the_network_sizes_by_degree(tmp_path) -> None:
    network_mod.graph_measures.cache_clear()
    panel = NetworkPanel(graph_state(), tmp_path)  # no folder for v1
    panel.refresh(graph_state())
    size = dict(zip(panel.products.data["product"], panel.products.data["size"], strict=True))
    assert size["P1"] > size["P2"] > size["P3"]
    assert panel.community.options == [ALL]


def test_top_products_rank_by_recommendations_or_by_pagerank(tmp_path) -> None:
    state = graph_state()
    panel = TopProductsPanel(_export(tmp_path))
    panel.refresh(state)
    best_first = list(reversed(panel.source.data["product"]))
    assert best_first == ["P1", "P2", "P3"]
    panel.ranking.active = 1  # on_change redraws
    best_first = list(reversed(panel.source.data["product"]))
    assert best_first == ["P3", "P1", "P2"]
    assert list(reversed(panel.source.data["value"])) == [2.0, 1.0, 0.5]
    assert "PageRank" in panel.figure.title.text
