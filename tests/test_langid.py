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
