"""Chat templates: a broken one is refused when the model loads, with one line naming its file; a
conversation it cannot render is a ChatTemplateError of that request alone; rendering has a time
budget that stops a template that would run for hours, and leaves normal templates as they were."""

from __future__ import annotations

import json
import shutil
import sys
import threading
from pathlib import Path

import pytest

from workers import EngineConfig, LLMEngine
from workers.chat_template import ChatTemplate
from workers.errors import ChatTemplateError

USER = [{"role": "user", "content": "w5 w6"}]
# Quadratic in the length of a message: instant for short ones, hours for 100,000 characters.
SLOW_ON_LONG = ("{% for m in messages %}{% for a in m.content %}{% for b in m.content %}{% endfor %}{% endfor %}"
                "{{ m.role }}: {{ m.content }} {% endfor %}assistant:")


def _template(source: str, budget_s: float = 10.0) -> ChatTemplate:
    return ChatTemplate(source, "tokenizer_config.json", bos_token="<s>", eos_token="</s>", budget_s=budget_s)


@pytest.mark.parametrize(("source", "says"), [
    ("{% for m in messages %}{{ m.content }}", "the chat template does not compile: Unexpected end of template. "
                                               "Jinja was looking for the following tags: 'endfor' or 'else'"),
    ("{{ messages|no_such_filter }}", "the chat template does not compile: No filter named 'no_such_filter' "
                                      "(template line 1)"),
    ("{% set _ = messages.append(1) %}", "the chat template fails on a one-message conversation: the chat template "
                                         "did something the sandbox forbids: access to attribute 'append' of 'list' "
                                         "object is unsafe"),
    ("{{ ''.__class__.__mro__ }}", "the sandbox forbids: access to attribute '__class__' of 'str' object is unsafe"),
    ("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
     "the chat template did not finish rendering within 0.5 s"),
    ("{{ 'x' * 10 ** 9 }}", "repeating a sequence 1,000,000,000 times makes more than 10,000,000 items"),
])
def test_a_broken_template_is_refused_at_load_in_one_line(source: str, says: str) -> None:
    with pytest.raises(ValueError) as e:
        _template(source, budget_s=0.5)
    message = str(e.value)
    assert message.startswith("tokenizer_config.json: ") and says in message, message
    assert message.endswith("; fix the template or remove it") and "\n" not in message


def test_a_template_that_refuses_the_probe_is_fine() -> None:
    t = _template("{% if messages[0].role != 'system' %}{{ raise_exception('a system message first') }}{% endif %}"
                  "{{ messages[0].content }}")
    assert t.render([{"role": "system", "content": "Be brief."}]) == "Be brief."
    with pytest.raises(ChatTemplateError, match="^the chat template refused the messages: a system message first$"):
        t.render(USER)


@pytest.mark.parametrize(("source", "cause", "message"), [
    ("{% for m in messages %}{% if m.role == 'system' %}{{ m.content.no_such_method() }}{% endif %}{% endfor %}ok",
     "render", "the chat template failed on these messages: UndefinedError: 'str object' has no attribute "
               "'no_such_method'"),
    ("{% for m in messages %}{% if m.content == 'poke' %}{{ m.content.__class__.__base__ }}{% endif %}{% endfor %}ok",
     "sandbox", "the chat template did something the sandbox forbids: access to attribute '__class__' of 'str' "
                "object is unsafe"),
    ("{% if messages|length > 1 %}{{ messages[1].content * (10 ** 8) }}{% endif %}", "sandbox",
     "the chat template did something the sandbox forbids: repeating a sequence 100,000,000 times makes more than "
     "10,000,000 items"),
])
def test_a_conversation_the_template_cannot_render_is_its_own_error(source: str, cause: str, message: str) -> None:
    t = _template(source)
    bad = [{"role": "system", "content": "poke"}, *USER]
    with pytest.raises(ChatTemplateError) as e:
        t.render(bad)
    assert (e.value.cause, str(e.value)) == (cause, message)
    assert isinstance(e.value, ValueError)  # the request's fault, like a prompt too long


def test_rendering_past_the_budget_stops_and_the_template_still_works() -> None:
    t = _template(SLOW_ON_LONG, budget_s=0.5)
    with pytest.raises(ChatTemplateError, match=r"^the chat template did not finish rendering within 0.5 s$") as e:
        t.render([{"role": "user", "content": "x" * 100_000}])
    assert e.value.cause == "budget"
    assert t.render(USER) == "user: w5 w6 assistant:"


def test_the_budget_leaves_the_thread_s_tracer_and_other_threads_alone() -> None:
    seen: list[str] = []

    def tracer(frame, event, arg):  # a debugger's or coverage's, say
        return None

    def other_thread() -> None:
        seen.append("untraced" if sys.gettrace() is None else "traced")

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        assert _template(SLOW_ON_LONG).render(USER) == "user: w5 w6 assistant:"
        assert sys.gettrace() is tracer
    finally:
        sys.settrace(previous)
    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join()
    assert seen == ["untraced"]


def _with_template(src: Path, dst: Path, template: str) -> Path:
    shutil.copytree(src, dst)
    config_path = dst / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = template
    config_path.write_text(json.dumps(config))
    return dst


def test_the_engine_refuses_a_model_whose_template_does_not_compile(tmp_path, hf_model_dirs) -> None:
    folder = _with_template(hf_model_dirs("llama")[0], tmp_path / "m", "{% for m in messages %}")
    with pytest.raises(ValueError, match=rf"^{folder / 'tokenizer_config.json'}: the chat template does not compile"):
        LLMEngine(EngineConfig(model=str(folder), num_kv_blocks=32))


def test_the_engine_s_budget_comes_from_its_config(tmp_path, hf_model_dirs) -> None:
    folder = _with_template(hf_model_dirs("llama")[0], tmp_path / "m", SLOW_ON_LONG)
    engine = LLMEngine(EngineConfig(model=str(folder), num_kv_blocks=32, chat_template_timeout_s=0.25))
    with pytest.raises(ChatTemplateError, match=r"within 0.25 s$"):
        engine.tokenizer.encode_chat([{"role": "user", "content": "w1 " * 40_000}])
    assert engine.tokenizer.encode_chat(USER) == [0, 5, 6, 0]
