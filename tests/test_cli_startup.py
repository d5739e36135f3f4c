"""`ctpa-vq --help` and argument errors answer before torch, diffusers, datasets or accelerate are
imported: the sub-command that needs them imports them (the package itself imports nothing heavy)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

HEAVY = ("torch", "diffusers", "datasets", "accelerate")
SUBCOMMANDS = ("prepare", "reconstruct", "evaluate", "push", "latent-stats", "encode", "verify")

# Each argv runs through `main` as the console script runs it; after each, the heavy packages already imported.
PARSE_ONLY = textwrap.dedent("""
    import contextlib, io, json, sys
    from ctpa_vq.cli import main
    results = []
    for argv in json.loads(sys.argv[1]):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exit:
                code = exit.code
        results.append({"argv": argv, "code": code, "out": out.getvalue(), "err": err.getvalue(),
                        "heavy": [m for m in %r if m in sys.modules]})
    print(json.dumps(results))
""" % (HEAVY,))


def _parse_only(*argvs: list[str]) -> list[dict]:
    run = subprocess.run([sys.executable, "-c", PARSE_ONLY, json.dumps(argvs)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def test_help_imports_nothing_heavy():
    results = _parse_only(["--help"], *([name, "--help"] for name in SUBCOMMANDS))
    top, *subcommands = results
    assert top["code"] == 0 and top["out"].startswith("usage: ctpa-vq ")
    assert all(name in top["out"] for name in SUBCOMMANDS)
    for name, result in zip(SUBCOMMANDS, subcommands):
        assert result["code"] == 0 and result["out"].startswith(f"usage: ctpa-vq {name} "), result
    for result in results:
        assert result["heavy"] == [], result["argv"]


def test_argument_errors_import_nothing_heavy():
    unknown_option, unknown_command, missing = _parse_only(
        ["reconstruct", "--model", "m", "--input", "a.nii.gz", "--output", "b.nii.gz", "--no-such-option"],
        ["no-such-command"],
        ["evaluate"],
    )
    assert unknown_option["code"] == 2 and "unrecognized arguments: --no-such-option" in unknown_option["err"]
    assert unknown_command["code"] == 2 and "invalid choice: 'no-such-command'" in unknown_command["err"]
    assert missing["code"] == 2 and "the following arguments are required: --input, --model" in missing["err"]
    for result in (unknown_option, unknown_command, missing):
        assert result["err"].startswith("usage: ctpa-vq"), result
        assert result["heavy"] == [], result["argv"]
