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


def test_library_deprecation_notices_are_silenced_in_actors():
    import warnings

    from fedbip_ray.runtime.client import quiet_library_warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_library_warnings()
        for module in ("transformers.modeling_utils", "peft.tuners.lora"):
            warnings.warn_explicit("`x` is deprecated", FutureWarning, "f.py", 1, module=module)
        warnings.warn_explicit("a user's own warning", FutureWarning, "f.py", 1, module="mine")
    assert [str(w.message) for w in seen] == ["a user's own warning"]
