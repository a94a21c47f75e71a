"""generate.py and evaluate.py end to end on a tiny trained checkpoint, and every bad input as a one-line error
(exit code 2, no traceback).

A few runs are real subprocesses (exit codes and stderr as a user sees them); the bad-input cases run the
scripts in-process through runpy, which goes through the same run_main and is much faster.
"""

import json
import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEP_LINE = re.compile(r"^\s+step\s+(\d+)/(\d+)  ?(.*)$")


def run_script(script: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "src" / script), *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
        stdin=None if stdin is not None else subprocess.DEVNULL,
    )


def run_in_process(script: str, args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """Run src/<script> as __main__ with argv; returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [script, *args])
    monkeypatch.setenv("SGDD_MALLOPT", "0")  # leave the test process's allocator alone
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(ROOT / "src" / script), run_name="__main__")
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def assert_one_line_error(code, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# ---------------------------------------------------------------------------------------------------------
# end to end (subprocesses)


def test_generate_show_steps_end_to_end(tiny_checkpoint):
    K = 5
    res = run_script(
        "generate.py",
        "--checkpoint",
        str(tiny_checkpoint),
        "--steps",
        str(K),
        "--show-steps",
        "The cat sat on the mat.",
        "Another sentence here.",
    )
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    lines = res.stdout.splitlines()
    blocks = [i for i, line in enumerate(lines) if line.startswith("input: ")]
    assert len(blocks) == 2
    for b in blocks:
        steps = [STEP_LINE.match(line) for line in lines[b + 1 : b + 2 + K]]
        assert all(steps) and [int(s.group(1)) for s in steps] == list(range(K + 1))
        assert all(int(s.group(2)) == K for s in steps)
        assert "_" in steps[0].group(3) and "_" in steps[1].group(3)
        assert "_" not in steps[-1].group(3)
    outputs = [line for line in lines if " -> " in line]
    assert [o.split(" -> ")[0] for o in outputs] == ["The cat sat on the mat.", "Another sentence here."]
    # the last step shows exactly the returned output, for each input (batches are sorted by length, so the
    # steps must be mapped back to their inputs)
    for b, out in zip(blocks, outputs, strict=True):
        assert out.split(" -> ", 1)[1] == STEP_LINE.match(lines[b + 1 + K]).group(3)


def test_generate_paraphrase_from_stdin_plain(tiny_checkpoint):
    res = run_script(
        "generate.py",
        "--checkpoint",
        str(tiny_checkpoint),
        "--mode",
        "paraphrase",
        "--num-samples",
        "3",
        "--plain",
        "--seed",
        "1",
        "--top-p",
        "0.9",
        stdin="First sentence from stdin.\n\nSecond one.\n",
    )
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.splitlines()) == 2 * 3  # blank stdin lines are skipped
    assert "Traceback" not in res.stderr


def test_evaluate_end_to_end_writes_json(tiny_checkpoint, tmp_path):
    out = tmp_path / "res" / "results.json"
    res = run_script(
        "evaluate.py",
        "--checkpoint",
        str(tiny_checkpoint),
        "--num-samples",
        "4",
        "--steps",
        "3",
        "--rerank",
        "2",
        "--length-quantile",
        "0.3",
        "--output",
        str(out),
    )
    assert res.returncode == 0, res.stderr
    report = json.loads(out.read_text())
    assert {
        "metrics",
        "by_length",
        "config",
        "checkpoint",
        "checkpoint_meta",
        "settings",
        "examples",
        "data",
    } <= set(report)
    m = report["metrics"]
    for key in (
        "bleu",
        "chrf",
        "exact_match",
        "token_f1",
        "length_ratio",
        "cosine",
        "bleu_roundtrip",
        "nll_per_token",
        "sentences_per_s",
        "end_to_end_sentences_per_s",
        "num_sentences",
    ):
        assert key in m, key
    assert m["num_sentences"] == 4 and report["data"]["num_sentences"] == 4
    assert report["data"]["source"].startswith("validation split")  # default data: the config's valid split
    assert report["settings"]["steps"] == 3 and report["settings"]["rerank"] == 2
    assert report["settings"]["length_quantile"] == 0.3
    assert Path(report["checkpoint"]).resolve() == Path(tiny_checkpoint).resolve()
    assert report["checkpoint_meta"]["step"] == 20
    assert report["config"]["model"]["hidden_size"] == 64
    assert len(report["examples"]) == 4 and {"input", "output"} <= set(report["examples"][0])
    assert "BLEU" in res.stdout and "sentences/s" in res.stdout and "round trip" in res.stdout


def test_missing_checkpoint_subprocess(tmp_path):
    res = run_script("generate.py", "--checkpoint", str(tmp_path / "nope"), "A sentence.")
    assert_one_line_error(res.returncode, res.stderr, "does not exist", "src/train.py")
    assert res.stdout == ""


# ---------------------------------------------------------------------------------------------------------
# bad input (in-process)


@pytest.fixture(scope="module")
def broken(tiny_checkpoint, tmp_path_factory):
    """Damaged copies of the tiny checkpoint and bad input files."""
    import dataclasses

    from safetensors.torch import save_file

    from sgdd.checkpoint import load_checkpoint
    from sgdd.models import SGDDNet

    root = tmp_path_factory.mktemp("broken")
    src = Path(tiny_checkpoint)

    def copy(name: str) -> Path:
        dst = root / name
        shutil.copytree(src, dst)
        return dst

    (copy("no_vocab") / "vocab.json").unlink()
    for name, keep in (("truncated_header", 5000), ("truncated_data", -1000)):
        p = copy(name) / "model.safetensors"
        data = p.read_bytes()
        p.write_bytes(data[:keep])
    # weights of a different-size model (as if model.safetensors were copied from another run)
    ck = load_checkpoint(src)
    cfg = ck.config
    small = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, hidden_size=32, num_heads=2))
    vocab_size = len(json.loads(ck.vocab_path.read_text())["encoder_ids"])
    other = SGDDNet(small, vocab_size, 384).state_dict()
    save_file(
        {k: v.contiguous().clone() for k, v in other.items()}, str(copy("other_size") / "model.safetensors")
    )
    both = copy("other_size_both")
    for name in ("model.safetensors", "ema.safetensors"):
        save_file({k: v.contiguous().clone() for k, v in other.items()}, str(both / name))
    (root / "bad_utf8.txt").write_bytes(b"A fine first line.\nthen \xff\xfe broken\n")
    (root / "blank.txt").write_text("\n   \n")
    return root


@pytest.mark.parametrize(
    "case",
    [
        "empty", "whitespace", "bad_utf8", "missing_file", "blank_file", "no_vocab", "truncated_header",
        "truncated_data", "other_size", "other_size_both", "run_folder", "interpolate_one", "interpolate_three",
        "unknown_sampler", "zero_steps", "show_steps_paraphrase", "refine_paraphrase", "negative_refine",
        "length_quantile",
    ],
)  # fmt: skip
def test_generate_bad_input_is_one_line(case, tiny_checkpoint, broken, monkeypatch, capsys):
    ck = str(tiny_checkpoint)
    args, needles = {
        "empty": (["--checkpoint", ck, ""], ["input 1 is empty"]),
        "whitespace": (["--checkpoint", ck, "fine", "  \t "], ["input 2 is empty"]),
        "bad_utf8": (
            ["--checkpoint", ck, "--input", str(broken / "bad_utf8.txt")],
            ["bad_utf8.txt", "line 2", "UTF-8"],
        ),
        "missing_file": (
            ["--checkpoint", ck, "--input", str(broken / "nope.txt")],
            ["nope.txt", "does not exist"],
        ),
        "blank_file": (["--checkpoint", ck, "--input", str(broken / "blank.txt")], ["no sentences"]),
        "no_vocab": (["--checkpoint", str(broken / "no_vocab"), "hi"], ["incomplete", "vocab.json"]),
        "truncated_header": (
            ["--checkpoint", str(broken / "truncated_header"), "hi"],
            ["model.safetensors", "truncated"],
        ),
        "truncated_data": (["--checkpoint", str(broken / "truncated_data"), "hi"], ["model.safetensors"]),
        "other_size": (
            ["--checkpoint", str(broken / "other_size"), "hi"],
            ["model.safetensors", "do not match its config", "shapes"],
        ),
        "other_size_both": (
            ["--checkpoint", str(broken / "other_size_both"), "hi"],
            ["do not match its config"],
        ),
        "run_folder": (["--checkpoint", str(Path(ck).parent), "hi"], ["run folder", "latest"]),
        "interpolate_one": (["--checkpoint", ck, "--mode", "interpolate", "one"], ["exactly 2", "got 1"]),
        "interpolate_three": (["--checkpoint", ck, "--mode", "interpolate", "a", "b", "c"], ["got 3"]),
        "unknown_sampler": (["--checkpoint", ck, "--sampler", "nope", "hi"], ["nope", "valid samplers"]),
        "zero_steps": (["--checkpoint", ck, "--steps", "0", "hi"], ["steps must be positive"]),
        "show_steps_paraphrase": (
            ["--checkpoint", ck, "--mode", "paraphrase", "--show-steps", "hi"],
            ["--show-steps"],
        ),
        "refine_paraphrase": (
            ["--checkpoint", ck, "--mode", "paraphrase", "--refine", "2", "hi"],
            ["--refine applies to --mode reconstruct"],
        ),
        "negative_refine": (["--checkpoint", ck, "--refine", "-1", "hi"], ["sampling.refine must be >= 0"]),
        "length_quantile": (["--checkpoint", ck, "--length-quantile", "1.5", "hi"],
                            ["sampling.length_quantile must be in (0, 1]"]),
    }[case]
    code, out, err = run_in_process("generate.py", args, monkeypatch, capsys)
    assert_one_line_error(code, err, *needles)


@pytest.mark.parametrize(
    "case", ["bad_utf8", "missing_checkpoint", "paraphrase_rerank", "paraphrase_refine", "no_valid_split"]
)
def test_evaluate_bad_input_is_one_line(case, tiny_checkpoint, broken, monkeypatch, capsys, tmp_path):
    ck = str(tiny_checkpoint)
    if case == "no_valid_split":  # the corpus the checkpoint was trained on is gone: say to pass --data
        moved = tmp_path / "moved"
        shutil.copytree(tiny_checkpoint, moved)
        cfg_file = moved / "config.yaml"
        text = cfg_file.read_text()
        cfg_file.write_text(re.sub(r"(\n  path: ).*", r"\1" + str(tmp_path / "gone.txt"), text, count=1))
        ck = str(moved)
    args, needles = {
        "bad_utf8": (
            ["--checkpoint", ck, "--data", str(broken / "bad_utf8.txt")],
            ["bad_utf8.txt", "line 2"],
        ),
        "missing_checkpoint": (["--checkpoint", str(broken / "nope")], ["does not exist"]),
        "paraphrase_rerank": (["--checkpoint", ck, "--mode", "paraphrase", "--rerank", "3"], ["rerank"]),
        "paraphrase_refine": (["--checkpoint", ck, "--mode", "paraphrase", "--refine", "2"],
                              ["refine applies to reconstruction"]),
        "no_valid_split": (["--checkpoint", ck], ["--data FILE", "gone.txt"]),
    }[case]
    code, out, err = run_in_process("evaluate.py", args, monkeypatch, capsys)
    assert_one_line_error(code, err, *needles)


def test_long_sentence_is_truncated_with_a_warning(tiny_checkpoint, monkeypatch, capsys, caplog):
    long = " ".join(["word"] * 80)  # the tiny model's max_length is 40
    with caplog.at_level("WARNING", logger="sgdd"):
        code, out, err = run_in_process(
            "generate.py", ["--checkpoint", str(tiny_checkpoint), long], monkeypatch, capsys
        )
    assert code == 0, err
    assert any("truncated" in r.getMessage() for r in caplog.records)
    assert out.count(" -> ") == 1


def test_read_sentence_lines_and_malloc_tuning(monkeypatch):
    from sgdd.cli import read_sentence_lines, tune_malloc

    assert read_sentence_lines([b"\xef\xbb\xbfOne.\n", b"\n", b"  Two. \n"], "x") == ["One.", "Two."]
    monkeypatch.setenv("SGDD_MALLOPT", "0")
    assert tune_malloc() is False


def test_decoding_flags_map_onto_sampling_fields():
    import argparse
    import dataclasses

    from sgdd.cli import add_decoding_flags, decoding_overrides
    from sgdd.config import SamplingConfig

    ap = argparse.ArgumentParser()
    add_decoding_flags(ap)
    given = decoding_overrides(ap.parse_args(["--steps", "8", "--cfg-scale", "1.0", "--repeat-penalty", "2.5",
                                              "--shortlist", "64", "--kv-refresh", "6",
                                              "--guidance-refresh", "4", "--unmask-schedule", "linear",
                                              "--time-grid", "masked"]))
    assert given["unmask_schedule"] == "linear" and given["time_grid"] == "masked"
    assert given["shortlist"] == 64 and given["kv_refresh"] == 6 and given["guidance_refresh"] == 4
    fields = {f.name for f in dataclasses.fields(SamplingConfig)}
    assert set(given) <= fields  # every flag names a real SamplingConfig field
    assert given["steps"] == 8 and given["cfg_scale"] == 1.0 and given["repeat_penalty"] == 2.5
    assert given["rerank"] is None and given["sampler"] is None  # not given = keep the checkpoint's
    with pytest.raises(SystemExit):
        ap.parse_args(["--steps", "many"])


def test_trim_heap_returns_freed_heap_pages():
    """With the allocator tuned (no mmap, 1 GiB trim threshold) freed blocks stay resident until trim_heap()."""
    import platform

    from sgdd.cli import resident_mb, trim_heap

    if sys.platform.startswith("linux"):
        assert resident_mb() > 10  # read from /proc; None where there is none
    if platform.libc_ver()[0] != "glibc":
        assert trim_heap() is False
        pytest.skip("glibc only")
    code = (
        "from sgdd.cli import tune_malloc, trim_heap, resident_mb\n"
        "assert tune_malloc()\n"
        "blocks = [bytearray(64 << 20) for _ in range(8)]\n"
        "del blocks[:7]\n"
        "before = resident_mb()\n"
        "assert trim_heap()\n"
        "print(before, resident_mb())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "SGDD_MALLOPT"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    before, after = map(float, out.stdout.split())
    assert before > 400, before  # 7 x 64 MB freed but still resident
    assert before - after > 350, (before, after)


# ---------------------------------------------------------------------------------------------------------
# heap allocator: the entry scripts re-execute themselves with tcmalloc preloaded when it is installed


def test_allocator_to_preload_decides_from_the_environment():
    from sgdd.cli import ALLOCATOR_ENV, LIBRARY_DIRS, TCMALLOC_NAMES, allocator_to_preload
    from sgdd.registry import ConfigError

    tcm = f"{LIBRARY_DIRS[0]}/{TCMALLOC_NAMES[0]}"
    installed = {tcm, "/opt/my/libjemalloc.so.2"}.__contains__
    nothing = set().__contains__
    assert allocator_to_preload({}, "Linux", installed) == tcm  # auto is the default
    assert allocator_to_preload({ALLOCATOR_ENV: "auto"}, "Linux", nothing) is None  # not installed: keep libc
    assert allocator_to_preload({ALLOCATOR_ENV: "system"}, "Linux", installed) is None
    assert allocator_to_preload({}, "Darwin", installed) is None  # LD_PRELOAD is Linux's
    assert allocator_to_preload({"_SGDD_PRELOADED": tcm}, "Linux", installed) is None  # re-executed once already
    assert allocator_to_preload({"LD_PRELOAD": "/x/libjemalloc.so.2"}, "Linux", installed) is None  # user's own
    assert allocator_to_preload({"LD_PRELOAD": "/x/libfoo.so"}, "Linux", installed) == tcm
    own = "/opt/my/libjemalloc.so.2"
    assert allocator_to_preload({ALLOCATOR_ENV: own}, "Linux", installed) == own
    with pytest.raises(ConfigError, match="no such file.*auto.*system"):
        allocator_to_preload({ALLOCATOR_ENV: "/nope/libtcmalloc.so"}, "Linux", installed)


def test_preload_allocator_never_reexecutes_a_process_started_for_something_else(monkeypatch):
    """Scripts run in-process (runpy, as these tests do) must not replace the test runner."""
    from sgdd import cli

    monkeypatch.setenv("SGDD_ALLOCATOR", "/nope/libtcmalloc.so")  # would raise if the decision were reached
    monkeypatch.setattr(cli.os, "execve", lambda *a: pytest.fail("re-executed the test process"))
    cli.preload_allocator(str(ROOT / "src" / "train.py"))  # sys.orig_argv is pytest's command line


def _libc_path() -> str | None:
    try:
        with open("/proc/self/maps") as f:
            return next((ln.split()[-1] for ln in f if re.search(r"/libc[.-][^/]*so", ln)), None)
    except OSError:
        return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")
def test_entry_script_reexecutes_itself_with_the_chosen_library(tmp_path):
    """A script going through run_main restarts once with SGDD_ALLOCATOR's library in LD_PRELOAD, same arguments;
    a missing library is a one-line error. (libc stands in for a malloc library: present on every glibc Linux.)"""
    lib = _libc_path()
    if lib is None:
        pytest.skip("no libc in /proc/self/maps")
    script = tmp_path / "entry.py"
    script.write_text(
        "import os, sys\n"
        "from sgdd.cli import run_main\n"
        "def main():\n"
        "    print(os.getpid(), os.environ.get('LD_PRELOAD', ''), '|'.join(sys.argv[1:]))\n"
        "run_main(main)\n"
    )
    env = {**os.environ, "SGDD_ALLOCATOR": lib}
    env.pop("LD_PRELOAD", None)
    proc = subprocess.Popen([sys.executable, "-u", str(script), "a b", "--c"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    pid, preload, argv = out.strip().split(" ", 2)
    assert preload.split(":")[0] == lib and argv == "a b|--c"
    assert int(pid) == proc.pid  # exec, not a child: torchrun and shells keep watching the same process
    env["SGDD_ALLOCATOR"] = str(tmp_path / "libnothing.so")
    bad = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert_one_line_error(bad.returncode, bad.stderr, "SGDD_ALLOCATOR=", "no such file")
    env["SGDD_ALLOCATOR"] = "system"
    plain = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 0 and plain.stdout.split(" ")[1] == "", plain.stdout

