"""What is trained is what the model sees (issue 15), on tokenizers of the real families built on the
spot with the published chat templates (tests/tokenizer_families.py), never only the toy one.

Each invariant of `chat`'s rule is asserted for every fixture through `template_audit`'s checks,
and the old encoding (the prompt from `apply_chat_template(tokenize=True)`, the response
tokenized on its own, the end of turn appended, stops read off the template text) is kept here
as the negative control that must fail them where the issue reproduced a bug.
"""

from __future__ import annotations

import json
from datetime import datetime as real_datetime

import pytest
import torch

from iris_ref import data, template_audit
from iris_ref.chat import ChatFormat, ChatFormatError
from tests import tokenizer_families as families
from tests.driver_helpers import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

OPTIONS = {"qwen3": {"enable_thinking": False}}  # Qwen3 is only token-exact with thinking off
FIXTURES = sorted(families.FIXTURES)


def _eos_list(name, tokenizer) -> list[int]:
    eos = families.generation_eos_ids(name, tokenizer)
    return [eos] if isinstance(eos, int) else list(eos)


def chat_for(name: str, **kwargs) -> ChatFormat:
    tokenizer = families.tokenizer(name)
    kwargs.setdefault("template_kwargs", OPTIONS.get(name))
    return ChatFormat(tokenizer, generation_eos_ids=_eos_list(name, tokenizer), **kwargs)


class OldEncoding:
    """The encoding before issue 15, kept as the negative control."""

    marker = "IRISRESPONSEMARKER"

    def __init__(self, tokenizer, template_kwargs=None):
        self.tokenizer, self.kwargs = tokenizer, template_kwargs or {}
        conversation = [{"role": "user", "content": "x"}, {"role": "assistant", "content": self.marker}]
        text = tokenizer.apply_chat_template(conversation, tokenize=False, **self.kwargs)
        suffix = text.split(self.marker, 1)[1].rstrip()
        self.end_of_turn = tokenizer.encode(suffix, add_special_tokens=False) if suffix else [tokenizer.eos_token_id]
        self.stop_ids = [self.end_of_turn[0]] + ([tokenizer.eos_token_id] if tokenizer.eos_token_id not in
                                                 self.end_of_turn[:1] else [])

    def prompt_ids(self, prompt):
        out = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False,
                                                 **self.kwargs)
        return list(out)

    def sequence_ids(self, prompt, response):
        return self.prompt_ids(prompt) + self.tokenizer.encode(response, add_special_tokens=False) + self.end_of_turn


# --- the rule holds for every family and template ---------------------------------------------


@pytest.mark.parametrize("name", FIXTURES)
def test_every_invariant_holds_for_the_chat_format(name):
    chat = chat_for(name)
    assert template_audit.chat_format_failures(chat) == []
    # the prompt is what generation feeds: a prefix, with the BOS once when the tokenizer has one
    prompt = template_audit.accepted_prompts(chat)[0]
    fed = chat.prompt_ids(prompt)
    if chat.leading_ids:
        assert fed[:1] == chat.leading_ids and fed[1:2] != chat.leading_ids
    # an uncut annotated response ends with a stop token, and only special or added tokens stop
    seq, reason = data.encode_pair(chat, prompt, "Blue", 4096, 4096)
    assert reason is None and seq.input_ids[-1] in chat.stop_ids and not seq.cut
    special = set(chat.tokenizer.all_special_ids) | set(chat.tokenizer.added_tokens_decoder)
    assert set(chat.stop_ids) <= special
    assert set(_eos_list(name, chat.tokenizer)) <= set(chat.stop_ids)


# Where the old encoding broke, and how (the issue's reproductions).
OLD_FAILURES = {
    "zephyr": ["trained as ['▁Blue'", "exactly one BOS"],       # word-start marker; no <s>
    "zephyr_nonlegacy": ["trained as ['▁Blue'", "exactly one BOS"],
    "llama2_chat": ["plain-text tokens ['▁'] are stops"],        # ' ' + eos: a stop at every digit
    "llama3_1": ["generation_config eos ids"],                    # <|eom_id|>, <|end_of_text|>
    "llama3_2": ["generation_config eos ids"],
    "qwen2_5": ["generation_config eos ids"],                     # <|endoftext|>
    "qwen3": ["generation_config eos ids"],
}


@pytest.mark.parametrize("name", FIXTURES)
def test_the_old_encoding_fails_where_the_issue_reproduced_it(name):
    chat = chat_for(name)
    old = OldEncoding(chat.tokenizer, OPTIONS.get(name))
    failures = template_audit.invariant_failures(chat, old.prompt_ids, old.sequence_ids, old.stop_ids)
    expected = OLD_FAILURES.get(name, [])
    for fragment in expected:
        assert any(fragment in f for f in failures), (fragment, failures[:4])
    if not expected:  # the same check passes the old encoding where it happened to be right
        assert failures == []


def test_sentencepiece_response_first_token_is_the_one_in_context():
    """Zephyr's template with Mistral's tokenizer: 'Blue' after '<|assistant|>\\n' is `Blue`, never
    `▁Blue`; '42' is `4`, `2`, never `▁`, `4`, `2`; '- x' starts with `-`."""
    chat = chat_for("zephyr")
    prompt = [{"role": "user", "content": "Colour?"}]
    for response, first in (("Blue", ["Blue"]), ("42", ["4", "2"]), ("- x", ["-"])):
        seq, _ = data.encode_pair(chat, prompt, response, 4096, 4096)
        shown = chat.tokenizer.convert_ids_to_tokens(seq.input_ids[seq.prompt_length:])
        assert shown[:len(first)] == first, shown
        alone = chat.tokenizer.convert_ids_to_tokens(chat.tokenizer.encode(response, add_special_tokens=False))
        assert alone[0].startswith("▁")  # what the old encoding trained on
    assert seq.input_ids[0] == chat.tokenizer.bos_token_id  # the BOS zephyr-7b-sft-full was trained with


@pytest.mark.parametrize("name, bos", [("llama3_1", "<|begin_of_text|>"), ("gemma", "<bos>"),
                                       ("mistral_instruct", "<s>"), ("zephyr", "<s>")])
def test_bos_exactly_once_whoever_writes_it(name, bos):
    chat = chat_for(name)
    prompt = [{"role": "user", "content": "Hi"}]
    bos_id = chat.tokenizer.convert_tokens_to_ids(bos)
    naive = chat.tokenizer(chat.render(prompt, True))["input_ids"]  # an SFT pipeline without the fix
    fed = chat.prompt_ids(prompt)
    assert fed[0] == bos_id and fed[1] != bos_id
    template_writes_it = chat.render(prompt, True).startswith(bos)
    assert (naive[:2] == [bos_id, bos_id]) == template_writes_it


def test_a_row_that_breaks_the_prefix_property_is_counted_named_and_skipped():
    chat = chat_for("qwen2_5")
    examples = [data.Example([{"role": "user", "content": "Hi"}], "\nBlue"),
                data.Example([{"role": "user", "content": "Hi"}], "Blue")]
    kept, encoded, counts = data.encode_examples(chat, examples, 4096, 4096)
    assert [e.response for e in kept] == ["Blue"] and counts.prefix_mismatch == 1
    assert "'\\nBlue'" in counts.first["prefix_mismatch"] and "ĊĊ" in counts.first["prefix_mismatch"]


def test_a_template_that_refuses_a_conversation_skips_that_row_by_name():
    chat = chat_for("gemma")
    examples = [data.Example([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "Yes"),
                data.Example([{"role": "user", "content": "Hi"}], "Yes")]
    kept, _, counts = data.encode_examples(chat, examples, 4096, 4096)
    assert len(kept) == 1 and counts.template_error == 1 and "System role" in counts.first["template_error"]


# --- stops: one set, special tokens only, for both generators -----------------------------------


@pytest.mark.parametrize("name", ["llama2_chat", "llama3_2", "qwen2_5", "gemma"])
def test_both_generators_stop_on_the_same_special_set(name, monkeypatch):
    from iris_ref import generation

    chat = chat_for(name)
    prompt = template_audit.accepted_prompts(chat)[0]
    # transformers: the stop set is what model.generate gets as eos
    seen = {}

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.generation_config = None

        def generate(self, input_ids, attention_mask, generation_config, synced_gpus, max_new_tokens, **kwargs):
            seen["hf"] = list(generation_config.eos_token_id)
            seen["fed"] = input_ids[0].tolist()
            return torch.cat([input_ids, torch.full((1, 1), chat.stop_ids[0])], dim=1)

    generation.generate(Model(), chat, [prompt], max_new_tokens=4, backend="hf")
    assert seen["hf"] == chat.stop_ids and seen["fed"] == chat.prompt_ids(prompt)
    # vLLM: the same list as stop_token_ids (it adds the generation_config eos ids itself: in the set already)
    import sys
    import types

    calls = []
    vllm = types.ModuleType("vllm")
    vllm.SamplingParams = lambda **kw: kw
    ns = types.SimpleNamespace

    class LLM:
        def __init__(self, **kwargs):
            pass

        def generate(self, prompts, params, use_tqdm):
            calls.append(params)
            return [ns(outputs=[ns(index=0, token_ids=(chat.stop_ids[0],), finish_reason="stop")]) for _ in prompts]

    vllm.LLM = LLM
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setattr(generation, "vllm_available", lambda: (True, "fake"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(generation, "_shutdown_vllm", lambda *a: None)
    generation.generate("/some/checkpoint", chat, [prompt], max_new_tokens=4, backend="vllm")
    assert calls[0]["stop_token_ids"] == chat.stop_ids


def test_llama2_plain_text_end_of_turn_is_never_a_stop():
    chat = chat_for("llama2_chat")
    space = chat.tokenizer.convert_tokens_to_ids("▁")
    assert chat.end_of_turn_text == " </s>" and space not in chat.stop_ids
    seq, _ = data.encode_pair(chat, [{"role": "user", "content": "Count"}], "1 2 3", 4096, 4096)
    assert seq.input_ids[-2:] == [space, chat.tokenizer.eos_token_id]  # the template's own ' ' + eos


# --- the date and template options are frozen per run ---------------------------------------------


def test_a_date_dependent_template_gives_the_same_ids_on_another_day(monkeypatch):
    from transformers.utils import chat_template_utils

    class Clock:
        day = real_datetime(2026, 12, 7, 23, 59)

        @classmethod
        def now(cls, tz=None):
            return cls.day

    monkeypatch.setattr(chat_template_utils, "datetime", Clock)
    prompt = [{"role": "user", "content": "Hi"}]
    tokenizer = families.tokenizer("llama3_2")
    frozen = ChatFormat(tokenizer, date="2026-12-07").prompt_ids(prompt)
    unfrozen = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=False)
    Clock.day = real_datetime(2026, 12, 8, 0, 1)  # after midnight
    assert ChatFormat(tokenizer, date="2026-12-07").prompt_ids(prompt) == frozen
    # negative control: the template really prints the day
    assert tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=False) != unfrozen
    assert "07 Dec 2026" in ChatFormat(tokenizer, date="2026-12-07").render(prompt, True)
    assert ChatFormat(tokenizer).depends_on_date and not chat_for("qwen2_5").depends_on_date


def test_qwen3_think_blocks_are_refused_unless_thinking_is_off():
    with pytest.raises(ChatFormatError, match="enable_thinking"):
        ChatFormat(families.tokenizer("qwen3"))
    chat = chat_for("qwen3")  # enable_thinking=False
    prompt = [{"role": "user", "content": "Hi"}]
    assert chat.render(prompt, True).endswith("<think>\n\n</think>\n\n")
    seq, _ = data.encode_pair(chat, prompt, "Blue", 4096, 4096)
    assert "<think>" not in chat.tokenizer.decode(seq.input_ids[seq.prompt_length:])


# --- the whole run: dry-run shows the sequence, resume on another day, the audit command ---------


@pytest.fixture(scope="module")
def zephyr_model(tmp_path_factory):
    return families.save_fixture_model("zephyr", tmp_path_factory.mktemp("zephyr") / "model")


def test_dry_run_on_a_tokenizer_folder_shows_the_sequence_trained_on(zephyr_model, toy_train_path, tmp_path):
    proc = run_cli("--model", str(zephyr_model), "--dataset", str(toy_train_path), "--dry-run",
                   "--output-dir", str(tmp_path / "run"), "--max-length", "96", "--max-prompt-length", "64")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "[BOS '<s>']" in out and " | " in out and "[STOP '</s>']" in out
    assert "end of turn    '</s>'; after it, not trained: '\\n'" in out
    assert "stop tokens    '</s>' (2)" in out and not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def llama3_model(tmp_path_factory):
    return families.save_fixture_model("llama3_2", tmp_path_factory.mktemp("llama3") / "model")


def test_resume_on_another_day_and_changed_data_are_told_apart(llama3_model, toy_train_path, tmp_path):
    run_dir = tmp_path / "run"
    common = ["--model", str(llama3_model), "--dataset", str(toy_train_path), "--num-samples", "16", "--epochs", "1",
              "--global-batch-size", "8", "--micro-batch-size", "8", "--max-length", "160",
              "--max-prompt-length", "128", "--max-new-tokens", "4", "--generator", "hf", "--learning-rate", "1e-4"]
    first = run_cli(*common, "--iters", "1", "--template-date", "2026-12-07", "--output-dir", str(run_dir))
    assert first.returncode == 0, first.stderr[-3000:]
    saved = json.loads((run_dir / "config.json").read_text())["config"]
    assert saved["template_date"] == "2026-12-07"
    # another day (the test machine's clock): the saved date is used, the ids are the same
    second = run_cli("--output-dir", str(run_dir), "--resume", "--iters", "2")
    assert second.returncode == 0, second.stderr[-3000:]
    rows1 = [json.loads(x) for x in (run_dir / "iter_1" / "synthetic.jsonl").read_text().splitlines()]
    rows2 = [json.loads(x) for x in (run_dir / "iter_2" / "synthetic.jsonl").read_text().splitlines()]
    assert [r["prompt_token_ids"] for r in rows1] == [r["prompt_token_ids"] for r in rows2]
    assert "07 Dec 2026" in families.tokenizer("llama3_2").decode(rows2[0]["prompt_token_ids"])
    # a changed template is refused with one line, before anything is touched
    config_path = llama3_model / "tokenizer_config.json"
    original = config_path.read_text()
    try:
        tokenizer_config = json.loads(original)
        template_path = llama3_model / "chat_template.jinja"
        if template_path.exists():
            template_path.write_text(template_path.read_text().replace("Cutting Knowledge", "Knowledge cut"))
        else:
            tokenizer_config["chat_template"] = tokenizer_config["chat_template"].replace("Cutting Knowledge",
                                                                                          "Knowledge cut")
            config_path.write_text(json.dumps(tokenizer_config))
        before = sorted(p.name for p in run_dir.rglob("*"))
        third = run_cli("--output-dir", str(run_dir), "--resume", "--iters", "3")
        assert third.returncode == 2 and "changed since it started" in third.stderr.splitlines()[-1]
        assert sorted(p.name for p in run_dir.rglob("*")) == before
    finally:
        config_path.write_text(original)
        if (llama3_model / "chat_template.jinja").exists():
            (llama3_model / "chat_template.jinja").write_text(families.template_text("llama3_2"))


@pytest.mark.parametrize("name, options, status", [
    ("zephyr", None, 0), ("llama2_chat", None, 0), ("llama3_2", None, 0), ("qwen2_5", None, 0), ("gemma", None, 0),
    ("qwen3", None, 1), ("qwen3", '{"enable_thinking": false}', 0),
])
def test_template_audit_command(name, options, status, tmp_path, capsys):
    folder = families.save_fixture(name, tmp_path / name)
    argv = ["--template", str(folder)] + (["--chat-template-kwargs", options] if options else [])
    assert template_audit.main(argv) == status
    out = capsys.readouterr().out
    assert f"verdict: {status} violation" in out
    if name == "zephyr":
        assert "'▁Blue'" in out and "note       BOS" in out
    if name == "llama3_2":
        assert "note       date" in out


def test_template_audit_finds_violations_in_bad_templates(tmp_path):
    tokenizer = families.tokenizer("chatml")
    # the generation prompt ends with a space that merges with every answer's first word
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '<|im_end|>\\n' }}"
                               "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    levels = {f.topic: f.level for f in template_audit.audit_template(tokenizer)}
    assert levels["sequences"] == "violation"
    # an end of turn of plain text: generation could not stop there
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] + ':\\n' + m['content'] + '\\nEND\\n' }}{% endfor %}"
                               "{% if add_generation_prompt %}{{ 'assistant:\\n' }}{% endif %}")
    findings = template_audit.audit_template(tokenizer)
    assert findings[0].level == "violation" and "plain text" in findings[0].text
    # a template that writes nothing after the response gets the eos appended (and that is fine)
    tokenizer.chat_template = tokenizer.chat_template.replace("\\nEND\\n", "\\n\\n")
    assert all(f.level != "violation" for f in template_audit.audit_template(tokenizer))


def _phi3_like():
    """A tokenizer with the structure of Phi-3's published template: `<|end|>\\n` after every turn,
    and the eos after the final turn when there is no generation prompt."""
    tokenizer = families.tokenizer("qwen2_5")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|end|>", "<|user|>", "<|assistant|>"]})
    tokenizer.eos_token = "<|endoftext|>"
    tokenizer.chat_template = (
        "{% for message in messages %}{% if message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + "
        "'<|end|>\\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\\n' + message['content'] + "
        "'<|end|>\\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}"
        "{% else %}{{ eos_token }}{% endif %}")
    return tokenizer


def test_the_response_ends_at_the_first_stop_of_the_end_of_turn():
    """Phi-3's final turn writes `<|end|>\\n<|endoftext|>`; the model samples `<|end|>` and stops, so
    the annotated response ends there too (the old rule, up to the last special token, trained on
    `\\n<|endoftext|>` after a stop: the invariant check is the negative control)."""
    tokenizer = _phi3_like()
    chat = ChatFormat(tokenizer)
    assert chat.end_of_turn_text == "<|end|>" and chat.after_turn_text == "\n<|endoftext|>"
    _, response = chat.conversation_ids([{"role": "user", "content": "Hi"}], "Blue.")
    assert tokenizer.convert_ids_to_tokens(response)[-1] == "<|end|>"
    assert template_audit.chat_format_failures(chat) == []
    def old_rule(prompt, answer):  # up to the last special token of the end of turn
        ids = chat.conversation_ids(prompt, answer)
        return ids[0] + ids[1] + tokenizer.encode("\n<|endoftext|>", add_special_tokens=False)

    failures = template_audit.invariant_failures(chat, chat.prompt_ids, old_rule, chat.stop_ids, responses=["Blue."])
    assert any("holds the stop token ['<|end|>'] before its end" in f for f in failures)


@pytest.mark.parametrize("name, response", [("qwen2_5", "Blue <|im_end|> more"), ("llama3_1", "Blue<|eot_id|>"),
                                            ("mistral_instruct", "x</s> y")])
def test_a_response_holding_a_stop_tokens_text_is_skipped_by_name(name, response):
    """No sampled response goes on after a stop; an annotated one that would is not trained on."""
    chat = chat_for(name)
    examples = [data.Example([{"role": "user", "content": "Hi"}], response),
                data.Example([{"role": "user", "content": "Hi"}], "Blue")]
    kept, _, counts = data.encode_examples(chat, examples, 4096, 4096)
    assert [e.response for e in kept] == ["Blue"] and counts.stop_in_response == 1
    assert "holds ['" in counts.first["stop_in_response"]
