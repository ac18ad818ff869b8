"""Pipelines: parse `--passes` strings and JSON pipeline files, add prerequisites, check the order.

Syntax: passes separated by commas, each `name` or `name(key=value,...)`, e.g.
`slice(sparsity=0.25),quant4(block=32,algo=gptq)`; whitespace and line breaks between passes are ignored (a long
pipeline can be written over several lines in a shell script). A JSON pipeline file holds a list whose items are
either such strings or objects `{"name": ..., "options": {...}}` (or `{"passes": [...]}` around it).
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any, Iterable

from modelsurgeon.errors import UserError
from modelsurgeon.pass_api import Pass, Stage, get_pass, registered_passes

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_\-]*")


def parse_passes(text: str) -> list[tuple[str, dict[str, str]]]:
    """Split a `--passes` string into (name, raw options) pairs; raise UserError on malformed text."""
    specs: list[tuple[str, dict[str, str]]] = []
    i, n = 0, len(text)

    def fail(why: str) -> UserError:
        shown = " ".join(text.split())  # one line, whatever line breaks the pipeline was written with
        return UserError(f"--passes '{shown}': {why} (expected e.g. 'slice(sparsity=0.25),quant4(block=32)')")

    while i < n:
        while i < n and (text[i] == "," or text[i].isspace()):
            i += 1
        if i >= n:
            break
        m = _NAME.match(text, i)
        if not m:
            raise fail(f"expected a pass name at position {i + 1}")
        name, i = m.group(0), m.end()
        opts: dict[str, str] = {}
        while i < n and text[i].isspace():
            i += 1
        if i < n and text[i] == "(":
            close = _matching_paren(text, i)
            if close < 0:
                raise fail(f"unclosed '(' after {name}")
            body = text[i + 1:close]
            for item in split_top_level(body):
                if not item.strip():
                    continue
                if "=" not in item:
                    raise fail(f"option '{item.strip()}' of {name} needs key=value")
                key, value = item.split("=", 1)
                key = key.strip()
                if not _NAME.fullmatch(key):
                    raise fail(f"bad option name '{key}' in {name}")
                if key in opts:
                    raise fail(f"option '{key}' given twice for {name}")
                opts[key] = value.strip()
            i = close + 1
        while i < n and text[i].isspace():
            i += 1
        if i < n and text[i] != ",":
            raise fail(f"unexpected '{text[i]}' at position {i + 1}")
        specs.append((name, opts))
    if not specs:
        raise UserError("--passes is empty; name at least one pass (see `modelsurgeon passes`)")
    return specs


def _matching_paren(text: str, start: int) -> int:
    depth = 0
    for j in range(start, len(text)):
        if text[j] == "(":
            depth += 1
        elif text[j] == ")":
            depth -= 1
            if depth == 0:
                return j
    return -1


def split_top_level(body: str) -> list[str]:
    """Split on commas outside nested parentheses (so `correct=lowrank(8)` stays one value, and a `--passes` string
    splits into its passes)."""
    parts, depth, cur = [], 0, []
    for ch in body:
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        depth += ch == "("
        depth -= ch == ")"
        cur.append(ch)
    parts.append("".join(cur))
    return parts


def load_pipeline_file(path: str | pathlib.Path) -> list[tuple[str, dict[str, Any]]]:
    path = pathlib.Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: pipeline file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc}); write a list like [\"cleanup\", {{\"name\": \"quant4\", \"options\": {{\"block\": 32}}}}]") from None
    if isinstance(data, dict) and "passes" in data:
        data = data["passes"]
    if not isinstance(data, list):
        raise UserError(f"{path}: a pipeline file holds a JSON list of passes")
    specs: list[tuple[str, dict[str, Any]]] = []
    for item in data:
        if isinstance(item, str):
            specs.extend(parse_passes(item))
        elif isinstance(item, dict) and isinstance(item.get("name"), str):
            opts = item.get("options", {})
            if not isinstance(opts, dict):
                raise UserError(f"{path}: options of {item['name']} must be an object")
            specs.append((item["name"], dict(opts)))
        else:
            raise UserError(f"{path}: each pipeline entry is a pass string or {{\"name\": ..., \"options\": {{...}}}}")
    return specs


def build_pipeline(specs: Iterable[tuple[str, dict[str, Any]] | Pass | str], *, cleanup: bool = True,
                   fuse: bool = False) -> list[Pass]:
    """Instantiate passes, add required passes before their users, check stage order, append `fuse` (when asked
    and not listed; marked `by_default`, so an unchanged one leaves no report row) and cleanup."""
    passes: list[Pass] = []
    for spec in specs:
        if isinstance(spec, Pass):
            passes.append(spec)
        elif isinstance(spec, str):
            passes.extend(get_pass(n)(**o) for n, o in parse_passes(spec))
        else:
            name, opts = spec
            passes.append(get_pass(name)(**opts))
    passes = _add_requirements(passes)
    check_order(passes)
    if fuse and not any(p.name == "fuse" for p in passes):
        added = get_pass("fuse")()
        added.by_default = True
        passes.append(added)
    if cleanup and (not passes or passes[-1].name != "cleanup"):
        passes.append(get_pass("cleanup")())
    return passes


def _add_requirements(passes: list[Pass]) -> list[Pass]:
    out: list[Pass] = []
    for p in passes:
        for req in _closure(type(p)):
            if not any(q.name == req for q in out):
                added = get_pass(req)()
                added.required_by = p.name  # errors then say which requested pass brought it in
                out.append(added)
        out.append(p)
    return out


def _closure(cls: type[Pass], seen: tuple[str, ...] = ()) -> list[str]:
    order: list[str] = []
    for req in cls.requires:
        if req in seen:
            raise RuntimeError(f"pass requirement cycle through {req}")
        for r in _closure(get_pass(req), seen + (cls.name,)) + [req]:
            if r not in order:
                order.append(r)
    return order


def check_order(passes: list[Pass]) -> None:
    """Quantizing passes come after every structural pass, fusing ones after both; refuse with the right order
    otherwise."""
    first_fuse = next((p for p in passes if p.stage == Stage.FUSE), None)
    if first_fuse is not None:
        late = [p for p in passes[passes.index(first_fuse):] if p.stage in (Stage.STRUCTURE, Stage.QUANTIZE)]
        if late:
            order = ",".join(p.name for p in passes if p.stage != Stage.FUSE)
            order += "," + ",".join(p.name for p in passes if p.stage == Stage.FUSE)
            raise UserError(f"pass '{late[0].name}' cannot run after fusing pass '{first_fuse.name}': "
                            f"fuse last, e.g. --passes {order}")
    first_quant = next((p for p in passes if p.stage == Stage.QUANTIZE), None)
    if first_quant is None:
        return
    qi = passes.index(first_quant)
    late = [p for p in passes[qi:] if p.stage == Stage.STRUCTURE]
    if late:
        fixed = [p for p in passes if p.stage != Stage.QUANTIZE] 
        fixed_q = [p for p in passes if p.stage == Stage.QUANTIZE]
        order = ",".join(p.name for p in _insert_quant_after_structure(fixed, fixed_q))
        raise UserError(
            f"pass '{late[0].name}' cannot run after quantizing pass '{first_quant.name}': "
            f"quantize last, e.g. --passes {order}"
        )


def _insert_quant_after_structure(rest: list[Pass], quant: list[Pass]) -> list[Pass]:
    last_struct = max((i for i, p in enumerate(rest) if p.stage == Stage.STRUCTURE), default=-1)
    return rest[: last_struct + 1] + quant + rest[last_struct + 1:]


def describe_passes() -> list[dict[str, Any]]:
    """Name, summary, stage, requirements and options of every registered pass (for `modelsurgeon passes`)."""
    rows = []
    for name, cls in registered_passes().items():
        rows.append({
            "name": name, "summary": cls.summary, "stage": cls.stage.name.lower(), "requires": list(cls.requires),
            "options": {k: {"default": o.default, "help": o.help, **({"choices": list(o.choices)} if o.choices else {})}
                        for k, o in cls.options.items()},
        })
    return rows
