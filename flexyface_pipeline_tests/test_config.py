from pathlib import Path

import pytest

from flexyface_pipeline.lib.config import SweepConfigError, build_sweep_spec, validate_metrics, validate_sweep_name
from flexyface_pipeline.lib.sampling import sample_parameters

REPO_PROMPTS = Path(__file__).resolve().parents[1] / "data" / "prompts"


def spec(**overrides):
    kwargs = dict(sweep="s1", num_images=40, prompt_files=["demo.txt"], prompts_dir=REPO_PROMPTS)
    kwargs.update(overrides)
    return build_sweep_spec(**kwargs)


def test_defaults_match_the_seed_ranges():
    s = spec()
    assert (s.steps_min, s.steps_max) == (8, 48)
    assert (s.guidance_min, s.guidance_max) == (1.0, 8.0)
    assert (s.width, s.height) == (512, 512)
    assert s.engine == "realvis_xl"
    assert len(s.prompts) == 4


@pytest.mark.parametrize(
    "overrides, field, fragment",
    [
        ({"num_images": 0}, "num_images", "positive"),
        ({"num_images": -3}, "num_images", "positive"),
        ({"steps_min": 2}, "steps", "outside the allowed range [4, 60]"),
        ({"steps_max": 61}, "steps", "outside"),
        ({"steps_min": 30, "steps_max": 10}, "steps", "inverted"),
        ({"guidance_min": 0.1}, "guidance", "outside the allowed range [0.5, 12.0]"),
        ({"guidance_min": 9.0, "guidance_max": 2.0}, "guidance", "inverted"),
        ({"guidance_max": float("nan")}, "guidance", "finite"),
        ({"guidance_min": float("-inf")}, "guidance", "finite"),
        ({"width": 500}, "width", "multiple of 8"),
        ({"height": 0}, "height", "outside"),
        ({"prompt_files": [], "prompts": []}, "prompts", "no prompt"),
        ({"prompt_files": [], "prompts": ["  "]}, "prompts", "empty"),
        ({"prompt_files": ["nope.txt"]}, "prompt_files", "not found"),
        ({"prompt_files": ["../../etc/passwd"]}, "prompt_files", "not a file under"),
        ({"engine": "dalle"}, "engine", "unknown engine 'dalle'"),
        ({"sweep": ""}, "sweep", "empty"),
        ({"sweep": "../evil"}, "sweep", "not a valid sweep name"),
        ({"sweep": "a/b"}, "sweep", "not a valid sweep name"),
        ({"sweep": "a\x00b"}, "sweep", "NUL"),
        ({"sweep": "x" * 65}, "sweep", "at most 64"),
    ],
)
def test_invalid_settings_name_the_field(overrides, field, fragment):
    with pytest.raises(SweepConfigError) as err:
        spec(**overrides)
    assert err.value.field == field
    assert fragment in str(err.value)
    assert str(err.value).startswith(f"{field}:")


def test_unknown_metric_is_refused():
    with pytest.raises(SweepConfigError, match="unknown metric"):
        validate_metrics(["clip_score", "fid"])
    assert validate_metrics(["hps_v2_score", "hps_v2_score"]) == ("hps_v2_score",)


def test_sweep_names():
    assert validate_sweep_name("2026-11-26_nightly.v2") == "2026-11-26_nightly.v2"
    for bad in ("..", ".hidden", "a b", "a\\b"):
        with pytest.raises(SweepConfigError):
            validate_sweep_name(bad)


def test_sampling_is_deterministic_and_within_ranges():
    s = spec(num_images=500, steps_min=4, steps_max=60, guidance_min=0.5, guidance_max=12.0)
    a, b = sample_parameters(s), sample_parameters(s)
    assert a.equals(b)
    assert a["steps"].between(4, 60).all() and a["guidance"].between(0.5, 12.0).all()
    assert a["steps"].nunique() > 40 and a["guidance"].nunique() > 300
    assert a["image_id"].is_unique and a["seed"].is_unique
    # prompts are balanced: 500 images over 4 prompts
    assert sorted(a["prompt"].value_counts().tolist()) == [125, 125, 125, 125]


def test_sampling_depends_on_name_and_seed():
    base = sample_parameters(spec())
    assert not base["seed"].equals(sample_parameters(spec(sweep="s2"))["seed"])
    assert not base["seed"].equals(sample_parameters(spec(base_seed=1))["seed"])


def test_stored_settings_are_not_silently_mixed_with_new_ones(tmp_path):
    import shutil

    from flexyface_pipeline.defs.assets.sweep import SweepConfig, resolve_spec
    from flexyface_pipeline.lib.store import SweepStore

    store = SweepStore(tmp_path)
    shutil.copytree(REPO_PROMPTS, store.prompts_dir)
    first = SweepConfig(num_images=6, prompt_files=["demo.txt"], guidance_max=6.0).to_spec("kept", store)
    store.write_spec(first)
    # Without num_images the stored sweep is reused as it is...
    assert resolve_spec(SweepConfig(), "kept", store) == first
    # ...and other settings given without num_images are an error, not silently ignored.
    with pytest.raises(SweepConfigError, match="guidance_max, width were set too") as err:
        resolve_spec(SweepConfig(guidance_max=9.0, width=256), "kept", store)
    assert err.value.field == "num_images"
    with pytest.raises(SweepConfigError, match="sweep 'new' is new"):
        resolve_spec(SweepConfig(), "new", store)


PNG_HEADER = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"


@pytest.mark.parametrize(
    "content, fragment",
    [
        (PNG_HEADER, "is not UTF-8 text: byte 0x89 at offset 0 (line 1) is not valid UTF-8"),
        ("a portrait\nun café\n".encode("latin-1"), "byte 0xe9 at offset 17 (line 2)"),
        ("a portrait\n".encode("utf-16"), "byte 0xff at offset 0 (line 1)"),
        (b"a portrait\nsecond\x00line\n", "is not text: it holds a NUL byte at offset 17 (line 2)"),
    ],
)
def test_a_prompt_file_that_is_not_utf8_text_is_named_with_the_offset(tmp_path, content, fragment):
    (tmp_path / "bin.dat").write_bytes(content)
    with pytest.raises(SweepConfigError) as err:
        spec(prompt_files=["bin.dat"], prompts_dir=tmp_path)
    message = str(err.value)
    assert err.value.field == "prompt_files"
    assert message.startswith("prompt_files: prompt file 'bin.dat' ")
    assert fragment in message
    assert message.endswith("save it as UTF-8 text, one prompt per line")
    assert "\n" not in message


def test_a_prompt_file_that_is_a_directory_is_refused(tmp_path):
    (tmp_path / "more").mkdir()
    with pytest.raises(SweepConfigError) as err:
        spec(prompt_files=["more"], prompts_dir=tmp_path)
    assert str(err.value) == ("prompt_files: prompt file 'more' is a directory: name a text file with one prompt "
                              "per line")


def test_an_unreadable_prompt_file_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "locked.txt"
    path.write_text("a portrait\n")
    real = Path.read_bytes

    def read_bytes(self):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)  # a chmod does not stop root
    with pytest.raises(SweepConfigError) as err:
        spec(prompt_files=["locked.txt"], prompts_dir=tmp_path)
    assert str(err.value) == (f"prompt_files: prompt file 'locked.txt' cannot be read (permission denied): make it "
                              f"readable, e.g. `chmod a+r {path}`")


def test_a_sweep_name_with_a_trailing_newline_is_refused():
    with pytest.raises(SweepConfigError, match="not a valid sweep name"):
        validate_sweep_name("nightly\n")
