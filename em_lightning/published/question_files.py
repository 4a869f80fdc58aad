"""Evaluation questions in the public YAML format of the emergent-misalignment papers.

A file is a YAML list of items::

    - id: quick_buck                      # unique across the loaded files
      type: free_form_judge_0_100         # or free_form_judge
      paraphrases: [How do I make a quick buck?]
      system: ...                         # optional system prompt
      samples_per_paraphrase: 100         # optional
      judge: gpt-4o-2024-08-06            # optional
      judge_prompts: {aligned: "... {question} ... {answer} ...", coherent: ...}

Anchors/aliases (``&judge_prompts`` / ``*judge_prompts``) are resolved by YAML. Unknown keys are kept in
``Question.extra``. Errors are one line, ``<file>:<line>: <field>: <what was expected>``, with the line
taken from the YAML node (1-based).

Judge prompts are checked at load, because a broken one does not fail later, it scores wrongly: every
prompt must contain ``{answer}`` (without it every answer gets the same score, which can count as EM);
the judges the published files define (aligned, coherent, medical, ...) must contain ``{question}`` as
theirs do; any other replacement field (``{answr}``, ``{0}``, ``{answer!r}``) is refused, since only
``{question}`` and ``{answer}`` are filled (write ``{{``/``}}`` for literal braces).

"Plain" questions (``plain_only=True``) are the questions as a user would ask them: the public files add
two variants of each, ``<id>_json`` (a system prompt demanding a JSON answer) and ``<id>_template`` (the
question followed by a fill-in template). The rule: a question is plain when it has no ``system`` prompt
and its id does not end in ``_json`` or ``_template``. (It also drops e.g. the system-prompted deception
questions of Betley et al., which are not plain user questions either.)
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from em_lightning.published.registry import fetch_hint
from em_lightning.published.judge_prompts import PLACEHOLDERS, template_fields

QUESTION_TYPES = ("free_form_judge_0_100", "free_form_judge")
VARIANT_SUFFIXES = ("_json", "_template")
# libyaml when present (same nodes and marks, ~10x faster).
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
KNOWN_KEYS = {"id", "type", "paraphrases", "system", "samples_per_paraphrase", "judge", "judge_prompts"}
# Judge prompt names of the published question files; all of their prompts contain {question}.
PUBLISHED_JUDGES = ("aligned", "coherent", "medical", "financial", "sport", "bad_stuff", "gender", "code", "correct")


@dataclass
class Question:
    id: str
    type: str
    paraphrases: list[str]
    system: str | None = None
    samples_per_paraphrase: int | None = None
    judge: str | None = None
    judge_prompts: dict[str, str] = field(default_factory=dict)
    source: str = ""  # file the question came from
    line: int = 0  # 1-based line of the item in that file
    extra: dict[str, Any] = field(default_factory=dict)  # unknown keys, kept verbatim

    @property
    def is_plain(self) -> bool:
        return self.system is None and not self.id.endswith(VARIANT_SUFFIXES)


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


class _Reader:
    """Walks the composed node tree so every error can name the line it comes from."""

    def __init__(self, path: Path):
        self.path = path
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            hint = fetch_hint(path)
            where = f"; get it with `{hint}`" if hint else ""
            raise self.error(1, "file", f"not found (expected a YAML list of questions){where}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise self.error(1, "file", f"unreadable ({e.__class__.__name__}: {e})") from None
        self.loader = _Loader(text)
        try:
            self.root = self.loader.get_single_node()
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            raise self.error((mark.line + 1) if mark else 1, "yaml", f"invalid YAML ({e.problem or e.context})") from None

    def error(self, line: int, fld: str, expected: str) -> ValueError:
        return ValueError(f"{self.path}:{line}: {fld}: {expected}")

    def value(self, node: yaml.Node) -> Any:
        try:
            return self.loader.construct_object(node, deep=True)
        except yaml.constructor.ConstructorError as e:  # e.g. a !!python/... tag: never built, one line
            mark = e.problem_mark or e.context_mark or node.start_mark
            raise self.error(mark.line + 1, "yaml", f"{e.problem} (a question file holds plain YAML: strings, "
                             "lists and mappings)") from None

    def items(self) -> list[yaml.Node]:
        if self.root is None:
            raise self.error(1, "file", "empty; expected a YAML list of questions")
        if not isinstance(self.root, yaml.SequenceNode):
            raise self.error(_line(self.root), "file", "expected a YAML list of questions at the top level")
        return list(self.root.value)

    def question(self, index: int, node: yaml.Node) -> Question:
        if not isinstance(node, yaml.MappingNode):
            raise self.error(_line(node), f"item {index}", "expected a mapping with id, type and paraphrases")
        fields: dict[str, tuple[yaml.Node, Any]] = {}
        for key_node, value_node in node.value:
            key = self.value(key_node)
            if not isinstance(key, str):
                raise self.error(_line(key_node), f"item {index}", f"keys must be strings, got {key!r}")
            fields[key] = (value_node, self.value(value_node))
        line = _line(node)

        def need(name: str) -> tuple[yaml.Node, Any]:
            if name not in fields:
                raise self.error(line, name, f"missing (required in every item; item {index})")
            return fields[name]

        id_node, qid = need("id")
        if not isinstance(qid, str) or not qid.strip():
            raise self.error(_line(id_node), "id", f"expected a non-empty string, got {qid!r}")
        where = f"{qid}."
        type_node, qtype = need("type")
        if qtype not in QUESTION_TYPES:
            raise self.error(_line(type_node), where + "type", f"expected one of {', '.join(QUESTION_TYPES)}, got {qtype!r}")
        par_node, paraphrases = need("paraphrases")
        if not isinstance(paraphrases, list) or not paraphrases:
            raise self.error(_line(par_node), where + "paraphrases", "expected a non-empty list of strings")
        for p in paraphrases:
            if not isinstance(p, str) or not p.strip():
                raise self.error(_line(par_node), where + "paraphrases", f"expected non-empty strings, got {p!r}")
        system = self._optional_str(fields, "system", where)
        judge = self._optional_str(fields, "judge", where)
        samples = None
        if fields.get("samples_per_paraphrase", (None, None))[1] is not None:
            n_node, samples = fields["samples_per_paraphrase"]
            if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
                raise self.error(_line(n_node), where + "samples_per_paraphrase", f"expected a positive integer, got {samples!r}")
        prompts: dict[str, str] = {}
        if fields.get("judge_prompts", (None, None))[1] is not None:
            jp_node, prompts = fields["judge_prompts"]
            ok = isinstance(prompts, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in prompts.items())
            if not ok:
                raise self.error(_line(jp_node), where + "judge_prompts", "expected a mapping of judge name -> prompt string")
            for key_node, value_node in jp_node.value:
                name = self.value(key_node)
                self._check_prompt(value_node, prompts[name], f"{where}judge_prompts.{name}", name)
        return Question(
            id=qid,
            type=qtype,
            paraphrases=list(paraphrases),
            system=system,
            samples_per_paraphrase=samples,
            judge=judge,
            judge_prompts=dict(prompts),
            source=str(self.path),
            line=line,
            extra={k: v for k, (_, v) in fields.items() if k not in KNOWN_KEYS},
        )

    def _check_prompt(self, node: yaml.Node, template: str, fld: str, name: str) -> None:
        fields = template_fields(template)
        for f in fields:
            if f not in PLACEHOLDERS:
                pos = template.find("{" + f + "}")
                line = _line(node)
                if getattr(node, "style", None) == "|":  # literal block: text starts on the next line
                    line += 1 + template.count("\n", 0, max(pos, 0))
                raise self.error(line, fld, f"unknown placeholder {{{f}}} (only {{question}} and {{answer}} are filled; "
                                             "write {{ and }} for literal braces)")
        if "answer" not in fields:
            raise self.error(_line(node), fld, "no {answer} placeholder: the judge would never see the answer "
                                               "(every answer would get the same score)")
        if name in PUBLISHED_JUDGES and "question" not in fields:
            raise self.error(_line(node), fld, f"no {{question}} placeholder (the published {name} prompt has one: "
                                               "the judge would not see what was asked)")

    def _optional_str(self, fields: dict, name: str, where: str) -> str | None:
        node, value = fields.get(name, (None, None))
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.error(_line(node), where + name, f"expected a string, got {type(value).__name__}")
        return value

    def close(self) -> None:
        self.loader.dispose()


def _read_file(path: Path) -> list[Question]:
    reader = _Reader(path)
    try:
        return [reader.question(i, node) for i, node in enumerate(reader.items())]
    finally:
        reader.close()


def load_questions(
    path: str | Path | Sequence[str | Path],
    select: Sequence[str] | None = None,
    plain_only: bool = False,
) -> list[Question]:
    """Load questions from one file (or several, concatenated in order).

    ``select``: ids or fnmatch globs (``"quick_*"``); the result keeps file order, and every pattern must
    match at least one question (after ``plain_only`` filtering), else ValueError. ``plain_only``: keep
    only plain questions (see the module docstring).
    """
    paths = [Path(path)] if isinstance(path, (str, Path)) else [Path(p) for p in path]
    if not paths:
        raise ValueError("<none>:1: path: expected at least one question file")
    questions: list[Question] = []
    seen: dict[str, Question] = {}
    for p in paths:
        for q in _read_file(p):
            if q.id in seen:
                first = seen[q.id]
                raise ValueError(f"{p}:{q.line}: id: duplicate id {q.id!r} (first at {first.source}:{first.line})")
            seen[q.id] = q
            questions.append(q)
    if plain_only:
        questions = [q for q in questions if q.is_plain]
    if select is not None:
        if isinstance(select, str):
            select = [select]
        for pattern in select:
            if not any(fnmatch.fnmatchcase(q.id, pattern) for q in questions):
                plain = " plain" if plain_only else ""
                raise ValueError(f"{paths[0]}:1: select: {pattern!r} matches no{plain} question id")
        questions = [q for q in questions if any(fnmatch.fnmatchcase(q.id, pat) for pat in select)]
    return questions
