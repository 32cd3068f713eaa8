"""Data mixing (data.mix): shares per epoch, seeded fresh draws, small sources repeated, config errors naming
the entry, and a training run that reports the mix and counts the mixed files in its identity."""

from collections import Counter

import numpy as np
import pytest

from lorafuse.engine.config import ConfigError, load_config
from lorafuse.engine.data import Document
from lorafuse.engine.mixing import Mixture
from lorafuse.engine.train import plan_steps

from engine_utils import tiny_train_config, write_jsonl, write_ticket_files


def docs(n, tag, length=8):
    return [Document(np.full(length, tag, dtype=np.int64), np.ones(length, dtype=bool), line=i + 1) for i in range(n)]


def test_each_source_makes_its_share_of_every_epoch():
    train = docs(700, 1)
    mix = Mixture.of(len(train), [("general.jsonl", 0.2, docs(5000, 2)), ("code.jsonl", 0.1, docs(5000, 3))], seed=0)
    epoch = mix.epoch(train, 0)
    counts = Counter(int(d.input_ids[0]) for d in epoch)
    assert len(epoch) == 1000 and counts == {1: 700, 2: 200, 3: 100}
    assert "general.jsonl: 200 of its 5000 examples per epoch, 20.0% of each epoch's 1000" in mix.describe(700)[0]


def test_draws_are_seeded_fresh_per_epoch_and_repeat_only_a_small_source():
    general = docs(5000, 2)
    mix = Mixture.of(900, [("g", 0.1, general)], seed=3)
    lines = lambda draw: [d.line for d in draw]  # noqa: E731
    first, second = lines(mix.draw(0)), lines(mix.draw(1))
    assert len(first) == 100 == len(set(first))  # no repeats while the source has enough
    assert first != second and first == lines(Mixture.of(900, [("g", 0.1, general)], seed=3).draw(0))
    assert first != lines(Mixture.of(900, [("g", 0.1, general)], seed=4).draw(0))
    small = Mixture.of(900, [("s", 0.1, docs(30, 2))], seed=0)
    assert Counter(Counter(lines(small.draw(0))).values()) == {4: 10, 3: 20}  # 100 = 3 x 30 + 10
    assert "it has only 30, so they repeat" in small.describe(900)[0]


def test_plan_steps_packs_each_epoch_with_its_draw():
    from lorafuse.engine.config import TrainConfig

    cfg = TrainConfig(epochs=2, max_tokens_per_step=64, max_seq_len=8)
    mix = Mixture.of(90, [("g", 0.1, docs(500, 2))], seed=0)
    steps = plan_steps(docs(90, 1), cfg, mixture=mix)
    for epoch in (0, 1):
        tags = Counter(int(t) for e, micro in steps if e == epoch for b in micro for t in b.input_ids[::8])
        assert tags == {1: 90, 2: 10}


@pytest.mark.parametrize("mix, message", [
    ([{"path": "g.jsonl", "fraction": 0.1}, {"path": "c.jsonl", "frac": 0.1}], "unknown config key 'data.mix[1].frac'"),
    ([{"path": "g.jsonl", "fraction": 1.5}], "'data.mix[0].fraction' must be in (0, 1), got 1.5"),
    ([{"fraction": 0.1}], "'data.mix[0].path' is required"),
    ([{"path": "g.jsonl", "fraction": "lots"}], "config key 'data.mix[0].fraction' must be float"),
    (["g.jsonl"], "'data.mix[0]' must be a mapping, got str"),
    ({"path": "g.jsonl"}, "config key 'data.mix' must be a list of mappings (keys path, fraction)"),
    ([{"path": "a", "fraction": 0.6}, {"path": "b", "fraction": 0.4}], "the fractions add up to 1"),
])
def test_config_errors_name_the_entry(mix, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, base={"model": "m", "data": {"train": "t.jsonl", "mix": mix}})
    assert message in str(err.value)


def test_a_run_with_mixed_in_data(tiny_model_dir, tmp_path, reference_kernels):
    from lorafuse.engine.train import train
    from lorafuse.engine.train_checkpoints import read_run_file

    files = write_ticket_files(tmp_path, sizes=(("train", 60),))
    general = write_jsonl(tmp_path / "general.jsonl", [{"prompt": f"Say {w}.", "completion": w}
                                                        for w in ("yes", "no", "maybe", "later") * 10])
    cfg = tiny_train_config(tiny_model_dir, files, tmp_path / "out", max_steps=2)
    cfg.data.mix = load_config(None, base={"data": {"mix": [{"path": str(general), "fraction": 0.25}]}}).data.mix
    logs = []
    train(cfg, log=logs.append)
    assert any(f"[data] mix: {general}: 20 of its 40 examples per epoch, 25.0% of each epoch's 80" in line
               for line in logs), logs
    identity = read_run_file(tmp_path / "out")["identity"]
    assert identity["data"]["mix"] == [0.25] and set(identity["data_files"]) == {"train", "mix[0]"}
