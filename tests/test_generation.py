"""Generation: backend choice, the one template, seeded sampling, stopping, decoding."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from iris_ref import generation
from iris_ref.data import prompt_ids
from iris_ref.generation import choose_backend, generate_responses

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [
    [{"role": "user", "content": "Give two digits that add up to 11."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a letter between c and h."}],
    [{"role": "user", "content": "Give an even number between 23 and 31."}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "again?"}],
    [{"role": "user", "content": "Give two digits that add up to 3."}],
]


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return AutoTokenizer.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    """The tiny model in float64 with weights pushed away from the near-uniform init, so that
    greedy decoding has clear winners. Shared: tests undo what they change."""
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).to(torch.float64)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return model


def boost_logits(model, boosts: dict[int, float]):
    """Add constants to chosen logits of every forward pass (a forward hook on the LM head)."""
    offset = torch.zeros(model.config.vocab_size, dtype=torch.float64)
    for token, value in boosts.items():
        offset[token] = value

    def hook(module, args, output):
        return output * 0 + offset.to(output.dtype)

    return model.get_output_embeddings().register_forward_hook(hook)


# --- backend choice ---------------------------------------------------------------------


@pytest.mark.parametrize("importable", [False, True])
@pytest.mark.parametrize("cuda", [False, True])
@pytest.mark.parametrize("has_path", [False, True])
def test_auto_picks_vllm_only_with_vllm_cuda_and_a_path(importable, cuda, has_path):
    expected = "vllm" if (importable and cuda and has_path) else "hf"
    assert choose_backend("auto", has_path=has_path, vllm_importable=importable, cuda_available=cuda) == expected
    assert choose_backend("hf", has_path=has_path, vllm_importable=importable, cuda_available=cuda) == "hf"


def test_explicit_vllm_without_its_requirements_is_a_clear_error():
    with pytest.raises(ValueError, match="needs the vllm package"):
        choose_backend("vllm", has_path=True, vllm_importable=False, cuda_available=True)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        choose_backend("vllm", has_path=True, vllm_importable=True, cuda_available=False)
    with pytest.raises(ValueError, match="pass its path"):
        choose_backend("vllm", has_path=False, vllm_importable=True, cuda_available=True)
    with pytest.raises(ValueError, match="unknown generation backend 'tgi'"):
        choose_backend("tgi", has_path=True, vllm_importable=True, cuda_available=True)


def test_vllm_backend_here_raises_before_any_work(tiny_checkpoint, tokenizer, monkeypatch):
    if torch.cuda.is_available() and generation.vllm_is_importable():
        pytest.skip("vLLM and CUDA are both present")
    with pytest.raises(ValueError, match="generation backend 'vllm' needs"):
        generate_responses(tiny_checkpoint, tokenizer, PROMPTS, max_new_tokens=4, backend="vllm")
    monkeypatch.setattr(generation, "vllm_is_importable", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        generate_responses(tiny_checkpoint, tokenizer, PROMPTS, max_new_tokens=4, backend="vllm")


def test_auto_on_this_machine_uses_hf_from_a_path(tiny_checkpoint, tokenizer, monkeypatch):
    monkeypatch.setattr(generation, "vllm_is_importable", lambda: False)
    responses = generate_responses(tiny_checkpoint, tokenizer, PROMPTS[:2], max_new_tokens=3, backend="auto")
    assert len(responses) == 2 and all(isinstance(r, str) for r in responses)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be positive"),
        ({"max_new_tokens": 4, "temperature": -1.0}, "temperature must be >= 0"),
        ({"max_new_tokens": 4, "top_p": 0.0}, "top_p must be in"),
        ({"max_new_tokens": 4, "batch_size": 0}, "batch_size must be positive"),
    ],
)
def test_bad_sampling_arguments(model, tokenizer, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        generate_responses(model, tokenizer, PROMPTS, backend="hf", **kwargs)


# --- the one template -----------------------------------------------------------------------


def test_the_model_is_fed_exactly_the_training_prompt_ids(model, tokenizer, monkeypatch):
    fed = []
    original_generate = model.generate

    def spy(*args, input_ids, attention_mask, **kwargs):
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            fed.append([token for token, keep in zip(ids, mask) if keep])
            assert mask == sorted(mask)  # left padding: zeros first
        return original_generate(*args, input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    padding_side = tokenizer.padding_side
    generate_responses(model, tokenizer, PROMPTS, max_new_tokens=2, batch_size=2, backend="hf")
    assert fed == [prompt_ids(tokenizer, prompt) for prompt in PROMPTS]
    assert len({len(ids) for ids in fed}) > 1  # ragged prompts, so padding was exercised
    assert tokenizer.padding_side == padding_side


# --- sampling ---------------------------------------------------------------------------------


def test_seeded_sampling_is_deterministic_and_leaves_global_state_alone(model, tokenizer):
    model.train()
    torch.manual_seed(123)
    rng_state = torch.get_rng_state()
    first = generate_responses(model, tokenizer, PROMPTS, max_new_tokens=8, seed=7, batch_size=2, backend="hf")
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert model.training
    again = generate_responses(model, tokenizer, PROMPTS, max_new_tokens=8, seed=7, batch_size=2, backend="hf")
    other = generate_responses(model, tokenizer, PROMPTS, max_new_tokens=8, seed=8, batch_size=2, backend="hf")
    model.eval()
    assert first == again
    assert first != other


def test_greedy_results_do_not_depend_on_batching(model, tokenizer):
    one_by_one = generate_responses(model, tokenizer, PROMPTS, max_new_tokens=6, temperature=0, batch_size=1, backend="hf")
    batched = generate_responses(model, tokenizer, PROMPTS, max_new_tokens=6, temperature=0, batch_size=5, backend="hf")
    assert one_by_one == batched
    assert len(set(one_by_one)) > 1


def test_temperature_one_samples_the_model_distribution_ignoring_its_generation_defaults(model, tokenizer):
    a, b = tokenizer.convert_tokens_to_ids(["a", "b"])
    # every logit is replaced: "a" and "b" get probabilities 3/4 and 1/4, everything else ~e^-40
    handle = boost_logits(model, {a: 40.0 + float(torch.log(torch.tensor(3.0))), b: 40.0})
    original_config = model.generation_config
    model.generation_config = copy.deepcopy(original_config)
    model.generation_config.top_k = 1  # e.g. a hub model's defaults: must not leak into sampling
    model.generation_config.repetition_penalty = 5.0
    try:
        responses = generate_responses(model, tokenizer, PROMPTS[:1] * 400, max_new_tokens=1, batch_size=200, backend="hf")
        assert model.generation_config.top_k == 1  # the model's own settings are back
    finally:
        handle.remove()
        model.generation_config = original_config
    assert set(responses) == {"a", "b"}
    share_a = responses.count("a") / len(responses)
    assert abs(share_a - 0.75) < 0.08


def test_stops_at_end_of_turn_and_decodes_only_new_tokens(model, tokenizer):
    x = tokenizer.convert_tokens_to_ids("x")
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    handle = boost_logits(model, {eos: 50.0})
    try:
        stopped = generate_responses(model, tokenizer, PROMPTS, max_new_tokens=5, temperature=0, backend="hf")
    finally:
        handle.remove()
    assert stopped == [""] * len(PROMPTS)
    handle = boost_logits(model, {x: 50.0})
    try:
        runaway = generate_responses(model, tokenizer, PROMPTS, max_new_tokens=5, temperature=0, backend="hf")
    finally:
        handle.remove()
    assert runaway == ["xxxxx"] * len(PROMPTS)


def test_empty_prompt_list(model, tokenizer):
    assert generate_responses(model, tokenizer, [], max_new_tokens=3, backend="hf") == []


# --- the vLLM backend, against a stand-in with vLLM's API (vLLM itself needs CUDA) -------------


class FakeVllm:
    """Records what generate_responses asks of vLLM's ``LLM``/``SamplingParams`` API."""

    def __init__(self):
        self.calls = []

    def module(self):
        import types

        fake = self
        vllm = types.ModuleType("vllm")

        class SamplingParams:
            def __init__(self, **kwargs):
                self.kwargs = kwargs

        class LLM:
            def __init__(self, **kwargs):
                fake.calls.append(("init", kwargs))

            def generate(self, prompts, sampling_params, use_tqdm=True):
                fake.calls.append(("generate", prompts, [p.kwargs for p in sampling_params]))
                completion = types.SimpleNamespace
                return [completion(outputs=[completion(text=f"answer {i}", finish_reason="stop" if i % 2 else "length")])
                        for i in range(len(prompts))]

        vllm.LLM, vllm.SamplingParams = LLM, SamplingParams
        parallel_state = types.ModuleType("vllm.distributed.parallel_state")
        parallel_state.cleanup_dist_env_and_memory = lambda: fake.calls.append(("cleanup",))
        distributed = types.ModuleType("vllm.distributed")
        distributed.parallel_state = parallel_state
        vllm.distributed = distributed
        return {"vllm": vllm, "vllm.distributed": distributed, "vllm.distributed.parallel_state": parallel_state}


def test_vllm_backend_gets_the_same_token_ids_seeds_per_prompt_and_is_torn_down(
    tiny_checkpoint, tokenizer, monkeypatch
):
    import sys

    fake = FakeVllm()
    for name, module in fake.module().items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(generation, "vllm_is_importable", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: fake.calls.append(("empty_cache",)))

    responses = generate_responses(
        tiny_checkpoint, tokenizer, PROMPTS, max_new_tokens=7, temperature=1.0, top_p=0.9, seed=11, backend="auto"
    )

    assert responses == [f"answer {i}" for i in range(len(PROMPTS))]
    (_, init), (_, prompts, params), *teardown = fake.calls
    assert init["model"] == str(tiny_checkpoint) and init["seed"] == 11 and init["dtype"] == "bfloat16"
    assert prompts == [{"prompt_token_ids": prompt_ids(tokenizer, p)} for p in PROMPTS]
    assert [p["seed"] for p in params] == [11 + i for i in range(len(PROMPTS))]
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert all(
        (p["temperature"], p["top_p"], p["max_tokens"], p["stop_token_ids"]) == (1.0, 0.9, 7, [eos]) for p in params
    )
    assert teardown == [("cleanup",), ("empty_cache",)]


def test_finished_flags_tell_truncated_responses_apart(model, tokenizer):
    """return_finished reports, per response, whether it ended with its end-of-turn token:
    a response cut at max_new_tokens is not finished (no end of turn may be appended to it)."""
    texts, finished = generate_responses(model, tokenizer, PROMPTS * 4, max_new_tokens=1, seed=5, return_finished=True)
    assert texts == generate_responses(model, tokenizer, PROMPTS * 4, max_new_tokens=1, seed=5)
    assert len(finished) == len(texts)
    for text, done in zip(texts, finished):
        assert not (done and text)  # one new token: a stop token leaves nothing to decode
        if text:
            assert not done
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    stops = {eos}
    assert generation._cut_at_stop([7, 8, eos, 9], stops) == ([7, 8], True)
    assert generation._cut_at_stop([7, 8, 9], stops) == ([7, 8, 9], False)


def test_vllm_finish_reason_becomes_the_finished_flag(tiny_checkpoint, tokenizer, monkeypatch):
    import sys

    fake = FakeVllm()
    for name, module in fake.module().items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(generation, "vllm_is_importable", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    texts, finished = generate_responses(tiny_checkpoint, tokenizer, PROMPTS, max_new_tokens=7, backend="vllm",
                                         return_finished=True)
    assert finished == [i % 2 == 1 for i in range(len(PROMPTS))]  # "stop" -> True, "length" -> False
