import subprocess
import sys

import pytest

from edkm.cli.main import build_parser, main


def _help_text(args):
    return subprocess.run(
        [sys.executable, "-m", "edkm", *args, "--help"], capture_output=True, text=True, check=True
    ).stdout


def test_every_subcommand_has_help():
    top = _help_text([])
    sub = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert sub, "no subcommands"
    for name in sub:
        assert name in top
        text = _help_text([name])
        assert "--model" in text or "--help" in text
        # every option documents itself
        for action in sub[name]._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings} has no help"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["eval", "--seq-len", "0", "--data", "{txt}"], "--seq-len must be at least 2"),
        (["eval", "--model", "{missing}", "--data", "{txt}"], "does not exist"),
        (["eval", "--model", "{folder}", "--data", "{txt}"], "no config.json"),
        (["eval", "--data", "{empty}"], "is empty"),
        (["eval", "--data", "{missing}.txt"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, argv, message):
    txt = tmp_path / "t.txt"
    txt.write_text("one doc\n\nanother doc\n")
    empty = tmp_path / "e.txt"
    empty.write_text("")
    folder = tmp_path / "not_a_model"
    folder.mkdir()
    fill = {
        "txt": str(txt),
        "empty": str(empty),
        "missing": str(tmp_path / "missing"),
        "folder": str(folder),
    }
    code = main([a.format(**fill) for a in argv])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_text_shorter_than_one_window(tmp_path, capsys):
    model_dir = tmp_path / "m"
    from tests.conftest import make_tiny_llama
    from tests.io.test_models import _save_tiny_with_tokenizer

    _save_tiny_with_tokenizer(make_tiny_llama(), model_dir)
    txt = tmp_path / "t.txt"
    txt.write_text("t1 t2 t3\n\nt4 t5\n\nt6\n\nt7 t8\n")
    code = main(
        ["eval", "--model", str(model_dir), "--data", str(txt), "--split", "all", "--seq-len", "64"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "shorter than one window" in err
    code = main(
        [
            "eval",
            "--model",
            str(model_dir),
            "--data",
            str(txt),
            "--split",
            "all",
            "--seq-len",
            "4",
            "--json",
        ]
    )
    assert code == 0
    assert '"windows": 2' in capsys.readouterr().out


def test_eval_reads_a_column_of_a_saved_dataset(tmp_path, capsys, monkeypatch):
    import json

    import datasets

    from tests.conftest import make_tiny_llama
    from tests.io.test_models import _save_tiny_with_tokenizer

    monkeypatch.setenv("EDKM_CACHE_DIR", str(tmp_path / "cache"))
    model_dir = tmp_path / "m"
    _save_tiny_with_tokenizer(make_tiny_llama(), model_dir)
    docs = ["t1 t2 t3 t4 t5", "t6 t7 t8 t9", "t2 t4 t6 t8 t1 t3"]
    txt = tmp_path / "t.txt"
    txt.write_text("\n\n".join(docs) + "\n")
    folder = tmp_path / "dd"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"body": ["unused text"] * 2}),
            "validation": datasets.Dataset.from_dict({"body": docs, "n": [1, 2, 3]}),
        }
    ).save_to_disk(str(folder))
    common = ["eval", "--model", str(model_dir), "--split", "all", "--seq-len", "4", "--json"]
    capsys.readouterr()
    assert main([*common, "--data", str(txt)]) == 0
    from_txt = json.loads(capsys.readouterr().out)
    data = f"{folder}:validation"
    assert main([*common, "--data", data, "--text-column", "body"]) == 0
    from_dataset = json.loads(capsys.readouterr().out)
    assert from_dataset["text_column"] == "body"
    assert {k: from_dataset[k] for k in ("ppl", "tokens", "windows")} == {
        k: from_txt[k] for k in ("ppl", "tokens", "windows")
    }
    for extra, message in [([], "no column 'text'"), (["--text-column", "n"], "holds int64")]:
        assert main([*common, "--data", data, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and "'body'" in err and len(err.strip().splitlines()) == 1
