"""The prefixes `pipeline cache warm --job` sends: a job's system prompts and the prompt starts its
completion lines share, most shared first, and the token ids a worker warms for each (exactly the
ids the job's lines start with)."""

from __future__ import annotations

from jobs.kv_cache_host import prompt_tokens
from pipeline.job_prefixes import job_prefixes
from workers.tokenizer import ByteTokenizer

RULES = {"role": "system", "content": "Answer in one short sentence."}
STYLE = {"role": "system", "content": "Be polite."}


def _chat(*messages: dict) -> tuple[str, dict]:
    return "chat-key", {"messages": list(messages), "max_tokens": 4}


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def test_distinct_system_prompts_most_shared_first() -> None:
    bodies = [_chat(STYLE, _user("a")), _chat(RULES, _user("b")), _chat(RULES, _user("c")),
              _chat(RULES, STYLE, _user("d")), _chat(_user("no system prompt"))]
    found = job_prefixes(bodies, limit=10)
    assert found.lines_read == 5 and found.left_out == 0
    assert found.lines_sharing == [2, 1, 1]
    prefixes = [p["common_prefix_of"][0]["messages"] for p in found.prompts]
    assert prefixes == [[RULES], [STYLE], [RULES, STYLE]]  # two leading system messages are one prompt
    assert found.prompts[0]["common_prefix_of"][1] == {"messages": [RULES, _user("b")]}  # a whole line as sample


def test_completion_lines_share_the_start_of_their_prefix_key_group() -> None:
    shared = "Translate into French, keeping the tone: "
    bodies = [("k1", {"prompt": shared + "good morning"}), ("k1", {"prompt": shared + "good night"}),
              ("k1", {"prompt": shared + "thank you"}), ("k2", {"prompt": "A lone prompt nobody else starts with"}),
              ("k3", {"prompt": "Hi there"}), ("k3", {"prompt": "Hi you"})]  # shares 3 characters: too short
    found = job_prefixes(bodies, limit=10)
    assert found.lines_sharing == [3]
    assert found.prompts == [{"common_prefix_of": [{"prompt": shared}, {"prompt": shared + "good morning"}]}]


def test_the_limit_keeps_the_most_shared_and_counts_the_rest() -> None:
    bodies = [_chat({"role": "system", "content": f"rule {i}"}, _user("q")) for i in range(5) for _ in range(i + 1)]
    found = job_prefixes(bodies, limit=2)
    assert found.lines_sharing == [5, 4] and found.left_out == 3
    assert [p["common_prefix_of"][0]["messages"][0]["content"] for p in found.prompts] == ["rule 4", "rule 3"]


def test_a_warmed_system_prompt_is_exactly_the_start_of_its_lines() -> None:
    tokenizer = ByteTokenizer()
    found = job_prefixes([_chat(RULES, _user("What is a cache?")), _chat(RULES, _user("And a block?"))], limit=1)
    warmed = prompt_tokens(found.prompts[0], tokenizer)
    alone = tokenizer.encode_chat([RULES])  # ends with the assistant header the lines do not have there
    for _, body in (_chat(RULES, _user("What is a cache?")), _chat(RULES, _user("And a block?"))):
        line = tokenizer.encode_chat(body["messages"])
        assert line[:len(warmed)] == warmed
    assert warmed == alone[:len(warmed)] and len(warmed) < len(alone)
    assert tokenizer.decode(warmed) == f"<|system|>\n{RULES['content']}\n<|"  # up to where the roles differ
