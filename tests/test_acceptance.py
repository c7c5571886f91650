"""bench.acceptance: decoding accepts, iteration by iteration, exactly what the training-time
computation (teacher-forced rollout) predicts, for the shipped heads on the real SmolLM2 in fp32;
and the replay notices a one-position offset, so the agreement is not automatic."""
import pytest
import torch

from bench.acceptance import answer_replay, replay, run
from bench.common import mt_bench


@pytest.mark.parametrize("draft,depth", [("default", 3), ("default-medusa", 2)])
def test_decoding_accepts_what_teacher_forcing_predicts(smollm2, draft, depth):
    from koala import SpeculativeGenerator
    from koala.speculative import resolve_draft
    gen = SpeculativeGenerator(smollm2, resolve_draft(draft, smollm2), max_seq_len=512, mode="chain", depth=depth)
    q = [x for x in mt_bench() if x["category"] == "coding"][:1]
    rows, summary = run(gen, q, max_new=40, depth=depth, turns=2, progress=False)
    assert [r["turn"] for r in rows] == [1, 2] and set(summary["by_turn"]) == {"1", "2"}
    assert summary["iterations"] >= 10
    assert summary["iterations_equal"] == summary["iterations"]
    assert summary["decoded_accepted_per_iteration"] > 0       # the heads do accept drafts here

    # the same replay against drafts shifted by one position disagrees somewhere
    r, seq, tf, P = answer_replay(gen, [{"role": "user", "content": q[0]["turns"][0]}], 40, depth)
    pred, dec = replay(tf, seq, P, r.stats.accepted_per_step, depth)
    assert pred == dec
    pred_off, dec_off = replay(torch.roll(tf, 1, dims=1), seq, P, r.stats.accepted_per_step, depth)
    assert pred_off != dec_off
