"""The one-line error contract of the ``ktray`` command line, for tests."""

from ktray import cli


def one_line_error(capsys, argv):
    """Run ``ktray argv``; assert exit 2 and exactly one ``ktray: error: ...`` line on stderr
    (no traceback); return that line."""
    code = cli.main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, (argv, err)
    assert len(lines) == 1 and lines[0].startswith("ktray: error: "), err
    assert "Traceback" not in err
    return lines[0]
