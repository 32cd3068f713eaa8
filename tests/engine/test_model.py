"""Model directories: what is refused before anything is loaded, and custom code (auto_map)."""

import json
import shutil

import pytest

from lorafuse.engine.model import ModelError, check_supported, custom_code_notes


def with_config(tmp_path, tiny_model_dir, **changes):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    raw = json.loads((folder / "config.json").read_text())
    raw.update(changes)
    (folder / "config.json").write_text(json.dumps(raw))
    return folder


def test_custom_code_of_another_class_is_refused(tmp_path, tiny_model_dir):
    folder = with_config(tmp_path, tiny_model_dir, architectures=["MyLlamaForCausalLM"],
                         auto_map={"AutoModelForCausalLM": "modeling_my.MyLlamaForCausalLM"})
    with pytest.raises(ModelError, match="custom code .*MyLlamaForCausalLM.*runs no code from a model directory"):
        check_supported(folder)


def test_custom_code_of_a_stock_class_is_ignored_and_said(tmp_path, tiny_model_dir):
    folder = with_config(tmp_path, tiny_model_dir, auto_map={"AutoConfig": "configuration_llama.LlamaConfig"})
    notes = custom_code_notes(check_supported(folder))
    assert len(notes) == 1 and "auto_map" in notes[0] and "ignored" in notes[0]
    assert custom_code_notes(check_supported(tiny_model_dir)) == []


@pytest.mark.parametrize(("path", "message"), [("", "no model directory given"),
                                               ("/no/such/dir", "model directory not found")])
def test_missing_model_directories(path, message):
    with pytest.raises(ModelError, match=message):
        check_supported(path)
