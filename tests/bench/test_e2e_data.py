"""The end-to-end benchmark's data stream (bench/harness/e2e_data.py): exact, seeded, the same for every call."""

import numpy as np

from e2e_data import DataMix, make_steps


def test_steps_are_exact_seeded_and_the_same_for_every_call():
    mix = DataMix(median=400, sigma=1.0, max_len=4096)
    steps = make_steps(4, 16384, 128256, mix, seed=0)
    again = make_steps(4, 16384, 128256, mix, seed=0)
    assert len(steps) == 4
    for step, other in zip(steps, again):
        assert sum(len(d) for d in step) == 16384
        assert [d.input_ids.tolist() for d in step] == [d.input_ids.tolist() for d in other]
        assert all(1 <= len(d) <= 4096 and d.trained.all() for d in step)
    lengths = [len(d) for step in steps for d in step[1:-1]]  # whole documents (ends may be split)
    assert 200 < np.median(lengths) < 800  # a realistic mix around the median of 400
    assert make_steps(1, 16384, 128256, mix, seed=1)[0][0].input_ids.tolist() != steps[0][0].input_ids.tolist()
