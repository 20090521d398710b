"""Long work is never silent: where no terminal shows a bar, each stage prints a start and an end line."""

from __future__ import annotations

import io

from slimkit.core.progress import StageLines, progress_bar


def test_stage_lines_say_when_a_stage_starts_and_ends_with_its_count():
    out = io.StringIO()
    bar = StageLines(out)
    fit = bar.add_task("fine-tune", total=10, info="")
    resumed = bar.add_task("calibrate", total=4, completed=1)
    for _ in range(10):
        bar.update(fit, advance=1, info="loss 0.1234")
    bar.advance(resumed, 3)
    bar.finish()
    lines = out.getvalue().splitlines()
    assert lines[:2] == ["fine-tune: started (10 steps)", "calibrate: started (4 steps)"]
    assert lines[2].startswith("fine-tune: done 10/10 in ") and lines[2].endswith(" s, loss 0.1234")
    assert lines[3].startswith("calibrate: done 4/4 in ")


def test_no_terminal_gives_stage_lines_and_disabled_gives_none(capsys):
    with progress_bar(False) as bar:
        assert bar is None
    with progress_bar(True) as bar:  # pytest's captured stderr is not a terminal
        assert isinstance(bar, StageLines)
        bar.add_task("reconstruct", total=2)
        bar.advance(0, 2)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "reconstruct: started (2 steps)" and err[1].startswith("reconstruct: done 2/2 in ")


def test_a_command_shows_progress_that_library_calls_keep_quiet(capsys):
    from slimkit.core.progress import each, progress_shown

    assert list(each(range(3), "layers")) == [0, 1, 2] and capsys.readouterr().err == ""  # library default: quiet
    with progress_shown(True):
        assert sum(each(range(4), "rounding int4 weights (gptq)")) == 6
        with progress_bar(False) as bar:  # a caller's own "off" gives way to the command's "on"
            assert isinstance(bar, StageLines)
    with progress_shown(False), progress_bar(True) as bar:  # work that must stay quiet (a search trial)
        assert bar is None
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "rounding int4 weights (gptq): started (4 steps)"
    assert err[1].startswith("rounding int4 weights (gptq): done 4/4 in ")


def test_quantize_command_says_each_stage_of_gptq(tmp_path, capsys):
    from typer.testing import CliRunner

    from slimkit.cli.app import app

    result = CliRunner().invoke(app, ["quantize", "--task", "digits", "--config", "w4", "--group-size", "32",
                                      "--method", "gptq", "--threads", "1", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    said = result.output + capsys.readouterr().err
    for stage in ("GPTQ int4 block by block: done", "rounding int4 weights (gptq): done"):
        assert stage in said, said


def test_a_search_trial_keeps_its_steps_quiet(capsys, digits_task):
    """The search's own bar names the trial: a step that would show progress on its own (AdaRound) says nothing."""
    import slimkit as sk
    from slimkit.search.evaluate import RuntimeMeasurer

    evaluate = RuntimeMeasurer(digits_task, sk.Target(max_drop=0.05, threads=1), backend="torch")
    measured, model = evaluate([sk.quantize.AdaRound(bits=4, iterations=20)], early_stop=False)
    assert measured.error is None and model is not None
    assert "AdaRound" not in capsys.readouterr().err
    with progress_bar(True) as bar:  # outside the trial, the same call shows
        assert bar is not None
