"""vLLM's logprob containers -> datagen's per-position (sampled logprob, top-k ids, top-k
logprobs). Built with vLLM's own append path, the same one its output processor uses."""

from __future__ import annotations

import pytest
from vllm import logprobs

from datagen.teachers.vllm_engine import _positions

# Three positions at k=3: (sampled token, its rank, its logprob) then the top-3 in rank order.
STEPS = [
    ((7, 1, -0.1), [(7, -0.1), (3, -2.5), (9, -3.0)]),  # sampled the most likely
    ((4, 6, -5.0), [(2, -0.4), (8, -1.9), (5, -2.2)]),  # sampled outside the top-3
    ((8, 2, -1.2), [(6, -0.6), (8, -1.2), (1, -3.3)]),  # sampled the second
]


def _fill(container):
    for (tok, rank, lp), top in STEPS:
        logprobs.append_logprobs_for_next_position(
            container, [tok] + [t for t, _ in top], [lp] + [v for _, v in top], [None] * 4, rank, 3)
    return container


@pytest.mark.parametrize("flat", [True, False], ids=["FlatLogprobs", "dicts"])
def test_positions_read_both_of_vllms_containers(flat):
    container = _fill(logprobs.create_sample_logprobs(flat))
    assert isinstance(container, logprobs.FlatLogprobs) is flat
    lps, top_ids, top_lps = _positions([s[0][0] for s in STEPS], container, 3)
    assert lps == [-0.1, -5.0, -1.2]
    assert top_ids == [[7, 3, 9], [2, 8, 5], [6, 8, 1]]
    assert top_lps == [[-0.1, -2.5, -3.0], [-0.4, -1.9, -2.2], [-0.6, -1.2, -3.3]]


def test_positions_of_a_slice_start_where_the_slice_does():
    """Re-scoring reads prompt logprobs from the response's first token on (a slice)."""
    container = _fill(logprobs.create_prompt_logprobs(True))  # position 0 (first token): none
    assert len(container) == 4 and container[0] == {}
    lps, top_ids, _ = _positions([4, 8], container[2:], 3)
    assert lps == [-5.0, -1.2] and top_ids == [[2, 8, 5], [6, 8, 1]]
