"""Chunked response log-probs equal the naive full-logits computation, values and gradients, on
the fast path (hidden states + LM head) and on the fallback (the model's own logits).
Per-architecture conformance: tests/test_logprob_architectures.py."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from iris_ref import logprobs
from iris_ref.logprobs import sequence_logprobs

pytestmark = pytest.mark.usefixtures("one_thread")


def naive_sequence_logprobs(model, input_ids, attention_mask, response_mask):
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (logps * response_mask[:, 1:].to(logps.dtype)).sum(-1)


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move away from the near-uniform random init so that the test has teeth
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model


def padded_batch(vocab_size):
    """Right padding with ragged lengths, a response mask touching position 0 (ignored), a row
    without response tokens, and a left-padded row."""
    generator = torch.Generator().manual_seed(1)
    batch, width = 5, 23
    input_ids = torch.randint(3, vocab_size, (batch, width), generator=generator)
    attention_mask = torch.zeros(batch, width, dtype=torch.long)
    response_mask = torch.zeros(batch, width, dtype=torch.long)
    for row, (prompt, length) in enumerate([(5, 23), (3, 17), (1, 9), (4, 4), (0, 20)]):
        attention_mask[row, :length] = 1
        response_mask[row, prompt:length] = 1
    attention_mask[4] = 0
    attention_mask[4, 6:] = 1  # left-padded row
    response_mask[4] = 0
    response_mask[4, 0] = 1
    response_mask[4, 12:] = 1
    input_ids[attention_mask == 0] = 0
    return input_ids, attention_mask, response_mask


def gradients(model, value):
    model.zero_grad(set_to_none=True)
    value.backward()
    return [p.grad.detach().clone() for p in model.parameters()]


# 51 response positions: chunk sizes that divide nothing, a single chunk, one position a chunk.
@pytest.mark.parametrize(
    "dtype, tolerance, chunk_size, path",
    [
        (torch.float64, 1e-10, 1, "fast"),
        (torch.float64, 1e-10, 7, "fast"),
        (torch.float64, 1e-10, 4096, "fast"),
        (torch.float32, 1e-5, 3, "fast"),
        (torch.float32, 1e-5, 64, "fast"),
        (torch.float64, 1e-10, 7, "fallback"),
        (torch.float32, 1e-5, 4096, "fallback"),
    ],
)
def test_chunked_equals_naive_values_and_gradients(model, dtype, tolerance, chunk_size, path, monkeypatch):
    assert logprobs.verified_postprocessing(model) is not None  # Qwen2: on the allow-list
    if path == "fallback":
        monkeypatch.setattr(logprobs, "verified_postprocessing", lambda model: None)
    model = model.to(dtype)
    try:
        input_ids, attention_mask, response_mask = padded_batch(model.config.vocab_size)
        weights = torch.linspace(-1.0, 2.0, input_ids.shape[0], dtype=torch.float64)

        expected = naive_sequence_logprobs(model, input_ids, attention_mask, response_mask)
        expected_grads = gradients(model, (weights.to(expected.dtype) * expected).sum())
        actual = sequence_logprobs(model, input_ids, attention_mask, response_mask, chunk_size=chunk_size)
        actual_grads = gradients(model, (weights.to(actual.dtype) * actual).sum())
    finally:
        model.to(torch.float32)

    assert actual.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert actual[3].item() == 0.0  # no response token
    assert expected[[0, 1, 2, 4]].abs().min() > 1.0
    torch.testing.assert_close(actual.double(), expected.double(), atol=tolerance, rtol=tolerance)
    for got, want in zip(actual_grads, expected_grads):
        torch.testing.assert_close(got.double(), want.double(), atol=tolerance, rtol=tolerance)


def test_no_grad_path_matches_and_chunks_really_bound_the_logits(model):
    input_ids, attention_mask, response_mask = padded_batch(model.config.vocab_size)
    seen_rows = []
    handle = model.get_output_embeddings().register_forward_hook(
        lambda module, args, output: seen_rows.append(output.reshape(-1, output.shape[-1]).shape[0])
    )
    try:
        with torch.no_grad():
            chunked = sequence_logprobs(model, input_ids, attention_mask, response_mask, chunk_size=8)
        num_response_positions = int(response_mask[:, 1:].sum())
        assert max(seen_rows) <= 8
        assert sum(seen_rows) == num_response_positions  # the model call itself computed no logits
        seen_rows.clear()
        value = sequence_logprobs(model, input_ids, attention_mask, response_mask, chunk_size=8).sum()
        value.backward()
        assert max(seen_rows) <= 8
        assert sum(seen_rows) == 2 * num_response_positions  # each chunk recomputed once in backward
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    with torch.no_grad():
        naive = naive_sequence_logprobs(model, input_ids, attention_mask, response_mask)
    torch.testing.assert_close(chunked, naive, atol=1e-5, rtol=1e-5)


def test_bad_arguments(model):
    input_ids, attention_mask, response_mask = padded_batch(model.config.vocab_size)
    with pytest.raises(ValueError, match="chunk_size must be positive"):
        sequence_logprobs(model, input_ids, attention_mask, response_mask, chunk_size=0)
    with pytest.raises(ValueError, match="one shape"):
        sequence_logprobs(model, input_ids, attention_mask, response_mask[:, :-1])


def test_fallback_keeps_no_full_logits_for_the_backward(model, monkeypatch):
    """The fallback's own-forward logits (B x T x V) are not saved for the backward: only the
    response rows are, and each chunk's fp32 log_softmax is recomputed."""
    monkeypatch.setattr(logprobs, "verified_postprocessing", lambda model: None)
    input_ids, attention_mask, response_mask = padded_batch(model.config.vocab_size)
    vocab = model.config.vocab_size
    saved = []

    def pack(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        value = sequence_logprobs(model, input_ids, attention_mask, response_mask, chunk_size=8)
    assert (*input_ids.shape, vocab) not in saved and (input_ids.numel(), vocab) not in saved
    chunk_rows = [shape[0] for shape in saved if len(shape) == 2 and shape[1] == vocab and shape[0] <= 8]
    assert sum(chunk_rows) == int(response_mask[:, 1:].sum())  # one chunk of rows each, nothing larger
    value.sum().backward()
    model.zero_grad(set_to_none=True)
