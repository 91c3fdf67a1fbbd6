from conftest import KEYS, read_key_yaml
from tools.model_conversion.keymap import mindspore_to_official_name, official_to_mindspore_names


def test_official_to_mindspore_rename_matches_mindone_list_line_for_line():
    official = read_key_yaml(KEYS / "torch_key_base.yaml")
    mindspore = read_key_yaml(KEYS / "mindspore_key_base.yaml")
    assert len(official) == len(mindspore) == 2514
    renamed = official_to_mindspore_names(official)
    assert list(renamed.values()) == list(mindspore.keys())
    assert [mindspore_to_official_name(n) for n in mindspore] == list(official.keys())
