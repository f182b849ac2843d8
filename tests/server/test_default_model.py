"""The embedded default model's recipe: Alpaca / WikiText-2 from the offline data folder, or the text shipped in the
package where there is none (a fresh machine), each under its own cache directory."""

from __future__ import annotations

import pytest

from uniql.server import default_model


def built_with(monkeypatch, tmp_path, has_data: bool):
    """The compress config ensure_default_checkpoint would build with (the build itself is stubbed)."""
    monkeypatch.setattr(default_model, "has_data_dir", lambda: has_data)
    monkeypatch.setenv("UNIQL_CACHE_DIR", str(tmp_path))
    seen, messages = {}, []

    def fake_compress(model, out, cfg):
        seen["cfg"] = cfg
        out.mkdir(parents=True)
        (out / "uniql.json").write_text("{}")

    import uniql.compressor.compress

    monkeypatch.setattr(uniql.compressor.compress, "compress", fake_compress)
    out = default_model.ensure_default_checkpoint(progress=messages.append)
    return out, seen["cfg"], messages


@pytest.mark.parametrize("has_data", [True, False])
def test_default_model_calibrates_on_the_data_folder_or_the_packaged_text(monkeypatch, tmp_path, has_data):
    out, cfg, messages = built_with(monkeypatch, tmp_path, has_data)
    sources = (cfg.calib_source, cfg.bi_source, cfg.quant.calib_source)
    assert sources == (("alpaca", "wikitext2", "wikitext2") if has_data else ("shakespeare",) * 3)
    recipe = default_model.DEFAULT_RECIPE if has_data else default_model.PACKAGED_TEXT_RECIPE
    assert (cfg.calib_samples, cfg.calib_seqlen) == (recipe["calib_samples"], recipe["calib_seqlen"])
    assert any("no offline data folder" in m for m in messages) == (not has_data)
    assert (out / "uniql.json").is_file() and out == default_model.default_checkpoint_dir()
    again = default_model.ensure_default_checkpoint(progress=messages.append)  # reused, not rebuilt
    assert again == out


def test_the_two_recipes_never_share_a_cache_directory(monkeypatch):
    monkeypatch.setattr(default_model, "has_data_dir", lambda: True)
    with_data = default_model.default_checkpoint_dir()
    monkeypatch.setattr(default_model, "has_data_dir", lambda: False)
    assert default_model.default_checkpoint_dir() != with_data


def test_a_data_folder_without_the_named_sources_counts_as_none(monkeypatch, tmp_path):
    """UNIQL_DATA_DIR set to a folder lacking Alpaca / WikiText-2 (an empty mount, a partial copy): the packaged
    text's recipe, not the data folder's one that would fail on a missing file after loading the model."""
    from uniql.paths import NAMED_DATA_FILES

    monkeypatch.setenv("UNIQL_DATA_DIR", str(tmp_path))
    assert default_model.default_recipe() == default_model.PACKAGED_TEXT_RECIPE
    for relative in NAMED_DATA_FILES.values():
        assert default_model.default_recipe() == default_model.PACKAGED_TEXT_RECIPE  # not all of them yet
        (tmp_path / relative).parent.mkdir(parents=True)
        (tmp_path / relative).write_text("x")
    assert default_model.default_recipe() == default_model.DEFAULT_RECIPE


@pytest.mark.parametrize("recipe", [default_model.DEFAULT_RECIPE, default_model.PACKAGED_TEXT_RECIPE])
def test_make_serve_flags_are_the_recipe(recipe):
    """`make serve` passes recipe_flags to `uniql compress`: the CLI reads them back as the recipe."""
    from uniql.cli import build_parser

    flags = default_model.recipe_flags(recipe).split()
    args = build_parser().parse_args(["compress", "smollm2-135m", "--out", "x", *flags])
    data = recipe.get("data")
    assert (args.quant, args.calib_samples, args.calib_seqlen, args.bi_samples, args.bi_seqlen, args.quant_samples,
            args.quant_seqlen) == tuple(recipe[k] for k in ("quant", "calib_samples", "calib_seqlen", "bi_samples",
                                                            "bi_seqlen", "quant_samples", "quant_seqlen"))
    assert (args.calib_data, args.bi_data, args.quant_data) == ((data,) * 3 if data else ("alpaca", "wikitext2",
                                                                                            "wikitext2"))


def test_build_folders_of_gone_processes_are_dropped(tmp_path):
    import os
    import subprocess
    import sys

    from uniql.server.default_model import _drop_abandoned_builds

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a process that has exited
    out = tmp_path / "smollm2-135m-uniql-abc"
    for pid in (gone, str(os.getpid()), str(os.getppid())):
        (out.parent / f"{out.name}.building-{pid}").mkdir()
    _drop_abandoned_builds(out)
    left = sorted(p.name.rsplit("-", 1)[-1] for p in tmp_path.iterdir())
    assert left == sorted([str(os.getpid()), str(os.getppid())])  # live builds (this one's too) stay
