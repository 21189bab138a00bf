"""Language identification: accuracy on the real sentences of ../shared/data/text, and the `langid` command."""

from __future__ import annotations

import pytest

from edgemerge.cli import main
from edgemerge.evaluate.langid import COMMON_LANGUAGES, detect, known_languages

from .shared import need_shared

# Sources per language (README, "Evaluation"): UD treebanks, FLORES-200 dev, UD PUD.
SOURCES = {
    "eu": ["ud/eu_bdt-dev.txt", "ud/eu_bdt-test.txt", "flores200/eus_Latn.dev"],
    "ca": ["ud/ca_ancora-dev.txt", "ud/ca_ancora-test.txt", "flores200/cat_Latn.dev"],
    "gl": ["ud/gl_ctg-dev.txt", "ud/gl_ctg-test.txt", "ud/gl_treegal-test.txt", "ud_pud/gl_pud.tsv"],
    "es": ["ud/es_ancora-dev.txt", "ud/es_ancora-test.txt", "ud_pud/es_pud.tsv"],
    "en": ["ud/en_ewt-dev.txt", "ud/en_ewt-test.txt", "flores200/eng_Latn.dev", "ud_pud/en_pud.tsv"],
}


def sentences(lang: str) -> list[str]:
    out = []
    for rel in SOURCES[lang]:
        for line in need_shared("text", *rel.split("/")).read_text(encoding="utf-8").splitlines():
            text = line.split("\t", 1)[1] if rel.endswith(".tsv") else line
            if len(text.split()) >= 5:
                out.append(text)
    return out


@pytest.mark.parametrize("lang", list(SOURCES))
def test_accuracy_above_95_percent_on_sentences_of_five_words(lang):
    sents = sentences(lang)
    assert len(sents) > 2500
    accuracy = sum(detect(s).lang == lang for s in sents) / len(sents)
    assert accuracy > 0.95, f"{lang}: {accuracy:.2%}"


def test_covers_the_neighbouring_languages():
    assert {"eu", "ca", "gl", "es", "pt", "fr", "it", "en"} <= set(known_languages()) & set(COMMON_LANGUAGES)
    assert detect("O menino foi à escola de manhã e voltou para casa ao fim da tarde.").lang == "pt"
    assert detect("Le garçon est allé à l'école ce matin et il est rentré chez lui le soir.").lang == "fr"
    assert detect("Il ragazzo è andato a scuola stamattina ed è tornato a casa la sera.").lang == "it"
    assert detect("O neno foi á escola pola mañá e volveu para a casa á tardiña.").lang == "gl"


def test_langid_command(tmp_path, capsys):
    f = tmp_path / "mixed.txt"
    f.write_text(
        "Gaur goizean mendira joan gara eta eguraldi ona egin du.\n"
        "Avui al matí hem anat a la muntanya i ha fet bon temps.\n"
        "\n"
        "Hoxe pola mañá fomos ao monte e fixo moi bo tempo.\n",
        encoding="utf-8",
    )
    main(["langid", str(f)])
    assert capsys.readouterr().out.split("\n") == ["eu", "ca", "und", "gl", ""]
    main(["langid", str(f), "--scores", "--only", "es,pt"])
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    codes = [r[0] for r in rows]
    assert len(codes) == 4 and codes[2] == "und" and set(codes) <= {"es", "pt", "und"}
    assert all(0.0 <= float(r[1]) <= 1.0 for r in rows)


def test_langid_command_rejects_non_utf8(tmp_path, capsys):
    f = tmp_path / "latin1.txt"
    f.write_bytes("Caf\xe9 con leche\n".encode("latin-1"))
    with pytest.raises(SystemExit) as e:
        main(["langid", str(f)])
    assert e.value.code == 2 and "is not UTF-8" in capsys.readouterr().err


EU = b"Gaur goizean mendira joan gara eta eguraldi ona egin du."
# (file bytes with MAX_LINE_BYTES = 4096, expected output lines or the error's text): a line longer than the
# bound is judged on its head and read past, never held whole
LONG_LINES = [
    (EU * 200_000 + b"\nHola, buenos d\xc3\xadas a todos.\n", ["eu", "es"]),
    (b"1" * 4095 + "é".encode() + b"\n" + EU, ["und", "eu"]),  # the cut falls inside a character
    (EU * 200_000, ["eu"]),  # no newline at the end
    (b"\xff" + EU * 200_000 + b"\n", "byte 0"),
    (EU * 200_000 + b"\n" + b"ab\xc3", f"byte {len(EU) * 200_000 + 3}"),  # a truncated last character
]


@pytest.mark.parametrize(("data", "expected"), LONG_LINES)
def test_langid_bounds_each_line(tmp_path, capsys, monkeypatch, data, expected):
    import tracemalloc

    from edgemerge.cli import langid as langid_cli

    monkeypatch.setattr(langid_cli, "MAX_LINE_BYTES", 4096)
    f = tmp_path / "long.txt"
    f.write_bytes(data)
    detect("Kaixo")  # the identifier's model is loaded once, before memory is measured
    tracemalloc.start()
    try:
        main(["langid", str(f)])
        code = 0
    except SystemExit as e:
        code = e.code
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    out, err = capsys.readouterr()
    if isinstance(expected, list):
        assert code == 0 and out.splitlines() == expected, err
    else:
        assert code == 2 and "is not UTF-8" in err and expected in err, err
    assert peak < 4 * 1024**2 or peak < len(data) / 4, peak  # the file (11 MB) is never held whole
