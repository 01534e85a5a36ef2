"""Conformance of ``sequence_logprobs`` with each architecture's own logits.

Every case builds a tiny random model (hidden 32, 2 layers, vocabulary 101, float64, eval mode,
weights perturbed so that nothing is near-uniform, and its logit post-processing set to a value
that matters), and compares the chunked log-probs (chunk smaller than the response) of a
right-padded batch with ``log_softmax(model(...).logits)`` gathered at the response tokens, to
1e-10. Every allow-listed architecture has a case here and must take the fast path; the others
must take the fallback. The negative controls show what the check catches: the fast path
without an architecture's post-processing (Granite's ``logits / logits_scaling`` among them), and
on models whose forward changes the logits in a way it cannot know (MiniCPM3, a custom subclass).
"""

import tempfile

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

from iris_ref import logprobs
from iris_ref.logprobs import SequenceLogprobModule
from iris_ref.logprobs import VERIFIED_ARCHITECTURES, sequence_logprobs, verified_postprocessing

pytestmark = pytest.mark.usefixtures("one_thread")

TOLERANCE = 1e-10
CHUNK = 4  # < the 17 response positions of `batch`, and divides nothing

COMMON = dict(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=64, initializer_range=0.2,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
MOE = dict(num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2,
           moe_intermediate_size=32, shared_expert_intermediate_size=32)
MLA = dict(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4,
           v_head_dim=8, head_dim=4)
GRANITE = dict(logits_scaling=3.7, embedding_multiplier=2.3, residual_multiplier=0.6, attention_multiplier=0.3)

# model_type -> (class, config overrides, expected path). The overrides set each post-processing
# to a value that changes the log-probs by far more than the tolerance (the controls check it).
CASES = {
    "qwen2": ("Qwen2ForCausalLM", {}, "fast"),
    "qwen3": ("Qwen3ForCausalLM", {}, "fast"),
    "qwen2_moe": ("Qwen2MoeForCausalLM", MOE, "fast"),
    "qwen3_moe": ("Qwen3MoeForCausalLM", MOE, "fast"),
    "llama": ("LlamaForCausalLM", {}, "fast"),
    "mistral": ("MistralForCausalLM", {}, "fast"),
    "ministral": ("MinistralForCausalLM", {}, "fast"),
    "mixtral": ("MixtralForCausalLM", MOE, "fast"),
    "gemma": ("GemmaForCausalLM", {}, "fast"),
    "gemma2": ("Gemma2ForCausalLM", dict(final_logit_softcapping=1.3, attn_logit_softcapping=3.0), "fast"),
    "gemma3_text": ("Gemma3ForCausalLM", dict(final_logit_softcapping=1.1, attn_logit_softcapping=2.5), "fast"),
    "gemma3n_text": ("Gemma3nForCausalLM", dict(final_logit_softcapping=1.7, vocab_size_per_layer_input=101,
                                                layer_types=["sliding_attention", "full_attention"],
                                                num_kv_shared_layers=0, laurel_rank=4, hidden_size_per_layer_input=8,
                                                intermediate_size=[64, 64], activation_sparsity_pattern=[0.0, 0.0]),
                     "fast"),
    "vaultgemma": ("VaultGemmaForCausalLM", dict(final_logit_softcapping=0.9), "fast"),
    "phi": ("PhiForCausalLM", {}, "fast"),
    "phi3": ("Phi3ForCausalLM", {}, "fast"),
    "granite": ("GraniteForCausalLM", GRANITE, "fast"),
    "granitemoe": ("GraniteMoeForCausalLM", dict(MOE, **GRANITE), "fast"),
    "granitemoeshared": ("GraniteMoeSharedForCausalLM", dict(MOE, **GRANITE), "fast"),
    "cohere": ("CohereForCausalLM", dict(logit_scale=2.7), "fast"),
    "cohere2": ("Cohere2ForCausalLM", dict(logit_scale=0.4), "fast"),
    "olmo": ("OlmoForCausalLM", {}, "fast"),
    "olmo2": ("Olmo2ForCausalLM", {}, "fast"),
    "olmo3": ("Olmo3ForCausalLM", {}, "fast"),
    "olmoe": ("OlmoeForCausalLM", MOE, "fast"),
    "smollm3": ("SmolLM3ForCausalLM", {}, "fast"),
    "stablelm": ("StableLmForCausalLM", {}, "fast"),
    "starcoder2": ("Starcoder2ForCausalLM", {}, "fast"),
    "gpt2": ("GPT2LMHeadModel", {}, "fast"),
    "gpt_neox": ("GPTNeoXForCausalLM", {}, "fast"),
    "falcon": ("FalconForCausalLM", dict(head_dim=None), "fast"),
    "glm": ("GlmForCausalLM", {}, "fast"),
    "glm4": ("Glm4ForCausalLM", {}, "fast"),
    "exaone4": ("Exaone4ForCausalLM", {}, "fast"),
    "helium": ("HeliumForCausalLM", {}, "fast"),
    "nemotron": ("NemotronForCausalLM", {}, "fast"),
    "apertus": ("ApertusForCausalLM", {}, "fast"),
    "arcee": ("ArceeForCausalLM", {}, "fast"),
    "seed_oss": ("SeedOssForCausalLM", {}, "fast"),
    "deepseek_v3": ("DeepseekV3ForCausalLM", dict(MOE, **MLA, n_group=2, topk_group=1, first_k_dense_replace=1), "fast"),
    # divides the final hidden state by hidden_size / dim_model_base before lm_head: not on the list
    "minicpm3": ("MiniCPM3ForCausalLM", dict(MLA, dim_model_base=8), "fallback"),
}
GRADIENT_CASES = {"granite", "gemma2", "cohere", "minicpm3"}


def perturbed(model):
    """float64, eval, and every parameter moved off its init (norm weights, biases included)."""
    model = model.to(torch.float64).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return model


def build(model_type):
    class_name, overrides, _ = CASES[model_type]
    kwargs = {k: v for k, v in {**COMMON, **overrides}.items() if v is not None}
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(0)
    # the default grouped-mm experts kernel has no float64 on CPU
    extra = {"experts_implementation": "eager"} if overrides.get("num_experts_per_tok") else {}
    model = AutoModelForCausalLM.from_config(config, **extra)
    assert type(model).__name__ == class_name
    return perturbed(model)


def batch(vocab_size=101):
    """Right-padded rows of 12, 9 and 6 tokens with 7 + 6 + 4 response positions."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, vocab_size, (3, 12), generator=generator)
    attention_mask = torch.zeros_like(input_ids)
    response_mask = torch.zeros_like(input_ids)
    for row, (prompt, length) in enumerate([(5, 12), (3, 9), (2, 6)]):
        attention_mask[row, :length] = 1
        response_mask[row, prompt:length] = 1
    input_ids[attention_mask == 0] = 0
    return input_ids, attention_mask, response_mask


def naive_sequence_logprobs(model, input_ids, attention_mask, response_mask):
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (logps * response_mask[:, 1:].to(logps.dtype)).sum(-1)


def gradients(model, value):
    model.zero_grad(set_to_none=True)
    value.backward()
    return [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


def max_difference(a, b):
    return (a.detach() - b.detach()).abs().max().item()


def force_fast_path(monkeypatch, postprocess=logprobs._unchanged):
    monkeypatch.setattr(logprobs, "verified_postprocessing", lambda model: postprocess)


def test_every_allow_listed_architecture_has_a_conformance_case():
    assert set(VERIFIED_ARCHITECTURES) == {name for name, _, path in CASES.values() if path == "fast"}


@pytest.mark.parametrize("model_type", list(CASES))
def test_matches_the_model_own_logits(model_type, monkeypatch):
    model = build(model_type)
    inputs = batch()
    weights = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    grad = model_type in GRADIENT_CASES
    with torch.set_grad_enabled(grad):
        expected = naive_sequence_logprobs(model, *inputs)
        actual = sequence_logprobs(model, *inputs, chunk_size=CHUNK)
    assert (verified_postprocessing(model) is not None) == (CASES[model_type][2] == "fast")
    assert actual.dtype == torch.float64 and expected.abs().min() > 1.0
    assert max_difference(actual, expected) < TOLERANCE
    if grad:
        expected_grads = gradients(model, (weights * expected).sum())
        actual_grads = gradients(model, (weights * actual).sum())
        assert len(actual_grads) == len(expected_grads) > 0
        for got, want in zip(actual_grads, expected_grads):
            torch.testing.assert_close(got, want, atol=TOLERANCE, rtol=TOLERANCE)

    # negative control: the fast path without the post-processing (if any) misses by far
    if VERIFIED_ARCHITECTURES.get(CASES[model_type][0]) is not logprobs._unchanged:
        force_fast_path(monkeypatch)
        with torch.no_grad():
            unprocessed = sequence_logprobs(model, *inputs, chunk_size=CHUNK)
        assert max_difference(unprocessed, expected) > 1e-2


def test_granite_without_its_division_fails_the_comparison(monkeypatch):
    model = build("granite")
    inputs = batch()
    with torch.no_grad():
        expected = naive_sequence_logprobs(model, *inputs)
        monkeypatch.setitem(VERIFIED_ARCHITECTURES, "GraniteForCausalLM", logprobs._unchanged)
        assert verified_postprocessing(model) is logprobs._unchanged
        unfixed = sequence_logprobs(model, *inputs, chunk_size=CHUNK)
    assert max_difference(unfixed, expected) > 1.0


class ScaledLogitsQwen2(transformers.Qwen2ForCausalLM):
    """Stands for remote code: a forward that changes the logits after the LM head."""

    def forward(self, *args, **kwargs):
        output = super().forward(*args, **kwargs)
        output.logits = output.logits * 3.0
        return output


def test_a_model_off_the_list_falls_back_to_its_own_logits(monkeypatch, capsys):
    monkeypatch.setattr(logprobs, "_noted_classes", set())  # whatever ran before, one note from here
    torch.manual_seed(0)
    model = perturbed(ScaledLogitsQwen2(AutoConfig.for_model("qwen2", **COMMON)))
    inputs = batch()
    assert verified_postprocessing(model) is None
    weights = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    expected = naive_sequence_logprobs(model, *inputs)
    expected_grads = gradients(model, (weights * expected).sum())
    actual = SequenceLogprobModule(model, chunk_size=CHUNK)(*inputs)  # as DDP/FSDP and the trainer call it
    actual_grads = gradients(model, (weights * actual).sum())
    assert max_difference(actual, expected) < TOLERANCE
    for got, want in zip(actual_grads, expected_grads):
        torch.testing.assert_close(got, want, atol=TOLERANCE, rtol=TOLERANCE)
    with torch.no_grad():
        sequence_logprobs(model, *inputs, chunk_size=CHUNK)
    notes = [line for line in capsys.readouterr().out.splitlines() if "log-probs:" in line]
    assert notes == ["[iris] log-probs: ScaledLogitsQwen2 is not in the verified list; using the model's own "
                     "logits (slower, more memory)"]

    force_fast_path(monkeypatch)  # what the fast path would have returned
    with torch.no_grad():
        assert max_difference(sequence_logprobs(model, *inputs, chunk_size=CHUNK), expected) > 1.0


def test_only_transformers_own_classes_are_verified():
    config = AutoConfig.for_model("qwen2", **COMMON)
    # remote code named like a verified class, and a plain subclass
    impostor = type("Qwen2ForCausalLM", (transformers.Qwen2ForCausalLM,), {"__module__": "transformers_modules.x.modeling"})
    assert verified_postprocessing(impostor(config)) is None
    assert verified_postprocessing(ScaledLogitsQwen2(config)) is None
    assert verified_postprocessing(transformers.Qwen2ForCausalLM(config)) is logprobs._unchanged


def test_fsdp2_keeps_the_fast_path():
    """fully_shard re-classes the model as FSDPQwen2ForCausalLM: still the verified architecture."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group yet")
    model = build("qwen2")
    inputs = batch()
    with torch.no_grad():
        expected = naive_sequence_logprobs(model, *inputs)
    with tempfile.TemporaryDirectory() as folder:
        dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=0, world_size=1)
        try:
            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
            assert type(model).__name__ == "FSDPQwen2ForCausalLM"
            assert verified_postprocessing(model) is logprobs._unchanged
            with torch.no_grad():
                actual = SequenceLogprobModule(model, chunk_size=CHUNK)(*inputs)
        finally:
            dist.destroy_process_group()
    assert max_difference(actual, expected) < TOLERANCE
