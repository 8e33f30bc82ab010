"""Config composition and validation: the corpus of bad configs, then the paths that must work."""

from __future__ import annotations

from importlib import resources

import dataclasses
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ReadonlyConfigError

from isthmus.config import composer
from isthmus.config.composer import ConfigError, to_yaml
from isthmus.config.schema import ModelBase, Precision, RunConfig
from isthmus.models.captioner.config import CaptionerConfig
from isthmus.registry.manager import load_plugins

BUILTIN = load_plugins(autoload=False)[1]  # the built-in plugins: their config directories and schemas


def compose(overrides=(), config_dirs=(), known=None, schemas=None):
    """``compose`` over the built-in plugins' config directories and schemas (as the command line
    composes), plus the test's own."""
    merged = BUILTIN.config_schemas()
    for section, names in (schemas or {}).items():
        merged.setdefault(section, {}).update(names)
    return composer.compose(overrides, config_dirs=[*BUILTIN.config_dirs, *config_dirs], known=known, schemas=merged)


def from_yaml(text, source="<yaml>"):
    return composer.from_yaml(text, source=source, schemas=BUILTIN.config_schemas())


def group_options(config_dirs=()):
    return composer.group_options([*BUILTIN.config_dirs, *config_dirs])

CORPUS = yaml.safe_load((Path(__file__).parent / "bad_configs.yaml").read_text(encoding="utf-8"))
KNOWN = {"backend.name": ["cpu", "reference", "example"], "model.name": ["tiny-captioner", "plugin-t2i"]}

# The shipped default, read from its file so retuning the main job does not break these tests.
DEFAULT_STEPS = yaml.safe_load(resources.files("isthmus.configs").joinpath("train/default.yaml").read_text())["steps"]


def write_files(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


def assert_one_clean_line(message: str) -> None:
    assert "\n" not in message
    for leak in ("Traceback", "full_key", "object_type", "reference_type"):
        assert leak not in message


# --- the corpus ------------------------------------------------------------------------------


def test_corpus_is_large_and_ids_are_unique():
    ids = [entry["id"] for entry in CORPUS]
    assert len(ids) >= 30
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("entry", CORPUS, ids=[entry["id"] for entry in CORPUS])
def test_bad_config_is_refused_with_one_line_naming_the_problem(entry, tmp_path):
    extra = write_files(tmp_path, entry.get("files", {}))
    with pytest.raises(ConfigError) as caught:
        compose(entry["overrides"], config_dirs=[extra], known=entry.get("known"))
    message = str(caught.value)
    assert_one_clean_line(message)
    for expected in entry["expect"]:
        assert expected in message


def test_every_problem_is_reported_first_one_first():
    with pytest.raises(ConfigError) as caught:
        compose(["train.steps=abc", "train.precision=fp8", "model.dropout=2.0"])
    problems = caught.value.problems
    assert [p.split(":")[0] for p in problems] == ["model.dropout", "train.steps", "train.precision"]
    assert str(caught.value) == "; ".join(problems)


def test_missing_config_dir_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        group_options([tmp_path / "nope"])


# --- good paths ------------------------------------------------------------------------------


def test_defaults_compose_to_a_read_only_structured_run_config():
    cfg = compose()
    assert OmegaConf.get_type(cfg) is RunConfig
    assert OmegaConf.get_type(cfg.model) is CaptionerConfig
    assert cfg.backend.name == "auto" and cfg.model.name == "tiny-captioner" and cfg.data.name == "scenes"
    assert cfg.train.steps == DEFAULT_STEPS and cfg.train.betas == (0.9, 0.999)
    assert cfg.train.precision == "fp32" and cfg.train.precision is Precision.fp32
    assert cfg.name == "tiny-captioner" and cfg.output_dir == "runs/tiny-captioner"
    assert cfg.data.image_size == cfg.model.image_size == 32
    assert not OmegaConf.missing_keys(cfg)
    default = OmegaConf.to_object(cfg)
    assert default.model == CaptionerConfig() and default.train == RunConfig().train
    with pytest.raises(ReadonlyConfigError):
        cfg.train.steps = 5
    with pytest.raises(ReadonlyConfigError):
        cfg.backend.options["x"] = 1


def test_group_options_lists_the_shipped_files():
    options = group_options()
    assert options["backend"] == ["ascend", "auto", "cpu", "cuda", "reference"]
    assert options["model"] == ["tiny-captioner", "tiny-t2i"]
    assert options["data"] == ["image-folder", "scenes"]
    assert options["train"] == ["default", "quick", "t2i"]


@pytest.mark.parametrize("group, option", [(g, o) for g, opts in group_options().items() for o in opts])
def test_every_shipped_option_composes(group, option):
    needs = {"data.path": "."} if option == "image-folder" else {}  # the one option without a default
    cfg = compose([f"{group}={option}", *(f"{k}={v}" for k, v in needs.items())],
                  known={"backend.name": ["ascend", "cpu", "cuda", "reference"]})
    import json

    # The composed section holds every value of the option's file (an ${interpolation} as resolved).
    file = next(Path(str(d)) / group / f"{option}.yaml" for d in [resources.files("isthmus.configs"), *BUILTIN.config_dirs]
                if (Path(str(d)) / group / f"{option}.yaml").is_file())
    shipped = yaml.safe_load(file.read_text())
    resolved = OmegaConf.to_container(cfg, resolve=True)
    section = json.loads(json.dumps(resolved[group]))  # tuples as lists
    for key, value in shipped.items():
        if f"{group}.{key}" in needs:
            continue
        if isinstance(value, str) and value.startswith("${"):
            value = OmegaConf.create({**resolved, "probe": value}).probe
        assert section[key] == value, f"{group}={option}: {key} is {section[key]!r}, the file says {value!r}"


def test_a_model_schema_is_chosen_by_the_sections_name():
    cfg = compose(["model=tiny-t2i", "model.guidance=2"])
    assert cfg.model.guidance == 2.0 and cfg.model.codebook_size == 1024
    with pytest.raises(ConfigError, match="model.n_layers_text"):  # a captioner key on the t2i model
        compose(["model=tiny-t2i", "model.n_layers_text=3"])


def test_group_switch_replaces_the_section():
    cfg = compose(["backend=reference", "train=quick"])
    assert cfg.backend.name == "reference" and cfg.backend.strict is True
    assert cfg.train.steps == 20 and cfg.train.nan_policy == "stop"


def test_dotted_overrides_are_parsed_as_yaml():
    cfg = compose(["train.lr=3e-4", "backend.engine=torch", "backend.threads=4", "backend.options.hf32=true"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.backend.engine == "torch" and cfg.backend.threads == 4
    assert cfg.backend.options == {"hf32": True}
    assert compose(["backend.engine=null"]).backend.engine is None
    assert compose(["train.clip_norm=null"]).train.clip_norm is None
    assert compose(["train.lr=1"]).train.lr == 1.0  # an int is a fine float
    assert compose(["name=2024"]).name == "2024"  # a number is a fine name


def test_list_override():
    assert compose(["train.betas=[0.9,0.95]"]).train.betas == (0.9, 0.95)


def test_interpolations_follow_overrides():
    cfg = compose(["seed=7", "name=trial", "model.image_size=64"])
    assert cfg.data.seed == 7
    assert cfg.output_dir == "runs/trial"
    assert cfg.data.image_size == 64


def test_group_choices_apply_before_key_overrides_wherever_they_stand():
    before = compose(["train.steps=7", "train=quick"])
    after = compose(["train=quick", "train.steps=7"])
    assert before == after
    assert after.train.steps == 7 and after.train.batch_size == 8


def test_the_same_key_twice_takes_the_last():
    assert compose(["train.steps=500", "train.steps=900"]).train.steps == 900
    assert compose(["train=quick", "train=default"]).train.steps == DEFAULT_STEPS


def test_known_lists_each_valid_name_once():
    with pytest.raises(ConfigError) as caught:
        compose(["backend.name=tpu"], known={"backend.name": ["auto", "cpu", "cpu"]})
    assert "valid: auto, cpu" in str(caught.value) and "cpu, cpu" not in str(caught.value)


def test_known_accepts_registered_names_and_auto():
    assert compose(known=KNOWN).backend.name == "auto"
    assert compose(["backend=cpu"], known=KNOWN).backend.name == "cpu"
    assert compose(["backend.engine=null"], known={"backend.engine": ["torch"]}).backend.engine is None


def test_extra_dir_adds_an_option(tmp_path):
    extra = write_files(tmp_path, {"backend/example.yaml": "name: example\noptions: {lanes: 4}\n"})
    assert group_options([extra])["backend"] == ["ascend", "auto", "cpu", "cuda", "example", "reference"]
    cfg = compose(["backend=example"], config_dirs=[extra], known=KNOWN)
    assert cfg.backend.name == "example" and cfg.backend.options.lanes == 4
    assert cfg.backend.strict is False  # schema defaults fill what the file leaves out
    assert group_options([extra, extra]) == group_options([extra])  # one dir given twice is one dir


@dataclasses.dataclass
class PluginT2IConfig(ModelBase):
    """A plugin model's own schema."""

    name: str = "plugin-t2i"
    codebook_size: int = dataclasses.field(default=256, metadata={"bounds": {"ge": 2}})
    image_size: int = 32
    depth: int = MISSING  # required: OmegaConf's marker


def test_plugin_model_with_its_own_schema(tmp_path):
    extra = write_files(tmp_path, {"model/plugin-t2i.yaml": "name: plugin-t2i\ndepth: 3\n"})
    schemas = {"model": {"plugin-t2i": PluginT2IConfig}}
    cfg = compose(["model=plugin-t2i"], config_dirs=[extra], known=KNOWN, schemas=schemas)
    assert OmegaConf.get_type(cfg.model) is PluginT2IConfig
    assert cfg.model.codebook_size == 256 and cfg.model.depth == 3
    with pytest.raises(ConfigError, match=r"model\.d_model: unknown key"):
        compose(["model=plugin-t2i", "model.d_model=8"], config_dirs=[extra], schemas=schemas)
    with pytest.raises(ConfigError, match=r"model\.codebook_size: must be >= 2"):
        compose(["model=plugin-t2i", "model.codebook_size=1"], config_dirs=[extra], schemas=schemas)
    (extra / "model/plugin-t2i.yaml").write_text("name: plugin-t2i\n")
    with pytest.raises(ConfigError, match=r"model\.depth: missing value"):
        compose(["model=plugin-t2i"], config_dirs=[extra], schemas=schemas)


def test_unusable_plugin_schemas_are_config_errors(tmp_path):
    @dataclasses.dataclass
    class OddTypes(ModelBase):
        name: str = "odd"
        widths: set = dataclasses.field(default_factory=set)

    extra = write_files(tmp_path, {"model/odd.yaml": "name: odd\n"})
    cases = [
        (OddTypes, "model: schema OddTypes is not usable"),
        (dict, "model.name: the schema for 'odd' must be a dataclass"),
    ]
    for schema, expected in cases:
        with pytest.raises(ConfigError, match=expected) as caught:
            compose(["model=odd"], config_dirs=[extra], schemas={"model": {"odd": schema}})
        assert_one_clean_line(str(caught.value))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("defaults: {backend: auto}\n", "'defaults' must be a list"),
        ("defaults:\n  - backend\n", "a 'defaults' entry must be 'group: option'"),
        ("defaults:\n  - backnd: auto\n", "unknown config group 'backnd' (did you mean 'backend'?)"),
        ("defaults:\n  - backend: cdua\n", "backend=cdua (in "),
    ],
)
def test_bad_defaults_file(text, expected, tmp_path, monkeypatch):
    import isthmus.config.composer

    package = write_files(tmp_path, {"defaults.yaml": text, "backend/auto.yaml": "name: auto\n"})
    monkeypatch.setattr(isthmus.config.composer, "_package_dir", lambda: package)
    with pytest.raises(ConfigError) as caught:
        compose()
    assert expected in str(caught.value)
    assert_one_clean_line(str(caught.value))


def test_yaml_round_trip():
    cfg = compose(["backend=cpu", "train=quick", "train.betas=[0.8,0.9]", "backend.options.allow_hf32=true"])
    text = to_yaml(cfg)
    assert yaml.safe_load(text)["train"]["betas"] == [0.8, 0.9]  # plain YAML, no tags
    again = from_yaml(text)
    assert again == cfg and OmegaConf.get_type(again) is RunConfig and OmegaConf.is_readonly(again)
    assert to_yaml(again) == text


def test_from_yaml_validates(tmp_path):
    text = to_yaml(compose()).replace(f"steps: {DEFAULT_STEPS}", "steps: -3")
    with pytest.raises(ConfigError, match=r"train\.steps: must be >= 1, got -3 \(in ckpt\.yaml\)"):
        from_yaml(text, source="ckpt.yaml")


@settings(max_examples=150, deadline=None)
@given(st.lists(st.text(alphabet="abcdeginrstx.=_-[]{}:,$?+~ 0123456789", max_size=20), max_size=3))
def test_any_override_gives_a_config_or_a_one_line_config_error(overrides):
    try:
        compose(overrides)
    except ConfigError as err:
        assert_one_clean_line(str(err))


def test_public_names():
    import isthmus.config.composer

    assert sorted(isthmus.config.composer.__all__) == sorted(
        ["ConfigError", "compose", "from_yaml", "group_options", "to_yaml", "RunConfig", "BackendConfig"]
        + ["ModelBase", "DataBase", "TrainConfig"]
        + ["Mlp", "NanPolicy", "Norm", "Precision", "Schedule"]
    )
    assert all(hasattr(isthmus.config.composer, name) for name in isthmus.config.composer.__all__)


# --- the corpus through the command line ----------------------------------------------------------
@pytest.mark.parametrize("entry", CORPUS, ids=[entry["id"] for entry in CORPUS])
def test_bad_config_through_the_cli_exits_2_with_one_line(entry, tmp_path, monkeypatch, capsys):
    # The corpus files reach the CLI the way a plugin's would: through register_config_dirs.
    from isthmus.cli import main as cli
    from isthmus.registry import manager as plugin_manager
    from isthmus.registry.hookspecs import hookimpl

    extra = write_files(tmp_path, entry.get("files", {}))

    class CorpusDirs:
        @staticmethod
        @hookimpl
        def register_config_dirs():
            return extra

    manager, registry = plugin_manager.load_plugins(autoload=False, extra=[("corpus", CorpusDirs)])
    monkeypatch.setattr(plugin_manager, "_registry", registry)
    monkeypatch.setattr(plugin_manager, "_manager", manager)
    code = cli.main(["config", "show", *entry["overrides"]])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("isthmus: error: "), captured.err
    assert "Traceback" not in captured.err
