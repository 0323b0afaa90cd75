"""User mistakes of a run fail at once, in one line naming the field or file, exit code 2, before
Ray starts: empty, non-UTF-8 or non-mapping YAML, and a run folder that cannot be written."""
from __future__ import annotations

import pytest

from fedray.cli import main


def one_line(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("content,message", [
    (b"", "is empty"),
    (b"# only a comment\n", "is empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", "is not UTF-8 text"),
    (b"- a\n- b\n", "must hold a mapping at the top level"),
], ids=["empty", "comment", "binary", "list"])
def test_bad_yaml_files(tmp_path, capsys, content, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    err = one_line(capsys, ["run", str(path)])
    assert err.startswith(f"config error: config: '{path}'") and message in err


def test_output_folder_under_a_file_fails_before_ray_or_data(tmp_path, capsys, monkeypatch):
    from fedray.runtime import cluster, runner

    def never(*a, **k):
        raise AssertionError("reached Ray or the data before checking the output folder")

    monkeypatch.setattr(cluster, "connect", never)
    monkeypatch.setattr(runner, "prepare", never)
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    err = one_line(capsys, ["run", "--set", f"runtime.out_dir={blocker / 'runs'}", "--set", "runtime.progress=false"])
    assert err.startswith("config error: runtime.out_dir: cannot write the run folder") and "afile" in err


def test_a_model_option_only_the_builder_checks_leaves_no_empty_run_folder(tmp_path, capsys):
    """Regression: the run folder was made before the model was built, so a bad model option
    (found by the builder) left an empty ``<label>-s0-<hash>`` folder that later runs stepped over."""
    out = tmp_path / "runs"
    err = one_line(capsys, ["run", "--set", f"runtime.out_dir={out}", "--set", "runtime.progress=false",
                            "--set", "model.name=cnn", "--set", "model.options.channels=[0]"])
    assert err == "config error: model.options.channels: expected positive integers, got 0"
    assert not out.exists()
