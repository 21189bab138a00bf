"""IFEval-style checks on crafted answers in every language, and the built-in prompt sets themselves."""

from __future__ import annotations

import json

import pytest

from edgemerge.errors import EdgemergeError
from edgemerge.evaluate import checks
from edgemerge.evaluate.langid import detect
from edgemerge.evaluate.prompts import available_languages, language_info, load_prompts, sample_text

LANGS = ["eu", "ca", "gl", "es", "en"]


def _spec(lang: str, number: int, kind: str) -> dict:
    """The constraint of type `kind` on prompt `number` of `lang` (so the tests use the shipped parameters)."""
    prompt = load_prompts(lang)[number - 1]
    return next(c for c in prompt.checks if c["type"] == kind)


def _cases(lang: str) -> list[tuple[dict, str, str]]:
    """(constraint, passing answer, failing answer) for every check type, built from the language's text."""
    text = sample_text(lang)
    s1, s2 = text[0], text[1]  # passages of 3 sentences, with capitals and commas
    first = s1.split(". ")[0] + "."
    w = s1.split()
    kw = _spec(lang, 3, "keyword")["word"]
    forb = _spec(lang, 14, "forbidden")["word"]
    start = _spec(lang, 12, "starts_with")["phrase"]
    end = _spec(lang, 6, "ends_with")["phrase"]
    yes = _spec(lang, 28, "one_of")["options"]
    return [
        ({"type": "max_words", "n": 5}, " ".join(w[:5]), " ".join(w[:6])),
        ({"type": "min_words", "n": 6}, " ".join(w[:6]), " ".join(w[:5])),
        ({"type": "bullets", "n": 3}, f"- {w[0]}\n- {w[1]}\n* {w[2]}", f"- {w[0]}\n- {w[1]}"),
        (
            {"type": "numbered", "n": 4},
            "\n".join(f"{i}. {w[i]}" for i in range(1, 5)),
            "\n".join(f"{i}. {w[i]}" for i in range(1, 4)),
        ),
        ({"type": "keyword", "word": kw}, f"{first} {kw.capitalize()}ak {w[1]}.", first),
        ({"type": "keyword", "word": kw, "count": 2}, f"{kw} {first} {kw.upper()}", f"{kw} {first}"),
        ({"type": "forbidden", "word": forb}, first, f"{first} {forb.capitalize()} {w[2]}."),
        ({"type": "lowercase"}, s1.lower(), s1),
        ({"type": "uppercase"}, first.upper(), first),
        (
            {"type": "json", "keys": ["city", "country"]},
            '```json\n{"city": "Lisboa", "country": "Portugal"}\n```',
            '{"city": "Lisboa"}',
        ),
        ({"type": "json"}, json.dumps({"text": first}, ensure_ascii=False), first),
        ({"type": "starts_with", "phrase": start}, f"{start}, {first}", f"{first} {start}"),
        ({"type": "ends_with", "phrase": end}, f"{first} {end}\n", f"{end} {first}"),
        ({"type": "no_commas"}, s1.replace(",", ""), s1),
        ({"type": "title"}, f"<<{' '.join(w[:3])}>>\n{first}", first),
        ({"type": "quoted"}, f'"{first}"', first),
        ({"type": "quoted"}, f"«{first}»", f'"{first}" {w[0]}'),
        ({"type": "paragraphs", "n": 2}, f"{s1}\n\n{s2}", f"{s1}\n{s2}"),
        ({"type": "lines", "n": 4}, "\n".join(w[:4]), "\n".join(w[:3])),
        ({"type": "max_sentences", "n": 3}, s1, f"{s1} {s2}"),
        ({"type": "postscript", "marker": "P.S."}, f"{first}\n\nP.S. {w[3]}", first),
        ({"type": "one_of", "options": yes}, f"{yes[0].capitalize()}.", first),
    ]


@pytest.mark.parametrize("lang", LANGS)
def test_every_check_passes_and_fails_in_every_language(lang):
    cases = _cases(lang)
    assert {c[0]["type"] for c in cases} == set(checks.CHECKS)
    for spec, good, bad in cases:
        assert checks.run_check(good, spec), (spec, good)
        assert not checks.run_check(bad, spec), (spec, bad)


@pytest.mark.parametrize(
    ("answer", "n"),
    [
        ("col·legi d'estiu", 3),  # IFEval's \w+ splits at the apostrophe; the Catalan middle dot joins
        ("l'aigua, la terra - i el foc", 7),
        ("etxe-aurrean 3 katu", 4),
        ("— ¿Qué?", 1),
        ("snake_case 3.5", 3),
    ],
)
def test_word_definition(answer, n):
    assert len(checks.words(answer)) == n


def test_keyword_matches_stems_at_word_start_only():
    assert checks.keyword("Itsasargiaren argia ikusten da.", "itsasargi")
    assert not checks.keyword("Kaixoitsasargi", "itsasargi")
    assert checks.keyword("¿Alguna pregunta más?", "pregunta")
    assert not checks.keyword("saúde", "saude")  # accents matter


def test_ends_with_spanish_question_and_sentences_with_inverted_marks():
    assert checks.ends_with("Es un lugar con libros. ¿Alguna pregunta más?", "¿Alguna pregunta más?")
    assert checks.max_sentences("¡Hola! ¿Qué tal? Bien.", 3)
    assert not checks.max_sentences("¡Hola! ¿Qué tal? Bien. Adiós", 3)
    assert not checks.max_sentences("", 3)


def test_bad_constraints_are_reported():
    with pytest.raises(EdgemergeError, match="unknown check type 'shout'"):
        checks.validate({"type": "shout"}, "x.jsonl:1")
    with pytest.raises(EdgemergeError, match="max_words"):
        checks.validate({"type": "max_words", "words": 3}, "x.jsonl:1")


@pytest.mark.parametrize("lang", LANGS)
def test_builtin_prompt_sets(lang):
    prompts = load_prompts(lang)
    assert len(prompts) == 30 and len({p.id for p in prompts}) == 30
    quick = load_prompts(lang, quick=True)
    assert 5 <= len(quick) < len(prompts) and sum(p.langid for p in quick) >= 5
    assert 0 < sum(not p.langid for p in prompts) <= 5
    used = {c["type"] for p in prompts for c in p.checks}
    assert used == set(checks.CHECKS)
    # the material is written in the language it claims
    assert sum(detect(p.prompt).lang == lang for p in prompts) >= 28
    passages = sample_text(lang)
    assert all(detect(x).lang == lang for x in passages)
    assert sum(len(x.split()) for x in passages) >= 300
    info = language_info(lang)
    assert set(info) >= {"name", "english_name", "system"} and detect(info["system"]).lang == lang


def test_available_languages_and_unknown_language():
    assert set(LANGS) <= set(available_languages())
    with pytest.raises(EdgemergeError, match="available: ca, en, es, eu, gl"):
        load_prompts("xx")
