"""What a client actor checks on its own node before it builds the model."""

from __future__ import annotations

import pytest

from fedbip_ray.config import ConfigError
from fedbip_ray.runtime.client import check_model_on_node


def test_a_model_directory_missing_on_the_node_is_one_line_naming_the_path(tmp_path):
    missing = str(tmp_path / "not-here" / "model")
    with pytest.raises(ConfigError, match=f"model.name '{missing}': directory not found on this "
                                          "worker node"):
        check_model_on_node(missing)
    check_model_on_node(str(tmp_path))  # present: fine
    for name in ("minilm", "tiny-bert", "org/model-name"):  # aliases and hub ids: not paths
        check_model_on_node(name)
