"""Every code has its documentation, and every code a family can emit is a known code."""

from __future__ import annotations

import re
from pathlib import Path

from deployhealth.codes import CODES

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "codes.md").read_text()
CODE = re.compile(r'"(E[A-Z]+\d*)"')


def test_every_known_code_has_a_docs_entry_and_every_entry_is_known():
    headings = re.findall(r"^## (\S+)$", DOC, flags=re.MULTILINE)
    assert sorted(headings) == sorted(CODES)


def test_each_docs_entry_states_the_registered_title_section_and_severity():
    for code in CODES.values():
        entry = DOC.split(f"## {code.code}\n", 1)[1].split("\n## ", 1)[0]
        assert f"**{code.title}**" in entry, code.code
        assert f"- Section: {code.section}" in entry, code.code
        assert f"- Severity: {code.severity_text}\n" in entry, code.code


def test_every_code_a_family_or_the_runner_emits_is_registered():
    emitted: set[str] = set()
    sources = ROOT / "src" / "deployhealth"
    for module in [*(sources / "checks").glob("*.py"), sources / "runner.py"]:
        emitted |= set(CODE.findall(module.read_text()))
    assert emitted, "no codes found: the pattern no longer matches the source"
    assert emitted <= set(CODES), emitted - set(CODES)
