"""The public API: ``import avgn_fast`` registers the ops and exports the README's names; the CLI's help.

Registration is checked in fresh processes (an exported program holding both ops loads and runs where
only ``avgn_fast`` was imported, and not where only torch was); ``avgn-fast --help`` and every
``avgn-fast COMMAND --help`` run through the console script's module in a fresh process that must not
import torch. How fast that is, ``benchmarks/bench_cli.py`` measures.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import avgn_fast
from avgn_fast import cli

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = {"AVGN": "avgn_fast.models.avgn", "AVGNConfig": "avgn_fast.config",
          "GlanceEngine": "avgn_fast.engine.early_exit", "Predictor": "avgn_fast.engine.predictor",
          "load": "avgn_fast.checkpoint"}
KERNELS = {"crop_patches": "avgn_fast.kernels.crop_patches", "crop_patches_ref": "avgn_fast.kernels.crop_patches",
           "av_attention": "avgn_fast.kernels.av_attention", "av_attention_ref": "avgn_fast.kernels.av_attention"}
# what --help must not import: torch and what needs it, the training stack, progress bars and plotting
HEAVY = ("torch", "triton", "numpy", "tqdm", "matplotlib", "av", "fvcore", "onnx", "onnxruntime", "ray", "pyarrow",
         "avgn_fast.kernels", "avgn_fast.models", "avgn_fast.engine", "avgn_fast.training", "avgn_fast.data")


def run_python(code: str, *, cwd=ROOT, env=None) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter; fails the test with its stderr if it exits non-zero."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


# --- the package --------------------------------------------------------------------------------


def test_top_level_exports_the_readme_names():
    assert set(PUBLIC) <= set(avgn_fast.__all__)
    assert set(avgn_fast.__all__) <= set(dir(avgn_fast))
    for name, module in PUBLIC.items():
        assert getattr(avgn_fast, name) is getattr(importlib.import_module(module), name), name
    star: dict = {}
    exec("from avgn_fast import *", star)
    assert set(avgn_fast.__all__) <= set(star)
    with pytest.raises(AttributeError, match="no attribute 'Predicter'"):
        avgn_fast.Predicter  # noqa: B018


def test_kernels_package_exports_the_functions():
    from avgn_fast.kernels import av_attention, av_attention_ref, crop_patches, crop_patches_ref

    from avgn_fast import kernels

    assert sorted(kernels.__all__) == sorted(KERNELS)
    for fn, name in [(crop_patches, "crop_patches"), (crop_patches_ref, "crop_patches_ref"),
                     (av_attention, "av_attention"), (av_attention_ref, "av_attention_ref")]:
        assert callable(fn) and fn.__name__ == name and fn is getattr(sys.modules[KERNELS[name]], name)
    images = torch.rand(2, 3, 7, 9)
    patches = crop_patches_ref(images, torch.tensor([[3.0, 4.0], [4.0, 5.0]]), 2)  # integral corners: exact slices
    assert torch.equal(patches, torch.stack([images[0, :, 2:4, 3:5], images[1, :, 3:5, 4:6]]))


def test_exported_program_with_the_ops_loads_where_only_avgn_fast_is_imported(tmp_path):
    class Both(torch.nn.Module):
        def forward(self, images, centers, q, k, v):
            patches = torch.ops.avgn_fast.crop_patches(images, centers, 4, 4)
            out, _ = torch.ops.avgn_fast.av_attention(q, k, v)
            return patches, out

    g = torch.Generator().manual_seed(0)
    inputs = (torch.rand(2, 3, 8, 10, generator=g), torch.tensor([[4.0, 4.0], [5.0, 7.0]]),
              *(torch.randn(1, 2, n, 16, generator=g) for n in (3, 5, 5)))
    program = torch.export.export(Both(), inputs)
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert {"avgn_fast.crop_patches.default", "avgn_fast.av_attention.default"} <= targets
    torch.export.save(program, tmp_path / "both.pt2")
    torch.save(inputs, tmp_path / "inputs.pt")

    done = run_python(f"""
        import torch

        assert not hasattr(torch.ops.avgn_fast, "crop_patches")
        try:
            torch.export.load({str(tmp_path / "both.pt2")!r})
        except Exception:
            pass  # the ops are not registered by torch alone
        else:
            raise AssertionError("loaded without the ops registered")

        import avgn_fast

        images, centers, q, k, v = torch.load({str(tmp_path / "inputs.pt")!r})
        patches, out = torch.export.load({str(tmp_path / "both.pt2")!r}).module()(images, centers, q, k, v)
        # integral corners (2, 2) and (3, 5): exact slices; attention by its formula
        assert torch.equal(patches, torch.stack([images[0, :, 2:6, 2:6], images[1, :, 3:7, 5:9]]))
        expected = torch.softmax(q @ k.transpose(-1, -2) / 16 ** 0.5, dim=-1) @ v
        torch.testing.assert_close(out, expected)
        print(torch.ops.avgn_fast.crop_patches.default.name(), torch.ops.avgn_fast.av_attention.default.name())
    """)
    assert done.stdout.split() == ["avgn_fast::crop_patches", "avgn_fast::av_attention"]


def test_source_checkout_registers_the_ops_without_installing(tmp_path):
    # as on a machine where nothing can be installed: the checkout on PYTHONPATH, kernels/ beside the package
    for folder in ("avgn_fast", "kernels"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    done = run_python(f"""
        import sys

        sys.path.insert(0, {str(tmp_path)!r})
        # leave out the finders of an editable install, which would find the installed kernels
        sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
        import torch

        import avgn_fast

        print(avgn_fast.__file__, avgn_fast.kernels.__file__, torch.ops.avgn_fast.crop_patches.default.name())
    """, cwd=tmp_path)
    assert done.stdout.split() == [str(tmp_path / "avgn_fast" / "__init__.py"),
                                   str(tmp_path / "kernels" / "__init__.py"), "avgn_fast::crop_patches"]


# --- the command line ---------------------------------------------------------------------------


def test_help_of_every_command_exits_0_without_importing_torch():
    done = run_python(f"""
        import contextlib, io, json, sys

        from avgn_fast_cli import main

        helps = {{}}
        for argv in [["--help"], *[[name, "--help"] for name in {list(cli.COMMANDS)!r}]]:
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                code = main(argv)
            helps[" ".join(argv)] = (code, out.getvalue())
        heavy = sorted(m for m in sys.modules if any(m == h or m.startswith(h + ".") for h in {HEAVY!r}))
        print(json.dumps({{"helps": helps, "heavy": heavy}}))
    """)
    result = json.loads(done.stdout)
    assert result["heavy"] == []
    assert set(result["helps"]) == {"--help", *(f"{name} --help" for name in cli.COMMANDS)}
    for argv, (code, text) in result["helps"].items():
        name = argv.removesuffix("--help").strip()
        assert code == 0 and text.startswith(f"usage: avgn-fast {name}".rstrip()), argv
    listing = result["helps"]["--help"][1]
    assert all(re.search(rf"^\s+{name}\s", listing, re.M) for name in cli.COMMANDS), listing


def test_console_entry_runs_a_command_with_the_package_initialised():
    # the console script defers the package's __init__ until the arguments parse: a command still gets it all
    done = run_python("""
        import contextlib, io, json

        from avgn_fast_cli import main

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["flops", "--config", "tiny", "--json"]) == 0
        table = json.loads(out.getvalue())
        import torch

        import avgn_fast

        assert torch.ops.avgn_fast.crop_patches.default.name() == "avgn_fast::crop_patches"
        print(table["config"], avgn_fast.AVGN.__name__, sorted(set(avgn_fast.__all__) - set(dir(avgn_fast))))
    """)
    assert done.stdout.split() == ["tiny", "AVGN", "[]"]


def test_console_entry_leaves_no_half_initialised_package_behind():
    # help and usage errors never run the package's __init__: a later import in the same process must run it
    done = run_python("""
        import contextlib, io

        from avgn_fast_cli import main

        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["--help"]) == 0
        import avgn_fast

        print(sorted(set(avgn_fast.__all__) - set(dir(avgn_fast))), callable(avgn_fast.load))
    """)
    assert done.stdout.split() == ["[]", "True"]


def test_console_entry_reports_usage_errors_in_one_line():
    done = subprocess.run([sys.executable, "-m", "avgn_fast_cli", "flops", "--no-such-flag"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.splitlines() == ["avgn-fast: error: unrecognized arguments: --no-such-flag "
                                        "(see 'avgn-fast --help')"]


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _option_help(text: str, actions: list[argparse.Action]) -> dict[str, str]:
    """Each option's help as printed (whitespace joined), cut from ``--help`` output between option lines."""
    body = text[text.index("options:"):]
    starts = [(re.search(rf"^\s+{re.escape(', '.join(a.option_strings))}\b", body, re.M).start(), a.dest)
              for a in actions]
    starts.sort()
    ends = [start for start, _ in starts[1:]] + [len(body)]
    return {dest: " ".join(body[start:end].split()) for (start, dest), end in zip(starts, ends)}


def test_every_option_has_help_and_shows_its_default():
    for name, parser in _subparsers().items():
        options = [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
        assert all(a.help for a in parser._actions), name
        printed = _option_help(parser.format_help(), options)
        for action in options:
            if action.default not in (None, False, []):
                assert "default" in printed[action.dest], (name, printed[action.dest])
    device = _option_help(_subparsers()["predict"].format_help(),
                          [a for a in _subparsers()["predict"]._actions if a.option_strings])["device"]
    assert device.endswith("cuda:N (default: auto)"), device


def test_command_help_shows_the_module_docstring_as_written():
    for name, parser in _subparsers().items():
        module = importlib.import_module(f"avgn_fast.commands.{name}")
        assert module.__doc__.strip() in parser.format_help(), name


# --- defaults spelled in the light command modules ------------------------------------------------


def test_parser_defaults_agree_with_the_library():
    from avgn_fast import demo, pareto
    from avgn_fast.commands import demo as demo_command
    from avgn_fast.commands import export as export_command
    from avgn_fast.commands import pareto as pareto_command
    from avgn_fast.commands import synth as synth_command
    from avgn_fast.commands import train as train_command
    from avgn_fast.data import synth
    from avgn_fast.data.augment import Augmentation
    from avgn_fast.engine import export
    from avgn_fast.training.trainer import TrainSettings

    settings = TrainSettings()
    assert dataclasses.asdict(train_command.Defaults()) == {
        f.name: getattr(settings, f.name) for f in dataclasses.fields(train_command.Defaults)}
    assert dataclasses.asdict(train_command.AugmentDefaults()) == dataclasses.asdict(settings.augmentation())
    assert dataclasses.asdict(train_command.AUGMENT_OFF) == dataclasses.asdict(Augmentation.off())
    assert (pareto_command.KS, pareto_command.THRESHOLDS, pareto_command.QUICK_THRESHOLDS) == (
        tuple(pareto.KS), pareto.THRESHOLDS, pareto.QUICK_THRESHOLDS)
    assert demo_command.SIZES == {name: (size.videos, size.epochs) for name, size in demo.SIZES.items()}
    assert synth_command.DEFAULT_VIDEOS == synth.DEFAULT_VIDEOS
    assert tuple(export_command.FORMATS) == tuple(export.FORMATS)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert cli.main(["train", "--help"]) == 0
    assert f"default: {settings.epochs}" in out.getvalue()
