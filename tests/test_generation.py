"""Generation: backend choice, the one template, token ids with their stop token, seeded and
rank-layout independent sampling, length-sorted batches, the vLLM backend against a stand-in."""

import copy
import json
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from iris_ref import generation
from iris_ref.chat import ChatFormat
from iris_ref.generation import Generation, choose_backend, generate

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [
    [{"role": "user", "content": "Give two digits that add up to 11."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a letter between c and h."}],
    [{"role": "user", "content": "Give an even number between 23 and 31."}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "again?"}],
    [{"role": "user", "content": "Give two digits that add up to 3."}],
]
REPO = Path(__file__).resolve().parents[1]


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
    """Replace the logits of every forward pass by constants (a forward hook on the LM head)."""
    offset = torch.zeros(model.config.vocab_size, dtype=torch.float64)
    for token, value in boosts.items():
        offset[token] = value

    def hook(module, args, output):
        return output * 0 + offset.to(output.dtype)

    return model.get_output_embeddings().register_forward_hook(hook)


def ids_of(outputs) -> list[list[list[int]]]:
    return [[g.token_ids for g in responses] for responses in outputs]


def hf(model, tokenizer, prompts=PROMPTS, **kwargs):
    kwargs.setdefault("max_new_tokens", 6)
    return generate(model, tokenizer, prompts, backend="hf", **kwargs)


# --- backend choice ---------------------------------------------------------------------


@pytest.mark.parametrize("ok", [False, True])
@pytest.mark.parametrize("cuda", [False, True])
@pytest.mark.parametrize("has_path", [False, True])
def test_auto_picks_vllm_only_with_a_working_vllm_cuda_and_a_path(ok, cuda, has_path):
    expected = "vllm" if (ok and cuda and has_path) else "hf"
    assert choose_backend("auto", has_path=has_path, vllm_ok=ok, cuda_available=cuda) == expected
    assert choose_backend("hf", has_path=has_path, vllm_ok=ok, cuda_available=cuda) == "hf"


def test_explicit_vllm_without_its_requirements_is_a_clear_error():
    with pytest.raises(ValueError, match=r"needs a working vllm package \(import vllm failed: OSError: libcuda"):
        choose_backend("vllm", has_path=True, vllm_ok=False, vllm_reason="import vllm failed: OSError: libcuda",
                       cuda_available=True)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        choose_backend("vllm", has_path=True, vllm_ok=True, cuda_available=False)
    with pytest.raises(ValueError, match="pass its path"):
        choose_backend("vllm", has_path=False, vllm_ok=True, cuda_available=True)
    with pytest.raises(ValueError, match="unknown generation backend 'tgi'"):
        choose_backend("tgi", has_path=True, vllm_ok=True, cuda_available=True)


def _package(root: Path, body: str) -> Path:
    (root / "vllm").mkdir(parents=True)
    (root / "vllm" / "__init__.py").write_text(body)
    return root


@pytest.fixture
def fresh_vllm_probe(monkeypatch):
    """vllm_available() with its cache cleared and no real or fake vllm module imported."""
    for name in [n for n in sys.modules if n == "vllm" or n.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)
    generation.vllm_available.cache_clear()
    yield
    generation.vllm_available.cache_clear()
    for name in [n for n in sys.modules if n == "vllm" or n.startswith("vllm.")]:
        del sys.modules[name]


def test_vllm_available_imports_vllm_for_real(tmp_path, monkeypatch, fresh_vllm_probe):
    """A package that is found but fails to import (what find_spec cannot see) is unavailable,
    with the reason in one line; a package that imports is available."""
    broken = _package(tmp_path / "broken", "raise RuntimeError('CUDA driver version is insufficient\\nmore')\n")
    monkeypatch.syspath_prepend(str(broken))
    assert generation.vllm_available() == (False, "import vllm failed: RuntimeError: CUDA driver version is insufficient")
    generation.vllm_available.cache_clear()
    sys.modules.pop("vllm", None)
    monkeypatch.syspath_prepend(str(_package(tmp_path / "working", "__version__ = '0.33.0'\n")))
    assert generation.vllm_available() == (True, "vllm 0.33.0")


def test_vllm_available_without_vllm(monkeypatch, fresh_vllm_probe):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ModuleNotFoundError
    ok, reason = generation.vllm_available()
    assert not ok and reason


def test_auto_falls_back_to_transformers_with_one_warning_before_loading(tiny_checkpoint, tokenizer, monkeypatch,
                                                                         capsys):
    monkeypatch.setattr(generation, "vllm_available", lambda: (False, "import vllm failed: OSError: libcudart.so"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    seen_before_loading = []
    original = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen_before_loading.append(capsys.readouterr().err)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    outputs = generate(tiny_checkpoint, tokenizer, PROMPTS[:2], max_new_tokens=3, backend="auto")
    assert len(outputs) == 2 and all(len(r) == 1 and isinstance(r[0], Generation) for r in outputs)
    warning = [line for line in seen_before_loading[0].splitlines() if "vLLM" in line]
    assert warning == ["[iris] warning: vLLM is unusable (import vllm failed: OSError: libcudart.so); "
                       "generating with transformers"]
    with pytest.raises(ValueError, match=r"needs a working vllm package \(import vllm failed: OSError"):
        generate(tiny_checkpoint, tokenizer, PROMPTS, max_new_tokens=3, backend="vllm")


def test_explicit_vllm_here_raises_before_any_work(tiny_checkpoint, tokenizer, model, monkeypatch):
    monkeypatch.setattr(generation, "vllm_available", lambda: (True, "vllm fake"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        generate(tiny_checkpoint, tokenizer, PROMPTS, max_new_tokens=4, backend="vllm")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match="pass its path"):
        generate(model, tokenizer, PROMPTS, max_new_tokens=4, backend="vllm")


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be positive"),
        ({"temperature": -1.0}, "temperature must be >= 0"),
        ({"top_p": 0.0}, "top_p must be in"),
        ({"batch_size": 0}, "batch_size must be positive"),
        ({"num_responses": 0}, "num_responses must be >= 1"),
        ({"gpu_memory_utilization": 0.0}, "gpu_memory_utilization must be in"),
        ({"max_model_len": 0}, "max_model_len must be positive"),
    ],
)
def test_bad_arguments(model, tokenizer, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        hf(model, tokenizer, **kwargs)


# --- the one template, length-sorted batches --------------------------------------------------


def test_the_model_is_fed_exactly_the_training_prompt_ids_longest_first(model, tokenizer, monkeypatch):
    fed = []
    original_generate = model.generate

    def spy(*args, input_ids, attention_mask, **kwargs):
        batch = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            batch.append([token for token, keep in zip(ids, mask) if keep])
            assert mask == sorted(mask)  # left padding: zeros first
        fed.append(batch)
        return original_generate(*args, input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    padding_side = tokenizer.padding_side
    hf(model, tokenizer, num_responses=2, max_new_tokens=2, batch_size=3)
    expected = [ChatFormat(tokenizer).prompt_ids(p) for p in PROMPTS]
    rows = [row for batch in fed for row in batch]
    assert [len(batch) for batch in fed] == [3, 3, 3, 1]  # 5 prompts x 2 responses in batches of 3
    assert sorted(map(tuple, rows)) == sorted(map(tuple, expected * 2))
    lengths = [len(row) for row in rows]
    assert lengths == sorted(lengths, reverse=True) and len(set(lengths)) > 1  # longest first, ragged
    assert tokenizer.padding_side == padding_side


def test_plan_sorts_by_length_with_ties_by_index():
    assert generation.plan_batches([2, 5, 2, 5], 2, 3) == [
        [(1, 0), (1, 1), (3, 0)], [(3, 1), (0, 0), (0, 1)], [(2, 0), (2, 1)]]
    assert generation.plan_batches([], 3, 4) == []


# --- sampling -------------------------------------------------------------------------------


def test_seeded_sampling_is_deterministic_and_leaves_global_state_alone(model, tokenizer):
    model.train()
    torch.manual_seed(123)
    rng_state = torch.get_rng_state()
    first = hf(model, tokenizer, max_new_tokens=8, seed=7, batch_size=2, num_responses=2)
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert model.training
    again = hf(model, tokenizer, max_new_tokens=8, seed=7, batch_size=2, num_responses=2)
    other = hf(model, tokenizer, max_new_tokens=8, seed=8, batch_size=2, num_responses=2)
    model.eval()
    assert first == again
    assert ids_of(first) != ids_of(other)
    assert all(len(responses) == 2 for responses in first)
    assert any(a.token_ids != b.token_ids for a, b in first)  # the K responses are distinct samples


def test_batches_are_seeded_from_seed_and_index_only_so_their_order_does_not_matter(model, tokenizer):
    """What a rank layout changes is which process runs a batch and what ran before it: each
    batch's result must depend on its (seed, index) only."""
    ids = [ChatFormat(tokenizer).prompt_ids(p) for p in PROMPTS] * 2
    stops = ChatFormat(tokenizer).stop_ids
    plan = generation.plan_batches([len(x) for x in ids], 2, 3)
    config = generation._generation_config(6, 1.0, 1.0, stops, tokenizer.pad_token_id)
    common = dict(pad_token_id=tokenizer.pad_token_id, stops=stops, generation_config=config, seed=3, synced=False)
    with torch.no_grad(), generation._only_these_generation_settings(model, config):
        budgets = [6] * len(ids)
        forward = generation._run_plan(model, plan, list(range(len(plan))), ids, budgets, **common)
        backward = generation._run_plan(model, plan, [None] + list(reversed(range(len(plan)))), ids, budgets, **common)
        alone = generation._run_plan(model, plan, [len(plan) - 2], ids, budgets, **common)
    assert forward == backward and len(forward) == len(plan)
    assert alone == {len(plan) - 2: forward[len(plan) - 2]}
    assert generation.batch_seed(3, 0) != generation.batch_seed(3, 1) != generation.batch_seed(4, 1)


def test_greedy_results_do_not_depend_on_batching(model, tokenizer):
    one_by_one = hf(model, tokenizer, temperature=0, batch_size=1)
    batched = hf(model, tokenizer, temperature=0, batch_size=5)
    assert one_by_one == batched
    assert len({tuple(r[0].token_ids) for r in one_by_one}) > 1


def test_temperature_one_samples_the_model_distribution_ignoring_its_generation_defaults(model, tokenizer):
    a, b = tokenizer.convert_tokens_to_ids(["a", "b"])
    # every logit is replaced: "a" and "b" get probabilities 3/4 and 1/4, everything else ~e^-40
    handle = boost_logits(model, {a: 40.0 + float(torch.log(torch.tensor(3.0))), b: 40.0})
    original_config = model.generation_config
    model.generation_config = copy.deepcopy(original_config)
    model.generation_config.top_k = 1  # e.g. a hub model's defaults: must not leak into sampling
    model.generation_config.repetition_penalty = 5.0
    try:
        outputs = hf(model, tokenizer, PROMPTS[:1] * 100, num_responses=4, max_new_tokens=1, batch_size=200)
        assert model.generation_config.top_k == 1  # the model's own settings are back
    finally:
        handle.remove()
        model.generation_config = original_config
    tokens = [g.token_ids[0] for responses in outputs for g in responses]
    assert set(tokens) == {a, b} and len(tokens) == 400
    assert abs(tokens.count(a) / len(tokens) - 0.75) < 0.08


# --- token ids, stop tokens, text -------------------------------------------------------------


def test_token_ids_keep_the_end_of_turn_token_and_the_text_leaves_it_out(model, tokenizer):
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    x = tokenizer.convert_tokens_to_ids("x")
    handle = boost_logits(model, {end: 50.0})
    try:
        stopped = hf(model, tokenizer, max_new_tokens=5, temperature=0)
    finally:
        handle.remove()
    # empty of text, never empty of tokens
    assert stopped == [[Generation(token_ids=[end], text="", finished=True)]] * len(PROMPTS)
    handle = boost_logits(model, {x: 50.0})
    try:
        runaway = hf(model, tokenizer, max_new_tokens=5, temperature=0)
    finally:
        handle.remove()
    assert runaway == [[Generation(token_ids=[x] * 5, text="xxxxx", finished=False)]] * len(PROMPTS)


def test_a_base_model_stopping_on_endoftext_keeps_endoftext(model, tokenizer):
    base = copy.deepcopy(tokenizer)
    base.eos_token = "<|endoftext|>"
    end_of_text, end_of_turn = base.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    assert ChatFormat(base).stop_ids == [end_of_turn, end_of_text]
    y = tokenizer.convert_tokens_to_ids("y")
    # "y" most of the time, <|endoftext|> now and then: responses of several lengths
    handle = boost_logits(model, {y: 40.0, end_of_text: 39.0})
    try:
        outputs = hf(model, base, num_responses=4, max_new_tokens=8, seed=1)
    finally:
        handle.remove()
    generations = [g for responses in outputs for g in responses]
    stopped = [g for g in generations if g.finished]
    assert stopped and len(stopped) < len(generations)
    for g in stopped:
        assert g.token_ids[-1] == end_of_text and end_of_text not in g.token_ids[:-1]
        assert g.token_ids[:-1] == [y] * (len(g.token_ids) - 1) and g.text == "y" * (len(g.token_ids) - 1)
    assert all(g.token_ids == [y] * 8 for g in generations if not g.finished)


def test_at_least_one_token_whatever_max_new_tokens(model, tokenizer):
    outputs = hf(model, tokenizer, PROMPTS * 4, max_new_tokens=1, seed=5)
    assert all(len(g.token_ids) == 1 for responses in outputs for g in responses)
    for responses in outputs:
        g = responses[0]
        assert g.finished == (g.token_ids[0] in ChatFormat(tokenizer).stop_ids)


def test_empty_prompt_list(model, tokenizer):
    assert hf(model, tokenizer, [], max_new_tokens=3) == []


def test_progress_lines_count_prompts(model, tokenizer, capsys):
    hf(model, tokenizer, PROMPTS * 4, num_responses=2, max_new_tokens=2, batch_size=4, desc="held-out generation")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[iris] held-out generation:")]
    assert lines and lines[-1].startswith("[iris] held-out generation: 20/20 (100%)") and "prompts/s" in lines[-1]


def test_a_path_is_loaded_in_float32_on_cpu_and_gives_what_the_same_model_gives(tiny_checkpoint, tokenizer):
    loaded = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    assert generate(tiny_checkpoint, tokenizer, PROMPTS, max_new_tokens=4, seed=2, backend="hf") == \
        hf(loaded, tokenizer, max_new_tokens=4, seed=2)


# --- one process == two processes ---------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_return_what_one_process_returns(tiny_checkpoint, tokenizer, tmp_path):
    """torchrun, 2 CPU ranks: every rank gets all results, equal to one process's; with
    synced_gpus the rank with fewer batches runs a dummy one, so both run the same forwards."""
    from tests.generation_worker import PROMPTS as WORKER_PROMPTS, SETTINGS, as_json

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(REPO / "tests" / "generation_worker.py"),
           "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    reference = as_json(generate(str(tiny_checkpoint), tokenizer, WORKER_PROMPTS, **SETTINGS))
    assert all(r["world_size"] == 2 for r in ranks)
    for r in ranks:
        assert r["plain"] == reference
        assert r["synced"] == reference
    assert ranks[0]["forwards"] == ranks[1]["forwards"] > 0


# --- the vLLM backend, against a stand-in with vLLM's API (vLLM itself needs CUDA) -------------


class FakeVllm:
    """Records what generate asks of vLLM's ``LLM``/``SamplingParams`` API and answers with
    scripted completions: ``script(prompt_number, response_number) -> (token_ids, finish_reason)``."""

    def __init__(self, script):
        self.calls = []
        self.script = script

    def install(self, monkeypatch):
        fake = self
        vllm = types.ModuleType("vllm")

        class SamplingParams:
            def __init__(self, **kwargs):
                self.kwargs = kwargs

        class LLM:
            def __init__(self, **kwargs):
                fake.calls.append(("init", kwargs))

            def generate(self, prompts, sampling_params, use_tqdm=True):
                params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
                fake.calls.append(("generate", prompts, [p.kwargs for p in params], isinstance(sampling_params, list)))
                ns = types.SimpleNamespace
                return [ns(outputs=[ns(index=j, token_ids=tuple(fake.script(i, j)[0]), finish_reason=fake.script(i, j)[1],
                                       text="vLLM's own text, not used")
                                    for j in reversed(range(p.kwargs["n"]))])  # in any order
                        for i, p in enumerate(params)]

        vllm.LLM, vllm.SamplingParams = LLM, SamplingParams
        parallel_state = types.ModuleType("vllm.distributed.parallel_state")
        parallel_state.cleanup_dist_env_and_memory = lambda: fake.calls.append(("cleanup",))
        vllm_distributed = types.ModuleType("vllm.distributed")
        vllm_distributed.parallel_state = parallel_state
        vllm.distributed = vllm_distributed
        for name, module in {"vllm": vllm, "vllm.distributed": vllm_distributed,
                             "vllm.distributed.parallel_state": parallel_state}.items():
            monkeypatch.setitem(sys.modules, name, module)
        monkeypatch.setattr(generation, "vllm_available", lambda: (True, "vllm fake"))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda: fake.calls.append(("empty_cache",)))
        return self


def test_vllm_backend_gets_the_prompt_ids_one_request_per_prompt_and_is_torn_down(tiny_checkpoint, tokenizer,
                                                                                    monkeypatch):
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    x, y = tokenizer.convert_tokens_to_ids(["x", "y"])

    def script(i, j):
        if j == 0:
            return [x] * (i + 1) + [end], "stop"
        if j == 1:
            return [y] * 7, "length"
        return [x, end], "length"  # a stop token sampled as the max_tokens-th token (some vLLM versions)

    fake = FakeVllm(script).install(monkeypatch)
    outputs = generate(tiny_checkpoint, tokenizer, PROMPTS, num_responses=3, max_new_tokens=7, temperature=1.0,
                       top_p=0.9, seed=11, backend="auto", gpu_memory_utilization=0.6, max_model_len=96)

    (_, init), (_, prompts, params, per_request), *teardown = fake.calls
    assert init == {"model": str(tiny_checkpoint), "tokenizer": str(tiny_checkpoint), "seed": 11, "dtype": "bfloat16",
                    "gpu_memory_utilization": 0.6, "max_model_len": 96, "trust_remote_code": False}
    assert prompts == [{"prompt_token_ids": ChatFormat(tokenizer).prompt_ids(p)} for p in PROMPTS]
    assert not per_request and "seed" not in params[0]  # the engine is seeded, requests are not
    assert (params[0]["n"], params[0]["temperature"], params[0]["top_p"], params[0]["max_tokens"],
            params[0]["stop_token_ids"]) == (3, 1.0, 0.9, 7, [end])
    assert teardown == [("cleanup",), ("empty_cache",)]
    for i, responses in enumerate(outputs):  # token ids exactly as the engine gave them, in response order
        assert responses == [Generation([x] * (i + 1) + [end], "x" * (i + 1), True),
                             Generation([y] * 7, "y" * 7, False),
                             Generation([x, end], "x", True)]


def test_vllm_per_request_seeds_only_on_request(tiny_checkpoint, tokenizer, monkeypatch):
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    fake = FakeVllm(lambda i, j: ([end], "stop")).install(monkeypatch)
    outputs = generate(tiny_checkpoint, tokenizer, PROMPTS, num_responses=2, max_new_tokens=3, seed=11,
                       backend="vllm", per_request_seed=True)
    (_, init), (_, _, params, per_request), *_ = fake.calls
    assert init["max_model_len"] is None  # vLLM's default unless the caller passes the run's length
    assert per_request and [p["seed"] for p in params] == [11 + 2 * i for i in range(len(PROMPTS))]
    assert outputs == [[Generation([end], "", True)] * 2] * len(PROMPTS)


def test_vllm_gets_each_prompts_budget_trust_remote_code_and_the_named_gpu(tiny_checkpoint, tokenizer, monkeypatch):
    """Issue 19: per-prompt max_tokens (the budget the annotated responses are cut to), the
    --trust-remote-code flag, and --device cuda:N in one process: the engine starts while
    CUDA_VISIBLE_DEVICES names only that GPU, and the caller's setting is restored after."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    fake = FakeVllm(lambda i, j: ([end], "stop")).install(monkeypatch)
    seen = []
    original_init = sys.modules["vllm"].LLM.__init__

    def init(self, **kwargs):
        seen.append(os.environ.get("CUDA_VISIBLE_DEVICES"))
        original_init(self, **kwargs)

    monkeypatch.setattr(sys.modules["vllm"].LLM, "__init__", init)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    budgets = [5, 9, 5, 2, 7][:len(PROMPTS)]
    generate(tiny_checkpoint, tokenizer, PROMPTS, max_new_tokens=budgets, backend="vllm", device="cuda:2",
             trust_remote_code=True)
    (_, init_kwargs), (_, _, params, per_request), *_ = fake.calls
    assert init_kwargs["trust_remote_code"] is True
    assert per_request and [p["max_tokens"] for p in params] == budgets
    assert seen == ["6"] and os.environ["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"
    fake.calls.clear()
    generate(tiny_checkpoint, tokenizer, PROMPTS, max_new_tokens=3, backend="vllm", device="cuda")
    assert seen[-1] == "4,5,6,7"  # no index named: vLLM takes the first visible GPU, as training does


def test_transformers_path_cuts_each_row_at_its_own_budget(model, tokenizer):
    """Per-prompt budgets on the transformers path: a batch decodes to its largest budget and each
    row is cut at its own, which is the response it would have had with its own limit (greedy:
    the same tokens as generating that prompt alone with that limit)."""
    budgets = [1, 4, 2, 6, 3][:len(PROMPTS)]
    together = hf(model, tokenizer, temperature=0, max_new_tokens=budgets, batch_size=len(PROMPTS))
    for prompt, budget, responses in zip(PROMPTS, budgets, together):
        alone = hf(model, tokenizer, [prompt], temperature=0, max_new_tokens=budget)[0][0]
        assert responses[0] == alone and len(alone.token_ids) <= budget
    with pytest.raises(ValueError, match="2 budgets for"):
        hf(model, tokenizer, max_new_tokens=[3, 3])


def test_transformers_load_gets_trust_remote_code(tiny_checkpoint, tokenizer, monkeypatch):
    """Issue 19: --trust-remote-code reaches the generation load (spied on the loader)."""
    import transformers

    calls = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        calls.append(kwargs.get("trust_remote_code"))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    generate(str(tiny_checkpoint), tokenizer, PROMPTS[:1], max_new_tokens=2, backend="hf", trust_remote_code=True)
    assert calls == [True]


def test_learned_positions_never_run_past_their_range_with_per_prompt_budgets():
    """GPT-2's positions are learned (n_positions): a batch of a long and a short prompt with
    budgets max_length - |prompt| would reach |long| + budget(short) > n_positions; the plan cuts
    such batches, and each response equals the one generated alone (greedy)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests import tokenizer_families as families

    tokenizer = families.tokenizer("chatml")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=1,
                                       n_head=2)).eval()
    chat = ChatFormat(tokenizer)
    prompts = [[{"role": "user", "content": "hi"}],
               [{"role": "user", "content": "tell me about the sky and the sea and the hills, " * 2}]]
    budgets = [64 - len(chat.prompt_ids(p)) for p in prompts]
    together = generate(model, chat, prompts, max_new_tokens=budgets, temperature=0, batch_size=2, backend="hf")
    for prompt, budget, responses in zip(prompts, budgets, together):
        assert responses == generate(model, chat, [prompt], max_new_tokens=budget, temperature=0, backend="hf")[0]
    lengths = [len(chat.prompt_ids(p)) for p in prompts]
    assert len(generation.plan_batches(lengths, 1, 2, budgets, position_limit=64)) == 2
    assert len(generation.plan_batches(lengths, 1, 2, budgets, position_limit=None)) == 1  # RoPE-style: one batch


def test_a_batch_stops_when_every_row_has_stopped_or_spent_its_budget():
    criteria = generation._budgets_reached([2, 5], width=3)
    done = criteria(torch.zeros((2, 5), dtype=torch.long), None)
    assert done.tolist() == [True, False]
