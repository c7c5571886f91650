"""Parity with transformers on the real SmolLM2-135M-Instruct weights (fp32, CPU)."""
import pytest
import torch

from koala import SpeculativeGenerator
from tests.helpers import hf_greedy

PROMPTS = [
    "What is the capital of France? Answer in two sentences.",
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "List three prime numbers and explain what a prime is."}],
]


def test_logits_match_transformers(smollm2, smollm2_hf):
    tok = smollm2.tokenizer
    ids = torch.tensor([tok("The quick brown fox jumps over the lazy dog. " * 4)["input_ids"]])
    with torch.no_grad():
        ref = smollm2_hf(ids).logits
        got, _ = smollm2.model(ids)
    assert (got - ref).abs().max().item() < 1e-3, (got - ref).abs().max().item()
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("prompt", PROMPTS, ids=["string", "messages", "system"])
def test_greedy_ids_equal_transformers_generate(smollm2, smollm2_hf, prompt):
    gen = SpeculativeGenerator(smollm2, max_seq_len=512)
    ours = gen.generate(prompt, max_new_tokens=64, ignore_eos=True)
    ids = gen.encode(prompt)
    with torch.no_grad():
        ref_new = hf_greedy(smollm2_hf, ids, 64)
    assert len(ours.token_ids) == 64
    assert ours.token_ids == ref_new
